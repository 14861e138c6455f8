/*
 * perl_generate: batched sampling with a KV cache.
 *
 * One call owns all of its state (the model and adapter are only read, so
 * any number of threads may generate from one model at once):
 *   - a KV cache per layer, rows stored back to back, row b holding the
 *     P_b + max_new_tokens - 1 positions it will ever feed:
 *     k_cache[layer][slot][kv_dim], slot = cache_row[b] + position;
 *   - activations for one forward over n tokens (n = all prompt tokens in the
 *     prefill, the number of unfinished rows in a decode step).
 * Prefill runs every prompt token of every row through one set of matrix
 * products; each decode step gathers the still-active rows into one
 * [n_active, dim] matrix, so finished rows cost nothing.  Attention reads the
 * cache: query i (row r, position p) attends to slots cache_row[r] + 0..p,
 * which in the prefill are all written before the layer's attention runs.
 *
 * The layer math is engine.c's, term for term: RMSNorm, q/k/v (+ bias) plus
 * LoRA (y += scale * (x A^T) B^T, no dropout), RoPE, grouped-query attention
 * (one query at a time over the cache), o, SwiGLU MLP; FULL-mode adapters
 * run on their own weights (lora_weights()).
 */
#include "blas.h"
#include "engine.h"
#include "kernels.h"
#include "sample.h"

#include <math.h>
#include <string.h>

void perl_generate_options_init(perl_generate_options *opts) {
    if (!opts) return;
    memset(opts, 0, sizeof *opts);
    opts->struct_size = sizeof *opts;
    opts->max_new_tokens = 64;
    opts->temperature = 1.0f;
    opts->top_k = 0;
    opts->top_p = 1.0f;
    opts->min_p = 0.0f;
    opts->seed = 0;
    opts->stop_tokens = NULL;
    opts->n_stop_tokens = 0;
}

/* ---- per-call state --------------------------------------------------------- */

typedef struct gen {
    const perl_model *m;
    const perl_lora *lora;       /* NULL: the base */
    const model_weights *w;      /* base weights, or the FULL-mode copy */
    int B, cap, max_new;         /* rows; tokens one forward holds; new tokens per row */
    int n_workers, max_ctx;      /* parallel slices; longest row context */
    int64_t *cache_row;          /* [B] first cache slot of each row */
    int64_t cache_slots;         /* slots per layer */
    float *k_cache, *v_cache;    /* [n_layers][cache_slots][kv_dim] */
    int32_t *tok, *pos, *row;    /* [cap] the tokens of one forward */
    float *x, *xn, *rstd;        /* [cap, dim], [cap, dim], [cap] */
    float *q, *k, *v, *att;      /* [cap, q_dim], [cap, kv_dim] x2, [cap, q_dim] */
    float *gate, *up, *u;        /* [cap, hidden] x2, [cap, rank] */
    float *x_sel, *h_sel;        /* [B, dim]: rows whose next token is sampled */
    float *logits;               /* [B, vocab] */
    float *scores;               /* [n_workers, max_ctx] attention scratch */
    sample_entry *sample_scratch;/* [n_workers, vocab] */
    perl_rng *rng;               /* [B] one stream per row */
    int32_t *active, *next_tok;  /* [B] */
    float *next_logp;            /* [B] */
} gen;

static void gen_free(gen *g) {
    void *bufs[] = {g->cache_row, g->k_cache, g->v_cache, g->tok, g->pos, g->row, g->x, g->xn, g->rstd, g->q,
                    g->k, g->v, g->att, g->gate, g->up, g->u, g->x_sel, g->h_sel, g->logits, g->scores,
                    g->sample_scratch, g->rng, g->active, g->next_tok, g->next_logp};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) perl_mem_free(bufs[i]);
    memset(g, 0, sizeof *g);
}

static int lora_rank(const perl_lora *lora) {
    return lora && lora->opts.mode == LIBPERL_MODE_LORA ? lora->opts.rank : 0;
}

/* Allocates everything for B rows of packed prompts pb (all or nothing). */
static int gen_alloc(gen *g, const perl_model *m, const perl_lora *lora, const packed_batch *pb, int max_new) {
    memset(g, 0, sizeof *g);
    const perl_model_config *c = &m->cfg;
    g->m = m, g->lora = lora, g->w = lora_weights(m, lora);
    g->B = pb->n_rows, g->max_new = max_new;
    g->cap = PERL_MAX(pb->n_tokens, g->B);
    g->n_workers = perl_get_num_threads();
    size_t cap = (size_t)g->cap, B = (size_t)g->B, dim = (size_t)c->dim, hid = (size_t)c->hidden_dim;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t V = (size_t)c->vocab_size, r = (size_t)lora_rank(lora);

    g->cache_row = perl_mem_alloc(B * sizeof(int64_t));
    if (!g->cache_row) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for generation");
    for (int b = 0; b < g->B; b++) {
        int ctx = pb->row_start[b + 1] - pb->row_start[b] + max_new - 1; /* the last token is never fed */
        g->cache_row[b] = g->cache_slots;
        g->cache_slots += ctx;
        g->max_ctx = PERL_MAX(g->max_ctx, ctx);
    }
    size_t cache = (size_t)c->n_layers * (size_t)g->cache_slots;
    g->k_cache = perl_mem_calloc(cache, kvd * sizeof(float));
    g->v_cache = perl_mem_calloc(cache, kvd * sizeof(float));
    g->tok = perl_mem_alloc(cap * sizeof(int32_t));
    g->pos = perl_mem_alloc(cap * sizeof(int32_t));
    g->row = perl_mem_alloc(cap * sizeof(int32_t));
    g->x = perl_mem_alloc(cap * dim * sizeof(float));
    g->xn = perl_mem_alloc(cap * dim * sizeof(float));
    g->rstd = perl_mem_alloc(cap * sizeof(float));
    g->q = perl_mem_alloc(cap * qd * sizeof(float));
    g->k = perl_mem_alloc(cap * kvd * sizeof(float));
    g->v = perl_mem_alloc(cap * kvd * sizeof(float));
    g->att = perl_mem_alloc(cap * qd * sizeof(float));
    g->gate = perl_mem_alloc(cap * hid * sizeof(float));
    g->up = perl_mem_alloc(cap * hid * sizeof(float));
    g->u = perl_mem_alloc(cap * PERL_MAX(r, 1) * sizeof(float));
    g->x_sel = perl_mem_alloc(B * dim * sizeof(float));
    g->h_sel = perl_mem_alloc(B * dim * sizeof(float));
    g->logits = perl_mem_alloc(B * V * sizeof(float));
    g->scores = perl_mem_alloc((size_t)g->n_workers * (size_t)g->max_ctx * sizeof(float));
    g->sample_scratch = perl_mem_alloc((size_t)g->n_workers * V * sizeof(sample_entry));
    g->rng = perl_mem_alloc(B * sizeof(perl_rng));
    g->active = perl_mem_alloc(B * sizeof(int32_t));
    g->next_tok = perl_mem_alloc(B * sizeof(int32_t));
    g->next_logp = perl_mem_alloc(B * sizeof(float));
    if (!g->k_cache || !g->v_cache || !g->tok || !g->pos || !g->row || !g->x || !g->xn || !g->rstd || !g->q ||
        !g->k || !g->v || !g->att || !g->gate || !g->up || !g->u || !g->x_sel || !g->h_sel || !g->logits ||
        !g->scores || !g->sample_scratch || !g->rng || !g->active || !g->next_tok || !g->next_logp) {
        double mb = (double)cache * (double)kvd * 8.0 / (1 << 20);
        gen_free(g);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for generation (KV cache %.1f MB)", mb);
    }
    return LIBPERL_OK;
}

/* ---- the layers ------------------------------------------------------------ */

/* y[N, out] = x W^T + b (+ beta y) + scale * (x A^T) B^T, as engine.c's linear_forward at inference. */
static void gen_linear(gen *g, int layer, int target, const float *x, const float *W, const float *b, float *y,
                       int N, int in, int out, float beta) {
    matmul_forward(y, x, W, b, N, in, out, beta);
    const lora_module *mod = lora_module_at(g->lora, layer, target);
    if (!mod) return;
    int r = g->lora->opts.rank;
    /* u[N, r] = x A^T;  y += scale * u B^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, r, in, 1.0f, x, in, mod->A, in, 0.0f, g->u, r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, r, g->lora->scale, g->u, r, mod->B, r, 1.0f, y,
                out);
}

static float *cache_at(const gen *g, float *cache, int layer, int i) {
    int kvd = g->m->cfg.n_kv_heads * g->m->cfg.head_dim;
    int64_t slot = (int64_t)layer * g->cache_slots + g->cache_row[g->row[i]] + g->pos[i];
    return cache + (size_t)slot * kvd;
}

/* cache[layer][slot(i)] = k[i], v[i] for the n tokens of this forward. */
static void cache_store(gen *g, int layer, int N) {
    int kvd = g->m->cfg.n_kv_heads * g->m->cfg.head_dim;
    for (int i = 0; i < N; i++) {
        memcpy(cache_at(g, g->k_cache, layer, i), g->k + (size_t)i * kvd, (size_t)kvd * sizeof(float));
        memcpy(cache_at(g, g->v_cache, layer, i), g->v + (size_t)i * kvd, (size_t)kvd * sizeof(float));
    }
}

typedef struct attn_job {
    gen *g;
    int layer, N;
} attn_job;

/* The same formula as attention.c (scaled dot products, perl_expf, one
 * division per head), though not bitwise: attention.c takes queries in
 * blocks with fused multiply-adds.  Greedy decoding still picks the tokens
 * that full recomputation picks (tests/test_generate.c). */
static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* att[i, h] = sum_j softmax_j(q_i,h . k_j / sqrt(D)) v_j over the row's cached positions 0..pos[i]. */
static void attend_one(gen *g, int layer, int i, int group_index, float *scores) {
    const perl_model_config *c = &g->m->cfg;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t kvd = (size_t)KV * D;
    float scale = 1.0f / sqrtf((float)D);
    int64_t first = (int64_t)layer * g->cache_slots + g->cache_row[g->row[i]];
    const float *K = g->k_cache + (size_t)first * kvd + (size_t)group_index * D;
    const float *Vc = g->v_cache + (size_t)first * kvd + (size_t)group_index * D;
    int T = g->pos[i] + 1;
    for (int h = group_index * group; h < (group_index + 1) * group; h++) {
        const float *qi = g->q + (size_t)i * H * D + (size_t)h * D;
        float m = -INFINITY;
        for (int j = 0; j < T; j++) {
            scores[j] = dot(qi, K + (size_t)j * kvd, D) * scale;
            if (scores[j] > m) m = scores[j];
        }
        float *o = g->att + (size_t)i * H * D + (size_t)h * D;
        memset(o, 0, (size_t)D * sizeof(float));
        /* exponentials in their own loop so it vectorises (the same perl_expf
         * as the training engine's attention, so both compute the same values) */
        for (int j = 0; j < T; j++) scores[j] = perl_expf(scores[j] - m);
        float sum = 0.0f;
        for (int j = 0; j < T; j++) {
            float e = scores[j];
            sum += e;
            const float *vj = Vc + (size_t)j * kvd;
            for (int d = 0; d < D; d++) o[d] += e * vj[d];
        }
        float inv = 1.0f / sum;
        for (int d = 0; d < D; d++) o[d] *= inv;
    }
}

/* Worker w handles a contiguous share of the (token, kv head) tasks with its own score row. */
static void attention_slices(void *p, int64_t begin, int64_t end) {
    attn_job *job = p;
    gen *g = job->g;
    int KV = g->m->cfg.n_kv_heads;
    int64_t tasks = (int64_t)job->N * KV;
    for (int64_t w = begin; w < end; w++) {
        float *scores = g->scores + (size_t)w * g->max_ctx;
        for (int64_t t = tasks * w / g->n_workers; t < tasks * (w + 1) / g->n_workers; t++)
            attend_one(g, job->layer, (int)(t / KV), (int)(t % KV), scores);
    }
}

static void gen_layer(gen *g, int l, int N) {
    const perl_model_config *c = &g->m->cfg;
    const layer_weights *L = &g->w->layers[l];
    int dim = c->dim, hid = c->hidden_dim, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;

    rmsnorm_forward(g->xn, g->rstd, g->x, L->attn_norm, N, dim, c->rms_norm_eps);
    gen_linear(g, l, LORA_Q, g->xn, L->wq, L->bq, g->q, N, dim, qd, 0.0f);
    gen_linear(g, l, LORA_K, g->xn, L->wk, L->bk, g->k, N, dim, kvd, 0.0f);
    gen_linear(g, l, LORA_V, g->xn, L->wv, L->bv, g->v, N, dim, kvd, 0.0f);
    rope_apply(g->q, g->pos, N, c->n_heads, c->head_dim, g->m->rope_cos, g->m->rope_sin, c->rope_interleaved, 0);
    rope_apply(g->k, g->pos, N, c->n_kv_heads, c->head_dim, g->m->rope_cos, g->m->rope_sin, c->rope_interleaved,
               0);
    cache_store(g, l, N);
    attn_job job = {g, l, N};
    perl_parallel_for(g->n_workers, 1, attention_slices, &job);
    /* x += att Wo^T */
    gen_linear(g, l, LORA_O, g->att, L->wo, NULL, g->x, N, qd, dim, 1.0f);

    rmsnorm_forward(g->xn, g->rstd, g->x, L->ffn_norm, N, dim, c->rms_norm_eps);
    gen_linear(g, l, LORA_GATE, g->xn, L->w_gate, NULL, g->gate, N, dim, hid, 0.0f);
    gen_linear(g, l, LORA_UP, g->xn, L->w_up, NULL, g->up, N, dim, hid, 0.0f);
    swiglu_forward(g->gate, g->gate, g->up, (int64_t)N * hid); /* element-wise, so in place */
    /* x += act Wdown^T */
    gen_linear(g, l, LORA_DOWN, g->gate, L->w_down, NULL, g->x, N, hid, dim, 1.0f);
}

/*
 * Runs g->tok/pos/row[0..N) through the model, filling the cache, then the
 * final norm and LM head for the n_sel tokens sel[] (NULL: all N, in order):
 * logits[s] = rmsnorm(x[sel[s]]) W_lm^T.
 */
static void gen_forward(gen *g, int N, const int32_t *sel, int n_sel) {
    const perl_model_config *c = &g->m->cfg;
    int dim = c->dim;
    for (int i = 0; i < N; i++)
        memcpy(g->x + (size_t)i * dim, g->w->tok_emb + (size_t)g->tok[i] * dim, (size_t)dim * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) gen_layer(g, l, N);
    for (int s = 0; s < n_sel; s++)
        memcpy(g->x_sel + (size_t)s * dim, g->x + (size_t)(sel ? sel[s] : s) * dim, (size_t)dim * sizeof(float));
    rmsnorm_forward(g->h_sel, g->rstd, g->x_sel, g->w->final_norm, n_sel, dim, c->rms_norm_eps);
    matmul_forward(g->logits, g->h_sel, g->w->lm_head, NULL, n_sel, dim, c->vocab_size, 0.0f);
}

/* ---- sampling ------------------------------------------------------------------ */

typedef struct sample_job {
    gen *g;
    const sample_params *sp;
    int n; /* logits rows; row s belongs to batch row g->active[s] */
} sample_job;

static void sample_slices(void *p, int64_t begin, int64_t end) {
    sample_job *job = p;
    gen *g = job->g;
    int V = g->m->cfg.vocab_size;
    for (int64_t w = begin; w < end; w++) {
        sample_entry *scratch = g->sample_scratch + (size_t)w * V;
        for (int64_t s = job->n * w / g->n_workers; s < job->n * (w + 1) / g->n_workers; s++) {
            const float *z = g->logits + (size_t)s * V;
            if (!perl_isfinite_array(z, (size_t)V)) {
                g->next_tok[s] = -1; /* reported by the caller */
                continue;
            }
            int b = g->active[s];
            float u = job->sp->temperature > 0.0f ? perl_rng_uniform(&g->rng[b]) : 0.0f;
            g->next_tok[s] = sample_token(z, V, job->sp, u, scratch, &g->next_logp[s]);
        }
    }
}

static int is_stop(const perl_generate_options *o, int32_t id) {
    for (int i = 0; i < o->n_stop_tokens; i++)
        if (o->stop_tokens[i] == id) return 1;
    return 0;
}

/* ---- validation ------------------------------------------------------------------ */

static int validate_options(const perl_model *m, const perl_generate_options *o) {
    PERL_CHECK_ARG(o->struct_size >= sizeof(perl_generate_options),
                   "generate options struct_size %zu is too small (call perl_generate_options_init)",
                   o->struct_size);
    PERL_CHECK_ARG(o->max_new_tokens >= 1, "max_new_tokens %d must be >= 1", o->max_new_tokens);
    PERL_CHECK_ARG(isfinite(o->temperature) && o->temperature >= 0.0f, "temperature %g must be finite and >= 0",
                   (double)o->temperature);
    PERL_CHECK_ARG(o->top_k >= 0, "top_k %d must be >= 0 (0: off)", o->top_k);
    PERL_CHECK_ARG(o->top_p > 0.0f && o->top_p <= 1.0f, "top_p %g must be in (0, 1]", (double)o->top_p);
    PERL_CHECK_ARG(o->min_p >= 0.0f && o->min_p <= 1.0f, "min_p %g must be in [0, 1]", (double)o->min_p);
    PERL_CHECK_ARG(o->n_stop_tokens >= 0, "n_stop_tokens %d must be >= 0", o->n_stop_tokens);
    PERL_CHECK_ARG(o->n_stop_tokens == 0 || o->stop_tokens, "stop_tokens is NULL but n_stop_tokens is %d",
                   o->n_stop_tokens);
    for (int i = 0; i < o->n_stop_tokens; i++)
        if (o->stop_tokens[i] < 0 || o->stop_tokens[i] >= m->cfg.vocab_size)
            return perl_fail(LIBPERL_ERR_RANGE, "stop token %d outside [0, %d)", o->stop_tokens[i],
                             m->cfg.vocab_size);
    return LIBPERL_OK;
}

static int validate_call(const perl_model *m, const perl_lora *adapter, const perl_batch *prompts,
                         const perl_generate_options *o, const int32_t *out_tokens, const int32_t *out_lengths) {
    PERL_CHECK_ARG(m, "perl_generate: model is NULL");
    PERL_CHECK_ARG(prompts, "perl_generate: prompts is NULL");
    PERL_CHECK_ARG(o, "perl_generate: opts is NULL");
    PERL_CHECK_ARG(out_tokens, "perl_generate: out_tokens is NULL");
    PERL_CHECK_ARG(out_lengths, "perl_generate: out_lengths is NULL");
    if (adapter && adapter->model != m)
        return perl_fail(LIBPERL_ERR_SHAPE, "perl_generate: the adapter was created for another model");
    return validate_options(m, o);
}

/* Every prompt plus max_new_tokens must fit the context. */
static int validate_lengths(const perl_model *m, const packed_batch *pb, int max_new) {
    for (int b = 0; b < pb->n_rows; b++) {
        int64_t len = pb->row_start[b + 1] - pb->row_start[b];
        if (len + max_new > m->cfg.max_seq_len)
            return perl_fail(LIBPERL_ERR_RANGE,
                             "row %d: prompt length %lld + max_new_tokens %d exceeds the context %d", b,
                             (long long)len, max_new, m->cfg.max_seq_len);
    }
    return LIBPERL_OK;
}

/* ---- the decoding loop ---------------------------------------------------------------- */

/* The prefill: every prompt token in one forward; logits of each row's last token. */
static void prefill(gen *g, const packed_batch *pb) {
    for (int b = 0; b < pb->n_rows; b++) {
        for (int i = pb->row_start[b]; i < pb->row_start[b + 1]; i++) g->row[i] = b;
        g->active[b] = pb->row_start[b + 1] - 1; /* used as the selection, then reset */
    }
    memcpy(g->tok, pb->tokens, (size_t)pb->n_tokens * sizeof(int32_t));
    memcpy(g->pos, pb->pos, (size_t)pb->n_tokens * sizeof(int32_t));
    gen_forward(g, pb->n_tokens, g->active, pb->n_rows);
    for (int b = 0; b < pb->n_rows; b++) g->active[b] = b;
}

static int decode(gen *g, const packed_batch *pb, const perl_generate_options *o, int32_t *out_tokens,
                  int32_t *out_lengths, float *out_logprobs) {
    sample_params sp = {o->temperature, o->top_k, o->top_p, o->min_p};
    int n_active = g->B, T = o->max_new_tokens;
    prefill(g, pb);
    for (int step = 0; n_active > 0; step++) {
        sample_job job = {g, &sp, n_active};
        perl_parallel_for(g->n_workers, 1, sample_slices, &job);
        int kept = 0;
        for (int s = 0; s < n_active; s++) {
            int b = g->active[s];
            int32_t id = g->next_tok[s];
            if (id < 0) return perl_fail(LIBPERL_ERR_NUMERIC, "row %d step %d: logits contain NaN or Inf", b, step);
            out_tokens[(size_t)b * T + step] = id;
            if (out_logprobs) out_logprobs[(size_t)b * T + step] = g->next_logp[s];
            out_lengths[b] = step + 1;
            if (is_stop(o, id) || step + 1 == T) continue; /* the row is finished */
            /* the row's next forward token, compacted to the front */
            g->active[kept] = b;
            g->tok[kept] = id;
            g->row[kept] = b;
            g->pos[kept] = pb->row_start[b + 1] - pb->row_start[b] + step;
            kept++;
        }
        n_active = kept;
        if (n_active > 0) gen_forward(g, n_active, NULL, n_active);
    }
    return LIBPERL_OK;
}

int perl_generate(const perl_model *model, const perl_lora *adapter, const perl_batch *prompts,
                  const perl_generate_options *opts, int32_t *out_tokens, int32_t *out_lengths, float *out_logprobs) {
    PERL_TRY(validate_call(model, adapter, prompts, opts, out_tokens, out_lengths));
    packed_batch pb;
    PERL_TRY(packed_from_batch(&pb, model, prompts));
    int rc = validate_lengths(model, &pb, opts->max_new_tokens);
    gen g;
    memset(&g, 0, sizeof g);
    if (rc == LIBPERL_OK) rc = gen_alloc(&g, model, adapter, &pb, opts->max_new_tokens);
    if (rc == LIBPERL_OK) {
        size_t n = (size_t)pb.n_rows * (size_t)opts->max_new_tokens;
        for (size_t i = 0; i < n; i++) out_tokens[i] = -1;
        if (out_logprobs) memset(out_logprobs, 0, n * sizeof(float));
        for (int b = 0; b < pb.n_rows; b++) {
            out_lengths[b] = 0;
            perl_rng_seed(&g.rng[b], opts->seed ^ perl_hash64(0x67656e00ull + (uint64_t)b));
        }
        rc = decode(&g, &pb, opts, out_tokens, out_lengths, out_logprobs);
    }
    gen_free(&g);
    packed_free(&pb);
    return rc;
}
