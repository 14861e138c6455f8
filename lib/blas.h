/* The CBLAS in use (OpenBLAS by default, BLIS with make BLAS=blis) and how to
 * set its thread count. */
#ifndef LIBPERL_BLAS_H
#define LIBPERL_BLAS_H

#if defined(LIBPERL_BLAS_BLIS)
#  include <blis/cblas.h>
#  include <blis/blis.h>
#else
#  include <cblas.h>
#endif

static inline void blas_set_num_threads(int n) {
#if defined(LIBPERL_BLAS_BLIS)
    bli_thread_set_num_threads(n);
#elif defined(LIBPERL_BLAS_OPENBLAS) || defined(OPENBLAS_VERSION)
    openblas_set_num_threads(n);
#else
    (void)n;
#endif
}

#endif /* LIBPERL_BLAS_H */
