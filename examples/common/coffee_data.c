/* Taskmaster Coffee records, the split, token files and batches for the examples (see coffee_data.h). */
#include "coffee_data.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "byte_tokens.h"
#include "eval.h"

int coffee_held_out(const char *key, size_t n) {
    return ex_hash64(key, n, COFFEE_SPLIT_SALT) % COFFEE_HELD_OUT_EVERY == 0;
}

int coffee_render_turn(const jl_value *turn, ex_buf *out, const char *where) {
    const char *role = jl_string(jl_get(turn, "role"));
    if (!role) return ex_fail("%s: a turn without a string \"role\"", where);
    const jl_value *text = jl_get(turn, "text"), *api = jl_get(turn, "api"), *response = jl_get(turn, "response");
    int ok = ex_buf_puts(out, role) == 0 && ex_buf_puts(out, ": ") == 0;
    if (text && text->type == JL_STRING)
        ok = ok && ex_buf_append(out, text->string, text->length) == 0;
    else if (api)
        ok = ok && ex_buf_puts(out, "api ") == 0 && jl_write(api, out) == 0;
    else if (response)
        ok = ok && jl_write(response, out) == 0;
    else
        return ex_fail("%s: a \"%s\" turn with no \"text\", \"api\" or \"response\"", where, role);
    return ok && ex_buf_puts(out, "\n") == 0 ? 0 : ex_fail("out of memory");
}

int coffee_parse_embedded(const jl_value *rec, const char *field, jl_type want, const char *where, jl_value **out) {
    const jl_value *s = jl_get(rec, field);
    char err[512], source[300];
    *out = NULL;
    if (!s || s->type != JL_STRING) return ex_fail("%s: \"%s\" must be a string (JSON-encoded)", where, field);
    snprintf(source, sizeof source, "%s \"%s\"", where, field);
    if (jl_parse(s->string, s->length, source, out, err, sizeof err) != 0) return ex_fail("%s", err);
    if ((*out)->type != want) {
        jl_type got = (*out)->type;
        jl_free(*out);
        *out = NULL;
        return ex_fail("%s: \"%s\" holds a %s, expected an %s", where, field, jl_type_name(got), jl_type_name(want));
    }
    return 0;
}

int coffee_for_each(const char *shared, const char *stem, const char *noun, coffee_item_fn fn, void *ctx, int *files) {
    char path[4096], err[512];
    *files = 0;
    for (int k = 0; k < 100; k++) {
        snprintf(path, sizeof path, "%s/data/taskmaster-coffee/%s_%02d.json", shared, stem, k);
        if (!ex_path_exists(path)) break;
        char *text;
        size_t len;
        jl_value *root;
        if (ex_read_file(path, &text, &len, err, sizeof err) != 0) return ex_fail("%s", err);
        int rc = jl_parse(text, len, path, &root, err, sizeof err);
        free(text);
        if (rc != 0) return ex_fail("%s", err);
        if (root->type != JL_ARRAY) rc = ex_fail("%s: expected a JSON array of %ss", path, noun);
        for (size_t i = 0; rc == 0 && i < root->count; i++) {
            char where[4200];
            snprintf(where, sizeof where, "%s: %s %zu", path, noun, i);
            rc = fn(ctx, root->items[i], where);
        }
        jl_free(root);
        if (rc != 0) return -1;
        (*files)++;
    }
    return 0;
}

typedef struct record_ctx {
    coffee_record_fn fn;
    void *ctx;
} record_ctx;

static int coffee_record(void *ctx, const jl_value *rec, const char *where) {
    const record_ctx *rc_ctx = ctx;
    if (rec->type != JL_OBJECT) return ex_fail("%s: expected an object", where);
    const char *id = jl_string(jl_get(rec, "conversation_id"));
    const jl_value *reward = jl_get(rec, "reward");
    if (!id) return ex_fail("%s: missing string \"conversation_id\"", where);
    if (!reward || reward->type != JL_NUMBER || (reward->number != 0.0 && reward->number != 1.0))
        return ex_fail("%s: \"reward\" must be the number 0 or 1", where);
    jl_value *context = NULL, *generation = NULL;
    if (coffee_parse_embedded(rec, "context", JL_ARRAY, where, &context) != 0) return -1;
    if (coffee_parse_embedded(rec, "generation", JL_OBJECT, where, &generation) != 0) return jl_free(context), -1;
    ex_buf text = {NULL, 0, 0};
    int rc = 0;
    for (size_t t = 0; rc == 0 && t < context->count; t++)
        rc = context->items[t]->type == JL_OBJECT ? coffee_render_turn(context->items[t], &text, where)
                                                   : ex_fail("%s: context turn %zu is not an object", where, t);
    size_t context_len = text.len;
    if (rc == 0) rc = coffee_render_turn(generation, &text, where);
    if (rc == 0)
        rc = rc_ctx->fn(rc_ctx->ctx, &text, context_len, (float)reward->number, coffee_held_out(id, strlen(id)));
    ex_buf_free(&text);
    jl_free(context);
    jl_free(generation);
    return rc;
}

int coffee_load_rewards(const char *shared, coffee_record_fn fn, void *ctx) {
    record_ctx c = {fn, ctx};
    int files = 0;
    if (coffee_for_each(shared, "reward", "record", coffee_record, &c, &files) != 0) return -1;
    if (files == 0)
        return ex_fail("%s/data/taskmaster-coffee/reward_00.json not found (set --shared or PERL_SHARED_DIR)", shared);
    return 0;
}

int coffee_token_lines(const char *path, coffee_line_fn fn, void *ctx) {
    char *text, err[512];
    size_t len;
    if (ex_read_file(path, &text, &len, err, sizeof err) != 0) return ex_fail("%s", err);
    int rc = 0, line = 0;
    for (size_t pos = 0; rc == 0 && pos < len; line++) {
        char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len, first = pos;
        while (first < end && (text[first] == ' ' || text[first] == '\t' || text[first] == '\r')) first++;
        if (first < end && text[first] != '#') {
            char where[4200];
            snprintf(where, sizeof where, "%s:%d", path, line + 1);
            rc = fn(ctx, text + first, text + end, where);
        }
        pos = end + 1;
    }
    free(text);
    return rc;
}

int coffee_parse_ids(const char *s, const char *end, int max_len, int32_t **out, int32_t *out_len, int *truncated,
                     const char *where) {
    int cap = 64, n = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) return ex_fail("out of memory");
    while (s < end) {
        while (s < end && (*s == ' ' || *s == '\t' || *s == '\r')) s++;
        if (s >= end) break;
        char *stop;
        errno = 0;
        long v = strtol(s, &stop, 10);
        if (stop == s || stop > end || errno || v < 0 || v > INT32_MAX) {
            int n_bad = 0; /* the offending word, for the message */
            while (s + n_bad < end && n_bad < 20 && s[n_bad] != ' ' && s[n_bad] != '\t' && s[n_bad] != '\r') n_bad++;
            free(ids);
            return ex_fail("%s: expected a non-negative token id, found '%.*s'", where, n_bad, s);
        }
        if (n == cap) {
            int32_t *p = realloc(ids, (size_t)(cap *= 2) * sizeof *ids);
            if (!p) return free(ids), ex_fail("out of memory");
            ids = p;
        }
        ids[n++] = (int32_t)v;
        s = stop;
    }
    if (n == 0) return free(ids), ex_fail("%s: an empty sequence", where);
    if (n > max_len) { /* keep the first token and the tail */
        memmove(ids + 1, ids + (n - (max_len - 1)), (size_t)(max_len - 1) * sizeof *ids);
        n = max_len;
        if (truncated) *truncated = 1;
    }
    *out = ids, *out_len = n;
    return 0;
}

uint64_t ex_rng_next(uint64_t *s) {
    *s ^= *s >> 12, *s ^= *s << 25, *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

void ex_shuffle(int *a, int n, uint64_t *rng) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(ex_rng_next(rng) % (uint64_t)(i + 1)), t = a[i];
        a[i] = a[j], a[j] = t;
    }
}

int ex_batch_begin(ex_batch_buf *b, int rows, int seq_len) {
    size_t need = (size_t)rows * (size_t)seq_len;
    if (need > b->cap_tokens) {
        int32_t *p = realloc(b->tokens, need * sizeof *p);
        if (!p) return ex_fail("out of memory");
        b->tokens = p, b->cap_tokens = need;
    }
    if (rows > b->cap_rows) {
        int32_t *p = realloc(b->lengths, (size_t)rows * sizeof *p);
        if (!p) return ex_fail("out of memory");
        b->lengths = p, b->cap_rows = rows;
    }
    for (size_t i = 0; i < need; i++) b->tokens[i] = BYTE_TOKEN_PAD;
    perl_batch_init(&b->batch);
    b->batch.batch_size = rows, b->batch.seq_len = seq_len, b->batch.tokens = b->tokens, b->batch.lengths = b->lengths;
    return 0;
}

void ex_batch_put(ex_batch_buf *b, int row, const int32_t *ids, int n) {
    memcpy(b->tokens + (size_t)row * b->batch.seq_len, ids, (size_t)n * sizeof *ids);
    b->lengths[row] = n;
}

void ex_batch_buf_free(ex_batch_buf *b) {
    free(b->tokens);
    free(b->lengths);
}
