/*
 * Generation throughput of perl_generate (issue 5/9): greedy decode from BOS,
 * batch 1 (single stream) and batch B (every row the same BOS prompt, so every
 * row runs all max_new_tokens steps), on the real stories260K checkpoint or the
 * random 768-dim base.  Prints one JSON object per configuration.
 *
 *   generate [--model stories260K|random768|PATH] [--batch B] [--new N]
 *            [--threads T] [--reps R] [--warmup W]
 *
 * stories260K resolves to $PERL_SHARED_DIR/models/stories260K.bin
 * (PERL_SHARED_DIR defaults to ../shared).  tokens_per_s is the aggregate
 * (batch * new tokens / median seconds of one perl_generate call, prefill of
 * the one-token prompt included); per_stream_tokens_per_s divides by batch.
 */
#define _POSIX_C_SOURCE 200809L

#include <libperl/libperl.h>

#define BENCH_NAME "generate"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static perl_model *load(const char *name, char *path, size_t cap) {
    perl_model *m;
    if (!strcmp(name, "random768")) {
        perl_model_config c;
        perl_model_config_init(&c);
        c.dim = 768, c.hidden_dim = 2048, c.n_layers = 12, c.n_heads = 12, c.n_kv_heads = 4;
        c.vocab_size = 32000, c.max_seq_len = 512, c.tied_embeddings = 0;
        BENCH_TRY("create random model", perl_model_create_random(&m, &c, 1));
        snprintf(path, cap, "random768");
        return m;
    }
    if (!strcmp(name, "stories260K")) {
        const char *shared = getenv("PERL_SHARED_DIR");
        snprintf(path, cap, "%s/models/stories260K.bin", shared && *shared ? shared : "../shared");
    } else {
        snprintf(path, cap, "%s", name);
    }
    BENCH_TRY(path, perl_model_load(&m, path));
    return m;
}

int main(int argc, char **argv) {
    const char *model_name = "stories260K";
    int batch = 1, n_new = 256, threads = 1, reps = 5, warmup = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--model")) model_name = v;
        else if (!strcmp(k, "--batch")) batch = atoi(v);
        else if (!strcmp(k, "--new")) n_new = atoi(v);
        else if (!strcmp(k, "--threads")) threads = atoi(v);
        else if (!strcmp(k, "--reps")) reps = atoi(v);
        else if (!strcmp(k, "--warmup")) warmup = atoi(v);
        else argc = -1;
    }
    if (argc < 0 || argc % 2 == 0 || batch < 1 || n_new < 1 || threads < 1 || reps < 1 || reps > 1000) {
        fprintf(stderr, "usage: generate [--model stories260K|random768|PATH] [--batch B] [--new N]"
                        " [--threads T] [--reps R] [--warmup W]\n");
        return 2;
    }
    BENCH_TRY("set threads", perl_set_num_threads(threads));
    char path[1024];
    perl_model *m = load(model_name, path, sizeof path);

    int32_t *prompt = malloc((size_t)batch * sizeof *prompt);
    int32_t *out = malloc((size_t)batch * n_new * sizeof *out);
    int32_t *lens = malloc((size_t)batch * sizeof *lens);
    double *times = malloc((size_t)reps * sizeof *times), *cpus = malloc((size_t)reps * sizeof *cpus);
    if (!prompt || !out || !lens || !times || !cpus) return 1;
    for (int b = 0; b < batch; b++) prompt[b] = 1; /* BOS */
    perl_batch p;
    perl_batch_init(&p);
    p.batch_size = batch, p.seq_len = 1, p.tokens = prompt;
    perl_generate_options g;
    perl_generate_options_init(&g);
    g.max_new_tokens = n_new, g.temperature = 0.0f; /* greedy, no stop tokens: every row runs n_new steps */

    double load0 = loadavg1();
    for (int i = 0; i < warmup; i++) BENCH_TRY("generate", perl_generate(m, NULL, &p, &g, out, lens, NULL));
    for (int i = 0; i < reps; i++) {
        double t0 = now_s(), c0 = cpu_s();
        BENCH_TRY("generate", perl_generate(m, NULL, &p, &g, out, lens, NULL));
        times[i] = now_s() - t0, cpus[i] = cpu_s() - c0;
    }
    double tmin = times[0];
    for (int i = 1; i < reps; i++) tmin = times[i] < tmin ? times[i] : tmin;
    double med = median(times, reps), cpu_med = median(cpus, reps);
    long generated = 0;
    for (int b = 0; b < batch; b++) generated += lens[b];
    /* first tokens of row 0, to check against the llama2.c-style baseline */
    char first[256];
    size_t off = 0;
    first[0] = 0;
    for (int t = 0; t < n_new && t < 16; t++)
        off += (size_t)snprintf(first + off, sizeof first - off, "%s%d", t ? "," : "", out[t]);
    printf("{\"bench\": \"generate\", \"impl\": \"libperl\", \"model\": \"%s\", \"batch\": %d, \"new_tokens\": %d, "
           "\"threads\": %d, \"reps\": %d, \"precision\": \"fp32\", \"median_s\": %.5f, \"min_s\": %.5f, "
           "\"tokens_per_s\": %.1f, \"per_stream_tokens_per_s\": %.1f, \"generated\": %ld, \"median_cpu_s\": %.5f, "
           "\"tokens_per_cpu_s\": %.1f, "
           "\"peak_rss_mb\": %.1f, \"loadavg_start\": %.2f, \"loadavg_end\": %.2f, \"first_tokens\": [%s]}\n",
           model_name, batch, n_new, threads, reps, med, tmin, (double)batch * n_new / med, (double)n_new / med,
           generated, cpu_med, (double)batch * n_new / cpu_med, peak_rss_mb(), load0, loadavg1(), first);
    free(prompt), free(out), free(lens), free(times), free(cpus);
    perl_model_free(m);
    return 0;
}
