/* A strict JSON parser and compact writer for the examples (see json_lite.h). */
#include "json_lite.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct parser {
    const char *text, *source;
    size_t len, pos;
    char *err;
    size_t err_size;
    int failed;
} parser;

/* Records "<source>:<line>:<col>: <message>" at the current position (first failure wins). */
static void fail(parser *p, const char *fmt, ...) {
    if (p->failed) return;
    p->failed = 1;
    size_t line = 1, col = 1;
    for (size_t i = 0; i < p->pos && i < p->len; i++) {
        if (p->text[i] == '\n')
            line++, col = 1;
        else
            col++;
    }
    int n = snprintf(p->err, p->err_size, "%s:%zu:%zu: ", p->source ? p->source : "<json>", line, col);
    if (n < 0 || (size_t)n >= p->err_size) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + n, p->err_size - (size_t)n, fmt, ap);
    va_end(ap);
}

/* A short description of what is at the current position, for messages. */
static const char *found(const parser *p) {
    if (p->pos >= p->len) return "end of input";
    unsigned char c = (unsigned char)p->text[p->pos];
    if (c < 0x20) return "a control character";
    static _Thread_local char buf[8];
    snprintf(buf, sizeof buf, "'%c'", c < 0x80 ? c : '?');
    return buf;
}

static void skip_space(parser *p) {
    while (p->pos < p->len) {
        char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static jl_value *new_value(parser *p, jl_type type) {
    jl_value *v = calloc(1, sizeof *v);
    if (!v)
        fail(p, "out of memory");
    else
        v->type = type;
    return v;
}

/* ---- strings ---------------------------------------------------------------------- */

static int hex4(parser *p, unsigned *out) {
    if (p->len - p->pos < 4) return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->text[p->pos + (size_t)i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    p->pos += 4;
    *out = v;
    return 0;
}

static int put_utf8(ex_buf *b, unsigned cp) {
    char s[4];
    size_t n;
    if (cp < 0x80)
        s[0] = (char)cp, n = 1;
    else if (cp < 0x800)
        s[0] = (char)(0xc0 | cp >> 6), s[1] = (char)(0x80 | (cp & 0x3f)), n = 2;
    else if (cp < 0x10000)
        s[0] = (char)(0xe0 | cp >> 12), s[1] = (char)(0x80 | (cp >> 6 & 0x3f)), s[2] = (char)(0x80 | (cp & 0x3f)),
        n = 3;
    else
        s[0] = (char)(0xf0 | cp >> 18), s[1] = (char)(0x80 | (cp >> 12 & 0x3f)), s[2] = (char)(0x80 | (cp >> 6 & 0x3f)),
        s[3] = (char)(0x80 | (cp & 0x3f)), n = 4;
    return ex_buf_append(b, s, n);
}

/* \uXXXX (the backslash and 'u' consumed), joining a surrogate pair. */
static int unicode_escape(parser *p, ex_buf *b) {
    unsigned cp;
    if (hex4(p, &cp) != 0) return fail(p, "expected 4 hex digits after \\u"), -1;
    if (cp >= 0xdc00 && cp <= 0xdfff) return fail(p, "lone low surrogate \\u%04x", cp), -1;
    if (cp >= 0xd800 && cp <= 0xdbff) {
        unsigned lo;
        if (p->len - p->pos < 2 || p->text[p->pos] != '\\' || p->text[p->pos + 1] != 'u')
            return fail(p, "high surrogate \\u%04x without a low surrogate", cp), -1;
        p->pos += 2;
        if (hex4(p, &lo) != 0 || lo < 0xdc00 || lo > 0xdfff)
            return fail(p, "high surrogate \\u%04x without a low surrogate", cp), -1;
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
    }
    return put_utf8(b, cp) == 0 ? 0 : (fail(p, "out of memory"), -1);
}

/* Length of a valid UTF-8 sequence at s (1..4), or 0 (overlong, surrogate, > U+10FFFF, truncated). */
static size_t utf8_sequence(const unsigned char *s, size_t avail) {
    unsigned char c = s[0];
    size_t n;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4, cp = c & 0x07;
    else
        return 0;
    if (avail < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return n;
}

/* A string at p->pos (the opening quote) into b. */
static int parse_string_into(parser *p, ex_buf *b) {
    p->pos++; /* the quote */
    if (ex_buf_append(b, "", 0) != 0) return fail(p, "out of memory"), -1;
    for (;;) {
        if (p->pos >= p->len) return fail(p, "unterminated string"), -1;
        unsigned char c = (unsigned char)p->text[p->pos];
        if (c == '"') {
            p->pos++;
            return 0;
        }
        if (c < 0x20) return fail(p, "control character 0x%02x in a string (escape it)", c), -1;
        if (c == '\\') {
            p->pos++;
            if (p->pos >= p->len) return fail(p, "unterminated escape"), -1;
            char e = p->text[p->pos++], out;
            switch (e) {
            case '"':
                out = '"';
                break;
            case '\\':
                out = '\\';
                break;
            case '/':
                out = '/';
                break;
            case 'b':
                out = '\b';
                break;
            case 'f':
                out = '\f';
                break;
            case 'n':
                out = '\n';
                break;
            case 'r':
                out = '\r';
                break;
            case 't':
                out = '\t';
                break;
            case 'u':
                if (unicode_escape(p, b) != 0) return -1;
                continue;
            default:
                p->pos--;
                return fail(p, "unknown escape \\%c", e >= 0x20 && e < 0x7f ? e : '?'), -1;
            }
            if (ex_buf_append(b, &out, 1) != 0) return fail(p, "out of memory"), -1;
            continue;
        }
        size_t n = utf8_sequence((const unsigned char *)p->text + p->pos, p->len - p->pos);
        if (n == 0) return fail(p, "invalid UTF-8 in a string"), -1;
        if (ex_buf_append(b, p->text + p->pos, n) != 0) return fail(p, "out of memory"), -1;
        p->pos += n;
    }
}

static jl_value *parse_string(parser *p) {
    ex_buf b = {NULL, 0, 0};
    if (parse_string_into(p, &b) != 0) {
        ex_buf_free(&b);
        return NULL;
    }
    jl_value *v = new_value(p, JL_STRING);
    if (!v) {
        ex_buf_free(&b);
        return NULL;
    }
    v->string = b.data;
    v->length = b.len;
    return v;
}

/* ---- numbers, literals ------------------------------------------------------------ */

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static jl_value *parse_number(parser *p) {
    size_t start = p->pos, i = p->pos;
    const char *t = p->text;
    if (i < p->len && t[i] == '-') i++;
    if (i >= p->len || !is_digit(t[i])) return p->pos = i, fail(p, "expected a digit"), NULL;
    if (t[i] == '0') {
        i++;
        if (i < p->len && is_digit(t[i])) return p->pos = i, fail(p, "leading zeros are not allowed"), NULL;
    } else {
        while (i < p->len && is_digit(t[i])) i++;
    }
    if (i < p->len && t[i] == '.') {
        i++;
        if (i >= p->len || !is_digit(t[i])) return p->pos = i, fail(p, "expected a digit after '.'"), NULL;
        while (i < p->len && is_digit(t[i])) i++;
    }
    if (i < p->len && (t[i] == 'e' || t[i] == 'E')) {
        i++;
        if (i < p->len && (t[i] == '+' || t[i] == '-')) i++;
        if (i >= p->len || !is_digit(t[i])) return p->pos = i, fail(p, "expected a digit in the exponent"), NULL;
        while (i < p->len && is_digit(t[i])) i++;
    }
    char buf[128];
    size_t n = i - start;
    if (n >= sizeof buf) return fail(p, "number too long"), NULL;
    memcpy(buf, t + start, n);
    buf[n] = '\0';
    double x = strtod(buf, NULL);
    if (!isfinite(x)) return fail(p, "number %s overflows a double", buf), NULL;
    p->pos = i;
    jl_value *v = new_value(p, JL_NUMBER);
    if (v) v->number = x;
    return v;
}

static jl_value *parse_literal(parser *p) {
    static const struct {
        const char *word;
        jl_type type;
        int boolean;
    } words[] = {{"null", JL_NULL, 0}, {"true", JL_BOOL, 1}, {"false", JL_BOOL, 0}};
    for (size_t k = 0; k < sizeof words / sizeof words[0]; k++) {
        size_t n = strlen(words[k].word);
        if (p->len - p->pos >= n && memcmp(p->text + p->pos, words[k].word, n) == 0) {
            p->pos += n;
            jl_value *v = new_value(p, words[k].type);
            if (v) v->boolean = words[k].boolean;
            return v;
        }
    }
    fail(p, "expected a value, found %s", found(p));
    return NULL;
}

/* ---- containers ------------------------------------------------------------------- */

static jl_value *parse_value(parser *p, int depth);

/* Appends a member (key may be NULL for arrays); takes ownership of item and key. */
static int push(parser *p, jl_value *c, jl_value *item, char *key, size_t *cap) {
    if (c->count == *cap) {
        size_t n = *cap ? *cap * 2 : 4;
        jl_value **items = realloc(c->items, n * sizeof *items);
        if (items) c->items = items;
        char **keys = c->type == JL_OBJECT && items ? realloc(c->keys, n * sizeof *keys) : c->keys;
        if (keys) c->keys = keys;
        if (!items || (c->type == JL_OBJECT && !keys)) {
            jl_free(item);
            free(key);
            return fail(p, "out of memory"), -1;
        }
        *cap = n;
    }
    c->items[c->count] = item;
    if (c->type == JL_OBJECT) c->keys[c->count] = key;
    c->count++;
    return 0;
}

static jl_value *parse_array(parser *p, int depth) {
    jl_value *a = new_value(p, JL_ARRAY);
    size_t cap = 0;
    if (!a) return NULL;
    p->pos++; /* [ */
    skip_space(p);
    if (p->pos < p->len && p->text[p->pos] == ']') {
        p->pos++;
        return a;
    }
    for (;;) {
        jl_value *item = parse_value(p, depth + 1);
        if (!item || push(p, a, item, NULL, &cap) != 0) break;
        skip_space(p);
        if (p->pos < p->len && p->text[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->pos < p->len && p->text[p->pos] == ']') {
            p->pos++;
            return a;
        }
        fail(p, "expected ',' or ']' in an array, found %s", found(p));
        break;
    }
    jl_free(a);
    return NULL;
}

static jl_value *parse_object(parser *p, int depth) {
    jl_value *o = new_value(p, JL_OBJECT);
    size_t cap = 0;
    if (!o) return NULL;
    p->pos++; /* { */
    skip_space(p);
    if (p->pos < p->len && p->text[p->pos] == '}') {
        p->pos++;
        return o;
    }
    for (;;) {
        skip_space(p);
        if (p->pos >= p->len || p->text[p->pos] != '"') {
            fail(p, "expected a string key, found %s", found(p));
            break;
        }
        size_t key_pos = p->pos;
        ex_buf key = {NULL, 0, 0};
        if (parse_string_into(p, &key) != 0) {
            ex_buf_free(&key);
            break;
        }
        for (size_t i = 0; i < o->count; i++) { /* objects here are small: a linear scan is enough */
            if (strcmp(o->keys[i], key.data) == 0) {
                p->pos = key_pos;
                fail(p, "duplicate key \"%.60s\"", key.data);
                break;
            }
        }
        skip_space(p);
        if (!p->failed && (p->pos >= p->len || p->text[p->pos] != ':'))
            fail(p, "expected ':' after a key, found %s", found(p));
        if (p->failed) {
            ex_buf_free(&key);
            break;
        }
        p->pos++;
        jl_value *item = parse_value(p, depth + 1);
        if (!item) {
            ex_buf_free(&key);
            break;
        }
        if (push(p, o, item, key.data, &cap) != 0) break;
        skip_space(p);
        if (p->pos < p->len && p->text[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->pos < p->len && p->text[p->pos] == '}') {
            p->pos++;
            return o;
        }
        fail(p, "expected ',' or '}' in an object, found %s", found(p));
        break;
    }
    jl_free(o);
    return NULL;
}

static jl_value *parse_value(parser *p, int depth) {
    if (depth > JL_MAX_DEPTH) return fail(p, "nesting deeper than %d", JL_MAX_DEPTH), NULL;
    skip_space(p);
    if (p->pos >= p->len) return fail(p, "expected a value, found end of input"), NULL;
    char c = p->text[p->pos];
    if (c == '{') return parse_object(p, depth);
    if (c == '[') return parse_array(p, depth);
    if (c == '"') return parse_string(p);
    if (c == '-' || is_digit(c)) return parse_number(p);
    return parse_literal(p);
}

int jl_parse(const char *text, size_t len, const char *source, jl_value **out, char *err, size_t err_size) {
    parser p = {text, source, len, 0, err, err_size, 0};
    *out = NULL;
    if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) p.pos = 3; /* byte order mark */
    jl_value *v = parse_value(&p, 0);
    if (v) {
        skip_space(&p);
        if (p.pos < len) {
            fail(&p, "unexpected %s after the value", found(&p));
            jl_free(v);
            v = NULL;
        }
    }
    *out = v;
    return v ? 0 : -1;
}

void jl_free(jl_value *v) {
    if (!v) return;
    for (size_t i = 0; i < v->count; i++) {
        jl_free(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->string);
    free(v);
}

const jl_value *jl_get(const jl_value *v, const char *key) {
    if (!v || v->type != JL_OBJECT) return NULL;
    for (size_t i = 0; i < v->count; i++)
        if (strcmp(v->keys[i], key) == 0) return v->items[i];
    return NULL;
}

const char *jl_string(const jl_value *v) { return v && v->type == JL_STRING ? v->string : NULL; }

const char *jl_type_name(jl_type type) {
    static const char *const names[] = {"null", "boolean", "number", "string", "array", "object"};
    return type <= JL_OBJECT ? names[type] : "?";
}

/* ---- writer ----------------------------------------------------------------------- */

static int write_string(const char *s, size_t n, ex_buf *out) {
    if (ex_buf_append(out, "\"", 1) != 0) return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            if (ex_buf_append(out, esc, 2) != 0) return -1;
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            if (ex_buf_append(out, esc, 6) != 0) return -1;
        } else if (ex_buf_append(out, s + i, 1) != 0) {
            return -1;
        }
    }
    return ex_buf_append(out, "\"", 1);
}

int jl_write(const jl_value *v, ex_buf *out) {
    char num[64];
    switch (v->type) {
    case JL_NULL:
        return ex_buf_puts(out, "null");
    case JL_BOOL:
        return ex_buf_puts(out, v->boolean ? "true" : "false");
    case JL_NUMBER:
        /* integers as integers, others with the fewest digits (15 or 17) that round-trip */
        if (v->number == floor(v->number) && fabs(v->number) < 1e15)
            snprintf(num, sizeof num, "%.0f", v->number);
        else if (snprintf(num, sizeof num, "%.15g", v->number), strtod(num, NULL) != v->number)
            snprintf(num, sizeof num, "%.17g", v->number);
        return ex_buf_puts(out, num);
    case JL_STRING:
        return write_string(v->string, v->length, out);
    case JL_ARRAY:
    case JL_OBJECT:
        if (ex_buf_puts(out, v->type == JL_ARRAY ? "[" : "{") != 0) return -1;
        for (size_t i = 0; i < v->count; i++) {
            if (i && ex_buf_puts(out, ",") != 0) return -1;
            if (v->type == JL_OBJECT &&
                (write_string(v->keys[i], strlen(v->keys[i]), out) != 0 || ex_buf_puts(out, ":") != 0))
                return -1;
            if (jl_write(v->items[i], out) != 0) return -1;
        }
        return ex_buf_puts(out, v->type == JL_ARRAY ? "]" : "}");
    }
    return -1;
}
