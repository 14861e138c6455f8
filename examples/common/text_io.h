/*
 * Host-side helpers for the examples: a growable byte buffer, whole-file and
 * gzip reads, and a stable 64-bit hash (for train / held-out splits).
 * Functions return 0 on success and -1 on failure with a message in err.
 */
#ifndef EXAMPLES_TEXT_IO_H
#define EXAMPLES_TEXT_IO_H

#include <stddef.h>
#include <stdint.h>

typedef struct ex_buf {
    char *data; /* NUL-terminated when len > 0 or after any append */
    size_t len, cap;
} ex_buf;

int ex_buf_append(ex_buf *b, const void *data, size_t n);
int ex_buf_puts(ex_buf *b, const char *s);
void ex_buf_free(ex_buf *b);

/* Reads a whole regular file into a malloc'd NUL-terminated buffer. */
int ex_read_file(const char *path, char **out, size_t *out_len, char *err, size_t err_size);

/* Reads a gzip file through `gzip -dc` (no zlib build dependency); a corrupt
 * or truncated file fails with gzip's exit status in the message. */
int ex_read_gzip(const char *path, char **out, size_t *out_len, char *err, size_t err_size);

/* FNV-1a 64 over bytes, then a final mix: stable across platforms and runs. */
uint64_t ex_hash64(const void *data, size_t n, uint64_t seed);

/* 1 if path exists (any type). */
int ex_path_exists(const char *path);

/* mkdir -p (mode 0777 & ~umask). */
int ex_mkdir_p(const char *path, char *err, size_t err_size);

#endif /* EXAMPLES_TEXT_IO_H */
