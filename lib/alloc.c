/* The one home of allocation: 64-byte aligned so SIMD loads and BLAS panels
 * never straddle cache lines.  A host allocator can be routed through here. */
#include "internal.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Allocations still allowed before the simulated out-of-memory fault (tests
 * only, perl_mem_set_alloc_fault); -1: no fault.  Atomic because worker
 * threads allocate their scratch. */
static atomic_llong alloc_fault_budget = -1;

void perl_mem_set_alloc_fault(long long after_allocs) {
    atomic_store(&alloc_fault_budget, after_allocs < 0 ? -1 : after_allocs);
}

/* Takes one allocation from the fault budget; 1 when it is spent. */
static int alloc_fault_hit(void) {
    long long budget = atomic_load_explicit(&alloc_fault_budget, memory_order_relaxed);
    while (budget >= 0) {
        if (budget == 0) return 1;
        if (atomic_compare_exchange_weak(&alloc_fault_budget, &budget, budget - 1)) return 0;
    }
    return 0;
}

void *perl_mem_alloc(size_t size) {
    if (alloc_fault_hit()) return NULL;
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
