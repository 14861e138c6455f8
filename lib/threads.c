/*
 * One process-wide pool of worker threads that block on a condition variable
 * while idle.  They never spin, so they cannot steal cycles from the BLAS's
 * threads (the failure PyTorch shows here with OpenMP's default wait policy),
 * and library loops and BLAS calls never run at the same time.
 */
#include "internal.h"
#include "blas.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 256

typedef struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work_ready;
    pthread_cond_t work_done;
    pthread_t workers[MAX_THREADS];
    int n_workers;       /* threads besides the caller */
    uint64_t generation; /* bumped for each job */
    int pending;         /* workers still busy with the current job */
    int shutdown;
    /* the current job */
    perl_range_fn fn;
    void *ctx;
    int64_t n;
    int n_chunks;
} pool;

static pool g_pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .work_ready = PTHREAD_COND_INITIALIZER,
    .work_done = PTHREAD_COND_INITIALIZER,
};
/* Held by whichever host thread is using the pool; others run inline. */
static pthread_mutex_t g_busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_num_threads = 1;

static void run_chunk(perl_range_fn fn, void *ctx, int64_t n, int n_chunks, int k) {
    int64_t begin = n * k / n_chunks, end = n * (k + 1) / n_chunks;
    if (begin < end) fn(ctx, begin, end);
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg; /* this worker runs chunk index + 1 */
    uint64_t seen = 0;
    pthread_mutex_lock(&g_pool.lock);
    for (;;) {
        while (g_pool.generation == seen && !g_pool.shutdown)
            pthread_cond_wait(&g_pool.work_ready, &g_pool.lock);
        if (g_pool.shutdown) break;
        seen = g_pool.generation;
        perl_range_fn fn = g_pool.fn;
        void *ctx = g_pool.ctx;
        int64_t n = g_pool.n;
        int n_chunks = g_pool.n_chunks;
        pthread_mutex_unlock(&g_pool.lock);
        if (index + 1 < n_chunks) run_chunk(fn, ctx, n, n_chunks, index + 1);
        pthread_mutex_lock(&g_pool.lock);
        if (--g_pool.pending == 0) pthread_cond_signal(&g_pool.work_done);
    }
    pthread_mutex_unlock(&g_pool.lock);
    return NULL;
}

static void pool_stop(void) {
    pthread_mutex_lock(&g_pool.lock);
    g_pool.shutdown = 1;
    pthread_cond_broadcast(&g_pool.work_ready);
    pthread_mutex_unlock(&g_pool.lock);
    for (int i = 0; i < g_pool.n_workers; i++) pthread_join(g_pool.workers[i], NULL);
    g_pool.n_workers = 0;
    g_pool.shutdown = 0;
}

/* Starts n - 1 workers; on failure keeps however many started. */
static void pool_start(int n) {
    g_pool.generation = 0;
    for (int i = 0; i < n - 1 && i < MAX_THREADS; i++) {
        if (pthread_create(&g_pool.workers[i], NULL, worker_main, (void *)(intptr_t)i) != 0) break;
        g_pool.n_workers = i + 1;
    }
    g_num_threads = g_pool.n_workers + 1;
}

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : (int)n);
}

/* A forked child has only the forking thread: forget the parent's workers
 * (their locks may be held by threads that no longer exist) and run loops
 * inline until perl_set_num_threads starts new ones. */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&g_pool.lock, NULL);
    pthread_cond_init(&g_pool.work_ready, NULL);
    pthread_cond_init(&g_pool.work_done, NULL);
    pthread_mutex_init(&g_busy, NULL);
    g_pool.n_workers = 0;
    g_pool.pending = 0;
    g_pool.shutdown = 0;
    g_num_threads = 1;
}

static void pool_default_init(void) {
    pthread_atfork(NULL, NULL, pool_after_fork_child);
    int n = online_cpus();
    const char *env = getenv("LIBPERL_NUM_THREADS");
    if (env && atoi(env) > 0) n = PERL_MIN(atoi(env), MAX_THREADS);
    pool_start(n);
    blas_set_num_threads(g_num_threads);
}

int perl_set_num_threads(int n) {
    pthread_once(&g_once, pool_default_init);
    if (n <= 0) n = online_cpus();
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&g_busy);
    if (n != g_num_threads) {
        pool_stop();
        pool_start(n);
    }
    blas_set_num_threads(g_num_threads);
    pthread_mutex_unlock(&g_busy);
    return g_num_threads == n ? LIBPERL_OK
                              : perl_fail(LIBPERL_ERR_OUT_OF_MEMORY,
                                          "could only start %d of %d threads", g_num_threads, n);
}

int perl_get_num_threads(void) {
    pthread_once(&g_once, pool_default_init);
    return g_num_threads;
}

void perl_parallel_for(int64_t n, int64_t grain, perl_range_fn fn, void *ctx) {
    if (n <= 0) return;
    pthread_once(&g_once, pool_default_init);
    if (grain < 1) grain = 1;
    int64_t max_chunks = (n + grain - 1) / grain;
    int n_chunks = (int)PERL_MIN((int64_t)g_num_threads, max_chunks);
    if (n_chunks <= 1 || pthread_mutex_trylock(&g_busy) != 0) {
        fn(ctx, 0, n);
        return;
    }
    n_chunks = (int)PERL_MIN((int64_t)g_pool.n_workers + 1, (int64_t)n_chunks);
    pthread_mutex_lock(&g_pool.lock);
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.n = n;
    g_pool.n_chunks = n_chunks;
    g_pool.pending = g_pool.n_workers;
    g_pool.generation++;
    pthread_cond_broadcast(&g_pool.work_ready);
    pthread_mutex_unlock(&g_pool.lock);

    run_chunk(fn, ctx, n, n_chunks, 0);

    pthread_mutex_lock(&g_pool.lock);
    while (g_pool.pending > 0) pthread_cond_wait(&g_pool.work_done, &g_pool.lock);
    pthread_mutex_unlock(&g_pool.lock);
    pthread_mutex_unlock(&g_busy);
}
