/* Sampling one token from a row of logits (see sample.h for the exact distribution). */
#include "sample.h"

#include <math.h>
#include <stdlib.h>

int32_t sample_argmax(const float *logits, int vocab) {
    int32_t best = 0;
    for (int j = 1; j < vocab; j++)
        if (logits[j] > logits[best]) best = j; /* strict: ties keep the lowest id */
    return best;
}

double sample_log_softmax_at(const float *logits, int vocab, int32_t token) {
    double m = logits[sample_argmax(logits, vocab)], sum = 0.0;
    for (int j = 0; j < vocab; j++) sum += exp((double)logits[j] - m);
    return ((double)logits[token] - m) - log(sum);
}

/* Sampling order: larger probability first, then lower id (deterministic ties). */
static int entry_cmp(const void *pa, const void *pb) {
    const sample_entry *a = pa, *b = pb;
    if (a->e != b->e) return a->e > b->e ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

/* Shortest prefix of the sorted kept[0..n) whose mass reaches top_p of their total. */
static int nucleus_size(const sample_entry *kept, int n, float top_p) {
    double mass = 0.0, cum = 0.0;
    for (int i = 0; i < n; i++) mass += kept[i].e;
    for (int i = 0; i < n; i++) {
        cum += kept[i].e;
        if (cum >= (double)top_p * mass) return i + 1;
    }
    return n;
}

int sample_filter(sample_entry *kept, const float *logits, int vocab, const sample_params *sp, double *out_log_mass) {
    /* z = logits / T in double, so a tiny temperature cannot overflow */
    double T = sp->temperature, m = (double)logits[sample_argmax(logits, vocab)] / T;
    for (int j = 0; j < vocab; j++) kept[j] = (sample_entry){(float)exp((double)logits[j] / T - m), j};
    int n = vocab;
    int top_k_on = sp->top_k > 0 && sp->top_k < vocab, top_p_on = sp->top_p < 1.0f;
    if (top_k_on || top_p_on) {
        qsort(kept, (size_t)vocab, sizeof *kept, entry_cmp);
        if (top_k_on) n = sp->top_k;
        if (top_p_on) n = nucleus_size(kept, n, sp->top_p);
        if (sp->min_p > 0.0f)
            while (n > 1 && kept[n - 1].e < sp->min_p) n--;
    } else if (sp->min_p > 0.0f) {
        /* p_j >= min_p * p_max  <=>  e_j >= min_p, since e of the top token is 1 */
        n = 0;
        for (int j = 0; j < vocab; j++)
            if (kept[j].e >= sp->min_p) kept[n++] = kept[j];
    }
    double mass = 0.0;
    for (int i = 0; i < n; i++) mass += kept[i].e;
    *out_log_mass = log(mass);
    return n;
}

int32_t sample_token(const float *logits, int vocab, const sample_params *sp, float u, sample_entry *scratch,
                     float *out_logprob) {
    if (sp->temperature == 0.0f) {
        int32_t best = sample_argmax(logits, vocab);
        *out_logprob = (float)sample_log_softmax_at(logits, vocab, best);
        return best;
    }
    double log_mass;
    int n = sample_filter(scratch, logits, vocab, sp, &log_mass);
    double target = (double)u * exp(log_mass), cum = 0.0;
    int pick = 0; /* rounding fallback: the last kept token of non-zero mass */
    for (int i = 0; i < n; i++) {
        if (scratch[i].e <= 0.0f) continue;
        cum += scratch[i].e;
        pick = i;
        if (target < cum) break;
    }
    int32_t id = scratch[pick].id;
    double T = sp->temperature, m = (double)logits[sample_argmax(logits, vocab)] / T;
    *out_logprob = (float)(((double)logits[id] / T - m) - log_mass);
    return id;
}
