/*
 * The LM head in row chunks: logits for at most `lm_chunk` scored tokens exist
 * at once, so [tokens, vocab] is never materialised, and tokens that are not
 * scored cost nothing.  Per token: log-softmax of the target, entropy, argmax,
 * and (when asked) the gradient back into the hidden state.
 */
#include "engine.h"

#include "blas.h"

#include <math.h>
#include <string.h>

#define LM_CHUNK_FLOATS (4u << 20) /* 16 MB of logits per chunk */

typedef struct head_rows {
    float *logits;         /* [n, V]: logits in, exp(z - max) after stats */
    int V;
    const int32_t *target; /* per chunk row */
    float *logp, *entropy, *log_sum; /* per chunk row */
    int32_t *argmax;
    const float *dlogp, *dentropy;   /* per chunk row, for the gradient pass */
} head_rows;

/* Reductions are split over LANES independent partial sums so they vectorise
 * without -ffast-math (a plain float reduction would stay scalar), and the
 * order stays fixed whatever the thread count. */
#define LANES 16

static float row_max(const float *z, int V, int32_t *out_argmax) {
    float lane[LANES];
    int j = 0;
    for (int k = 0; k < LANES; k++) lane[k] = -INFINITY;
    for (; j + LANES <= V; j += LANES)
        for (int k = 0; k < LANES; k++) lane[k] = z[j + k] > lane[k] ? z[j + k] : lane[k];
    float m = -INFINITY;
    for (int k = 0; k < LANES; k++) m = lane[k] > m ? lane[k] : m;
    for (; j < V; j++) m = z[j] > m ? z[j] : m;
    int best = 0; /* first index of the maximum: ties go to the lowest id; 0 for an all-NaN row */
    while (best < V && z[best] != m) best++;
    *out_argmax = best < V ? best : 0;
    return m;
}

/* z <- exp(z - m); returns sum and writes sum of exp(z - m) * (z - m). */
static float row_exp_sum(float *z, int V, float m, float *out_weighted) {
    float sum[LANES] = {0}, weighted[LANES] = {0};
    int j = 0;
    for (; j + LANES <= V; j += LANES)
        for (int k = 0; k < LANES; k++) {
            float shifted = z[j + k] - m, e = perl_expf(shifted);
            z[j + k] = e;
            sum[k] += e;
            weighted[k] += e * shifted;
        }
    float s = 0.0f, w = 0.0f;
    for (; j < V; j++) {
        float shifted = z[j] - m, e = perl_expf(shifted);
        z[j] = e;
        s += e;
        w += e * shifted;
    }
    for (int k = 0; k < LANES; k++) s += sum[k], w += weighted[k];
    *out_weighted = w;
    return s;
}

static void head_stats(void *p, int64_t begin, int64_t end) {
    head_rows *h = p;
    for (int64_t r = begin; r < end; r++) {
        float *z = h->logits + r * h->V;
        float zt = z[h->target[r]];
        float m = row_max(z, h->V, &h->argmax[r]);
        float weighted, sum = row_exp_sum(z, h->V, m, &weighted);
        float log_sum = logf(sum);
        h->log_sum[r] = log_sum;
        h->logp[r] = zt - m - log_sum;
        h->entropy[r] = log_sum - weighted / sum; /* log Z - E_p[z - m] */
    }
}

/* dz_j = dlogp (1[j = t] - p_j) - dent p_j (log p_j + H), written over z. */
static void head_grad(void *p, int64_t begin, int64_t end) {
    head_rows *h = p;
    for (int64_t r = begin; r < end; r++) {
        float *z = h->logits + r * h->V;
        float inv_sum = expf(-h->log_sum[r]);
        float g = h->dlogp[r], ge = h->dentropy[r], H = h->entropy[r], ls = h->log_sum[r];
        for (int j = 0; j < h->V; j++) {
            float pj = z[j] * inv_sum;
            float d = -g * pj;
            if (ge != 0.0f && pj > 0.0f) d -= ge * pj * (logf(z[j]) - ls + H);
            z[j] = d;
        }
        z[h->target[r]] += g;
    }
}

static int lm_reserve(engine *e) {
    if (e->lm_logits && e->lm_h && e->lm_dh) return LIBPERL_OK;
    int V = e->model->cfg.vocab_size, dim = e->model->cfg.dim;
    e->lm_chunk = (int)PERL_MAX(16u, PERL_MIN(512u, LM_CHUNK_FLOATS / (unsigned)V));
    size_t C = (size_t)e->lm_chunk;
    e->lm_logits = perl_mem_alloc(C * V * sizeof(float) + C * 3 * sizeof(float) + C * 2 * sizeof(int32_t));
    e->lm_h = perl_mem_alloc(C * dim * sizeof(float));
    e->lm_dh = perl_mem_alloc(C * dim * sizeof(float));
    if (!e->lm_logits || !e->lm_h || !e->lm_dh) {
        /* all or nothing: a later call must not find one buffer and assume all three */
        perl_mem_free(e->lm_logits), perl_mem_free(e->lm_h), perl_mem_free(e->lm_dh);
        e->lm_logits = e->lm_h = e->lm_dh = NULL;
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for the LM head");
    }
    return LIBPERL_OK;
}

int engine_lm_head(engine *e, const int32_t *targets, float *out_logp, float *out_entropy, int32_t *out_argmax,
                   token_grad_fn grad_fn, void *ctx) {
    PERL_TRY(lm_reserve(e));
    const perl_model_config *c = &e->model->cfg;
    int N = e->pb->n_tokens, V = c->vocab_size, dim = c->dim, C = e->lm_chunk;
    const float *W = e->w->lm_head;
    float *dW = NULL;
    if (grad_fn && e->lora && e->lora->opts.mode == LIBPERL_MODE_FULL) dW = e->lora->full_dw.lm_head;

    /* scratch after the logits: per-row stats */
    float *logp = e->lm_logits + (size_t)C * V, *entropy = logp + C, *log_sum = entropy + C;
    int32_t *row_target = (int32_t *)(log_sum + C), *row_index = row_target + C;
    float dlogp[512], dent[512];
    int32_t argmax[512];

    if (out_logp) memset(out_logp, 0, (size_t)N * sizeof(float));
    if (out_entropy) memset(out_entropy, 0, (size_t)N * sizeof(float));
    if (out_argmax)
        for (int i = 0; i < N; i++) out_argmax[i] = -1;

    int i = 0;
    while (i < N) {
        int n = 0; /* gather up to C scored tokens */
        for (; i < N && n < C; i++) {
            if (targets[i] < 0) continue;
            if (targets[i] >= V) return perl_fail(LIBPERL_ERR_RANGE, "target token %d outside [0, %d)", targets[i], V);
            row_target[n] = targets[i];
            row_index[n] = i;
            memcpy(e->lm_h + (size_t)n * dim, e->hidden + (size_t)i * dim, (size_t)dim * sizeof(float));
            n++;
        }
        if (n == 0) break;
        /* logits[n, V] = h[n, dim] W^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, V, dim, 1.0f, e->lm_h, dim, W, dim, 0.0f,
                    e->lm_logits, V);
        head_rows h = {.logits = e->lm_logits, .V = V, .target = row_target, .logp = logp, .entropy = entropy,
                       .log_sum = log_sum, .argmax = argmax, .dlogp = dlogp, .dentropy = dent};
        perl_parallel_for(n, 4, head_stats, &h);
        for (int r = 0; r < n; r++) {
            int idx = row_index[r];
            if (out_logp) out_logp[idx] = logp[r];
            if (out_entropy) out_entropy[idx] = entropy[r];
            if (out_argmax) out_argmax[idx] = argmax[r];
        }
        if (!grad_fn) continue;
        int any = 0;
        for (int r = 0; r < n; r++) {
            dlogp[r] = dent[r] = 0.0f;
            grad_fn(ctx, row_index[r], logp[r], entropy[r], &dlogp[r], &dent[r]);
            any |= dlogp[r] != 0.0f || dent[r] != 0.0f;
        }
        if (!any) continue;
        perl_parallel_for(n, 4, head_grad, &h);
        /* dh[n, dim] = dz[n, V] W[V, dim];  dW[V, dim] += dz^T h */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dim, V, 1.0f, e->lm_logits, V, W, dim, 0.0f,
                    e->lm_dh, dim);
        if (dW)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, V, dim, n, 1.0f, e->lm_logits, V, e->lm_h, dim,
                        1.0f, dW, dim);
        for (int r = 0; r < n; r++) {
            float *dst = e->dhidden + (size_t)row_index[r] * dim;
            const float *src = e->lm_dh + (size_t)r * dim;
            for (int j = 0; j < dim; j++) dst[j] += src[j];
        }
    }
    return LIBPERL_OK;
}

int engine_logits(engine *e, float *out) {
    const perl_model_config *c = &e->model->cfg;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, e->pb->n_tokens, c->vocab_size, c->dim, 1.0f, e->hidden,
                c->dim, e->w->lm_head, c->dim, 0.0f, out, c->vocab_size);
    return LIBPERL_OK;
}
