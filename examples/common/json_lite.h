/*
 * A small strict JSON (RFC 8259) parser into a read-only tree, and a compact
 * writer, for the examples (the library's own parser is internal).
 *
 * Rejected, with "<source>:<line>:<column>: <what>": trailing garbage, raw
 * control characters and invalid UTF-8 in strings, unknown escapes and lone
 * surrogates, leading zeros, "+1", ".5", "1.", NaN / Infinity, numbers that
 * overflow a double, duplicate object keys and nesting deeper than
 * JL_MAX_DEPTH.  A UTF-8 byte order mark at the start is skipped.
 */
#ifndef EXAMPLES_JSON_LITE_H
#define EXAMPLES_JSON_LITE_H

#include <stddef.h>

#include "text_io.h"

#define JL_MAX_DEPTH 128

typedef enum jl_type { JL_NULL = 0, JL_BOOL, JL_NUMBER, JL_STRING, JL_ARRAY, JL_OBJECT } jl_type;

typedef struct jl_value {
    jl_type type;
    int boolean;             /* JL_BOOL */
    double number;           /* JL_NUMBER */
    char *string;            /* JL_STRING: UTF-8, NUL-terminated (may contain \u0000) */
    size_t length;           /* JL_STRING: bytes */
    struct jl_value **items; /* JL_ARRAY items, JL_OBJECT member values (document order) */
    char **keys;             /* JL_OBJECT member keys (NUL-terminated) */
    size_t count;            /* items / members */
} jl_value;

/* Parses text[0, len).  On failure returns -1 with the message in err
 * ("<source>:<line>:<col>: ..."); *out is NULL. */
int jl_parse(const char *text, size_t len, const char *source, jl_value **out, char *err, size_t err_size);
void jl_free(jl_value *v);

/* Member of an object by key, or NULL (also when v is not an object). */
const jl_value *jl_get(const jl_value *v, const char *key);
/* The string of a JL_STRING, else NULL. */
const char *jl_string(const jl_value *v);
const char *jl_type_name(jl_type type);

/* Appends v as compact JSON (no spaces; strings escaped minimally).  0 or -1 (out of memory). */
int jl_write(const jl_value *v, ex_buf *out);

#endif /* EXAMPLES_JSON_LITE_H */
