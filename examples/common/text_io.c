/* Buffers, file reads, hashing for the examples (see text_io.h). */
#define _POSIX_C_SOURCE 200809L /* popen, pclose, fileno, mkdir */

#include "text_io.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>

int ex_buf_append(ex_buf *b, const void *data, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p) return -1;
        b->data = p;
        b->cap = cap;
    }
    if (n) memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int ex_buf_puts(ex_buf *b, const char *s) { return ex_buf_append(b, s, strlen(s)); }

void ex_buf_free(ex_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Reads a stream to its end into *out. */
static int read_stream(FILE *f, const char *path, char **out, size_t *out_len, char *err, size_t err_size) {
    ex_buf b = {NULL, 0, 0};
    char chunk[1 << 16];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (ex_buf_append(&b, chunk, got) != 0) {
            ex_buf_free(&b);
            snprintf(err, err_size, "%s: out of memory", path);
            return -1;
        }
    }
    if (ferror(f)) {
        ex_buf_free(&b);
        snprintf(err, err_size, "%s: read error: %s", path, strerror(errno));
        return -1;
    }
    if (ex_buf_append(&b, "", 0) != 0) { /* an empty file still gets a buffer */
        snprintf(err, err_size, "%s: out of memory", path);
        return -1;
    }
    *out = b.data;
    *out_len = b.len;
    return 0;
}

int ex_read_file(const char *path, char **out, size_t *out_len, char *err, size_t err_size) {
    *out = NULL;
    *out_len = 0;
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, err_size, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, err_size, "%s: not a regular file", path);
        return -1;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_size, "%s: %s", path, strerror(errno));
        return -1;
    }
    int rc = read_stream(f, path, out, out_len, err, err_size);
    fclose(f);
    return rc;
}

int ex_read_gzip(const char *path, char **out, size_t *out_len, char *err, size_t err_size) {
    *out = NULL;
    *out_len = 0;
    if (!ex_path_exists(path)) {
        snprintf(err, err_size, "%s: %s", path, strerror(ENOENT));
        return -1;
    }
    /* the path goes to the shell inside single quotes; a quote in it is written '\'' */
    ex_buf cmd = {NULL, 0, 0};
    int ok = ex_buf_puts(&cmd, "gzip -dc -- '") == 0;
    for (const char *p = path; ok && *p; p++)
        ok = (*p == '\'' ? ex_buf_puts(&cmd, "'\\''") : ex_buf_append(&cmd, p, 1)) == 0;
    ok = ok && ex_buf_puts(&cmd, "'") == 0;
    if (!ok) {
        ex_buf_free(&cmd);
        snprintf(err, err_size, "%s: out of memory", path);
        return -1;
    }
    FILE *f = popen(cmd.data, "r");
    ex_buf_free(&cmd);
    if (!f) {
        snprintf(err, err_size, "%s: cannot run gzip: %s", path, strerror(errno));
        return -1;
    }
    int rc = read_stream(f, path, out, out_len, err, err_size);
    int status = pclose(f);
    if (rc == 0 && (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
        snprintf(err, err_size, "%s: gzip -dc failed (exit status %d): corrupt or truncated file?", path,
                 status == -1        ? -1
                 : WIFEXITED(status) ? WEXITSTATUS(status)
                                     : 128);
        free(*out);
        *out = NULL;
        *out_len = 0;
        return -1;
    }
    return rc;
}

uint64_t ex_hash64(const void *data, size_t n, uint64_t seed) {
    const unsigned char *p = data;
    uint64_t h = 1469598103934665603ull ^ seed;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    /* splitmix64 finaliser: FNV's low bits are weak for modulo splits */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

int ex_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int ex_mkdir_p(const char *path, char *err, size_t err_size) {
    size_t n = strlen(path);
    char *tmp = malloc(n + 1);
    if (!tmp) {
        snprintf(err, err_size, "%s: out of memory", path);
        return -1;
    }
    memcpy(tmp, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (tmp[i] != '/' && tmp[i] != '\0') continue;
        char saved = tmp[i];
        tmp[i] = '\0';
        if (mkdir(tmp, 0777) != 0 && errno != EEXIST) {
            snprintf(err, err_size, "mkdir %s: %s", tmp, strerror(errno));
            free(tmp);
            return -1;
        }
        tmp[i] = saved;
    }
    free(tmp);
    return 0;
}
