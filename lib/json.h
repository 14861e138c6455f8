/*
 * A strict RFC 8259 JSON parser into a small read-only DOM, and a writer.
 *
 * Parser: input is (bytes, length), not NUL-terminated, and must be UTF-8.
 * Rejected: trailing garbage, control characters and invalid UTF-8 in
 * strings, bad escapes and lone surrogates, leading zeros, "+1", ".5", "1.",
 * NaN/Infinity, numbers overflowing a double, nesting deeper than
 * JSON_MAX_DEPTH and duplicate object keys.  A UTF-8 byte order mark at the
 * start is skipped.  Errors are LIBPERL_ERR_FORMAT with
 * "<source>:<line>:<column>: expected ..., found ...".
 */
#ifndef LIBPERL_JSON_H
#define LIBPERL_JSON_H

#include "internal.h"

#define JSON_MAX_DEPTH 64

typedef enum json_type {
    JSON_NULL = 0,
    JSON_BOOL,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT
} json_type;

typedef struct json_value json_value;

typedef struct json_member {
    const char *key;   /* UTF-8, NUL-terminated (may also contain \u0000) */
    size_t key_len;
    json_value *value;
} json_member;

struct json_value {
    json_type type;
    int boolean;           /* JSON_BOOL */
    double number;         /* JSON_NUMBER */
    int is_integer;        /* JSON_NUMBER written without fraction/exponent, fits int64 */
    int64_t integer;       /* valid when is_integer */
    const char *string;    /* JSON_STRING: UTF-8, NUL-terminated */
    size_t string_len;
    json_value **items;    /* JSON_ARRAY */
    json_member *members;  /* JSON_OBJECT, in document order */
    size_t *sorted;        /* JSON_OBJECT: member indices sorted by key */
    size_t count;          /* items or members */
};

/* A parsed document; all values live in its arena. */
typedef struct json_doc json_doc;

/* Parses text[0, len).  `source` names the input in error messages (may be NULL). */
int json_parse(json_doc **out, const char *text, size_t len, const char *source);
const json_value *json_doc_root(const json_doc *doc);
void json_doc_free(json_doc *doc);

const char *json_type_name(json_type type);

/* Member of an object by key (NULL when absent or v is not an object). */
const json_value *json_get(const json_value *obj, const char *key);
/* Array length (0 for a non-array) and element (NULL out of range). */
size_t json_array_len(const json_value *arr);
const json_value *json_array_at(const json_value *arr, size_t i);

int json_is_null(const json_value *v); /* 1 for JSON null (not for absent) */
/* Typed getters: 1 on success, 0 if v is NULL or has another type.
 * json_as_int64 accepts integral numbers (also 2.0, 1e3) within int64. */
int json_as_int64(const json_value *v, int64_t *out);
int json_as_double(const json_value *v, double *out);
int json_as_bool(const json_value *v, int *out);
const char *json_as_string(const json_value *v); /* NULL unless a string */

/* ---- writer --------------------------------------------------------------
 * Appends to a growable NUL-terminated buffer.  Commas and (when pretty)
 * newlines and indentation are inserted automatically.  Errors are sticky:
 * check json_writer_finish once at the end. */
typedef struct json_writer {
    char *data;
    size_t len, cap;
    int pretty;
    int depth;
    int failed;          /* perl status of the first failure, 0 if none */
    int after_key;       /* next value completes a "key": pair */
    unsigned char has_items[JSON_MAX_DEPTH + 1];
} json_writer;

void json_writer_init(json_writer *w, int pretty);
void json_writer_free(json_writer *w);
/* Returns the first failure, or LIBPERL_OK when the document is complete. */
int json_writer_finish(json_writer *w);

void json_write_object_begin(json_writer *w);
void json_write_object_end(json_writer *w);
void json_write_array_begin(json_writer *w);
void json_write_array_end(json_writer *w);
void json_write_key(json_writer *w, const char *key);
void json_write_string(json_writer *w, const char *s);
void json_write_string_n(json_writer *w, const char *s, size_t len);
void json_write_int(json_writer *w, int64_t v);
/* Shortest decimal that reads back as the same float (non-finite fails). */
void json_write_float(json_writer *w, float v);
void json_write_double(json_writer *w, double v);
void json_write_bool(json_writer *w, int v);
void json_write_null(json_writer *w);
/* Appends raw bytes (no separators), e.g. padding. */
void json_write_raw(json_writer *w, const char *s, size_t len);

#endif /* LIBPERL_JSON_H */
