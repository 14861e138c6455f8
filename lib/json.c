/*
 * Strict RFC 8259 JSON: recursive-descent parser into an arena-allocated DOM,
 * and a small streaming writer.
 */
#include "json.h"

#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- arena --------------------------------------------------------------- */

typedef struct json_block {
    struct json_block *next;
    size_t used, cap;
    /* data follows, 16-byte aligned */
} json_block;

#define JSON_BLOCK_HEADER ((sizeof(json_block) + 15) & ~(size_t)15)
#define JSON_BLOCK_MIN 8192

struct json_doc {
    json_value *root;
    json_block *blocks;
};

static void *arena_alloc(json_doc *doc, size_t size)
{
    size = (size + 15) & ~(size_t)15;
    if (size == 0) size = 16;
    json_block *b = doc->blocks;
    if (b == NULL || b->cap - b->used < size) {
        size_t cap = size > JSON_BLOCK_MIN ? size : JSON_BLOCK_MIN;
        if (cap > SIZE_MAX - JSON_BLOCK_HEADER) return NULL;
        json_block *nb = perl_mem_alloc(JSON_BLOCK_HEADER + cap);
        if (nb == NULL) return NULL;
        nb->used = 0;
        nb->cap = cap;
        /* Keep the current (partly free) block first only if the new one is a
         * one-off large allocation; otherwise start filling the new block. */
        if (b != NULL && cap > JSON_BLOCK_MIN) {
            nb->next = b->next;
            b->next = nb;
            nb->used = size;
            return (char *)nb + JSON_BLOCK_HEADER;
        }
        nb->next = b;
        doc->blocks = nb;
        b = nb;
    }
    void *p = (char *)b + JSON_BLOCK_HEADER + b->used;
    b->used += size;
    return p;
}

void json_doc_free(json_doc *doc)
{
    if (doc == NULL) return;
    json_block *b = doc->blocks;
    while (b != NULL) {
        json_block *next = b->next;
        perl_mem_free(b);
        b = next;
    }
    perl_mem_free(doc);
}

const json_value *json_doc_root(const json_doc *doc)
{
    return doc ? doc->root : NULL;
}

/* ---- locale-independent number conversion -------------------------------- */

/* strtod on a NUL-terminated C-locale number: '.' is replaced by the current
 * locale's decimal point first, so a host's setlocale cannot change results. */
static double c_strtod(const char *s, size_t len, int *ok)
{
    const char *dp = localeconv()->decimal_point;
    size_t dpl = (dp && dp[0]) ? strlen(dp) : 1;
    if (!dp || !dp[0]) dp = ".";
    char stack[128];
    size_t need = len * dpl + 1;
    char *buf = need <= sizeof stack ? stack : perl_mem_alloc(need);
    if (buf == NULL) {
        *ok = 0;
        return 0.0;
    }
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '.') {
            memcpy(buf + o, dp, dpl);
            o += dpl;
        } else {
            buf[o++] = s[i];
        }
    }
    buf[o] = '\0';
    char *end = NULL;
    double v = strtod(buf, &end);
    *ok = end == buf + o;
    if (buf != stack) perl_mem_free(buf);
    return v;
}

/* ---- parser -------------------------------------------------------------- */

typedef struct parser {
    const unsigned char *text;
    size_t len, pos;
    int depth;
    json_doc *doc;
    const char *source;
} parser;

static void describe_at(const parser *p, size_t pos, char *out, size_t n)
{
    if (pos >= p->len) {
        snprintf(out, n, "end of input");
        return;
    }
    unsigned c = p->text[pos];
    if (c >= 0x20 && c < 0x7f)
        snprintf(out, n, "'%c'", (char)c);
    else if (c < 0x20)
        snprintf(out, n, "control character U+%04X", c);
    else
        snprintf(out, n, "byte 0x%02X", c);
}

static void line_col(const parser *p, size_t pos, size_t *line, size_t *col)
{
    size_t l = 1, c = 1;
    if (pos > p->len) pos = p->len;
    for (size_t i = 0; i < pos; i++) {
        unsigned char ch = p->text[i];
        if (ch == '\n') {
            l++;
            c = 1;
        } else if ((ch & 0xC0) != 0x80) {
            c++; /* count characters, not UTF-8 continuation bytes */
        }
    }
    *line = l;
    *col = c;
}

static int PERL_PRINTF(3, 4) fail_at(const parser *p, size_t pos, const char *fmt, ...)
{
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    size_t line, col;
    line_col(p, pos, &line, &col);
    return perl_fail(LIBPERL_ERR_FORMAT, "%s:%zu:%zu: %s", p->source ? p->source : "<json>",
                     line, col, what);
}

static int fail_expected(const parser *p, size_t pos, const char *expected)
{
    char found[48];
    describe_at(p, pos, found, sizeof found);
    return fail_at(p, pos, "expected %s, found %s", expected, found);
}

static int oom(const parser *p)
{
    return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "%s: out of memory parsing JSON",
                     p->source ? p->source : "<json>");
}

static void skip_ws(parser *p)
{
    while (p->pos < p->len) {
        unsigned char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int parse_value(parser *p, json_value **out);

static int match_literal(parser *p, const char *lit)
{
    size_t n = strlen(lit);
    for (size_t i = 0; i < n; i++) {
        if (p->pos + i >= p->len || p->text[p->pos + i] != (unsigned char)lit[i]) {
            char expected[32];
            snprintf(expected, sizeof expected, "'%s'", lit);
            return fail_expected(p, p->pos + i, expected);
        }
    }
    p->pos += n;
    return LIBPERL_OK;
}

static int hex4(const parser *p, size_t pos, unsigned *out)
{
    unsigned v = 0;
    for (size_t i = 0; i < 4; i++) {
        if (pos + i >= p->len) return fail_expected(p, pos + i, "4 hex digits after \\u");
        unsigned c = p->text[pos + i];
        unsigned d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return fail_expected(p, pos + i, "4 hex digits after \\u");
        v = v * 16 + d;
    }
    *out = v;
    return LIBPERL_OK;
}

static size_t put_utf8(unsigned char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence at pos (RFC 3629: no overlongs, no
 * surrogates, <= U+10FFFF), or 0. */
static size_t utf8_seq_len(const unsigned char *s, size_t avail)
{
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c == 0xE0) { n = 3; lo = 0xA0; }
    else if (c >= 0xE1 && c <= 0xEC) n = 3;
    else if (c == 0xED) { n = 3; hi = 0x9F; }
    else if (c >= 0xEE && c <= 0xEF) n = 3;
    else if (c == 0xF0) { n = 4; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) n = 4;
    else if (c == 0xF4) { n = 4; hi = 0x8F; }
    else return 0;
    if (avail < n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return n;
}

/* Parses a string starting at the opening quote into arena memory. */
static int parse_string_raw(parser *p, const char **out, size_t *out_len)
{
    size_t start = p->pos + 1;
    /* Find the closing quote to size the output (decoded <= raw length). */
    size_t end = start;
    while (end < p->len && p->text[end] != '"') {
        if (p->text[end] == '\\') end++;
        end++;
    }
    if (end >= p->len) {
        /* Report the first real problem (control char, bad escape) if any. */
        end = p->len;
    }
    unsigned char *o = arena_alloc(p->doc, end - start + 1);
    if (o == NULL) return oom(p);
    size_t n = 0, i = start;
    for (;;) {
        if (i >= p->len) return fail_at(p, i, "unterminated string (expected '\"')");
        unsigned c = p->text[i];
        if (c == '"') break;
        if (c < 0x20) {
            return fail_at(p, i, "control character U+%04X in string (must be escaped)", c);
        }
        if (c == '\\') {
            if (i + 1 >= p->len) return fail_expected(p, i + 1, "an escape character");
            unsigned e = p->text[i + 1];
            unsigned char simple = 0;
            switch (e) {
            case '"': simple = '"'; break;
            case '\\': simple = '\\'; break;
            case '/': simple = '/'; break;
            case 'b': simple = '\b'; break;
            case 'f': simple = '\f'; break;
            case 'n': simple = '\n'; break;
            case 'r': simple = '\r'; break;
            case 't': simple = '\t'; break;
            case 'u': break;
            default:
                return fail_at(p, i, "invalid escape '\\%c' (expected one of \\\" \\\\ \\/ \\b \\f "
                                     "\\n \\r \\t \\uXXXX)",
                               (e >= 0x20 && e < 0x7f) ? (char)e : '?');
            }
            if (e != 'u') {
                o[n++] = simple;
                i += 2;
                continue;
            }
            unsigned cp = 0;
            PERL_TRY(hex4(p, i + 2, &cp));
            size_t esc_at = i;
            i += 6;
            if (cp >= 0xDC00 && cp <= 0xDFFF)
                return fail_at(p, esc_at, "lone low surrogate \\u%04X", cp);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (i + 1 >= p->len || p->text[i] != '\\' || p->text[i + 1] != 'u')
                    return fail_at(p, esc_at,
                                   "high surrogate \\u%04X not followed by a \\u low surrogate", cp);
                unsigned lo = 0;
                PERL_TRY(hex4(p, i + 2, &lo));
                if (lo < 0xDC00 || lo > 0xDFFF)
                    return fail_at(p, i, "expected a low surrogate (\\uDC00-\\uDFFF) after "
                                         "\\u%04X, found \\u%04X", cp, lo);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            }
            n += put_utf8(o + n, cp);
            continue;
        }
        size_t sl = utf8_seq_len(p->text + i, p->len - i);
        if (sl == 0) return fail_at(p, i, "invalid UTF-8 byte 0x%02X in string", c);
        memcpy(o + n, p->text + i, sl);
        n += sl;
        i += sl;
    }
    o[n] = '\0';
    p->pos = i + 1;
    *out = (const char *)o;
    *out_len = n;
    return LIBPERL_OK;
}

static int parse_number(parser *p, json_value *v)
{
    size_t start = p->pos, i = p->pos;
    const unsigned char *t = p->text;
    int integral = 1;
    if (i < p->len && t[i] == '-') i++;
    if (i >= p->len || t[i] < '0' || t[i] > '9') return fail_expected(p, i, "a digit");
    if (t[i] == '0') {
        i++;
        if (i < p->len && t[i] >= '0' && t[i] <= '9')
            return fail_at(p, start, "number with a leading zero");
    } else {
        while (i < p->len && t[i] >= '0' && t[i] <= '9') i++;
    }
    if (i < p->len && t[i] == '.') {
        integral = 0;
        i++;
        if (i >= p->len || t[i] < '0' || t[i] > '9')
            return fail_expected(p, i, "a digit after the decimal point");
        while (i < p->len && t[i] >= '0' && t[i] <= '9') i++;
    }
    if (i < p->len && (t[i] == 'e' || t[i] == 'E')) {
        integral = 0;
        i++;
        if (i < p->len && (t[i] == '+' || t[i] == '-')) i++;
        if (i >= p->len || t[i] < '0' || t[i] > '9')
            return fail_expected(p, i, "a digit in the exponent");
        while (i < p->len && t[i] >= '0' && t[i] <= '9') i++;
    }
    int ok = 0;
    double d = c_strtod((const char *)t + start, i - start, &ok);
    if (!ok) return oom(p);
    if (!isfinite(d)) return fail_at(p, start, "number out of range for a double");
    v->type = JSON_NUMBER;
    v->number = d;
    if (integral) {
        /* Exact int64 when it fits. */
        int neg = t[start] == '-';
        uint64_t mag = 0, limit = neg ? (uint64_t)INT64_MAX + 1u : (uint64_t)INT64_MAX;
        int fits = 1;
        for (size_t k = start + (size_t)neg; k < i; k++) {
            unsigned dgt = t[k] - '0';
            if (mag > (limit - dgt) / 10) {
                fits = 0;
                break;
            }
            mag = mag * 10 + dgt;
        }
        if (fits) {
            v->is_integer = 1;
            v->integer = neg ? (mag == (uint64_t)INT64_MAX + 1u ? INT64_MIN : -(int64_t)mag)
                             : (int64_t)mag;
        }
    }
    p->pos = i;
    return LIBPERL_OK;
}

static int key_cmp(const json_member *a, const json_member *b)
{
    size_t n = a->key_len < b->key_len ? a->key_len : b->key_len;
    int c = memcmp(a->key, b->key, n);
    if (c != 0) return c;
    return (a->key_len > b->key_len) - (a->key_len < b->key_len);
}

/* Stable merge sort of member indices by key. */
static void sort_members(const json_member *m, size_t *idx, size_t *tmp, size_t n)
{
    if (n < 2) return;
    size_t h = n / 2;
    sort_members(m, idx, tmp, h);
    sort_members(m, idx + h, tmp, n - h);
    size_t a = 0, b = h, o = 0;
    while (a < h && b < n) tmp[o++] = key_cmp(&m[idx[b]], &m[idx[a]]) < 0 ? idx[b++] : idx[a++];
    while (a < h) tmp[o++] = idx[a++];
    while (b < n) tmp[o++] = idx[b++];
    memcpy(idx, tmp, n * sizeof *idx);
}

/* Growable temporary vector (heap) used while a container is being parsed. */
typedef struct vec {
    void *data;
    size_t len, cap, elem;
} vec;

static int vec_push(vec *v, const void *item)
{
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        void *nd = perl_mem_alloc(cap * v->elem);
        if (nd == NULL) return -1;
        if (v->len) memcpy(nd, v->data, v->len * v->elem);
        perl_mem_free(v->data);
        v->data = nd;
        v->cap = cap;
    }
    memcpy((char *)v->data + v->len * v->elem, item, v->elem);
    v->len++;
    return 0;
}

static int parse_array(parser *p, json_value *v)
{
    p->pos++; /* '[' */
    vec items = {NULL, 0, 0, sizeof(json_value *)};
    int rc = LIBPERL_OK;
    skip_ws(p);
    if (p->pos < p->len && p->text[p->pos] == ']') {
        p->pos++;
    } else {
        for (;;) {
            json_value *item = NULL;
            rc = parse_value(p, &item);
            if (rc != LIBPERL_OK) goto done;
            if (vec_push(&items, &item) != 0) {
                rc = oom(p);
                goto done;
            }
            skip_ws(p);
            if (p->pos < p->len && p->text[p->pos] == ',') {
                p->pos++;
                continue;
            }
            if (p->pos < p->len && p->text[p->pos] == ']') {
                p->pos++;
                break;
            }
            rc = fail_expected(p, p->pos, "',' or ']' in array");
            goto done;
        }
    }
    v->type = JSON_ARRAY;
    v->count = items.len;
    if (items.len) {
        v->items = arena_alloc(p->doc, items.len * sizeof(json_value *));
        if (v->items == NULL) {
            rc = oom(p);
            goto done;
        }
        memcpy(v->items, items.data, items.len * sizeof(json_value *));
    }
done:
    perl_mem_free(items.data);
    return rc;
}

static int parse_object(parser *p, json_value *v)
{
    p->pos++; /* '{' */
    vec members = {NULL, 0, 0, sizeof(json_member)};
    vec key_pos = {NULL, 0, 0, sizeof(size_t)};
    size_t *tmp = NULL;
    int rc = LIBPERL_OK;
    skip_ws(p);
    if (p->pos < p->len && p->text[p->pos] == '}') {
        p->pos++;
    } else {
        for (;;) {
            skip_ws(p);
            if (p->pos >= p->len || p->text[p->pos] != '"') {
                rc = fail_expected(p, p->pos, "a string key in object");
                goto done;
            }
            json_member m;
            size_t kp = p->pos;
            rc = parse_string_raw(p, &m.key, &m.key_len);
            if (rc != LIBPERL_OK) goto done;
            skip_ws(p);
            if (p->pos >= p->len || p->text[p->pos] != ':') {
                rc = fail_expected(p, p->pos, "':' after object key");
                goto done;
            }
            p->pos++;
            rc = parse_value(p, &m.value);
            if (rc != LIBPERL_OK) goto done;
            if (vec_push(&members, &m) != 0 || vec_push(&key_pos, &kp) != 0) {
                rc = oom(p);
                goto done;
            }
            skip_ws(p);
            if (p->pos < p->len && p->text[p->pos] == ',') {
                p->pos++;
                continue;
            }
            if (p->pos < p->len && p->text[p->pos] == '}') {
                p->pos++;
                break;
            }
            rc = fail_expected(p, p->pos, "',' or '}' in object");
            goto done;
        }
    }
    v->type = JSON_OBJECT;
    v->count = members.len;
    if (members.len) {
        v->members = arena_alloc(p->doc, members.len * sizeof(json_member));
        v->sorted = arena_alloc(p->doc, members.len * sizeof(size_t));
        tmp = perl_mem_alloc(members.len * sizeof(size_t));
        if (v->members == NULL || v->sorted == NULL || tmp == NULL) {
            rc = oom(p);
            goto done;
        }
        memcpy(v->members, members.data, members.len * sizeof(json_member));
        for (size_t i = 0; i < members.len; i++) v->sorted[i] = i;
        sort_members(v->members, v->sorted, tmp, members.len);
        for (size_t i = 1; i < members.len; i++) {
            const json_member *a = &v->members[v->sorted[i - 1]];
            const json_member *b = &v->members[v->sorted[i]];
            if (key_cmp(a, b) == 0) {
                /* Stable sort: sorted[i] is the later occurrence. */
                size_t at = ((const size_t *)key_pos.data)[v->sorted[i]];
                rc = fail_at(p, at, "duplicate key \"%.100s\" in object", b->key);
                goto done;
            }
        }
    }
done:
    perl_mem_free(members.data);
    perl_mem_free(key_pos.data);
    perl_mem_free(tmp);
    return rc;
}

static int parse_value(parser *p, json_value **out)
{
    skip_ws(p);
    json_value *v = arena_alloc(p->doc, sizeof *v);
    if (v == NULL) return oom(p);
    memset(v, 0, sizeof *v);
    *out = v;
    if (p->pos >= p->len) return fail_expected(p, p->pos, "a value");
    unsigned c = p->text[p->pos];
    switch (c) {
    case '{':
    case '[': {
        if (p->depth >= JSON_MAX_DEPTH)
            return fail_at(p, p->pos, "nesting deeper than %d levels", JSON_MAX_DEPTH);
        p->depth++;
        int rc = c == '{' ? parse_object(p, v) : parse_array(p, v);
        p->depth--;
        return rc;
    }
    case '"':
        v->type = JSON_STRING;
        return parse_string_raw(p, &v->string, &v->string_len);
    case 't':
        v->type = JSON_BOOL;
        v->boolean = 1;
        return match_literal(p, "true");
    case 'f':
        v->type = JSON_BOOL;
        return match_literal(p, "false");
    case 'n':
        v->type = JSON_NULL;
        return match_literal(p, "null");
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, v);
        return fail_expected(p, p->pos, "a value (object, array, string, number, true, false "
                                        "or null)");
    }
}

int json_parse(json_doc **out, const char *text, size_t len, const char *source)
{
    PERL_CHECK_ARG(out != NULL, "json_parse: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(text != NULL || len == 0, "json_parse: text is NULL");
    json_doc *doc = perl_mem_calloc(1, sizeof *doc);
    if (doc == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "json_parse: out of memory");
    static const char empty[1] = "";
    parser p = {(const unsigned char *)(text ? text : empty), len, 0, 0, doc, source};
    if (len >= 3 && p.text[0] == 0xEF && p.text[1] == 0xBB && p.text[2] == 0xBF) p.pos = 3;
    int rc = parse_value(&p, &doc->root);
    if (rc == LIBPERL_OK) {
        skip_ws(&p);
        if (p.pos < p.len) rc = fail_expected(&p, p.pos, "end of input after the JSON value");
    }
    if (rc != LIBPERL_OK) {
        json_doc_free(doc);
        return rc;
    }
    *out = doc;
    return LIBPERL_OK;
}

/* ---- lookup -------------------------------------------------------------- */

const char *json_type_name(json_type type)
{
    switch (type) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "boolean";
    case JSON_NUMBER: return "number";
    case JSON_STRING: return "string";
    case JSON_ARRAY: return "array";
    case JSON_OBJECT: return "object";
    }
    return "unknown";
}

const json_value *json_get(const json_value *obj, const char *key)
{
    if (obj == NULL || obj->type != JSON_OBJECT || key == NULL) return NULL;
    json_member probe = {key, strlen(key), NULL};
    size_t lo = 0, hi = obj->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const json_member *m = &obj->members[obj->sorted[mid]];
        int c = key_cmp(m, &probe);
        if (c == 0) return m->value;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

size_t json_array_len(const json_value *arr)
{
    return (arr != NULL && arr->type == JSON_ARRAY) ? arr->count : 0;
}

const json_value *json_array_at(const json_value *arr, size_t i)
{
    if (arr == NULL || arr->type != JSON_ARRAY || i >= arr->count) return NULL;
    return arr->items[i];
}

int json_is_null(const json_value *v)
{
    return v != NULL && v->type == JSON_NULL;
}

int json_as_int64(const json_value *v, int64_t *out)
{
    if (v == NULL || v->type != JSON_NUMBER) return 0;
    if (v->is_integer) {
        *out = v->integer;
        return 1;
    }
    double d = v->number;
    /* Integral doubles inside (-2^63, 2^63). */
    if (d != floor(d) || d < -9223372036854775808.0 || d >= 9223372036854775808.0) return 0;
    *out = (int64_t)d;
    return 1;
}

int json_as_double(const json_value *v, double *out)
{
    if (v == NULL || v->type != JSON_NUMBER) return 0;
    *out = v->number;
    return 1;
}

int json_as_bool(const json_value *v, int *out)
{
    if (v == NULL || v->type != JSON_BOOL) return 0;
    *out = v->boolean;
    return 1;
}

const char *json_as_string(const json_value *v)
{
    return (v != NULL && v->type == JSON_STRING) ? v->string : NULL;
}

/* ---- writer -------------------------------------------------------------- */

void json_writer_init(json_writer *w, int pretty)
{
    memset(w, 0, sizeof *w);
    w->pretty = pretty;
}

void json_writer_free(json_writer *w)
{
    if (w == NULL) return;
    perl_mem_free(w->data);
    w->data = NULL;
    w->len = w->cap = 0;
}

static void w_fail(json_writer *w, int status, const char *what)
{
    if (!w->failed) w->failed = perl_fail(status, "JSON writer: %s", what);
}

void json_write_raw(json_writer *w, const char *s, size_t len)
{
    if (w->failed) return;
    if (w->len + len + 1 > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->len + len + 1) {
            if (cap > SIZE_MAX / 2) {
                w_fail(w, LIBPERL_ERR_OUT_OF_MEMORY, "document too large");
                return;
            }
            cap *= 2;
        }
        char *nd = perl_mem_alloc(cap);
        if (nd == NULL) {
            w_fail(w, LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
            return;
        }
        if (w->len) memcpy(nd, w->data, w->len);
        perl_mem_free(w->data);
        w->data = nd;
        w->cap = cap;
    }
    memcpy(w->data + w->len, s, len);
    w->len += len;
    w->data[w->len] = '\0';
}

static void w_puts(json_writer *w, const char *s)
{
    json_write_raw(w, s, strlen(s));
}

static void w_newline(json_writer *w)
{
    if (!w->pretty) return;
    w_puts(w, "\n");
    for (int i = 0; i < w->depth; i++) w_puts(w, "  ");
}

/* Separator before a value or key at the current level. */
static void w_before_value(json_writer *w)
{
    if (w->after_key) {
        w->after_key = 0;
        return;
    }
    if (w->depth == 0) {
        if (w->has_items[0]) w_fail(w, LIBPERL_ERR_INTERNAL, "more than one top-level value");
        w->has_items[0] = 1;
        return;
    }
    if (w->has_items[w->depth]) w_puts(w, ",");
    w->has_items[w->depth] = 1;
    w_newline(w);
}

static void w_begin(json_writer *w, const char *open)
{
    w_before_value(w);
    if (w->depth >= JSON_MAX_DEPTH) {
        w_fail(w, LIBPERL_ERR_INTERNAL, "nesting too deep");
        return;
    }
    w_puts(w, open);
    w->depth++;
    w->has_items[w->depth] = 0;
}

static void w_end(json_writer *w, const char *close)
{
    if (w->depth <= 0 || w->after_key) {
        w_fail(w, LIBPERL_ERR_INTERNAL, "unbalanced end of container");
        return;
    }
    int had = w->has_items[w->depth];
    w->depth--;
    if (had) w_newline(w);
    w_puts(w, close);
}

void json_write_object_begin(json_writer *w) { w_begin(w, "{"); }
void json_write_object_end(json_writer *w) { w_end(w, "}"); }
void json_write_array_begin(json_writer *w) { w_begin(w, "["); }
void json_write_array_end(json_writer *w) { w_end(w, "]"); }

static void w_quoted(json_writer *w, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    w_puts(w, "\"");
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char ubuf[7];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        default:
            if (c < 0x20 || c == 0x7f) {
                ubuf[0] = '\\';
                ubuf[1] = 'u';
                ubuf[2] = '0';
                ubuf[3] = '0';
                ubuf[4] = hex[c >> 4];
                ubuf[5] = hex[c & 15];
                ubuf[6] = '\0';
                esc = ubuf;
            }
        }
        if (esc == NULL) continue;
        json_write_raw(w, s + run, i - run);
        w_puts(w, esc);
        run = i + 1;
    }
    json_write_raw(w, s + run, len - run);
    w_puts(w, "\"");
}

void json_write_key(json_writer *w, const char *key)
{
    if (w->depth == 0 || w->after_key) {
        w_fail(w, LIBPERL_ERR_INTERNAL, "key outside an object");
        return;
    }
    w_before_value(w);
    w_quoted(w, key, strlen(key));
    w_puts(w, w->pretty ? ": " : ":");
    w->after_key = 1;
}

void json_write_string_n(json_writer *w, const char *s, size_t len)
{
    w_before_value(w);
    w_quoted(w, s, len);
}

void json_write_string(json_writer *w, const char *s)
{
    json_write_string_n(w, s, strlen(s));
}

void json_write_int(json_writer *w, int64_t v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", (long long)v);
    w_before_value(w);
    w_puts(w, buf);
}

/* printf %.*g with the locale's decimal point mapped back to '.'. */
static void format_g(char *buf, size_t n, int prec, double v)
{
    char tmp[64];
    snprintf(tmp, sizeof tmp, "%.*g", prec, v);
    const char *dp = localeconv()->decimal_point;
    size_t dpl = (dp && dp[0]) ? strlen(dp) : 0;
    size_t o = 0;
    for (size_t i = 0; tmp[i] && o + 1 < n;) {
        if (dpl && strncmp(tmp + i, dp, dpl) == 0) {
            buf[o++] = '.';
            i += dpl;
        } else {
            buf[o++] = tmp[i++];
        }
    }
    buf[o] = '\0';
}

static void write_shortest(json_writer *w, double v, int is_float)
{
    if (!isfinite(v)) {
        w_fail(w, LIBPERL_ERR_NUMERIC, "cannot write a non-finite number");
        return;
    }
    char buf[64];
    if (v == floor(v) && fabs(v) < 1e15) {
        /* Integral values as Python writes floats: "10000.0", not "1e+04". */
        format_g(buf, sizeof buf, 17, v);
        if (strchr(buf, 'e') == NULL) {
            if (strchr(buf, '.') == NULL) strcat(buf, ".0");
            w_before_value(w);
            w_puts(w, buf);
            return;
        }
    }
    int max_prec = is_float ? 9 : 17;
    for (int prec = 1; prec <= max_prec; prec++) {
        format_g(buf, sizeof buf, prec, v);
        int ok = 0;
        double back = c_strtod(buf, strlen(buf), &ok);
        if (!ok) break;
        if (is_float ? (float)back == (float)v : back == v) break;
    }
    w_before_value(w);
    w_puts(w, buf);
}

void json_write_float(json_writer *w, float v) { write_shortest(w, (double)v, 1); }
void json_write_double(json_writer *w, double v) { write_shortest(w, v, 0); }

void json_write_bool(json_writer *w, int v)
{
    w_before_value(w);
    w_puts(w, v ? "true" : "false");
}

void json_write_null(json_writer *w)
{
    w_before_value(w);
    w_puts(w, "null");
}

int json_writer_finish(json_writer *w)
{
    if (w->failed) return w->failed;
    if (w->depth != 0 || w->after_key || !w->has_items[0])
        return perl_fail(LIBPERL_ERR_INTERNAL, "JSON writer: document incomplete");
    if (w->data == NULL) w_puts(w, "");
    return w->failed;
}
