/* Random numbers.  Initialisation and dropout use a counter-based generator
 * (a hash of seed, stream, index) so values never depend on thread count or
 * on the order in which they are drawn; sampling uses a small sequential one. */
#include "internal.h"

#include <math.h>

uint64_t perl_hash64(uint64_t x) { /* splitmix64 finaliser */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t counter_bits(uint64_t seed, uint64_t stream, uint64_t index) {
    return perl_hash64(perl_hash64(seed ^ perl_hash64(stream)) + index);
}

float perl_rand_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    return (float)(counter_bits(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}

float perl_rand_normal(uint64_t seed, uint64_t stream, uint64_t index) {
    /* Box-Muller on two independent uniforms; u1 in (0, 1]. */
    uint64_t bits = counter_bits(seed, stream, index);
    double u1 = ((double)(bits >> 40) + 1.0) / 16777216.0;
    double u2 = (double)(perl_hash64(bits) >> 40) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void perl_rng_seed(perl_rng *rng, uint64_t seed) { rng->state = perl_hash64(seed); }

uint64_t perl_rng_next(perl_rng *rng) {
    rng->state += 0x9e3779b97f4a7c15ull;
    uint64_t z = rng->state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float perl_rng_uniform(perl_rng *rng) {
    return (float)(perl_rng_next(rng) >> 40) * (1.0f / 16777216.0f);
}
