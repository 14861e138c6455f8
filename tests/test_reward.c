/*
 * Reward models (lib/reward.c): scores, losses and gradients against PyTorch
 * (fixtures from tests/reference/gen_reward_fixtures.py, see
 * docs/reward-model.md), directional finite differences in FULL mode, a
 * synthetic preference task learned to > 95% held-out accuracy, a matrix of
 * bad inputs that must leave the adapter untouched, and save / load / resume
 * that reproduces uninterrupted training bit for bit.
 */
#define _POSIX_C_SOURCE 200809L /* getenv, snprintf, mkdtemp via test_util.h */

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine.h"
#include "safetensors.h"
#include "test_util.h"

#define SCORE_RTOL 1e-4 /* scores are dot products of forward outputs (held to 1e-4 elsewhere) */
#define GRAD_RTOL 1e-3  /* as the SFT gradients in test_reference.c */
#define LOSS_RTOL 1e-4

/* ---- fixtures ------------------------------------------------------------------ */

static const char *fixture_dir(void) {
    static char dir[512]; /* short enough that dir + '/' + name fits callers' path buffers */
    if (dir[0] == '\0' && test_fixture_dir(dir, sizeof dir, "reward_lora/adapter_config.json") == NULL)
        ck_abort_msg("reward fixtures not found: set LIBPERL_FIXTURE_DIR or run from the repository root");
    return dir;
}

static const char *fixture_path(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", fixture_dir(), name);
    return buf;
}

static void fixture_open(st_file *f, const char *name, const char *kind) {
    char path[1200];
    fixture_path(path, sizeof path, name);
    ck_assert_msg(st_open(f, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    const char *format = st_metadata(f, "format"), *version = st_metadata(f, "version");
    const char *k = st_metadata(f, "kind");
    ck_assert_msg(format && strcmp(format, "libperl-fixture") == 0, "%s: not a libperl fixture", path);
    ck_assert_msg(version && strcmp(version, "1") == 0, "%s: fixture version %s, want 1", path,
                  version ? version : "(none)");
    ck_assert_msg(k && strcmp(k, kind) == 0, "%s: kind %s, want %s", path, k ? k : "(none)", kind);
}

static const st_tensor *fixture_tensor(const st_file *f, const char *name, size_t numel) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: no tensor %s", f->path, name);
    ck_assert_msg(t->numel == numel, "%s: %s has %llu elements, want %zu", f->path, name, (unsigned long long)t->numel,
                  numel);
    return t;
}

static float *fixture_f32(const st_file *f, const char *name, size_t numel) {
    const st_tensor *t = fixture_tensor(f, name, numel);
    float *out = malloc(numel * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_msg(st_to_f32(t, out) == LIBPERL_OK, "%s: %s", name, perl_last_error());
    return out;
}

/* An I32 tensor of any size: *numel receives its element count. */
static int32_t *fixture_i32(const st_file *f, const char *name, size_t *numel) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL && t->dtype == ST_I32, "%s: no I32 tensor %s", f->path, name);
    int32_t *out = malloc(t->numel * sizeof *out);
    ck_assert_ptr_nonnull(out);
    memcpy(out, t->data, t->numel * sizeof *out);
    *numel = t->numel;
    return out;
}

static double fixture_scalar(const st_file *f, const char *name) {
    float *v = fixture_f32(f, name, 1);
    double x = v[0];
    free(v);
    return x;
}

/* A batch read from "<prefix>tokens" [B, T] and "<prefix>lengths" [B]. */
typedef struct fixture_rows {
    int32_t *tokens, *lengths;
    perl_batch batch;
} fixture_rows;

static void fixture_rows_read(fixture_rows *r, const st_file *f, const char *prefix) {
    char name[64];
    size_t n_tokens, n_rows;
    snprintf(name, sizeof name, "%stokens", prefix);
    r->tokens = fixture_i32(f, name, &n_tokens);
    snprintf(name, sizeof name, "%slengths", prefix);
    r->lengths = fixture_i32(f, name, &n_rows);
    perl_batch_init(&r->batch);
    r->batch.batch_size = (int32_t)n_rows;
    r->batch.seq_len = (int32_t)(n_tokens / n_rows);
    r->batch.tokens = r->tokens;
    r->batch.lengths = r->lengths;
}

static void fixture_rows_free(fixture_rows *r) {
    free(r->tokens);
    free(r->lengths);
}

/* Prints the worst difference relative to max |want|; returns 1 beyond rtol. */
static int expect_close(const char *what, const float *got, const float *want, size_t n, double rtol) {
    double max_ref = 0.0, max_diff = 0.0;
    size_t worst = 0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        finite &= isfinite(got[i]) != 0;
        max_ref = fmax(max_ref, fabs((double)want[i]));
        if (d > max_diff) max_diff = d, worst = i;
    }
    double rel = !finite ? INFINITY : max_ref > 0.0 ? max_diff / max_ref : max_diff;
    printf("reward: %-72s max|ref| %.3e max|diff| %.3e (at %zu) rel %.3e\n", what, max_ref, max_diff, worst, rel);
    if (rel <= rtol) return 0;
    printf("reward: FAIL %s: %.3e > %.0e\n", what, rel, rtol);
    return 1;
}

static int expect_scalar(const char *what, double got, double want, double rtol) {
    double rel = fabs(got - want) / fmax(1.0, fabs(want));
    printf("reward: %-72s got %.7f want %.7f rel %.3e\n", what, got, want, rel);
    return rel > rtol;
}

static perl_model *load_tiny(void) {
    char path[1200];
    perl_model *m = NULL;
    fixture_path(path, sizeof path, "tiny");
    ck_assert_msg(perl_model_load(&m, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    return m;
}

/* Loads reward_lora/ as a reward model with the optimizer set so that a step
 * leaves the parameters and the raw gradients in place: lr 0, no clipping. */
static perl_reward *load_reference_reward(perl_model *m, int objective, perl_lora **out_lora, const st_file *f) {
    char path[1200];
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.objective = objective;
    const char *cc = st_metadata(f, "center_coef"), *pw = st_metadata(f, "pos_weight");
    const char *nw = st_metadata(f, "neg_weight");
    if (cc) ro.center_coef = strtof(cc, NULL);
    if (pw) ro.pos_weight = strtof(pw, NULL);
    if (nw) ro.neg_weight = strtof(nw, NULL);
    perl_reward *rw = NULL;
    fixture_path(path, sizeof path, "reward_lora");
    ck_assert_msg(perl_reward_load(&rw, out_lora, m, path, &ro) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = 0.0f, oo.max_grad_norm = 0.0f, oo.weight_decay = 0.0f;
    ck_assert_int_eq(perl_lora_set_optimizer(*out_lora, &oo), LIBPERL_OK);
    return rw;
}

/* Compares every adapter gradient ("grad.<PEFT name>") and the head's. */
static int expect_grads(const char *tag, const perl_lora *lora, const st_file *f) {
    const perl_model_config *c = &lora->model->cfg;
    int failures = 0;
    size_t compared = 0;
    char name[256], what[320];
    for (int l = 0; l < c->n_layers; l++) {
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            const lora_module *mod = lora_module_at(lora, l, t);
            ck_assert_ptr_nonnull(mod);
            for (int ab = 0; ab < 2; ab++) {
                size_t n = ab ? (size_t)mod->out * lora->opts.rank : (size_t)lora->opts.rank * mod->in;
                snprintf(name, sizeof name, "grad.base_model.model.model.layers.%d.%s.%s.lora_%c.weight", l,
                         lora_target_parent(t), lora_target_name(t), ab ? 'B' : 'A');
                float *want = fixture_f32(f, name, n);
                snprintf(what, sizeof what, "%s d%s", tag, name + 5);
                failures += expect_close(what, ab ? mod->dB : mod->dA, want, n, GRAD_RTOL);
                free(want);
                compared++;
            }
        }
    }
    float *want = fixture_f32(f, "grad.base_model.model.score.weight", (size_t)c->dim);
    snprintf(what, sizeof what, "%s dscore.weight", tag);
    failures += expect_close(what, lora->dhead, want, (size_t)c->dim, GRAD_RTOL);
    free(want);
    compared++;
    size_t in_file = 0;
    for (size_t i = 0; i < f->n_tensors; i++) in_file += strncmp(f->tensors[i].name, "grad.", 5) == 0;
    ck_assert_msg(compared == in_file, "%s: compared %zu gradients, the fixture has %zu", tag, compared, in_file);
    return failures;
}

START_TEST(reference_pairwise) {
    perl_model *m = load_tiny();
    st_file f;
    fixture_open(&f, "reward_pairwise.safetensors", "reward_pairwise");
    perl_lora *lora;
    perl_reward *rw = load_reference_reward(m, LIBPERL_REWARD_PAIRWISE, &lora, &f);
    fixture_rows chosen, rejected;
    fixture_rows_read(&chosen, &f, "chosen_");
    fixture_rows_read(&rejected, &f, "rejected_");
    int B = chosen.batch.batch_size;
    ck_assert_int_ne(chosen.batch.seq_len, rejected.batch.seq_len); /* the two sides are padded differently */
    float *margins = fixture_f32(&f, "margins", (size_t)B);
    float *want_c = fixture_f32(&f, "chosen_scores", (size_t)B),
          *want_r = fixture_f32(&f, "rejected_scores", (size_t)B);
    float got_c[8], got_r[8], scored[8];
    float *P;
    size_t n;
    perl_lora_params(lora, &P, NULL, &n);
    float *before = malloc(n * sizeof *before);
    memcpy(before, P, n * sizeof *before);

    perl_reward_stats st;
    perl_reward_stats_init(&st);
    ck_assert_msg(perl_reward_step_pairwise(rw, &chosen.batch, &rejected.batch, margins, got_c, got_r, &st) ==
                      LIBPERL_OK,
                  "%s", perl_last_error());
    int failures = 0;
    failures += expect_close("pairwise chosen scores", got_c, want_c, (size_t)B, SCORE_RTOL);
    failures += expect_close("pairwise rejected scores", got_r, want_r, (size_t)B, SCORE_RTOL);
    failures += expect_scalar("pairwise loss", st.loss, fixture_scalar(&f, "loss"), LOSS_RTOL);
    failures += expect_scalar("pairwise mean margin", st.mean_margin, fixture_scalar(&f, "mean_margin"), LOSS_RTOL);
    failures += expect_scalar("pairwise accuracy", st.accuracy, fixture_scalar(&f, "accuracy"), 1e-6);
    failures += expect_grads("pairwise", lora, &f);
    ck_assert_int_eq(st.step, 1);
    ck_assert_msg(memcmp(before, P, n * sizeof *P) == 0, "lr 0 moved the parameters");
    /* inference agrees with the training forward */
    ck_assert_int_eq(perl_reward_score(rw, &chosen.batch, scored), LIBPERL_OK);
    failures += expect_close("perl_reward_score chosen", scored, want_c, (size_t)B, SCORE_RTOL);
    ck_assert_int_eq(perl_reward_score(rw, &rejected.batch, scored), LIBPERL_OK);
    failures += expect_close("perl_reward_score rejected", scored, want_r, (size_t)B, SCORE_RTOL);
    ck_assert_msg(failures == 0, "pairwise: %d quantities differ from the reference", failures);

    free(before);
    free(margins);
    free(want_c);
    free(want_r);
    fixture_rows_free(&chosen);
    fixture_rows_free(&rejected);
    st_close(&f);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

START_TEST(reference_pointwise) {
    perl_model *m = load_tiny();
    st_file f;
    fixture_open(&f, "reward_pointwise.safetensors", "reward_pointwise");
    perl_lora *lora;
    perl_reward *rw = load_reference_reward(m, LIBPERL_REWARD_POINTWISE, &lora, &f);
    fixture_rows rows;
    fixture_rows_read(&rows, &f, "");
    int B = rows.batch.batch_size;
    float *labels = fixture_f32(&f, "labels", (size_t)B), *want = fixture_f32(&f, "scores", (size_t)B);
    float got[8];
    perl_reward_stats st;
    perl_reward_stats_init(&st);
    ck_assert_msg(perl_reward_step_pointwise(rw, &rows.batch, labels, got, &st) == LIBPERL_OK, "%s", perl_last_error());
    int failures = 0;
    failures += expect_close("pointwise scores", got, want, (size_t)B, SCORE_RTOL);
    failures += expect_scalar("pointwise loss", st.loss, fixture_scalar(&f, "loss"), LOSS_RTOL);
    failures += expect_scalar("pointwise mean score", st.mean_margin, fixture_scalar(&f, "mean_margin"), LOSS_RTOL);
    failures += expect_scalar("pointwise accuracy", st.accuracy, fixture_scalar(&f, "accuracy"), 1e-6);
    failures += expect_grads("pointwise", lora, &f);
    ck_assert_msg(failures == 0, "pointwise: %d quantities differ from the reference", failures);
    free(labels);
    free(want);
    fixture_rows_free(&rows);
    st_close(&f);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

/* ---- small random models --------------------------------------------------------- */

#define SYN_VOCAB 16
#define SYN_SEQ 12
#define SYN_MARKER 3

static perl_model *small_model(uint64_t seed) {
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = 32, cfg.hidden_dim = 64, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2;
    cfg.vocab_size = SYN_VOCAB, cfg.max_seq_len = SYN_SEQ, cfg.tied_embeddings = 0;
    perl_model *m;
    ck_assert_int_eq(perl_model_create_random(&m, &cfg, seed), LIBPERL_OK);
    return m;
}

static perl_lora *small_adapter(perl_model *m, int mode, float dropout, uint64_t seed) {
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.mode = mode, o.rank = 8, o.dropout = dropout, o.seed = seed;
    /* FULL mode ignores targets; left at the default so that a FULL state file
     * fits the adapter perl_reward_load rebuilds (the state header compares them) */
    if (mode == LIBPERL_MODE_LORA) o.target_modules = LIBPERL_TARGET_ALL;
    perl_lora *lora;
    ck_assert_msg(perl_lora_create(&lora, m, &o) == LIBPERL_OK, "%s", perl_last_error());
    return lora;
}

static perl_reward *small_reward(perl_model *m, perl_lora *lora, int objective, float lr) {
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.objective = objective;
    ro.center_coef = objective == LIBPERL_REWARD_PAIRWISE ? 0.01f : 0.0f;
    ro.seed = 11;
    perl_reward *rw;
    ck_assert_msg(perl_reward_create(&rw, m, lora, &ro) == LIBPERL_OK, "%s", perl_last_error());
    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = lr;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &oo), LIBPERL_OK);
    return rw;
}

/* Pairs of rows: chosen contains the marker token once, rejected is the same
 * row with the marker replaced by an ordinary token.  Lengths vary. */
typedef struct pairs {
    int n;
    int32_t *chosen, *rejected, *lengths;
    perl_batch bc, br;
} pairs;

static void pairs_make(pairs *p, int n, uint64_t seed) {
    p->n = n;
    p->chosen = malloc((size_t)n * SYN_SEQ * sizeof(int32_t));
    p->rejected = malloc((size_t)n * SYN_SEQ * sizeof(int32_t));
    p->lengths = malloc((size_t)n * sizeof(int32_t));
    perl_rng rng;
    perl_rng_seed(&rng, seed);
    for (int b = 0; b < n; b++) {
        int len = 4 + (int)(perl_rng_next(&rng) % (SYN_SEQ - 3)), at = (int)(perl_rng_next(&rng) % (uint64_t)len);
        p->lengths[b] = len;
        for (int t = 0; t < SYN_SEQ; t++) {
            int32_t tok = t < len ? 4 + (int32_t)(perl_rng_next(&rng) % (SYN_VOCAB - 4)) : 0;
            p->chosen[b * SYN_SEQ + t] = t == at ? SYN_MARKER : tok;
            p->rejected[b * SYN_SEQ + t] = tok;
        }
    }
    perl_batch_init(&p->bc);
    p->bc.batch_size = n, p->bc.seq_len = SYN_SEQ, p->bc.tokens = p->chosen, p->bc.lengths = p->lengths;
    p->br = p->bc;
    p->br.tokens = p->rejected;
}

/* A window of rows [first, first + count) as a batch. */
static perl_batch pairs_window(const perl_batch *all, int first, int count) {
    perl_batch b = *all;
    b.batch_size = count;
    b.tokens = all->tokens + (size_t)first * SYN_SEQ;
    b.lengths = all->lengths + first;
    return b;
}

static void pairs_free(pairs *p) {
    free(p->chosen);
    free(p->rejected);
    free(p->lengths);
}

/* Fraction of pairs whose chosen row scores higher. */
static double pair_accuracy(perl_reward *rw, const pairs *p) {
    float *sc = malloc((size_t)p->n * sizeof *sc), *sr = malloc((size_t)p->n * sizeof *sr);
    ck_assert_int_eq(perl_reward_score(rw, &p->bc, sc), LIBPERL_OK);
    ck_assert_int_eq(perl_reward_score(rw, &p->br, sr), LIBPERL_OK);
    int right = 0;
    for (int i = 0; i < p->n; i++) right += sc[i] > sr[i];
    free(sc);
    free(sr);
    return (double)right / p->n;
}

/* Pointwise view of a pair set: chosen rows labelled 1, rejected rows 0, interleaved. */
static void pointwise_batch(const pairs *p, int first, int count, int32_t *tokens, int32_t *lengths, float *labels,
                            perl_batch *out) {
    for (int i = 0; i < count; i++) {
        int b = first + i;
        memcpy(tokens + (size_t)(2 * i) * SYN_SEQ, p->chosen + (size_t)b * SYN_SEQ, SYN_SEQ * sizeof(int32_t));
        memcpy(tokens + (size_t)(2 * i + 1) * SYN_SEQ, p->rejected + (size_t)b * SYN_SEQ, SYN_SEQ * sizeof(int32_t));
        lengths[2 * i] = lengths[2 * i + 1] = p->lengths[b];
        labels[2 * i] = 1.0f, labels[2 * i + 1] = 0.0f;
    }
    perl_batch_init(out);
    out->batch_size = 2 * count, out->seq_len = SYN_SEQ, out->tokens = tokens, out->lengths = lengths;
}

/* ---- finite differences ---------------------------------------------------------- */

/* The loss at the current parameters (a step with lr 0 moves nothing). */
static double loss_at(perl_reward *rw, int objective, const pairs *p, int count) {
    perl_reward_stats st;
    perl_reward_stats_init(&st);
    if (objective == LIBPERL_REWARD_PAIRWISE) {
        perl_batch c = pairs_window(&p->bc, 0, count), r = pairs_window(&p->br, 0, count);
        float margins[8] = {0.3f, -0.2f, 0.0f, 0.1f, 0.5f, 0.0f, 0.0f, 0.0f};
        ck_assert_msg(perl_reward_step_pairwise(rw, &c, &r, margins, NULL, NULL, &st) == LIBPERL_OK, "%s",
                      perl_last_error());
    } else {
        int32_t tokens[2 * 8 * SYN_SEQ], lengths[16];
        float labels[16];
        perl_batch b;
        pointwise_batch(p, 0, count, tokens, lengths, labels, &b);
        labels[1] = 1.0f; /* not only the trivial pattern */
        ck_assert_msg(perl_reward_step_pointwise(rw, &b, labels, NULL, &st) == LIBPERL_OK, "%s", perl_last_error());
    }
    return st.loss;
}

/* (L(p + h g) - L(p - h g)) / 2h = |g|^2 along the gradient g, FULL and LoRA. */
static void check_directional(int mode, int objective) {
    perl_model *m = small_model(21);
    perl_lora *lora = small_adapter(m, mode, 0.0f, 4);
    perl_reward *rw = small_reward(m, lora, objective, 0.0f);
    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = 0.0f, oo.max_grad_norm = 0.0f;
    ck_assert_int_eq(perl_lora_set_optimizer(lora, &oo), LIBPERL_OK);
    float *P, *G;
    size_t n;
    perl_lora_params(lora, &P, &G, &n);
    for (size_t i = 0; i < n; i++) P[i] += (mode == LIBPERL_MODE_LORA ? 0.1f : 0.02f) * perl_rand_normal(5, 6, i);
    pairs p;
    pairs_make(&p, 5, 77);
    loss_at(rw, objective, &p, 5);
    float *g = malloc(n * sizeof *g), *p0 = malloc(n * sizeof *p0);
    memcpy(g, G, n * sizeof *g);
    memcpy(p0, P, n * sizeof *p0);
    double g2 = 0.0;
    for (size_t i = 0; i < n; i++) g2 += (double)g[i] * g[i];
    double h = 1e-3 / sqrt(g2);
    for (size_t i = 0; i < n; i++) P[i] = p0[i] + (float)(h * g[i]);
    double lp = loss_at(rw, objective, &p, 5);
    for (size_t i = 0; i < n; i++) P[i] = p0[i] - (float)(h * g[i]);
    double lm = loss_at(rw, objective, &p, 5);
    double fd = (lp - lm) / (2 * h), rel = fabs(fd - g2) / g2;
    printf("reward fd: mode %d objective %d: |g|^2 %.6g fd %.6g rel err %.2e\n", mode, objective, g2, fd, rel);
    ck_assert_msg(rel < 2e-2, "directional derivative %g vs |g|^2 %g", fd, g2);
    free(g);
    free(p0);
    pairs_free(&p);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}

START_TEST(fd_full_pairwise) { check_directional(LIBPERL_MODE_FULL, LIBPERL_REWARD_PAIRWISE); }
END_TEST
START_TEST(fd_full_pointwise) { check_directional(LIBPERL_MODE_FULL, LIBPERL_REWARD_POINTWISE); }
END_TEST
START_TEST(fd_lora_pointwise) { check_directional(LIBPERL_MODE_LORA, LIBPERL_REWARD_POINTWISE); }
END_TEST

/* ---- padding -------------------------------------------------------------------- */

/* Scores read the last real token: garbage after a row's length changes nothing. */
START_TEST(padding_is_ignored) {
    perl_model *m = small_model(3);
    perl_lora *lora = small_adapter(m, LIBPERL_MODE_LORA, 0.0f, 1);
    perl_reward *rw = small_reward(m, lora, LIBPERL_REWARD_PAIRWISE, 1e-3f);
    pairs p;
    pairs_make(&p, 6, 5);
    float a[6], b[6], alone;
    ck_assert_int_eq(perl_reward_score(rw, &p.bc, a), LIBPERL_OK);
    for (int i = 0; i < 6; i++)
        for (int t = p.lengths[i]; t < SYN_SEQ; t++) p.chosen[i * SYN_SEQ + t] = SYN_VOCAB - 1;
    ck_assert_int_eq(perl_reward_score(rw, &p.bc, b), LIBPERL_OK);
    ck_assert_msg(memcmp(a, b, sizeof a) == 0, "padding tokens changed the scores");
    for (int i = 0; i < 6; i++) { /* and a row alone, unpadded, scores the same */
        perl_batch one = pairs_window(&p.bc, i, 1);
        one.seq_len = p.lengths[i], one.lengths = NULL;
        ck_assert_int_eq(perl_reward_score(rw, &one, &alone), LIBPERL_OK);
        ck_assert_msg(fabsf(alone - a[i]) <= 1e-5f * fmaxf(1.0f, fabsf(a[i])), "row %d: alone %g vs batch %g", i,
                      (double)alone, (double)a[i]);
    }
    pairs_free(&p);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

/* After training on small batches, a large scoring batch runs in chunks that
 * fit the training workspace (which must not grow) and gives the scores of
 * each row scored alone. */
START_TEST(score_in_chunks) {
    perl_model *m = small_model(6);
    perl_lora *lora = small_adapter(m, LIBPERL_MODE_LORA, 0.0f, 1);
    perl_reward *rw = small_reward(m, lora, LIBPERL_REWARD_PAIRWISE, 1e-2f);
    pairs p;
    pairs_make(&p, 40, 17);
    perl_batch c = pairs_window(&p.bc, 0, 2), r = pairs_window(&p.br, 0, 2);
    ck_assert_int_eq(perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_OK);
    ck_assert_ptr_nonnull(lora->engine);
    int capacity = lora->engine->capacity;
    size_t arena = lora->engine->arena_floats;
    float all[40], alone;
    ck_assert_int_eq(perl_reward_score(rw, &p.bc, all), LIBPERL_OK);
    ck_assert_int_eq(lora->engine->capacity, capacity);
    ck_assert_uint_eq(lora->engine->arena_floats, arena);
    for (int i = 0; i < 40; i++) {
        perl_batch one = pairs_window(&p.bc, i, 1);
        ck_assert_int_eq(perl_reward_score(rw, &one, &alone), LIBPERL_OK);
        ck_assert_msg(fabsf(alone - all[i]) <= 1e-5f * fmaxf(1.0f, fabsf(all[i])), "row %d: %g vs %g", i, (double)alone,
                      (double)all[i]);
    }
    printf("reward score: 40 rows in chunks of <= %d tokens, workspace unchanged\n", capacity);
    pairs_free(&p);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

/* ---- the synthetic preference task ---------------------------------------------- */

/* Trains on marker / no-marker pairs and checks held-out pair accuracy. */
static void learn_marker(int mode, int objective, float lr, int steps) {
    perl_model *m = small_model(9);
    perl_lora *lora = small_adapter(m, mode, 0.0f, 2);
    perl_reward *rw = small_reward(m, lora, objective, lr);
    pairs train, test;
    pairs_make(&train, 512, 1001);
    pairs_make(&test, 256, 2002);
    double before = pair_accuracy(rw, &test);
    const int B = 16;
    perl_reward_stats st;
    perl_reward_stats_init(&st);
    int32_t tokens[2 * 16 * SYN_SEQ], lengths[32];
    float labels[32];
    for (int s = 0; s < steps; s++) {
        int first = (s * B) % train.n;
        if (objective == LIBPERL_REWARD_PAIRWISE) {
            perl_batch c = pairs_window(&train.bc, first, B), r = pairs_window(&train.br, first, B);
            ck_assert_msg(perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, &st) == LIBPERL_OK, "%s",
                          perl_last_error());
        } else {
            perl_batch b;
            pointwise_batch(&train, first, B, tokens, lengths, labels, &b);
            ck_assert_msg(perl_reward_step_pointwise(rw, &b, labels, NULL, &st) == LIBPERL_OK, "%s", perl_last_error());
        }
    }
    double after = pair_accuracy(rw, &test);
    printf("reward synthetic: mode %s objective %s: held-out pair accuracy %.3f -> %.3f after %d steps "
           "(last loss %.4f, train acc %.2f)\n",
           mode == LIBPERL_MODE_LORA ? "lora" : "full", objective == LIBPERL_REWARD_PAIRWISE ? "pairwise" : "pointwise",
           before, after, steps, (double)st.loss, (double)st.accuracy);
    ck_assert_int_eq(st.step, steps);
    ck_assert_msg(after > 0.95, "held-out accuracy %.3f <= 0.95", after);
    pairs_free(&train);
    pairs_free(&test);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}

START_TEST(synthetic_lora_pairwise) { learn_marker(LIBPERL_MODE_LORA, LIBPERL_REWARD_PAIRWISE, 1e-2f, 150); }
END_TEST
START_TEST(synthetic_full_pairwise) { learn_marker(LIBPERL_MODE_FULL, LIBPERL_REWARD_PAIRWISE, 3e-3f, 150); }
END_TEST
START_TEST(synthetic_lora_pointwise) { learn_marker(LIBPERL_MODE_LORA, LIBPERL_REWARD_POINTWISE, 1e-2f, 150); }
END_TEST

/* ---- bad inputs ------------------------------------------------------------------ */

static int fail_hook(float *g, size_t n, void *user) {
    (void)g, (void)n, (void)user;
    return 1;
}

/* Every case fails with `want`, sets a message, and leaves the parameters (bitwise) and the step untouched. */
typedef struct guard {
    perl_lora *lora;
    float *params;
    size_t n;
    int64_t step;
} guard;

static void guard_take(guard *g, perl_lora *lora) {
    float *P;
    perl_lora_params(lora, &P, NULL, &g->n);
    g->lora = lora;
    g->params = malloc(g->n * sizeof *P);
    memcpy(g->params, P, g->n * sizeof *P);
    g->step = lora->step;
}

static void guard_check(const guard *g, int rc, int want, const char *what) {
    ck_assert_msg(rc == want, "%s: status %d (%s), want %d", what, rc, perl_last_error(), want);
    ck_assert_msg(perl_last_error()[0] != '\0', "%s: no error message", what);
    ck_assert_msg(g->lora->n_params == g->n && memcmp(g->params, g->lora->params, g->n * sizeof(float)) == 0,
                  "%s: parameters changed", what);
    ck_assert_msg(g->lora->step == g->step, "%s: step changed", what);
    perl_clear_error();
}

START_TEST(bad_inputs_pairwise) {
    perl_model *m = small_model(4);
    perl_lora *lora = small_adapter(m, LIBPERL_MODE_LORA, 0.1f, 3);
    perl_reward *rw = small_reward(m, lora, LIBPERL_REWARD_PAIRWISE, 1e-2f);
    pairs p;
    pairs_make(&p, 4, 8);
    ck_assert_int_eq(perl_reward_step_pairwise(rw, &p.bc, &p.br, NULL, NULL, NULL, NULL), LIBPERL_OK);
    guard g;
    guard_take(&g, lora);
    uint64_t dropout_counter = lora->dropout_counter;
    float margins[4] = {0, 0, 0, 0}, out[4];
    perl_reward_stats st;
    perl_reward_stats_init(&st);
    perl_batch c = p.bc, r = p.br;

    guard_check(&g, perl_reward_step_pairwise(NULL, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "NULL reward");
    guard_check(&g, perl_reward_step_pairwise(rw, NULL, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "NULL chosen");
    guard_check(&g, perl_reward_step_pairwise(rw, &c, NULL, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "NULL rejected");
    r.batch_size = 3;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "3 rejected for 4 chosen");
    r = p.br;
    r.struct_size = 4;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "batch struct_size");
    r = p.br;
    st.struct_size = 8;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, &st), LIBPERL_ERR_INVALID_ARGUMENT,
                "stats struct_size");
    perl_reward_stats_init(&st);
    p.lengths[2] = 0; /* shared by both sides */
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_RANGE, "empty row");
    p.lengths[2] = SYN_SEQ + 1;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_RANGE,
                "length > seq_len");
    p.lengths[2] = 5;
    p.rejected[SYN_SEQ + 1] = SYN_VOCAB;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_RANGE,
                "token id = vocab");
    p.rejected[SYN_SEQ + 1] = -1;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_RANGE, "token id -1");
    p.rejected[SYN_SEQ + 1] = 5;
    c.tokens = NULL;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "NULL tokens");
    c = p.bc;
    c.batch_size = r.batch_size = 0;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "0 pairs");
    c = p.bc, r = p.br;
    margins[1] = NAN;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, margins, out, out, &st), LIBPERL_ERR_NUMERIC, "NaN margin");
    margins[1] = INFINITY;
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, margins, out, out, &st), LIBPERL_ERR_NUMERIC, "Inf margin");
    margins[1] = 0.0f;
    float labels[4] = {1, 0, 1, 0};
    guard_check(&g, perl_reward_step_pointwise(rw, &c, labels, NULL, NULL), LIBPERL_ERR_STATE,
                "pointwise on a pairwise model");
    ck_assert_int_eq(perl_lora_set_grad_hook(lora, fail_hook, NULL), LIBPERL_OK);
    guard_check(&g, perl_reward_step_pairwise(rw, &c, &r, margins, out, out, &st), LIBPERL_ERR_CALLBACK,
                "failing hook");
    ck_assert_int_eq(perl_lora_set_grad_hook(lora, NULL, NULL), LIBPERL_OK);
    ck_assert_msg(lora->dropout_counter == dropout_counter, "a failed step advanced the dropout stream");
    /* a head so large that the scores overflow: non-finite loss, nothing moves */
    float saved[2] = {lora->head[0], lora->head[1]};
    lora->head[0] = 1e38f, lora->head[1] = -1e38f;
    guard g2;
    guard_take(&g2, lora);
    guard_check(&g2, perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, &st), LIBPERL_ERR_NUMERIC,
                "overflowing scores");
    free(g2.params);
    lora->head[0] = saved[0], lora->head[1] = saved[1];
    /* scoring */
    guard_check(&g, perl_reward_score(rw, &c, NULL), LIBPERL_ERR_INVALID_ARGUMENT, "score: NULL out");
    guard_check(&g, perl_reward_score(NULL, &c, out), LIBPERL_ERR_INVALID_ARGUMENT, "score: NULL reward");
    guard_check(&g, perl_reward_score(rw, NULL, out), LIBPERL_ERR_INVALID_ARGUMENT, "score: NULL batch");

    free(g.params);
    pairs_free(&p);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

START_TEST(bad_inputs_pointwise) {
    perl_model *m = small_model(4);
    perl_lora *lora = small_adapter(m, LIBPERL_MODE_FULL, 0.0f, 3);
    perl_reward *rw = small_reward(m, lora, LIBPERL_REWARD_POINTWISE, 1e-3f);
    pairs p;
    pairs_make(&p, 4, 8);
    float labels[4] = {1, 0, 1, 0}, out[4];
    ck_assert_int_eq(perl_reward_step_pointwise(rw, &p.bc, labels, out, NULL), LIBPERL_OK);
    guard g;
    guard_take(&g, lora);
    guard_check(&g, perl_reward_step_pointwise(rw, &p.bc, NULL, out, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "NULL labels");
    guard_check(&g, perl_reward_step_pointwise(rw, NULL, labels, out, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "NULL batch");
    labels[2] = 0.5f;
    guard_check(&g, perl_reward_step_pointwise(rw, &p.bc, labels, out, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "label 0.5");
    labels[2] = -1.0f;
    guard_check(&g, perl_reward_step_pointwise(rw, &p.bc, labels, out, NULL), LIBPERL_ERR_INVALID_ARGUMENT, "label -1");
    labels[2] = NAN;
    guard_check(&g, perl_reward_step_pointwise(rw, &p.bc, labels, out, NULL), LIBPERL_ERR_NUMERIC, "NaN label");
    labels[2] = INFINITY;
    guard_check(&g, perl_reward_step_pointwise(rw, &p.bc, labels, out, NULL), LIBPERL_ERR_NUMERIC, "Inf label");
    labels[2] = 1.0f;
    p.lengths[3] = 0;
    guard_check(&g, perl_reward_step_pointwise(rw, &p.bc, labels, out, NULL), LIBPERL_ERR_RANGE, "empty row");
    p.lengths[3] = 4;
    perl_batch b = p.bc;
    b.seq_len = SYN_SEQ + 1; /* longer than the context */
    guard_check(&g, perl_reward_step_pointwise(rw, &b, labels, out, NULL), LIBPERL_ERR_RANGE, "seq_len > context");
    guard_check(&g, perl_reward_step_pairwise(rw, &p.bc, &p.br, NULL, NULL, NULL, NULL), LIBPERL_ERR_STATE,
                "pairwise on a pointwise model");
    free(g.params);

    /* every example with class weight 0 */
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.objective = LIBPERL_REWARD_POINTWISE, ro.neg_weight = 0.0f;
    perl_reward *rw0;
    ck_assert_int_eq(perl_reward_create(&rw0, m, lora, &ro), LIBPERL_OK);
    float zeros[4] = {0, 0, 0, 0};
    guard_take(&g, lora);
    guard_check(&g, perl_reward_step_pointwise(rw0, &p.bc, zeros, out, NULL), LIBPERL_ERR_INVALID_ARGUMENT,
                "total weight 0");
    free(g.params);
    perl_reward_free(rw0);

    pairs_free(&p);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

START_TEST(bad_create) {
    perl_model *m = small_model(4), *other = small_model(5);
    perl_lora *lora = small_adapter(m, LIBPERL_MODE_LORA, 0.0f, 3);
    perl_reward_options ro;
    perl_reward *rw = NULL;
    perl_reward_options_init(&ro);
    size_t n0 = perl_lora_num_params(lora);
    ck_assert_int_eq(perl_reward_create(NULL, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(perl_reward_create(&rw, NULL, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(perl_reward_create(&rw, m, NULL, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, NULL), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(perl_reward_create(&rw, other, lora, &ro), LIBPERL_ERR_SHAPE);
    ro.struct_size = 8;
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_reward_options_init(&ro);
    ro.objective = 7;
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_reward_options_init(&ro);
    ro.center_coef = -1.0f;
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_reward_options_init(&ro);
    ro.pos_weight = NAN;
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_reward_options_init(&ro);
    ro.pos_weight = ro.neg_weight = 0.0f;
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_reward_options_init(&ro);
    ro.head_init_std = -0.5f;
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(rw);
    ck_assert_uint_eq(perl_lora_num_params(lora), n0); /* no head added by a failed create */

    /* a head cannot be added once training has started */
    ck_assert_int_eq(perl_lora_zero_grad(lora), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_optimizer_step(lora, NULL), LIBPERL_OK);
    perl_reward_options_init(&ro);
    ck_assert_int_eq(perl_reward_create(&rw, m, lora, &ro), LIBPERL_ERR_STATE);
    ck_assert_ptr_null(rw);

    /* the default head std is 1 / sqrt(dim + 1) */
    perl_lora *fresh = small_adapter(m, LIBPERL_MODE_LORA, 0.0f, 3);
    ck_assert_int_eq(perl_reward_create(&rw, m, fresh, &ro), LIBPERL_OK);
    ck_assert_uint_eq(perl_lora_num_params(fresh), n0 + 32);
    double ss = 0.0;
    for (int j = 0; j < 32; j++) ss += (double)fresh->head[j] * fresh->head[j];
    double std = sqrt(ss / 32), want = 1.0 / sqrt(33.0);
    ck_assert_msg(std > 0.5 * want && std < 1.5 * want, "head std %g, want about %g", std, want);
    perl_reward_free(rw);
    perl_reward_free(NULL);

    perl_lora *lo = NULL;
    ck_assert_int_eq(perl_reward_load(&rw, &lo, m, "/nonexistent/reward", &ro), LIBPERL_ERR_IO);
    ck_assert_ptr_null(rw);
    ck_assert_ptr_null(lo);
    ck_assert_int_eq(perl_reward_load(&rw, &lo, m, NULL, &ro), LIBPERL_ERR_INVALID_ARGUMENT);
    perl_lora_free(fresh);
    perl_lora_free(lora);
    perl_model_free(m);
    perl_model_free(other);
}
END_TEST

/* ---- save / load / resume -------------------------------------------------------- */

/* `steps` pairwise steps over a fixed stream of batches starting at batch `from`. */
static void run_steps(perl_reward *rw, const pairs *p, int from, int steps) {
    for (int s = from; s < from + steps; s++) {
        perl_batch c = pairs_window(&p->bc, (s * 4) % p->n, 4), r = pairs_window(&p->br, (s * 4) % p->n, 4);
        ck_assert_msg(perl_reward_step_pairwise(rw, &c, &r, NULL, NULL, NULL, NULL) == LIBPERL_OK, "%s",
                      perl_last_error());
    }
}

/* K steps, save (PEFT / HF + state), load into a fresh adapter, K more steps:
 * bit-identical to 2K uninterrupted steps.  The adapter seed is 0 because
 * neither the PEFT config nor the state file records it and dropout masks
 * depend on it (see docs/reward-model.md). */
static void check_resume(int mode, float dropout) {
    const int K = 3;
    perl_model *m = small_model(12);
    pairs p;
    pairs_make(&p, 32, 99);
    float lr = mode == LIBPERL_MODE_LORA ? 1e-2f : 1e-3f;

    perl_lora *a = small_adapter(m, mode, dropout, 0);
    perl_reward *ra = small_reward(m, a, LIBPERL_REWARD_PAIRWISE, lr);
    run_steps(ra, &p, 0, 2 * K);

    perl_lora *b = small_adapter(m, mode, dropout, 0);
    perl_reward *rb = small_reward(m, b, LIBPERL_REWARD_PAIRWISE, lr);
    run_steps(rb, &p, 0, K);
    char dir[512], state[600], model_dir[600];
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    snprintf(state, sizeof state, "%s/state.bin", dir);
    snprintf(model_dir, sizeof model_dir, "%s/reward", dir);
    ck_assert_msg(perl_lora_save_state(b, state) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_msg(perl_lora_save(b, model_dir) == LIBPERL_OK, "%s", perl_last_error());
    float sb[4], sc[4];
    perl_batch four = pairs_window(&p.bc, 0, 4);
    ck_assert_int_eq(perl_reward_score(rb, &four, sb), LIBPERL_OK);
    perl_reward_free(rb);
    perl_lora_free(b);

    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.center_coef = 0.01f;
    perl_reward *rc = NULL;
    perl_lora *c = NULL;
    ck_assert_msg(perl_reward_load(&rc, &c, m, model_dir, &ro) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_int_eq(perl_reward_score(rc, &four, sc), LIBPERL_OK);
    ck_assert_msg(memcmp(sb, sc, sizeof sb) == 0, "the loaded reward model scores differently");
    ck_assert_msg(perl_lora_load_state(c, state) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_int_eq(c->step, K);
    run_steps(rc, &p, K, K);

    ck_assert_uint_eq(a->n_params, c->n_params);
    ck_assert_int_eq(a->step, c->step);
    ck_assert_uint_eq(a->dropout_counter, c->dropout_counter);
    ck_assert_msg(memcmp(a->params, c->params, a->n_params * sizeof(float)) == 0,
                  "mode %d: resumed training differs from uninterrupted training", mode);
    ck_assert_msg(memcmp(a->adam_m, c->adam_m, a->n_params * sizeof(float)) == 0, "moments differ");
    printf("reward resume: mode %d dropout %.1f: %d + %d steps == %d steps, bitwise\n", mode, (double)dropout, K, K,
           2 * K);

    test_remove_tree(dir);
    perl_reward_free(rc);
    perl_lora_free(c);
    perl_reward_free(ra);
    perl_lora_free(a);
    pairs_free(&p);
    perl_model_free(m);
}

START_TEST(resume_lora) { check_resume(LIBPERL_MODE_LORA, 0.1f); }
END_TEST
START_TEST(resume_full) { check_resume(LIBPERL_MODE_FULL, 0.0f); }
END_TEST

/* A reward load keeps the saved head; a load of an adapter without one fails. */
START_TEST(load_requires_head) {
    perl_model *m = load_tiny();
    char path[1200];
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    perl_reward *rw = NULL;
    perl_lora *lora = NULL;
    fixture_path(path, sizeof path, "lora_qv");
    ck_assert_int_eq(perl_reward_load(&rw, &lora, m, path, &ro), LIBPERL_ERR_FORMAT);
    ck_assert_ptr_null(rw);
    ck_assert_ptr_null(lora);
    fixture_path(path, sizeof path, "reward_lora");
    ro.head_init_std = 5.0f; /* must not reinitialise the loaded head */
    ck_assert_int_eq(perl_reward_load(&rw, &lora, m, path, &ro), LIBPERL_OK);
    st_file f;
    char file[1300];
    snprintf(file, sizeof file, "%s/adapter_model.safetensors", path);
    ck_assert_int_eq(st_open(&f, file), LIBPERL_OK);
    float *want = fixture_f32(&f, "base_model.model.score.weight", 32);
    ck_assert_msg(memcmp(want, lora->head, 32 * sizeof(float)) == 0, "the loaded head was changed");
    free(want);
    st_close(&f);
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
}
END_TEST

Suite *suite_reward(void) {
    Suite *s = suite_create("reward");
    TCase *tc = tcase_create("reference");
    tcase_add_test(tc, reference_pairwise);
    tcase_add_test(tc, reference_pointwise);
    tcase_add_test(tc, load_requires_head);
    suite_add_tcase(s, tc);

    tc = tcase_create("gradients");
    tcase_add_test(tc, fd_full_pairwise);
    tcase_add_test(tc, fd_full_pointwise);
    tcase_add_test(tc, fd_lora_pointwise);
    tcase_add_test(tc, padding_is_ignored);
    tcase_add_test(tc, score_in_chunks);
    suite_add_tcase(s, tc);

    tc = tcase_create("synthetic");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, synthetic_lora_pairwise);
    tcase_add_test(tc, synthetic_full_pairwise);
    tcase_add_test(tc, synthetic_lora_pointwise);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, bad_inputs_pairwise);
    tcase_add_test(tc, bad_inputs_pointwise);
    tcase_add_test(tc, bad_create);
    suite_add_tcase(s, tc);

    tc = tcase_create("resume");
    tcase_add_test(tc, resume_lora);
    tcase_add_test(tc, resume_full);
    suite_add_tcase(s, tc);
    return s;
}
