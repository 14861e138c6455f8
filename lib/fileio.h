/*
 * File access for the loaders and savers: read-only mappings of whole files,
 * small whole-file reads, atomic replacement (temp file + fsync + rename +
 * directory fsync) and mkdir -p.  Every failure is reported through perl_fail
 * with the path and strerror text.
 */
#ifndef LIBPERL_FILEIO_H
#define LIBPERL_FILEIO_H

#include "internal.h"

/* A read-only mapping of a whole file.  An empty file has addr == NULL. */
typedef struct file_map {
    void *addr;
    size_t size;
} file_map;

/* Maps `path` read-only.  Directories and other non-regular files fail with
 * LIBPERL_ERR_IO. */
int file_map_open(file_map *out, const char *path);
/* Unmaps (accepts a zeroed map). */
void file_map_close(file_map *map);

/* Reads a whole regular file into a NUL-terminated perl_mem_alloc buffer.
 * Files larger than max_size fail with LIBPERL_ERR_FORMAT. */
int file_read_all(const char *path, size_t max_size, char **out, size_t *out_len);

/* 1 if `path` is a directory, 0 if it exists and is not, LIBPERL_ERR_IO if
 * it cannot be examined (missing, permission). */
int file_is_dir(const char *path);
/* 1 if `path` exists (any type), 0 otherwise. */
int file_exists(const char *path);

/* Creates `path` and its missing parents (mode 0777 & ~umask). */
int file_mkdir_p(const char *path);

/* Joins dir and name with one '/' into a perl_mem_alloc string (NULL on OOM). */
char *file_join(const char *dir, const char *name);

/*
 * Atomic replacement of `path`: bytes go to "<path>.tmp.<pid>.<n>" in the
 * same directory; commit fsyncs it, renames it over `path` and fsyncs the
 * directory.  Any failure removes the temp file and leaves `path` untouched.
 * Writes are buffered; after a failed write the handle only accepts abort.
 */
typedef struct atomic_file {
    int fd;
    int failed;
    char *path;
    char *tmp_path;
    unsigned char *buf;
    size_t buf_len;
} atomic_file;

int atomic_file_open(atomic_file *f, const char *path);
int atomic_file_write(atomic_file *f, const void *data, size_t len);
/* Commits (or, when a write failed, aborts and returns that failure). */
int atomic_file_commit(atomic_file *f);
/* Discards the temp file; safe after commit or on a zeroed handle. */
void atomic_file_abort(atomic_file *f);

/* One-shot atomic write of a buffer. */
int file_write_atomic(const char *path, const void *data, size_t len);

/* Test hook simulating a full disk: after `after_bytes` more bytes have been
 * written through atomic_file_write (all files together), every write fails
 * with ENOSPC.  A negative value disables the fault.  Not thread-safe. */
void fileio_set_write_fault(int64_t after_bytes);

#endif /* LIBPERL_FILEIO_H */
