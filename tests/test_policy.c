/*
 * perl_policy_trainer: every objective against PyTorch fixtures
 * (tests/reference/gen_policy_fixtures.py: loss, stats and adapter gradients
 * for REINFORCE / RLOO / GRPO / PPO, each KL estimator in the reward and in
 * the loss, entropy bonus, whitening, both normalisations, value clipping),
 * the zero-adapter identity (KL exactly 0), bandits that must learn,
 * failure atomicity and bit-exact save / load / resume.
 *
 * Gradients are read after a step with lr 0 and clipping off: AdamW then
 * leaves the parameters unchanged and the gradient buffer as computed.
 */
#define _POSIX_C_SOURCE 200809L /* getenv, strtod */

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"
#include "safetensors.h"
#include "test_util.h"

#define GRAD_RTOL 1e-3 /* max |got - want| / max |want| per tensor, as tests/test_reference.c */
#define STAT_TOL 1e-4  /* losses and stats: |got - want| <= tol * max(1, |want|) */

/* ---- fixtures -------------------------------------------------------------------- */

static const char *fixture_dir(void) {
    static char dir[512]; /* short enough that dir + '/' + name fits callers' path buffers */
    if (dir[0] == '\0' && test_fixture_dir(dir, sizeof dir, "tiny/config.json") == NULL)
        ck_abort_msg("policy fixtures not found: set LIBPERL_FIXTURE_DIR or run from the repository root");
    return dir;
}

static char *fixture_path(char *buf, size_t n, const char *name) { return test_path(buf, n, fixture_dir(), name); }

static void fixture_open(st_file *f, const char *name) {
    char path[1200];
    fixture_path(path, sizeof path, name);
    ck_assert_msg(st_open(f, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    const char *format = st_metadata(f, "format"), *version = st_metadata(f, "version");
    ck_assert_msg(format && strcmp(format, "libperl-fixture") == 0 && version && strcmp(version, "1") == 0,
                  "%s: not a version 1 libperl fixture", path);
}

static const st_tensor *fixture_tensor(const st_file *f, const char *name, size_t numel) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: no tensor %s", f->path, name);
    ck_assert_msg(t->numel == numel, "%s: %s has %llu elements, expected %zu", f->path, name,
                  (unsigned long long)t->numel, numel);
    return t;
}

static float *fixture_f32(const st_file *f, const char *name, size_t numel) {
    float *out = malloc(numel * sizeof *out);
    ck_assert_int_eq(st_to_f32(fixture_tensor(f, name, numel), out), LIBPERL_OK);
    return out;
}

static int32_t *fixture_i32(const st_file *f, const char *name, size_t numel) {
    const st_tensor *t = fixture_tensor(f, name, numel);
    ck_assert_int_eq(t->dtype, ST_I32);
    int32_t *out = malloc(numel * sizeof *out);
    memcpy(out, t->data, numel * sizeof *out);
    return out;
}

static double fixture_scalar(const st_file *f, const char *name) {
    float *v = fixture_f32(f, name, 1);
    double x = *v;
    free(v);
    return x;
}

static double meta_num(const st_file *f, const char *key) {
    const char *v = st_metadata(f, key);
    ck_assert_msg(v != NULL, "%s: no metadata %s", f->path, key);
    return strtod(v, NULL);
}

static perl_model *load_tiny(void) {
    char path[1200];
    perl_model *m = NULL;
    ck_assert_msg(perl_model_load(&m, fixture_path(path, sizeof path, "tiny")) == LIBPERL_OK, "%s", perl_last_error());
    return m;
}

static perl_lora *load_adapter(perl_model *m, const char *name) {
    char path[1200];
    perl_lora *lora = NULL;
    ck_assert_msg(perl_lora_load(&lora, m, fixture_path(path, sizeof path, name)) == LIBPERL_OK, "%s: %s", name,
                  perl_last_error());
    return lora;
}

/* lr 0, no clipping: the step leaves parameters alone and gradients readable. */
static void freeze_optimizer(perl_lora *lora) {
    perl_optim_options o;
    perl_optim_options_init(&o);
    o.lr = 0.0f, o.max_grad_norm = 0.0f;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &o), LIBPERL_OK);
}

static double rel_diff(const float *got, const float *want, size_t n) {
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        worst = fmax(worst, fabs((double)got[i] - want[i]));
        scale = fmax(scale, fabs((double)want[i]));
    }
    return worst / fmax(scale, 1e-30);
}

/* Compares every adapter gradient (and the head's) with the fixture's tensors under prefix + PEFT name. */
static double compare_grads(const st_file *f, const perl_lora *lora, const char *prefix, int *n_tensors) {
    double worst = 0.0;
    const perl_model_config *c = &lora->model->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            const lora_module *mod = lora_module_at(lora, l, t);
            if (!mod) continue;
            for (int which = 0; which < 2; which++) {
                char name[256];
                snprintf(name, sizeof name, "%sbase_model.model.model.layers.%d.%s.%s.lora_%c.weight", prefix, l,
                         lora_target_parent(t), lora_target_name(t), which ? 'B' : 'A');
                size_t n = (size_t)lora->opts.rank * (which ? mod->out : mod->in);
                float *want = fixture_f32(f, name, n);
                double d = rel_diff(which ? mod->dB : mod->dA, want, n);
                ck_assert_msg(d < GRAD_RTOL, "%s: %s relative error %.3e", f->path, name, d);
                worst = fmax(worst, d);
                (*n_tensors)++;
                free(want);
            }
        }
    }
    if (lora->head) {
        char name[256];
        snprintf(name, sizeof name, "%sbase_model.model.score.weight", prefix);
        float *want = fixture_f32(f, name, (size_t)c->dim);
        double d = rel_diff(lora->dhead, want, (size_t)c->dim);
        ck_assert_msg(d < GRAD_RTOL, "%s: %s relative error %.3e", f->path, name, d);
        worst = fmax(worst, d);
        (*n_tensors)++;
        free(want);
    }
    return worst;
}

static void options_from_fixture(perl_policy_options *o, const st_file *f) {
    perl_policy_options_init(o);
    o->algorithm = (int32_t)meta_num(f, "algorithm");
    o->group_size = (int32_t)meta_num(f, "group_size");
    o->kl_coef = (float)meta_num(f, "kl_coef");
    o->kl_estimator = (int32_t)meta_num(f, "kl_estimator");
    o->kl_mode = (int32_t)meta_num(f, "kl_mode");
    o->entropy_coef = (float)meta_num(f, "entropy_coef");
    o->whiten_advantages = (int32_t)meta_num(f, "whiten");
    o->loss_norm = (int32_t)meta_num(f, "loss_norm");
    o->clip_eps = (float)meta_num(f, "clip_eps");
    o->gamma = (float)meta_num(f, "gamma");
    o->lambda = (float)meta_num(f, "lam");
    o->value_coef = (float)meta_num(f, "value_coef");
    o->value_clip = (float)meta_num(f, "value_clip");
}

static void check_stat(const char *file, const char *what, double got, double want) {
    ck_assert_msg(fabs(got - want) <= STAT_TOL * fmax(1.0, fabs(want)), "%s: %s %.8g, expected %.8g", file, what, got,
                  want);
}

#define FX_ROWS 4
#define FX_PROMPT 5
#define FX_RESPONSE 5

static void check_fixture(const char *name) {
    char file[256];
    snprintf(file, sizeof file, "policy_%s.safetensors", name);
    st_file f;
    fixture_open(&f, file);
    perl_model *m = load_tiny();
    perl_lora *policy = load_adapter(m, "policy_lora"), *value = NULL;
    freeze_optimizer(policy);
    if (meta_num(&f, "use_value") != 0) {
        value = load_adapter(m, "policy_value");
        freeze_optimizer(value);
    }
    perl_policy_options o;
    options_from_fixture(&o, &f);
    perl_policy_trainer *tr = NULL;
    ck_assert_msg(perl_policy_create(&tr, m, policy, value, &o) == LIBPERL_OK, "%s", perl_last_error());

    int32_t *prompt = fixture_i32(&f, "prompt_tokens", FX_ROWS * FX_PROMPT);
    int32_t *prompt_len = fixture_i32(&f, "prompt_lengths", FX_ROWS);
    int32_t *resp = fixture_i32(&f, "responses", FX_ROWS * FX_RESPONSE);
    int32_t *resp_len = fixture_i32(&f, "response_lengths", FX_ROWS);
    float *rewards = fixture_f32(&f, "rewards", FX_ROWS);
    float *old = meta_num(&f, "use_old") != 0 ? fixture_f32(&f, "old_logprobs", FX_ROWS * FX_RESPONSE) : NULL;
    perl_batch prompts;
    perl_batch_init(&prompts);
    prompts.batch_size = FX_ROWS, prompts.seq_len = FX_PROMPT, prompts.tokens = prompt, prompts.lengths = prompt_len;
    perl_policy_stats s;
    perl_policy_stats_init(&s);
    ck_assert_msg(perl_policy_step(tr, &prompts, resp, resp_len, FX_RESPONSE, rewards, old, &s) == LIBPERL_OK, "%s: %s",
                  name, perl_last_error());

    check_stat(file, "loss", s.loss, fixture_scalar(&f, "loss"));
    check_stat(file, "kl", s.kl, fixture_scalar(&f, "kl"));
    check_stat(file, "entropy", s.entropy, fixture_scalar(&f, "entropy"));
    check_stat(file, "value_loss", s.value_loss, fixture_scalar(&f, "value_loss"));
    double clip_fraction = fixture_scalar(&f, "clip_fraction");
    ck_assert_msg(fabs(s.clip_fraction - clip_fraction) < 1e-6, "%s: clip_fraction %g vs %g", file,
                  (double)s.clip_fraction, clip_fraction);
    ck_assert_int_eq(s.step, 1);
    int n_tensors = 0;
    double worst = compare_grads(&f, policy, "", &n_tensors);
    if (value) worst = fmax(worst, compare_grads(&f, value, "value.", &n_tensors));
    printf("policy fixture %-28s loss %+.6f kl %+.5f clip %.3f value_loss %.5f: %d gradients, worst rel err %.2e\n",
           name, (double)s.loss, (double)s.kl, (double)s.clip_fraction, (double)s.value_loss, n_tensors, worst);
    fflush(stdout);

    free(prompt), free(prompt_len), free(resp), free(resp_len), free(rewards), free(old);
    perl_policy_free(tr);
    perl_lora_free(policy);
    perl_lora_free(value);
    perl_model_free(m);
    st_close(&f);
}

START_TEST(fixtures_pg) {
    check_fixture("reinforce_k1_reward");
    check_fixture("reinforce_k2_loss_seq_whiten");
    check_fixture("rloo_k3_reward");
    check_fixture("rloo_k1_loss_seq");
    check_fixture("grpo_k3_loss");
    check_fixture("grpo_k2_reward_whiten_seq");
}
END_TEST

START_TEST(fixtures_ppo) {
    check_fixture("ppo_k1_reward_vclip");
    check_fixture("ppo_k3_loss_whiten_seq");
    check_fixture("ppo_k2_reward_novalue");
}
END_TEST

/* ---- a small random world ---------------------------------------------------------- */

#define VOCAB 12
#define TARGET_TOKEN 7
#define BANDIT_ROWS 16
#define BANDIT_PROMPT 2
#define BANDIT_RESPONSE 6

static perl_model *bandit_model(void) {
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = 32, cfg.hidden_dim = 64, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2;
    cfg.vocab_size = VOCAB, cfg.max_seq_len = 16;
    perl_model *m = NULL;
    ck_assert_int_eq(perl_model_create_random(&m, &cfg, 17), LIBPERL_OK);
    /* normal(0, 0.02) output weights cap every logit near 0.6; widen them so a policy can commit */
    for (size_t i = 0; i < (size_t)VOCAB * cfg.dim; i++) m->w.lm_head[i] *= 8.0f;
    return m;
}

static perl_lora *bandit_adapter(perl_model *m, float lr, uint64_t seed) {
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.rank = 4, o.target_modules = LIBPERL_TARGET_ALL, o.seed = seed;
    perl_lora *lora = NULL;
    ck_assert_int_eq(perl_lora_create(&lora, m, &o), LIBPERL_OK);
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = lr;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &opt), LIBPERL_OK);
    return lora;
}

typedef struct rollouts {
    int32_t prompt[BANDIT_ROWS * BANDIT_PROMPT], prompt_len[BANDIT_ROWS];
    int32_t resp[BANDIT_ROWS * BANDIT_RESPONSE], resp_len[BANDIT_ROWS];
    float logp[BANDIT_ROWS * BANDIT_RESPONSE], reward[BANDIT_ROWS];
    perl_batch prompts;
} rollouts;

static void rollouts_prompts(rollouts *r) {
    for (int b = 0; b < BANDIT_ROWS; b++) {
        r->prompt[b * BANDIT_PROMPT] = 1;
        r->prompt[b * BANDIT_PROMPT + 1] = 3 + b / 4 % 4; /* 4 prompts, each 4 times in a row (RLOO groups) */
        r->prompt_len[b] = BANDIT_PROMPT;
    }
    perl_batch_init(&r->prompts);
    r->prompts.batch_size = BANDIT_ROWS, r->prompts.seq_len = BANDIT_PROMPT, r->prompts.tokens = r->prompt;
    r->prompts.lengths = r->prompt_len;
}

/* Samples from the policy; reward = fraction of TARGET_TOKEN in the response. */
static double sample_and_reward(rollouts *r, perl_model *m, perl_lora *policy, uint64_t seed) {
    perl_generate_options g;
    perl_generate_options_init(&g);
    g.max_new_tokens = BANDIT_RESPONSE, g.seed = seed;
    ck_assert_msg(perl_generate(m, policy, &r->prompts, &g, r->resp, r->resp_len, r->logp) == LIBPERL_OK, "%s",
                  perl_last_error());
    double mean = 0.0;
    for (int b = 0; b < BANDIT_ROWS; b++) {
        int hits = 0;
        for (int j = 0; j < r->resp_len[b]; j++) hits += r->resp[b * BANDIT_RESPONSE + j] == TARGET_TOKEN;
        r->reward[b] = (float)hits / (float)r->resp_len[b];
        mean += r->reward[b] / BANDIT_ROWS;
    }
    return mean;
}

/*
 * STEPS of sample (perl_generate) + perl_policy_step.  Returns the initial
 * mean reward, the mean over the last WINDOW steps, and their mean KL.
 * PPO makes 4 updates per step (2 epochs x 2 minibatches), so it gets a
 * quarter of the learning rate.
 */
static void run_bandit(int algorithm, float kl_coef, double *first, double *last, double *kl_last) {
    enum { STEPS = 40, WINDOW = 5 };
    int ppo = algorithm == LIBPERL_PG_PPO;
    perl_model *m = bandit_model();
    perl_lora *policy = bandit_adapter(m, ppo ? 5e-3f : 2e-2f, 1), *value = NULL;
    perl_policy_options o;
    perl_policy_options_init(&o);
    o.algorithm = algorithm, o.kl_coef = kl_coef;
    if (algorithm == LIBPERL_PG_RLOO) o.group_size = 4;
    if (ppo) {
        value = bandit_adapter(m, 5e-3f, 2);
        o.ppo_epochs = 2, o.ppo_minibatches = 2;
    }
    perl_policy_trainer *tr = NULL;
    ck_assert_int_eq(perl_policy_create(&tr, m, policy, value, &o), LIBPERL_OK);
    rollouts r;
    rollouts_prompts(&r);
    *first = *last = *kl_last = 0.0;
    for (int step = 0; step < STEPS; step++) {
        double mean = sample_and_reward(&r, m, policy, 1000 + step);
        perl_policy_stats s;
        perl_policy_stats_init(&s);
        ck_assert_msg(perl_policy_step(tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, r.reward,
                                       ppo ? r.logp : NULL, &s) == LIBPERL_OK, "%s", perl_last_error());
        ck_assert(fabs(s.mean_reward - mean) < 1e-6);
        if (step == 0) *first = mean; /* the initial policy: before any update */
        if (step >= STEPS - WINDOW) *last += mean / WINDOW, *kl_last += s.kl / WINDOW;
    }
    perl_policy_free(tr);
    perl_lora_free(policy);
    perl_lora_free(value);
    perl_model_free(m);
}

/* A weak KL penalty lets the reward rise clearly with bounded drift; a strong one holds the policy at the reference. */
static void check_bandit(int algorithm, const char *what) {
    double first, last, kl, first_s, last_s, kl_s;
    run_bandit(algorithm, 0.05f, &first, &last, &kl);
    run_bandit(algorithm, 1.0f, &first_s, &last_s, &kl_s);
    printf("bandit %-9s kl_coef 0.05: reward %.3f -> %.3f, KL %.2f nats; kl_coef 1: reward %.3f, KL %.2f\n", what,
           first, last, kl, last_s, kl_s);
    fflush(stdout);
    ck_assert_msg(first < 0.1 && last > 0.6, "%s: reward %.3f -> %.3f did not rise clearly", what, first, last);
    ck_assert_msg(kl < 8.0, "%s: KL %.3f per response ran away", what, kl);
    ck_assert_msg(kl_s < 1.0 && last_s < 0.3, "%s: a strong KL penalty let the policy drift (KL %.3f, reward %.3f)",
                  what, kl_s, last_s);
}

START_TEST(bandit_reinforce) { check_bandit(LIBPERL_PG_REINFORCE, "REINFORCE"); }
END_TEST
START_TEST(bandit_rloo) { check_bandit(LIBPERL_PG_RLOO, "RLOO"); }
END_TEST
START_TEST(bandit_ppo) { check_bandit(LIBPERL_PG_PPO, "PPO"); }
END_TEST

/* A deterministic batch for step k (no generation, so runs compare bit for bit). */
static void scripted_batch(rollouts *r, int k) {
    rollouts_prompts(r);
    for (int b = 0; b < BANDIT_ROWS; b++) {
        r->resp_len[b] = 1 + (b + k) % BANDIT_RESPONSE;
        r->reward[b] = (float)((b * 7 + k * 3) % 5) / 4.0f;
        for (int j = 0; j < BANDIT_RESPONSE; j++) {
            r->resp[b * BANDIT_RESPONSE + j] = (b * 5 + j * 3 + k) % VOCAB;
            r->logp[b * BANDIT_RESPONSE + j] = -2.0f - 0.1f * (float)((b + j + k) % 7);
        }
    }
}

/* ---- identities --------------------------------------------------------------------- */

/* A fresh adapter (B = 0) is the reference: per-token log-probs equal bitwise, KL exactly 0. */
START_TEST(zero_adapter_kl_is_zero) {
    perl_model *m = bandit_model();
    rollouts r;
    rollouts_prompts(&r);
    sample_and_reward(&r, m, NULL, 5);
    for (int est = LIBPERL_KL_K1; est <= LIBPERL_KL_K3; est++) {
        for (int mode = LIBPERL_KL_IN_REWARD; mode <= LIBPERL_KL_IN_LOSS; mode++) {
            perl_lora *policy = bandit_adapter(m, 1e-2f, 3);
            perl_policy_options o;
            perl_policy_options_init(&o);
            o.kl_estimator = est, o.kl_mode = mode, o.kl_coef = 0.5f, o.algorithm = mode ? LIBPERL_PG_GRPO : 0;
            o.group_size = 4;
            perl_policy_trainer *tr = NULL;
            ck_assert_int_eq(perl_policy_create(&tr, m, policy, NULL, &o), LIBPERL_OK);
            perl_policy_stats s;
            perl_policy_stats_init(&s);
            ck_assert_int_eq(perl_policy_step(tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, r.reward, NULL, &s),
                             LIBPERL_OK);
            ck_assert_msg(s.kl == 0.0f, "estimator %d mode %d: KL %g of a zero adapter", est, mode, (double)s.kl);
            perl_policy_free(tr);
            perl_lora_free(policy);
        }
    }
    /* the same identity through the public inference path */
    perl_lora *fresh = bandit_adapter(m, 1e-2f, 4);
    float a[BANDIT_ROWS * BANDIT_PROMPT], b[BANDIT_ROWS * BANDIT_PROMPT];
    ck_assert_int_eq(perl_model_token_logprobs(m, NULL, &r.prompts, a), LIBPERL_OK);
    ck_assert_int_eq(perl_model_token_logprobs(m, fresh, &r.prompts, b), LIBPERL_OK);
    ck_assert(memcmp(a, b, sizeof a) == 0);
    perl_lora_free(fresh);
    perl_model_free(m);
}
END_TEST

/* A FULL-mode policy is a copy of the base: its reference is the base itself, so KL is exactly 0 too. */
START_TEST(full_mode_reference) {
    perl_model *m = bandit_model();
    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.mode = LIBPERL_MODE_FULL;
    perl_lora *policy = NULL;
    ck_assert_int_eq(perl_lora_create(&policy, m, &lo), LIBPERL_OK);
    perl_policy_options o;
    perl_policy_options_init(&o);
    o.kl_estimator = LIBPERL_KL_K3;
    perl_policy_trainer *tr = NULL;
    ck_assert_int_eq(perl_policy_create(&tr, m, policy, NULL, &o), LIBPERL_OK);
    rollouts r;
    rollouts_prompts(&r);
    sample_and_reward(&r, m, NULL, 9);
    perl_policy_stats s;
    for (int k = 0; k < 2; k++) {
        perl_policy_stats_init(&s);
        ck_assert_int_eq(perl_policy_step(tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, r.reward, NULL, &s),
                         LIBPERL_OK);
        ck_assert_msg(k == 1 || s.kl == 0.0f, "FULL copy of the base: KL %g", (double)s.kl);
    }
    ck_assert_msg(s.kl != 0.0f, "the FULL policy did not move");
    perl_policy_free(tr);
    perl_lora_free(policy);
    perl_model_free(m);
}
END_TEST

/*
 * With lr 0 the parameters never move, so the REINFORCE loss is
 * -sum_t w_t (r_b - baseline) logp_t = L0 + baseline * S.  Rewards r, r + c,
 * r + 2c give baselines m, m (the first step uses its batch mean, then
 * 0.9 m + 0.1 m), then 0.9 m + 0.1 (m + c); so the loss changes are
 * -c S and -1.9 c S: their ratio is 1.9 exactly when the moving average is right.
 */
START_TEST(reinforce_baseline_moving_average) {
    perl_model *m = bandit_model();
    perl_lora *policy = bandit_adapter(m, 0.0f, 10);
    float *P;
    size_t n;
    perl_lora_params(policy, &P, NULL, &n);
    for (size_t i = 0; i < n; i++) P[i] += 0.05f * perl_rand_normal(3, 4, i);
    perl_policy_options o;
    perl_policy_options_init(&o);
    o.kl_coef = 0.0f, o.baseline_decay = 0.9f;
    perl_policy_trainer *tr = NULL;
    ck_assert_int_eq(perl_policy_create(&tr, m, policy, NULL, &o), LIBPERL_OK);
    rollouts r;
    scripted_batch(&r, 1);
    double loss[3];
    const float c = 0.5f;
    for (int k = 0; k < 3; k++) {
        float shifted[BANDIT_ROWS];
        for (int b = 0; b < BANDIT_ROWS; b++) shifted[b] = r.reward[b] + (float)k * c;
        perl_policy_stats s;
        perl_policy_stats_init(&s);
        ck_assert_int_eq(perl_policy_step(tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, shifted, NULL, &s),
                         LIBPERL_OK);
        loss[k] = s.loss;
    }
    double ratio = (loss[2] - loss[0]) / (loss[1] - loss[0]);
    printf("REINFORCE baseline: loss changes ratio %.6f (1.9 expected)\n", ratio);
    ck_assert_msg(fabs(ratio - 1.9) < 1e-3, "baseline moving average: ratio %g, expected 1.9", ratio);
    perl_policy_free(tr);
    perl_lora_free(policy);
    perl_model_free(m);
}
END_TEST

/* Ziegler et al.: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon, after each step. */
START_TEST(adaptive_kl_coefficient) {
    perl_model *m = bandit_model();
    perl_lora *policy = bandit_adapter(m, 5e-2f, 11);
    perl_policy_options o;
    perl_policy_options_init(&o);
    o.kl_coef = 0.1f, o.kl_target = 0.05f, o.kl_horizon = 64.0f;
    perl_policy_trainer *tr = NULL;
    ck_assert_int_eq(perl_policy_create(&tr, m, policy, NULL, &o), LIBPERL_OK);
    perl_policy_stats prev, s;
    for (int k = 0; k < 6; k++) {
        rollouts r;
        scripted_batch(&r, k);
        perl_policy_stats_init(&s);
        ck_assert_int_eq(perl_policy_step(tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, r.reward, NULL, &s),
                         LIBPERL_OK);
        if (k == 0) {
            ck_assert(s.kl_coef == 0.1f);
        } else {
            double e = fmin(0.2, fmax(-0.2, prev.kl / 0.05 - 1.0));
            double want = prev.kl_coef * (1.0 + e * BANDIT_ROWS / 64.0);
            ck_assert_msg(fabs(s.kl_coef - want) <= 1e-6 * want, "step %d: kl_coef %g, expected %g", k,
                          (double)s.kl_coef, want);
        }
        prev = s;
    }
    printf("adaptive KL: coefficient 0.1 -> %.5f after 5 updates (last KL %.4f, target 0.05)\n", (double)s.kl_coef,
           (double)s.kl);
    perl_policy_free(tr);
    perl_lora_free(policy);
    perl_model_free(m);
}
END_TEST

/* ---- failure atomicity --------------------------------------------------------------- */

/* The trainer's whole state as bytes: trainer_state.bin (+ value_state.bin) of a save. */
static void *state_bytes(perl_policy_trainer *tr, size_t *len) {
    char dir[512], path[600];
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    ck_assert_msg(perl_policy_save(tr, dir) == LIBPERL_OK, "%s", perl_last_error());
    size_t a = 0, b = 0;
    char *main_state = test_read_file(test_path(path, sizeof path, dir, "trainer_state.bin"), &a);
    char *value_state = test_read_file(test_path(path, sizeof path, dir, "value_state.bin"), &b);
    ck_assert_ptr_nonnull(main_state);
    char *all = malloc(a + b + 1);
    memcpy(all, main_state, a);
    if (value_state) memcpy(all + a, value_state, b);
    *len = a + (value_state ? b : 0);
    free(main_state);
    free(value_state);
    test_remove_tree(dir);
    return all;
}

static int fail_countdown;
static int failing_hook(float *g, size_t n, void *user) {
    (void)g, (void)n, (void)user;
    return --fail_countdown == 0;
}

#define EXPECT_UNCHANGED(rc, call)                                                           \
    do {                                                                                     \
        perl_clear_error();                                                                  \
        ck_assert_int_eq((call), (rc));                                                      \
        ck_assert_str_ne(perl_last_error(), "");                                             \
        size_t len_now;                                                                      \
        void *now = state_bytes(tr, &len_now);                                               \
        ck_assert_msg(len_now == len_before && memcmp(now, before, len_before) == 0,         \
                      "line %d: a failed step changed the trainer", __LINE__);               \
        free(now);                                                                           \
    } while (0)

START_TEST(bad_input_leaves_state) {
    perl_model *m = bandit_model();
    perl_lora *policy = bandit_adapter(m, 1e-2f, 5), *value = bandit_adapter(m, 1e-2f, 6);
    perl_policy_options o;
    perl_policy_options_init(&o);
    o.algorithm = LIBPERL_PG_PPO, o.ppo_epochs = 2, o.ppo_minibatches = 2, o.kl_target = 1.0f;
    perl_policy_trainer *tr = NULL;
    ck_assert_int_eq(perl_policy_create(&tr, m, policy, value, &o), LIBPERL_OK);
    rollouts r;
    rollouts_prompts(&r);
    sample_and_reward(&r, m, policy, 7);
    ck_assert_int_eq(perl_policy_step(tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, r.reward, r.logp, NULL),
                     LIBPERL_OK);
    size_t len_before;
    void *before = state_bytes(tr, &len_before);
    const int32_t *resp = r.resp, *rl = r.resp_len;
    const float *rw = r.reward, *lp = r.logp;

    r.reward[3] = NAN;
    EXPECT_UNCHANGED(LIBPERL_ERR_NUMERIC, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.reward[3] = INFINITY;
    EXPECT_UNCHANGED(LIBPERL_ERR_NUMERIC, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.reward[3] = 0.5f;
    r.logp[2] = NAN;
    EXPECT_UNCHANGED(LIBPERL_ERR_NUMERIC, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.logp[2] = -1.0f;
    r.resp[5] = VOCAB;
    EXPECT_UNCHANGED(LIBPERL_ERR_RANGE, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.resp[5] = 1;
    r.prompt[3] = -2;
    EXPECT_UNCHANGED(LIBPERL_ERR_RANGE, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.prompt[3] = 3;
    r.resp_len[4] = 0;
    EXPECT_UNCHANGED(LIBPERL_ERR_RANGE, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.resp_len[4] = BANDIT_RESPONSE + 1;
    EXPECT_UNCHANGED(LIBPERL_ERR_RANGE, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.resp_len[4] = 2;
    /* a response longer than the context (16): prompt 2 + 15 */
    int32_t long_resp[BANDIT_ROWS * 15] = {0}, long_len[BANDIT_ROWS];
    float long_lp[BANDIT_ROWS * 15] = {0};
    for (int b = 0; b < BANDIT_ROWS; b++) long_len[b] = b == 9 ? 15 : 3;
    EXPECT_UNCHANGED(LIBPERL_ERR_RANGE, perl_policy_step(tr, &r.prompts, long_resp, long_len, 15, rw, long_lp, NULL));
    r.prompts.batch_size = 15; /* not a multiple of ppo_minibatches 2 */
    EXPECT_UNCHANGED(LIBPERL_ERR_INVALID_ARGUMENT,
                     perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    r.prompts.batch_size = BANDIT_ROWS;
    EXPECT_UNCHANGED(LIBPERL_ERR_INVALID_ARGUMENT, perl_policy_step(tr, &r.prompts, resp, rl, 0, rw, lp, NULL));
    EXPECT_UNCHANGED(LIBPERL_ERR_INVALID_ARGUMENT, perl_policy_step(tr, NULL, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    EXPECT_UNCHANGED(LIBPERL_ERR_INVALID_ARGUMENT,
                     perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, NULL, lp, NULL));
    /* a failure after some optimizer updates: the gradient hook refuses the third of 8 */
    fail_countdown = 3;
    ck_assert_int_eq(perl_lora_set_grad_hook(policy, failing_hook, NULL), LIBPERL_OK);
    EXPECT_UNCHANGED(LIBPERL_ERR_CALLBACK, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    fail_countdown = 2; /* the value adapter's second update */
    ck_assert_int_eq(perl_lora_set_grad_hook(policy, NULL, NULL), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_set_grad_hook(value, failing_hook, NULL), LIBPERL_OK);
    EXPECT_UNCHANGED(LIBPERL_ERR_CALLBACK, perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL));
    ck_assert_int_eq(perl_lora_set_grad_hook(value, NULL, NULL), LIBPERL_OK);
    /* and a good step still works and changes the state */
    ck_assert_int_eq(perl_policy_step(tr, &r.prompts, resp, rl, BANDIT_RESPONSE, rw, lp, NULL), LIBPERL_OK);
    size_t len_after;
    void *after = state_bytes(tr, &len_after);
    ck_assert(len_after == len_before && memcmp(after, before, len_before) != 0);
    free(after);
    free(before);
    perl_policy_free(tr);
    perl_lora_free(policy);
    perl_lora_free(value);
    perl_model_free(m);
}
END_TEST

START_TEST(bad_options) {
    perl_model *m = bandit_model(), *other = bandit_model();
    perl_lora *policy = bandit_adapter(m, 1e-2f, 5), *spare = bandit_adapter(m, 1e-2f, 6);
    perl_lora *foreign = bandit_adapter(other, 1e-2f, 5);
    perl_policy_trainer *tr = (perl_policy_trainer *)&tr; /* must be reset to NULL on failure */
    perl_policy_options o, bad;
    perl_policy_options_init(&o);
#define BAD(rc, field_change, v)                                                          \
    do {                                                                                  \
        bad = o;                                                                          \
        field_change;                                                                     \
        ck_assert_int_eq(perl_policy_create(&tr, m, policy, v, &bad), (rc));              \
        ck_assert_ptr_null(tr);                                                           \
        tr = (perl_policy_trainer *)&tr;                                                  \
    } while (0)
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.struct_size = 4, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.algorithm = 9, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (bad.algorithm = LIBPERL_PG_RLOO, bad.group_size = 1), NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.kl_coef = -1.0f, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.kl_estimator = 3, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.kl_mode = 2, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (bad.kl_target = 1.0f, bad.kl_horizon = 0.0f), NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.entropy_coef = NAN, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.baseline_decay = 1.5f, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, bad.loss_norm = 2, NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (bad.algorithm = LIBPERL_PG_PPO, bad.clip_eps = 0.0f), NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (bad.algorithm = LIBPERL_PG_PPO, bad.ppo_epochs = 0), NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (bad.algorithm = LIBPERL_PG_PPO, bad.gamma = 1.5f), NULL);
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (void)0, policy);                  /* value == policy */
    BAD(LIBPERL_ERR_INVALID_ARGUMENT, (void)0, spare);                   /* a value adapter without PPO */
    BAD(LIBPERL_ERR_SHAPE, bad.algorithm = LIBPERL_PG_PPO, foreign);     /* one for another model */
#undef BAD
    ck_assert_int_eq(perl_policy_create(&tr, other, policy, NULL, &o), LIBPERL_ERR_SHAPE);
    ck_assert_int_eq(perl_policy_create(NULL, m, policy, NULL, &o), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_policy_free(NULL);
    perl_lora_free(policy);
    perl_lora_free(spare);
    perl_lora_free(foreign);
    perl_model_free(m);
    perl_model_free(other);
}
END_TEST

/* ---- save / load / resume ------------------------------------------------------------- */

typedef struct run {
    perl_lora *policy, *value;
    perl_policy_trainer *tr;
} run;

static void run_start(run *x, perl_model *m, const perl_policy_options *o) {
    x->policy = bandit_adapter(m, 1e-2f, 8);
    x->value = o->algorithm == LIBPERL_PG_PPO ? bandit_adapter(m, 1e-2f, 9) : NULL;
    ck_assert_int_eq(perl_policy_create(&x->tr, m, x->policy, x->value, o), LIBPERL_OK);
}

static void run_steps(run *x, int from, int to, perl_policy_stats *last) {
    for (int k = from; k < to; k++) {
        rollouts r;
        scripted_batch(&r, k);
        perl_policy_stats_init(last);
        ck_assert_msg(perl_policy_step(x->tr, &r.prompts, r.resp, r.resp_len, BANDIT_RESPONSE, r.reward,
                                       x->value ? r.logp : NULL, last) == LIBPERL_OK, "%s", perl_last_error());
    }
}

static void run_end(run *x) {
    perl_policy_free(x->tr);
    perl_lora_free(x->policy);
    perl_lora_free(x->value);
}

static void check_resume(const perl_policy_options *o, const char *what) {
    enum { K = 3 };
    perl_model *m = bandit_model();
    char dir[512];
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    run a, b;
    perl_policy_stats sa, sb;
    run_start(&a, m, o);
    run_steps(&a, 0, K, &sa);
    ck_assert_msg(perl_policy_save(a.tr, dir) == LIBPERL_OK, "%s", perl_last_error());
    run_steps(&a, K, 2 * K, &sa);
    run_start(&b, m, o);
    ck_assert_msg(perl_policy_load(b.tr, dir) == LIBPERL_OK, "%s", perl_last_error());
    run_steps(&b, K, 2 * K, &sb);
    ck_assert_int_eq(sa.step, 2 * K);
    ck_assert_int_eq(sb.step, 2 * K);
    ck_assert_msg(memcmp(&sa, &sb, sizeof sa) == 0, "%s: the resumed run's stats differ", what);
    ck_assert_msg(memcmp(a.policy->params, b.policy->params, a.policy->n_params * sizeof(float)) == 0,
                  "%s: resumed policy parameters differ", what);
    ck_assert(memcmp(a.policy->adam_v, b.policy->adam_v, a.policy->n_params * sizeof(float)) == 0);
    if (a.value)
        ck_assert_msg(memcmp(a.value->params, b.value->params, a.value->n_params * sizeof(float)) == 0,
                      "%s: resumed value parameters differ", what);
    char path[600];
    ck_assert(test_file_exists(test_path(path, sizeof path, dir, "adapter/adapter_config.json")));
    ck_assert(!a.value || test_file_exists(test_path(path, sizeof path, dir, "value/adapter_model.safetensors")));
    printf("policy resume %s: %d + save + load + %d steps == %d steps, bit for bit (kl_coef %.6f)\n", what, K, K,
           2 * K, (double)sb.kl_coef);
    fflush(stdout);
    run_end(&a);
    run_end(&b);
    test_remove_tree(dir);
    perl_model_free(m);
}

START_TEST(save_load_resume) {
    perl_policy_options o;
    perl_policy_options_init(&o);
    o.kl_target = 0.5f, o.kl_horizon = 100.0f, o.entropy_coef = 0.01f; /* baseline and an adaptive coefficient */
    check_resume(&o, "REINFORCE");
    perl_policy_options_init(&o);
    o.algorithm = LIBPERL_PG_PPO, o.ppo_epochs = 2, o.ppo_minibatches = 4, o.value_clip = 0.2f;
    o.kl_mode = LIBPERL_KL_IN_LOSS, o.kl_estimator = LIBPERL_KL_K3;
    check_resume(&o, "PPO");
}
END_TEST

START_TEST(load_mismatch_leaves_state) {
    perl_model *m = bandit_model();
    perl_policy_options o;
    perl_policy_options_init(&o);
    char dir[512], path[600];
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    run a, b;
    perl_policy_stats s;
    run_start(&a, m, &o);
    run_steps(&a, 0, 2, &s);
    ck_assert_int_eq(perl_policy_save(a.tr, dir), LIBPERL_OK);
    o.algorithm = LIBPERL_PG_PPO;
    run_start(&b, m, &o);
    run_steps(&b, 0, 1, &s);
    perl_policy_trainer *tr = b.tr;
    size_t len_before;
    void *before = state_bytes(tr, &len_before);
    EXPECT_UNCHANGED(LIBPERL_ERR_SHAPE, perl_policy_load(tr, dir)); /* REINFORCE state into PPO */
    EXPECT_UNCHANGED(LIBPERL_ERR_IO, perl_policy_load(tr, "/nonexistent/policy/checkpoint"));
    /* a corrupt trainer_state.bin */
    size_t len;
    unsigned char *bytes = test_read_file(test_path(path, sizeof path, dir, "trainer_state.bin"), &len);
    bytes[len / 2] ^= 0x40;
    ck_assert_int_eq(test_write_file(path, bytes, len), 0);
    free(bytes);
    EXPECT_UNCHANGED(LIBPERL_ERR_FORMAT, perl_policy_load(tr, dir));
    free(before);
    run_end(&a);
    run_end(&b);
    test_remove_tree(dir);
    perl_model_free(m);
}
END_TEST

Suite *suite_policy(void) {
    Suite *s = suite_create("policy");
    TCase *tc = tcase_create("policy");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, fixtures_pg);
    tcase_add_test(tc, fixtures_ppo);
    tcase_add_test(tc, zero_adapter_kl_is_zero);
    tcase_add_test(tc, full_mode_reference);
    tcase_add_test(tc, reinforce_baseline_moving_average);
    tcase_add_test(tc, adaptive_kl_coefficient);
    tcase_add_test(tc, bandit_reinforce);
    tcase_add_test(tc, bandit_rloo);
    tcase_add_test(tc, bandit_ppo);
    tcase_add_test(tc, bad_input_leaves_state);
    tcase_add_test(tc, bad_options);
    tcase_add_test(tc, save_load_resume);
    tcase_add_test(tc, load_mismatch_leaves_state);
    suite_add_tcase(s, tc);
    return s;
}
