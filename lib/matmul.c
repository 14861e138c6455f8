/* Dense products through CBLAS (W is [out, in], as nn.Linear stores it). */
#include "blas.h"
#include "kernels.h"

void matmul_forward(float *y, const float *x, const float *W, const float *b, int N, int in, int out,
                    float beta) {
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
