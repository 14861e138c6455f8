#define _POSIX_C_SOURCE 200809L /* mkstemp */

/* The training engine on small random models: finite differences, identities
 * (zero B, merge, recomputation), determinism, dropout, optimizer guards. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"

typedef struct fixture {
    perl_model *model;
    perl_batch batch;
    int32_t tokens[3 * 9];
    int32_t lengths[3];
    uint8_t mask[3 * 9];
} fixture;

static void fixture_init(fixture *f, int tied, int bias) {
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = 32, cfg.hidden_dim = 48, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2;
    cfg.vocab_size = 37, cfg.max_seq_len = 16, cfg.tied_embeddings = tied, cfg.qkv_bias = bias;
    ck_assert_int_eq(perl_model_create_random(&f->model, &cfg, 7), LIBPERL_OK);
    for (int i = 0; i < 27; i++) f->tokens[i] = (i * 7 + 3) % 37, f->mask[i] = (i % 5) != 2;
    f->lengths[0] = 9, f->lengths[1] = 5, f->lengths[2] = 7;
    perl_batch_init(&f->batch);
    f->batch.batch_size = 3, f->batch.seq_len = 9, f->batch.tokens = f->tokens, f->batch.lengths = f->lengths;
}

static perl_lora *make_adapter(fixture *f, int mode, uint32_t targets, float perturb) {
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.mode = mode, o.rank = 3, o.target_modules = targets, o.seed = 3, o.train_embeddings = 1;
    perl_lora *lora;
    ck_assert_int_eq(perl_lora_create(&lora, f->model, &o), LIBPERL_OK);
    float *P;
    size_t n;
    perl_lora_params(lora, &P, NULL, &n);
    for (size_t i = 0; i < n; i++) P[i] += perturb * perl_rand_normal(99, 1, i);
    return lora;
}

static double sft_loss(perl_lora *lora, fixture *f) {
    perl_step_stats s;
    perl_step_stats_init(&s);
    ck_assert_int_eq(perl_lora_zero_grad(lora), LIBPERL_OK);
    ck_assert_msg(perl_lora_sft_backward(lora, &f->batch, f->mask, &s) == LIBPERL_OK, "%s", perl_last_error());
    return s.loss;
}

/* Directional finite difference along the gradient: (L(p + h g) - L(p - h g)) / 2h = |g|^2. */
static void check_directional(int mode, int tied, int bias, uint32_t targets) {
    fixture f;
    fixture_init(&f, tied, bias);
    perl_lora *lora = make_adapter(&f, mode, targets, 0.1f);
    float *P, *G;
    size_t n;
    perl_lora_params(lora, &P, &G, &n);
    sft_loss(lora, &f);
    float *g = malloc(n * sizeof *g), *p0 = malloc(n * sizeof *p0);
    memcpy(g, G, n * sizeof *g);
    memcpy(p0, P, n * sizeof *p0);
    double g2 = 0.0;
    for (size_t i = 0; i < n; i++) g2 += (double)g[i] * g[i];
    double h = 1e-3 / sqrt(g2); /* small: the loss is strongly curved along g */
    for (size_t i = 0; i < n; i++) P[i] = p0[i] + (float)(h * g[i]);
    double lp = sft_loss(lora, &f);
    for (size_t i = 0; i < n; i++) P[i] = p0[i] - (float)(h * g[i]);
    double lm = sft_loss(lora, &f);
    double fd = (lp - lm) / (2 * h);
    double rel = fabs(fd - g2) / g2;
    printf("engine fd: mode %d tied %d bias %d targets 0x%x: |g|^2 %.6g fd %.6g rel err %.2e\n", mode, tied, bias,
           targets, g2, fd, rel);
    ck_assert_msg(rel < 2e-2, "directional derivative %g vs |g|^2 %g", fd, g2);
    free(g);
    free(p0);
    perl_lora_free(lora);
    perl_model_free(f.model);
}

START_TEST(fd_lora_all) { check_directional(LIBPERL_MODE_LORA, 0, 0, LIBPERL_TARGET_ALL); }
END_TEST
START_TEST(fd_lora_qv_bias) { check_directional(LIBPERL_MODE_LORA, 1, 1, LIBPERL_TARGET_Q | LIBPERL_TARGET_V); }
END_TEST
START_TEST(fd_full_untied) { check_directional(LIBPERL_MODE_FULL, 0, 0, 0); }
END_TEST
START_TEST(fd_full_tied_bias) { check_directional(LIBPERL_MODE_FULL, 1, 1, 0); }
END_TEST

static void logits_of(fixture *f, const perl_model *m, const perl_lora *lora, float *out) {
    ck_assert_msg(perl_model_forward(m, lora, &f->batch, out, NULL) == LIBPERL_OK, "%s", perl_last_error());
}

START_TEST(zero_b_equals_base) {
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora *lora = make_adapter(&f, LIBPERL_MODE_LORA, LIBPERL_TARGET_ALL, 0.0f);
    size_t n = (size_t)27 * 37;
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    logits_of(&f, f.model, NULL, a);
    logits_of(&f, f.model, lora, b);
    ck_assert_msg(memcmp(a, b, n * sizeof *a) == 0, "zero-B adapter changed the logits");
    free(a);
    free(b);
    perl_lora_free(lora);
    perl_model_free(f.model);
}
END_TEST

START_TEST(merge_equals_adapter) {
    fixture f;
    fixture_init(&f, 0, 1);
    perl_lora *lora = make_adapter(&f, LIBPERL_MODE_LORA, LIBPERL_TARGET_ALL, 0.1f);
    perl_model *merged;
    ck_assert_int_eq(perl_lora_merge(&merged, lora), LIBPERL_OK);
    size_t n = (size_t)27 * 37;
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    logits_of(&f, f.model, lora, a);
    logits_of(&f, merged, NULL, b);
    float worst = 0.0f, scale = 0.0f;
    for (size_t i = 0; i < n; i++) worst = fmaxf(worst, fabsf(a[i] - b[i])), scale = fmaxf(scale, fabsf(a[i]));
    printf("merge: worst |adapter - merged| %.3g (max |logit| %.3g)\n", worst, scale);
    ck_assert_float_le(worst, 1e-5f * scale + 1e-6f);
    free(a);
    free(b);
    perl_model_free(merged);
    perl_lora_free(lora);
    perl_model_free(f.model);
}
END_TEST

/* K SFT steps from a fixed seed; returns a copy of the parameters. */
static float *train_k_steps(int threads, int recompute, float dropout, size_t *out_n) {
    ck_assert_int_eq(perl_set_num_threads(threads), LIBPERL_OK);
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.rank = 4, o.target_modules = LIBPERL_TARGET_ALL, o.seed = 5, o.dropout = dropout;
    perl_lora *lora;
    ck_assert_int_eq(perl_lora_create(&lora, f.model, &o), LIBPERL_OK);
    perl_lora_set_recompute(lora, recompute);
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = 1e-2f;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &opt), LIBPERL_OK);
    for (int k = 0; k < 5; k++) ck_assert_int_eq(perl_lora_sft_step(lora, &f.batch, f.mask, NULL), LIBPERL_OK);
    float *P;
    perl_lora_params(lora, &P, NULL, out_n);
    float *copy = malloc(*out_n * sizeof *copy);
    memcpy(copy, P, *out_n * sizeof *copy);
    perl_lora_free(lora);
    perl_model_free(f.model);
    return copy;
}

START_TEST(determinism_and_recompute) {
    size_t n;
    for (int threads = 1; threads <= 2; threads++) {
        float *a = train_k_steps(threads, 0, 0.1f, &n);
        float *b = train_k_steps(threads, 0, 0.1f, &n);
        float *c = train_k_steps(threads, 1, 0.1f, &n);
        ck_assert_msg(memcmp(a, b, n * sizeof *a) == 0, "%d threads: two runs differ", threads);
        ck_assert_msg(memcmp(a, c, n * sizeof *a) == 0, "%d threads: recomputation changed the result", threads);
        free(a);
        free(b);
        free(c);
    }
    float *one = train_k_steps(1, 0, 0.1f, &n), *two = train_k_steps(2, 0, 0.1f, &n);
    printf("determinism: 1 vs 2 threads %s\n", memcmp(one, two, n * sizeof *one) ? "differ" : "bitwise equal");
    free(one);
    free(two);
    perl_set_num_threads(0);
}
END_TEST

START_TEST(dropout_only_in_training) {
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.dropout = 0.5f, o.target_modules = LIBPERL_TARGET_ALL;
    perl_lora *lora;
    ck_assert_int_eq(perl_lora_create(&lora, f.model, &o), LIBPERL_OK);
    float *P;
    size_t n;
    perl_lora_params(lora, &P, NULL, &n);
    for (size_t i = 0; i < n; i++) P[i] += 0.1f * perl_rand_normal(1, 2, i);
    size_t nl = (size_t)27 * 37;
    float *a = malloc(nl * sizeof *a), *b = malloc(nl * sizeof *b);
    logits_of(&f, f.model, lora, a);
    logits_of(&f, f.model, lora, b);
    ck_assert_msg(memcmp(a, b, nl * sizeof *a) == 0, "inference is not deterministic under dropout");
    /* training losses differ from step to step only through dropout masks */
    double l1 = sft_loss(lora, &f), l2 = sft_loss(lora, &f);
    ck_assert_msg(l1 != l2, "dropout had no effect in training");
    free(a);
    free(b);
    perl_lora_free(lora);
    perl_model_free(f.model);
}
END_TEST

static int hook_calls;
static int count_hook(float *g, size_t n, void *user) {
    (void)g, (void)n;
    hook_calls++;
    return *(int *)user;
}

START_TEST(optimizer_guards) {
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora *lora = make_adapter(&f, LIBPERL_MODE_LORA, LIBPERL_TARGET_ALL, 0.1f);
    float *P, *G;
    size_t n;
    perl_lora_params(lora, &P, &G, &n);
    float *before = malloc(n * sizeof *before);
    memcpy(before, P, n * sizeof *before);
    int fail = 1;
    ck_assert_int_eq(perl_lora_set_grad_hook(lora, count_hook, &fail), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_sft_step(lora, &f.batch, f.mask, NULL), LIBPERL_ERR_CALLBACK);
    ck_assert_int_eq(hook_calls, 1);
    ck_assert_msg(memcmp(before, P, n * sizeof *P) == 0, "a failed hook changed parameters");
    fail = 0;
    sft_loss(lora, &f);
    G[3] = NAN;
    ck_assert_int_eq(perl_lora_optimizer_step(lora, NULL), LIBPERL_ERR_NUMERIC);
    ck_assert_msg(memcmp(before, P, n * sizeof *P) == 0, "a NaN gradient changed parameters");
    ck_assert_int_eq(perl_lora_sft_step(lora, &f.batch, f.mask, NULL), LIBPERL_OK);
    ck_assert_msg(memcmp(before, P, n * sizeof *P) != 0, "a step did not change parameters");
    free(before);
    perl_lora_free(lora);
    perl_model_free(f.model);
}
END_TEST

START_TEST(bad_batches) {
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora *lora = make_adapter(&f, LIBPERL_MODE_LORA, LIBPERL_TARGET_ALL, 0.0f);
    float *logits = malloc((size_t)27 * 37 * sizeof *logits);
    f.tokens[4] = 37;
    ck_assert_int_eq(perl_model_forward(f.model, NULL, &f.batch, logits, NULL), LIBPERL_ERR_RANGE);
    ck_assert_int_eq(perl_lora_sft_step(lora, &f.batch, NULL, NULL), LIBPERL_ERR_RANGE);
    f.tokens[4] = -1;
    ck_assert_int_eq(perl_model_forward(f.model, NULL, &f.batch, logits, NULL), LIBPERL_ERR_RANGE);
    f.tokens[4] = 1;
    f.lengths[1] = 10;
    ck_assert_int_eq(perl_model_forward(f.model, NULL, &f.batch, logits, NULL), LIBPERL_ERR_RANGE);
    f.lengths[1] = 0;
    ck_assert_int_eq(perl_model_forward(f.model, NULL, &f.batch, logits, NULL), LIBPERL_ERR_RANGE);
    f.lengths[1] = 5;
    f.batch.seq_len = 17; /* longer than the context (16) */
    ck_assert_int_eq(perl_model_forward(f.model, NULL, &f.batch, logits, NULL), LIBPERL_ERR_RANGE);
    f.batch.seq_len = 9;
    f.batch.batch_size = 0;
    ck_assert_int_eq(perl_model_forward(f.model, NULL, &f.batch, logits, NULL), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(perl_model_forward(NULL, NULL, &f.batch, logits, NULL), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(perl_model_forward(f.model, NULL, NULL, logits, NULL), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_str_ne(perl_last_error(), "");
    free(logits);
    perl_lora_free(lora);
    perl_model_free(f.model);
}
END_TEST

/* A state saved from an adapter with dropout and a non-zero seed resumes
 * bit-exactly in an adapter created with another seed (the seed is state). */
START_TEST(state_resume_with_dropout) {
    char path[] = "/tmp/libperl-engine-state-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.dropout = 0.2f, o.seed = 1234, o.target_modules = LIBPERL_TARGET_ALL;
    perl_lora *a, *b;
    ck_assert_int_eq(perl_lora_create(&a, f.model, &o), LIBPERL_OK);
    for (int k = 0; k < 2; k++) ck_assert_int_eq(perl_lora_sft_step(a, &f.batch, f.mask, NULL), LIBPERL_OK);
    ck_assert_msg(perl_lora_save_state(a, path) == LIBPERL_OK, "%s", perl_last_error());
    o.seed = 99;
    ck_assert_int_eq(perl_lora_create(&b, f.model, &o), LIBPERL_OK);
    ck_assert_msg(perl_lora_load_state(b, path) == LIBPERL_OK, "%s", perl_last_error());
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(perl_lora_sft_step(a, &f.batch, f.mask, NULL), LIBPERL_OK);
        ck_assert_int_eq(perl_lora_sft_step(b, &f.batch, f.mask, NULL), LIBPERL_OK);
    }
    float *pa, *pb;
    size_t n;
    perl_lora_params(a, &pa, NULL, &n);
    perl_lora_params(b, &pb, NULL, NULL);
    ck_assert_msg(memcmp(pa, pb, n * sizeof *pa) == 0, "resumed training differs");
    perl_lora_free(a);
    perl_lora_free(b);
    perl_model_free(f.model);
    unlink(path);
}
END_TEST

/* Warmup then linear / cosine decay to min_lr_ratio, and the host override;
 * each step reports the rate it used. */
START_TEST(lr_schedules) {
    fixture f;
    fixture_init(&f, 0, 0);
    perl_lora *lora = make_adapter(&f, LIBPERL_MODE_LORA, LIBPERL_TARGET_Q, 0.0f);
    perl_optim_options o;
    perl_optim_options_init(&o);
    o.lr = 1e-3f, o.warmup_steps = 2, o.total_steps = 6, o.min_lr_ratio = 0.1f;
    const float linear[] = {5e-4f, 1e-3f, 1e-3f, 7.75e-4f, 5.5e-4f, 3.25e-4f, 1e-4f, 1e-4f};
    const float cosine[] = {5e-4f, 1e-3f, 1e-3f, 8.6820e-4f, 5.5e-4f, 2.3180e-4f, 1e-4f, 1e-4f};
    for (int schedule = LIBPERL_LR_LINEAR; schedule <= LIBPERL_LR_COSINE; schedule++) {
        perl_lora *l = make_adapter(&f, LIBPERL_MODE_LORA, LIBPERL_TARGET_Q, 0.0f);
        o.schedule = schedule;
        ck_assert_int_eq(perl_lora_set_optimizer(l, &o), LIBPERL_OK);
        for (int k = 0; k < 8; k++) {
            perl_step_stats st;
            perl_step_stats_init(&st);
            ck_assert_int_eq(perl_lora_sft_step(l, &f.batch, NULL, &st), LIBPERL_OK);
            float want = schedule == LIBPERL_LR_LINEAR ? linear[k] : cosine[k];
            ck_assert_msg(fabsf(st.lr - want) < 1e-7f, "schedule %d step %d: lr %g, expected %g", schedule, k,
                          (double)st.lr, (double)want);
            ck_assert_int_eq(st.step, k + 1);
        }
        perl_lora_free(l);
    }
    o.schedule = LIBPERL_LR_CONSTANT;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &o), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_set_lr(lora, 3e-2f), LIBPERL_OK);
    perl_step_stats st;
    perl_step_stats_init(&st);
    ck_assert_int_eq(perl_lora_sft_step(lora, &f.batch, NULL, &st), LIBPERL_OK);
    ck_assert_float_eq(st.lr, 3e-2f);
    ck_assert_int_eq(perl_lora_set_lr(lora, -1.0f), LIBPERL_OK); /* back to the schedule */
    ck_assert_int_eq(perl_lora_sft_step(lora, &f.batch, NULL, &st), LIBPERL_OK);
    ck_assert_float_eq_tol(st.lr, 1e-3f, 1e-9f);
    o.lr = NAN;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &o), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_lora_free(lora);
    perl_model_free(f.model);
}
END_TEST

Suite *suite_engine(void) {
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("engine");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, fd_lora_all);
    tcase_add_test(tc, fd_lora_qv_bias);
    tcase_add_test(tc, fd_full_untied);
    tcase_add_test(tc, fd_full_tied_bias);
    tcase_add_test(tc, zero_b_equals_base);
    tcase_add_test(tc, merge_equals_adapter);
    tcase_add_test(tc, determinism_and_recompute);
    tcase_add_test(tc, dropout_only_in_training);
    tcase_add_test(tc, optimizer_guards);
    tcase_add_test(tc, bad_batches);
    tcase_add_test(tc, state_resume_with_dropout);
    tcase_add_test(tc, lr_schedules);
    suite_add_tcase(s, tc);
    return s;
}
