/*
 * The attention kernels alone (lib/attention.c: attention_forward and
 * attention_backward), outside any model: one JSON line per shape with the
 * best-of-reps seconds and GFLOP/s of each direction, and a checksum of the
 * outputs (equal checksums = equal results across builds).  Internal
 * functions are not exported from the shared library, so this program links
 * the static one (Makefile: its own rule).
 *
 *   attention_kernels [--threads N] [--reps R]
 *
 * FLOPs: 2 per multiply-add of QK^T and PV over the causal triangle
 * (forward); backward counts twice the forward, as docs/benchmarks.md does.
 */
#define _POSIX_C_SOURCE 200809L

#include "kernels.h"

#define BENCH_NAME "attention_kernels"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fill(float *x, size_t n, uint32_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
}

static void run(const char *name, int rows, int T, int H, int KV, int D, int reps, int threads) {
    int N = rows * T;
    int *row_start = malloc(((size_t)rows + 1) * sizeof *row_start);
    for (int r = 0; r <= rows; r++) row_start[r] = r * T;
    size_t qn = (size_t)N * H * D, kn = (size_t)N * KV * D;
    float *q = malloc(qn * 4), *k = malloc(kn * 4), *v = malloc(kn * 4), *o = malloc(qn * 4);
    float *lse = malloc((size_t)N * H * 4), *dout = malloc(qn * 4), *dq = malloc(qn * 4);
    float *dk = malloc(kn * 4), *dv = malloc(kn * 4);
    fill(q, qn, 1), fill(k, kn, 2), fill(v, kn, 3), fill(dout, qn, 4);
    double best_f = 1e30, best_b = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        BENCH_TRY("attention_forward", attention_forward(o, lse, q, k, v, row_start, rows, H, KV, D));
        double t1 = now_s();
        BENCH_TRY("attention_backward",
                  attention_backward(dq, dk, dv, dout, o, lse, q, k, v, row_start, rows, H, KV, D));
        double t2 = now_s();
        best_f = t1 - t0 < best_f ? t1 - t0 : best_f;
        best_b = t2 - t1 < best_b ? t2 - t1 : best_b;
    }
    double flops = 2.0 * 2.0 * rows * H * ((double)T * (T + 1) / 2) * D;
    double checksum = 0;
    for (size_t i = 0; i < qn; i++) checksum += 1e-3 * o[i] + dq[i];
    for (size_t i = 0; i < kn; i++) checksum += dk[i] + dv[i];
    printf("{\"bench\": \"attention_kernels\", \"impl\": \"libperl\", \"name\": \"%s\", \"rows\": %d, \"seq\": %d, "
           "\"heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"threads\": %d, \"reps\": %d, "
           "\"forward_s\": %.6f, \"backward_s\": %.6f, \"forward_gflops\": %.2f, \"backward_gflops\": %.2f, "
           "\"checksum\": %.6f}\n",
           name, rows, T, H, KV, D, threads, reps, best_f, best_b, flops / best_f * 1e-9, 2 * flops / best_b * 1e-9,
           checksum);
    free(row_start), free(q), free(k), free(v), free(o), free(lse), free(dout), free(dq), free(dk), free(dv);
}

int main(int argc, char **argv) {
    int threads = 1, reps = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: attention_kernels [--threads N] [--reps R]\n");
            return 2;
        }
    }
    if (perl_set_num_threads(threads) != LIBPERL_OK || reps < 1) return 2;
    run("random768", 4, 256, 12, 4, 64, reps, threads);  /* the medium model, batch 4 x 256 */
    run("demo", 32, 60, 4, 4, 16, 4 * reps, threads);      /* the demo's model: 32 rows of ~60 bytes */
    run("stories260K", 2, 64, 8, 4, 8, 10 * reps, threads); /* head dim 8 */
    return 0;
}
