/*
 * File access: mmap of whole files, atomic replacement, mkdir -p.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define ATOMIC_BUF_SIZE ((size_t)1 << 20)

/* Bytes still allowed before the simulated disk-full fault; < 0: no fault. */
static int64_t write_fault_remaining = -1;
static atomic_uint temp_counter;

void fileio_set_write_fault(int64_t after_bytes)
{
    write_fault_remaining = after_bytes < 0 ? -1 : after_bytes;
}

/* ---- reading ------------------------------------------------------------- */

static int open_regular(const char *path, int *out_fd, size_t *out_size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return perl_fail(LIBPERL_ERR_IO, "cannot open '%s': %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return perl_fail(LIBPERL_ERR_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return perl_fail(LIBPERL_ERR_IO, "'%s' is a directory, expected a file", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return perl_fail(LIBPERL_ERR_IO, "'%s' is not a regular file", path);
    }
    if ((uintmax_t)st.st_size > (uintmax_t)SIZE_MAX) {
        close(fd);
        return perl_fail(LIBPERL_ERR_IO, "'%s' is too large to map", path);
    }
    *out_fd = fd;
    *out_size = (size_t)st.st_size;
    return LIBPERL_OK;
}

int file_map_open(file_map *out, const char *path)
{
    PERL_CHECK_ARG(out != NULL && path != NULL, "file_map_open: NULL argument");
    out->addr = NULL;
    out->size = 0;
    int fd;
    size_t size;
    PERL_TRY(open_regular(path, &fd, &size));
    if (size == 0) {
        close(fd);
        return LIBPERL_OK;
    }
    void *addr = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (addr == MAP_FAILED)
        return perl_fail(LIBPERL_ERR_IO, "cannot mmap '%s': %s", path, strerror(e));
    out->addr = addr;
    out->size = size;
    return LIBPERL_OK;
}

void file_map_close(file_map *map)
{
    if (map == NULL) return;
    if (map->addr != NULL) munmap(map->addr, map->size);
    map->addr = NULL;
    map->size = 0;
}

int file_read_all(const char *path, size_t max_size, char **out, size_t *out_len)
{
    PERL_CHECK_ARG(path != NULL && out != NULL, "file_read_all: NULL argument");
    *out = NULL;
    if (out_len) *out_len = 0;
    int fd;
    size_t size;
    PERL_TRY(open_regular(path, &fd, &size));
    if (size > max_size) {
        close(fd);
        return perl_fail(LIBPERL_ERR_FORMAT, "'%s' is %zu bytes, more than the %zu allowed",
                         path, size, max_size);
    }
    char *buf = perl_mem_alloc(size + 1);
    if (buf == NULL) {
        close(fd);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "reading '%s': out of memory", path);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            int e = n < 0 ? errno : 0;
            close(fd);
            perl_mem_free(buf);
            return perl_fail(LIBPERL_ERR_IO, "cannot read '%s': %s", path,
                             n < 0 ? strerror(e) : "file shrank while reading");
        }
        got += (size_t)n;
    }
    close(fd);
    buf[size] = '\0';
    *out = buf;
    if (out_len) *out_len = size;
    return LIBPERL_OK;
}

int file_is_dir(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        int e = errno;
        return perl_fail(LIBPERL_ERR_IO, "cannot access '%s': %s", path, strerror(e));
    }
    return S_ISDIR(st.st_mode) ? 1 : 0;
}

int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

char *file_join(const char *dir, const char *name)
{
    size_t dl = strlen(dir), nl = strlen(name);
    int slash = dl > 0 && dir[dl - 1] != '/';
    char *p = perl_mem_alloc(dl + (size_t)slash + nl + 1);
    if (p == NULL) return NULL;
    memcpy(p, dir, dl);
    if (slash) p[dl] = '/';
    memcpy(p + dl + (size_t)slash, name, nl + 1);
    return p;
}

int file_mkdir_p(const char *path)
{
    PERL_CHECK_ARG(path != NULL && path[0] != '\0', "mkdir: empty path");
    char *p = perl_mem_strdup(path);
    if (p == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "mkdir '%s': out of memory", path);
    size_t len = strlen(p);
    while (len > 1 && p[len - 1] == '/') p[--len] = '\0';
    /* Create each prefix ending before a '/', then the whole path. */
    for (size_t i = 1; i <= len; i++) {
        if (i < len && p[i] != '/') continue;
        char saved = p[i];
        p[i] = '\0';
        if (mkdir(p, 0777) != 0) {
            int e = errno;
            struct stat st;
            if (e != EEXIST || stat(p, &st) != 0 || !S_ISDIR(st.st_mode)) {
                int rc = e == EEXIST
                    ? perl_fail(LIBPERL_ERR_IO, "cannot create directory '%s': a file is in the way", p)
                    : perl_fail(LIBPERL_ERR_IO, "cannot create directory '%s': %s", p, strerror(e));
                perl_mem_free(p);
                return rc;
            }
        }
        p[i] = saved;
    }
    perl_mem_free(p);
    return LIBPERL_OK;
}

/* ---- atomic writes ------------------------------------------------------- */

/* write(2) until done; the test fault turns into ENOSPC after its budget. */
static int write_fd_all(int fd, const unsigned char *data, size_t len, int *out_errno)
{
    while (len > 0) {
        size_t chunk = len;
        if (write_fault_remaining >= 0) {
            if (write_fault_remaining == 0) {
                *out_errno = ENOSPC;
                return -1;
            }
            if ((uint64_t)chunk > (uint64_t)write_fault_remaining)
                chunk = (size_t)write_fault_remaining;
        }
        ssize_t n = write(fd, data, chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            *out_errno = errno;
            return -1;
        }
        if (n == 0) {
            *out_errno = ENOSPC;
            return -1;
        }
        if (write_fault_remaining >= 0) write_fault_remaining -= n;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

int atomic_file_open(atomic_file *f, const char *path)
{
    PERL_CHECK_ARG(f != NULL && path != NULL && path[0] != '\0', "atomic write: empty path");
    memset(f, 0, sizeof *f);
    f->fd = -1;
    size_t pl = strlen(path);
    f->path = perl_mem_strdup(path);
    f->tmp_path = perl_mem_alloc(pl + 64);
    f->buf = perl_mem_alloc(ATOMIC_BUF_SIZE);
    if (f->path == NULL || f->tmp_path == NULL || f->buf == NULL) {
        atomic_file_abort(f);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "writing '%s': out of memory", path);
    }
    /* A temp file left by a killed process may carry our name: a restarted
     * container job often has the same pid.  Such leftovers are never ours
     * to reuse, so skip to the next name. */
    int e = EEXIST;
    for (int attempt = 0; attempt < 1000 && e == EEXIST; attempt++) {
        memcpy(f->tmp_path, path, pl);
        snprintf(f->tmp_path + pl, 64, ".tmp.%ld.%u", (long)getpid(), atomic_fetch_add(&temp_counter, 1u));
        f->fd = open(f->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        e = f->fd < 0 ? errno : 0;
    }
    if (f->fd < 0) {
        int rc = perl_fail(LIBPERL_ERR_IO, "cannot create '%s': %s", f->tmp_path, strerror(e));
        perl_mem_free(f->tmp_path); /* nothing was created: do not unlink */
        f->tmp_path = NULL;
        atomic_file_abort(f);
        return rc;
    }
    return LIBPERL_OK;
}

static int atomic_flush(atomic_file *f)
{
    if (f->buf_len == 0) return LIBPERL_OK;
    int e = 0;
    if (write_fd_all(f->fd, f->buf, f->buf_len, &e) != 0) {
        f->failed = 1;
        return perl_fail(LIBPERL_ERR_IO, "cannot write '%s': %s", f->tmp_path, strerror(e));
    }
    f->buf_len = 0;
    return LIBPERL_OK;
}

int atomic_file_write(atomic_file *f, const void *data, size_t len)
{
    PERL_CHECK_ARG(f != NULL && f->fd >= 0, "atomic write: file is not open");
    if (f->failed) return perl_fail(LIBPERL_ERR_IO, "cannot write '%s': an earlier write failed",
                                    f->path);
    const unsigned char *p = data;
    if (f->buf_len + len <= ATOMIC_BUF_SIZE) {
        if (len) memcpy(f->buf + f->buf_len, p, len);
        f->buf_len += len;
        return LIBPERL_OK;
    }
    PERL_TRY(atomic_flush(f));
    if (len >= ATOMIC_BUF_SIZE) {
        int e = 0;
        if (write_fd_all(f->fd, p, len, &e) != 0) {
            f->failed = 1;
            return perl_fail(LIBPERL_ERR_IO, "cannot write '%s': %s", f->tmp_path, strerror(e));
        }
        return LIBPERL_OK;
    }
    memcpy(f->buf, p, len);
    f->buf_len = len;
    return LIBPERL_OK;
}

/* fsync the directory holding `path` so the rename itself is durable. */
static int fsync_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir;
    if (slash == NULL) {
        dir = perl_mem_strdup(".");
    } else if (slash == path) {
        dir = perl_mem_strdup("/");
    } else {
        size_t n = (size_t)(slash - path);
        dir = perl_mem_alloc(n + 1);
        if (dir) {
            memcpy(dir, path, n);
            dir[n] = '\0';
        }
    }
    if (dir == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "fsync: out of memory");
    int rc = LIBPERL_OK;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        rc = perl_fail(LIBPERL_ERR_IO, "cannot open directory '%s': %s", dir, strerror(e));
    } else {
        /* Some file systems cannot fsync directories (EINVAL); nothing to do there. */
        if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP) {
            int e = errno;
            rc = perl_fail(LIBPERL_ERR_IO, "cannot fsync directory '%s': %s", dir, strerror(e));
        }
        close(fd);
    }
    perl_mem_free(dir);
    return rc;
}

int atomic_file_commit(atomic_file *f)
{
    PERL_CHECK_ARG(f != NULL && f->fd >= 0, "atomic write: file is not open");
    int rc;
    if (f->failed) {
        rc = perl_fail(LIBPERL_ERR_IO, "cannot write '%s': an earlier write failed", f->path);
        atomic_file_abort(f);
        return rc;
    }
    rc = atomic_flush(f);
    if (rc == LIBPERL_OK && fsync(f->fd) != 0) {
        int e = errno;
        rc = perl_fail(LIBPERL_ERR_IO, "cannot fsync '%s': %s", f->tmp_path, strerror(e));
    }
    if (rc == LIBPERL_OK) {
        int c = close(f->fd);
        f->fd = -1;
        if (c != 0) {
            int e = errno;
            rc = perl_fail(LIBPERL_ERR_IO, "cannot close '%s': %s", f->tmp_path, strerror(e));
        }
    }
    if (rc == LIBPERL_OK && rename(f->tmp_path, f->path) != 0) {
        int e = errno;
        rc = perl_fail(LIBPERL_ERR_IO, "cannot rename '%s' to '%s': %s", f->tmp_path, f->path,
                       strerror(e));
    }
    if (rc != LIBPERL_OK) {
        atomic_file_abort(f);
        return rc;
    }
    /* Renamed: the temp name no longer exists. */
    perl_mem_free(f->tmp_path);
    f->tmp_path = NULL;
    rc = fsync_parent_dir(f->path);
    atomic_file_abort(f);
    return rc;
}

void atomic_file_abort(atomic_file *f)
{
    if (f == NULL) return;
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    if (f->tmp_path != NULL) unlink(f->tmp_path);
    perl_mem_free(f->tmp_path);
    perl_mem_free(f->path);
    perl_mem_free(f->buf);
    f->tmp_path = NULL;
    f->path = NULL;
    f->buf = NULL;
    f->buf_len = 0;
}

int file_write_atomic(const char *path, const void *data, size_t len)
{
    atomic_file f;
    PERL_TRY(atomic_file_open(&f, path));
    int rc = atomic_file_write(&f, data, len);
    if (rc != LIBPERL_OK) {
        atomic_file_abort(&f);
        return rc;
    }
    return atomic_file_commit(&f);
}
