/*
 * What a bf16 frozen base could buy on this CPU: times oneDNN's
 * dnnl_gemm_bf16bf16f32 (bf16 inputs, fp32 accumulation and output; the GEMM
 * PyTorch uses for bf16 on CPU) beside OpenBLAS cblas_sgemm on the forward
 * GEMM shapes of the dim-768 model, and prints one JSON line per shape:
 * GFLOP/s of each, their ratio, oneDNN's effective ISA, and the relative
 * error of the bf16 product against the fp32 one.
 *
 *   OMP_NUM_THREADS=1 bf16_gemm [--tokens N] [--min-time S]
 *                               [--dnnl-lib PATH] [--blas-lib PATH]
 *
 * Both libraries are opened with dlopen, so the program needs neither
 * library's headers and libperl does not depend on oneDNN: issue 9 asks
 * whether a bf16 base is worth an optional `make BF16=dnnl` build, and this
 * is the measurement that answers it for a given machine.  oneDNN 2.6 runs
 * bf16 GEMM natively only with AVX512_BF16 (or AMX); on an AVX2 CPU it
 * converts to fp32 internally, which the ISA field and the rate show.
 */
#define _POSIX_C_SOURCE 200809L

#include "dl_blas.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* oneDNN's C API (dnnl.h), row-major like cblas: dnnl_dim_t is int64_t and
 * dnnl_bfloat16_t a uint16_t; the status is 0 (dnnl_success) on success. */
typedef int (*gemm_bf16_fn)(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                            const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb, float beta, float *C,
                            int64_t ldc);
typedef int (*get_isa_fn)(void);

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Round to nearest even, as PyTorch and oneDNN convert. */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* oneDNN's dnnl_cpu_isa_t values (2.6) for the names that matter here. */
static const char *isa_name(int isa)
{
    switch (isa) {
    case 0x0: return "all";
    case 0x1: return "sse41";
    case 0x3: return "avx";
    case 0x7: return "avx2";
    case 0x27: return "avx512_core";
    case 0x67: return "avx512_core_vnni";
    case 0xe7: return "avx512_core_bf16";
    case 0x3e7: return "avx512_core_amx";
    default: return "other";
    }
}

/* Median-of-repeats rate of one GEMM call, in GFLOP/s. */
#define REPEATS 7
static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int tokens = 512;
    double min_time = 0.2;
    const char *dnnl_path = "libdnnl.so.2", *blas_path = "libopenblas.so.0";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens")) tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--min-time")) min_time = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--dnnl-lib")) dnnl_path = argv[i + 1];
        else if (!strcmp(argv[i], "--blas-lib")) blas_path = argv[i + 1];
        else {
            fprintf(stderr, "usage: bf16_gemm [--tokens N] [--min-time S] [--dnnl-lib PATH] [--blas-lib PATH]\n");
            return 2;
        }
    }
    void *dnnl = dlopen(dnnl_path, RTLD_NOW), *blas = dlopen(blas_path, RTLD_NOW);
    if (!dnnl || !blas) {
        fprintf(stderr, "bf16_gemm: cannot open %s: %s\n", !dnnl ? dnnl_path : blas_path, dlerror());
        return 1;
    }
    sgemm_fn sgemm;
    set_threads_fn set_threads;
    gemm_bf16_fn gemm_bf16;
    get_isa_fn get_isa;
    load_symbol("bf16_gemm", blas, "cblas_sgemm", &sgemm, sizeof sgemm);
    load_symbol("bf16_gemm", blas, "openblas_set_num_threads", &set_threads, sizeof set_threads);
    load_symbol("bf16_gemm", dnnl, "dnnl_gemm_bf16bf16f32", &gemm_bf16, sizeof gemm_bf16);
    load_symbol("bf16_gemm", dnnl, "dnnl_get_effective_cpu_isa", &get_isa, sizeof get_isa);
    set_threads(1);

    /* y[N, out] = x[N, in] W^T for the dim-768 model's projections. */
    static const int shapes[][2] = {{768, 768}, {256, 768}, {2048, 768}, {768, 2048}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int M = tokens, N = shapes[s][0], K = shapes[s][1];
        float *x = malloc(sizeof(float) * (size_t)M * K), *w = malloc(sizeof(float) * (size_t)N * K);
        float *y = malloc(sizeof(float) * (size_t)M * N), *y16 = malloc(sizeof(float) * (size_t)M * N);
        uint16_t *xb = malloc(2 * (size_t)M * K), *wb = malloc(2 * (size_t)N * K);
        srand(1);
        for (size_t i = 0; i < (size_t)M * K; i++) xb[i] = to_bf16(x[i] = (float)((double)rand() / RAND_MAX - 0.5));
        for (size_t i = 0; i < (size_t)N * K; i++) wb[i] = to_bf16(w[i] = (float)((double)rand() / RAND_MAX - 0.5));
        double flops = 2.0 * M * N * K, t_sgemm[REPEATS], t_bf16[REPEATS];
        int status = 0;
        for (int r = 0; r < REPEATS; r++) {
            int calls = 0;
            double t0 = now();
            do sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x, K, w, K, 0.0f, y, N), calls++;
            while (now() - t0 < min_time / REPEATS);
            t_sgemm[r] = (now() - t0) / calls;
            calls = 0;
            t0 = now();
            do status |= gemm_bf16('N', 'T', M, N, K, 1.0f, xb, K, wb, K, 0.0f, y16, N), calls++;
            while (now() - t0 < min_time / REPEATS);
            t_bf16[r] = (now() - t0) / calls;
        }
        qsort(t_sgemm, REPEATS, sizeof(double), cmp);
        qsort(t_bf16, REPEATS, sizeof(double), cmp);
        double num = 0, den = 0;
        for (size_t i = 0; i < (size_t)M * N; i++) num += (y16[i] - y[i]) * (double)(y16[i] - y[i]), den += y[i] * (double)y[i];
        double g32 = flops / t_sgemm[REPEATS / 2] * 1e-9, g16 = flops / t_bf16[REPEATS / 2] * 1e-9;
        printf("{\"bench\": \"bf16_gemm\", \"M\": %d, \"N\": %d, \"K\": %d, \"threads\": 1, \"dnnl_isa\": \"%s\", "
               "\"sgemm_gflops\": %.1f, ",
               M, N, K, isa_name(get_isa()), g32);
        if (status == 0)
            printf("\"bf16_status\": \"ok\", \"bf16_gflops\": %.1f, \"bf16_over_sgemm\": %.2f, \"bf16_rel_err\": %.2e}\n",
                   g16, g16 / g32, sqrt(num / den));
        else /* 3 = dnnl_unimplemented: no bf16 GEMM for this ISA */
            printf("\"bf16_status\": \"%s\", \"dnnl_status\": %d, \"bf16_gflops\": null}\n",
                   status == 3 ? "unimplemented" : "failed", status);
        fflush(stdout);
        free(x), free(w), free(y), free(y16), free(xb), free(wb);
    }
    return 0;
}
