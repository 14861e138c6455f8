/*
 * Causal grouped-query attention, flash-attention style: a query's scores
 * live only in a per-thread scratch row; forward keeps out and each query's
 * log-sum-exp, backward recomputes the probabilities from them.  No [T, T]
 * matrix is stored.
 *
 * Every inner loop is an axpy over contiguous memory so the compiler
 * vectorises it without -ffast-math: scores are built as
 * s[0..i] += q_i[d] * K^T[d, 0..i] from a per-task transposed copy of K (and
 * of V for backward), and outputs as o += p_j * v_j.
 * Parallel over (row, kv head); a kv head's dk/dv are written by exactly one
 * task, so no atomics and results do not depend on the thread count.
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

static void axpy(float *restrict y, float a, const float *restrict x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* dst[d, j] = src[j * stride + d] for j < T, d < D: one head of K or V transposed. */
static void transpose_head(float *restrict dst, const float *restrict src, size_t stride, int T, int D) {
    for (int j = 0; j < T; j++)
        for (int d = 0; d < D; d++) dst[(size_t)d * T + j] = src[(size_t)j * stride + d];
}

/* s[0..n) = scale * (q . K^T[:, 0..n)) */
static void scores_row(float *restrict s, const float *restrict q, const float *restrict kt, int T, int n, int D,
                       float scale) {
    memset(s, 0, (size_t)n * sizeof(float));
    for (int d = 0; d < D; d++) axpy(s, q[d] * scale, kt + (size_t)d * T, n);
}

static void attention_forward_tasks(void *p, int64_t begin, int64_t end) {
    attn_ctx *c = p;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t qs = (size_t)H * D, ks = (size_t)KV * D;
    float scale = 1.0f / sqrtf((float)D);
    float *kt = perl_mem_alloc(((size_t)D + 1) * c->max_len * sizeof(float));
    if (!kt) return; /* the caller reserved the same size up front */
    float *s = kt + (size_t)D * c->max_len;
    for (int64_t task = begin; task < end; task++) {
        int row = (int)(task / KV), g = (int)(task % KV);
        int s0 = c->row_start[row], T = c->row_start[row + 1] - s0;
        transpose_head(kt, c->k + (size_t)s0 * ks + (size_t)g * D, ks, T, D);
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int i = 0; i < T; i++) {
                const float *qi = c->q + (size_t)(s0 + i) * qs + (size_t)h * D;
                scores_row(s, qi, kt, T, i + 1, D, scale);
                float m = s[0];
                for (int j = 1; j <= i; j++) m = s[j] > m ? s[j] : m;
                float sum = 0.0f;
                for (int j = 0; j <= i; j++) {
                    s[j] = perl_expf(s[j] - m);
                    sum += s[j];
                }
                float *o = c->out + (size_t)(s0 + i) * qs + (size_t)h * D;
                memset(o, 0, (size_t)D * sizeof(float));
                for (int j = 0; j <= i; j++) axpy(o, s[j], c->v + (size_t)(s0 + j) * ks + (size_t)g * D, D);
                float inv = 1.0f / sum;
                for (int d = 0; d < D; d++) o[d] *= inv;
                c->lse[(size_t)(s0 + i) * H + h] = m + logf(sum);
            }
        }
    }
    perl_mem_free(kt);
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

/*
 * For query i of head h (p_j = exp(s_j - lse_i), delta_i = dO_i . O_i):
 *   dp_j = dO_i . v_j,  ds_j = p_j (dp_j - delta_i) scale
 *   dq_i = sum_j ds_j k_j,  dk_j += ds_j q_i,  dv_j += p_j dO_i
 */
static void attention_backward_tasks(void *p, int64_t begin, int64_t end) {
    attn_ctx *c = p;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t qs = (size_t)H * D, ks = (size_t)KV * D;
    float scale = 1.0f / sqrtf((float)D);
    size_t L = (size_t)c->max_len;
    float *kt = perl_mem_alloc((2 * (size_t)D + 2) * L * sizeof(float));
    if (!kt) return;
    float *vt = kt + (size_t)D * L, *prob = vt + (size_t)D * L, *ds = prob + L;
    for (int64_t task = begin; task < end; task++) {
        int row = (int)(task / KV), g = (int)(task % KV);
        int s0 = c->row_start[row], T = c->row_start[row + 1] - s0;
        const float *k0 = c->k + (size_t)s0 * ks + (size_t)g * D, *v0 = c->v + (size_t)s0 * ks + (size_t)g * D;
        float *dk0 = c->dk + (size_t)s0 * ks + (size_t)g * D, *dv0 = c->dv + (size_t)s0 * ks + (size_t)g * D;
        transpose_head(kt, k0, ks, T, D);
        transpose_head(vt, v0, ks, T, D);
        for (int j = 0; j < T; j++) {
            memset(dk0 + (size_t)j * ks, 0, (size_t)D * sizeof(float));
            memset(dv0 + (size_t)j * ks, 0, (size_t)D * sizeof(float));
        }
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int i = 0; i < T; i++) {
                size_t qoff = (size_t)(s0 + i) * qs + (size_t)h * D;
                const float *qi = c->q + qoff, *doi = c->dout + qoff;
                float *dqi = c->dq + qoff;
                float lse = c->lse_in[(size_t)(s0 + i) * H + h];
                float delta = dot(doi, c->out_in + qoff, D);
                int n = i + 1;
                scores_row(prob, qi, kt, T, n, D, scale);
                for (int j = 0; j < n; j++) prob[j] = perl_expf(prob[j] - lse);
                scores_row(ds, doi, vt, T, n, D, 1.0f); /* dp */
                for (int j = 0; j < n; j++) ds[j] = prob[j] * (ds[j] - delta) * scale;
                memset(dqi, 0, (size_t)D * sizeof(float));
                for (int j = 0; j < n; j++) {
                    axpy(dqi, ds[j], k0 + (size_t)j * ks, D);
                    axpy(dk0 + (size_t)j * ks, ds[j], qi, D);
                    axpy(dv0 + (size_t)j * ks, prob[j], doi, D);
                }
            }
        }
    }
    perl_mem_free(kt);
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                        const float *lse, const float *q, const float *k, const float *v,
                        const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim) {
    attn_ctx c = {.dq = dq, .dk = dk, .dv = dv, .q = q, .k = k, .v = v, .dout = dout, .out_in = out,
                  .lse_in = lse, .row_start = row_start, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                  .head_dim = head_dim, .max_len = max_row_len(row_start, n_rows)};
    perl_parallel_for((int64_t)n_rows * n_kv_heads, 1, attention_backward_tasks, &c);
}
