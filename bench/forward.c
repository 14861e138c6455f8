/*
 * Forward throughput of perl_model_forward: logits for every position, or the
 * final hidden states only (logits = NULL).  One configuration per process,
 * so the peak RSS it prints (getrusage ru_maxrss) belongs to that
 * configuration alone.  Prints one JSON object per line on stdout.
 *
 *   forward [--model stories260K|random768] [--path FILE] [--batch B] [--seq T]
 *           [--threads N] [--output logits|hidden] [--warmup W] [--reps R]
 *
 * stories260K is read from $PERL_SHARED_DIR/models/stories260K.bin (default
 * ../shared).  random768 is a random Llama (dim 768, 12 layers, 12 heads,
 * 4 kv heads, hidden 2048, vocab 32000, untied lm_head).  Tokens are uniform
 * random ids from a fixed seed; every row is full length.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE

#include <libperl/libperl.h>

#define BENCH_NAME "forward"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static void usage(void) {
    fprintf(stderr, "usage: forward [--model stories260K|random768] [--path FILE] [--batch B] [--seq T]\n"
                    "               [--threads N] [--output logits|hidden] [--warmup W] [--reps R]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *model_name = "stories260K", *path = NULL, *output = "logits";
    int batch_size = 0, seq_len = 256, threads = 1, warmup = 2, reps = 7;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        if (!strcmp(a, "--model")) model_name = argv[++i];
        else if (!strcmp(a, "--path")) path = argv[++i];
        else if (!strcmp(a, "--batch")) batch_size = atoi(argv[++i]);
        else if (!strcmp(a, "--seq")) seq_len = atoi(argv[++i]);
        else if (!strcmp(a, "--threads")) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--output")) output = argv[++i];
        else if (!strcmp(a, "--warmup")) warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--reps")) reps = atoi(argv[++i]);
        else usage();
    }
    int want_logits = !strcmp(output, "logits");
    if (!want_logits && strcmp(output, "hidden")) usage();
    if (reps < 1 || warmup < 0 || seq_len < 1) usage();

    double rss_start = current_rss_mb();
    int rc = perl_set_num_threads(threads);
    if (rc) bench_die("perl_set_num_threads", rc);

    perl_model *model = NULL;
    char default_path[4096];
    if (!strcmp(model_name, "stories260K")) {
        if (!path) {
            const char *dir = getenv("PERL_SHARED_DIR");
            snprintf(default_path, sizeof default_path, "%s/models/stories260K.bin", dir && *dir ? dir : "../shared");
            path = default_path;
        }
        if ((rc = perl_model_load(&model, path))) bench_die("perl_model_load", rc);
        if (!batch_size) batch_size = 8;
    } else if (!strcmp(model_name, "random768")) {
        perl_model_config cfg;
        perl_model_config_init(&cfg);
        cfg.dim = 768;
        cfg.hidden_dim = 2048;
        cfg.n_layers = 12;
        cfg.n_heads = 12;
        cfg.n_kv_heads = 4;
        cfg.vocab_size = 32000;
        cfg.max_seq_len = seq_len > 256 ? seq_len : 256;
        cfg.tied_embeddings = 0;
        if ((rc = perl_model_create_random(&model, &cfg, 1234))) bench_die("perl_model_create_random", rc);
        if (!batch_size) batch_size = 4;
    } else {
        usage();
    }
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    if ((rc = perl_model_get_config(model, &cfg))) bench_die("perl_model_get_config", rc);
    if (seq_len > cfg.max_seq_len) {
        fprintf(stderr, "forward: seq %d exceeds the model context %d\n", seq_len, cfg.max_seq_len);
        return 2;
    }
    int head_dim = cfg.head_dim ? cfg.head_dim : cfg.dim / cfg.n_heads;

    size_t n_tok = (size_t)batch_size * seq_len;
    int32_t *tokens = malloc(n_tok * sizeof *tokens);
    float *logits = want_logits ? malloc(n_tok * (size_t)cfg.vocab_size * sizeof(float)) : NULL;
    float *hidden = want_logits ? NULL : malloc(n_tok * (size_t)cfg.dim * sizeof(float));
    if (!tokens || (want_logits && !logits) || (!want_logits && !hidden)) {
        fprintf(stderr, "forward: out of memory\n");
        return 1;
    }
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n_tok; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17; /* xorshift64 */
        tokens[i] = (int32_t)(s % (uint64_t)cfg.vocab_size);
    }
    perl_batch batch;
    perl_batch_init(&batch);
    batch.batch_size = batch_size;
    batch.seq_len = seq_len;
    batch.tokens = tokens;
    batch.lengths = NULL;

    double *times = malloc((size_t)reps * sizeof *times);
    double load_before = loadavg1(), cpu_timed = 0.0, wall_timed = 0.0, busy_timed = 0.0;
    for (int i = 0; i < warmup + reps; i++) {
        double b0 = machine_busy_s(), c0 = cpu_s(), t0 = now_s();
        if ((rc = perl_model_forward(model, NULL, &batch, logits, hidden))) bench_die("perl_model_forward", rc);
        double t1 = now_s(), c1 = cpu_s(), b1 = machine_busy_s();
        if (i >= warmup) {
            times[i - warmup] = t1 - t0;
            cpu_timed += c1 - c0;
            wall_timed += t1 - t0;
            busy_timed += b1 - b0;
        }
    }
    /* cores used by other processes while this one was timed: the machine is shared */
    double other_cpu = (busy_timed - cpu_timed) / wall_timed;
    if (other_cpu < 0.0) other_cpu = 0.0;
    double checksum = 0.0;
    const float *out = want_logits ? logits : hidden;
    size_t out_n = n_tok * (size_t)(want_logits ? cfg.vocab_size : cfg.dim);
    for (size_t i = 0; i < out_n; i += 997) checksum += out[i];
    double min_s = times[0], mean_s = 0.0;
    for (int i = 0; i < reps; i++) {
        if (times[i] < min_s) min_s = times[i];
        mean_s += times[i] / reps;
    }
    double med = median(times, reps);

    /* Model FLOPs of one forward: 2 * tokens * (projection weights) + causal attention + LM head. */
    double N = (double)n_tok, D = (double)cfg.dim, Hd = (double)cfg.hidden_dim;
    double qd = (double)cfg.n_heads * head_dim, kvd = (double)cfg.n_kv_heads * head_dim;
    double per_layer = 2.0 * N * (D * qd + 2.0 * D * kvd + qd * D + 3.0 * D * Hd);
    double attn = 4.0 * head_dim * cfg.n_heads * (double)batch_size * seq_len * (seq_len + 1.0) / 2.0;
    double flops = cfg.n_layers * (per_layer + attn) + (want_logits ? 2.0 * N * D * cfg.vocab_size : 0.0);

    printf("{\"bench\": \"forward\", \"impl\": \"libperl\", \"name\": \"forward_%s\", \"model\": \"%s\", "
           "\"output\": \"%s\", \"batch\": %d, \"seq_len\": %d, \"threads\": %d, "
           "\"shape\": {\"dim\": %d, \"hidden_dim\": %d, \"n_layers\": %d, \"n_heads\": %d, \"n_kv_heads\": %d, "
           "\"vocab_size\": %d, \"params\": %zu}, "
           "\"warmup\": %d, \"reps\": %d, \"median_s\": %.6f, \"min_s\": %.6f, \"mean_s\": %.6f, "
           "\"tokens_per_s\": %.1f, \"flops\": %.4e, \"gflops_per_s\": %.2f, "
           "\"peak_rss_mb\": %.1f, \"start_rss_mb\": %.1f, \"cpu_util\": %.3f, \"other_cpu\": %.3f, \"online_cpus\": %ld, "
           "\"loadavg_before\": %.2f, \"checksum\": %.6g, "
           "\"config\": {\"api\": \"perl_model_forward(model, NULL, batch, %s, %s)\", \"dtype\": \"f32\", "
           "\"lengths\": \"all full\", \"tied_embeddings\": %d, \"version\": \"%s\"}}\n",
           output, model_name, output, batch_size, seq_len, threads, cfg.dim, cfg.hidden_dim, cfg.n_layers,
           cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, perl_model_num_params(model), warmup, reps, med, min_s,
           mean_s, N / med, flops, flops / med * 1e-9, peak_rss_mb(), rss_start, cpu_timed / (wall_timed * threads),
           other_cpu, sysconf(_SC_NPROCESSORS_ONLN), load_before, checksum,
           want_logits ? "logits" : "NULL", want_logits ? "NULL" : "hidden", cfg.tied_embeddings, perl_version());
    fflush(stdout);
    free(times);
    free(tokens);
    free(logits);
    free(hidden);
    perl_model_free(model);
    return 0;
}
