/*
 * Hardening: the bad-input matrix of docs/hardening.md (every public
 * function with a NULL argument, sizes, ranges, NaN/Inf, foreign adapters,
 * file-system failures), crash-safe saves under SIGKILL, regressions for the
 * loader bugs found by fuzzing (tests/fuzz/), and the threading contract.
 *
 * Cases: null_args, bad_input, files, crash_safe, fuzz_regressions, threads.
 * `make check-tsan` runs the "threads" case under ThreadSanitizer.
 */
#define _GNU_SOURCE 1 /* mount, setresuid, usleep */

#include "test_util.h"

#include <check.h>
#include <grp.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <time.h>

#include "checkpoint.h"
#include "internal.h"
#include "fileio.h"
#include "lora.h"
#include "model.h"

/* ---- shared helpers ------------------------------------------------------ */

enum { VOCAB = 19, CTX = 12, SEQ = 6, ROWS = 3 };

static char tmpdir[512];

static void setup_tmp(void)
{
    ck_assert_int_eq(test_make_temp_dir(tmpdir, sizeof tmpdir), 0);
}

static void teardown_tmp(void)
{
    fileio_set_write_fault(-1);
    test_remove_tree(tmpdir);
}

static char *tmp_path(char *buf, size_t n, const char *name)
{
    return test_path(buf, n, tmpdir, name);
}

static perl_model_config tiny_config(int dim)
{
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = dim;
    cfg.hidden_dim = dim + dim / 2;
    cfg.n_layers = 2;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.vocab_size = VOCAB;
    cfg.max_seq_len = CTX;
    return cfg;
}

static perl_model *tiny_model(int dim, uint64_t seed)
{
    perl_model_config cfg = tiny_config(dim);
    perl_model *m = NULL;
    ck_assert_msg(perl_model_create_random(&m, &cfg, seed) == LIBPERL_OK, "%s", perl_last_error());
    return m;
}

static perl_lora *tiny_lora(perl_model *m, uint32_t targets, int rank, uint64_t seed)
{
    perl_lora_options o;
    perl_lora_options_init(&o);
    o.rank = rank;
    o.target_modules = targets;
    o.seed = seed;
    perl_lora *l = NULL;
    ck_assert_msg(perl_lora_create(&l, m, &o) == LIBPERL_OK, "%s", perl_last_error());
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = 1e-2f;
    ck_assert_int_eq(perl_lora_set_optimizer(l, &opt), LIBPERL_OK);
    /* non-zero B, so the adapter changes the output */
    float *p;
    size_t n;
    ck_assert_int_eq(perl_lora_params(l, &p, NULL, &n), LIBPERL_OK);
    for (size_t i = 0; i < n; i++) p[i] = (float)((int)((i * 2654435761u) % 201) - 100) * 1e-3f;
    return l;
}

/* ROWS rows of SEQ tokens, lengths SEQ, SEQ - 2, 2 */
typedef struct tiny_batch {
    int32_t tokens[ROWS * SEQ];
    int32_t lengths[ROWS];
    perl_batch batch;
} tiny_batch;

static void tiny_batch_init(tiny_batch *b, int salt)
{
    for (int i = 0; i < ROWS * SEQ; i++) b->tokens[i] = (int32_t)((i * 5 + 3 + salt) % VOCAB);
    b->lengths[0] = SEQ, b->lengths[1] = SEQ - 2, b->lengths[2] = 2;
    perl_batch_init(&b->batch);
    b->batch.batch_size = ROWS;
    b->batch.seq_len = SEQ;
    b->batch.tokens = b->tokens;
    b->batch.lengths = b->lengths;
}

/* A copy of an adapter's trainable state, to prove a failed call changed nothing. */
typedef struct lora_guard {
    float *params;
    size_t n;
    int64_t step;
} lora_guard;

static void guard_take(lora_guard *g, perl_lora *l)
{
    float *p;
    ck_assert_int_eq(perl_lora_params(l, &p, NULL, &g->n), LIBPERL_OK);
    g->params = malloc(g->n * sizeof(float));
    memcpy(g->params, p, g->n * sizeof(float));
    g->step = l->step;
}

static void guard_expect_unchanged(const lora_guard *g, perl_lora *l, const char *what)
{
    float *p;
    size_t n;
    ck_assert_int_eq(perl_lora_params(l, &p, NULL, &n), LIBPERL_OK);
    ck_assert_msg(n == g->n && memcmp(p, g->params, n * sizeof(float)) == 0,
                  "%s: a failed call changed the parameters", what);
    ck_assert_msg(l->step == g->step, "%s: a failed call advanced the step count", what);
}

static void guard_free(lora_guard *g)
{
    free(g->params);
    g->params = NULL;
}

/* rc must be `want`, and a failure must say why. */
#define EXPECT_RC(want, call, what)                                                            \
    do {                                                                                       \
        perl_clear_error();                                                                    \
        int rc_ = (call);                                                                      \
        ck_assert_msg(rc_ == (want), "%s: rc %d (%s: %s), expected %d (%s)", (what), rc_,     \
                      perl_status_str(rc_), perl_last_error(), (want), perl_status_str(want)); \
        ck_assert_msg(rc_ == LIBPERL_OK || perl_last_error()[0] != '\0',                      \
                      "%s: failed without a message", (what));                                 \
    } while (0)

/* ---- null_args: every public function, every required pointer ------------ */

/* Handles valid enough that only the NULL argument is wrong. */
typedef struct null_ctx {
    perl_model *model;
    perl_lora *lora, *reward_lora, *policy_lora;
    perl_reward *reward;
    perl_policy_trainer *policy;
    tiny_batch tb;
    perl_batch no_tokens;
    perl_model_config cfg;
    perl_lora_options lora_opts;
    perl_optim_options optim;
    perl_generate_options gen;
    perl_reward_options reward_opts;
    perl_policy_options policy_opts;
    float out[ROWS * SEQ * VOCAB], labels[ROWS], rewards[ROWS];
    int32_t gen_tokens[ROWS * 4], gen_lengths[ROWS], responses[ROWS * 2], response_lengths[ROWS];
    char dir[600], file[700];
    /* outputs of calls that should fail; freed if one succeeds */
    perl_model *got_model;
    perl_lora *got_lora;
    perl_reward *got_reward;
    perl_policy_trainer *got_policy;
} null_ctx;

static null_ctx C;

typedef int (*null_call)(void);
typedef struct null_case {
    const char *function, *argument;
    null_call call;
} null_case;

#define NC(id, expr) \
    static int id(void) { return (expr); }
NC(nc_model_load_out, perl_model_load(NULL, C.dir))
NC(nc_model_load_path, perl_model_load(&C.got_model, NULL))
NC(nc_create_random_out, perl_model_create_random(NULL, &C.cfg, 1))
NC(nc_create_random_cfg, perl_model_create_random(&C.got_model, NULL, 1))
NC(nc_save_hf_model, perl_model_save_hf(NULL, C.dir))
NC(nc_save_hf_dir, perl_model_save_hf(C.model, NULL))
NC(nc_get_config_model, perl_model_get_config(NULL, &C.cfg))
NC(nc_get_config_out, perl_model_get_config(C.model, NULL))
NC(nc_forward_model, perl_model_forward(NULL, NULL, &C.tb.batch, C.out, NULL))
NC(nc_forward_batch, perl_model_forward(C.model, NULL, NULL, C.out, NULL))
NC(nc_forward_tokens, perl_model_forward(C.model, NULL, &C.no_tokens, C.out, NULL))
NC(nc_logprobs_model, perl_model_token_logprobs(NULL, NULL, &C.tb.batch, C.out))
NC(nc_logprobs_batch, perl_model_token_logprobs(C.model, NULL, NULL, C.out))
NC(nc_logprobs_tokens, perl_model_token_logprobs(C.model, NULL, &C.no_tokens, C.out))
NC(nc_logprobs_out, perl_model_token_logprobs(C.model, NULL, &C.tb.batch, NULL))
NC(nc_lora_create_out, perl_lora_create(NULL, C.model, &C.lora_opts))
NC(nc_lora_create_model, perl_lora_create(&C.got_lora, NULL, &C.lora_opts))
NC(nc_lora_create_opts, perl_lora_create(&C.got_lora, C.model, NULL))
NC(nc_lora_params_lora, perl_lora_params(NULL, NULL, NULL, NULL))
NC(nc_lora_save_lora, perl_lora_save(NULL, C.dir))
NC(nc_lora_save_dir, perl_lora_save(C.lora, NULL))
NC(nc_lora_load_out, perl_lora_load(NULL, C.model, C.dir))
NC(nc_lora_load_model, perl_lora_load(&C.got_lora, NULL, C.dir))
NC(nc_lora_load_dir, perl_lora_load(&C.got_lora, C.model, NULL))
NC(nc_merge_out, perl_lora_merge(NULL, C.lora))
NC(nc_merge_lora, perl_lora_merge(&C.got_model, NULL))
NC(nc_set_optimizer_lora, perl_lora_set_optimizer(NULL, &C.optim))
NC(nc_set_optimizer_opts, perl_lora_set_optimizer(C.lora, NULL))
NC(nc_set_lr_lora, perl_lora_set_lr(NULL, 1e-3f))
NC(nc_set_hook_lora, perl_lora_set_grad_hook(NULL, NULL, NULL))
NC(nc_set_recompute_lora, perl_lora_set_recompute(NULL, 1))
NC(nc_zero_grad_lora, perl_lora_zero_grad(NULL))
NC(nc_sft_backward_lora, perl_lora_sft_backward(NULL, &C.tb.batch, NULL, NULL))
NC(nc_sft_backward_batch, perl_lora_sft_backward(C.lora, NULL, NULL, NULL))
NC(nc_sft_backward_tokens, perl_lora_sft_backward(C.lora, &C.no_tokens, NULL, NULL))
NC(nc_optimizer_step_lora, perl_lora_optimizer_step(NULL, NULL))
NC(nc_sft_step_lora, perl_lora_sft_step(NULL, &C.tb.batch, NULL, NULL))
NC(nc_sft_step_batch, perl_lora_sft_step(C.lora, NULL, NULL, NULL))
NC(nc_sft_step_tokens, perl_lora_sft_step(C.lora, &C.no_tokens, NULL, NULL))
NC(nc_save_state_lora, perl_lora_save_state(NULL, C.file))
NC(nc_save_state_path, perl_lora_save_state(C.lora, NULL))
NC(nc_load_state_lora, perl_lora_load_state(NULL, C.file))
NC(nc_load_state_path, perl_lora_load_state(C.lora, NULL))
NC(nc_generate_model, perl_generate(NULL, NULL, &C.tb.batch, &C.gen, C.gen_tokens, C.gen_lengths, NULL))
NC(nc_generate_prompts, perl_generate(C.model, NULL, NULL, &C.gen, C.gen_tokens, C.gen_lengths, NULL))
NC(nc_generate_tokens, perl_generate(C.model, NULL, &C.no_tokens, &C.gen, C.gen_tokens, C.gen_lengths, NULL))
NC(nc_generate_opts, perl_generate(C.model, NULL, &C.tb.batch, NULL, C.gen_tokens, C.gen_lengths, NULL))
NC(nc_generate_out_tokens, perl_generate(C.model, NULL, &C.tb.batch, &C.gen, NULL, C.gen_lengths, NULL))
NC(nc_generate_out_lengths, perl_generate(C.model, NULL, &C.tb.batch, &C.gen, C.gen_tokens, NULL, NULL))
NC(nc_reward_create_out, perl_reward_create(NULL, C.model, C.reward_lora, &C.reward_opts))
NC(nc_reward_create_model, perl_reward_create(&C.got_reward, NULL, C.reward_lora, &C.reward_opts))
NC(nc_reward_create_lora, perl_reward_create(&C.got_reward, C.model, NULL, &C.reward_opts))
NC(nc_reward_create_opts, perl_reward_create(&C.got_reward, C.model, C.reward_lora, NULL))
NC(nc_pairwise_reward, perl_reward_step_pairwise(NULL, &C.tb.batch, &C.tb.batch, NULL, NULL, NULL, NULL))
NC(nc_pairwise_chosen, perl_reward_step_pairwise(C.reward, NULL, &C.tb.batch, NULL, NULL, NULL, NULL))
NC(nc_pairwise_rejected, perl_reward_step_pairwise(C.reward, &C.tb.batch, NULL, NULL, NULL, NULL, NULL))
NC(nc_pairwise_tokens, perl_reward_step_pairwise(C.reward, &C.no_tokens, &C.no_tokens, NULL, NULL, NULL, NULL))
NC(nc_pointwise_reward, perl_reward_step_pointwise(NULL, &C.tb.batch, C.labels, NULL, NULL))
NC(nc_pointwise_batch, perl_reward_step_pointwise(C.reward, NULL, C.labels, NULL, NULL))
NC(nc_pointwise_labels, perl_reward_step_pointwise(C.reward, &C.tb.batch, NULL, NULL, NULL))
NC(nc_score_reward, perl_reward_score(NULL, &C.tb.batch, C.out))
NC(nc_score_batch, perl_reward_score(C.reward, NULL, C.out))
NC(nc_score_tokens, perl_reward_score(C.reward, &C.no_tokens, C.out))
NC(nc_score_out, perl_reward_score(C.reward, &C.tb.batch, NULL))
NC(nc_reward_load_out, perl_reward_load(NULL, &C.got_lora, C.model, C.dir, &C.reward_opts))
NC(nc_reward_load_out_lora, perl_reward_load(&C.got_reward, NULL, C.model, C.dir, &C.reward_opts))
NC(nc_reward_load_model, perl_reward_load(&C.got_reward, &C.got_lora, NULL, C.dir, &C.reward_opts))
NC(nc_reward_load_dir, perl_reward_load(&C.got_reward, &C.got_lora, C.model, NULL, &C.reward_opts))
NC(nc_reward_load_opts, perl_reward_load(&C.got_reward, &C.got_lora, C.model, C.dir, NULL))
NC(nc_policy_create_out, perl_policy_create(NULL, C.model, C.policy_lora, NULL, &C.policy_opts))
NC(nc_policy_create_model, perl_policy_create(&C.got_policy, NULL, C.policy_lora, NULL, &C.policy_opts))
NC(nc_policy_create_policy, perl_policy_create(&C.got_policy, C.model, NULL, NULL, &C.policy_opts))
NC(nc_policy_create_opts, perl_policy_create(&C.got_policy, C.model, C.policy_lora, NULL, NULL))
NC(nc_policy_step_trainer, perl_policy_step(NULL, &C.tb.batch, C.responses, C.response_lengths, 2, C.rewards, NULL, NULL))
NC(nc_policy_step_prompts, perl_policy_step(C.policy, NULL, C.responses, C.response_lengths, 2, C.rewards, NULL, NULL))
NC(nc_policy_step_tokens, perl_policy_step(C.policy, &C.no_tokens, C.responses, C.response_lengths, 2, C.rewards, NULL, NULL))
NC(nc_policy_step_responses, perl_policy_step(C.policy, &C.tb.batch, NULL, C.response_lengths, 2, C.rewards, NULL, NULL))
NC(nc_policy_step_lengths, perl_policy_step(C.policy, &C.tb.batch, C.responses, NULL, 2, C.rewards, NULL, NULL))
NC(nc_policy_step_rewards, perl_policy_step(C.policy, &C.tb.batch, C.responses, C.response_lengths, 2, NULL, NULL, NULL))
NC(nc_policy_save_trainer, perl_policy_save(NULL, C.dir))
NC(nc_policy_save_dir, perl_policy_save(C.policy, NULL))
NC(nc_policy_load_trainer, perl_policy_load(NULL, C.dir))
NC(nc_policy_load_dir, perl_policy_load(C.policy, NULL))
#undef NC

static const null_case null_cases[] = {
    {"perl_model_load", "out", nc_model_load_out},
    {"perl_model_load", "path", nc_model_load_path},
    {"perl_model_create_random", "out", nc_create_random_out},
    {"perl_model_create_random", "cfg", nc_create_random_cfg},
    {"perl_model_save_hf", "model", nc_save_hf_model},
    {"perl_model_save_hf", "dir", nc_save_hf_dir},
    {"perl_model_get_config", "model", nc_get_config_model},
    {"perl_model_get_config", "out", nc_get_config_out},
    {"perl_model_forward", "model", nc_forward_model},
    {"perl_model_forward", "batch", nc_forward_batch},
    {"perl_model_forward", "batch->tokens", nc_forward_tokens},
    {"perl_model_token_logprobs", "model", nc_logprobs_model},
    {"perl_model_token_logprobs", "batch", nc_logprobs_batch},
    {"perl_model_token_logprobs", "batch->tokens", nc_logprobs_tokens},
    {"perl_model_token_logprobs", "out", nc_logprobs_out},
    {"perl_lora_create", "out", nc_lora_create_out},
    {"perl_lora_create", "model", nc_lora_create_model},
    {"perl_lora_create", "opts", nc_lora_create_opts},
    {"perl_lora_params", "lora", nc_lora_params_lora},
    {"perl_lora_save", "lora", nc_lora_save_lora},
    {"perl_lora_save", "dir", nc_lora_save_dir},
    {"perl_lora_load", "out", nc_lora_load_out},
    {"perl_lora_load", "model", nc_lora_load_model},
    {"perl_lora_load", "dir", nc_lora_load_dir},
    {"perl_lora_merge", "out", nc_merge_out},
    {"perl_lora_merge", "lora", nc_merge_lora},
    {"perl_lora_set_optimizer", "lora", nc_set_optimizer_lora},
    {"perl_lora_set_optimizer", "opts", nc_set_optimizer_opts},
    {"perl_lora_set_lr", "lora", nc_set_lr_lora},
    {"perl_lora_set_grad_hook", "lora", nc_set_hook_lora},
    {"perl_lora_set_recompute", "lora", nc_set_recompute_lora},
    {"perl_lora_zero_grad", "lora", nc_zero_grad_lora},
    {"perl_lora_sft_backward", "lora", nc_sft_backward_lora},
    {"perl_lora_sft_backward", "batch", nc_sft_backward_batch},
    {"perl_lora_sft_backward", "batch->tokens", nc_sft_backward_tokens},
    {"perl_lora_optimizer_step", "lora", nc_optimizer_step_lora},
    {"perl_lora_sft_step", "lora", nc_sft_step_lora},
    {"perl_lora_sft_step", "batch", nc_sft_step_batch},
    {"perl_lora_sft_step", "batch->tokens", nc_sft_step_tokens},
    {"perl_lora_save_state", "lora", nc_save_state_lora},
    {"perl_lora_save_state", "path", nc_save_state_path},
    {"perl_lora_load_state", "lora", nc_load_state_lora},
    {"perl_lora_load_state", "path", nc_load_state_path},
    {"perl_generate", "model", nc_generate_model},
    {"perl_generate", "prompts", nc_generate_prompts},
    {"perl_generate", "prompts->tokens", nc_generate_tokens},
    {"perl_generate", "opts", nc_generate_opts},
    {"perl_generate", "out_tokens", nc_generate_out_tokens},
    {"perl_generate", "out_lengths", nc_generate_out_lengths},
    {"perl_reward_create", "out", nc_reward_create_out},
    {"perl_reward_create", "model", nc_reward_create_model},
    {"perl_reward_create", "lora", nc_reward_create_lora},
    {"perl_reward_create", "opts", nc_reward_create_opts},
    {"perl_reward_step_pairwise", "reward", nc_pairwise_reward},
    {"perl_reward_step_pairwise", "chosen", nc_pairwise_chosen},
    {"perl_reward_step_pairwise", "rejected", nc_pairwise_rejected},
    {"perl_reward_step_pairwise", "chosen->tokens", nc_pairwise_tokens},
    {"perl_reward_step_pointwise", "reward", nc_pointwise_reward},
    {"perl_reward_step_pointwise", "batch", nc_pointwise_batch},
    {"perl_reward_step_pointwise", "labels", nc_pointwise_labels},
    {"perl_reward_score", "reward", nc_score_reward},
    {"perl_reward_score", "batch", nc_score_batch},
    {"perl_reward_score", "batch->tokens", nc_score_tokens},
    {"perl_reward_score", "out_scores", nc_score_out},
    {"perl_reward_load", "out", nc_reward_load_out},
    {"perl_reward_load", "out_lora", nc_reward_load_out_lora},
    {"perl_reward_load", "model", nc_reward_load_model},
    {"perl_reward_load", "dir", nc_reward_load_dir},
    {"perl_reward_load", "opts", nc_reward_load_opts},
    {"perl_policy_create", "out", nc_policy_create_out},
    {"perl_policy_create", "model", nc_policy_create_model},
    {"perl_policy_create", "policy", nc_policy_create_policy},
    {"perl_policy_create", "opts", nc_policy_create_opts},
    {"perl_policy_step", "trainer", nc_policy_step_trainer},
    {"perl_policy_step", "prompts", nc_policy_step_prompts},
    {"perl_policy_step", "prompts->tokens", nc_policy_step_tokens},
    {"perl_policy_step", "responses", nc_policy_step_responses},
    {"perl_policy_step", "response_lengths", nc_policy_step_lengths},
    {"perl_policy_step", "rewards", nc_policy_step_rewards},
    {"perl_policy_save", "trainer", nc_policy_save_trainer},
    {"perl_policy_save", "dir", nc_policy_save_dir},
    {"perl_policy_load", "trainer", nc_policy_load_trainer},
    {"perl_policy_load", "dir", nc_policy_load_dir},
};
#define N_NULL_CASES (sizeof null_cases / sizeof null_cases[0])

/* Public functions that return no status: with NULL they must not crash and
 * must return their documented neutral value (checked in test_null_no_status),
 * or take no pointer at all. */
static const char *const no_status_functions[] = {
    "perl_version", "perl_version_number", "perl_status_str", "perl_last_error", "perl_clear_error",
    "perl_set_num_threads", /* int n only: n <= 0 is documented as "all CPUs" */
    "perl_get_num_threads", "perl_model_config_init", "perl_model_free", "perl_model_num_params",
    "perl_batch_init", "perl_lora_options_init", "perl_lora_free", "perl_lora_num_params",
    "perl_optim_options_init", "perl_step_stats_init", "perl_generate_options_init",
    "perl_reward_options_init", "perl_reward_free", "perl_reward_stats_init", "perl_policy_options_init",
    "perl_policy_free", "perl_policy_stats_init",
};
#define N_NO_STATUS (sizeof no_status_functions / sizeof no_status_functions[0])

static void null_ctx_setup(void)
{
    setup_tmp();
    memset(&C, 0, sizeof C);
    C.model = tiny_model(16, 1);
    C.lora = tiny_lora(C.model, LIBPERL_TARGET_ATTENTION, 2, 2);
    C.reward_lora = tiny_lora(C.model, LIBPERL_TARGET_ATTENTION, 2, 3);
    C.policy_lora = tiny_lora(C.model, LIBPERL_TARGET_ATTENTION, 2, 4);
    perl_reward_options_init(&C.reward_opts);
    ck_assert_msg(perl_reward_create(&C.reward, C.model, C.reward_lora, &C.reward_opts) == LIBPERL_OK, "%s",
                  perl_last_error());
    perl_policy_options_init(&C.policy_opts);
    ck_assert_msg(perl_policy_create(&C.policy, C.model, C.policy_lora, NULL, &C.policy_opts) == LIBPERL_OK, "%s",
                  perl_last_error());
    tiny_batch_init(&C.tb, 0);
    C.no_tokens = C.tb.batch;
    C.no_tokens.tokens = NULL;
    C.cfg = tiny_config(16);
    perl_lora_options_init(&C.lora_opts);
    perl_optim_options_init(&C.optim);
    perl_generate_options_init(&C.gen);
    C.gen.max_new_tokens = 4;
    for (int i = 0; i < ROWS; i++) {
        C.labels[i] = (float)(i & 1);
        C.rewards[i] = 0.5f * (float)i;
        C.response_lengths[i] = 2;
        C.responses[2 * i] = 1, C.responses[2 * i + 1] = 2;
    }
    tmp_path(C.dir, sizeof C.dir, "saved");
    test_path(C.file, sizeof C.file, tmpdir, "state.bin");
    /* real files, so a call that ignored a NULL elsewhere would succeed */
    ck_assert_int_eq(perl_lora_save(C.reward_lora, C.dir), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_save_state(C.lora, C.file), LIBPERL_OK);
}

static void null_ctx_teardown(void)
{
    perl_policy_free(C.got_policy);
    perl_reward_free(C.got_reward);
    perl_lora_free(C.got_lora);
    perl_model_free(C.got_model);
    perl_policy_free(C.policy);
    perl_reward_free(C.reward);
    perl_lora_free(C.policy_lora);
    perl_lora_free(C.reward_lora);
    perl_lora_free(C.lora);
    perl_model_free(C.model);
    memset(&C, 0, sizeof C);
    teardown_tmp();
}

START_TEST(test_null_every_argument)
{
    int failures = 0;
    char report[4096] = "";
    size_t used = 0;
    for (size_t i = 0; i < N_NULL_CASES; i++) {
        const null_case *nc = &null_cases[i];
        perl_clear_error();
        int rc = nc->call();
        const char *msg = perl_last_error();
        if (rc != LIBPERL_ERR_INVALID_ARGUMENT || msg[0] == '\0') {
            failures++;
            used += (size_t)snprintf(report + used, used < sizeof report ? sizeof report - used : 0,
                                     "\n  %s(%s = NULL): rc %d (%s), message \"%s\"", nc->function,
                                     nc->argument, rc, perl_status_str(rc), msg);
            if (used >= sizeof report) used = sizeof report;
        }
        /* a call that wrongly succeeded leaves its output here; free it */
        perl_policy_free(C.got_policy);
        perl_reward_free(C.got_reward);
        perl_lora_free(C.got_lora);
        perl_model_free(C.got_model);
        C.got_policy = NULL, C.got_reward = NULL, C.got_lora = NULL, C.got_model = NULL;
    }
    ck_assert_msg(failures == 0, "%d of %zu NULL-argument calls did not return "
                                 "LIBPERL_ERR_INVALID_ARGUMENT with a message:%s",
                  failures, N_NULL_CASES, report);
}
END_TEST

/* Functions without a status: NULL is accepted and gives the neutral value. */
START_TEST(test_null_no_status)
{
    perl_model_config_init(NULL);
    perl_batch_init(NULL);
    perl_lora_options_init(NULL);
    perl_optim_options_init(NULL);
    perl_step_stats_init(NULL);
    perl_generate_options_init(NULL);
    perl_reward_options_init(NULL);
    perl_reward_stats_init(NULL);
    perl_policy_options_init(NULL);
    perl_policy_stats_init(NULL);
    perl_model_free(NULL);
    perl_lora_free(NULL);
    perl_reward_free(NULL);
    perl_policy_free(NULL);
    ck_assert_uint_eq(perl_model_num_params(NULL), 0);
    ck_assert_uint_eq(perl_lora_num_params(NULL), 0);
    ck_assert_ptr_nonnull(perl_version());
    ck_assert_uint_ne(perl_version_number(), 0);
    ck_assert_ptr_nonnull(perl_status_str(12345));
    perl_clear_error();
    ck_assert_str_eq(perl_last_error(), "");
    ck_assert_int_ge(perl_get_num_threads(), 1);
}
END_TEST

/* The table above covers every LIBPERL_API function of the header: a new
 * function needs a row (or a place in no_status_functions). */
static char *read_public_header(void)
{
    static const char *const candidates[] = {"include/libperl/libperl.h", "../include/libperl/libperl.h",
                                             "../../include/libperl/libperl.h"};
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        char *text = test_read_file(candidates[i], NULL);
        if (text != NULL) return text;
    }
    return NULL;
}

START_TEST(test_null_table_covers_header)
{
    char *text = read_public_header();
    if (text == NULL) {
        printf("SKIP test_null_table_covers_header: include/libperl/libperl.h not found from the "
               "current directory\n");
        return;
    }
    /* blank out comments */
    for (char *p = text; *p; p++) {
        if (p[0] == '/' && p[1] == '*') {
            char *end = strstr(p + 2, "*/");
            char *stop = end ? end + 2 : p + strlen(p);
            for (; p < stop; p++)
                if (*p != '\n') *p = ' ';
            p--;
        }
    }
    int declared = 0;
    char missing[2048] = "";
    for (char *p = strstr(text, "LIBPERL_API"); p != NULL; p = strstr(p + 1, "LIBPERL_API")) {
        char *line = p;
        while (line > text && line[-1] != '\n') line--;
        while (*line == ' ' || *line == '\t') line++;
        if (*line == '#') continue; /* the macro's own definition */
        char *paren = p + strlen("LIBPERL_API");
        while (*paren && *paren != '(' && *paren != ';') paren++;
        if (*paren != '(') continue;
        char *end = paren;
        while (end > p && (end[-1] == ' ' || end[-1] == '\n')) end--;
        char *begin = end;
        while (begin > p && (begin[-1] == '_' || (begin[-1] >= 'a' && begin[-1] <= 'z') ||
                             (begin[-1] >= '0' && begin[-1] <= '9')))
            begin--;
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)(end - begin), begin);
        declared++;
        int found = 0;
        for (size_t i = 0; i < N_NULL_CASES && !found; i++) found = strcmp(null_cases[i].function, name) == 0;
        for (size_t i = 0; i < N_NO_STATUS && !found; i++) found = strcmp(no_status_functions[i], name) == 0;
        if (!found && strlen(missing) + strlen(name) + 3 < sizeof missing) {
            strcat(missing, " ");
            strcat(missing, name);
        }
    }
    free(text);
    ck_assert_int_gt(declared, 40);
    ck_assert_msg(missing[0] == '\0',
                  "public functions without a row in tests/test_hardening.c null_cases (or "
                  "no_status_functions):%s",
                  missing);
}
END_TEST

/* ---- bad_input ----------------------------------------------------------- */

START_TEST(test_zero_and_negative_sizes)
{
    perl_model *m = tiny_model(16, 5);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 2, 1);
    tiny_batch tb;
    tiny_batch_init(&tb, 1);
    float *out = malloc((size_t)ROWS * SEQ * VOCAB * sizeof(float));
    lora_guard g;
    guard_take(&g, l);
    static const int32_t bad_sizes[] = {0, -1, INT32_MIN};
    for (size_t i = 0; i < sizeof bad_sizes / sizeof bad_sizes[0]; i++) {
        perl_batch b = tb.batch;
        b.batch_size = bad_sizes[i];
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_model_forward(m, l, &b, out, NULL), "forward batch_size");
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_model_token_logprobs(m, l, &b, out), "logprobs batch_size");
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_lora_sft_step(l, &b, NULL, NULL), "sft batch_size");
        b = tb.batch;
        b.seq_len = bad_sizes[i];
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_model_forward(m, l, &b, out, NULL), "forward seq_len");
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_lora_sft_step(l, &b, NULL, NULL), "sft seq_len");
        b = tb.batch;
        b.struct_size = (size_t)0;
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_lora_sft_step(l, &b, NULL, NULL), "sft struct_size 0");

        perl_model_config cfg = tiny_config(16);
        perl_model *bad = NULL;
        cfg.dim = bad_sizes[i];
        ck_assert_int_lt(perl_model_create_random(&bad, &cfg, 1), 0);
        ck_assert_ptr_null(bad);
        cfg = tiny_config(16);
        cfg.vocab_size = bad_sizes[i];
        ck_assert_int_lt(perl_model_create_random(&bad, &cfg, 1), 0);
        cfg = tiny_config(16);
        cfg.n_layers = bad_sizes[i];
        ck_assert_int_lt(perl_model_create_random(&bad, &cfg, 1), 0);
        ck_assert_ptr_null(bad);

        perl_lora_options o;
        perl_lora_options_init(&o);
        o.rank = bad_sizes[i];
        perl_lora *bl = NULL;
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_lora_create(&bl, m, &o), "lora rank");
        ck_assert_ptr_null(bl);

        perl_generate_options go;
        perl_generate_options_init(&go);
        go.max_new_tokens = bad_sizes[i];
        int32_t gt[ROWS * 4], gl[ROWS];
        EXPECT_RC(LIBPERL_ERR_INVALID_ARGUMENT, perl_generate(m, l, &tb.batch, &go, gt, gl, NULL),
                  "generate max_new_tokens");
    }
    guard_expect_unchanged(&g, l, "bad sizes");
    guard_free(&g);
    free(out);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* Token ids, context length and row lengths on the SFT and log-prob paths
 * (test_engine.c:bad_batches covers perl_model_forward). */
START_TEST(test_ranges_on_training_paths)
{
    perl_model *m = tiny_model(16, 6);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 2, 1);
    tiny_batch tb;
    tiny_batch_init(&tb, 2);
    float out[ROWS * (CTX + 1)];
    lora_guard g;
    guard_take(&g, l);
    static const int32_t bad_tokens[] = {VOCAB, -1, INT32_MAX, INT32_MIN};
    for (size_t i = 0; i < sizeof bad_tokens / sizeof bad_tokens[0]; i++) {
        int32_t saved = tb.tokens[SEQ + 1];
        tb.tokens[SEQ + 1] = bad_tokens[i];
        EXPECT_RC(LIBPERL_ERR_RANGE, perl_lora_sft_step(l, &tb.batch, NULL, NULL), "sft token id");
        EXPECT_RC(LIBPERL_ERR_RANGE, perl_model_token_logprobs(m, l, &tb.batch, out), "logprobs token id");
        tb.tokens[SEQ + 1] = saved;
    }
    /* a token id beyond the row's length is padding: ignored */
    tb.tokens[2 * SEQ + SEQ - 1] = -7;
    EXPECT_RC(LIBPERL_OK, perl_model_token_logprobs(m, l, &tb.batch, out), "padding not checked");
    tb.tokens[2 * SEQ + SEQ - 1] = 1;
    static const int32_t bad_lengths[] = {0, -1, SEQ + 1};
    for (size_t i = 0; i < sizeof bad_lengths / sizeof bad_lengths[0]; i++) {
        tb.lengths[1] = bad_lengths[i];
        EXPECT_RC(LIBPERL_ERR_RANGE, perl_lora_sft_step(l, &tb.batch, NULL, NULL), "sft row length");
        EXPECT_RC(LIBPERL_ERR_RANGE, perl_model_token_logprobs(m, l, &tb.batch, out), "logprobs row length");
    }
    tb.lengths[1] = SEQ - 2;
    /* longer than the context */
    int32_t long_tokens[ROWS * (CTX + 1)];
    for (int i = 0; i < ROWS * (CTX + 1); i++) long_tokens[i] = (int32_t)(i % VOCAB);
    perl_batch lb;
    perl_batch_init(&lb);
    lb.batch_size = ROWS, lb.seq_len = CTX + 1, lb.tokens = long_tokens;
    EXPECT_RC(LIBPERL_ERR_RANGE, perl_lora_sft_step(l, &lb, NULL, NULL), "sft seq_len > context");
    EXPECT_RC(LIBPERL_ERR_RANGE, perl_model_token_logprobs(m, l, &lb, out), "logprobs seq_len > context");
    perl_generate_options go;
    perl_generate_options_init(&go);
    go.max_new_tokens = CTX - SEQ + 1; /* prompt + new tokens one past the context */
    int32_t gt[ROWS * CTX], gl[ROWS];
    EXPECT_RC(LIBPERL_ERR_RANGE, perl_generate(m, l, &tb.batch, &go, gt, gl, NULL), "generate past the context");
    guard_expect_unchanged(&g, l, "bad ranges");
    guard_free(&g);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* NaN in the logits (a NaN row of the base lm_head: every position's logit
 * for that token is NaN).  The SFT step refuses with NUMERIC and leaves
 * parameters, moments and the step count unchanged. */
START_TEST(test_nan_logits_refused)
{
    perl_model *m = tiny_model(16, 7);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 2, 1);
    tiny_batch tb;
    tiny_batch_init(&tb, 3);
    ck_assert_int_eq(perl_lora_sft_step(l, &tb.batch, NULL, NULL), LIBPERL_OK); /* moments exist */
    lora_guard g;
    guard_take(&g, l);
    float *row = m->w.lm_head + (size_t)5 * (size_t)m->cfg.dim; /* a random model owns its weights */
    float saved = row[0];
    row[0] = NAN;
    EXPECT_RC(LIBPERL_ERR_NUMERIC, perl_lora_sft_step(l, &tb.batch, NULL, NULL), "NaN logits");
    guard_expect_unchanged(&g, l, "NaN logits");
    row[0] = INFINITY;
    EXPECT_RC(LIBPERL_ERR_NUMERIC, perl_lora_sft_step(l, &tb.batch, NULL, NULL), "Inf in lm_head");
    guard_expect_unchanged(&g, l, "Inf in lm_head");
    row[0] = saved;
    EXPECT_RC(LIBPERL_OK, perl_lora_sft_step(l, &tb.batch, NULL, NULL), "after restoring the weight");
    guard_free(&g);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* NaN / Inf injected into the gradients by the gradient hook (the place an
 * all-reduce would put them): every trainer refuses the step and leaves the
 * parameters unchanged. */
static float hook_value;
static int poison_hook(float *grads, size_t count, void *user)
{
    (void)user;
    grads[count / 2] = hook_value;
    return 0;
}

START_TEST(test_nan_gradients_from_hook)
{
    perl_model *m = tiny_model(16, 8);
    tiny_batch tb;
    tiny_batch_init(&tb, 4);
    static const float poisons[] = {NAN, INFINITY, -INFINITY};

    /* SFT */
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 2, 1);
    ck_assert_int_eq(perl_lora_set_grad_hook(l, poison_hook, NULL), LIBPERL_OK);
    lora_guard g;
    guard_take(&g, l);
    for (size_t i = 0; i < 3; i++) {
        hook_value = poisons[i];
        EXPECT_RC(LIBPERL_ERR_NUMERIC, perl_lora_sft_step(l, &tb.batch, NULL, NULL), "SFT, poisoned gradient");
        guard_expect_unchanged(&g, l, "SFT, poisoned gradient");
    }
    guard_free(&g);

    /* reward model, pairwise and pointwise */
    perl_lora *rl = tiny_lora(m, LIBPERL_TARGET_ATTENTION, 2, 2);
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    perl_reward *rw = NULL;
    ck_assert_msg(perl_reward_create(&rw, m, rl, &ro) == LIBPERL_OK, "%s", perl_last_error());
    tiny_batch other;
    tiny_batch_init(&other, 9);
    ck_assert_int_eq(perl_lora_set_grad_hook(rl, poison_hook, NULL), LIBPERL_OK);
    guard_take(&g, rl);
    for (size_t i = 0; i < 3; i++) {
        hook_value = poisons[i];
        EXPECT_RC(LIBPERL_ERR_NUMERIC,
                  perl_reward_step_pairwise(rw, &tb.batch, &other.batch, NULL, NULL, NULL, NULL),
                  "pairwise reward, poisoned gradient");
        guard_expect_unchanged(&g, rl, "pairwise reward, poisoned gradient");
    }
    guard_free(&g);
    perl_reward_free(rw);
    ro.objective = LIBPERL_REWARD_POINTWISE;
    ck_assert_msg(perl_reward_create(&rw, m, rl, &ro) == LIBPERL_OK, "%s", perl_last_error());
    float labels[ROWS] = {1, 0, 1};
    guard_take(&g, rl);
    hook_value = NAN;
    EXPECT_RC(LIBPERL_ERR_NUMERIC, perl_reward_step_pointwise(rw, &tb.batch, labels, NULL, NULL),
              "pointwise reward, poisoned gradient");
    guard_expect_unchanged(&g, rl, "pointwise reward, poisoned gradient");
    guard_free(&g);

    /* policy */
    perl_lora *pl = tiny_lora(m, LIBPERL_TARGET_ATTENTION, 2, 3);
    perl_policy_options po;
    perl_policy_options_init(&po);
    perl_policy_trainer *tr = NULL;
    ck_assert_msg(perl_policy_create(&tr, m, pl, NULL, &po) == LIBPERL_OK, "%s", perl_last_error());
    int32_t responses[ROWS * 2] = {1, 2, 3, 4, 5, 6}, response_lengths[ROWS] = {2, 1, 2};
    float rewards[ROWS] = {1.0f, -0.5f, 0.25f};
    ck_assert_int_eq(perl_lora_set_grad_hook(pl, poison_hook, NULL), LIBPERL_OK);
    guard_take(&g, pl);
    for (size_t i = 0; i < 3; i++) {
        hook_value = poisons[i];
        EXPECT_RC(LIBPERL_ERR_NUMERIC,
                  perl_policy_step(tr, &other.batch, responses, response_lengths, 2, rewards, NULL, NULL),
                  "policy, poisoned gradient");
        guard_expect_unchanged(&g, pl, "policy, poisoned gradient");
    }
    guard_free(&g);
    ck_assert_int_eq(perl_lora_set_grad_hook(pl, NULL, NULL), LIBPERL_OK);
    EXPECT_RC(LIBPERL_OK, perl_policy_step(tr, &other.batch, responses, response_lengths, 2, rewards, NULL, NULL),
              "policy step after removing the hook");

    perl_policy_free(tr);
    perl_lora_free(pl);
    perl_reward_free(rw);
    perl_lora_free(rl);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* An adapter made for another model, even one of the same shape, is refused
 * with SHAPE by every entry point that takes a model and an adapter. */
START_TEST(test_adapter_for_another_model)
{
    perl_model *a = tiny_model(16, 10), *same_shape = tiny_model(16, 11), *wider = tiny_model(32, 12);
    perl_lora *la = tiny_lora(a, LIBPERL_TARGET_ALL, 2, 1);
    tiny_batch tb;
    tiny_batch_init(&tb, 5);
    float *out = malloc((size_t)ROWS * SEQ * VOCAB * sizeof(float));
    perl_model *others[2] = {same_shape, wider};
    for (int k = 0; k < 2; k++) {
        perl_model *o = others[k];
        EXPECT_RC(LIBPERL_ERR_SHAPE, perl_model_forward(o, la, &tb.batch, out, NULL), "forward");
        EXPECT_RC(LIBPERL_ERR_SHAPE, perl_model_token_logprobs(o, la, &tb.batch, out), "token_logprobs");
        perl_reward_options ro;
        perl_reward_options_init(&ro);
        perl_reward *rw = NULL;
        EXPECT_RC(LIBPERL_ERR_SHAPE, perl_reward_create(&rw, o, la, &ro), "reward_create");
        ck_assert_ptr_null(rw);
        perl_policy_options po;
        perl_policy_options_init(&po);
        perl_policy_trainer *tr = NULL;
        EXPECT_RC(LIBPERL_ERR_SHAPE, perl_policy_create(&tr, o, la, NULL, &po), "policy_create");
        ck_assert_ptr_null(tr);
    }
    /* a training state or a saved adapter of another shape */
    char state[700], dir[600];
    tmp_path(state, sizeof state, "a.state");
    tmp_path(dir, sizeof dir, "a.peft");
    ck_assert_int_eq(perl_lora_save_state(la, state), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_save(la, dir), LIBPERL_OK);
    perl_lora *lw = tiny_lora(wider, LIBPERL_TARGET_ALL, 2, 1), *lq = tiny_lora(a, LIBPERL_TARGET_Q, 2, 1),
              *lr4 = tiny_lora(a, LIBPERL_TARGET_ALL, 4, 1);
    perl_lora *targets[3] = {lw, lq, lr4};
    for (int k = 0; k < 3; k++) {
        lora_guard g;
        guard_take(&g, targets[k]);
        EXPECT_RC(LIBPERL_ERR_SHAPE, perl_lora_load_state(targets[k], state), "load_state into another shape");
        guard_expect_unchanged(&g, targets[k], "load_state into another shape");
        guard_free(&g);
    }
    perl_lora *loaded = NULL;
    EXPECT_RC(LIBPERL_ERR_SHAPE, perl_lora_load(&loaded, wider, dir), "PEFT adapter for a narrower model");
    ck_assert_ptr_null(loaded);
    free(out);
    perl_lora_free(lr4);
    perl_lora_free(lq);
    perl_lora_free(lw);
    perl_lora_free(la);
    perl_model_free(wider);
    perl_model_free(same_shape);
    perl_model_free(a);
}
END_TEST

/* Unknown keys are ignored (HF and PEFT configs carry many that do not
 * matter to the math); unknown values of keys that do matter are refused. */
START_TEST(test_unknown_config_keys_and_values)
{
    perl_model *m = tiny_model(16, 13);
    char dir[600], path[700];
    tmp_path(dir, sizeof dir, "model");
    ck_assert_int_eq(perl_model_save_hf(m, dir), LIBPERL_OK);
    test_path(path, sizeof path, dir, "config.json");
    size_t len;
    char *text = test_read_file(path, &len);
    ck_assert_ptr_nonnull(text);
    char *brace = strchr(text, '{');
    ck_assert_ptr_nonnull(brace);
    char *edited = malloc(len + 256);
    snprintf(edited, len + 256, "{\"some_future_key\": {\"nested\": [1, 2]}, \"transformers_version\": \"9.9\",%s",
             brace + 1);
    ck_assert_int_eq(test_write_file(path, edited, strlen(edited)), 0);
    perl_model *loaded = NULL;
    EXPECT_RC(LIBPERL_OK, perl_model_load(&loaded, dir), "config.json with unknown keys");
    perl_model_free(loaded);
    loaded = NULL;
    snprintf(edited, len + 256, "{\"model_type\": \"gpt2\", %s", strstr(text, "\"hidden_size\""));
    ck_assert_int_eq(test_write_file(path, edited, strlen(edited)), 0);
    EXPECT_RC(LIBPERL_ERR_UNSUPPORTED, perl_model_load(&loaded, dir), "config.json model_type gpt2");
    ck_assert_ptr_null(loaded);
    free(text);

    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ATTENTION, 2, 1);
    tmp_path(dir, sizeof dir, "adapter");
    ck_assert_int_eq(perl_lora_save(l, dir), LIBPERL_OK);
    test_path(path, sizeof path, dir, "adapter_config.json");
    text = test_read_file(path, &len);
    ck_assert_ptr_nonnull(text);
    free(edited);
    edited = malloc(len + 256);
    snprintf(edited, len + 256, "{\"megatron_config\": null, \"some_future_key\": [true],%s", strchr(text, '{') + 1);
    ck_assert_int_eq(test_write_file(path, edited, strlen(edited)), 0);
    perl_lora *ll = NULL;
    EXPECT_RC(LIBPERL_OK, perl_lora_load(&ll, m, dir), "adapter_config.json with unknown keys");
    perl_lora_free(ll);
    ll = NULL;
    char *dora = strstr(text, "\"use_dora\": false"); /* the saver writes PEFT's defaults */
    ck_assert_ptr_nonnull(dora);
    snprintf(edited, len + 256, "%.*s\"use_dora\": true%s", (int)(dora - text), text,
             dora + strlen("\"use_dora\": false"));
    ck_assert_int_eq(test_write_file(path, edited, strlen(edited)), 0);
    EXPECT_RC(LIBPERL_ERR_UNSUPPORTED, perl_lora_load(&ll, m, dir), "adapter_config.json use_dora");
    ck_assert_ptr_null(ll);
    free(edited);
    free(text);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* ---- files: directories, permissions, full disks ------------------------- */

START_TEST(test_state_path_is_a_directory)
{
    perl_model *m = tiny_model(16, 14);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ATTENTION, 2, 1);
    char path[700];
    tmp_path(path, sizeof path, "adir");
    ck_assert_int_eq(mkdir(path, 0700), 0);
    lora_guard g;
    guard_take(&g, l);
    EXPECT_RC(LIBPERL_ERR_IO, perl_lora_load_state(l, path), "load_state from a directory");
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "directory"));
    EXPECT_RC(LIBPERL_ERR_IO, perl_lora_save_state(l, path), "save_state over a directory");
    guard_expect_unchanged(&g, l, "state path is a directory");
    ck_assert_int_eq(test_count_entries(tmpdir), 1); /* no temp file left */
    /* PEFT: adapter_model.safetensors is a directory */
    char dir[600], weights[700];
    tmp_path(dir, sizeof dir, "peft");
    ck_assert_int_eq(perl_lora_save(l, dir), LIBPERL_OK);
    test_path(weights, sizeof weights, dir, "adapter_model.safetensors");
    ck_assert_int_eq(unlink(weights), 0);
    ck_assert_int_eq(mkdir(weights, 0700), 0);
    perl_lora *ll = NULL;
    EXPECT_RC(LIBPERL_ERR_IO, perl_lora_load(&ll, m, dir), "PEFT weights are a directory");
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "is a directory"));
    ck_assert_ptr_null(ll);
    guard_free(&g);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* The checks of test_permission_denied_as_nobody, as the current user.
 * Returns 0 or the number of the first failed check.  File operations only:
 * in a forked child the thread pool must not be used (docs/hardening.md, F7). */
static int permission_checks(perl_model *m, perl_lora *l, const char *ro_dir, const char *secret_file,
                             const char *secret_model)
{
    int failed = 0;
    char path[800];
    snprintf(path, sizeof path, "%s/new.state", ro_dir);
    if (perl_lora_save_state(l, path) != LIBPERL_ERR_IO || !strstr(perl_last_error(), "Permission denied"))
        failed = 3;
    snprintf(path, sizeof path, "%s/peft", ro_dir);
    if (!failed && (perl_lora_save(l, path) != LIBPERL_ERR_IO || !strstr(perl_last_error(), "Permission denied")))
        failed = 4;
    if (!failed &&
        (perl_lora_load_state(l, secret_file) != LIBPERL_ERR_IO || !strstr(perl_last_error(), "Permission denied")))
        failed = 5;
    perl_model *loaded = NULL;
    if (!failed && (perl_model_load(&loaded, secret_model) != LIBPERL_ERR_IO ||
                    !strstr(perl_last_error(), "Permission denied") || loaded != NULL))
        failed = 6;
    if (!failed && (perl_model_save_hf(m, ro_dir) != LIBPERL_ERR_IO ||
                    !strstr(perl_last_error(), "Permission denied")))
        failed = 7;
    if (failed) fprintf(stderr, "permission check %d: %s\n", failed, perl_last_error());
    perl_model_free(loaded);
    return failed;
}

/* Permission denied: as root, chmod does not deny anything, so a forked child
 * drops to uid/gid 65534 (nobody) and runs the checks; as another user they
 * run in-process. */
START_TEST(test_permission_denied_as_nobody)
{
    char ro_dir[600], secret_file[700], secret_model[600];
    tmp_path(ro_dir, sizeof ro_dir, "readonly");
    tmp_path(secret_model, sizeof secret_model, "secret_model");
    test_path(secret_file, sizeof secret_file, tmpdir, "secret.state");
    perl_model *m = tiny_model(16, 15);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ATTENTION, 2, 1);
    ck_assert_int_eq(perl_lora_save_state(l, secret_file), LIBPERL_OK);
    ck_assert_int_eq(perl_model_save_hf(m, secret_model), LIBPERL_OK);
    ck_assert_int_eq(mkdir(ro_dir, 0755), 0);
    ck_assert_int_eq(chmod(secret_file, 0600), 0);
    ck_assert_int_eq(chmod(secret_model, 0700), 0);
    ck_assert_int_eq(chmod(tmpdir, 0711), 0); /* others may pass through, not list */
    if (geteuid() != 0) {
        ck_assert_int_eq(chmod(ro_dir, 0555), 0);
        ck_assert_int_eq(chmod(secret_file, 0000), 0);
        ck_assert_int_eq(chmod(secret_model, 0000), 0);
        int failed = permission_checks(m, l, ro_dir, secret_file, secret_model);
        chmod(secret_model, 0700);
        chmod(ro_dir, 0755);
        perl_lora_free(l);
        perl_model_free(m);
        ck_assert_msg(failed == 0, "permission check %d failed (see stderr)", failed);
        return;
    }
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        if (setgroups(0, NULL) != 0 || setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0)
            _exit(100); /* cannot drop privileges: skipped below */
        if (access(secret_file, R_OK) == 0) _exit(101); /* still privileged (capabilities?) */
        _exit(permission_checks(m, l, ro_dir, secret_file, secret_model));
    }
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    perl_lora_free(l);
    perl_model_free(m);
    ck_assert_msg(WIFEXITED(status), "the unprivileged child died (status 0x%x)", status);
    int code = WEXITSTATUS(status);
    if (code == 100 || code == 101) {
        printf("SKIP test_permission_denied_as_nobody: %s\n",
               code == 100 ? "cannot drop privileges to uid 65534" : "uid 65534 can still read 0600 root files");
        return;
    }
    ck_assert_msg(code == 0, "permission check %d failed as uid 65534 (see stderr)", code);
}
END_TEST

/* Disk full while saving a training state, through the fileio write fault:
 * every failure point leaves the previous state loadable and no temp file. */
/* ---- out of memory: fail the k-th allocation of a call, k = 0, 1, 2, ... ---- */

/* Runs call() with the k-th allocation failing, for k = 0, 1, ... until a call
 * gets through.  Every failure must be LIBPERL_ERR_OUT_OF_MEMORY with a
 * message, and must leave `guarded` (when not NULL) unchanged.  Returns how
 * many failures named the attention scratch. */
static int oom_sweep(int (*call)(void), perl_lora *guarded, const char *what)
{
    int failures = 0, attention_failures = 0, succeeded = 0;
    for (long long k = 0; k < 100000 && !succeeded; k++) {
        lora_guard g = {0};
        if (guarded) guard_take(&g, guarded);
        perl_clear_error();
        perl_mem_set_alloc_fault(k);
        int rc = call();
        perl_mem_set_alloc_fault(-1);
        if (rc == LIBPERL_OK) {
            succeeded = 1;
        } else {
            ck_assert_msg(rc == LIBPERL_ERR_OUT_OF_MEMORY, "%s, fault after %lld allocations: rc %d (%s)", what, k,
                          rc, perl_last_error());
            ck_assert_msg(strstr(perl_last_error(), "out of memory") != NULL, "%s, fault after %lld: message '%s'",
                          what, k, perl_last_error());
            if (guarded) guard_expect_unchanged(&g, guarded, what);
            failures++;
            attention_failures += strstr(perl_last_error(), "attention") != NULL;
        }
        guard_free(&g);
    }
    ck_assert_msg(succeeded && failures > 0, "%s: no call got through (%d failures)", what, failures);
    return attention_failures;
}

static int oom_sft_step(void) { return perl_lora_sft_step(C.lora, &C.tb.batch, NULL, NULL); }
static int oom_forward(void) { return perl_model_forward(C.model, C.lora, &C.tb.batch, C.out, NULL); }
static int oom_generate(void)
{
    return perl_generate(C.model, C.policy_lora, &C.tb.batch, &C.gen, C.gen_tokens, C.gen_lengths, NULL);
}
static int oom_reward_score(void) { return perl_reward_score(C.reward, &C.tb.batch, C.rewards); }
static int oom_reward_step(void)
{
    return perl_reward_step_pairwise(C.reward, &C.tb.batch, &C.tb.batch, NULL, NULL, NULL, NULL);
}
static int oom_policy_step(void)
{
    return perl_policy_step(C.policy, &C.tb.batch, C.responses, C.response_lengths, 2, C.rewards, NULL, NULL);
}

/* Every compute entry point, on fresh handles (so the sweep also covers
 * their first-call workspace allocations).  The training sweep must reach an
 * attention worker's scratch, the failure path lib/attention.c reports. */
START_TEST(test_out_of_memory_at_every_allocation)
{
    ck_assert_msg(oom_sweep(oom_sft_step, C.lora, "perl_lora_sft_step") > 0,
                  "the sweep never failed an attention scratch allocation");
    oom_sweep(oom_forward, NULL, "perl_model_forward");
    oom_sweep(oom_generate, NULL, "perl_generate");
    oom_sweep(oom_reward_score, NULL, "perl_reward_score");
    oom_sweep(oom_reward_step, C.reward_lora, "perl_reward_step_pairwise");
    oom_sweep(oom_policy_step, C.policy_lora, "perl_policy_step");
}
END_TEST

START_TEST(test_disk_full_state_fault)
{
    perl_model *m = tiny_model(16, 16);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 2, 1);
    tiny_batch tb;
    tiny_batch_init(&tb, 6);
    char path[700];
    tmp_path(path, sizeof path, "run.state");
    ck_assert_int_eq(perl_lora_save_state(l, path), LIBPERL_OK);
    size_t old_len;
    char *old = test_read_file(path, &old_len);
    ck_assert_int_eq(perl_lora_sft_step(l, &tb.batch, NULL, NULL), LIBPERL_OK); /* now with moments */
    const int64_t faults[] = {0, 1, 7, 100, (int64_t)old_len - 1, (int64_t)old_len, (int64_t)old_len + 100};
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        fileio_set_write_fault(faults[i]);
        int rc = perl_lora_save_state(l, path);
        fileio_set_write_fault(-1);
        ck_assert_msg(rc == LIBPERL_ERR_IO, "fault after %lld bytes: rc %d", (long long)faults[i], rc);
        ck_assert_ptr_nonnull(strstr(perl_last_error(), "No space left"));
        size_t now_len;
        char *now = test_read_file(path, &now_len);
        ck_assert_msg(now_len == old_len && memcmp(now, old, old_len) == 0, "fault %lld changed the file",
                      (long long)faults[i]);
        free(now);
        ck_assert_int_eq(test_count_entries(tmpdir), 1);
    }
    ck_assert_int_eq(perl_lora_save_state(l, path), LIBPERL_OK);
    free(old);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* A real full disk: a 64 KiB tmpfs mounted by the test (root only; skipped
 * when mount(2) is not permitted, e.g. in an unprivileged container). */
START_TEST(test_disk_full_real_tmpfs)
{
    char mnt[600];
    tmp_path(mnt, sizeof mnt, "tmpfs");
    ck_assert_int_eq(mkdir(mnt, 0700), 0);
    if (mount("libperl-test", mnt, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0700") != 0) {
        printf("SKIP test_disk_full_real_tmpfs: cannot mount a tmpfs (%s)\n", strerror(errno));
        return;
    }
    perl_model *m = tiny_model(16, 17);
    perl_lora *small = tiny_lora(m, LIBPERL_TARGET_Q, 1, 1); /* a few KB */
    perl_model *big_model = tiny_model(64, 18);
    perl_lora *big = tiny_lora(big_model, LIBPERL_TARGET_ALL, 16, 2); /* > 64 KiB */
    char path[700], filler[700];
    test_path(path, sizeof path, mnt, "run.state");
    test_path(filler, sizeof filler, mnt, "filler");
    ck_assert_int_eq(perl_lora_save_state(small, path), LIBPERL_OK);
    size_t old_len;
    char *old = test_read_file(path, &old_len);
    /* the big state cannot fit: ENOSPC from the real file system */
    perl_lora *into = tiny_lora(m, LIBPERL_TARGET_Q, 1, 3);
    int rc = perl_lora_save_state(big, path);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", perl_last_error());
    int entries = test_count_entries(mnt);
    size_t now_len = 0;
    char *now = test_read_file(path, &now_len);
    int reload = perl_lora_load_state(into, path);
    umount2(mnt, MNT_DETACH);
    ck_assert_msg(rc == LIBPERL_ERR_IO, "save on a full tmpfs: rc %d (%s)", rc, msg);
    ck_assert_msg(strstr(msg, "No space left") != NULL, "message: %s", msg);
    ck_assert_int_eq(entries, 1); /* the temp file was removed */
    ck_assert(now != NULL && now_len == old_len && memcmp(now, old, old_len) == 0);
    ck_assert_int_eq(reload, LIBPERL_OK);
    (void)filler;
    free(now);
    free(old);
    perl_lora_free(into);
    perl_lora_free(big);
    perl_model_free(big_model);
    perl_lora_free(small);
    perl_model_free(m);
}
END_TEST

/* ---- crash_safe: SIGKILL during saves ------------------------------------ */

/* Version v of the adapter: params[i] = base[i] + v, exactly representable. */
static void set_version(perl_lora *l, const float *base, int v)
{
    float *p;
    size_t n;
    perl_lora_params(l, &p, NULL, &n);
    for (size_t i = 0; i < n; i++) p[i] = base[i] + (float)v;
}

/* The version the parameters hold, or -1 when they are not one version. */
static int version_of(perl_lora *l, const float *base)
{
    float *p;
    size_t n;
    perl_lora_params(l, &p, NULL, &n);
    float v = p[0] - base[0];
    if (v != floorf(v) || v < 0.0f) return -1;
    for (size_t i = 0; i < n; i++)
        if (p[i] != base[i] + v) return -1;
    return (int)v;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Children save a training state and a PEFT adapter in a loop; the parent
 * SIGKILLs each at a random moment.  After every kill both checkpoints load
 * (the state's CRC verifies) and hold one consistent version; temp files the
 * victims leave behind never break the next save. */
START_TEST(test_sigkill_during_saves)
{
    const char *budget_env = getenv("LIBPERL_TEST_CRASH_SECONDS");
    double budget = budget_env ? atof(budget_env) : 5.0;
    if (!(budget > 0.0)) budget = 5.0;
    perl_model *m = tiny_model(32, 19);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 8, 1), *check = tiny_lora(m, LIBPERL_TARGET_ALL, 8, 2);
    tiny_batch tb;
    tiny_batch_init(&tb, 7);
    ck_assert_int_eq(perl_lora_sft_step(l, &tb.batch, NULL, NULL), LIBPERL_OK); /* moments in the state */
    float *p;
    size_t n;
    perl_lora_params(l, &p, NULL, &n);
    float *base = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) base[i] = (float)((int)(i % 64) - 32) * 0.0625f; /* exact in float */
    char state[700], peft[600];
    tmp_path(state, sizeof state, "ckpt.state");
    tmp_path(peft, sizeof peft, "ckpt.peft");
    set_version(l, base, 0);
    ck_assert_int_eq(perl_lora_save_state(l, state), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_save(l, peft), LIBPERL_OK);

    unsigned seed = 12345u;
    int iterations = 0, newest = 0;
    double start = now_seconds();
    while (now_seconds() - start < budget) {
        int first = newest + 1;
        fflush(NULL);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            for (int v = first;; v++) {
                set_version(l, base, v);
                if (perl_lora_save_state(l, state) != LIBPERL_OK) _exit(3);
                if (perl_lora_save(l, peft) != LIBPERL_OK) _exit(4);
            }
        }
        useconds_t delay = (useconds_t)(rand_r(&seed) % 30000u);
        if (delay > 0) usleep(delay);
        kill(pid, SIGKILL);
        int status = 0;
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
                      "iteration %d: the saving child exited by itself (status 0x%x): a save failed", iterations,
                      status);
        /* the state: verified by its CRC, one version, never older than before */
        perl_clear_error();
        int rc = perl_lora_load_state(check, state);
        ck_assert_msg(rc == LIBPERL_OK, "iteration %d: the state no longer loads: %s", iterations,
                      perl_last_error());
        int v = version_of(check, base);
        ck_assert_msg(v >= 0, "iteration %d: the state mixes versions", iterations);
        ck_assert_msg(v >= newest, "iteration %d: state version %d after %d", iterations, v, newest);
        /* the PEFT adapter: both files load together */
        perl_lora *loaded = NULL;
        rc = perl_lora_load(&loaded, m, peft);
        ck_assert_msg(rc == LIBPERL_OK, "iteration %d: the adapter no longer loads: %s", iterations,
                      perl_last_error());
        ck_assert_msg(version_of(loaded, base) >= 0, "iteration %d: the adapter mixes versions", iterations);
        perl_lora_free(loaded);
        if (v > newest) newest = v;
        iterations++;
    }
    /* temp files of killed writers remain; the next save still works */
    int stray = test_count_entries(tmpdir) - 2 + test_count_entries(peft) - 2;
    set_version(l, base, newest + 1);
    ck_assert_int_eq(perl_lora_save_state(l, state), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_save(l, peft), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_load_state(check, state), LIBPERL_OK);
    ck_assert_int_eq(version_of(check, base), newest + 1);
    printf("test_sigkill_during_saves: %d kills in %.1f s, newest version %d, %d stray temp files\n", iterations,
           now_seconds() - start, newest, stray);
    ck_assert_int_ge(iterations, 10);
    free(base);
    perl_lora_free(check);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* ---- fuzz_regressions: inputs found by tests/fuzz, fixed in lib/checkpoint.c */

/* Writes a training state whose fields were edited by `edit` and whose CRC
 * is then recomputed, the way fuzz_train_state.c's flag bit 0 does. */
typedef void (*state_edit)(unsigned char *file, size_t *len);

static int load_edited_state(perl_lora *l, const char *path, const unsigned char *orig, size_t len, state_edit edit)
{
    unsigned char *file = malloc(len + 64);
    memcpy(file, orig, len);
    size_t n = len;
    edit(file, &n);
    if (n >= 4) {
        uint32_t crc = perl_crc32(0, file, n - 4);
        memcpy(file + n - 4, &crc, 4);
    }
    ck_assert_int_eq(test_write_file(path, file, n), 0);
    free(file);
    perl_clear_error();
    return perl_lora_load_state(l, path);
}

/* offsets of the state header fields (lib/checkpoint.c's state_header after
 * magic, version and header size) */
enum { HDR = 16, OFF_STEP = HDR + 40, OFF_LR_OVERRIDE = HDR + 56, OFF_LR = HDR + 60, OFF_BETA1 = HDR + 64,
       OFF_WARMUP = HDR + 92 };

static void edit_truncate_20(unsigned char *f, size_t *n) { (void)f, *n = 20; }   /* magic+version+size+CRC */
static void edit_truncate_12(unsigned char *f, size_t *n) { (void)f, *n = 12; }   /* magic and version only */
static void edit_beta1(unsigned char *f, size_t *n) { float b = 1.5f; (void)n, memcpy(f + OFF_BETA1, &b, 4); }
static void edit_lr_nan(unsigned char *f, size_t *n) { float x = NAN; (void)n, memcpy(f + OFF_LR, &x, 4); }
static void edit_warmup(unsigned char *f, size_t *n) { int32_t w = -1; (void)n, memcpy(f + OFF_WARMUP, &w, 4); }
static void edit_step(unsigned char *f, size_t *n) { int64_t s = INT64_MAX; (void)n, memcpy(f + OFF_STEP, &s, 8); }
static void edit_lr_override(unsigned char *f, size_t *n)
{
    float x = -INFINITY;
    (void)n, memcpy(f + OFF_LR_OVERRIDE, &x, 4);
}
static void edit_param_nan(unsigned char *f, size_t *n)
{
    float x = NAN;
    uint32_t header_bytes;
    memcpy(&header_bytes, f + 12, 4);
    (void)n, memcpy(f + HDR + header_bytes + 8, &x, 4); /* third parameter */
}
static void edit_none(unsigned char *f, size_t *n) { (void)f, (void)n; }

START_TEST(test_fuzz_regressions_train_state)
{
    perl_model *m = tiny_model(16, 20);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ATTENTION, 2, 1);
    ck_assert_uint_eq(sizeof(((perl_lora *)0)->step), 8);
    char path[700];
    tmp_path(path, sizeof path, "edited.state");
    ck_assert_int_eq(perl_lora_save_state(l, path), LIBPERL_OK);
    size_t len;
    unsigned char *orig = test_read_file(path, &len);
    ck_assert_ptr_nonnull(orig);
    /* the layout this test edits: the fields up to total_steps where expected
     * (fields appended to the header later do not move them) */
    uint32_t header_bytes;
    memcpy(&header_bytes, orig + 12, 4);
    ck_assert_uint_ge(header_bytes, 100);
    float lr;
    memcpy(&lr, orig + OFF_LR, 4);
    ck_assert(lr == 1e-2f);
    lora_guard g;
    guard_take(&g, l);
    ck_assert_int_eq(load_edited_state(l, path, orig, len, edit_none), LIBPERL_OK);
    /* crashes before the fix: NULL read (memcpy from take() == NULL) */
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_truncate_20), "20-byte state, valid CRC");
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_truncate_12), "12-byte state");
    /* accepted before the fix, then undefined behaviour or NaN training */
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_beta1), "beta1 1.5");
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_lr_nan), "lr NaN");
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_warmup), "warmup -1");
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_step), "step INT64_MAX");
    EXPECT_RC(LIBPERL_ERR_FORMAT, load_edited_state(l, path, orig, len, edit_lr_override), "lr_override -Inf");
    EXPECT_RC(LIBPERL_ERR_NUMERIC, load_edited_state(l, path, orig, len, edit_param_nan), "NaN parameter");
    guard_expect_unchanged(&g, l, "rejected states");
    guard_free(&g);
    free(orig);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* ---- threads ------------------------------------------------------------- */

/* Forward passes of one shared model (read-only) from several host threads
 * at once, with the pool at 2 threads: every thread gets the single-threaded
 * result bit for bit. */
typedef struct forward_job {
    const perl_model *model;
    const perl_lora *adapter;
    const perl_batch *batch;
    const float *expect;
    size_t n;
    int repeats, mismatches, errors;
} forward_job;

static void *forward_worker(void *arg)
{
    forward_job *j = arg;
    float *out = malloc(j->n * sizeof(float));
    for (int r = 0; r < j->repeats; r++) {
        if (perl_model_forward(j->model, j->adapter, j->batch, out, NULL) != LIBPERL_OK) j->errors++;
        else if (memcmp(out, j->expect, j->n * sizeof(float)) != 0) j->mismatches++;
    }
    free(out);
    return NULL;
}

START_TEST(test_shared_model_forward_threads)
{
    int saved_threads = perl_get_num_threads();
    ck_assert_int_eq(perl_set_num_threads(2), LIBPERL_OK);
    perl_model *m = tiny_model(32, 21);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 4, 1);
    tiny_batch tb;
    tiny_batch_init(&tb, 8);
    size_t n = (size_t)ROWS * SEQ * VOCAB;
    float *expect = malloc(n * sizeof(float));
    ck_assert_int_eq(perl_model_forward(m, l, &tb.batch, expect, NULL), LIBPERL_OK);
    enum { THREADS = 3 };
    pthread_t threads[THREADS];
    forward_job jobs[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t] = (forward_job){m, t == 2 ? NULL : l, &tb.batch, expect, n, 8, 0, 0};
        if (t == 2) { /* the base model too */
            float *base = malloc(n * sizeof(float));
            ck_assert_int_eq(perl_model_forward(m, NULL, &tb.batch, base, NULL), LIBPERL_OK);
            jobs[t].expect = base;
        }
        ck_assert_int_eq(pthread_create(&threads[t], NULL, forward_worker, &jobs[t]), 0);
    }
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);
    for (int t = 0; t < THREADS; t++)
        ck_assert_msg(jobs[t].errors == 0 && jobs[t].mismatches == 0, "thread %d: %d errors, %d mismatches", t,
                      jobs[t].errors, jobs[t].mismatches);
    free((void *)jobs[2].expect);
    /* changing the pool size between calls (not during them) is allowed */
    ck_assert_int_eq(perl_set_num_threads(1), LIBPERL_OK);
    float *one = malloc(n * sizeof(float));
    ck_assert_int_eq(perl_model_forward(m, l, &tb.batch, one, NULL), LIBPERL_OK);
    ck_assert_msg(memcmp(one, expect, n * sizeof(float)) == 0, "1 thread and 2 threads differ");
    free(one);
    free(expect);
    perl_lora_free(l);
    perl_model_free(m);
    perl_set_num_threads(saved_threads);
}
END_TEST

/* The threading contract: one model shared read-only, each trainer on one
 * thread.  A reward model (pairwise steps) and a policy trainer (REINFORCE
 * steps) train on two threads at once over one model, then each saves its
 * training state; losses, parameters and checkpoint files equal the
 * sequential run's bit for bit. */
enum { TRAIN_STEPS = 6 };

typedef struct train_run {
    perl_model *model;
    perl_lora *lora;
    int kind; /* 0 reward, 1 policy */
    int rc;
    float losses[TRAIN_STEPS];
    char state_path[700]; /* each trainer checkpoints its own file at the end */
} train_run;

static void *train_worker(void *arg)
{
    train_run *r = arg;
    tiny_batch a, b;
    tiny_batch_init(&a, 11);
    tiny_batch_init(&b, 12);
    r->rc = LIBPERL_OK;
    if (r->kind == 0) {
        perl_reward_options ro;
        perl_reward_options_init(&ro);
        perl_reward *rw = NULL;
        r->rc = perl_reward_create(&rw, r->model, r->lora, &ro);
        for (int s = 0; s < TRAIN_STEPS && r->rc == LIBPERL_OK; s++) {
            perl_reward_stats st;
            perl_reward_stats_init(&st);
            r->rc = perl_reward_step_pairwise(rw, &a.batch, &b.batch, NULL, NULL, NULL, &st);
            r->losses[s] = st.loss;
        }
        perl_reward_free(rw);
    } else {
        perl_policy_options po;
        perl_policy_options_init(&po);
        perl_policy_trainer *tr = NULL;
        r->rc = perl_policy_create(&tr, r->model, r->lora, NULL, &po);
        int32_t responses[ROWS * 3] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, response_lengths[ROWS] = {3, 2, 1};
        for (int s = 0; s < TRAIN_STEPS && r->rc == LIBPERL_OK; s++) {
            float rewards[ROWS] = {1.0f - 0.1f * (float)s, -0.5f, 0.25f * (float)s};
            perl_policy_stats st;
            perl_policy_stats_init(&st);
            r->rc = perl_policy_step(tr, &a.batch, responses, response_lengths, 3, rewards, NULL, &st);
            r->losses[s] = st.loss;
        }
        perl_policy_free(tr);
    }
    if (r->rc == LIBPERL_OK) r->rc = perl_lora_save_state(r->lora, r->state_path);
    return NULL;
}

START_TEST(test_reward_and_policy_on_two_threads)
{
    int saved_threads = perl_get_num_threads();
    ck_assert_int_eq(perl_set_num_threads(2), LIBPERL_OK);
    perl_model *m = tiny_model(32, 22);
    train_run seq[2], par[2];
    char dir[512];
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    for (int k = 0; k < 2; k++) {
        seq[k] = (train_run){m, tiny_lora(m, LIBPERL_TARGET_ALL, 4, 30 + (uint64_t)k), k, 0, {0}, ""};
        par[k] = (train_run){m, tiny_lora(m, LIBPERL_TARGET_ALL, 4, 30 + (uint64_t)k), k, 0, {0}, ""};
        snprintf(seq[k].state_path, sizeof seq[k].state_path, "%s/seq%d.state", dir, k);
        snprintf(par[k].state_path, sizeof par[k].state_path, "%s/par%d.state", dir, k);
    }
    /* concurrent first, so that nothing (e.g. a lazily built table) is
     * initialised by a single thread before the two run */
    pthread_t threads[2];
    for (int k = 0; k < 2; k++) ck_assert_int_eq(pthread_create(&threads[k], NULL, train_worker, &par[k]), 0);
    for (int k = 0; k < 2; k++) pthread_join(threads[k], NULL);
    /* sequential */
    train_worker(&seq[0]);
    train_worker(&seq[1]);
    ck_assert_msg(seq[0].rc == LIBPERL_OK && seq[1].rc == LIBPERL_OK, "sequential run failed: %s",
                  perl_last_error());
    for (int k = 0; k < 2; k++) {
        const char *what = k == 0 ? "reward model" : "policy";
        ck_assert_msg(par[k].rc == LIBPERL_OK, "%s on its thread failed: rc %d", what, par[k].rc);
        ck_assert_msg(memcmp(seq[k].losses, par[k].losses, sizeof seq[k].losses) == 0,
                      "%s: losses differ between the sequential and the concurrent run", what);
        float *ps, *pp;
        size_t ns, np;
        perl_lora_params(seq[k].lora, &ps, NULL, &ns);
        perl_lora_params(par[k].lora, &pp, NULL, &np);
        ck_assert_msg(ns == np && memcmp(ps, pp, ns * sizeof(float)) == 0,
                      "%s: parameters differ between the sequential and the concurrent run", what);
        ck_assert_int_eq(seq[k].lora->step, TRAIN_STEPS);
        /* the checkpoints written concurrently equal the sequential ones */
        size_t ls, lp;
        char *fs = test_read_file(seq[k].state_path, &ls), *fp = test_read_file(par[k].state_path, &lp);
        ck_assert_msg(fs && fp && ls == lp && memcmp(fs, fp, ls) == 0, "%s: checkpoints differ", what);
        free(fs);
        free(fp);
    }
    test_remove_tree(dir);
    for (int k = 0; k < 2; k++) {
        perl_lora_free(seq[k].lora);
        perl_lora_free(par[k].lora);
    }
    perl_model_free(m);
    perl_set_num_threads(saved_threads);
}
END_TEST

/* F2: an all-NaN logit row (every adapter parameter NaN) must not make the
 * LM head read past the row; the call completes and the step is refused. */
START_TEST(test_regression_f2_all_nan_logits)
{
    perl_model *m = tiny_model(16, 31);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_ALL, 2, 1);
    float *p;
    size_t n;
    perl_lora_params(l, &p, NULL, &n);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    tiny_batch tb;
    tiny_batch_init(&tb, 3);
    float out[ROWS * SEQ];
    ck_assert_int_eq(perl_model_token_logprobs(m, l, &tb.batch, out), LIBPERL_OK);
    ck_assert_int_eq(perl_lora_sft_step(l, &tb.batch, NULL, NULL), LIBPERL_ERR_NUMERIC);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* F6: a temp file left by an earlier process with our pid must not block a save. */
START_TEST(test_regression_f6_stale_temp_file)
{
    perl_model *m = tiny_model(16, 32);
    perl_lora *l = tiny_lora(m, LIBPERL_TARGET_Q, 2, 1);
    char path[600], stale[700];
    tmp_path(path, sizeof path, "state.bin");
    for (unsigned k = 0; k < 4; k++) { /* cover the next few counter values too */
        snprintf(stale, sizeof stale, "%s.tmp.%ld.%u", path, (long)getpid(), k);
        ck_assert_int_eq(test_write_file(stale, "x", 1), 0);
    }
    ck_assert_msg(perl_lora_save_state(l, path) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_int_eq(perl_lora_load_state(l, path), LIBPERL_OK);
    perl_lora_free(l);
    perl_model_free(m);
}
END_TEST

/* F7: a child forked after the pool started runs its loops without hanging. */
START_TEST(test_regression_f7_fork_after_threads)
{
    int saved = perl_get_num_threads();
    ck_assert_int_eq(perl_set_num_threads(2), LIBPERL_OK);
    perl_model *m = tiny_model(32, 33);
    tiny_batch tb;
    tiny_batch_init(&tb, 4);
    float *logits = malloc((size_t)ROWS * SEQ * VOCAB * sizeof(float));
    ck_assert_int_eq(perl_model_forward(m, NULL, &tb.batch, logits, NULL), LIBPERL_OK);
    pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        alarm(20); /* a hang becomes a signal, not a stuck test */
        int rc = perl_model_forward(m, NULL, &tb.batch, logits, NULL);
        rc |= perl_set_num_threads(2);
        rc |= perl_model_forward(m, NULL, &tb.batch, logits, NULL);
        _exit(rc == LIBPERL_OK ? 0 : 1);
    }
    int status = 0;
    ck_assert_int_eq(waitpid(child, &status, 0), child);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "forked child failed or hung (status %d)", status);
    free(logits);
    perl_model_free(m);
    perl_set_num_threads(saved);
}
END_TEST

Suite *suite_hardening(void)
{
    Suite *s = suite_create("hardening");
    TCase *tc = tcase_create("null_args");
    tcase_add_checked_fixture(tc, null_ctx_setup, null_ctx_teardown);
    tcase_add_test(tc, test_null_every_argument);
    tcase_add_test(tc, test_null_no_status);
    tcase_add_test(tc, test_null_table_covers_header);
    tcase_add_test(tc, test_out_of_memory_at_every_allocation);
    suite_add_tcase(s, tc);

    tc = tcase_create("bad_input");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_zero_and_negative_sizes);
    tcase_add_test(tc, test_ranges_on_training_paths);
    tcase_add_test(tc, test_nan_logits_refused);
    tcase_add_test(tc, test_nan_gradients_from_hook);
    tcase_add_test(tc, test_adapter_for_another_model);
    tcase_add_test(tc, test_unknown_config_keys_and_values);
    suite_add_tcase(s, tc);

    tc = tcase_create("files");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_state_path_is_a_directory);
    tcase_add_test(tc, test_permission_denied_as_nobody);
    tcase_add_test(tc, test_disk_full_state_fault);
    tcase_add_test(tc, test_disk_full_real_tmpfs);
    suite_add_tcase(s, tc);

    tc = tcase_create("crash_safe");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_sigkill_during_saves);
    suite_add_tcase(s, tc);

    tc = tcase_create("fuzz_regressions");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_fuzz_regressions_train_state);
    tcase_add_test(tc, test_regression_f2_all_nan_logits);
    tcase_add_test(tc, test_regression_f6_stale_temp_file);
    tcase_add_test(tc, test_regression_f7_fork_after_threads);
    suite_add_tcase(s, tc);

    tc = tcase_create("threads");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_shared_model_forward_threads);
    tcase_add_test(tc, test_reward_and_policy_on_two_threads);
    suite_add_tcase(s, tc);
    return s;
}
