/*
 * Run helpers shared by the examples: error messages, option values, timing,
 * memory (peak RSS) and ROC AUC.
 */
#ifndef EXAMPLES_EVAL_H
#define EXAMPLES_EVAL_H

#include <stddef.h>
#include <stdint.h>

/* The prefix of ex_fail's messages ("<ex_program>: ..."); set it first thing in main. */
extern const char *ex_program;

/* Prints "<ex_program>: <message>\n" to stderr; returns -1. */
int ex_fail(const char *fmt, ...);

/* One option of a table: an int in [lo, hi], a float in [flo, fhi], or a string. */
typedef struct ex_option {
    const char *name;
    int *ivalue, lo, hi;
    float *fvalue, flo, fhi;
    const char **svalue;
} ex_option;

int ex_parse_int(const char *s, int lo, int hi, int *out, const char *name);
int ex_parse_float(const char *s, float lo, float hi, float *out, const char *name);

/* Parses argv[*i] (an option of table[0, n), or --seed into *seed) and its
 * value argv[*i + 1], advancing *i past the value.  0 on success, -1 after a
 * message, 1 when argv[*i] is not an option (nothing printed). */
int ex_option_arg(const ex_option *table, size_t n, uint64_t *seed, int argc, char **argv, int *i);

/* CLOCK_MONOTONIC in seconds. */
double ex_now_seconds(void);

/* The process's peak resident set (getrusage) in MB, or NaN. */
double ex_peak_rss_mb(void);
/* A "Vm...:  <kB> kB" line of /proc/self/status in MB, or NaN. */
double ex_proc_status_mb(const char *key);
/* Resets the kernel's high-water mark (VmHWM) so that the peak of a later
 * phase alone can be read.  Linux >= 4.0; returns 0 on success. */
int ex_reset_peak_rss(void);

typedef struct ex_scored {
    float score, label;
} ex_scored;

/* ROC AUC = P(score of a positive > score of a negative), ties counted half
 * (Mann-Whitney); sorts s by score.  NaN when one class is missing. */
double ex_roc_auc(ex_scored *s, int n);

#endif /* EXAMPLES_EVAL_H */
