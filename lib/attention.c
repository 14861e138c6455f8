/*
 * Causal grouped-query attention, flash-attention style: each query's scores
 * live only in a per-thread scratch row; forward keeps out and the row's
 * log-sum-exp, backward recomputes the probabilities from them.
 * Parallel over (row, kv head); a kv head's dk/dv are written by exactly one
 * task, so no atomics and results independent of thread count.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

typedef struct attn_ctx {
    float *out, *lse, *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *out_in, *lse_in;
    const int *row_start;
    int n_heads, n_kv_heads, head_dim;
    int max_len;
} attn_ctx;

static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void attention_forward_tasks(void *p, int64_t begin, int64_t end) {
    attn_ctx *c = p;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t qs = (size_t)H * D, ks = (size_t)KV * D;
    float scale = 1.0f / sqrtf((float)D);
    float *scores = perl_mem_alloc((size_t)c->max_len * sizeof(float));
    if (!scores) return; /* cannot happen for sane sizes; caller pre-checks */
    for (int64_t task = begin; task < end; task++) {
        int row = (int)(task / KV), g = (int)(task % KV);
        int s = c->row_start[row], T = c->row_start[row + 1] - s;
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int i = 0; i < T; i++) {
                const float *qi = c->q + (size_t)(s + i) * qs + (size_t)h * D;
                float m = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    scores[j] = dot(qi, c->k + (size_t)(s + j) * ks + (size_t)g * D, D) * scale;
                    if (scores[j] > m) m = scores[j];
                }
                float *o = c->out + (size_t)(s + i) * qs + (size_t)h * D;
                memset(o, 0, (size_t)D * sizeof(float));
                float sum = 0.0f;
                for (int j = 0; j <= i; j++) {
                    float e = expf(scores[j] - m);
                    sum += e;
                    axpy(o, e, c->v + (size_t)(s + j) * ks + (size_t)g * D, D);
                }
                float inv = 1.0f / sum;
                for (int d = 0; d < D; d++) o[d] *= inv;
                c->lse[(size_t)(s + i) * H + h] = m + logf(sum);
            }
        }
    }
    perl_mem_free(scores);
}

static int max_row_len(const int *row_start, int n_rows) {
    int m = 1;
    for (int r = 0; r < n_rows; r++) m = PERL_MAX(m, row_start[r + 1] - row_start[r]);
    return m;
}

void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim) {
    attn_ctx c = {.out = out, .lse = lse, .q = q, .k = k, .v = v, .row_start = row_start,
                  .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim,
                  .max_len = max_row_len(row_start, n_rows)};
    perl_parallel_for((int64_t)n_rows * n_kv_heads, 1, attention_forward_tasks, &c);
}

static void attention_backward_tasks(void *p, int64_t begin, int64_t end) {
    attn_ctx *c = p;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t qs = (size_t)H * D, ks = (size_t)KV * D;
    float scale = 1.0f / sqrtf((float)D);
    for (int64_t task = begin; task < end; task++) {
        int row = (int)(task / KV), g = (int)(task % KV);
        int s = c->row_start[row], T = c->row_start[row + 1] - s;
        for (int j = 0; j < T; j++) {
            memset(c->dk + (size_t)(s + j) * ks + (size_t)g * D, 0, (size_t)D * sizeof(float));
            memset(c->dv + (size_t)(s + j) * ks + (size_t)g * D, 0, (size_t)D * sizeof(float));
        }
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int i = 0; i < T; i++) {
                size_t qoff = (size_t)(s + i) * qs + (size_t)h * D;
                const float *qi = c->q + qoff, *doi = c->dout + qoff, *oi = c->out_in + qoff;
                float *dqi = c->dq + qoff;
                float lse = c->lse_in[(size_t)(s + i) * H + h];
                float delta = dot(doi, oi, D); /* sum_j p_j dp_j */
                memset(dqi, 0, (size_t)D * sizeof(float));
                for (int j = 0; j <= i; j++) {
                    size_t koff = (size_t)(s + j) * ks + (size_t)g * D;
                    float pj = expf(dot(qi, c->k + koff, D) * scale - lse);
                    float dpj = dot(doi, c->v + koff, D);
                    float dsj = pj * (dpj - delta) * scale;
                    axpy(dqi, dsj, c->k + koff, D);
                    axpy(c->dk + koff, dsj, qi, D);
                    axpy(c->dv + koff, pj, doi, D);
                }
            }
        }
    }
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                        const float *lse, const float *q, const float *k, const float *v,
                        const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim) {
    attn_ctx c = {.dq = dq, .dk = dk, .dv = dv, .q = q, .k = k, .v = v, .dout = dout, .out_in = out,
                  .lse_in = lse, .row_start = row_start, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                  .head_dim = head_dim, .max_len = max_row_len(row_start, n_rows)};
    perl_parallel_for((int64_t)n_rows * n_kv_heads, 1, attention_backward_tasks, &c);
}
