/*
 * Token sampling from one row of logits: greedy argmax, or temperature
 * followed by top-k, top-p (nucleus) and min-p filtering, renormalisation
 * and one uniform draw.  Pure functions of (logits, settings, uniform), so
 * perl_generate can sample rows in parallel with one RNG stream per row.
 *
 * The sampling distribution, exactly (docs/policy.md, "Sampling"):
 *   z_j = logits_j / T,  e_j = exp(z_j - max z)       (p_j = e_j / sum e)
 *   candidates sorted by (e desc, token id asc);
 *   top-k   (k > 0):  keep the first k;
 *   top-p   (p < 1):  keep the shortest prefix whose mass, relative to the
 *                     tokens still kept, reaches p;
 *   min-p   (> 0):    keep tokens with p_j >= min_p * p_max (e_j >= min_p);
 *   q_j = e_j / sum_{kept} e   for kept j, 0 otherwise.
 * The log-probability reported is log q of the drawn token.
 */
#ifndef LIBPERL_SAMPLE_H
#define LIBPERL_SAMPLE_H

#include "internal.h"

typedef struct sample_params {
    float temperature; /* 0: greedy */
    int32_t top_k;     /* 0: off */
    float top_p;       /* 1: off */
    float min_p;       /* 0: off */
} sample_params;

/* One candidate token: its unnormalised probability and id. */
typedef struct sample_entry {
    float e;
    int32_t id;
} sample_entry;

/* Index of the largest logit; ties go to the lowest id. */
int32_t sample_argmax(const float *logits, int vocab);

/* log softmax(logits)[token], accumulated in double. */
double sample_log_softmax_at(const float *logits, int vocab, int32_t token);

/*
 * The filtered distribution of the header comment: writes the kept tokens
 * into kept[0..n) in sampling order (sorted when a top-k / top-p filter is
 * on, by id otherwise) and returns n >= 1; *out_log_mass = log sum_{kept} e.
 * kept is scratch of `vocab` entries.  temperature > 0.
 */
int sample_filter(sample_entry *kept, const float *logits, int vocab, const sample_params *sp, double *out_log_mass);

/*
 * Draws one token.  Greedy (temperature 0): argmax, log-prob under the raw
 * softmax.  Otherwise: the token where the cumulative kept mass passes
 * u * total (u in [0, 1)), log-prob under the filtered distribution.
 */
int32_t sample_token(const float *logits, int vocab, const sample_params *sp, float u, sample_entry *scratch,
                     float *out_logprob);

#endif /* LIBPERL_SAMPLE_H */
