/*
 * perl_policy_trainer: policy-gradient RL on a LoRA (or FULL) policy with a
 * KL penalty toward the frozen base.  The formulas live in
 * policy_objectives.c (and docs/policy.md); this file is the plumbing:
 *
 *   rollout      prompt ++ response per row, the response tokens numbered
 *                t = 0..n_tok-1 row after row (tok_start[b] .. tok_start[b+1]);
 *   rows_batch   some rows packed for the engine; the LM head scores packed
 *                position P_b - 1 + j (the one that predicts response token
 *                j) with target response[b, j], and maps it back to its t;
 *   passes       reference (engine on the base, adapter NULL, inference),
 *                policy (the adapter's engine; training forwards keep what
 *                backward needs), value (the value adapter's hidden states
 *                dotted with its scalar head);
 *   gradients    each objective turns per-token log-probs / entropies into
 *                dL/dlogp_t and dL/dentropy_t, which a second LM-head pass
 *                over the same training forward pushes into the hidden
 *                states; then engine_backward and perl_lora_optimizer_step.
 *
 * Failure atomicity: everything is validated before any state changes; when
 * a step makes more than one optimizer update (PPO epochs x minibatches, or a
 * value adapter), parameters and AdamW moments are snapshotted first and put
 * back on any later failure.  Trainer scalars are committed only on success.
 */
#include "checkpoint.h"
#include "fileio.h"
#include "policy.h"
#include "train.h"

#include <math.h>
#include <string.h>

struct perl_policy_trainer {
    perl_model *model;
    perl_lora *policy, *value; /* borrowed; value only for PPO */
    perl_policy_options opts;
    engine *ref;               /* the frozen base: reference log-probs, inference only */
    double baseline;           /* REINFORCE moving average of rewards */
    int baseline_set;          /* 0 until the first step, which uses its batch mean */
    float kl_coef;             /* current KL coefficient (adaptive when kl_target > 0) */
    perl_rng rng;              /* PPO minibatch shuffling */
    int64_t n_steps;           /* successful perl_policy_step calls */
};

void perl_policy_options_init(perl_policy_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->algorithm = LIBPERL_PG_REINFORCE;
    o->group_size = 1;
    o->baseline_decay = 0.9f;
    o->kl_coef = 0.05f;
    o->kl_estimator = LIBPERL_KL_K1;
    o->kl_mode = LIBPERL_KL_IN_REWARD;
    o->kl_target = 0.0f;
    o->kl_horizon = 10000.0f;
    o->entropy_coef = 0.0f;
    o->whiten_advantages = 0;
    o->loss_norm = LIBPERL_NORM_TOKEN;
    o->clip_eps = 0.2f;
    o->ppo_epochs = 1;
    o->ppo_minibatches = 1;
    o->gamma = 1.0f;
    o->lambda = 0.95f;
    o->value_coef = 0.5f;
    o->value_clip = 0.0f;
}

void perl_policy_stats_init(perl_policy_stats *s) {
    if (!s) return;
    memset(s, 0, sizeof *s);
    s->struct_size = sizeof *s;
}

/* ---- options and creation ------------------------------------------------------- */

static int finite_at_least(float x, float lo) { return isfinite(x) && x >= lo; }

static int validate_ppo_options(const perl_policy_options *o) {
    PERL_CHECK_ARG(isfinite(o->clip_eps) && o->clip_eps > 0.0f, "clip_eps %g must be > 0", (double)o->clip_eps);
    PERL_CHECK_ARG(o->ppo_epochs >= 1, "ppo_epochs %d must be >= 1", o->ppo_epochs);
    PERL_CHECK_ARG(o->ppo_minibatches >= 1, "ppo_minibatches %d must be >= 1", o->ppo_minibatches);
    PERL_CHECK_ARG(o->gamma >= 0.0f && o->gamma <= 1.0f, "gamma %g must be in [0, 1]", (double)o->gamma);
    PERL_CHECK_ARG(o->lambda >= 0.0f && o->lambda <= 1.0f, "lambda %g must be in [0, 1]", (double)o->lambda);
    PERL_CHECK_ARG(finite_at_least(o->value_coef, 0.0f), "value_coef must be finite and >= 0");
    PERL_CHECK_ARG(finite_at_least(o->value_clip, 0.0f), "value_clip must be finite and >= 0");
    return LIBPERL_OK;
}

static int validate_options(const perl_policy_options *o) {
    PERL_CHECK_ARG(o->struct_size >= sizeof(perl_policy_options),
                   "policy options struct_size %zu is too small (call perl_policy_options_init)", o->struct_size);
    PERL_CHECK_ARG(o->algorithm >= LIBPERL_PG_REINFORCE && o->algorithm <= LIBPERL_PG_PPO, "unknown algorithm %d",
                   o->algorithm);
    int grouped = o->algorithm == LIBPERL_PG_RLOO || o->algorithm == LIBPERL_PG_GRPO;
    PERL_CHECK_ARG(o->group_size >= (grouped ? 2 : 1), "group_size %d must be >= %d for this algorithm",
                   o->group_size, grouped ? 2 : 1);
    PERL_CHECK_ARG(o->baseline_decay >= 0.0f && o->baseline_decay <= 1.0f, "baseline_decay %g must be in [0, 1]",
                   (double)o->baseline_decay);
    PERL_CHECK_ARG(finite_at_least(o->kl_coef, 0.0f), "kl_coef must be finite and >= 0");
    PERL_CHECK_ARG(o->kl_estimator >= LIBPERL_KL_K1 && o->kl_estimator <= LIBPERL_KL_K3, "unknown KL estimator %d",
                   o->kl_estimator);
    PERL_CHECK_ARG(o->kl_mode == LIBPERL_KL_IN_REWARD || o->kl_mode == LIBPERL_KL_IN_LOSS, "unknown kl_mode %d",
                   o->kl_mode);
    PERL_CHECK_ARG(finite_at_least(o->kl_target, 0.0f), "kl_target must be finite and >= 0 (0: fixed coefficient)");
    PERL_CHECK_ARG(o->kl_target == 0.0f || (isfinite(o->kl_horizon) && o->kl_horizon > 0.0f),
                   "kl_horizon must be > 0 with an adaptive KL coefficient");
    PERL_CHECK_ARG(finite_at_least(o->entropy_coef, 0.0f), "entropy_coef must be finite and >= 0");
    PERL_CHECK_ARG(o->whiten_advantages == 0 || o->whiten_advantages == 1, "whiten_advantages must be 0 or 1");
    PERL_CHECK_ARG(o->loss_norm == LIBPERL_NORM_TOKEN || o->loss_norm == LIBPERL_NORM_SEQUENCE,
                   "unknown loss_norm %d", o->loss_norm);
    return o->algorithm == LIBPERL_PG_PPO ? validate_ppo_options(o) : LIBPERL_OK;
}

int perl_policy_create(perl_policy_trainer **out, perl_model *model, perl_lora *policy, perl_lora *value,
                       const perl_policy_options *opts) {
    PERL_CHECK_ARG(out, "perl_policy_create: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(model, "perl_policy_create: model is NULL");
    PERL_CHECK_ARG(policy, "perl_policy_create: policy is NULL");
    PERL_CHECK_ARG(opts, "perl_policy_create: opts is NULL");
    PERL_TRY(validate_options(opts));
    if (policy->model != model || (value && value->model != model))
        return perl_fail(LIBPERL_ERR_SHAPE, "perl_policy_create: an adapter was created for another model");
    PERL_CHECK_ARG(value != policy, "perl_policy_create: the value adapter must not be the policy");
    PERL_CHECK_ARG(!value || opts->algorithm == LIBPERL_PG_PPO, "a value adapter is only used by PPO");
    if (value && !value->head && value->adam_m)
        return perl_fail(LIBPERL_ERR_STATE, "the value adapter has no head and has already been trained");
    perl_policy_trainer *tr = perl_mem_calloc(1, sizeof *tr);
    if (!tr) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    int rc = engine_create(&tr->ref, model, NULL);
    /* a zero head: initial values are 0, so the first advantages are plain returns */
    if (rc == LIBPERL_OK && value) rc = lora_ensure_head(value, 0.0f, 0);
    if (rc != LIBPERL_OK) {
        perl_policy_free(tr);
        return rc;
    }
    tr->model = model, tr->policy = policy, tr->value = value;
    tr->opts = *opts;
    tr->opts.struct_size = sizeof tr->opts;
    tr->kl_coef = opts->kl_coef;
    perl_rng_seed(&tr->rng, policy->opts.seed ^ 0x70706f5f73687566ull);
    *out = tr;
    return LIBPERL_OK;
}

void perl_policy_free(perl_policy_trainer *tr) {
    if (!tr) return;
    engine_free(tr->ref);
    perl_mem_free(tr);
}

/* ---- rollouts ------------------------------------------------------------------------ */

static void rollout_free(rollout *ro) {
    void *bufs[] = {ro->tokens, ro->prompt_len, ro->tok_start, ro->target, ro->ref, ro->logp, ro->old,
                    ro->entropy, ro->kl, ro->adv, ro->ret, ro->value, ro->vpred, ro->weight, ro->dlogp,
                    ro->dentropy, ro->dvalue, ro->seq_adv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) perl_mem_free(bufs[i]);
    memset(ro, 0, sizeof *ro);
}

static int prompt_length(const perl_batch *p, int b) { return p->lengths ? p->lengths[b] : p->seq_len; }

static int validate_prompts(const perl_model_config *c, const perl_batch *p) {
    PERL_CHECK_ARG(p->struct_size >= sizeof(perl_batch), "prompts->struct_size %zu is too small (call perl_batch_init)",
                   p->struct_size);
    PERL_CHECK_ARG(p->tokens, "prompts->tokens is NULL");
    PERL_CHECK_ARG(p->batch_size > 0, "batch_size %d must be positive", p->batch_size);
    PERL_CHECK_ARG(p->seq_len > 0, "prompt seq_len %d must be positive", p->seq_len);
    for (int b = 0; b < p->batch_size; b++) {
        int len = prompt_length(p, b);
        if (len < 1 || len > p->seq_len)
            return perl_fail(LIBPERL_ERR_RANGE, "row %d: prompt length %d is outside [1, %d]", b, len, p->seq_len);
        for (int t = 0; t < len; t++) {
            int32_t id = p->tokens[(size_t)b * p->seq_len + t];
            if (id < 0 || id >= c->vocab_size)
                return perl_fail(LIBPERL_ERR_RANGE, "row %d prompt position %d: token id %d outside [0, %d)", b, t,
                                 id, c->vocab_size);
        }
    }
    return LIBPERL_OK;
}

/* Response lengths, ids, context fit, rewards and old log-probs of every row. */
static int validate_responses(const perl_model_config *c, const perl_batch *p, const int32_t *responses,
                              const int32_t *lengths, int32_t max_len, const float *rewards, const float *old) {
    PERL_CHECK_ARG(max_len >= 1, "max_response_len %d must be >= 1", max_len);
    for (int b = 0; b < p->batch_size; b++) {
        int len = lengths[b], prompt = prompt_length(p, b);
        if (len < 1 || len > max_len)
            return perl_fail(LIBPERL_ERR_RANGE, "row %d: response length %d is outside [1, %d]", b, len, max_len);
        if ((int64_t)prompt + len > c->max_seq_len)
            return perl_fail(LIBPERL_ERR_RANGE, "row %d: prompt %d + response %d tokens exceed the context %d", b,
                             prompt, len, c->max_seq_len);
        for (int j = 0; j < len; j++) {
            int32_t id = responses[(size_t)b * max_len + j];
            if (id < 0 || id >= c->vocab_size)
                return perl_fail(LIBPERL_ERR_RANGE, "row %d response position %d: token id %d outside [0, %d)", b,
                                 j, id, c->vocab_size);
            if (old && !isfinite(old[(size_t)b * max_len + j]))
                return perl_fail(LIBPERL_ERR_NUMERIC, "row %d response position %d: old log-prob is not finite", b,
                                 j);
        }
        if (!isfinite(rewards[b])) return perl_fail(LIBPERL_ERR_NUMERIC, "row %d: reward is NaN or Inf", b);
    }
    return LIBPERL_OK;
}

static int validate_grouping(const perl_policy_options *o, int n_rows) {
    if ((o->algorithm == LIBPERL_PG_RLOO || o->algorithm == LIBPERL_PG_GRPO) && n_rows % o->group_size != 0)
        return perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "batch_size %d is not a multiple of group_size %d", n_rows,
                         o->group_size);
    if (o->algorithm == LIBPERL_PG_PPO && n_rows % o->ppo_minibatches != 0)
        return perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "batch_size %d is not a multiple of ppo_minibatches %d",
                         n_rows, o->ppo_minibatches);
    return LIBPERL_OK;
}

static int rollout_alloc(rollout *ro) {
    size_t n = (size_t)ro->n_tok, B = (size_t)ro->n_rows;
    ro->tokens = perl_mem_calloc(B * (size_t)ro->seq_len, sizeof(int32_t));
    ro->prompt_len = perl_mem_alloc(B * sizeof(int32_t));
    ro->tok_start = perl_mem_alloc((B + 1) * sizeof(int));
    ro->target = perl_mem_alloc(n * sizeof(int32_t));
    float **floats[] = {&ro->ref, &ro->logp, &ro->old, &ro->entropy};
    double **doubles[] = {&ro->kl, &ro->adv, &ro->ret, &ro->value, &ro->vpred, &ro->weight, &ro->dlogp,
                          &ro->dentropy, &ro->dvalue};
    int ok = ro->tokens && ro->prompt_len && ro->tok_start && ro->target;
    for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++)
        ok &= (*floats[i] = perl_mem_calloc(n, sizeof(float))) != NULL;
    for (size_t i = 0; i < sizeof doubles / sizeof doubles[0]; i++)
        ok &= (*doubles[i] = perl_mem_calloc(n, sizeof(double))) != NULL;
    ok &= (ro->seq_adv = perl_mem_calloc(B, sizeof(double))) != NULL;
    if (!ok) {
        rollout_free(ro);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for a policy batch");
    }
    return LIBPERL_OK;
}

/* Concatenates prompt ++ response per row (inputs already validated). */
static int rollout_build(rollout *ro, const perl_batch *p, const int32_t *responses, const int32_t *lengths,
                         int32_t max_len, const float *rewards, const float *old) {
    memset(ro, 0, sizeof *ro);
    ro->n_rows = p->batch_size, ro->rewards = rewards;
    for (int b = 0; b < p->batch_size; b++) {
        ro->seq_len = PERL_MAX(ro->seq_len, prompt_length(p, b) + lengths[b]);
        ro->n_tok += lengths[b];
    }
    PERL_TRY(rollout_alloc(ro));
    int t = 0;
    for (int b = 0; b < ro->n_rows; b++) {
        int prompt = prompt_length(p, b);
        int32_t *row = ro->tokens + (size_t)b * ro->seq_len;
        const int32_t *resp = responses + (size_t)b * max_len;
        memcpy(row, p->tokens + (size_t)b * p->seq_len, (size_t)prompt * sizeof(int32_t));
        memcpy(row + prompt, resp, (size_t)lengths[b] * sizeof(int32_t));
        ro->prompt_len[b] = prompt;
        ro->tok_start[b] = t;
        for (int j = 0; j < lengths[b]; j++, t++) {
            ro->target[t] = resp[j];
            if (old) ro->old[t] = old[(size_t)b * max_len + j];
        }
    }
    ro->tok_start[ro->n_rows] = t;
    return LIBPERL_OK;
}

/* ---- some rows packed for the engine --------------------------------------------------- */

typedef struct rows_batch {
    packed_batch pb;
    int32_t *targets;      /* [N] LM-head target at each packed position, -1 where none */
    int32_t *tok;          /* [N] the response token t scored there, -1 where none */
    float *logp, *entropy; /* [N] scratch */
} rows_batch;

static void rows_batch_free(rows_batch *rb) {
    packed_free(&rb->pb);
    perl_mem_free(rb->targets);
    perl_mem_free(rb->tok);
    perl_mem_free(rb->logp);
    perl_mem_free(rb->entropy);
    memset(rb, 0, sizeof *rb);
}

static int rows_batch_make(rows_batch *rb, const rollout *ro, const int *rows, int n_rows) {
    memset(rb, 0, sizeof *rb);
    int N = 0;
    for (int k = 0; k < n_rows; k++) {
        int b = rows[k];
        N += ro->prompt_len[b] + ro->tok_start[b + 1] - ro->tok_start[b];
    }
    packed_batch *pb = &rb->pb;
    pb->n_rows = n_rows, pb->n_tokens = N;
    pb->row_start = perl_mem_alloc((size_t)(n_rows + 1) * sizeof(int));
    pb->tokens = perl_mem_alloc((size_t)N * sizeof(int32_t));
    pb->pos = perl_mem_alloc((size_t)N * sizeof(int32_t));
    rb->targets = perl_mem_alloc((size_t)N * sizeof(int32_t));
    rb->tok = perl_mem_alloc((size_t)N * sizeof(int32_t));
    rb->logp = perl_mem_alloc((size_t)N * sizeof(float));
    rb->entropy = perl_mem_alloc((size_t)N * sizeof(float));
    if (!pb->row_start || !pb->tokens || !pb->pos || !rb->targets || !rb->tok || !rb->logp || !rb->entropy) {
        rows_batch_free(rb);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory packing a policy batch");
    }
    int i = 0;
    for (int k = 0; k < n_rows; k++) {
        int b = rows[k], prompt = ro->prompt_len[b], first = ro->tok_start[b];
        int len = prompt + ro->tok_start[b + 1] - first;
        pb->row_start[k] = i;
        for (int p = 0; p < len; p++, i++) {
            pb->tokens[i] = ro->tokens[(size_t)b * ro->seq_len + p];
            pb->pos[i] = p;
            int j = p - (prompt - 1); /* position prompt - 1 + j predicts response token j */
            int scored = j >= 0 && p + 1 < len;
            rb->targets[i] = scored ? ro->target[first + j] : -1;
            rb->tok[i] = scored ? first + j : -1;
        }
    }
    pb->row_start[n_rows] = i;
    return LIBPERL_OK;
}

/* ---- engine passes ------------------------------------------------------------------------- */

/* Forward, then per-token log-probs (and entropies) of the response tokens, no gradient. */
static int score_pass(engine *e, rows_batch *rb, int training, float *logp, float *entropy) {
    PERL_TRY(engine_forward(e, &rb->pb, training));
    PERL_TRY(engine_lm_head(e, rb->targets, rb->logp, rb->entropy, NULL, NULL, NULL));
    for (int i = 0; i < rb->pb.n_tokens; i++) {
        int t = rb->tok[i];
        if (t < 0) continue;
        logp[t] = rb->logp[i];
        if (entropy) entropy[t] = rb->entropy[i];
    }
    return LIBPERL_OK;
}

typedef struct grad_lookup {
    const int32_t *tok;
    const double *dlogp, *dentropy;
} grad_lookup;

static void lookup_grad(void *ctx, int i, float logp, float entropy, float *dlogp, float *dentropy) {
    (void)logp, (void)entropy;
    const grad_lookup *g = ctx;
    *dlogp = (float)g->dlogp[g->tok[i]];
    *dentropy = (float)g->dentropy[g->tok[i]];
}

/* Totals over the optimizer updates of one step, for the stats. */
typedef struct step_totals {
    double loss, value_loss, grad_norm, entropy_sum;
    int64_t entropy_count, clipped, evaluated;
    int n_updates, n_value_updates;
    float lr;
} step_totals;

/* dL/dlogp, dL/dentropy (ro->dlogp / dentropy) through the LM head, backward, one AdamW update. */
static int policy_update(perl_lora *lora, engine *e, rows_batch *rb, const rollout *ro, step_totals *tot) {
    PERL_TRY(perl_lora_zero_grad(lora));
    grad_lookup g = {rb->tok, ro->dlogp, ro->dentropy};
    PERL_TRY(engine_lm_head(e, rb->targets, NULL, NULL, NULL, lookup_grad, &g));
    PERL_TRY(engine_backward(e));
    perl_step_stats st;
    perl_step_stats_init(&st);
    PERL_TRY(perl_lora_optimizer_step(lora, &st));
    tot->grad_norm += st.grad_norm;
    tot->lr = st.lr;
    tot->n_updates++;
    return LIBPERL_OK;
}

/* values[t] = head . h at the position that predicts response token t. */
static int value_pass(engine *e, const perl_lora *value, rows_batch *rb, int training, double *values) {
    PERL_TRY(engine_forward(e, &rb->pb, training));
    int dim = value->model->cfg.dim;
    const float *h = engine_hidden(e);
    for (int i = 0; i < rb->pb.n_tokens; i++) {
        if (rb->tok[i] < 0) continue;
        double v = 0.0;
        for (int j = 0; j < dim; j++) v += (double)value->head[j] * h[(size_t)i * dim + j];
        values[rb->tok[i]] = v;
    }
    return LIBPERL_OK;
}

/* dhead += sum dV h;  dh += dV head;  backward;  one AdamW update of the value adapter. */
static int value_update(perl_lora *value, engine *e, rows_batch *rb, const double *dvalue) {
    int dim = value->model->cfg.dim;
    const float *h = engine_hidden(e);
    float *dh = engine_dhidden(e);
    for (int i = 0; i < rb->pb.n_tokens; i++) {
        if (rb->tok[i] < 0) continue;
        float g = (float)dvalue[rb->tok[i]];
        for (int j = 0; j < dim; j++) {
            value->dhead[j] += g * h[(size_t)i * dim + j];
            dh[(size_t)i * dim + j] += g * value->head[j];
        }
    }
    PERL_TRY(engine_backward(e));
    return perl_lora_optimizer_step(value, NULL);
}

static int not_finite(engine *e, double loss, const char *what) {
    e->training = 0; /* the forward's activations are abandoned */
    return perl_fail(LIBPERL_ERR_NUMERIC, "%s is not finite (%g); state unchanged", what, loss);
}

/* ---- REINFORCE, RLOO, GRPO -------------------------------------------------------------------- */

static int pg_step(perl_policy_trainer *tr, rollout *ro, const int *rows, double baseline, step_totals *tot) {
    rows_batch rb;
    PERL_TRY(rows_batch_make(&rb, ro, rows, ro->n_rows));
    engine *e = NULL;
    int rc = score_pass(tr->ref, &rb, 0, ro->ref, NULL);
    if (rc == LIBPERL_OK) rc = lora_engine(tr->policy, &e);
    if (rc == LIBPERL_OK) rc = score_pass(e, &rb, 1, ro->logp, ro->entropy);
    if (rc == LIBPERL_OK) {
        double loss = policy_pg_objective(ro, &tr->opts, tr->kl_coef, rows, baseline);
        for (int t = 0; t < ro->n_tok; t++) tot->entropy_sum += ro->entropy[t];
        tot->entropy_count += ro->n_tok;
        tot->loss += loss;
        rc = isfinite(loss) ? policy_update(tr->policy, e, &rb, ro, tot) : not_finite(e, loss, "policy loss");
    }
    rows_batch_free(&rb);
    return rc;
}

/* ---- PPO ---------------------------------------------------------------------------------------- */

/* Reference and old log-probs, old values, GAE advantages and returns over the whole batch. */
static int ppo_prepare(perl_policy_trainer *tr, rollout *ro, const int *rows, int have_old) {
    rows_batch rb;
    PERL_TRY(rows_batch_make(&rb, ro, rows, ro->n_rows));
    engine *e = NULL;
    int rc = score_pass(tr->ref, &rb, 0, ro->ref, NULL);
    if (rc == LIBPERL_OK && !have_old) rc = lora_engine(tr->policy, &e);
    if (rc == LIBPERL_OK && !have_old) rc = score_pass(e, &rb, 0, ro->old, NULL);
    if (rc == LIBPERL_OK && tr->value) rc = lora_engine(tr->value, &e);
    if (rc == LIBPERL_OK && tr->value) rc = value_pass(e, tr->value, &rb, 0, ro->value);
    rows_batch_free(&rb);
    if (rc == LIBPERL_OK) policy_ppo_advantages(ro, &tr->opts, tr->kl_coef);
    return rc;
}

static int ppo_value_update(perl_policy_trainer *tr, rollout *ro, rows_batch *rb, const int *rows, int n_rows,
                            step_totals *tot) {
    engine *e;
    PERL_TRY(lora_engine(tr->value, &e));
    PERL_TRY(perl_lora_zero_grad(tr->value));
    PERL_TRY(value_pass(e, tr->value, rb, 1, ro->vpred));
    double loss = policy_value_objective(ro, &tr->opts, rows, n_rows);
    if (!isfinite(loss)) return not_finite(e, loss, "value loss");
    PERL_TRY(value_update(tr->value, e, rb, ro->dvalue));
    tot->value_loss += loss;
    tot->n_value_updates++;
    return LIBPERL_OK;
}

static int ppo_minibatch(perl_policy_trainer *tr, rollout *ro, const int *rows, int n_rows, int first_epoch,
                         step_totals *tot) {
    rows_batch rb;
    PERL_TRY(rows_batch_make(&rb, ro, rows, n_rows));
    engine *e = NULL;
    int rc = lora_engine(tr->policy, &e);
    if (rc == LIBPERL_OK) rc = score_pass(e, &rb, 1, ro->logp, ro->entropy);
    if (rc == LIBPERL_OK) {
        double loss = policy_ppo_objective(ro, &tr->opts, tr->kl_coef, rows, n_rows, &tot->clipped, &tot->evaluated);
        for (int k = 0; first_epoch && k < n_rows; k++) {
            for (int t = ro->tok_start[rows[k]]; t < ro->tok_start[rows[k] + 1]; t++)
                tot->entropy_sum += ro->entropy[t];
            tot->entropy_count += ro->tok_start[rows[k] + 1] - ro->tok_start[rows[k]];
        }
        tot->loss += loss;
        rc = isfinite(loss) ? policy_update(tr->policy, e, &rb, ro, tot) : not_finite(e, loss, "PPO loss");
    }
    if (rc == LIBPERL_OK && tr->value) rc = ppo_value_update(tr, ro, &rb, rows, n_rows, tot);
    rows_batch_free(&rb);
    return rc;
}

/* Fisher-Yates with the trainer's generator (a copy, committed only on success). */
static void shuffle_rows(int *rows, int n, perl_rng *rng) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(perl_rng_next(rng) % (uint64_t)(i + 1));
        int tmp = rows[i];
        rows[i] = rows[j], rows[j] = tmp;
    }
}

static int ppo_step(perl_policy_trainer *tr, rollout *ro, int *rows, int have_old, perl_rng *rng,
                    step_totals *tot) {
    const perl_policy_options *o = &tr->opts;
    PERL_TRY(ppo_prepare(tr, ro, rows, have_old));
    int size = ro->n_rows / o->ppo_minibatches;
    for (int epoch = 0; epoch < o->ppo_epochs; epoch++) {
        if (o->ppo_minibatches > 1) shuffle_rows(rows, ro->n_rows, rng);
        for (int mb = 0; mb < o->ppo_minibatches; mb++)
            PERL_TRY(ppo_minibatch(tr, ro, rows + mb * size, size, epoch == 0, tot));
    }
    return LIBPERL_OK;
}

/* ---- snapshots: undo an adapter's updates when a later part of the step fails -------------------- */

typedef struct adapter_snapshot {
    float *params, *adam_m, *adam_v; /* params NULL: scalars only */
    int had_moments;
    int64_t step;
    uint64_t dropout_counter;
    float lr_override;
    perl_optim_options optim;
} adapter_snapshot;

static void snapshot_free(adapter_snapshot *s) {
    perl_mem_free(s->params);
    perl_mem_free(s->adam_m);
    perl_mem_free(s->adam_v);
    memset(s, 0, sizeof *s);
}

static int snapshot_take(adapter_snapshot *s, const perl_lora *l, int with_params) {
    memset(s, 0, sizeof *s);
    s->had_moments = l->adam_m != NULL;
    s->step = l->step, s->dropout_counter = l->dropout_counter, s->lr_override = l->lr_override;
    s->optim = l->optim;
    if (!with_params) return LIBPERL_OK;
    size_t bytes = l->n_params * sizeof(float);
    s->params = perl_mem_alloc(bytes);
    s->adam_m = s->had_moments ? perl_mem_alloc(bytes) : NULL;
    s->adam_v = s->had_moments ? perl_mem_alloc(bytes) : NULL;
    if (!s->params || (s->had_moments && (!s->adam_m || !s->adam_v))) {
        snapshot_free(s);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for a training-state snapshot");
    }
    memcpy(s->params, l->params, bytes);
    if (s->had_moments) memcpy(s->adam_m, l->adam_m, bytes), memcpy(s->adam_v, l->adam_v, bytes);
    return LIBPERL_OK;
}

/* Puts the adapter back; the snapshot's moment buffers move into it (no allocation can fail here). */
static void snapshot_restore(perl_lora *l, adapter_snapshot *s) {
    l->step = s->step, l->dropout_counter = s->dropout_counter, l->lr_override = s->lr_override;
    l->optim = s->optim;
    if (s->params) {
        memcpy(l->params, s->params, l->n_params * sizeof(float));
        perl_mem_free(l->adam_m);
        perl_mem_free(l->adam_v);
        l->adam_m = s->adam_m, l->adam_v = s->adam_v;
        s->adam_m = s->adam_v = NULL;
    } else if (!s->had_moments && l->adam_m) { /* a single failed update only allocated zero moments */
        perl_mem_free(l->adam_m);
        perl_mem_free(l->adam_v);
        l->adam_m = l->adam_v = NULL;
    }
}

/* ---- the step -------------------------------------------------------------------------------------- */

static void fill_stats(perl_policy_stats *s, const perl_policy_trainer *tr, const rollout *ro, const step_totals *tot) {
    double sum = 0.0, sq = 0.0, kl = 0.0;
    int B = ro->n_rows;
    const float *logp = tr->opts.algorithm == LIBPERL_PG_PPO ? ro->old : ro->logp;
    for (int b = 0; b < B; b++) sum += ro->rewards[b];
    for (int b = 0; b < B; b++) sq += (ro->rewards[b] - sum / B) * (ro->rewards[b] - sum / B);
    for (int t = 0; t < ro->n_tok; t++) kl += (double)logp[t] - ro->ref[t];
    s->loss = (float)(tot->loss / PERL_MAX(tot->n_updates, 1));
    s->mean_reward = (float)(sum / B);
    s->std_reward = (float)sqrt(sq / B);
    s->kl = (float)(kl / B);
    s->entropy = (float)(tot->entropy_sum / (double)PERL_MAX(tot->entropy_count, 1));
    s->response_length = (float)ro->n_tok / (float)B;
    s->clip_fraction = tot->evaluated ? (float)((double)tot->clipped / (double)tot->evaluated) : 0.0f;
    s->value_loss = (float)(tot->value_loss / PERL_MAX(tot->n_value_updates, 1));
    s->grad_norm = (float)(tot->grad_norm / PERL_MAX(tot->n_updates, 1));
    s->lr = tot->lr;
    s->kl_coef = tr->kl_coef;
    s->step = tr->n_steps + 1;
}

/* Baseline, KL coefficient, RNG and step count after a successful step. */
static void commit_scalars(perl_policy_trainer *tr, const rollout *ro, double baseline, const perl_rng *rng,
                           const perl_policy_stats *s) {
    const perl_policy_options *o = &tr->opts;
    if (o->algorithm == LIBPERL_PG_REINFORCE) {
        tr->baseline = o->baseline_decay * baseline + (1.0 - o->baseline_decay) * s->mean_reward;
        tr->baseline_set = 1;
    }
    if (o->kl_target > 0.0f)
        tr->kl_coef = policy_adaptive_kl(tr->kl_coef, s->kl, o->kl_target, o->kl_horizon, ro->n_rows);
    tr->rng = *rng;
    tr->n_steps++;
}

static int validate_step(const perl_policy_trainer *tr, const perl_batch *prompts, const int32_t *responses,
                         const int32_t *response_lengths, int32_t max_response_len, const float *rewards,
                         const float *old_logprobs, const perl_policy_stats *out_stats) {
    PERL_CHECK_ARG(tr, "perl_policy_step: trainer is NULL");
    PERL_CHECK_ARG(prompts, "perl_policy_step: prompts is NULL");
    PERL_CHECK_ARG(responses, "perl_policy_step: responses is NULL");
    PERL_CHECK_ARG(response_lengths, "perl_policy_step: response_lengths is NULL");
    PERL_CHECK_ARG(rewards, "perl_policy_step: rewards is NULL");
    PERL_CHECK_ARG(!out_stats || out_stats->struct_size >= sizeof(perl_policy_stats),
                   "out_stats->struct_size too small (call perl_policy_stats_init)");
    const perl_model_config *c = &tr->model->cfg;
    PERL_TRY(validate_prompts(c, prompts));
    PERL_TRY(validate_responses(c, prompts, responses, response_lengths, max_response_len, rewards, old_logprobs));
    return validate_grouping(&tr->opts, prompts->batch_size);
}

/* Runs the algorithm with undo on failure; on success fills *stats and commits the trainer's scalars. */
static int run_step(perl_policy_trainer *tr, rollout *ro, int *rows, int have_old, perl_policy_stats *stats) {
    const perl_policy_options *o = &tr->opts;
    int ppo = o->algorithm == LIBPERL_PG_PPO;
    int several = ppo && (o->ppo_epochs * o->ppo_minibatches > 1 || tr->value);
    adapter_snapshot sp, sv;
    memset(&sv, 0, sizeof sv);
    PERL_TRY(snapshot_take(&sp, tr->policy, several));
    int rc = tr->value ? snapshot_take(&sv, tr->value, several) : LIBPERL_OK;
    double mean = 0.0;
    for (int b = 0; b < ro->n_rows; b++) mean += ro->rewards[b];
    double baseline = tr->baseline_set ? tr->baseline : mean / ro->n_rows; /* the first step: batch mean */
    perl_rng rng = tr->rng;
    step_totals tot;
    memset(&tot, 0, sizeof tot);
    if (rc == LIBPERL_OK)
        rc = ppo ? ppo_step(tr, ro, rows, have_old, &rng, &tot) : pg_step(tr, ro, rows, baseline, &tot);
    if (rc != LIBPERL_OK) {
        snapshot_restore(tr->policy, &sp);
        if (tr->value) snapshot_restore(tr->value, &sv);
    } else {
        fill_stats(stats, tr, ro, &tot);
        commit_scalars(tr, ro, baseline, &rng, stats);
    }
    snapshot_free(&sp);
    snapshot_free(&sv);
    return rc;
}

int perl_policy_step(perl_policy_trainer *tr, const perl_batch *prompts, const int32_t *responses,
                     const int32_t *response_lengths, int32_t max_response_len, const float *rewards,
                     const float *old_logprobs, perl_policy_stats *out_stats) {
    PERL_TRY(validate_step(tr, prompts, responses, response_lengths, max_response_len, rewards, old_logprobs,
                           out_stats));
    rollout ro;
    PERL_TRY(rollout_build(&ro, prompts, responses, response_lengths, max_response_len, rewards, old_logprobs));
    int *rows = perl_mem_alloc((size_t)ro.n_rows * sizeof(int));
    int rc = rows ? LIBPERL_OK : perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    perl_policy_stats stats;
    perl_policy_stats_init(&stats);
    for (int b = 0; rows && b < ro.n_rows; b++) rows[b] = b;
    if (rc == LIBPERL_OK) rc = run_step(tr, &ro, rows, old_logprobs != NULL, &stats);
    if (rc == LIBPERL_OK && out_stats) {
        stats.struct_size = out_stats->struct_size;
        memcpy(out_stats, &stats, sizeof stats);
    }
    perl_mem_free(rows);
    rollout_free(&ro);
    return rc;
}

/* ---- checkpoints --------------------------------------------------------------------------------- */

#define POLICY_MAGIC "LPPOLICY"
#define POLICY_BLOB_VERSION 1u
#define POLICY_BLOB_BYTES 56

/* The trainer's part of trainer_state.bin (little-endian, fixed offsets):
 *   magic[8] | u32 version | i32 algorithm | i32 has_value | i32 baseline_set |
 *   f64 baseline | f32 kl_coef | u32 reserved | u64 rng_state | i64 n_steps */
static void blob_encode(unsigned char *p, const perl_policy_trainer *tr) {
    uint32_t version = POLICY_BLOB_VERSION, reserved = 0;
    int32_t algorithm = tr->opts.algorithm, has_value = tr->value != NULL, baseline_set = tr->baseline_set;
    memcpy(p, POLICY_MAGIC, 8);
    memcpy(p + 8, &version, 4);
    memcpy(p + 12, &algorithm, 4);
    memcpy(p + 16, &has_value, 4);
    memcpy(p + 20, &baseline_set, 4);
    memcpy(p + 24, &tr->baseline, 8);
    memcpy(p + 32, &tr->kl_coef, 4);
    memcpy(p + 36, &reserved, 4);
    memcpy(p + 40, &tr->rng.state, 8);
    memcpy(p + 48, &tr->n_steps, 8);
}

typedef struct trainer_scalars {
    double baseline;
    int32_t baseline_set;
    float kl_coef;
    perl_rng rng;
    int64_t n_steps;
} trainer_scalars;

static int blob_decode(trainer_scalars *out, const unsigned char *p, size_t len, const perl_policy_trainer *tr,
                       const char *path) {
    uint32_t version;
    int32_t algorithm, has_value;
    if (len != POLICY_BLOB_BYTES || memcmp(p, POLICY_MAGIC, 8) != 0)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: not a policy-trainer state", path);
    memcpy(&version, p + 8, 4);
    memcpy(&algorithm, p + 12, 4);
    memcpy(&has_value, p + 16, 4);
    if (version != POLICY_BLOB_VERSION)
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: policy-trainer state version %u not supported", path, version);
    if (algorithm != tr->opts.algorithm || has_value != (tr->value != NULL))
        return perl_fail(LIBPERL_ERR_SHAPE, "%s: saved by a trainer with algorithm %d and %s value adapter", path,
                         algorithm, has_value ? "a" : "no");
    memcpy(&out->baseline_set, p + 20, 4);
    memcpy(&out->baseline, p + 24, 8);
    memcpy(&out->kl_coef, p + 32, 4);
    memcpy(&out->rng.state, p + 40, 8);
    memcpy(&out->n_steps, p + 48, 8);
    return LIBPERL_OK;
}

/* dir/name, or NULL after recording an out-of-memory error. */
static char *join_or_fail(const char *dir, const char *name) {
    char *path = file_join(dir, name);
    if (!path) perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    return path;
}

static int save_value_state(const perl_policy_trainer *tr, const char *dir) {
    char *path = join_or_fail(dir, "value_state.bin");
    if (!path) return LIBPERL_ERR_OUT_OF_MEMORY;
    /* the step count ties value_state.bin to trainer_state.bin */
    int rc = lora_state_save(tr->value, path, &tr->n_steps, sizeof tr->n_steps);
    perl_mem_free(path);
    return rc;
}

int perl_policy_save(const perl_policy_trainer *tr, const char *dir) {
    PERL_CHECK_ARG(tr, "perl_policy_save: trainer is NULL");
    PERL_CHECK_ARG(dir && *dir, "perl_policy_save: dir is NULL or empty");
    PERL_TRY(file_mkdir_p(dir));
    char *adapter = join_or_fail(dir, "adapter"), *value = join_or_fail(dir, "value");
    char *state = join_or_fail(dir, "trainer_state.bin");
    int rc = adapter && value && state ? LIBPERL_OK : LIBPERL_ERR_OUT_OF_MEMORY;
    if (rc == LIBPERL_OK) rc = perl_lora_save(tr->policy, adapter);
    if (rc == LIBPERL_OK && tr->value) rc = perl_lora_save(tr->value, value);
    if (rc == LIBPERL_OK && tr->value) rc = save_value_state(tr, dir);
    unsigned char blob[POLICY_BLOB_BYTES];
    blob_encode(blob, tr);
    if (rc == LIBPERL_OK) rc = lora_state_save(tr->policy, state, blob, sizeof blob); /* last: marks completion */
    perl_mem_free(adapter);
    perl_mem_free(value);
    perl_mem_free(state);
    return rc;
}

static int load_value_state(perl_policy_trainer *tr, const char *dir, int64_t n_steps) {
    char *path = join_or_fail(dir, "value_state.bin");
    if (!path) return LIBPERL_ERR_OUT_OF_MEMORY;
    void *extra = NULL;
    size_t len = 0;
    int64_t saved = -1;
    int rc = lora_state_load(tr->value, path, &extra, &len);
    if (rc == LIBPERL_OK && len == sizeof saved) memcpy(&saved, extra, sizeof saved);
    if (rc == LIBPERL_OK && saved != n_steps)
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: value state from step %lld, trainer state from step %lld", path,
                       (long long)saved, (long long)n_steps);
    perl_mem_free(extra);
    perl_mem_free(path);
    return rc;
}

/* Loads both states into the adapters; the caller undoes them on failure. */
static int load_states(perl_policy_trainer *tr, const char *dir, trainer_scalars *out) {
    char *path = join_or_fail(dir, "trainer_state.bin");
    if (!path) return LIBPERL_ERR_OUT_OF_MEMORY;
    void *extra = NULL;
    size_t len = 0;
    int rc = lora_state_load(tr->policy, path, &extra, &len);
    if (rc == LIBPERL_OK) rc = blob_decode(out, extra, len, tr, path);
    if (rc == LIBPERL_OK && tr->value) rc = load_value_state(tr, dir, out->n_steps);
    perl_mem_free(extra);
    perl_mem_free(path);
    return rc;
}

int perl_policy_load(perl_policy_trainer *tr, const char *dir) {
    PERL_CHECK_ARG(tr, "perl_policy_load: trainer is NULL");
    PERL_CHECK_ARG(dir && *dir, "perl_policy_load: dir is NULL or empty");
    adapter_snapshot sp, sv;
    memset(&sv, 0, sizeof sv);
    PERL_TRY(snapshot_take(&sp, tr->policy, 1));
    int rc = tr->value ? snapshot_take(&sv, tr->value, 1) : LIBPERL_OK;
    trainer_scalars s;
    memset(&s, 0, sizeof s);
    if (rc == LIBPERL_OK) {
        rc = load_states(tr, dir, &s);
        if (rc != LIBPERL_OK) {
            snapshot_restore(tr->policy, &sp);
            if (tr->value) snapshot_restore(tr->value, &sv);
        }
    }
    if (rc == LIBPERL_OK) {
        tr->baseline = s.baseline, tr->baseline_set = s.baseline_set, tr->kl_coef = s.kl_coef;
        tr->rng = s.rng, tr->n_steps = s.n_steps;
    }
    snapshot_free(&sp);
    snapshot_free(&sv);
    return rc;
}
