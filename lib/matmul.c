/*
 * Dense products (W is [out, in], as nn.Linear stores it).
 *
 * Large products go through CBLAS.  Products with only a few rows (decode
 * steps, single sequences) use a row kernel instead: sgemm would pack the
 * whole weight matrix on every call (OpenBLAS's incopy), doubling the memory
 * traffic of what is a bandwidth-bound matrix-vector product.  The row kernel
 * reads each weight row once and applies it to every input row.
 */
#include "blas.h"
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#  include <immintrin.h>
#endif

/* At most this many input rows take the row kernel, in blocks of ROW_BLOCK
 * rows that share each weight row's load (8 accumulators + 1 weight vector
 * fit AVX2's 16 registers). */
#define SMALL_ROWS 16
#define ROW_BLOCK 8

typedef struct rows_ctx {
    float *y;
    const float *x, *W, *b;
    int N, in, out;
    float beta;
} rows_ctx;

#if defined(__AVX2__) && defined(__FMA__)
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* y[i, o] = x_i . W_o for i < n (n <= ROW_BLOCK), o in [begin, end).
 * Always inlined into rows_block with a constant n, so the row loops unroll
 * and the accumulators stay in registers (with a run-time n gcc spilled them
 * to the stack on every multiply-add: half the speed at 16 rows). */
#if defined(__GNUC__)
#  define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#  define ALWAYS_INLINE inline
#endif
static ALWAYS_INLINE void rows_block_n(const rows_ctx *c, int i0, int n, int64_t begin, int64_t end) {
    int in = c->in;
    for (int64_t o = begin; o < end; o++) {
        const float *w = c->W + (size_t)o * in;
        float sum[ROW_BLOCK] = {0.0f};
        int k = 0;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc[ROW_BLOCK];
        for (int r = 0; r < ROW_BLOCK; r++) acc[r] = _mm256_setzero_ps();
        for (; k + 8 <= in; k += 8) {
            __m256 wv = _mm256_loadu_ps(w + k);
            for (int r = 0; r < n; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(c->x + (size_t)(i0 + r) * in + k), wv, acc[r]);
        }
        for (int r = 0; r < n; r++) sum[r] = hsum256(acc[r]);
#endif
        for (; k < in; k++)
            for (int r = 0; r < n; r++) sum[r] += c->x[(size_t)(i0 + r) * in + k] * w[k];
        for (int r = 0; r < n; r++) {
            float *y = c->y + (size_t)(i0 + r) * c->out + o;
            *y = (c->beta != 0.0f ? c->beta * *y : 0.0f) + sum[r] + (c->b ? c->b[o] : 0.0f);
        }
    }
}

/* Output tiles of OUT_TILE weight rows: every block of input rows takes the
 * tile in turn, so past the first block the tile comes from cache and each
 * weight is read from memory once per call, not once per row block (8 rows
 * of in = 768 are 24 KB). */
#define OUT_TILE 8

static void rows_block(const rows_ctx *c, int i0, int n, int64_t begin, int64_t end) {
    switch (n) {
    case 1: rows_block_n(c, i0, 1, begin, end); break;
    case 2: rows_block_n(c, i0, 2, begin, end); break;
    case 3: rows_block_n(c, i0, 3, begin, end); break;
    case 4: rows_block_n(c, i0, 4, begin, end); break;
    case 5: rows_block_n(c, i0, 5, begin, end); break;
    case 6: rows_block_n(c, i0, 6, begin, end); break;
    case 7: rows_block_n(c, i0, 7, begin, end); break;
    default: rows_block_n(c, i0, ROW_BLOCK, begin, end); break;
    }
}

static void rows_range(void *p, int64_t begin, int64_t end) {
    const rows_ctx *c = p;
    for (int64_t o = begin; o < end; o += OUT_TILE)
        for (int i = 0; i < c->N; i += ROW_BLOCK)
            rows_block(c, i, PERL_MIN(ROW_BLOCK, c->N - i), o, PERL_MIN(end, o + OUT_TILE));
}

void matmul_forward(float *y, const float *x, const float *W, const float *b, int N, int in, int out,
                    float beta) {
    if (N <= SMALL_ROWS) {
        rows_ctx c = {y, x, W, b, N, in, out, beta};
        /* chunks of at least ~256K multiply-adds: below that a wake-up costs more than it saves */
        int64_t grain = PERL_MAX(16, (256 * 1024) / PERL_MAX(1, (int64_t)in * N));
        perl_parallel_for(out, grain, rows_range, &c);
        return;
    }
    /* y[N, out] = x[N, in] W^T[in, out] + beta * y */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, in, 1.0f, x, in, W, in, beta, y, out);
    if (b) {
        for (int i = 0; i < N; i++)
            for (int j = 0; j < out; j++) y[(size_t)i * out + j] += b[j];
    }
}

void matmul_backward(float *dx, float *dW, float *db, const float *dy, const float *x, const float *W,
                     int N, int in, int out) {
    /* dx[N, in] += dy[N, out] W[out, in] */
    if (dx)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, out, 1.0f, dy, out, W, in, 1.0f, dx,
                    in);
    /* dW[out, in] += dy^T[out, N] x[N, in] */
    if (dW)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, N, 1.0f, dy, out, x, in, 1.0f, dW,
                    in);
    if (db) {
        for (int i = 0; i < N; i++)
            for (int j = 0; j < out; j++) db[j] += dy[(size_t)i * out + j];
    }
}
