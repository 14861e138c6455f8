/*
 * Causal grouped-query attention, flash-attention style: scores live only in
 * a per-thread scratch block; forward keeps out and each query's log-sum-exp,
 * backward recomputes the probabilities from them.  No [T, T] matrix is
 * stored.
 *
 * Queries are taken QB at a time (a query block), so every key and value a
 * block reads is used QB times from registers instead of once per query:
 * the three products below are register-blocked kernels (AVX2/FMA, with a
 * plain-C fallback), each QB rows wide:
 *   block_scores      S[r, j]  = a_r . kt[:, j]       (q.k and dO.v)
 *   block_combine     out_r    = sum_j P[r, j] x_j    (P.V and dS.K)
 *   block_scatter     g_j     += sum_r P[r, j] x_r    (dS^T.Q and P^T.dO)
 * A block's rows past the end of the sequence have zero probabilities, so
 * they cost a little arithmetic and never change a result.
 * Parallel over (row, kv head); a kv head's dk/dv are written by exactly one
 * task, so no atomics and results do not depend on the thread count.
 */
#include "kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#  include <immintrin.h>
#  define ATTN_AVX2 1
#endif

#define QB 4 /* query rows per block: 4 x 2 accumulators + operands fit 16 registers */

typedef struct attn_ctx {
    float *out, *lse, *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *out_in, *lse_in;
    const int *row_start;
    int n_heads, n_kv_heads, head_dim;
    int max_len;
    atomic_int out_of_memory; /* a task could not get its scratch: the call fails */
} attn_ctx;

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

/* S[r * ld + j] = a[r] . kt[:, j] for r < QB, j < n; kt is [D, T]. */
static void block_scores(float *S, size_t ld, const float *const a[QB], const float *kt, int T, int n, int D) {
    int j = 0;
#ifdef ATTN_AVX2
    for (; j + 16 <= n; j += 16) {
        __m256 acc[QB][2];
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            const float *kr = kt + (size_t)d * T + j;
            __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8);
            for (int r = 0; r < QB; r++) {
                __m256 x = _mm256_broadcast_ss(a[r] + d);
                acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
            }
        }
        for (int r = 0; r < QB; r++) {
            _mm256_storeu_ps(S + r * ld + j, acc[r][0]);
            _mm256_storeu_ps(S + r * ld + j + 8, acc[r][1]);
        }
    }
    for (; j + 8 <= n; j += 8) {
        __m256 acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            __m256 k0 = _mm256_loadu_ps(kt + (size_t)d * T + j);
            for (int r = 0; r < QB; r++) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(a[r] + d), k0, acc[r]);
        }
        for (int r = 0; r < QB; r++) _mm256_storeu_ps(S + r * ld + j, acc[r]);
    }
#endif
    for (; j < n; j++)
        for (int r = 0; r < QB; r++) {
            float s = 0.0f;
            for (int d = 0; d < D; d++) s += a[r][d] * kt[(size_t)d * T + j];
            S[r * ld + j] = s;
        }
}

/* out[r][d] = sum_{j < n} P[r * ld + j] * x[j * xs + d] for r < QB, d < D. */
static void block_combine(float *const out[QB], const float *P, size_t ld, const float *x, size_t xs, int n, int D) {
    int d = 0;
#ifdef ATTN_AVX2
    for (; d + 16 <= D; d += 16) {
        __m256 acc[QB][2];
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            const float *xj = x + (size_t)j * xs + d;
            __m256 x0 = _mm256_loadu_ps(xj), x1 = _mm256_loadu_ps(xj + 8);
            for (int r = 0; r < QB; r++) {
                __m256 p = _mm256_broadcast_ss(P + r * ld + j);
                acc[r][0] = _mm256_fmadd_ps(p, x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(p, x1, acc[r][1]);
            }
        }
        for (int r = 0; r < QB; r++) {
            _mm256_storeu_ps(out[r] + d, acc[r][0]);
            _mm256_storeu_ps(out[r] + d + 8, acc[r][1]);
        }
    }
    for (; d + 8 <= D; d += 8) {
        __m256 acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            __m256 x0 = _mm256_loadu_ps(x + (size_t)j * xs + d);
            for (int r = 0; r < QB; r++) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r * ld + j), x0, acc[r]);
        }
        for (int r = 0; r < QB; r++) _mm256_storeu_ps(out[r] + d, acc[r]);
    }
#endif
    for (; d < D; d++)
        for (int r = 0; r < QB; r++) {
            float s = 0.0f;
            for (int j = 0; j < n; j++) s += P[r * ld + j] * x[(size_t)j * xs + d];
            out[r][d] = s;
        }
}

/* g[j * gs + d] += sum_{r < QB} P[r * ld + j] * x[r][d] for j < n, d < D. */
static void block_scatter(float *g, size_t gs, const float *P, size_t ld, const float *const x[QB], int n, int D) {
    int d = 0;
#ifdef ATTN_AVX2
    for (; d + 16 <= D; d += 16) {
        __m256 xr[QB][2];
        for (int r = 0; r < QB; r++) xr[r][0] = _mm256_loadu_ps(x[r] + d), xr[r][1] = _mm256_loadu_ps(x[r] + d + 8);
        for (int j = 0; j < n; j++) {
            float *gj = g + (size_t)j * gs + d;
            __m256 g0 = _mm256_loadu_ps(gj), g1 = _mm256_loadu_ps(gj + 8);
            for (int r = 0; r < QB; r++) {
                __m256 p = _mm256_broadcast_ss(P + r * ld + j);
                g0 = _mm256_fmadd_ps(p, xr[r][0], g0);
                g1 = _mm256_fmadd_ps(p, xr[r][1], g1);
            }
            _mm256_storeu_ps(gj, g0);
            _mm256_storeu_ps(gj + 8, g1);
        }
    }
    for (; d + 8 <= D; d += 8) {
        __m256 xr[QB];
        for (int r = 0; r < QB; r++) xr[r] = _mm256_loadu_ps(x[r] + d);
        for (int j = 0; j < n; j++) {
            float *gj = g + (size_t)j * gs + d;
            __m256 g0 = _mm256_loadu_ps(gj);
            for (int r = 0; r < QB; r++) g0 = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r * ld + j), xr[r], g0);
            _mm256_storeu_ps(gj, g0);
        }
    }
#endif
    for (; d < D; d++)
        for (int j = 0; j < n; j++) {
            float s = g[(size_t)j * gs + d];
            for (int r = 0; r < QB; r++) s += P[r * ld + j] * x[r][d];
            g[(size_t)j * gs + d] = s;
        }
}

/* s[j] = exp(scale * s[j] - m) for j < n, with m = max_j scale * s[j];
 * returns m.  Separate loops so each one vectorises. */
static float softmax_row(float *restrict s, int n, float scale) {
    for (int j = 0; j < n; j++) s[j] *= scale;
    float m = s[0];
    for (int j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
    for (int j = 0; j < n; j++) s[j] = perl_expf(s[j] - m);
    return m;
}

/* sum_j s[j] in 8 interleaved partial sums (a fixed order, so the result
 * does not depend on the thread count; the compiler can keep them in one
 * vector register). */
static float sum_row(const float *s, int n) {
    float part[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) part[k] += s[j + k];
    float sum = 0.0f;
    for (; j < n; j++) sum += s[j];
    for (int k = 0; k < 8; k++) sum += part[k];
    return sum;
}

/* Pointers to QB consecutive rows of base (stride), starting at row i;
 * rows past `valid` repeat the last valid one (their results are discarded
 * or multiplied by zero). */
static void block_rows(const float *rows[QB], const float *base, size_t stride, int i, int valid) {
    for (int r = 0; r < QB; r++) rows[r] = base + (size_t)(i + PERL_MIN(r, valid - 1)) * stride;
}

/* Scratch of one task: K and V of a kv head transposed, two QB x L score
 * blocks and QB rows to receive the outputs of padding rows. */
typedef struct attn_scratch {
    float *kt, *vt, *s, *p, *sink;
} attn_scratch;

static float *task_scratch(attn_ctx *c, attn_scratch *w) {
    size_t l = (size_t)c->max_len, d = (size_t)c->head_dim;
    float *mem = perl_mem_alloc((2 * d * l + 2 * QB * l + QB * d) * sizeof(float));
    if (!mem) {
        atomic_store(&c->out_of_memory, 1); /* the whole call fails */
        return NULL;
    }
    w->kt = mem, w->vt = w->kt + d * l, w->s = w->vt + d * l, w->p = w->s + QB * l, w->sink = w->p + QB * l;
    return mem;
}

/* Output rows of a block: rows past `valid` write into the sink. */
static void block_out_rows(float *rows[QB], float *base, size_t stride, int i, int valid, float *sink, int D) {
    for (int r = 0; r < QB; r++) rows[r] = r < valid ? base + (size_t)(i + r) * stride : sink + (size_t)r * D;
}

static void attention_forward_tasks(void *p, int64_t begin, int64_t end) {
    attn_ctx *c = p;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t qs = (size_t)H * D, ks = (size_t)KV * D, L = (size_t)c->max_len;
    float scale = 1.0f / sqrtf((float)D);
    attn_scratch w;
    float *mem = task_scratch(c, &w);
    if (!mem) return;
    for (int64_t task = begin; task < end; task++) {
        int row = (int)(task / KV), g = (int)(task % KV);
        int s0 = c->row_start[row], T = c->row_start[row + 1] - s0;
        const float *v0 = c->v + (size_t)s0 * ks + (size_t)g * D;
        transpose_head(w.kt, c->k + (size_t)s0 * ks + (size_t)g * D, ks, T, D);
        for (int h = g * group; h < (g + 1) * group; h++) {
            const float *q0 = c->q + (size_t)s0 * qs + (size_t)h * D;
            for (int i = 0; i < T; i += QB) {
                int nb = PERL_MIN(QB, T - i), n = i + nb; /* keys the block sees */
                const float *qr[QB];
                float *orow[QB], inv[QB];
                block_rows(qr, q0, qs, i, nb);
                block_scores(w.s, L, qr, w.kt, T, n, D);
                for (int r = 0; r < QB; r++) {
                    float *s = w.s + r * L;
                    int len = r < nb ? i + r + 1 : 0; /* causal: keys 0..i+r */
                    for (int j = len; j < n; j++) s[j] = 0.0f;
                    if (len == 0) {
                        inv[r] = 0.0f;
                        continue;
                    }
                    float m = softmax_row(s, len, scale);
                    float sum = sum_row(s, len);
                    inv[r] = 1.0f / sum;
                    c->lse[(size_t)(s0 + i + r) * H + h] = m + logf(sum);
                }
                block_out_rows(orow, c->out + (size_t)s0 * qs + (size_t)h * D, qs, i, nb, w.sink, D);
                block_combine(orow, w.s, L, v0, ks, n, D);
                for (int r = 0; r < nb; r++)
                    for (int d = 0; d < D; d++) orow[r][d] *= inv[r];
            }
        }
    }
    perl_mem_free(mem);
}

static int max_row_len(const int *row_start, int n_rows) {
    int m = 1;
    for (int r = 0; r < n_rows; r++) m = PERL_MAX(m, row_start[r + 1] - row_start[r]);
    return m;
}

static int attention_status(attn_ctx *c) {
    return atomic_load(&c->out_of_memory) ? perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for attention scratch")
                                          : LIBPERL_OK;
}

int attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                      const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim) {
    attn_ctx c = {.out = out, .lse = lse, .q = q, .k = k, .v = v, .row_start = row_start,
                  .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim,
                  .max_len = max_row_len(row_start, n_rows)};
    atomic_init(&c.out_of_memory, 0);
    perl_parallel_for((int64_t)n_rows * n_kv_heads, 1, attention_forward_tasks, &c);
    return attention_status(&c);
}

/*
 * For query i of head h (p_j = exp(s_j - lse_i), delta_i = dO_i . O_i):
 *   dp_j = dO_i . v_j,  ds_j = p_j (dp_j - delta_i) scale
 *   dq_i = sum_j ds_j k_j,  dk_j += ds_j q_i,  dv_j += p_j dO_i
 */
static void attention_backward_tasks(void *p, int64_t begin, int64_t end) {
    attn_ctx *c = p;
    int D = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    size_t qs = (size_t)H * D, ks = (size_t)KV * D, L = (size_t)c->max_len;
    float scale = 1.0f / sqrtf((float)D);
    attn_scratch w;
    float *mem = task_scratch(c, &w);
    if (!mem) return;
    for (int64_t task = begin; task < end; task++) {
        int row = (int)(task / KV), g = (int)(task % KV);
        int s0 = c->row_start[row], T = c->row_start[row + 1] - s0;
        const float *k0 = c->k + (size_t)s0 * ks + (size_t)g * D, *v0 = c->v + (size_t)s0 * ks + (size_t)g * D;
        float *dk0 = c->dk + (size_t)s0 * ks + (size_t)g * D, *dv0 = c->dv + (size_t)s0 * ks + (size_t)g * D;
        transpose_head(w.kt, k0, ks, T, D);
        transpose_head(w.vt, v0, ks, T, D);
        for (int j = 0; j < T; j++) {
            memset(dk0 + (size_t)j * ks, 0, (size_t)D * sizeof(float));
            memset(dv0 + (size_t)j * ks, 0, (size_t)D * sizeof(float));
        }
        for (int h = g * group; h < (g + 1) * group; h++) {
            size_t off = (size_t)s0 * qs + (size_t)h * D;
            for (int i = 0; i < T; i += QB) {
                int nb = PERL_MIN(QB, T - i), n = i + nb;
                const float *qr[QB], *dor[QB];
                float *dqr[QB];
                block_rows(qr, c->q + off, qs, i, nb);
                block_rows(dor, c->dout + off, qs, i, nb);
                block_scores(w.p, L, qr, w.kt, T, n, D);  /* scores -> probabilities */
                block_scores(w.s, L, dor, w.vt, T, n, D); /* dp -> ds */
                for (int r = 0; r < QB; r++) {
                    float *pr = w.p + r * L, *sr = w.s + r * L;
                    int len = r < nb ? i + r + 1 : 0;
                    if (len) {
                        size_t qoff = off + (size_t)(i + r) * qs;
                        float lse = c->lse_in[(size_t)(s0 + i + r) * H + h];
                        float delta = dot(c->dout + qoff, c->out_in + qoff, D);
                        for (int j = 0; j < len; j++) {
                            pr[j] = perl_expf(pr[j] * scale - lse);
                            sr[j] = pr[j] * (sr[j] - delta) * scale;
                        }
                    }
                    for (int j = len; j < n; j++) pr[j] = sr[j] = 0.0f;
                }
                block_out_rows(dqr, c->dq + off, qs, i, nb, w.sink, D);
                block_combine(dqr, w.s, L, k0, ks, n, D);
                block_scatter(dk0, ks, w.s, L, qr, n, D);
                block_scatter(dv0, ks, w.p, L, dor, n, D);
            }
        }
    }
    perl_mem_free(mem);
}

int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                       const float *lse, const float *q, const float *k, const float *v,
                       const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim) {
    attn_ctx c = {.dq = dq, .dk = dk, .dv = dv, .q = q, .k = k, .v = v, .dout = dout, .out_in = out,
                  .lse_in = lse, .row_start = row_start, .n_heads = n_heads, .n_kv_heads = n_kv_heads,
                  .head_dim = head_dim, .max_len = max_row_len(row_start, n_rows)};
    atomic_init(&c.out_of_memory, 0);
    perl_parallel_for((int64_t)n_rows * n_kv_heads, 1, attention_backward_tasks, &c);
    return attention_status(&c);
}
