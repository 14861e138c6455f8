/*
 * Measurement helpers shared by the benchmark programs: wall and CPU clocks,
 * machine load, resident memory, medians.  Header-only so every benchmark
 * stays one standalone program.
 */
#ifndef LIBPERL_BENCH_UTIL_H
#define LIBPERL_BENCH_UTIL_H

#include <libperl/libperl.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

/* A benchmark stops at the first library error, naming the call, the status
 * and the library's message.  Each program defines BENCH_NAME before
 * including this header. */
#ifndef BENCH_NAME
#  define BENCH_NAME "bench"
#endif
static inline void bench_die(const char *what, int status) {
    fprintf(stderr, BENCH_NAME ": %s failed: %s (%s)\n", what, perl_status_str(status), perl_last_error());
    exit(1);
}
#define BENCH_TRY(what, call)                          \
    do {                                               \
        int rc_ = (call);                              \
        if (rc_ != LIBPERL_OK) bench_die((what), rc_); \
    } while (0)

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU seconds of the whole process (all threads): with wall time, how busy the cores were. */
static inline double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Busy CPU seconds of the whole machine (all processes), from /proc/stat. */
static inline double machine_busy_s(void) {
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long v[8] = {0};
    if (!f) return 0.0;
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6], &v[7]);
    fclose(f);
    if (n != 8) return 0.0;
    /* user nice system idle iowait irq softirq steal: all but idle and iowait */
    return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / 100.0; /* USER_HZ */
}

static inline double loadavg1(void) {
    FILE *f = fopen("/proc/loadavg", "r");
    double l = -1.0;
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = -1.0;
        fclose(f);
    }
    return l;
}

static inline double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0; /* Linux: kilobytes */
}

/* Current (not peak) resident set, from /proc/self/statm. */
static inline double current_rss_mb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages_total = 0, pages_resident = 0;
    if (!f) return -1.0;
    if (fscanf(f, "%ld %ld", &pages_total, &pages_resident) != 2) pages_resident = -1;
    fclose(f);
    return pages_resident < 0 ? -1.0 : (double)pages_resident * 4096.0 / (1024.0 * 1024.0);
}

static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v[n] (v is left as it was). */
static inline double median(const double *v, int n) {
    double *c = malloc((size_t)n * sizeof *c);
    if (!c) return -1.0;
    memcpy(c, v, (size_t)n * sizeof *c);
    qsort(c, (size_t)n, sizeof *c, cmp_double);
    double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
    free(c);
    return m;
}

#endif /* LIBPERL_BENCH_UTIL_H */
