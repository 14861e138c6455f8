/*
 * For benchmark programs that call a BLAS (or oneDNN) directly rather than
 * through libperl: the CBLAS ABI constants and function types, and dlsym into
 * a function pointer.  The Makefile links bench programs to libperl only, so
 * these libraries are opened with dlopen.
 */
#ifndef LIBPERL_BENCH_DL_BLAS_H
#define LIBPERL_BENCH_DL_BLAS_H

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { CblasRowMajor = 101 };
enum { CblasNoTrans = 111, CblasTrans = 112 };
typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                         int lda, const float *B, int ldb, float beta, float *C, int ldc);
typedef void (*set_threads_fn)(int n);

/* *fn_ptr = dlsym(lib, name) without a pedantic object-to-function cast;
 * exits with a message naming `program` when the symbol is missing. */
static inline void load_symbol(const char *program, void *lib, const char *name, void *fn_ptr, size_t size) {
    void *sym = dlsym(lib, name);
    if (!sym) {
        fprintf(stderr, "%s: %s not found: %s\n", program, name, dlerror());
        exit(1);
    }
    memcpy(fn_ptr, &sym, size);
}

#endif /* LIBPERL_BENCH_DL_BLAS_H */
