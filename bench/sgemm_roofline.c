/*
 * The sgemm roofline of one training step: times cblas_sgemm (OpenBLAS,
 * called directly, not through libperl) on every GEMM shape an SFT step of
 * the given model performs, and prints
 *   - one JSON line per distinct shape (bench "sgemm"): GFLOP/s at this
 *     thread count;
 *   - one summary line per step variant (bench "sgemm_roofline"): the GEMM
 *     FLOPs of the step and the time those GEMMs would take if each ran at
 *     its measured rate ("ideal_gemm_s"), which bench/report.py divides by the
 *     measured step time to give the fraction of sgemm peak.
 *
 *   sgemm_roofline [--threads N] [--tokens N] [--dim D] [--hidden H] [--layers L]
 *                  [--heads H] [--kv-heads K] [--vocab V] [--rank R] [--lm-chunk C]
 *                  [--batch B] [--scored N] [--min-time S] [--blas-lib PATH] [--quick]
 *
 * The GEMM list follows the algorithm (row-major, W [out, in] as nn.Linear):
 *   forward   y[N, out]   = x[N, in] W^T            NT (N, out, in)     per projection
 *   backward  dx[N, in]  += dy[N, out] W             NN (N, in, out)     per projection
 *   full      dW[out, in] += dy^T x                  TN (out, in, N)     per projection
 *   LoRA fwd  u = x A^T (N, r, in), y += u B^T (N, out, r)
 *   LoRA bwd  dB += dy^T u (out, r, N), du = dy B (N, r, out), dA += du^T x (r, in, N),
 *             dx += du A (N, in, r)
 *   LM head   logits = h W^T (C, V, dim), dh = dz W (C, dim, V), dW += dz^T h (V, dim, C)
 *             over the scored tokens in chunks of C rows (libperl bounds the
 *             logits chunk to 16 MB: C = clamp(4M / V, 16, 512)); the same
 *             head as one (N, V, dim) product is timed as well, for reference.
 * Attention is not a GEMM in libperl and is not counted here.
 *
 * OpenBLAS is opened with dlopen (--blas-lib, default the libopenblas.so.0
 * found by the dynamic loader; bench/run_all.sh passes
 * $(pkg-config --variable=libdir openblas)/libopenblas.so.0): the Makefile's
 * bench rule links programs to libperlrl only, and this program must not go
 * through libperl.  The CBLAS enum values are the standard ABI constants.
 */
#define _POSIX_C_SOURCE 200809L

#include "dl_blas.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef char *(*get_config_fn)(void);
static sgemm_fn cblas_sgemm;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Busy CPU seconds of the whole machine (all processes), from /proc/stat. */
static double machine_busy_s(void) {
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long v[8] = {0};
    if (!f) return 0.0;
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6], &v[7]);
    fclose(f);
    if (n != 8) return 0.0;
    return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / 100.0; /* all but idle, iowait; USER_HZ */
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct gemm_shape {
    const char *label;
    int ta, tb; /* 1: transposed operand */
    int M, N, K;
    double rate; /* measured GFLOP/s */
} gemm_shape;

#define MAX_SHAPES 64
static gemm_shape shapes[MAX_SHAPES];
static int n_shapes;

/* Returns the index of (ta, tb, M, N, K), adding it if new. */
static int shape_id(const char *label, int ta, int tb, int M, int N, int K) {
    for (int i = 0; i < n_shapes; i++) {
        gemm_shape *s = &shapes[i];
        if (s->ta == ta && s->tb == tb && s->M == M && s->N == N && s->K == K) return i;
    }
    if (n_shapes == MAX_SHAPES) {
        fprintf(stderr, "sgemm_roofline: too many shapes\n");
        exit(1);
    }
    shapes[n_shapes] = (gemm_shape){label, ta, tb, M, N, K, 0.0};
    return n_shapes++;
}

/* Median GFLOP/s of C[M, N] = op(A) op(B) (+ C), repeated for at least min_time seconds. */
static double time_gemm(const gemm_shape *s, double min_time) {
    size_t a_n = (size_t)s->M * s->K, b_n = (size_t)s->K * s->N, c_n = (size_t)s->M * s->N;
    float *A = malloc(a_n * sizeof(float)), *B = malloc(b_n * sizeof(float)), *C = malloc(c_n * sizeof(float));
    if (!A || !B || !C) {
        fprintf(stderr, "sgemm_roofline: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < a_n; i++) A[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < b_n; i++) B[i] = (float)((i * 104729) % 1000) * 1e-3f - 0.5f;
    memset(C, 0, c_n * sizeof(float));
    int lda = s->ta ? s->M : s->K, ldb = s->tb ? s->K : s->N;
    double flops = 2.0 * s->M * s->N * s->K;
    double times[1000];
    int n = 0;
    double start = now_s();
    for (int warm = 0; warm < 2; warm++)
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans, s->tb ? CblasTrans : CblasNoTrans, s->M, s->N,
                    s->K, 1.0f, A, lda, B, ldb, 1.0f, C, s->N);
    start = now_s();
    while (n < 1000 && (n < 5 || now_s() - start < min_time)) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans, s->tb ? CblasTrans : CblasNoTrans, s->M, s->N,
                    s->K, 1.0f, A, lda, B, ldb, 1.0f, C, s->N);
        times[n++] = now_s() - t0;
    }
    qsort(times, (size_t)n, sizeof(double), cmp_double);
    free(A);
    free(B);
    free(C);
    return flops / times[n / 2] * 1e-9;
}

/* A step variant: GEMM calls (shape index, count per step). */
typedef struct variant {
    const char *name;
    int ids[256];
    double counts[256];
    int n;
} variant;

static void add(variant *v, int id, double count) {
    for (int i = 0; i < v->n; i++)
        if (v->ids[i] == id) {
            v->counts[i] += count;
            return;
        }
    v->ids[v->n] = id;
    v->counts[v->n++] = count;
}

static void usage(void) {
    fprintf(stderr, "usage: sgemm_roofline [--threads N] [--tokens N] [--dim D] [--hidden H] [--layers L]\n"
                    "       [--heads H] [--kv-heads K] [--vocab V] [--rank R] [--lm-chunk C] [--min-time S]\n"
                    "       [--batch B] [--scored N] [--blas-lib PATH] [--quick]\n");
    exit(2);
}

int main(int argc, char **argv) {
    int threads = 1, tokens = 1024, dim = 768, hidden = 2048, layers = 12, heads = 12, kv_heads = 4;
    int vocab = 32000, rank = 8, lm_chunk = 0, scored = -1, batch = 4;
    double min_time = 0.4;
    const char *blas_lib = "libopenblas.so.0";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--quick")) {
            min_time = 0.1;
            continue;
        }
        if (i + 1 >= argc) usage();
        if (!strcmp(a, "--threads")) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--tokens")) tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--batch")) batch = atoi(argv[++i]);
        else if (!strcmp(a, "--dim")) dim = atoi(argv[++i]);
        else if (!strcmp(a, "--hidden")) hidden = atoi(argv[++i]);
        else if (!strcmp(a, "--layers")) layers = atoi(argv[++i]);
        else if (!strcmp(a, "--heads")) heads = atoi(argv[++i]);
        else if (!strcmp(a, "--kv-heads")) kv_heads = atoi(argv[++i]);
        else if (!strcmp(a, "--vocab")) vocab = atoi(argv[++i]);
        else if (!strcmp(a, "--rank")) rank = atoi(argv[++i]);
        else if (!strcmp(a, "--lm-chunk")) lm_chunk = atoi(argv[++i]);
        else if (!strcmp(a, "--scored")) scored = atoi(argv[++i]);
        else if (!strcmp(a, "--min-time")) min_time = atof(argv[++i]);
        else if (!strcmp(a, "--blas-lib")) blas_lib = argv[++i];
        else usage();
    }
    if (!lm_chunk) {
        lm_chunk = (4 << 20) / vocab;
        lm_chunk = lm_chunk < 16 ? 16 : (lm_chunk > 512 ? 512 : lm_chunk);
    }
    if (scored < 0) scored = tokens - batch; /* SFT: every position but each row's last */
    void *lib = dlopen(blas_lib, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "sgemm_roofline: cannot open %s: %s\n", blas_lib, dlerror());
        return 1;
    }
    set_threads_fn set_threads;
    get_config_fn get_config;
    load_symbol("sgemm_roofline", lib, "cblas_sgemm", &cblas_sgemm, sizeof cblas_sgemm);
    load_symbol("sgemm_roofline", lib, "openblas_set_num_threads", &set_threads, sizeof set_threads);
    load_symbol("sgemm_roofline", lib, "openblas_get_config", &get_config, sizeof get_config);
    set_threads(threads);
    const char *blas_config = get_config();

    int head_dim = dim / heads, qd = heads * head_dim, kvd = kv_heads * head_dim;
    /* projections: q k v o gate up down as (in, out); LoRA targets q k v o */
    const char *names[7] = {"q", "k", "v", "o", "gate", "up", "down"};
    int in[7] = {dim, dim, dim, qd, dim, dim, hidden};
    int out[7] = {qd, kvd, kvd, dim, hidden, hidden, dim};
    int lora_target[7] = {1, 1, 1, 1, 0, 0, 0};
    double lm_chunks = (double)scored / lm_chunk; /* chunk-equivalents of the LM head */

    variant fwd = {.name = "forward_hidden"}, lm = {.name = "lm_head_fwd"};
    variant lora = {.name = "sft_lora"}, full = {.name = "sft_full"};
    variant lora_rc = {.name = "sft_lora_recompute"}, full_rc = {.name = "sft_full_recompute"};
    variant lm_onegemm = {.name = "lm_head_one_gemm"};
    for (int p = 0; p < 7; p++) {
        int f = shape_id(names[p], 0, 1, tokens, out[p], in[p]);      /* NT forward */
        int dx = shape_id(names[p], 0, 0, tokens, in[p], out[p]);     /* NN dx */
        int dw = shape_id(names[p], 1, 0, out[p], in[p], tokens);     /* TN dW */
        add(&fwd, f, layers);
        add(&lora, f, layers), add(&lora, dx, layers);
        add(&lora_rc, f, 2 * layers), add(&lora_rc, dx, layers);
        add(&full, f, layers), add(&full, dx, layers), add(&full, dw, layers);
        add(&full_rc, f, 2 * layers), add(&full_rc, dx, layers), add(&full_rc, dw, layers);
        if (lora_target[p]) {
            int u = shape_id("lora_u=xA^T", 0, 1, tokens, rank, in[p]);
            int y = shape_id("lora_y+=uB^T", 0, 1, tokens, out[p], rank);
            int db = shape_id("lora_dB", 1, 0, out[p], rank, tokens);
            int du = shape_id("lora_du", 0, 0, tokens, rank, out[p]);
            int da = shape_id("lora_dA", 1, 0, rank, in[p], tokens);
            int ldx = shape_id("lora_dx", 0, 0, tokens, in[p], rank);
            add(&lora, u, layers), add(&lora, y, layers);
            add(&lora_rc, u, 2 * layers), add(&lora_rc, y, 2 * layers);
            variant *vs[2] = {&lora, &lora_rc};
            for (int k = 0; k < 2; k++) {
                add(vs[k], db, layers), add(vs[k], du, layers), add(vs[k], da, layers), add(vs[k], ldx, layers);
            }
        }
    }
    int lm_f = shape_id("lm_head", 0, 1, lm_chunk, vocab, dim);
    int lm_dh = shape_id("lm_head", 0, 0, lm_chunk, dim, vocab);
    int lm_dw = shape_id("lm_head", 1, 0, vocab, dim, lm_chunk);
    int lm_one = shape_id("lm_head_one_gemm", 0, 1, tokens, vocab, dim);
    add(&lm, lm_f, lm_chunks);
    add(&lm_onegemm, lm_one, 1);
    add(&lora, lm_f, lm_chunks), add(&lora, lm_dh, lm_chunks);
    add(&lora_rc, lm_f, lm_chunks), add(&lora_rc, lm_dh, lm_chunks);
    add(&full, lm_f, lm_chunks), add(&full, lm_dh, lm_chunks), add(&full, lm_dw, lm_chunks);
    add(&full_rc, lm_f, lm_chunks), add(&full_rc, lm_dh, lm_chunks), add(&full_rc, lm_dw, lm_chunks);
    int square = shape_id("square_2048", 0, 1, 2048, 2048, 2048);

    double peak = 0.0, busy0 = machine_busy_s(), cpu0 = cpu_s(), wall0 = now_s();
    for (int i = 0; i < n_shapes; i++) {
        gemm_shape *s = &shapes[i];
        s->rate = time_gemm(s, min_time);
        if (s->rate > peak) peak = s->rate;
        printf("{\"bench\": \"sgemm\", \"impl\": \"openblas\", \"name\": \"%s\", \"op\": \"%s%s\", \"M\": %d, "
               "\"N\": %d, \"K\": %d, \"threads\": %d, \"gflops_per_s\": %.2f}\n",
               s->label, s->ta ? "T" : "N", s->tb ? "T" : "N", s->M, s->N, s->K, threads, s->rate);
        fflush(stdout);
    }
    /* cores used by other processes while the shapes were timed (the machine is shared) */
    double other_cpu = (machine_busy_s() - busy0 - (cpu_s() - cpu0)) / (now_s() - wall0);
    if (other_cpu < 0.0) other_cpu = 0.0;
    variant *all[7] = {&fwd, &lm, &lm_onegemm, &lora, &lora_rc, &full, &full_rc};
    for (int k = 0; k < 7; k++) {
        variant *v = all[k];
        double flops = 0.0, ideal = 0.0;
        for (int i = 0; i < v->n; i++) {
            const gemm_shape *s = &shapes[v->ids[i]];
            double f = 2.0 * s->M * s->N * s->K * v->counts[i];
            flops += f;
            ideal += f / (s->rate * 1e9);
        }
        printf("{\"bench\": \"sgemm_roofline\", \"impl\": \"openblas\", \"name\": \"%s\", \"threads\": %d, "
               "\"tokens\": %d, \"scored_tokens\": %d, \"lm_chunk\": %d, \"rank\": %d, "
               "\"shape\": {\"dim\": %d, \"hidden_dim\": %d, \"n_layers\": %d, \"n_heads\": %d, \"n_kv_heads\": %d, "
               "\"vocab_size\": %d}, \"gemm_flops\": %.4e, \"ideal_gemm_s\": %.4f, \"gemm_gflops_per_s\": %.2f, "
               "\"peak_gflops_per_s\": %.2f, \"square_2048_gflops_per_s\": %.2f, \"other_cpu\": %.3f, "
               "\"online_cpus\": %ld, \"blas\": \"%s\"}\n",
               v->name, threads, tokens, scored, lm_chunk, rank, dim, hidden, layers, heads, kv_heads, vocab, flops,
               ideal, flops / ideal * 1e-9, peak, shapes[square].rate, other_cpu, sysconf(_SC_NPROCESSORS_ONLN),
               blas_config);
    }
    return 0;
}
