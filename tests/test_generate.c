/*
 * perl_generate against full recomputation: greedy decoding with the KV cache
 * must pick the argmax of perl_model_forward's logits over prompt + tokens so
 * far, token for token, on a ragged batch; sampled log-probabilities must be
 * those of the (filtered, renormalised, tempered) distribution recomputed
 * here from the same logits.  Plus determinism, stop tokens, padding and bad
 * input.  Models: a random HF-style GQA model (base, LoRA, FULL) and
 * stories260K ($PERL_SHARED_DIR/models/stories260K.bin; skipped if absent).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"
#include "test_util.h"

#define LOGP_TOL 1e-4  /* |generated log-prob - recomputed|: float32 logits, different matmul shapes */
#define TIE_TOL 1e-5f  /* an argmax "disagreement" within this logit margin is a float tie, not a bug */

/* ---- models and batches ------------------------------------------------------- */

static perl_model *random_model(int tied, int bias, uint64_t seed) {
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = 32, cfg.hidden_dim = 48, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2;
    cfg.vocab_size = 41, cfg.max_seq_len = 24, cfg.tied_embeddings = tied, cfg.qkv_bias = bias;
    perl_model *m = NULL;
    ck_assert_int_eq(perl_model_create_random(&m, &cfg, seed), LIBPERL_OK);
    /* sharpen the output distribution so greedy decoding is not a coin toss between near-ties */
    size_t n = (size_t)cfg.vocab_size * cfg.dim;
    for (size_t i = 0; i < n; i++) m->w.lm_head[i] *= 20.0f;
    return m;
}

/* An adapter whose every parameter is perturbed, so it really changes the model. */
static perl_lora *perturbed_adapter(perl_model *m, int mode, float size) {
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.mode = mode, o.rank = 4, o.target_modules = LIBPERL_TARGET_ALL, o.seed = 11;
    perl_lora *lora = NULL;
    ck_assert_int_eq(perl_lora_create(&lora, m, &o), LIBPERL_OK);
    float *P;
    size_t n;
    perl_lora_params(lora, &P, NULL, &n);
    for (size_t i = 0; i < n; i++) P[i] += size * perl_rand_normal(5, 6, i);
    return lora;
}

#define ROWS 3
#define PROMPT_LEN 7
typedef struct prompts {
    int32_t tokens[ROWS * PROMPT_LEN];
    int32_t lengths[ROWS];
    perl_batch batch;
} prompts;

/* Three ragged prompts (5, 2, 7 tokens), padding 0, first token bos. */
static void make_prompts(prompts *p, int vocab, int bos) {
    static const int lengths[ROWS] = {5, 2, 7};
    for (int b = 0; b < ROWS; b++) {
        p->lengths[b] = lengths[b];
        for (int t = 0; t < PROMPT_LEN; t++)
            p->tokens[b * PROMPT_LEN + t] = t == 0 ? bos : t < lengths[b] ? 3 + (b * 11 + t * 7) % (vocab - 3) : 0;
    }
    perl_batch_init(&p->batch);
    p->batch.batch_size = ROWS, p->batch.seq_len = PROMPT_LEN, p->batch.tokens = p->tokens;
    p->batch.lengths = p->lengths;
}

/* Full recomputation: logits [ROWS, seq, V] of prompt + generated tokens, seq = PROMPT_LEN + T. */
static float *recompute(const perl_model *m, const perl_lora *lora, const prompts *p, const int32_t *gen,
                        const int32_t *gen_len, int T) {
    int V = m->cfg.vocab_size, seq = PROMPT_LEN + T;
    int32_t *tokens = calloc((size_t)ROWS * seq, sizeof *tokens), lengths[ROWS];
    for (int b = 0; b < ROWS; b++) {
        memcpy(tokens + b * seq, p->tokens + b * PROMPT_LEN, (size_t)p->lengths[b] * sizeof *tokens);
        memcpy(tokens + b * seq + p->lengths[b], gen + b * T, (size_t)gen_len[b] * sizeof *tokens);
        lengths[b] = p->lengths[b] + gen_len[b];
    }
    perl_batch batch;
    perl_batch_init(&batch);
    batch.batch_size = ROWS, batch.seq_len = seq, batch.tokens = tokens, batch.lengths = lengths;
    float *logits = malloc((size_t)ROWS * seq * V * sizeof *logits);
    ck_assert_msg(perl_model_forward(m, lora, &batch, logits, NULL) == LIBPERL_OK, "%s", perl_last_error());
    free(tokens);
    return logits;
}

/* Logits that predict generated token s of row b. */
static const float *logits_for(const float *logits, const prompts *p, int V, int T, int b, int s) {
    return logits + ((size_t)b * (PROMPT_LEN + T) + p->lengths[b] - 1 + s) * V;
}

static double log_softmax_at(const float *z, int V, int id, double T) {
    double m = -INFINITY, sum = 0.0;
    for (int j = 0; j < V; j++) m = fmax(m, z[j] / T);
    for (int j = 0; j < V; j++) sum += exp(z[j] / T - m);
    return z[id] / T - m - log(sum);
}

/* ---- greedy == argmax of full recomputation ------------------------------------------------ */

static void check_greedy(const perl_model *m, const perl_lora *lora, int T, const char *what) {
    prompts p;
    make_prompts(&p, m->cfg.vocab_size, m->cfg.bos_token_id);
    perl_generate_options o;
    perl_generate_options_init(&o);
    o.max_new_tokens = T, o.temperature = 0.0f;
    int32_t *gen = malloc((size_t)ROWS * T * sizeof *gen), len[ROWS];
    float *lp = malloc((size_t)ROWS * T * sizeof *lp);
    ck_assert_msg(perl_generate(m, lora, &p.batch, &o, gen, len, lp) == LIBPERL_OK, "%s", perl_last_error());
    float *logits = recompute(m, lora, &p, gen, len, T);
    int V = m->cfg.vocab_size, ties = 0;
    double worst_lp = 0.0, scale = 0.0;
    for (int b = 0; b < ROWS; b++) {
        ck_assert_int_eq(len[b], T);
        for (int s = 0; s < T; s++) {
            const float *z = logits_for(logits, &p, V, T, b, s);
            int best = 0;
            for (int j = 1; j < V; j++)
                if (z[j] > z[best]) best = j;
            int32_t got = gen[b * T + s];
            if (got != best) { /* only a float tie may disagree */
                ck_assert_msg(z[best] - z[got] < TIE_TOL,
                              "%s: row %d step %d: greedy %d, recomputed argmax %d (%g vs %g)", what, b, s, got,
                              best, (double)z[got], (double)z[best]);
                ties++;
            }
            worst_lp = fmax(worst_lp, fabs(lp[b * T + s] - log_softmax_at(z, V, got, 1.0)));
            for (int j = 0; j < V; j++) scale = fmax(scale, fabs(z[j]));
        }
    }
    printf("generate greedy %s: %d rows x %d tokens match recomputation (%d float ties), worst log-prob diff %.2e"
           " (max |logit| %.1f)\n", what, ROWS, T, ties, worst_lp, scale);
    fflush(stdout);
    ck_assert_msg(worst_lp < LOGP_TOL, "%s: greedy log-probs differ by %g", what, worst_lp);
    free(gen);
    free(lp);
    free(logits);
}

START_TEST(greedy_random_model) {
    perl_model *m = random_model(0, 1, 3);
    check_greedy(m, NULL, 12, "random base");
    perl_lora *lora = perturbed_adapter(m, LIBPERL_MODE_LORA, 0.2f);
    check_greedy(m, lora, 12, "random LoRA");
    perl_lora *full = perturbed_adapter(m, LIBPERL_MODE_FULL, 0.02f);
    check_greedy(m, full, 12, "random FULL");
    perl_lora_free(lora);
    perl_lora_free(full);
    perl_model_free(m);
}
END_TEST

static perl_model *load_stories(void) {
    char path[1024];
    test_shared_path(path, sizeof path, "models/stories260K.bin");
    if (!test_file_exists(path)) {
        printf("generate: %s not found, stories260K checks skipped\n", path);
        return NULL;
    }
    perl_model *m = NULL;
    ck_assert_msg(perl_model_load(&m, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    return m;
}

START_TEST(greedy_stories260k) {
    perl_model *m = load_stories();
    if (!m) return;
    check_greedy(m, NULL, 24, "stories260K");
    perl_lora *lora = perturbed_adapter(m, LIBPERL_MODE_LORA, 0.05f);
    check_greedy(m, lora, 16, "stories260K LoRA");
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

/* ---- sampled log-probs == the filtered distribution recomputed here ---------------------------- */

typedef struct filter {
    float temperature, top_p, min_p;
    int top_k;
} filter;

/* Independent re-implementation of the documented filter: kept[j] = 1 for kept tokens; returns log mass. */
static double reference_filter(const float *z, int V, const filter *f, unsigned char *kept) {
    ck_assert_int_gt(V, 0);
    double *e = malloc((size_t)V * sizeof *e), m = -INFINITY;
    int *order = malloc((size_t)V * sizeof *order);
    for (int j = 0; j < V; j++) m = fmax(m, z[j] / (double)f->temperature);
    for (int j = 0; j < V; j++) e[j] = exp(z[j] / (double)f->temperature - m), order[j] = j;
    for (int i = 1; i < V; i++) /* insertion sort by (e desc, id asc) */
        for (int j = i; j > 0 && e[order[j]] > e[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    int n = f->top_k > 0 && f->top_k < V ? f->top_k : V;
    if (f->top_p < 1.0f) {
        double mass = 0.0, cum = 0.0;
        for (int i = 0; i < n; i++) mass += e[order[i]];
        for (int i = 0; i < n; i++) {
            cum += e[order[i]];
            if (cum >= f->top_p * mass) {
                n = i + 1;
                break;
            }
        }
    }
    double kept_mass = 0.0;
    memset(kept, 0, (size_t)V);
    for (int i = 0; i < n; i++) {
        if (e[order[i]] < f->min_p) continue; /* p >= min_p * p_max, p_max <-> e = 1 */
        kept[order[i]] = 1;
        kept_mass += e[order[i]];
    }
    free(e);
    free(order);
    return log(kept_mass) + m;
}

static void check_sampled(const perl_model *m, const perl_lora *lora, const filter *f, const char *what) {
    enum { T = 10 };
    prompts p;
    make_prompts(&p, m->cfg.vocab_size, m->cfg.bos_token_id);
    perl_generate_options o;
    perl_generate_options_init(&o);
    o.max_new_tokens = T, o.temperature = f->temperature, o.top_k = f->top_k, o.top_p = f->top_p;
    o.min_p = f->min_p, o.seed = 1234;
    int32_t gen[ROWS * T], len[ROWS];
    float lp[ROWS * T];
    ck_assert_msg(perl_generate(m, lora, &p.batch, &o, gen, len, lp) == LIBPERL_OK, "%s", perl_last_error());
    float *logits = recompute(m, lora, &p, gen, len, T);
    int V = m->cfg.vocab_size, kept_total = 0;
    unsigned char *kept = malloc((size_t)V);
    double worst = 0.0;
    for (int b = 0; b < ROWS; b++) {
        for (int s = 0; s < len[b]; s++) {
            const float *z = logits_for(logits, &p, V, T, b, s);
            double log_norm = reference_filter(z, V, f, kept);
            int32_t id = gen[b * T + s];
            ck_assert_msg(kept[id], "%s: row %d step %d: sampled token %d is outside the filtered set", what, b, s, id);
            for (int j = 0; j < V; j++) kept_total += kept[j];
            worst = fmax(worst, fabs(lp[b * T + s] - (z[id] / (double)f->temperature - log_norm)));
        }
    }
    printf("generate sampled %s: worst log-prob diff %.2e, mean kept set %.1f of %d\n", what, worst,
           (double)kept_total / (ROWS * T), V);
    ck_assert_msg(worst < LOGP_TOL, "%s: sampled log-probs differ by %g", what, worst);
    free(kept);
    free(logits);
}

START_TEST(sampled_logprobs) {
    perl_model *m = random_model(1, 0, 4);
    perl_lora *lora = perturbed_adapter(m, LIBPERL_MODE_LORA, 0.2f);
    filter plain = {1.0f, 1.0f, 0.0f, 0}, k = {0.7f, 1.0f, 0.0f, 5}, p = {1.3f, 0.8f, 0.0f, 0};
    filter mp = {1.0f, 1.0f, 0.05f, 0}, all = {0.8f, 0.9f, 0.02f, 8};
    check_sampled(m, lora, &plain, "T=1 unfiltered");
    check_sampled(m, lora, &k, "T=0.7 top-k 5");
    check_sampled(m, lora, &p, "T=1.3 top-p 0.8");
    check_sampled(m, lora, &mp, "min-p 0.05");
    check_sampled(m, lora, &all, "T=0.8 top-k 8 top-p 0.9 min-p 0.02");
    perl_model *stories = load_stories();
    if (stories) {
        check_sampled(stories, NULL, &plain, "stories260K T=1");
        check_sampled(stories, NULL, &all, "stories260K filtered");
        perl_model_free(stories);
    }
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

/* ---- determinism, stop tokens, padding ------------------------------------------------------ */

START_TEST(same_seed_same_output) {
    enum { T = 12 };
    perl_model *m = random_model(0, 0, 5);
    prompts p;
    make_prompts(&p, m->cfg.vocab_size, 1);
    perl_generate_options o;
    perl_generate_options_init(&o);
    o.max_new_tokens = T, o.seed = 77, o.top_p = 0.95f;
    int32_t a[ROWS * T], b[ROWS * T], c[ROWS * T], la[ROWS], lb[ROWS], lc[ROWS];
    float pa[ROWS * T], pb[ROWS * T];
    ck_assert_int_eq(perl_generate(m, NULL, &p.batch, &o, a, la, pa), LIBPERL_OK);
    ck_assert_int_eq(perl_set_num_threads(1), LIBPERL_OK);
    ck_assert_int_eq(perl_generate(m, NULL, &p.batch, &o, b, lb, pb), LIBPERL_OK);
    perl_set_num_threads(0);
    ck_assert_msg(memcmp(a, b, sizeof a) == 0 && memcmp(la, lb, sizeof la) == 0, "same seed, different tokens");
    ck_assert_msg(memcmp(pa, pb, sizeof pa) == 0, "same seed, different log-probs");
    o.seed = 78;
    ck_assert_int_eq(perl_generate(m, NULL, &p.batch, &o, c, lc, NULL), LIBPERL_OK);
    ck_assert_msg(memcmp(a, c, sizeof a) != 0, "a different seed gave the same %d tokens", ROWS * T);
    perl_model_free(m);
}
END_TEST

START_TEST(stop_tokens_and_padding) {
    enum { T = 10 };
    perl_model *m = random_model(0, 1, 6);
    prompts p;
    make_prompts(&p, m->cfg.vocab_size, 1);
    perl_generate_options o;
    perl_generate_options_init(&o);
    o.max_new_tokens = T, o.temperature = 0.0f;
    int32_t free_run[ROWS * T], gen[ROWS * T], len[ROWS];
    float lp[ROWS * T];
    ck_assert_int_eq(perl_generate(m, NULL, &p.batch, &o, free_run, len, NULL), LIBPERL_OK);
    /* stop on row 1's third token: rows end at their first occurrence of it */
    int32_t stop[2] = {free_run[1 * T + 2], m->cfg.vocab_size - 1};
    o.stop_tokens = stop, o.n_stop_tokens = 2;
    ck_assert_int_eq(perl_generate(m, NULL, &p.batch, &o, gen, len, lp), LIBPERL_OK);
    for (int b = 0; b < ROWS; b++) {
        int expect = T;
        for (int s = 0; s < T; s++)
            if (free_run[b * T + s] == stop[0] || free_run[b * T + s] == stop[1]) {
                expect = s + 1;
                break;
            }
        ck_assert_int_eq(len[b], expect);
        for (int s = 0; s < T; s++) {
            if (s < expect) {
                ck_assert_int_eq(gen[b * T + s], free_run[b * T + s]);
                ck_assert(lp[b * T + s] <= 0.0f);
            } else {
                ck_assert_int_eq(gen[b * T + s], -1);
                ck_assert(lp[b * T + s] == 0.0f);
            }
        }
    }
    ck_assert_int_le(len[1], 3);
    ck_assert_int_eq(gen[1 * T + len[1] - 1], stop[0]); /* the stop token is kept */
    perl_model_free(m);
}
END_TEST

/* A row that fills the context exactly, and max_new_tokens = 1. */
START_TEST(context_edges) {
    perl_model *m = random_model(0, 0, 8);
    prompts p;
    make_prompts(&p, m->cfg.vocab_size, 1);
    perl_generate_options o;
    perl_generate_options_init(&o);
    o.max_new_tokens = m->cfg.max_seq_len - PROMPT_LEN; /* the longest prompt (7) ends at the context */
    int32_t *gen = malloc((size_t)ROWS * o.max_new_tokens * sizeof *gen), len[ROWS];
    ck_assert_msg(perl_generate(m, NULL, &p.batch, &o, gen, len, NULL) == LIBPERL_OK, "%s", perl_last_error());
    o.max_new_tokens = 1;
    ck_assert_int_eq(perl_generate(m, NULL, &p.batch, &o, gen, len, NULL), LIBPERL_OK);
    for (int b = 0; b < ROWS; b++) ck_assert_int_eq(len[b], 1);
    free(gen);
    perl_model_free(m);
}
END_TEST

/* ---- bad input -------------------------------------------------------------------------------- */

START_TEST(bad_input) {
    enum { T = 4 };
    perl_model *m = random_model(0, 0, 9), *other = random_model(0, 0, 10);
    perl_lora *foreign = perturbed_adapter(other, LIBPERL_MODE_LORA, 0.2f);
    prompts p;
    make_prompts(&p, m->cfg.vocab_size, 1);
    perl_generate_options o, bad;
    perl_generate_options_init(&o);
    o.max_new_tokens = T;
    int32_t gen[ROWS * T], len[ROWS];
    float lp[ROWS * T];
#define EXPECT(rc, call)                                                             \
    do {                                                                             \
        perl_clear_error();                                                          \
        ck_assert_int_eq((call), (rc));                                              \
        ck_assert_str_ne(perl_last_error(), "");                                     \
    } while (0)
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(NULL, NULL, &p.batch, &o, gen, len, lp));
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, NULL, &o, gen, len, lp));
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, NULL, gen, len, lp));
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &o, NULL, len, lp));
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &o, gen, NULL, lp));
    EXPECT(LIBPERL_ERR_SHAPE, perl_generate(m, foreign, &p.batch, &o, gen, len, lp));
    bad = o, bad.struct_size = 8;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.max_new_tokens = 0;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.temperature = -0.5f;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.temperature = NAN;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.top_p = 0.0f;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.top_p = 1.5f;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.top_k = -1;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.min_p = -0.1f;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.n_stop_tokens = 2, bad.stop_tokens = NULL;
    EXPECT(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    int32_t stop = m->cfg.vocab_size;
    bad = o, bad.n_stop_tokens = 1, bad.stop_tokens = &stop;
    EXPECT(LIBPERL_ERR_RANGE, perl_generate(m, NULL, &p.batch, &bad, gen, len, lp));
    bad = o, bad.max_new_tokens = m->cfg.max_seq_len - PROMPT_LEN + 1; /* row 2 no longer fits */
    int32_t *big = malloc((size_t)ROWS * bad.max_new_tokens * sizeof *big);
    EXPECT(LIBPERL_ERR_RANGE, perl_generate(m, NULL, &p.batch, &bad, big, len, NULL));
    free(big);
    p.tokens[3] = m->cfg.vocab_size;
    EXPECT(LIBPERL_ERR_RANGE, perl_generate(m, NULL, &p.batch, &o, gen, len, lp));
    p.tokens[3] = 3, p.lengths[1] = 0;
    EXPECT(LIBPERL_ERR_RANGE, perl_generate(m, NULL, &p.batch, &o, gen, len, lp));
#undef EXPECT
    perl_lora_free(foreign);
    perl_model_free(other);
    perl_model_free(m);
}
END_TEST

Suite *suite_generate(void) {
    Suite *s = suite_create("generate");
    TCase *tc = tcase_create("generate");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, greedy_random_model);
    tcase_add_test(tc, greedy_stories260k);
    tcase_add_test(tc, sampled_logprobs);
    tcase_add_test(tc, same_seed_same_output);
    tcase_add_test(tc, stop_tokens_and_padding);
    tcase_add_test(tc, context_edges);
    tcase_add_test(tc, bad_input);
    suite_add_tcase(s, tc);
    return s;
}
