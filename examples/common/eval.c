/* Messages, option values, timing, memory and ROC AUC for the examples (see eval.h). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, getrusage */

#include "eval.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

const char *ex_program = "example";

int ex_fail(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "%s: ", ex_program);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return -1;
}

int ex_parse_int(const char *s, int lo, int hi, int *out, const char *name) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return ex_fail("%s: '%s' is not an integer in [%d, %d]", name, s, lo, hi);
    *out = (int)v;
    return 0;
}

int ex_parse_float(const char *s, float lo, float hi, float *out, const char *name) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return ex_fail("%s: '%s' is not a number in [%g, %g]", name, s, (double)lo, (double)hi);
    *out = v;
    return 0;
}

int ex_option_arg(const ex_option *table, size_t n, uint64_t *seed, int argc, char **argv, int *i) {
    size_t k = 0;
    while (k < n && strcmp(argv[*i], table[k].name) != 0) k++;
    if (k == n && strcmp(argv[*i], "--seed") != 0) return 1;
    if (*i + 1 >= argc) return ex_fail("%s needs a value", argv[*i]);
    const char *v = argv[++*i];
    if (k == n) { /* --seed: 64 bits */
        char *end;
        errno = 0;
        unsigned long long s = strtoull(v, &end, 10);
        if (errno || end == v || *end) return ex_fail("--seed: '%s' is not an unsigned integer", v);
        *seed = s;
        return 0;
    }
    if (table[k].ivalue) return ex_parse_int(v, table[k].lo, table[k].hi, table[k].ivalue, table[k].name);
    if (table[k].fvalue) return ex_parse_float(v, table[k].flo, table[k].fhi, table[k].fvalue, table[k].name);
    *table[k].svalue = v;
    return 0;
}

double ex_now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double ex_peak_rss_mb(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss / 1024.0 : NAN; /* Linux: kilobytes */
}

double ex_proc_status_mb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double mb = NAN;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, n) == 0 && line[n] == ':') mb = strtod(line + n + 1, NULL) / 1024.0;
    if (f) fclose(f);
    return mb;
}

int ex_reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return -1;
    int ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static int by_score(const void *a, const void *b) {
    float x = ((const ex_scored *)a)->score, y = ((const ex_scored *)b)->score;
    return (x > y) - (x < y);
}

double ex_roc_auc(ex_scored *s, int n) {
    qsort(s, (size_t)n, sizeof *s, by_score);
    double rank_sum = 0.0, n_pos = 0.0;
    for (int i = 0; i < n;) {
        int j = i;
        while (j < n && s[j].score == s[i].score) j++;
        double mid_rank = 0.5 * (i + 1 + j); /* 1-based average rank of the tie block */
        for (int k = i; k < j; k++)
            if (s[k].label != 0.0f) rank_sum += mid_rank, n_pos += 1.0;
        i = j;
    }
    double n_neg = n - n_pos;
    return n_pos > 0 && n_neg > 0 ? (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) : NAN;
}
