/*
 * The policy trainer's objectives as pure functions over flat per-token
 * arrays (policy_objectives.c), so the math can be read, and tested, apart
 * from the engine plumbing in policy.c.  docs/policy.md states every formula.
 *
 * Layout: row b's response tokens are t in [tok_start[b], tok_start[b+1]);
 * arrays indexed by t hold one value per response token, in order.
 */
#ifndef LIBPERL_POLICY_H
#define LIBPERL_POLICY_H

#include "internal.h"

#define POLICY_STD_EPS 1e-8 /* GRPO's std floor and the whitening variance floor */

/* One step's batch: prompt ++ response per row, and per-response-token values. */
typedef struct rollout {
    int n_rows, seq_len, n_tok;
    int32_t *tokens;      /* [n_rows, seq_len]: prompt ++ response, right-padded with 0 */
    int32_t *prompt_len;  /* [n_rows] */
    int *tok_start;       /* [n_rows + 1] response-token offsets */
    int32_t *target;      /* [n_tok] the response token */
    const float *rewards; /* [n_rows], the caller's */
    float *ref, *logp, *old, *entropy;          /* [n_tok] log-probs (reference, policy, PPO old), entropies */
    double *kl, *adv, *ret, *value, *vpred;     /* [n_tok] KL terms, advantages, returns, old / new values */
    double *weight, *dlogp, *dentropy, *dvalue; /* [n_tok] loss weights and gradients */
    double *seq_adv;                            /* [n_rows] */
} rollout;

/* KL estimator at d = logp - logp_ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d. */
double policy_kl_value(int estimator, double d);
/* Its derivative with respect to logp: 1, d, 1 - exp(-d). */
double policy_kl_grad(int estimator, double d);

/*
 * Sequence advantages A_b [B]:
 *   REINFORCE: r_b - baseline
 *   RLOO:      r_b - mean of the other k - 1 rewards of the group
 *   GRPO:      (r_b - mean_g) / (std_g + 1e-8), std unbiased (k - 1)
 * Groups are consecutive rows of group_size.
 */
void policy_seq_advantages(double *adv, const float *rewards, int n_rows, int algorithm, int group_size,
                           double baseline);

/* Non-PPO per-token advantages: adv[t] = seq_adv[b] - coef * sum_{t' >= t in row b} kl[t']. */
void policy_token_advantages(double *adv, const double *seq_adv, const double *kl, double coef, const int *tok_start,
                             int n_rows);

/*
 * GAE over each row with per-token rewards
 *   reward_t = -coef * kl[t] (+ rewards[b] at the row's last token),
 *   delta_t = reward_t + gamma * V_{t+1} - V_t   (V after the last token = 0),
 *   adv_t = delta_t + gamma * lambda * adv_{t+1},  ret_t = adv_t + V_t.
 */
void policy_gae(double *adv, double *ret, const double *values, const double *kl, double coef, const float *rewards,
                const int *tok_start, int n_rows, double gamma, double lambda);

/* x = (x - mean) / sqrt(var + 1e-8) over n values, var unbiased (0 when n < 2). */
void policy_whiten(double *x, int n);

/* Loss weights of the tokens of rows[0..n_rows): TOKEN 1 / (their token count); SEQUENCE 1 / (n_rows * len_b). */
void policy_token_weights(double *weight, const int *rows, int n_rows, const int *tok_start, int loss_norm);

/*
 * PPO-clip term of one token: ratio = exp(logp - old),
 *   loss = max(-adv * ratio, -adv * clip(ratio, 1 - eps, 1 + eps)),
 * *dlogp = its derivative (0 where the clipped branch is strictly larger,
 * which happens only with the ratio outside the clip range), *clipped = 1 then.
 */
double policy_ppo_term(double logp, double old, double adv, double eps, double *dlogp, int *clipped);

/*
 * Value loss of one token: 0.5 (v - ret)^2, or with clip > 0
 *   0.5 max((v - ret)^2, (v_old + clip(v - v_old, -clip, clip) - ret)^2);
 * *dv = its derivative with respect to v.
 */
double policy_value_term(double v, double v_old, double ret, double clip, double *dv);

/* ---- objectives over a rollout (all rows or a minibatch `rows[0..n_rows)`) ---- */

/*
 * REINFORCE / RLOO / GRPO over every row, from logp, ref, entropy:
 *   L = sum_t w_t (-A_t logp_t + [IN_LOSS] kl_coef k(d_t) - entropy_coef H_t).
 * Fills kl, seq_adv, adv, weight, dlogp = dL/dlogp, dentropy = dL/dH; returns L.
 */
double policy_pg_objective(rollout *ro, const perl_policy_options *o, float kl_coef, const int *rows,
                           double baseline);

/* PPO, once per step: kl_t = k(old_t - ref_t), GAE advantages and returns from value, whitening. */
void policy_ppo_advantages(rollout *ro, const perl_policy_options *o, float kl_coef);

/*
 * PPO-clip over the minibatch's tokens with the current logp / entropy:
 *   L = sum_t w_t (pg_t + [IN_LOSS] kl_coef k(logp_t - ref_t) - entropy_coef H_t).
 * Fills weight, dlogp, dentropy; counts clipped / evaluated tokens; returns L.
 */
double policy_ppo_objective(rollout *ro, const perl_policy_options *o, float kl_coef, const int *rows, int n_rows,
                            int64_t *clipped, int64_t *evaluated);

/* Value loss sum_t w_t value_term(vpred_t, value_t, ret_t) (weights from policy_ppo_objective);
 * fills dvalue = value_coef * dL/dvpred; returns the loss without value_coef. */
double policy_value_objective(rollout *ro, const perl_policy_options *o, const int *rows, int n_rows);

/* Ziegler et al.'s controller: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_samples / horizon). */
float policy_adaptive_kl(float coef, double kl, float target, float horizon, int n_samples);

#endif /* LIBPERL_POLICY_H */
