/*
 * Transformer forward and backward over packed batches, with LoRA applied
 * beside each targeted frozen matmul.  The layer code reads like the math;
 * kernels live in kernels.c / attention.c / matmul.c.
 *
 * Memory plan (floats, N tokens, see docs/memory.md):
 *   residual streams (L + 1) * N * dim, always;
 *   per activation slot N * (4 dim + 2 qd + 2 kvd + H + 3 hidden + 2 + r * targets);
 *   slots = L when training without recomputation, else 1;
 *   backward scratch N * (3 dim + 2 qd + 2 kvd + 3 hidden + r + 2 max_in) when training.
 */
#include "engine.h"

#include "blas.h"
#include "kernels.h"

#include <string.h>

/* ---- batch packing --------------------------------------------------------- */

int packed_from_batch(packed_batch *out, const perl_model *m, const perl_batch *batch) {
    memset(out, 0, sizeof *out);
    PERL_CHECK_ARG(batch, "batch is NULL");
    PERL_CHECK_ARG(batch->struct_size >= sizeof(perl_batch),
                   "batch->struct_size %zu is too small (call perl_batch_init)", batch->struct_size);
    PERL_CHECK_ARG(batch->tokens, "batch->tokens is NULL");
    PERL_CHECK_ARG(batch->batch_size > 0, "batch_size %d must be positive", batch->batch_size);
    PERL_CHECK_ARG(batch->seq_len > 0, "seq_len %d must be positive", batch->seq_len);
    if (batch->seq_len > m->cfg.max_seq_len)
        return perl_fail(LIBPERL_ERR_RANGE, "seq_len %d exceeds the model context %d", batch->seq_len,
                         m->cfg.max_seq_len);
    int64_t total = 0;
    for (int b = 0; b < batch->batch_size; b++) {
        int len = batch->lengths ? batch->lengths[b] : batch->seq_len;
        if (len < 1 || len > batch->seq_len)
            return perl_fail(LIBPERL_ERR_RANGE, "row %d: length %d is outside [1, seq_len %d]", b, len,
                             batch->seq_len);
        for (int t = 0; t < len; t++) {
            int32_t id = batch->tokens[(size_t)b * batch->seq_len + t];
            if (id < 0 || id >= m->cfg.vocab_size)
                return perl_fail(LIBPERL_ERR_RANGE, "row %d position %d: token id %d outside [0, %d)", b, t,
                                 id, m->cfg.vocab_size);
        }
        total += len;
    }
    if (total > (1 << 30)) return perl_fail(LIBPERL_ERR_RANGE, "batch has too many tokens (%lld)", (long long)total);
    out->n_rows = batch->batch_size;
    out->n_tokens = (int)total;
    out->row_start = perl_mem_alloc((size_t)(out->n_rows + 1) * sizeof(int));
    out->tokens = perl_mem_alloc((size_t)total * sizeof(int32_t));
    out->pos = perl_mem_alloc((size_t)total * sizeof(int32_t));
    if (!out->row_start || !out->tokens || !out->pos) {
        packed_free(out);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory packing a batch");
    }
    int i = 0;
    for (int b = 0; b < batch->batch_size; b++) {
        int len = batch->lengths ? batch->lengths[b] : batch->seq_len;
        out->row_start[b] = i;
        for (int t = 0; t < len; t++, i++) {
            out->tokens[i] = batch->tokens[(size_t)b * batch->seq_len + t];
            out->pos[i] = t;
        }
    }
    out->row_start[batch->batch_size] = i;
    return LIBPERL_OK;
}

void packed_free(packed_batch *pb) {
    perl_mem_free(pb->row_start);
    perl_mem_free(pb->tokens);
    perl_mem_free(pb->pos);
    memset(pb, 0, sizeof *pb);
}

int packed_index(const packed_batch *pb, int row, int t) {
    int i = pb->row_start[row] + t;
    return i < pb->row_start[row + 1] ? i : -1;
}

/* ---- workspace planning ------------------------------------------------------ */

typedef struct planner {
    float *base; /* NULL while measuring */
    size_t used;
} planner;

static float *take(planner *p, size_t n) {
    float *r = p->base ? p->base + p->used : NULL;
    p->used += (n + 15) & ~(size_t)15; /* keep every buffer 64-byte aligned */
    return r;
}

static int lora_rank_of(const engine *e) {
    return e->lora && e->lora->opts.mode == LIBPERL_MODE_LORA ? e->lora->opts.rank : 0;
}

static void plan(engine *e, planner *p, size_t N, int n_slots, int training) {
    const perl_model_config *c = &e->model->cfg;
    size_t dim = c->dim, hid = c->hidden_dim, qd = (size_t)c->n_heads * c->head_dim;
    size_t kvd = (size_t)c->n_kv_heads * c->head_dim, r = (size_t)lora_rank_of(e);
    size_t max_in = PERL_MAX(PERL_MAX(dim, hid), qd);
    e->resid = take(p, (size_t)(c->n_layers + 1) * N * dim);
    e->rstd_final = take(p, N);
    e->hidden = take(p, N * dim);
    e->dhidden = take(p, N * dim);
    /* The normed inputs and the SwiGLU product are cheap to recompute, so every
     * slot shares one buffer for each; backward recomputes them (layer_backward). */
    float *xn = take(p, N * dim), *act = take(p, N * hid);
    /* Only backward reads a module's x A^T again; without it one buffer serves
     * every module in turn. */
    float *shared_u = r && !training ? take(p, N * r) : NULL;
    for (int s = 0; s < n_slots; s++) {
        layer_acts *a = &e->slots[s];
        a->xn1 = a->xn2 = xn;
        a->act = act;
        a->rstd1 = take(p, N);
        a->q = take(p, N * qd);
        a->k = take(p, N * kvd);
        a->v = take(p, N * kvd);
        a->att = take(p, N * qd);
        a->lse = take(p, N * (size_t)c->n_heads);
        a->x_mid = take(p, N * dim);
        a->rstd2 = take(p, N);
        a->gate = take(p, N * hid);
        a->up = take(p, N * hid);
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            int targeted = r && (e->lora->opts.target_modules & (1u << t));
            a->lora_u[t] = !targeted ? NULL : training ? take(p, N * r) : shared_u;
        }
    }
    /* LoRA dropout (training only): the dropped input, and backward's masked du A */
    int dropout = r && training && e->lora->opts.dropout > 0.0f;
    e->x_drop = dropout ? take(p, N * max_in) : NULL;
    if (training) {
        e->d_resid = take(p, N * dim);
        e->d_x = take(p, N * dim);
        e->d_q = take(p, N * qd);
        e->d_k = take(p, N * kvd);
        e->d_v = take(p, N * kvd);
        e->d_att = take(p, N * qd);
        e->d_gate = take(p, N * hid);
        e->d_up = take(p, N * hid);
        e->d_act = take(p, N * hid);
        e->d_u = r ? take(p, N * r) : NULL;
        e->lora_tmp = dropout ? take(p, N * max_in) : NULL;
    }
}

/*
 * Makes the buffers fit N tokens; training adds backward scratch and (without
 * recomputation) one activation slot per layer.  A request the current plan
 * serves reuses it.  Otherwise the buffers are planned for this request alone,
 * except that a training plan also covers the largest training batch seen so
 * far (so steps of varying length do not reallocate).  In particular a large
 * inference batch (scoring an evaluation set before training, say) never
 * makes the later training plan hold every layer's activations for that many
 * tokens.
 */
static int engine_reserve(engine *e, int N, int training) {
    int recompute = e->lora && e->lora->recompute;
    int n_slots = training && !recompute ? e->model->cfg.n_layers : 1;
    if (e->arena && N <= e->capacity && n_slots <= e->n_slots && (!training || e->planned_training))
        return LIBPERL_OK;
    if (training) {
        N = PERL_MAX(N, e->train_capacity);
        e->train_capacity = N;
    }
    layer_acts *slots = perl_mem_calloc((size_t)n_slots, sizeof *slots);
    if (!slots) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for activation slots");
    perl_mem_free(e->slots);
    e->slots = slots;
    planner measure = {NULL, 0};
    plan(e, &measure, (size_t)N, n_slots, training);
    perl_mem_free(e->arena);
    e->arena = perl_mem_alloc(measure.used * sizeof(float));
    if (!e->arena) {
        e->capacity = 0;
        e->n_slots = 0;
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for activations (%zu MB)",
                         measure.used * sizeof(float) >> 20);
    }
    planner place = {e->arena, 0};
    plan(e, &place, (size_t)N, n_slots, training);
    e->arena_floats = measure.used;
    e->capacity = N;
    e->n_slots = n_slots;
    e->planned_training = training;
    return LIBPERL_OK;
}

int engine_create(engine **out, const perl_model *m, perl_lora *adapter) {
    *out = NULL;
    engine *e = perl_mem_calloc(1, sizeof *e);
    if (!e) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    e->model = m;
    e->lora = adapter;
    e->w = lora_weights(m, adapter);
    *out = e;
    return LIBPERL_OK;
}

void engine_free(engine *e) {
    if (!e) return;
    perl_mem_free(e->slots);
    perl_mem_free(e->arena);
    perl_mem_free(e->lm_logits);
    perl_mem_free(e->lm_h);
    perl_mem_free(e->lm_dh);
    perl_mem_free(e);
}

float *engine_hidden(engine *e) { return e->hidden; }
float *engine_dhidden(engine *e) { return e->dhidden; }

/* ---- linear layers with LoRA ------------------------------------------------- */

static uint64_t dropout_stream(const engine *e, int layer, int target) {
    return perl_hash64(e->dropout_step * 1315423911ull + (uint64_t)layer * LORA_N_TARGETS + (uint64_t)target);
}

/* The adapter input: x, or dropout(x) (regenerated identically in backward). */
static const float *lora_input(engine *e, const float *x, int layer, int target, int N, int in) {
    float p = e->lora->opts.dropout;
    if (!e->training || p <= 0.0f) return x;
    dropout_forward(e->x_drop, x, (int64_t)N * in, p, e->lora->opts.seed, dropout_stream(e, layer, target));
    return e->x_drop;
}

/* y[N, out] = x W^T + b (+ beta y) + scale * (drop(x) A^T) B^T */
static void linear_forward(engine *e, layer_acts *a, int layer, int target, const float *x, const float *W,
                           const float *b, float *y, int N, int in, int out, float beta) {
    matmul_forward(y, x, W, b, N, in, out, beta);
    const lora_module *mod = lora_module_at(e->lora, layer, target);
    if (!mod) return;
    int r = e->lora->opts.rank;
    const float *xin = lora_input(e, x, layer, target, N, in);
    float *u = a->lora_u[target];
    /* u[N, r] = xin A^T;  y += scale * u B^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, r, in, 1.0f, xin, in, mod->A, in, 0.0f, u, r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, r, e->lora->scale, u, r, mod->B, r, 1.0f, y,
                out);
}

/* dx += dy W (+ LoRA path); dW / db accumulate in FULL mode; dA, dB in LoRA mode. */
static void linear_backward(engine *e, layer_acts *a, int layer, int target, float *dx, float *dW, float *db,
                            const float *dy, const float *x, const float *W, int N, int in, int out) {
    matmul_backward(dx, dW, db, dy, x, W, N, in, out);
    const lora_module *mod = lora_module_at(e->lora, layer, target);
    if (!mod) return;
    int r = e->lora->opts.rank;
    float scale = e->lora->scale;
    const float *xin = lora_input(e, x, layer, target, N, in);
    const float *u = a->lora_u[target];
    /* dB[out, r] += scale * dy^T u;  du[N, r] = scale * dy B;  dA[r, in] += du^T xin */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, N, scale, dy, out, u, r, 1.0f, mod->dB, r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, r, out, scale, dy, out, mod->B, r, 0.0f, e->d_u, r);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, in, N, 1.0f, e->d_u, r, xin, in, 1.0f, mod->dA, in);
    if (!dx) return;
    if (xin == x) { /* dx += du A */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1.0f, e->d_u, r, mod->A, in, 1.0f, dx,
                    in);
    } else { /* through dropout: dx += mask / (1 - p) * (du A), same mask as forward */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1.0f, e->d_u, r, mod->A, in, 0.0f,
                    e->lora_tmp, in);
        dropout_forward(e->lora_tmp, e->lora_tmp, (int64_t)N * in, e->lora->opts.dropout, e->lora->opts.seed,
                        dropout_stream(e, layer, target));
        add_inplace(dx, e->lora_tmp, (int64_t)N * in);
    }
}

/* ---- layers ------------------------------------------------------------------- */

static float *resid_at(engine *e, int layer) {
    return e->resid + (size_t)layer * e->capacity * e->model->cfg.dim;
}

static int layer_forward(engine *e, int l, layer_acts *a) {
    const perl_model_config *c = &e->model->cfg;
    const layer_weights *L = &e->w->layers[l];
    const packed_batch *pb = e->pb;
    int N = pb->n_tokens, dim = c->dim, hid = c->hidden_dim;
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    const float *x = resid_at(e, l);
    float *out = resid_at(e, l + 1);

    rmsnorm_forward(a->xn1, a->rstd1, x, L->attn_norm, N, dim, c->rms_norm_eps);
    linear_forward(e, a, l, LORA_Q, a->xn1, L->wq, L->bq, a->q, N, dim, qd, 0.0f);
    linear_forward(e, a, l, LORA_K, a->xn1, L->wk, L->bk, a->k, N, dim, kvd, 0.0f);
    linear_forward(e, a, l, LORA_V, a->xn1, L->wv, L->bv, a->v, N, dim, kvd, 0.0f);
    rope_apply(a->q, pb->pos, N, c->n_heads, c->head_dim, e->model->rope_cos, e->model->rope_sin,
               c->rope_interleaved, 0);
    rope_apply(a->k, pb->pos, N, c->n_kv_heads, c->head_dim, e->model->rope_cos, e->model->rope_sin,
               c->rope_interleaved, 0);
    PERL_TRY(attention_forward(a->att, a->lse, a->q, a->k, a->v, pb->row_start, pb->n_rows, c->n_heads,
                               c->n_kv_heads, c->head_dim));
    /* x_mid = x + att Wo^T */
    memcpy(a->x_mid, x, (size_t)N * dim * sizeof(float));
    linear_forward(e, a, l, LORA_O, a->att, L->wo, NULL, a->x_mid, N, qd, dim, 1.0f);

    rmsnorm_forward(a->xn2, a->rstd2, a->x_mid, L->ffn_norm, N, dim, c->rms_norm_eps);
    linear_forward(e, a, l, LORA_GATE, a->xn2, L->w_gate, NULL, a->gate, N, dim, hid, 0.0f);
    linear_forward(e, a, l, LORA_UP, a->xn2, L->w_up, NULL, a->up, N, dim, hid, 0.0f);
    swiglu_forward(a->act, a->gate, a->up, (int64_t)N * hid);
    /* out = x_mid + act Wdown^T */
    memcpy(out, a->x_mid, (size_t)N * dim * sizeof(float));
    linear_forward(e, a, l, LORA_DOWN, a->act, L->w_down, NULL, out, N, hid, dim, 1.0f);
    return LIBPERL_OK;
}

/* On entry e->d_resid = dL/d(layer output); on exit dL/d(layer input). */
static int layer_backward(engine *e, int l, layer_acts *a) {
    const perl_model_config *c = &e->model->cfg;
    const layer_weights *L = &e->w->layers[l];
    const layer_weights *dL = e->lora && e->lora->opts.mode == LIBPERL_MODE_FULL ? &e->lora->full_dw.layers[l]
                                                                                  : NULL;
    const packed_batch *pb = e->pb;
    int N = pb->n_tokens, dim = c->dim, hid = c->hidden_dim;
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    const float *x = resid_at(e, l);
    size_t nd = (size_t)N * dim;

    /* feed-forward: out = x_mid + down(silu(gate(xn2)) * up(xn2)); xn2 and act
     * share buffers across layers, so recompute them (bitwise as in forward) */
    rmsnorm_forward(a->xn2, a->rstd2, a->x_mid, L->ffn_norm, N, dim, c->rms_norm_eps);
    swiglu_forward(a->act, a->gate, a->up, (int64_t)N * hid);
    memset(e->d_act, 0, (size_t)N * hid * sizeof(float));
    linear_backward(e, a, l, LORA_DOWN, e->d_act, dL ? dL->w_down : NULL, NULL, e->d_resid, a->act, L->w_down,
                    N, hid, dim);
    swiglu_backward(e->d_gate, e->d_up, e->d_act, a->gate, a->up, (int64_t)N * hid);
    memset(e->d_x, 0, nd * sizeof(float));
    linear_backward(e, a, l, LORA_GATE, e->d_x, dL ? dL->w_gate : NULL, NULL, e->d_gate, a->xn2, L->w_gate, N,
                    dim, hid);
    linear_backward(e, a, l, LORA_UP, e->d_x, dL ? dL->w_up : NULL, NULL, e->d_up, a->xn2, L->w_up, N, dim, hid);
    rmsnorm_backward(e->d_resid, dL ? dL->ffn_norm : NULL, e->d_x, a->x_mid, L->ffn_norm, a->rstd2, N, dim);

    /* attention: x_mid = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))) */
    memset(e->d_att, 0, (size_t)N * qd * sizeof(float));
    linear_backward(e, a, l, LORA_O, e->d_att, dL ? dL->wo : NULL, NULL, e->d_resid, a->att, L->wo, N, qd, dim);
    PERL_TRY(attention_backward(e->d_q, e->d_k, e->d_v, e->d_att, a->att, a->lse, a->q, a->k, a->v, pb->row_start,
                                pb->n_rows, c->n_heads, c->n_kv_heads, c->head_dim));
    rope_apply(e->d_q, pb->pos, N, c->n_heads, c->head_dim, e->model->rope_cos, e->model->rope_sin,
               c->rope_interleaved, 1);
    rope_apply(e->d_k, pb->pos, N, c->n_kv_heads, c->head_dim, e->model->rope_cos, e->model->rope_sin,
               c->rope_interleaved, 1);
    rmsnorm_forward(a->xn1, a->rstd1, x, L->attn_norm, N, dim, c->rms_norm_eps); /* shared buffer */
    memset(e->d_x, 0, nd * sizeof(float));
    linear_backward(e, a, l, LORA_Q, e->d_x, dL ? dL->wq : NULL, dL ? dL->bq : NULL, e->d_q, a->xn1, L->wq, N,
                    dim, qd);
    linear_backward(e, a, l, LORA_K, e->d_x, dL ? dL->wk : NULL, dL ? dL->bk : NULL, e->d_k, a->xn1, L->wk, N,
                    dim, kvd);
    linear_backward(e, a, l, LORA_V, e->d_x, dL ? dL->wv : NULL, dL ? dL->bv : NULL, e->d_v, a->xn1, L->wv, N,
                    dim, kvd);
    rmsnorm_backward(e->d_resid, dL ? dL->attn_norm : NULL, e->d_x, x, L->attn_norm, a->rstd1, N, dim);
    return LIBPERL_OK;
}

/* ---- whole model --------------------------------------------------------------- */

int engine_forward(engine *e, const packed_batch *pb, int training) {
    if (training && !e->lora) return perl_fail(LIBPERL_ERR_INTERNAL, "training forward without an adapter");
    PERL_TRY(engine_reserve(e, pb->n_tokens, training));
    const perl_model_config *c = &e->model->cfg;
    int N = pb->n_tokens, dim = c->dim;
    e->pb = pb;
    e->training = training;
    if (training) e->dropout_step = e->lora->dropout_counter++;
    float *x0 = resid_at(e, 0);
    for (int i = 0; i < N; i++)
        memcpy(x0 + (size_t)i * dim, e->w->tok_emb + (size_t)pb->tokens[i] * dim, (size_t)dim * sizeof(float));
    int keep_all = training && e->n_slots == c->n_layers;
    for (int l = 0; l < c->n_layers; l++) PERL_TRY(layer_forward(e, l, &e->slots[keep_all ? l : 0]));
    rmsnorm_forward(e->hidden, e->rstd_final, resid_at(e, c->n_layers), e->w->final_norm, N, dim,
                    c->rms_norm_eps);
    memset(e->dhidden, 0, (size_t)N * dim * sizeof(float));
    return LIBPERL_OK;
}

int engine_backward(engine *e) {
    if (!e->training || !e->lora)
        return perl_fail(LIBPERL_ERR_STATE, "backward needs a training forward with an adapter");
    const perl_model_config *c = &e->model->cfg;
    const packed_batch *pb = e->pb;
    int N = pb->n_tokens, dim = c->dim;
    int full = e->lora->opts.mode == LIBPERL_MODE_FULL;
    memset(e->d_resid, 0, (size_t)N * dim * sizeof(float));
    rmsnorm_backward(e->d_resid, full ? e->lora->full_dw.final_norm : NULL, e->dhidden, resid_at(e, c->n_layers),
                     e->w->final_norm, e->rstd_final, N, dim);
    int keep_all = e->n_slots == c->n_layers;
    for (int l = c->n_layers - 1; l >= 0; l--) {
        layer_acts *a = &e->slots[keep_all ? l : 0];
        if (!keep_all) PERL_TRY(layer_forward(e, l, a)); /* recompute this layer's activations */
        PERL_TRY(layer_backward(e, l, a));
    }
    float *d_emb = full ? e->lora->full_dw.tok_emb : NULL;
    if (d_emb) { /* serial: rows sharing a token id accumulate in a fixed order */
        for (int i = 0; i < N; i++) {
            float *dst = d_emb + (size_t)pb->tokens[i] * dim;
            const float *src = e->d_resid + (size_t)i * dim;
            for (int j = 0; j < dim; j++) dst[j] += src[j];
        }
    }
    e->training = 0; /* activations are consumed */
    return LIBPERL_OK;
}
