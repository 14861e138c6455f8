/*
 * Helpers shared by the libFuzzer targets in tests/fuzz/ (one target per
 * .c file; this header is not a target).  Targets are built by `make fuzz`
 * with clang -fsanitize=fuzzer,address,undefined against the library's
 * objects, so they may call lib/ internals.
 *
 * Every target runs from the repository root (make does this); fixtures are
 * found under $LIBPERL_FIXTURES, default "tests/fixtures".  Scratch files go
 * into one private directory under /dev/shm (or $TMPDIR, or /tmp), removed
 * at exit.
 *
 * Seeds: with LIBPERL_FUZZ_WRITE_SEEDS=<dir> set, a target's
 * LLVMFuzzerInitialize writes its generated seeds into <dir> (`make
 * fuzz-seeds` regenerates tests/fuzz/corpus/<target>/ this way).
 */
#ifndef LIBPERL_FUZZ_COMMON_H
#define LIBPERL_FUZZ_COMMON_H

#define _GNU_SOURCE 1 /* mkdtemp, nftw */

#include <errno.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "libperl/libperl.h"
#include "internal.h"
#include "model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Setup failures are bugs of the harness, not findings: say so and stop. */
#define FUZZ_REQUIRE(cond, ...)                                                     \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "fuzz harness setup failed: " __VA_ARGS__);             \
            fprintf(stderr, " (%s)\n", perl_last_error());                          \
            exit(2);                                                                \
        }                                                                           \
    } while (0)

static char fuzz_scratch[512];

static int fuzz_remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void fuzz_remove_scratch(void)
{
    if (fuzz_scratch[0] != '\0') nftw(fuzz_scratch, fuzz_remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* The private scratch directory (created on first use). */
static inline const char *fuzz_scratch_dir(void)
{
    if (fuzz_scratch[0] != '\0') return fuzz_scratch;
    struct stat st;
    const char *base = getenv("TMPDIR");
    if (stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0)
        base = "/dev/shm"; /* tmpfs: a write per input costs no disk I/O */
    if (base == NULL || base[0] == '\0') base = "/tmp";
    snprintf(fuzz_scratch, sizeof fuzz_scratch, "%s/libperl-fuzz-XXXXXX", base);
    FUZZ_REQUIRE(mkdtemp(fuzz_scratch) != NULL, "mkdtemp %s: %s", fuzz_scratch, strerror(errno));
    atexit(fuzz_remove_scratch);
    return fuzz_scratch;
}

/* buf = scratch dir + "/" + name */
static inline char *fuzz_scratch_path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", fuzz_scratch_dir(), name);
    return buf;
}

/* buf = fixtures dir + "/" + rel, as an absolute path (for symlinks). */
static inline char *fuzz_fixture_path(char *buf, size_t n, const char *rel)
{
    const char *dir = getenv("LIBPERL_FIXTURES");
    if (dir == NULL || dir[0] == '\0') dir = "tests/fixtures";
    char joined[1024];
    snprintf(joined, sizeof joined, "%s/%s", dir, rel);
    char *abs = realpath(joined, NULL);
    FUZZ_REQUIRE(abs != NULL, "fixture %s not found (run from the repository root or set "
                              "LIBPERL_FIXTURES)", joined);
    snprintf(buf, n, "%s", abs);
    free(abs);
    return buf;
}

static inline int fuzz_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL) return -1;
    size_t w = len ? fwrite(data, 1, len, f) : 0;
    int rc = fclose(f);
    return (w == len && rc == 0) ? 0 : -1;
}

static inline void *fuzz_read_file(const char *path, size_t *out_len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf != NULL) *out_len = (size_t)n;
    return buf;
}

/* Symlink `target` as scratch/name (replacing what is there). */
static inline void fuzz_link(const char *target, const char *name)
{
    char path[1024];
    fuzz_scratch_path(path, sizeof path, name);
    unlink(path);
    FUZZ_REQUIRE(symlink(target, path) == 0, "symlink %s: %s", path, strerror(errno));
}

/* The seed directory requested by `make fuzz-seeds`, or NULL. */
static inline const char *fuzz_seed_dir(void)
{
    const char *d = getenv("LIBPERL_FUZZ_WRITE_SEEDS");
    return (d != NULL && d[0] != '\0') ? d : NULL;
}

static inline void fuzz_write_seed(const char *name, const void *data, size_t len)
{
    const char *dir = fuzz_seed_dir();
    if (dir == NULL) return;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FUZZ_REQUIRE(fuzz_write_file(path, data, len) == 0, "cannot write seed %s", path);
}

static inline void fuzz_write_seed_str(const char *name, const char *text)
{
    fuzz_write_seed(name, text, strlen(text));
}

/* Copies a fixture file into the seed directory. */
static inline void fuzz_seed_from_fixture(const char *name, const char *rel)
{
    if (fuzz_seed_dir() == NULL) return;
    char path[1024];
    size_t len = 0;
    void *data = fuzz_read_file(fuzz_fixture_path(path, sizeof path, rel), &len);
    FUZZ_REQUIRE(data != NULL, "cannot read %s", path);
    fuzz_write_seed(name, data, len);
    free(data);
}

/* 1 if every base weight is finite and |w| <= 1000.  The loaders accept any
 * float, and activations that overflow to Inf turn whole logit rows into
 * NaN, where lib/lm_head.c's argmax scan reads past the row (finding F2 in
 * docs/hardening.md).  Until that is fixed the forward pass is exercised
 * only on models whose activations stay finite. */
static inline int fuzz_model_is_tame(const perl_model *model)
{
    tensor_slot *slots = NULL;
    int n = 0, ok = 1;
    perl_model_config cfg = model->cfg;
    model_weights w = model->w;
    if (model_tensor_slots(&cfg, &w, &slots, &n) != LIBPERL_OK) return 0;
    for (int i = 0; i < n && ok; i++) {
        size_t numel = (size_t)slots[i].shape[0] * (size_t)(slots[i].ndim == 2 ? slots[i].shape[1] : 1);
        const float *x = *slots[i].ptr;
        for (size_t k = 0; k < numel && ok; k++) ok = x[k] >= -1000.0f && x[k] <= 1000.0f;
    }
    perl_mem_free(slots);
    return ok;
}

/* Runs a short forward pass over a successfully loaded model (and adapter):
 * a loader that accepts a file must hand out a model that works.  Errors
 * are allowed (e.g. a NaN weight); crashes and sanitizer reports are not. */
static inline void fuzz_exercise_model(const perl_model *model, const perl_lora *adapter)
{
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    if (perl_model_get_config(model, &cfg) != LIBPERL_OK) abort();
    /* Keep each input cheap: skip models the fuzzer made large. */
    if (perl_model_num_params(model) > ((size_t)1 << 22)) return;
    if (!fuzz_model_is_tame(model)) return;
    int32_t seq = cfg.max_seq_len < 3 ? cfg.max_seq_len : 3;
    int32_t tokens[3], lengths[1] = {seq};
    for (int i = 0; i < seq; i++) tokens[i] = (int32_t)((i * 7 + 1) % cfg.vocab_size);
    perl_batch batch;
    perl_batch_init(&batch);
    batch.batch_size = 1;
    batch.seq_len = seq;
    batch.tokens = tokens;
    batch.lengths = lengths;
    float *logits = malloc((size_t)seq * (size_t)cfg.vocab_size * sizeof(float));
    float logprobs[3];
    if (logits == NULL) return;
    (void)perl_model_forward(model, adapter, &batch, logits, NULL);
    (void)perl_model_token_logprobs(model, adapter, &batch, logprobs);
    free(logits);
}

#endif /* LIBPERL_FUZZ_COMMON_H */
