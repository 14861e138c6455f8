/*
 * safetensors reader (validating, over an mmap) and F32 writer (atomic).
 */
#include "safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} st_dtypes[ST_N_DTYPES] = {
    [ST_BOOL] = {"BOOL", 1},      [ST_U8] = {"U8", 1},     [ST_I8] = {"I8", 1},
    [ST_F8_E5M2] = {"F8_E5M2", 1}, [ST_F8_E4M3] = {"F8_E4M3", 1},
    [ST_I16] = {"I16", 2},        [ST_U16] = {"U16", 2},   [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2},      [ST_I32] = {"I32", 4},   [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},        [ST_F64] = {"F64", 8},   [ST_I64] = {"I64", 8},
    [ST_U64] = {"U64", 8},
};

const char *st_dtype_name(st_dtype dtype)
{
    return (unsigned)dtype < ST_N_DTYPES ? st_dtypes[dtype].name : "?";
}

size_t st_dtype_size(st_dtype dtype)
{
    return (unsigned)dtype < ST_N_DTYPES ? st_dtypes[dtype].size : 0;
}

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static uint64_t read_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

void st_shape_str(int ndim, const int64_t *shape, char *buf, size_t n)
{
    size_t o = 0;
    if (n == 0) return;
    buf[0] = '\0';
    o += (size_t)snprintf(buf + o, n - o, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* ---- reader -------------------------------------------------------------- */

void st_close(st_file *f)
{
    if (f == NULL) return;
    file_map_close(&f->map);
    json_doc_free(f->header);
    perl_mem_free(f->tensors);
    perl_mem_free(f->path);
    memset(f, 0, sizeof *f);
}

static int tensor_fail(const st_file *f, int status, const char *tensor, const char *what)
{
    return perl_fail(status, "%s: tensor \"%.200s\": %s", f->path, tensor, what);
}

/* Reads one header entry into *t. */
static int parse_entry(st_file *f, const char *name, size_t name_len, const json_value *info,
                       size_t data_size, st_tensor *t)
{
    char msg[256];
    if (strlen(name) != name_len)
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, "name contains a NUL character");
    if (info->type != JSON_OBJECT) {
        snprintf(msg, sizeof msg, "entry is a %s, expected an object", json_type_name(info->type));
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, msg);
    }
    const char *dtype = json_as_string(json_get(info, "dtype"));
    const json_value *shape = json_get(info, "shape");
    const json_value *offsets = json_get(info, "data_offsets");
    if (dtype == NULL)
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, "missing or non-string \"dtype\"");
    if (shape == NULL || shape->type != JSON_ARRAY)
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, "missing or non-array \"shape\"");
    if (offsets == NULL || offsets->type != JSON_ARRAY || offsets->count != 2)
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name,
                           "\"data_offsets\" must be an array [begin, end]");

    memset(t, 0, sizeof *t);
    t->name = name;
    int found = 0;
    for (int d = 0; d < ST_N_DTYPES; d++) {
        if (strcmp(dtype, st_dtypes[d].name) == 0) {
            t->dtype = (st_dtype)d;
            found = 1;
        }
    }
    if (!found) {
        snprintf(msg, sizeof msg, "unsupported dtype \"%.40s\"", dtype);
        return tensor_fail(f, LIBPERL_ERR_UNSUPPORTED, name, msg);
    }

    if (shape->count > ST_MAX_DIMS) {
        snprintf(msg, sizeof msg, "rank %zu exceeds the maximum %d", shape->count, ST_MAX_DIMS);
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, msg);
    }
    t->ndim = (int)shape->count;
    uint64_t numel = 1;
    int overflow = 0;
    for (int i = 0; i < t->ndim; i++) {
        const json_value *dv = shape->items[i];
        if (dv->type != JSON_NUMBER || !dv->is_integer || dv->integer < 0) {
            snprintf(msg, sizeof msg, "shape[%d] is not a non-negative integer", i);
            return tensor_fail(f, LIBPERL_ERR_FORMAT, name, msg);
        }
        t->shape[i] = dv->integer;
        uint64_t dim = (uint64_t)dv->integer;
        if (dim != 0 && numel > UINT64_MAX / dim) overflow = 1;
        else numel *= dim;
    }
    /* A zero dimension makes the product 0 even if other dims overflowed. */
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0) overflow = 0, numel = 0;
    size_t dsize = st_dtypes[t->dtype].size;
    if (overflow || numel > (uint64_t)SIZE_MAX / dsize)
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, "shape is absurdly large");
    t->numel = numel;
    t->nbytes = (size_t)numel * dsize;

    const json_value *bv = offsets->items[0], *ev = offsets->items[1];
    if (bv->type != JSON_NUMBER || !bv->is_integer || bv->integer < 0 ||
        ev->type != JSON_NUMBER || !ev->is_integer || ev->integer < 0)
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name,
                           "data_offsets must be non-negative integers");
    uint64_t begin = (uint64_t)bv->integer, end = (uint64_t)ev->integer;
    if (begin > end) {
        snprintf(msg, sizeof msg, "data_offsets begin %llu > end %llu",
                 (unsigned long long)begin, (unsigned long long)end);
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, msg);
    }
    if (end > data_size) {
        snprintf(msg, sizeof msg,
                 "data_offsets [%llu, %llu] outside the %zu-byte data section (truncated file?)",
                 (unsigned long long)begin, (unsigned long long)end, data_size);
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, msg);
    }
    if (end - begin != (uint64_t)t->nbytes) {
        char sh[128];
        st_shape_str(t->ndim, t->shape, sh, sizeof sh);
        snprintf(msg, sizeof msg, "%llu data bytes but shape %s of %s needs %zu",
                 (unsigned long long)(end - begin), sh, dtype, t->nbytes);
        return tensor_fail(f, LIBPERL_ERR_FORMAT, name, msg);
    }
    t->begin = begin;
    t->data = f->base + f->data_offset + begin;
    return LIBPERL_OK;
}

/* Sorts tensor indices by begin offset (merge sort; no qsort context needed). */
static void sort_by_begin(const st_tensor *t, size_t *idx, size_t *tmp, size_t n)
{
    if (n < 2) return;
    size_t h = n / 2;
    sort_by_begin(t, idx, tmp, h);
    sort_by_begin(t, idx + h, tmp, n - h);
    size_t a = 0, b = h, o = 0;
    while (a < h && b < n) tmp[o++] = t[idx[b]].begin < t[idx[a]].begin ? idx[b++] : idx[a++];
    while (a < h) tmp[o++] = idx[a++];
    while (b < n) tmp[o++] = idx[b++];
    memcpy(idx, tmp, n * sizeof *idx);
}

static int check_overlaps(st_file *f)
{
    size_t n = f->n_tensors;
    if (n < 2) return LIBPERL_OK;
    size_t *idx = perl_mem_alloc(n * sizeof *idx);
    size_t *tmp = perl_mem_alloc(n * sizeof *tmp);
    if (idx == NULL || tmp == NULL) {
        perl_mem_free(idx);
        perl_mem_free(tmp);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "%s: out of memory", f->path);
    }
    for (size_t i = 0; i < n; i++) idx[i] = i;
    sort_by_begin(f->tensors, idx, tmp, n);
    int rc = LIBPERL_OK;
    uint64_t max_end = 0;
    size_t max_owner = 0;
    for (size_t k = 0; k < n; k++) {
        const st_tensor *t = &f->tensors[idx[k]];
        if (t->nbytes == 0) continue;
        if (t->begin < max_end) {
            rc = perl_fail(LIBPERL_ERR_FORMAT,
                           "%s: tensors \"%.200s\" and \"%.200s\" overlap in the data section",
                           f->path, f->tensors[max_owner].name, t->name);
            break;
        }
        max_end = t->begin + t->nbytes;
        max_owner = idx[k];
    }
    perl_mem_free(idx);
    perl_mem_free(tmp);
    return rc;
}

static int parse_image(st_file *f)
{
    if (!host_is_little_endian())
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: safetensors needs a little-endian host",
                         f->path);
    if (f->size < 8)
        return perl_fail(LIBPERL_ERR_FORMAT,
                         "%s: %zu bytes is too short for a safetensors file (8-byte header "
                         "length missing)", f->path, f->size);
    uint64_t n = read_le64(f->base);
    if (n < 2)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: header length %llu is too small", f->path,
                         (unsigned long long)n);
    if (n > ST_MAX_HEADER)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: header length %llu exceeds the %llu-byte limit",
                         f->path, (unsigned long long)n, (unsigned long long)ST_MAX_HEADER);
    if (n > (uint64_t)(f->size - 8))
        return perl_fail(LIBPERL_ERR_FORMAT,
                         "%s: header length %llu exceeds the %zu bytes after the length field "
                         "(truncated file?)", f->path, (unsigned long long)n, f->size - 8);
    f->data_offset = 8 + (size_t)n;
    const char *text = (const char *)f->base + 8;
    if (text[0] != '{')
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: header must be a JSON object starting with '{'",
                         f->path);
    char source[300];
    snprintf(source, sizeof source, "%.250s header", f->path);
    PERL_TRY(json_parse(&f->header, text, (size_t)n, source));
    const json_value *root = json_doc_root(f->header);
    if (root->type != JSON_OBJECT)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: header is a %s, expected an object", f->path,
                         json_type_name(root->type));

    size_t data_size = f->size - f->data_offset;
    if (root->count) {
        f->tensors = perl_mem_calloc(root->count, sizeof *f->tensors);
        if (f->tensors == NULL)
            return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "%s: out of memory", f->path);
    }
    /* Walk the keys in sorted order so f->tensors is sorted by name. */
    for (size_t k = 0; k < root->count; k++) {
        const json_member *m = &root->members[root->sorted[k]];
        if (strcmp(m->key, "__metadata__") == 0 && m->key_len == 12) {
            const json_value *md = m->value;
            if (md->type != JSON_OBJECT)
                return perl_fail(LIBPERL_ERR_FORMAT, "%s: __metadata__ must be an object",
                                 f->path);
            for (size_t i = 0; i < md->count; i++) {
                if (md->members[i].value->type != JSON_STRING)
                    return perl_fail(LIBPERL_ERR_FORMAT,
                                     "%s: __metadata__ value for \"%.100s\" is a %s, expected a "
                                     "string", f->path, md->members[i].key,
                                     json_type_name(md->members[i].value->type));
            }
            f->metadata = md;
            continue;
        }
        PERL_TRY(parse_entry(f, m->key, m->key_len, m->value, data_size,
                             &f->tensors[f->n_tensors]));
        f->n_tensors++;
    }
    return check_overlaps(f);
}

int st_parse(st_file *out, const void *data, size_t size, const char *name)
{
    PERL_CHECK_ARG(out != NULL, "st_parse: out is NULL");
    memset(out, 0, sizeof *out);
    PERL_CHECK_ARG(data != NULL || size == 0, "st_parse: data is NULL");
    out->path = perl_mem_strdup(name ? name : "<safetensors>");
    if (out->path == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "st_parse: out of memory");
    static const unsigned char empty[1] = {0};
    out->base = data ? data : empty;
    out->size = size;
    int rc = parse_image(out);
    if (rc != LIBPERL_OK) st_close(out);
    return rc;
}

int st_open(st_file *out, const char *path)
{
    PERL_CHECK_ARG(out != NULL && path != NULL, "st_open: NULL argument");
    memset(out, 0, sizeof *out);
    file_map map;
    PERL_TRY(file_map_open(&map, path));
    int rc = st_parse(out, map.addr, map.size, path);
    if (rc != LIBPERL_OK) {
        file_map_close(&map);
        return rc;
    }
    out->map = map;
    return LIBPERL_OK;
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    if (f == NULL || name == NULL) return NULL;
    size_t lo = 0, hi = f->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->tensors[mid].name, name);
        if (c == 0) return &f->tensors[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const char *st_metadata(const st_file *f, const char *key)
{
    return f ? json_as_string(json_get(f->metadata, key)) : NULL;
}

const float *st_f32_inplace(const st_tensor *t)
{
    if (t == NULL || t->dtype != ST_F32 || ((uintptr_t)t->data & 3u) != 0) return NULL;
    return (const float *)t->data;
}

int st_to_f32(const st_tensor *t, float *dst)
{
    PERL_CHECK_ARG(t != NULL && (dst != NULL || t->numel == 0), "st_to_f32: NULL argument");
    const unsigned char *src = t->data;
    size_t n = (size_t)t->numel;
    switch (t->dtype) {
    case ST_F32:
        if (n) memcpy(dst, src, n * sizeof(float));
        return LIBPERL_OK;
    case ST_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = perl_f16_to_f32(h);
        }
        return LIBPERL_OK;
    case ST_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = perl_bf16_to_f32(h);
        }
        return LIBPERL_OK;
    default:
        return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                         "tensor \"%.200s\" has dtype %s; only F32, F16 and BF16 are supported",
                         t->name, st_dtype_name(t->dtype));
    }
}

int st_shape_is(const st_tensor *t, int ndim, const int64_t *shape)
{
    if (t->ndim != ndim) return 0;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != shape[i]) return 0;
    return 1;
}

/* ---- writer -------------------------------------------------------------- */

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int st_write(const char *path, const st_write_tensor *tensors, size_t n_tensors,
             const char *const *metadata)
{
    PERL_CHECK_ARG(path != NULL, "st_write: path is NULL");
    PERL_CHECK_ARG(tensors != NULL || n_tensors == 0, "st_write: tensors is NULL");
    if (!host_is_little_endian())
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "safetensors writing needs a little-endian host");

    /* Validate names (unique, not the metadata key) and shapes. */
    uint64_t *sizes = NULL;
    const char **names = NULL;
    if (n_tensors) {
        sizes = perl_mem_alloc(n_tensors * sizeof *sizes);
        names = perl_mem_alloc(n_tensors * sizeof *names);
        if (sizes == NULL || names == NULL) {
            perl_mem_free(sizes);
            perl_mem_free(names);
            return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "writing '%s': out of memory", path);
        }
    }
    int rc = LIBPERL_OK;
    for (size_t i = 0; i < n_tensors && rc == LIBPERL_OK; i++) {
        const st_write_tensor *t = &tensors[i];
        names[i] = t->name;
        if (t->name == NULL || strcmp(t->name, "__metadata__") == 0) {
            rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "st_write: tensor %zu has an invalid name",
                           i);
            break;
        }
        if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) {
            rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "st_write: tensor \"%s\" has rank %d",
                           t->name, t->ndim);
            break;
        }
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0 || (t->shape[d] > 0 && numel > UINT64_MAX / 4 / (uint64_t)t->shape[d])) {
                rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "st_write: tensor \"%s\" has a bad shape",
                               t->name);
                break;
            }
            numel *= (uint64_t)t->shape[d];
        }
        if (rc != LIBPERL_OK) break;
        if (numel > (uint64_t)SIZE_MAX / 4 || (numel > 0 && t->data == NULL)) {
            rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "st_write: tensor \"%s\" has no data",
                           t->name);
            break;
        }
        if (t->row_order != NULL) {
            int64_t rows = t->ndim > 0 ? t->shape[0] : 1;
            for (int64_t r = 0; r < rows; r++) {
                if (t->row_order[r] < 0 || t->row_order[r] >= rows) {
                    rc = perl_fail(LIBPERL_ERR_INTERNAL,
                                   "st_write: tensor \"%s\" has a bad row order", t->name);
                    break;
                }
            }
        }
        sizes[i] = numel * 4;
    }
    if (rc == LIBPERL_OK && n_tensors > 1) {
        qsort(names, n_tensors, sizeof *names, cmp_names);
        for (size_t i = 1; i < n_tensors; i++) {
            if (strcmp(names[i - 1], names[i]) == 0) {
                rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT,
                               "st_write: tensor name \"%s\" appears twice", names[i]);
                break;
            }
        }
    }
    perl_mem_free(names);
    if (rc != LIBPERL_OK) {
        perl_mem_free(sizes);
        return rc;
    }

    /* Header. */
    json_writer w;
    json_writer_init(&w, 0);
    json_write_object_begin(&w);
    if (metadata != NULL && metadata[0] != NULL) {
        json_write_key(&w, "__metadata__");
        json_write_object_begin(&w);
        for (size_t i = 0; metadata[i] != NULL && metadata[i + 1] != NULL; i += 2) {
            json_write_key(&w, metadata[i]);
            json_write_string(&w, metadata[i + 1]);
        }
        json_write_object_end(&w);
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n_tensors; i++) {
        const st_write_tensor *t = &tensors[i];
        json_write_key(&w, t->name);
        json_write_object_begin(&w);
        json_write_key(&w, "dtype");
        json_write_string(&w, "F32");
        json_write_key(&w, "shape");
        json_write_array_begin(&w);
        for (int d = 0; d < t->ndim; d++) json_write_int(&w, t->shape[d]);
        json_write_array_end(&w);
        json_write_key(&w, "data_offsets");
        json_write_array_begin(&w);
        json_write_int(&w, (int64_t)offset);
        json_write_int(&w, (int64_t)(offset + sizes[i]));
        json_write_array_end(&w);
        json_write_object_end(&w);
        offset += sizes[i];
    }
    json_write_object_end(&w);
    rc = json_writer_finish(&w);
    /* Pad with spaces so the data section (8 + N) starts 8-byte aligned. */
    while (rc == LIBPERL_OK && (8 + w.len) % 8 != 0) {
        json_write_raw(&w, " ", 1);
        rc = w.failed;
    }
    if (rc != LIBPERL_OK) {
        json_writer_free(&w);
        perl_mem_free(sizes);
        return rc;
    }

    atomic_file f;
    rc = atomic_file_open(&f, path);
    if (rc != LIBPERL_OK) {
        json_writer_free(&w);
        perl_mem_free(sizes);
        return rc;
    }
    unsigned char len8[8];
    uint64_t hl = w.len;
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(hl >> (8 * i));
    rc = atomic_file_write(&f, len8, 8);
    if (rc == LIBPERL_OK) rc = atomic_file_write(&f, w.data, w.len);
    for (size_t i = 0; i < n_tensors && rc == LIBPERL_OK; i++) {
        const st_write_tensor *t = &tensors[i];
        if (t->row_order == NULL || t->ndim == 0 || t->shape[0] == 0) {
            rc = atomic_file_write(&f, t->data, (size_t)sizes[i]);
            continue;
        }
        size_t rows = (size_t)t->shape[0];
        size_t row_bytes = (size_t)sizes[i] / rows;
        for (size_t r = 0; r < rows && rc == LIBPERL_OK; r++)
            rc = atomic_file_write(&f, (const unsigned char *)t->data +
                                           (size_t)t->row_order[r] * row_bytes, row_bytes);
    }
    json_writer_free(&w);
    perl_mem_free(sizes);
    if (rc != LIBPERL_OK) {
        atomic_file_abort(&f);
        return rc;
    }
    return atomic_file_commit(&f);
}
