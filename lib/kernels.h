/*
 * Element-wise and row-wise transformer kernels, in forward/backward pairs.
 * Outputs first; gradients prefixed d; backward accumulates (+=) into
 * parameter gradients and writes (=) input gradients unless stated.
 * Every kernel is parallel over rows through perl_parallel_for.
 */
#ifndef LIBPERL_KERNELS_H
#define LIBPERL_KERNELS_H

#include "internal.h"

/* y[N, C] = x * rstd * w, rstd[N] = 1 / sqrt(mean(x^2) + eps) */
void rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int C, float eps);
/* dx[N, C] += dL/dx;  dw[C] += sum_rows dy * x * rstd (dw may be NULL) */
void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                      const float *rstd, int N, int C);

/* In-place rotary embedding of x[N, n_heads * head_dim] at positions pos[N].
 * interleaved: pairs (2j, 2j+1) (llama2.c); else (j, j + head_dim/2) (HF).
 * cos/sin tables are [max_pos, head_dim/2]. inverse = 1 applies the
 * transpose rotation (the backward pass). */
void rope_apply(float *x, const int32_t *pos, int N, int n_heads, int head_dim, const float *cos_table,
                const float *sin_table, int interleaved, int inverse);

/* act[N, H] = silu(gate) * up */
void swiglu_forward(float *act, const float *gate, const float *up, int64_t n);
/* dgate = dact * up * silu'(gate); dup = dact * silu(gate) (both written) */
void swiglu_backward(float *dgate, float *dup, const float *dact, const float *gate, const float *up,
                     int64_t n);

/* y[n] += x[n] */
void add_inplace(float *y, const float *x, int64_t n);

/* dst = src * keep / (1 - p), keep ~ Bernoulli(1 - p) from (seed, stream). */
void dropout_forward(float *dst, const float *src, int64_t n, float p, uint64_t seed, uint64_t stream);

/* Causal grouped-query attention over packed rows.
 * q[N, H*D], k/v[N, KV*D] (RoPE already applied), out[N, H*D], lse[N, H]
 * (log-sum-exp of each query's scaled scores, kept for backward).  No
 * [T, T] score matrix is stored.  Returns LIBPERL_OK, or LIBPERL_ERR_OUT_OF_MEMORY
 * when a worker could not allocate its scratch (the outputs are then
 * incomplete). */
int attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                      const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim);
/* dq, dk, dv are written (=), from dout and the forward's out/lse. */
int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                       const float *lse, const float *q, const float *k, const float *v,
                       const int *row_start, int n_rows, int n_heads, int n_kv_heads, int head_dim);

/* Dense layers through CBLAS; W is [out, in] (nn.Linear).
 * y[N, out] = x W^T + b (beta = 0 overwrites, 1 accumulates) */
void matmul_forward(float *y, const float *x, const float *W, const float *b, int N, int in, int out,
                    float beta);
/* dx[N, in] += dy W (if dx); dW[out, in] += dy^T x (if dW); db += sum dy (if db) */
void matmul_backward(float *dx, float *dW, float *db, const float *dy, const float *x, const float *W,
                     int N, int in, int out);

#endif /* LIBPERL_KERNELS_H */
