/* Policy-gradient objectives over per-token arrays (formulas in policy.h and docs/policy.md). */
#include "policy.h"

#include <math.h>

double policy_kl_value(int estimator, double d) {
    switch (estimator) {
    case LIBPERL_KL_K2: return 0.5 * d * d;
    case LIBPERL_KL_K3: return exp(-d) - 1.0 + d; /* r = p_ref / p = exp(-d): r - 1 - log r */
    default: return d;
    }
}

double policy_kl_grad(int estimator, double d) {
    switch (estimator) {
    case LIBPERL_KL_K2: return d;
    case LIBPERL_KL_K3: return 1.0 - exp(-d);
    default: return 1.0;
    }
}

/* mean and unbiased std of x[0..n) */
static void mean_std(const float *x, int n, double *mean, double *std) {
    double s = 0.0, ss = 0.0;
    for (int i = 0; i < n; i++) s += x[i];
    *mean = s / n;
    for (int i = 0; i < n; i++) ss += (x[i] - *mean) * (x[i] - *mean);
    *std = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
}

void policy_seq_advantages(double *adv, const float *rewards, int n_rows, int algorithm, int group_size,
                           double baseline) {
    if (algorithm == LIBPERL_PG_REINFORCE || algorithm == LIBPERL_PG_PPO) {
        for (int b = 0; b < n_rows; b++) adv[b] = rewards[b] - baseline;
        return;
    }
    for (int g = 0; g < n_rows; g += group_size) {
        const float *r = rewards + g;
        double mean, std;
        mean_std(r, group_size, &mean, &std);
        for (int i = 0; i < group_size; i++) {
            if (algorithm == LIBPERL_PG_RLOO) /* r_i - (sum - r_i) / (k - 1) */
                adv[g + i] = r[i] - (mean * group_size - r[i]) / (group_size - 1);
            else
                adv[g + i] = (r[i] - mean) / (std + POLICY_STD_EPS);
        }
    }
}

void policy_token_advantages(double *adv, const double *seq_adv, const double *kl, double coef, const int *tok_start,
                             int n_rows) {
    for (int b = 0; b < n_rows; b++) {
        double to_go = 0.0; /* sum of kl over this and later tokens of the row */
        for (int t = tok_start[b + 1] - 1; t >= tok_start[b]; t--) {
            to_go += kl[t];
            adv[t] = seq_adv[b] - coef * to_go;
        }
    }
}

void policy_gae(double *adv, double *ret, const double *values, const double *kl, double coef, const float *rewards,
                const int *tok_start, int n_rows, double gamma, double lambda) {
    for (int b = 0; b < n_rows; b++) {
        int end = tok_start[b + 1];
        double next_adv = 0.0;
        for (int t = end - 1; t >= tok_start[b]; t--) {
            double reward = -coef * kl[t] + (t == end - 1 ? rewards[b] : 0.0);
            double next_value = t + 1 < end ? values[t + 1] : 0.0;
            double delta = reward + gamma * next_value - values[t];
            next_adv = delta + gamma * lambda * next_adv;
            adv[t] = next_adv;
            ret[t] = next_adv + values[t];
        }
    }
}

void policy_whiten(double *x, int n) {
    if (n < 1) return;
    double s = 0.0, ss = 0.0;
    for (int i = 0; i < n; i++) s += x[i];
    double mean = s / n;
    for (int i = 0; i < n; i++) ss += (x[i] - mean) * (x[i] - mean);
    double var = n > 1 ? ss / (n - 1) : 0.0;
    double inv = 1.0 / sqrt(var + POLICY_STD_EPS);
    for (int i = 0; i < n; i++) x[i] = (x[i] - mean) * inv;
}

void policy_token_weights(double *weight, const int *rows, int n_rows, const int *tok_start, int loss_norm) {
    int64_t total = 0;
    for (int k = 0; k < n_rows; k++) total += tok_start[rows[k] + 1] - tok_start[rows[k]];
    for (int k = 0; k < n_rows; k++) {
        int b = rows[k], len = tok_start[b + 1] - tok_start[b];
        double w = loss_norm == LIBPERL_NORM_SEQUENCE ? 1.0 / ((double)n_rows * len) : 1.0 / (double)total;
        for (int t = tok_start[b]; t < tok_start[b + 1]; t++) weight[t] = w;
    }
}

double policy_ppo_term(double logp, double old, double adv, double eps, double *dlogp, int *clipped) {
    double ratio = exp(logp - old);
    double clipped_ratio = ratio < 1.0 - eps ? 1.0 - eps : ratio > 1.0 + eps ? 1.0 + eps : ratio;
    double plain = -adv * ratio, pessimistic = -adv * clipped_ratio;
    *clipped = pessimistic > plain;
    *dlogp = *clipped ? 0.0 : -adv * ratio; /* d(-adv * exp(logp - old)) / dlogp */
    return *clipped ? pessimistic : plain;
}

double policy_value_term(double v, double v_old, double ret, double clip, double *dv) {
    double plain = (v - ret) * (v - ret);
    if (clip <= 0.0) {
        *dv = v - ret;
        return 0.5 * plain;
    }
    double step = v - v_old;
    double v_clipped = v_old + (step < -clip ? -clip : step > clip ? clip : step);
    double clipped = (v_clipped - ret) * (v_clipped - ret);
    if (clipped > plain) { /* only with v outside the clip range, where v_clipped is constant */
        *dv = 0.0;
        return 0.5 * clipped;
    }
    *dv = v - ret;
    return 0.5 * plain;
}

float policy_adaptive_kl(float coef, double kl, float target, float horizon, int n_samples) {
    double error = kl / target - 1.0;
    error = error < -0.2 ? -0.2 : error > 0.2 ? 0.2 : error;
    return (float)(coef * (1.0 + error * n_samples / horizon));
}

/* ---- objectives over a rollout ------------------------------------------------------------ */

double policy_pg_objective(rollout *ro, const perl_policy_options *o, float kl_coef, const int *rows,
                           double baseline) {
    for (int t = 0; t < ro->n_tok; t++) ro->kl[t] = policy_kl_value(o->kl_estimator, (double)ro->logp[t] - ro->ref[t]);
    policy_seq_advantages(ro->seq_adv, ro->rewards, ro->n_rows, o->algorithm, o->group_size, baseline);
    double reward_coef = o->kl_mode == LIBPERL_KL_IN_REWARD ? kl_coef : 0.0;
    double loss_coef = o->kl_mode == LIBPERL_KL_IN_LOSS ? kl_coef : 0.0;
    policy_token_advantages(ro->adv, ro->seq_adv, ro->kl, reward_coef, ro->tok_start, ro->n_rows);
    if (o->whiten_advantages) policy_whiten(ro->adv, ro->n_tok);
    policy_token_weights(ro->weight, rows, ro->n_rows, ro->tok_start, o->loss_norm);
    double loss = 0.0;
    for (int t = 0; t < ro->n_tok; t++) {
        double w = ro->weight[t], d = (double)ro->logp[t] - ro->ref[t];
        loss += w * (-ro->adv[t] * ro->logp[t] + loss_coef * ro->kl[t] - o->entropy_coef * ro->entropy[t]);
        ro->dlogp[t] = w * (-ro->adv[t] + loss_coef * policy_kl_grad(o->kl_estimator, d));
        ro->dentropy[t] = -w * o->entropy_coef;
    }
    return loss;
}

void policy_ppo_advantages(rollout *ro, const perl_policy_options *o, float kl_coef) {
    /* the penalty in the reward is a constant: the sampling policy's KL to the reference */
    for (int t = 0; t < ro->n_tok; t++) ro->kl[t] = policy_kl_value(o->kl_estimator, (double)ro->old[t] - ro->ref[t]);
    double reward_coef = o->kl_mode == LIBPERL_KL_IN_REWARD ? kl_coef : 0.0;
    policy_gae(ro->adv, ro->ret, ro->value, ro->kl, reward_coef, ro->rewards, ro->tok_start, ro->n_rows, o->gamma,
               o->lambda);
    if (o->whiten_advantages) policy_whiten(ro->adv, ro->n_tok);
}

double policy_ppo_objective(rollout *ro, const perl_policy_options *o, float kl_coef, const int *rows, int n_rows,
                            int64_t *clipped, int64_t *evaluated) {
    double loss_coef = o->kl_mode == LIBPERL_KL_IN_LOSS ? kl_coef : 0.0, loss = 0.0;
    policy_token_weights(ro->weight, rows, n_rows, ro->tok_start, o->loss_norm);
    for (int k = 0; k < n_rows; k++) {
        for (int t = ro->tok_start[rows[k]]; t < ro->tok_start[rows[k] + 1]; t++) {
            double w = ro->weight[t], d = (double)ro->logp[t] - ro->ref[t], dpg;
            int was_clipped;
            double pg = policy_ppo_term(ro->logp[t], ro->old[t], ro->adv[t], o->clip_eps, &dpg, &was_clipped);
            loss += w * (pg + loss_coef * policy_kl_value(o->kl_estimator, d) - o->entropy_coef * ro->entropy[t]);
            ro->dlogp[t] = w * (dpg + loss_coef * policy_kl_grad(o->kl_estimator, d));
            ro->dentropy[t] = -w * o->entropy_coef;
            *clipped += was_clipped;
            (*evaluated)++;
        }
    }
    return loss;
}

double policy_value_objective(rollout *ro, const perl_policy_options *o, const int *rows, int n_rows) {
    double loss = 0.0;
    for (int k = 0; k < n_rows; k++) {
        for (int t = ro->tok_start[rows[k]]; t < ro->tok_start[rows[k] + 1]; t++) {
            double dv;
            loss += ro->weight[t] * policy_value_term(ro->vpred[t], ro->value[t], ro->ret[t], o->value_clip, &dv);
            ro->dvalue[t] = o->value_coef * ro->weight[t] * dv;
        }
    }
    return loss;
}
