/*
 * The PERL paper's comparison, LoRA against full fine-tuning on one base:
 *   --task rm: one pairwise reward-model training step (perl_reward_step_pairwise);
 *   --task rl: one RL loop step = perl_generate (policy) + perl_reward_score
 *              (reward model) + perl_policy_step (policy gradient, KL to the
 *              anchor).
 * LoRA: one frozen base shared by the policy, the anchor (adapter off) and
 * the reward model (r = 8 on q,k,v,o).  Full: the policy and the reward model
 * are private trainable copies of every weight (LIBPERL_MODE_FULL), and the
 * base stays loaded as the reference copy, which is what full-tuning RLHF
 * holds.  One configuration per process (peak RSS is per process); prints one
 * JSON object.
 *
 *   perl_comparison --task rm|rl --mode lora|full [--base random768|random288|PATH]
 *                   [--batch B] [--seq T] [--prompt P] [--response R]
 *                   [--steps S] [--warmup W] [--threads N] [--recompute 0|1]
 */
#define _POSIX_C_SOURCE 200809L

#include <libperl/libperl.h>

#define BENCH_NAME "perl_comparison"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct settings {
    const char *task, *mode, *base;
    int batch, seq, prompt, response, steps, warmup, threads;
    int recompute; /* perl_lora_set_recompute on the trained adapters: activations per layer, recomputed */
} settings;

static perl_model *load_base(const char *base) {
    perl_model *m;
    if (strncmp(base, "random", 6) != 0) {
        BENCH_TRY(base, perl_model_load(&m, base));
        return m;
    }
    perl_model_config c;
    perl_model_config_init(&c);
    int medium = strcmp(base, "random768") == 0;
    c.dim = medium ? 768 : 288, c.hidden_dim = medium ? 2048 : 768, c.n_layers = medium ? 12 : 6;
    c.n_heads = medium ? 12 : 6, c.n_kv_heads = medium ? 4 : 6, c.vocab_size = 32000, c.max_seq_len = 512;
    c.tied_embeddings = 0;
    BENCH_TRY("create random model", perl_model_create_random(&m, &c, 1));
    return m;
}

static perl_lora *make_adapter(perl_model *m, const char *mode, uint64_t seed, int recompute) {
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.seed = seed;
    if (strcmp(mode, "full") == 0) o.mode = LIBPERL_MODE_FULL;
    perl_lora *lora;
    BENCH_TRY("create adapter", perl_lora_create(&lora, m, &o));
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = 1e-5f;
    BENCH_TRY("set optimizer", perl_lora_set_optimizer(lora, &opt));
    BENCH_TRY("set recompute", perl_lora_set_recompute(lora, recompute));
    return lora;
}

static void fill_tokens(int32_t *t, size_t n, int vocab, uint64_t seed) {
    for (size_t i = 0; i < n; i++) t[i] = 3 + (int32_t)((i * 2654435761u + seed * 97u) % (uint64_t)(vocab - 3));
}

/* One pairwise step on `batch` pairs of length seq; returns seconds. */
static double rm_step(perl_reward *rm, perl_batch *chosen, perl_batch *rejected) {
    perl_reward_stats st;
    perl_reward_stats_init(&st);
    double t0 = now_s();
    BENCH_TRY("reward step", perl_reward_step_pairwise(rm, chosen, rejected, NULL, NULL, NULL, &st));
    return now_s() - t0;
}

static void run_rm(const settings *s, perl_model *m, double *times, int *n_tokens) {
    perl_lora *lora = make_adapter(m, s->mode, 7, s->recompute);
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    perl_reward *rm;
    BENCH_TRY("create reward model", perl_reward_create(&rm, m, lora, &ro));
    perl_model_config c;
    perl_model_config_init(&c);
    perl_model_get_config(m, &c);
    size_t n = (size_t)s->batch * s->seq;
    int32_t *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    fill_tokens(a, n, c.vocab_size, 1);
    fill_tokens(b, n, c.vocab_size, 2);
    perl_batch chosen, rejected;
    perl_batch_init(&chosen);
    chosen.batch_size = s->batch, chosen.seq_len = s->seq, chosen.tokens = a;
    rejected = chosen;
    rejected.tokens = b;
    for (int i = 0; i < s->warmup; i++) rm_step(rm, &chosen, &rejected);
    for (int i = 0; i < s->steps; i++) times[i] = rm_step(rm, &chosen, &rejected);
    *n_tokens = 2 * s->batch * s->seq;
    perl_reward_free(rm);
    perl_lora_free(lora);
    free(a);
    free(b);
}

typedef struct rl_state {
    perl_model *m;
    perl_lora *policy, *rm_lora;
    perl_reward *rm;
    perl_policy_trainer *trainer;
    int32_t *prompts, *responses, *resp_lens, *scored;
    float *logprobs, *rewards;
    int vocab;
} rl_state;

/* The three phases of an RL step, in seconds (to say where the time goes). */
typedef struct rl_phases {
    double generate, score, train;
} rl_phases;

/* generate + score + train; returns seconds and fills *ph. */
static double rl_step(const settings *s, rl_state *st, uint64_t seed, rl_phases *ph) {
    double t0 = now_s();
    perl_batch prompts;
    perl_batch_init(&prompts);
    prompts.batch_size = s->batch, prompts.seq_len = s->prompt, prompts.tokens = st->prompts;
    perl_generate_options g;
    perl_generate_options_init(&g);
    g.max_new_tokens = s->response, g.seed = seed;
    BENCH_TRY("generate", perl_generate(st->m, st->policy, &prompts, &g, st->responses, st->resp_lens, st->logprobs));
    double t1 = now_s();
    int total = s->prompt + s->response;
    int32_t *lengths = malloc((size_t)s->batch * sizeof *lengths);
    for (int b = 0; b < s->batch; b++) {
        int32_t *row = st->scored + (size_t)b * total;
        memcpy(row, st->prompts + (size_t)b * s->prompt, (size_t)s->prompt * sizeof *row);
        for (int t = 0; t < s->response; t++) {
            int32_t tok = st->responses[(size_t)b * s->response + t];
            row[s->prompt + t] = tok < 0 ? 0 : tok;
        }
        lengths[b] = s->prompt + st->resp_lens[b];
    }
    perl_batch scored;
    perl_batch_init(&scored);
    scored.batch_size = s->batch, scored.seq_len = total, scored.tokens = st->scored, scored.lengths = lengths;
    BENCH_TRY("score", perl_reward_score(st->rm, &scored, st->rewards));
    double t2 = now_s();
    perl_policy_stats ps;
    perl_policy_stats_init(&ps);
    BENCH_TRY("policy step", perl_policy_step(st->trainer, &prompts, st->responses, st->resp_lens, s->response, st->rewards,
                                        st->logprobs, &ps));
    free(lengths);
    double t3 = now_s();
    *ph = (rl_phases){t1 - t0, t2 - t1, t3 - t2};
    return t3 - t0;
}

static void run_rl(const settings *s, perl_model *m, double *times, int *n_tokens, rl_phases *median_phases) {
    rl_state st = {.m = m};
    st.policy = make_adapter(m, s->mode, 11, s->recompute);
    st.rm_lora = make_adapter(m, s->mode, 12, s->recompute);
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    BENCH_TRY("create reward model", perl_reward_create(&st.rm, m, st.rm_lora, &ro));
    perl_policy_options po;
    perl_policy_options_init(&po);
    BENCH_TRY("create policy trainer", perl_policy_create(&st.trainer, m, st.policy, NULL, &po));
    perl_model_config c;
    perl_model_config_init(&c);
    perl_model_get_config(m, &c);
    size_t B = (size_t)s->batch;
    st.prompts = malloc(B * s->prompt * sizeof(int32_t));
    st.responses = malloc(B * s->response * sizeof(int32_t));
    st.resp_lens = malloc(B * sizeof(int32_t));
    st.scored = malloc(B * (s->prompt + s->response) * sizeof(int32_t));
    st.logprobs = malloc(B * s->response * sizeof(float));
    st.rewards = malloc(B * sizeof(float));
    fill_tokens(st.prompts, B * s->prompt, c.vocab_size, 3);
    rl_phases ph;
    double *gen = malloc((size_t)s->steps * sizeof *gen), *score = malloc((size_t)s->steps * sizeof *score);
    double *train = malloc((size_t)s->steps * sizeof *train);
    for (int i = 0; i < s->warmup; i++) rl_step(s, &st, (uint64_t)i, &ph);
    for (int i = 0; i < s->steps; i++) {
        times[i] = rl_step(s, &st, (uint64_t)(100 + i), &ph);
        gen[i] = ph.generate, score[i] = ph.score, train[i] = ph.train;
    }
    *median_phases = (rl_phases){median(gen, s->steps), median(score, s->steps), median(train, s->steps)};
    free(gen), free(score), free(train);
    *n_tokens = s->batch * (s->prompt + s->response);
    perl_policy_free(st.trainer);
    perl_reward_free(st.rm);
    perl_lora_free(st.rm_lora);
    perl_lora_free(st.policy);
    free(st.prompts), free(st.responses), free(st.resp_lens), free(st.scored), free(st.logprobs), free(st.rewards);
}

static int parse(settings *s, int argc, char **argv) {
    *s = (settings){"rm", "lora", "random768", 4, 256, 64, 64, 5, 1, 1, 0};
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--task")) s->task = v;
        else if (!strcmp(k, "--mode")) s->mode = v;
        else if (!strcmp(k, "--base")) s->base = v;
        else if (!strcmp(k, "--batch")) s->batch = atoi(v);
        else if (!strcmp(k, "--seq")) s->seq = atoi(v);
        else if (!strcmp(k, "--prompt")) s->prompt = atoi(v);
        else if (!strcmp(k, "--response")) s->response = atoi(v);
        else if (!strcmp(k, "--steps")) s->steps = atoi(v);
        else if (!strcmp(k, "--warmup")) s->warmup = atoi(v);
        else if (!strcmp(k, "--threads")) s->threads = atoi(v);
        else if (!strcmp(k, "--recompute")) s->recompute = atoi(v);
        else return -1;
    }
    if (argc % 2 == 0 || s->steps < 1 || s->steps > 1000 || s->batch < 1) return -1;
    if (strcmp(s->task, "rm") && strcmp(s->task, "rl")) return -1;
    if (strcmp(s->mode, "lora") && strcmp(s->mode, "full")) return -1;
    return 0;
}

int main(int argc, char **argv) {
    settings s;
    if (parse(&s, argc, argv) != 0) {
        fprintf(stderr, "usage: perl_comparison --task rm|rl --mode lora|full [--base random768|random288|PATH]\n"
                        "       [--batch B] [--seq T] [--prompt P] [--response R] [--steps S] [--warmup W]"
                        " [--threads N] [--recompute 0|1]\n");
        return 2;
    }
    BENCH_TRY("set threads", perl_set_num_threads(s.threads));
    perl_model *m = load_base(s.base);
    double *times = malloc((size_t)s.steps * sizeof *times);
    int n_tokens = 0;
    rl_phases ph = {0, 0, 0};
    if (!strcmp(s.task, "rm")) run_rm(&s, m, times, &n_tokens);
    else run_rl(&s, m, times, &n_tokens, &ph);
    double med = median(times, s.steps);
    printf("{\"bench\": \"perl_comparison\", \"task\": \"%s\", \"mode\": \"%s\", \"base\": \"%s\", "
           "\"batch\": %d, \"seq\": %d, \"prompt\": %d, \"response\": %d, \"threads\": %d, \"steps\": %d, "
           "\"recompute\": %d, "
           "\"precision\": \"fp32\", \"median_s\": %.4f, \"tokens_per_s\": %.1f, \"peak_rss_mb\": %.1f",
           s.task, s.mode, s.base, s.batch, s.seq, s.prompt, s.response, s.threads, s.steps, s.recompute, med,
           n_tokens / med,
           peak_rss_mb());
    if (!strcmp(s.task, "rl")) /* medians of each phase over the timed steps */
        printf(", \"generate_s\": %.4f, \"score_s\": %.4f, \"train_s\": %.4f", ph.generate, ph.score, ph.train);
    printf("}\n");
    free(times);
    perl_model_free(m);
    return 0;
}
