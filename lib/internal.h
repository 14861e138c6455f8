/*
 * Private basics shared by every module: errors, allocation, threads,
 * random numbers, bf16/f16 conversion.  Never installed.
 */
#ifndef LIBPERL_INTERNAL_H
#define LIBPERL_INTERNAL_H

#include "libperl/libperl.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#  define PERL_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#  define PERL_PRINTF(fmt, args)
#endif

/* ---- errors (error.c) ----------------------------------------------------
 * perl_fail records a message for the calling thread and returns `status`,
 * so failure paths read:  return perl_fail(LIBPERL_ERR_RANGE, "token %d ...", t);
 */
int perl_fail(int status, const char *fmt, ...) PERL_PRINTF(2, 3);

/* Argument checks that return from the calling function. */
#define PERL_CHECK_ARG(cond, ...)                                                  \
    do {                                                                           \
        if (!(cond)) return perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, __VA_ARGS__);  \
    } while (0)
#define PERL_TRY(expr)                   \
    do {                                 \
        int perl_try_rc_ = (expr);       \
        if (perl_try_rc_ < 0) return perl_try_rc_; \
    } while (0)

/* ---- allocation (alloc.c): every library allocation goes through here so a
 * host allocator can be plugged in later.  perl_alloc_* never fail silently:
 * callers check for NULL and return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY...). */
void *perl_mem_alloc(size_t size);            /* 64-byte aligned */
void *perl_mem_calloc(size_t count, size_t size); /* 64-byte aligned, zeroed; overflow-checked */
void perl_mem_free(void *p);
char *perl_mem_strdup(const char *s);
/* Tests: every allocation after the next `after_allocs` fails (-1 disarms). */
void perl_mem_set_alloc_fault(long long after_allocs);

/* ---- threads (threads.c) -------------------------------------------------
 * One process-wide pool of blocking (never spinning) workers.  parallel_for
 * splits [0, n) into at most num_threads contiguous chunks of at least
 * `grain` items, statically, so results never depend on scheduling.  When the
 * pool is busy (another host thread is using it) the loop runs inline. */
typedef void (*perl_range_fn)(void *ctx, int64_t begin, int64_t end);
void perl_parallel_for(int64_t n, int64_t grain, perl_range_fn fn, void *ctx);

/* ---- random numbers (rng.c): counter-based so that a draw depends only on
 * (seed, stream, index), never on thread count or call order. */
uint64_t perl_hash64(uint64_t x);
float perl_rand_uniform(uint64_t seed, uint64_t stream, uint64_t index); /* [0, 1) */
float perl_rand_normal(uint64_t seed, uint64_t stream, uint64_t index);  /* N(0, 1) */

/* Sequential generator for sampling. */
typedef struct perl_rng {
    uint64_t state;
} perl_rng;
void perl_rng_seed(perl_rng *rng, uint64_t seed);
uint64_t perl_rng_next(perl_rng *rng);
float perl_rng_uniform(perl_rng *rng); /* [0, 1) */

/* ---- half precision (convert.c) ---- */
float perl_bf16_to_f32(uint16_t h);
uint16_t perl_f32_to_bf16(float f); /* round to nearest even */
float perl_f16_to_f32(uint16_t h);

/* ---- fast math ----
 * exp(x) to within 2 ulp for x in [-87, 88] (0 below), branch-free so loops
 * that call it vectorise: exp(x) = 2^n * e^r, |r| <= ln2 / 2, with a degree-6
 * polynomial for e^r.  Used in softmax, where expf from libm would be a
 * scalar call per element. */
static inline float perl_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* NaN passes the clamp: take the exponent from 0 (an int conversion of NaN
     * is undefined) and let r carry the NaN into the result */
    float finite = x == x ? x : 0.0f;
    /* n = round(x / ln2) by the 1.5 * 2^23 trick: floorf is a libm call
     * without -ffast-math, which would keep the loops that call this scalar */
    float n = (finite * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667163372040f + r * (0.041666645556688309f +
                  r * (0.0083333477377891541f + r * 0.0013887970801442862f)))));
    union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* ---- misc ---- */
#define PERL_MIN(a, b) ((a) < (b) ? (a) : (b))
#define PERL_MAX(a, b) ((a) > (b) ? (a) : (b))
int perl_isfinite_array(const float *x, size_t n); /* 1 if every element is finite */

#endif /* LIBPERL_INTERNAL_H */
