/*
 * The baseline of issue 5/9: llama2.c-style single-token decoding.  This is
 * llama2.c's run.c forward() (Karpathy, MIT) restated: plain C loops, no BLAS,
 * one token at a time with a KV cache, greedy argmax.  It does not use
 * libperl.  Built by the bench rule (-O3 -march=native); bench/comparison.sh
 * also builds an OpenMP variant (-fopenmp, as llama2.c's `make runomp`), where
 * matmul's row loop and the attention head loop run in parallel exactly as in
 * run.c.
 *
 *   llama2c_decode [--model stories260K|random768|PATH] [--new N] [--reps R] [--warmup W]
 *
 * stories260K: $PERL_SHARED_DIR/models/stories260K.bin (default ../shared),
 * llama2.c legacy format (7 int32 header, float32 weights, two unused RoPE
 * tables).  random768: the same layout filled with normal(0, 0.02) in memory
 * (dim 768, hidden 2048, 12 layers, 12 heads, 4 kv heads, vocab 32000,
 * unshared classifier).  tokens_per_s = N / median seconds of decoding N
 * tokens from BOS (N forwards, positions 0..N-1).  Threads: OMP_NUM_THREADS.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
} Config;

typedef struct {
    float *token_embedding_table; /* (vocab_size, dim) */
    float *rms_att_weight;        /* (layer, dim) */
    float *rms_ffn_weight;        /* (layer, dim) */
    float *wq, *wk, *wv, *wo;     /* (layer, dim, n_heads * head_size) etc. */
    float *w1, *w2, *w3;          /* (layer, hidden_dim, dim), (layer, dim, hidden_dim), (layer, hidden_dim, dim) */
    float *rms_final_weight;      /* (dim,) */
    float *wcls;
} TransformerWeights;

typedef struct {
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *att, *logits;
    float *key_cache, *value_cache; /* (layer, seq_len, kv_dim) */
} RunState;

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "llama2c_decode: out of memory\n");
        exit(1);
    }
    return p;
}

static void malloc_run_state(RunState *s, const Config *p) {
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    s->x = xcalloc((size_t)p->dim, sizeof(float));
    s->xb = xcalloc((size_t)p->dim, sizeof(float));
    s->xb2 = xcalloc((size_t)p->dim, sizeof(float));
    s->hb = xcalloc((size_t)p->hidden_dim, sizeof(float));
    s->hb2 = xcalloc((size_t)p->hidden_dim, sizeof(float));
    s->q = xcalloc((size_t)p->dim, sizeof(float));
    s->key_cache = xcalloc((size_t)p->n_layers * p->seq_len * kv_dim, sizeof(float));
    s->value_cache = xcalloc((size_t)p->n_layers * p->seq_len * kv_dim, sizeof(float));
    s->att = xcalloc((size_t)p->n_heads * p->seq_len, sizeof(float));
    s->logits = xcalloc((size_t)p->vocab_size, sizeof(float));
}

static void memory_map_weights(TransformerWeights *w, const Config *p, float *ptr, int shared_weights) {
    int head_size = p->dim / p->n_heads;
    unsigned long long n_layers = (unsigned long long)p->n_layers;
    w->token_embedding_table = ptr;
    ptr += (size_t)p->vocab_size * p->dim;
    w->rms_att_weight = ptr;
    ptr += n_layers * p->dim;
    w->wq = ptr;
    ptr += n_layers * p->dim * (p->n_heads * head_size);
    w->wk = ptr;
    ptr += n_layers * p->dim * (p->n_kv_heads * head_size);
    w->wv = ptr;
    ptr += n_layers * p->dim * (p->n_kv_heads * head_size);
    w->wo = ptr;
    ptr += n_layers * (p->n_heads * head_size) * p->dim;
    w->rms_ffn_weight = ptr;
    ptr += n_layers * p->dim;
    w->w1 = ptr;
    ptr += n_layers * p->dim * p->hidden_dim;
    w->w2 = ptr;
    ptr += n_layers * p->hidden_dim * p->dim;
    w->w3 = ptr;
    ptr += n_layers * p->dim * p->hidden_dim;
    w->rms_final_weight = ptr;
    ptr += p->dim;
    ptr += (size_t)p->seq_len * head_size / 2; /* skip what used to be freq_cis_real (for RoPE) */
    ptr += (size_t)p->seq_len * head_size / 2; /* skip what used to be freq_cis_imag (for RoPE) */
    w->wcls = shared_weights ? w->token_embedding_table : ptr;
}

/* Number of floats after the header (legacy format). */
static size_t n_floats(const Config *p, int shared) {
    size_t hs = (size_t)(p->dim / p->n_heads), L = (size_t)p->n_layers, d = (size_t)p->dim, h = (size_t)p->hidden_dim;
    size_t kv = (size_t)p->n_kv_heads * hs;
    size_t n = (size_t)p->vocab_size * d + L * d * 2 + L * d * d * 2 + L * d * kv * 2 + L * d * h * 3 + d;
    n += (size_t)p->seq_len * hs; /* two RoPE tables of seq_len * hs / 2 */
    if (!shared) n += (size_t)p->vocab_size * d;
    return n;
}

static float *read_checkpoint(const char *path, Config *c, TransformerWeights *w) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "llama2c_decode: cannot open %s\n", path);
        exit(1);
    }
    if (fread(c, sizeof(Config), 1, f) != 1) exit(1);
    int shared = c->vocab_size > 0;
    c->vocab_size = abs(c->vocab_size);
    size_t n = n_floats(c, shared);
    float *data = xcalloc(n, sizeof(float));
    if (fread(data, sizeof(float), n, f) != n) {
        fprintf(stderr, "llama2c_decode: %s is truncated\n", path);
        exit(1);
    }
    fclose(f);
    memory_map_weights(w, c, data, shared);
    return data;
}

static float *random_checkpoint(Config *c, TransformerWeights *w) {
    *c = (Config){768, 2048, 12, 12, 4, 32000, 512};
    size_t n = n_floats(c, 0);
    float *data = xcalloc(n, sizeof(float));
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i += 2) { /* Box-Muller from xorshift64 */
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double u1 = ((s >> 11) + 1.0) / 9007199254740993.0;
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double u2 = (s >> 11) / 9007199254740992.0;
        double r = sqrt(-2.0 * log(u1));
        data[i] = (float)(0.02 * r * cos(6.283185307179586 * u2));
        if (i + 1 < n) data[i + 1] = (float)(0.02 * r * sin(6.283185307179586 * u2));
    }
    memory_map_weights(w, c, data, 0);
    for (int i = 0; i < c->n_layers * c->dim; i++) w->rms_att_weight[i] = w->rms_ffn_weight[i] = 1.0f;
    for (int i = 0; i < c->dim; i++) w->rms_final_weight[i] = 1.0f;
    return data;
}

/* ---- the neural net blocks, as run.c ---------------------------------------- */

static void rmsnorm(float *o, const float *x, const float *weight, int size) {
    float ss = 0.0f;
    for (int j = 0; j < size; j++) ss += x[j] * x[j];
    ss /= size;
    ss += 1e-5f;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

static void softmax(float *x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++)
        if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < size; i++) x[i] /= sum;
}

static void matmul(float *xout, const float *x, const float *w, int n, int d) {
    /* W (d,n) @ x (n,) -> xout (d,) */
    int i;
#ifdef _OPENMP
#pragma omp parallel for private(i)
#endif
    for (i = 0; i < d; i++) {
        float val = 0.0f;
        for (int j = 0; j < n; j++) val += w[(size_t)i * n + j] * x[j];
        xout[i] = val;
    }
}

static float *forward(const Config *p, const TransformerWeights *w, RunState *s, int token, int pos) {
    float *x = s->x;
    int dim = p->dim;
    int kv_dim = (p->dim * p->n_kv_heads) / p->n_heads;
    int kv_mul = p->n_heads / p->n_kv_heads;
    int hidden_dim = p->hidden_dim;
    int head_size = dim / p->n_heads;

    memcpy(x, w->token_embedding_table + (size_t)token * dim, (size_t)dim * sizeof(*x));

    for (unsigned long long l = 0; l < (unsigned long long)p->n_layers; l++) {
        rmsnorm(s->xb, x, w->rms_att_weight + l * dim, dim);

        int loff = (int)(l * p->seq_len * kv_dim);
        s->k = s->key_cache + loff + (size_t)pos * kv_dim;
        s->v = s->value_cache + loff + (size_t)pos * kv_dim;

        matmul(s->q, s->xb, w->wq + l * dim * dim, dim, dim);
        matmul(s->k, s->xb, w->wk + l * dim * kv_dim, dim, kv_dim);
        matmul(s->v, s->xb, w->wv + l * dim * kv_dim, dim, kv_dim);

        /* RoPE relative positional encoding: complex-valued rotate q and k in each head */
        for (int i = 0; i < dim; i += 2) {
            int head_dim = i % head_size;
            float freq = 1.0f / powf(10000.0f, head_dim / (float)head_size);
            float val = pos * freq;
            float fcr = cosf(val);
            float fci = sinf(val);
            int rotn = i < kv_dim ? 2 : 1; /* how many vectors? 2 = q & k, 1 = q only */
            for (int v = 0; v < rotn; v++) {
                float *vec = v == 0 ? s->q : s->k;
                float v0 = vec[i];
                float v1 = vec[i + 1];
                vec[i] = v0 * fcr - v1 * fci;
                vec[i + 1] = v0 * fci + v1 * fcr;
            }
        }

        /* multihead attention; iterate over all heads */
        int h;
#ifdef _OPENMP
#pragma omp parallel for private(h)
#endif
        for (h = 0; h < p->n_heads; h++) {
            float *q = s->q + h * head_size;
            float *att = s->att + h * p->seq_len;
            for (int t = 0; t <= pos; t++) {
                float *k = s->key_cache + loff + (size_t)t * kv_dim + (h / kv_mul) * head_size;
                float score = 0.0f;
                for (int i = 0; i < head_size; i++) score += q[i] * k[i];
                score /= sqrtf((float)head_size);
                att[t] = score;
            }
            softmax(att, pos + 1);
            float *xb = s->xb + h * head_size;
            memset(xb, 0, (size_t)head_size * sizeof(float));
            for (int t = 0; t <= pos; t++) {
                float *v = s->value_cache + loff + (size_t)t * kv_dim + (h / kv_mul) * head_size;
                float a = att[t];
                for (int i = 0; i < head_size; i++) xb[i] += a * v[i];
            }
        }

        matmul(s->xb2, s->xb, w->wo + l * dim * dim, dim, dim);
        for (int i = 0; i < dim; i++) x[i] += s->xb2[i];

        rmsnorm(s->xb, x, w->rms_ffn_weight + l * dim, dim);
        matmul(s->hb, s->xb, w->w1 + l * dim * hidden_dim, dim, hidden_dim);
        matmul(s->hb2, s->xb, w->w3 + l * dim * hidden_dim, dim, hidden_dim);
        for (int i = 0; i < hidden_dim; i++) {
            float val = s->hb[i];
            val *= (1.0f / (1.0f + expf(-val))); /* silu */
            val *= s->hb2[i];
            s->hb[i] = val;
        }
        matmul(s->xb, s->hb, w->w2 + l * dim * hidden_dim, hidden_dim, dim);
        for (int i = 0; i < dim; i++) x[i] += s->xb[i];
    }

    rmsnorm(x, x, w->rms_final_weight, dim);
    matmul(s->logits, x, w->wcls, p->dim, p->vocab_size);
    return s->logits;
}

static int sample_argmax(const float *probabilities, int n) {
    int max_i = 0;
    float max_p = probabilities[0];
    for (int i = 1; i < n; i++)
        if (probabilities[i] > max_p) max_i = i, max_p = probabilities[i];
    return max_i;
}

/* ---- the benchmark ------------------------------------------------------------ */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double loadavg1(void) {
    double l = -1.0;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = -1.0;
        fclose(f);
    }
    return l;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int decode(const Config *c, const TransformerWeights *w, RunState *s, int n_new, int *out) {
    int token = 1; /* BOS */
    for (int pos = 0; pos < n_new; pos++) {
        float *logits = forward(c, w, s, token, pos);
        token = sample_argmax(logits, c->vocab_size);
        out[pos] = token;
    }
    return n_new;
}

int main(int argc, char **argv) {
    const char *model = "stories260K";
    int n_new = 256, reps = 5, warmup = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) model = argv[i + 1];
        else if (!strcmp(argv[i], "--new")) n_new = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
        else argc = -1;
    }
    if (argc < 0 || argc % 2 == 0 || n_new < 1 || reps < 1 || reps > 1000) {
        fprintf(stderr, "usage: llama2c_decode [--model stories260K|random768|PATH] [--new N] [--reps R]\n");
        return 2;
    }
    Config c;
    TransformerWeights w;
    float *data;
    char path[1024];
    if (!strcmp(model, "random768")) {
        data = random_checkpoint(&c, &w);
    } else {
        const char *shared = getenv("PERL_SHARED_DIR");
        if (!strcmp(model, "stories260K"))
            snprintf(path, sizeof path, "%s/models/stories260K.bin", shared && *shared ? shared : "../shared");
        else snprintf(path, sizeof path, "%s", model);
        data = read_checkpoint(path, &c, &w);
    }
    if (n_new > c.seq_len) n_new = c.seq_len;
    RunState s;
    malloc_run_state(&s, &c);
    int *out = xcalloc((size_t)n_new, sizeof(int));
    double *times = xcalloc((size_t)reps, sizeof(double)), *cpus = xcalloc((size_t)reps, sizeof(double));
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    double load0 = loadavg1();
    for (int i = 0; i < warmup; i++) decode(&c, &w, &s, n_new, out);
    for (int i = 0; i < reps; i++) {
        double t0 = now_s(), c0 = cpu_s();
        decode(&c, &w, &s, n_new, out);
        times[i] = now_s() - t0, cpus[i] = cpu_s() - c0;
    }
    qsort(times, (size_t)reps, sizeof *times, cmp_double);
    double med = reps % 2 ? times[reps / 2] : 0.5 * (times[reps / 2 - 1] + times[reps / 2]);
    qsort(cpus, (size_t)reps, sizeof *cpus, cmp_double);
    double cpu_med = reps % 2 ? cpus[reps / 2] : 0.5 * (cpus[reps / 2 - 1] + cpus[reps / 2]);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    char first[256];
    size_t off = 0;
    first[0] = 0;
    for (int t = 0; t < n_new && t < 16; t++) off += (size_t)snprintf(first + off, sizeof first - off, "%s%d", t ? "," : "", out[t]);
    printf("{\"bench\": \"generate\", \"impl\": \"llama2c\", \"openmp\": %d, \"model\": \"%s\", \"batch\": 1, "
           "\"new_tokens\": %d, \"threads\": %d, \"reps\": %d, \"precision\": \"fp32\", \"median_s\": %.5f, "
           "\"min_s\": %.5f, \"tokens_per_s\": %.1f, \"per_stream_tokens_per_s\": %.1f, \"median_cpu_s\": %.5f, "
           "\"tokens_per_cpu_s\": %.1f, \"peak_rss_mb\": %.1f, "
           "\"loadavg_start\": %.2f, \"loadavg_end\": %.2f, \"first_tokens\": [%s]}\n",
#ifdef _OPENMP
           1,
#else
           0,
#endif
           model, n_new, threads, reps, med, times[0], n_new / med, n_new / med, cpu_med, n_new / cpu_med, ru.ru_maxrss / 1024.0, load0,
           loadavg1(), first);
    free(out), free(times), free(cpus), free(data);
    free(s.x), free(s.xb), free(s.xb2), free(s.hb), free(s.hb2), free(s.q), free(s.key_cache), free(s.value_cache);
    free(s.att), free(s.logits);
    return 0;
}
