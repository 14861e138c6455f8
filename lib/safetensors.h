/*
 * safetensors: an 8-byte little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
 *    "__metadata__": {"key": "value"}}
 * then the data section (offsets are relative to its start).
 *
 * The reader validates everything before any pointer is handed out: header
 * length against the file size, strict JSON, known dtypes (unknown ones are
 * LIBPERL_ERR_UNSUPPORTED), shapes (rank <= ST_MAX_DIMS, overflow-checked
 * byte sizes equal to end - begin), offsets inside the data section and no
 * two tensors overlapping.  The writer emits F32 tensors with the header
 * padded by spaces so the data section starts 8-byte aligned.
 */
#ifndef LIBPERL_SAFETENSORS_H
#define LIBPERL_SAFETENSORS_H

#include "fileio.h"
#include "json.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER ((uint64_t)100000000) /* as the reference implementation */

typedef enum st_dtype {
    ST_BOOL = 0, ST_U8, ST_I8, ST_F8_E5M2, ST_F8_E4M3, ST_I16, ST_U16, ST_F16, ST_BF16,
    ST_I32, ST_U32, ST_F32, ST_F64, ST_I64, ST_U64, ST_N_DTYPES
} st_dtype;

const char *st_dtype_name(st_dtype dtype);
size_t st_dtype_size(st_dtype dtype);

typedef struct st_tensor {
    const char *name;            /* into the parsed header */
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t numel;
    size_t nbytes;
    uint64_t begin;              /* offset in the data section */
    const void *data;            /* inside the file (or memory) buffer */
} st_tensor;

typedef struct st_file {
    file_map map;                /* mapping owned by this file (empty for st_parse) */
    const unsigned char *base;   /* whole file */
    size_t size;
    size_t data_offset;          /* 8 + N */
    json_doc *header;
    st_tensor *tensors;          /* sorted by name */
    size_t n_tensors;
    const json_value *metadata;  /* "__metadata__" object or NULL */
    char *path;                  /* for error messages */
} st_file;

/* Maps and validates `path`.  On failure *out is left closed. */
int st_open(st_file *out, const char *path);
/* Validates a file image in memory (not copied; must outlive *out).
 * `name` is used in error messages. */
int st_parse(st_file *out, const void *data, size_t size, const char *name);
void st_close(st_file *f);

/* Tensor by name (binary search) or NULL. */
const st_tensor *st_find(const st_file *f, const char *name);
/* Metadata value for key or NULL. */
const char *st_metadata(const st_file *f, const char *key);

/* The tensor's data as float* usable in place: F32 and 4-byte aligned
 * (little-endian host), else NULL. */
const float *st_f32_inplace(const st_tensor *t);
/* Converts an F32, F16 or BF16 tensor into dst[numel]; other dtypes fail
 * with LIBPERL_ERR_UNSUPPORTED. */
int st_to_f32(const st_tensor *t, float *dst);
/* 1 if t has exactly the given shape. */
int st_shape_is(const st_tensor *t, int ndim, const int64_t *shape);
/* Formats "[a, b, ...]" into buf. */
void st_shape_str(int ndim, const int64_t *shape, char *buf, size_t n);

/* ---- writer ---- */
typedef struct st_write_tensor {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data;         /* F32, numel floats */
    /* Optional: output row r is input row row_order[r]; rows are shape[0]
     * slices of numel / shape[0] floats.  Used to permute RoPE weights. */
    const int32_t *row_order;
} st_write_tensor;

/* Writes an F32 safetensors file atomically.  metadata: NULL or a
 * NULL-terminated list of key, value, key, value, ... strings. */
int st_write(const char *path, const st_write_tensor *tensors, size_t n_tensors,
             const char *const *metadata);

#endif /* LIBPERL_SAFETENSORS_H */
