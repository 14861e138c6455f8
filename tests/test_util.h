/*
 * Small helpers shared by the unit tests: where the shared data lives,
 * scratch directories, whole-file reads and writes.  Header-only, and
 * usable under plain -std=c11 (no feature-test macros needed).
 */
#ifndef LIBPERL_TEST_UTIL_H
#define LIBPERL_TEST_UTIL_H

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* The shared data directory (models, data sets): $PERL_SHARED_DIR, else "../shared". */
static inline const char *test_shared_dir(void)
{
    const char *d = getenv("PERL_SHARED_DIR");
    return (d != NULL && d[0] != '\0') ? d : "../shared";
}

/* buf = dir + "/" + name; returns buf. */
static inline char *test_path(char *buf, size_t n, const char *dir, const char *name)
{
    snprintf(buf, n, "%s/%s", dir, name);
    return buf;
}

/* buf = shared dir + "/" + rel (e.g. "models/stories260K.bin"); returns buf. */
static inline char *test_shared_path(char *buf, size_t n, const char *rel)
{
    return test_path(buf, n, test_shared_dir(), rel);
}

static inline int test_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Creates a fresh private directory under $TMPDIR (or /tmp) into buf. 0 on success. */
/* The directory of the committed PyTorch fixtures into buf:
 * $LIBPERL_FIXTURE_DIR, else the first of tests/fixtures and ../tests/fixtures
 * (run from the repository root or from a build directory) that holds
 * `probe`, a file the calling suite needs.  Returns buf, or NULL when no
 * candidate holds it (the caller aborts with its own message). */
static inline const char *test_fixture_dir(char *buf, size_t n, const char *probe)
{
    static const char *const candidates[] = {"tests/fixtures", "../tests/fixtures"};
    const char *env = getenv("LIBPERL_FIXTURE_DIR");
    if (env != NULL && env[0] != '\0') {
        snprintf(buf, n, "%s", env);
        return buf;
    }
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        char path[1100];
        snprintf(path, sizeof path, "%s/%s", candidates[i], probe);
        if (test_file_exists(path)) {
            snprintf(buf, n, "%s", candidates[i]);
            return buf;
        }
    }
    return NULL;
}

static inline int test_make_temp_dir(char *buf, size_t n)
{
    static unsigned counter;
    const char *base = getenv("TMPDIR");
    if (base == NULL || base[0] == '\0') base = "/tmp";
    for (int attempt = 0; attempt < 1000; attempt++) {
        unsigned long salt = (unsigned long)time(NULL) ^ ((unsigned long)clock() << 8) ^
                             ((unsigned long)attempt * 2654435761ul);
        snprintf(buf, n, "%s/libperl-test-%ld-%u-%lx", base, (long)getpid(), counter++, salt);
        if (mkdir(buf, 0700) == 0) return 0;
        if (errno != EEXIST) return -1;
    }
    return -1;
}

/* rm -rf path (does not follow symbolic links).  0 on success. */
static inline int test_remove_tree(const char *path)
{
    if (unlink(path) == 0) return 0;
    if (errno == ENOENT) return 0;
    DIR *d = opendir(path);
    if (d == NULL) return -1;
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        char *child = malloc(len);
        if (child == NULL) {
            rc = -1;
            break;
        }
        snprintf(child, len, "%s/%s", path, e->d_name);
        chmod(child, 0700); /* in case a test removed permissions */
        if (test_remove_tree(child) != 0) rc = -1;
        free(child);
    }
    closedir(d);
    if (rmdir(path) != 0) rc = -1;
    return rc;
}

/* Writes len bytes to path (truncating).  0 on success. */
static inline int test_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL) return -1;
    size_t w = len ? fwrite(data, 1, len, f) : 0;
    int rc = fclose(f);
    return (w == len && rc == 0) ? 0 : -1;
}

/* Reads a whole file into a malloc'd buffer (NUL-terminated); NULL on failure. */
static inline void *test_read_file(const char *path, size_t *out_len)
{
    if (out_len) *out_len = 0;
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap + 1);
    while (buf != NULL) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (len < cap) break;
        char *nb = realloc(buf, cap * 2 + 1);
        if (nb == NULL) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    int err = ferror(f);
    fclose(f);
    if (buf == NULL || err) {
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    if (out_len) *out_len = len;
    return buf;
}

/* Number of directory entries (excluding . and ..), or -1. */
static inline int test_count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) n++;
    closedir(d);
    return n;
}

#endif /* LIBPERL_TEST_UTIL_H */
