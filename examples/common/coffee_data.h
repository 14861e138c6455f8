/*
 * Data helpers shared by the examples: Taskmaster Coffee JSON rendered as
 * text, the held-out split by a hash of the conversation id, token files,
 * a deterministic shuffle and padded token batches.  Functions that can fail
 * return 0 or -1 after a message (ex_fail, eval.h).
 */
#ifndef EXAMPLES_COFFEE_DATA_H
#define EXAMPLES_COFFEE_DATA_H

#include <libperl/libperl.h>

#include <stddef.h>
#include <stdint.h>

#include "json_lite.h"
#include "text_io.h"

#define COFFEE_SPLIT_SALT 0x5eedf00dull /* fixed: the split must not depend on --seed */
#define COFFEE_HELD_OUT_EVERY 5         /* 1 in 5 groups is held out */

/* 1 if the group named by key[0, n) is held out (the same on every run and in every example). */
int coffee_held_out(const char *key, size_t n);

/* "role: text", "role: api {...}" or "role: {...}" plus a newline. */
int coffee_render_turn(const jl_value *turn, ex_buf *out, const char *where);

/* Parses a field that holds JSON text (context / generation are JSON-encoded
 * strings); *out must be jl_free'd, and is NULL on failure. */
int coffee_parse_embedded(const jl_value *rec, const char *field, jl_type want, const char *where, jl_value **out);

/* Calls fn on each element of <shared>/data/taskmaster-coffee/<stem>_00.json,
 * _01.json, ... (until one is missing; each a JSON array), with where =
 * "<path>: <noun> <index>".  *files: how many files were read. */
typedef int (*coffee_item_fn)(void *ctx, const jl_value *item, const char *where);
int coffee_for_each(const char *shared, const char *stem, const char *noun, coffee_item_fn fn, void *ctx, int *files);

/* One reward record rendered: the context's turns, then the generation's, as
 * lines; text[0, context_len) is the context alone.  fn may change text (it
 * is freed afterwards). */
typedef int (*coffee_record_fn)(void *ctx, ex_buf *text, size_t context_len, float label, int held_out);

/* Every record of reward_*.json (an error when there is none), in order. */
int coffee_load_rewards(const char *shared, coffee_record_fn fn, void *ctx);

/* ---- token files: one sequence a line; '#' comment lines and blank lines skipped ---- */

/* Calls fn on each other line, s..end with leading blanks skipped and where = "<path>:<line>". */
typedef int (*coffee_line_fn)(void *ctx, const char *s, const char *end, const char *where);
int coffee_token_lines(const char *path, coffee_line_fn fn, void *ctx);

/* Space-separated non-negative ids of s..end into a malloc'd *out.  A sequence
 * longer than max_len keeps its first token (BOS) and its last max_len - 1
 * tokens, and sets *truncated (when not NULL). */
int coffee_parse_ids(const char *s, const char *end, int max_len, int32_t **out, int32_t *out_len, int *truncated,
                     const char *where);

/* ---- shuffling and batches ---- */

/* xorshift64*. */
uint64_t ex_rng_next(uint64_t *s);
/* Fisher-Yates with ex_rng_next. */
void ex_shuffle(int *a, int n, uint64_t *rng);

/* A growable rows x seq_len token batch. */
typedef struct ex_batch_buf {
    int32_t *tokens, *lengths;
    size_t cap_tokens;
    int cap_rows;
    perl_batch batch;
} ex_batch_buf;

/* Sizes b for rows x seq_len, filled with padding; rows are then set with ex_batch_put. */
int ex_batch_begin(ex_batch_buf *b, int rows, int seq_len);
void ex_batch_put(ex_batch_buf *b, int row, const int32_t *ids, int n);
void ex_batch_buf_free(ex_batch_buf *b);

#endif /* EXAMPLES_COFFEE_DATA_H */
