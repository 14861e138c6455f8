/* The one home of allocation: 64-byte aligned so SIMD loads and BLAS panels
 * never straddle cache lines.  A host allocator can be routed through here. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void *perl_mem_alloc(size_t size) {
    if (size == 0) size = 1;
    size_t rounded = (size + 63) & ~(size_t)63;
    if (rounded < size) return NULL;
    return aligned_alloc(64, rounded);
}

void *perl_mem_calloc(size_t count, size_t size) {
    if (size != 0 && count > SIZE_MAX / size) return NULL;
    void *p = perl_mem_alloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

void perl_mem_free(void *p) { free(p); }

char *perl_mem_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = perl_mem_alloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

int perl_isfinite_array(const float *x, size_t n) {
    /* Summing x*0 turns any NaN/Inf into NaN; one branch at the end. */
    float acc = 0.0f;
    for (size_t i = 0; i < n; i++) acc += x[i] * 0.0f;
    return acc == 0.0f;
}
