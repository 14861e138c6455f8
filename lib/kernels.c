/* Row-wise kernels: RMSNorm, RoPE, SwiGLU, dropout, residual add. */
#include "kernels.h"

#include <math.h>
#include <string.h>

/* Rows per parallel chunk: enough work to amortise a wake-up. */
static int64_t row_grain(int C) { return PERL_MAX(1, 16384 / PERL_MAX(C, 1)); }

typedef struct rmsnorm_ctx {
    float *y, *rstd, *dx;
    const float *x, *w, *dy, *rstd_in;
    int C;
    float eps;
} rmsnorm_ctx;

static void rmsnorm_forward_rows(void *p, int64_t begin, int64_t end) {
    rmsnorm_ctx *c = p;
    for (int64_t i = begin; i < end; i++) {
        const float *x = c->x + i * c->C;
        float *y = c->y + i * c->C;
        float ss = 0.0f;
        for (int j = 0; j < c->C; j++) ss += x[j] * x[j];
        float r = 1.0f / sqrtf(ss / (float)c->C + c->eps);
        c->rstd[i] = r;
        for (int j = 0; j < c->C; j++) y[j] = x[j] * r * c->w[j];
    }
}

void rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps) {
    rmsnorm_ctx c = {.y = y, .rstd = rstd, .x = x, .w = w, .C = C, .eps = eps};
    perl_parallel_for(N, row_grain(C), rmsnorm_forward_rows, &c);
}

static void rmsnorm_backward_rows(void *p, int64_t begin, int64_t end) {
    rmsnorm_ctx *c = p;
    for (int64_t i = begin; i < end; i++) {
        const float *x = c->x + i * c->C, *dy = c->dy + i * c->C;
        float *dx = c->dx + i * c->C;
        float r = c->rstd_in[i];
        /* dx = r * (dy*w) - x * r^3 * mean(dy*w*x) */
        float dot = 0.0f;
        for (int j = 0; j < c->C; j++) dot += dy[j] * c->w[j] * x[j];
        float k = r * r * r * dot / (float)c->C;
        for (int j = 0; j < c->C; j++) dx[j] += r * dy[j] * c->w[j] - k * x[j];
    }
}

void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                      const float *rstd, int N, int C) {
    rmsnorm_ctx c = {.dx = dx, .x = x, .w = w, .dy = dy, .rstd_in = rstd, .C = C};
    perl_parallel_for(N, row_grain(C), rmsnorm_backward_rows, &c);
    if (dw) { /* serial over rows: deterministic whatever the thread count */
        for (int i = 0; i < N; i++) {
            const float *xi = x + (size_t)i * C, *dyi = dy + (size_t)i * C;
            for (int j = 0; j < C; j++) dw[j] += dyi[j] * xi[j] * rstd[i];
        }
    }
}

typedef struct rope_ctx {
    float *x;
    const int32_t *pos;
    int n_heads, head_dim, interleaved, inverse;
    const float *cos_table, *sin_table;
} rope_ctx;

static void rope_rows(void *p, int64_t begin, int64_t end) {
    rope_ctx *c = p;
    int half = c->head_dim / 2;
    float sign = c->inverse ? -1.0f : 1.0f;
    for (int64_t i = begin; i < end; i++) {
        const float *cs = c->cos_table + (size_t)c->pos[i] * half;
        const float *sn = c->sin_table + (size_t)c->pos[i] * half;
        for (int h = 0; h < c->n_heads; h++) {
            float *x = c->x + (i * c->n_heads + h) * c->head_dim;
            for (int j = 0; j < half; j++) {
                int a = c->interleaved ? 2 * j : j;
                int b = c->interleaved ? 2 * j + 1 : j + half;
                float x0 = x[a], x1 = x[b], s = sign * sn[j];
                x[a] = x0 * cs[j] - x1 * s;
                x[b] = x0 * s + x1 * cs[j];
            }
        }
    }
}

void rope_apply(float *x, const int32_t *pos, int N, int n_heads, int head_dim, const float *cos_table,
                const float *sin_table, int interleaved, int inverse) {
    rope_ctx c = {x, pos, n_heads, head_dim, interleaved, inverse, cos_table, sin_table};
    perl_parallel_for(N, row_grain(n_heads * head_dim), rope_rows, &c);
}

typedef struct swiglu_ctx {
    float *act, *dgate, *dup;
    const float *gate, *up, *dact;
} swiglu_ctx;

static void swiglu_forward_range(void *p, int64_t begin, int64_t end) {
    swiglu_ctx *c = p;
    for (int64_t i = begin; i < end; i++) {
        float g = c->gate[i];
        c->act[i] = g / (1.0f + perl_expf(-g)) * c->up[i];
    }
}

void swiglu_forward(float *act, const float *gate, const float *up, int64_t n) {
    swiglu_ctx c = {.act = act, .gate = gate, .up = up};
    perl_parallel_for(n, 16384, swiglu_forward_range, &c);
}

static void swiglu_backward_range(void *p, int64_t begin, int64_t end) {
    swiglu_ctx *c = p;
    for (int64_t i = begin; i < end; i++) {
        float g = c->gate[i], sig = 1.0f / (1.0f + perl_expf(-g));
        float silu = g * sig;
        c->dup[i] = c->dact[i] * silu;
        c->dgate[i] = c->dact[i] * c->up[i] * sig * (1.0f + g * (1.0f - sig));
    }
}

void swiglu_backward(float *dgate, float *dup, const float *dact, const float *gate, const float *up,
                     int64_t n) {
    swiglu_ctx c = {.dgate = dgate, .dup = dup, .gate = gate, .up = up, .dact = dact};
    perl_parallel_for(n, 16384, swiglu_backward_range, &c);
}

typedef struct add_ctx {
    float *y;
    const float *x;
} add_ctx;

static void add_range(void *p, int64_t begin, int64_t end) {
    add_ctx *c = p;
    for (int64_t i = begin; i < end; i++) c->y[i] += c->x[i];
}

void add_inplace(float *y, const float *x, int64_t n) {
    add_ctx c = {y, x};
    perl_parallel_for(n, 32768, add_range, &c);
}

void dropout_forward(float *dst, const float *src, int64_t n, float p, uint64_t seed, uint64_t stream) {
    float keep_scale = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; i++)
        dst[i] = perl_rand_uniform(seed, stream, (uint64_t)i) < p ? 0.0f : src[i] * keep_scale;
}
