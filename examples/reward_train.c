/*
 * reward_train — trains reward models on real preference data with libperl
 * and compares LoRA with full fine-tuning: held-out accuracy (and AUC for
 * thumbs-up/down data), seconds per step and peak memory.
 *
 *   build/examples/reward_train                      # Taskmaster Coffee, LoRA and full
 *   build/examples/reward_train --data hh            # hh-rlhf harmless pairs
 *   build/examples/reward_train --help
 *
 * Data (under $PERL_SHARED_DIR, default ../shared):
 *   coffee  data/taskmaster-coffee/reward_*.json: pointwise (reward 1 / 0),
 *           trained with class-weighted BCE (perl_reward_step_pointwise)
 *   hh      data/hh-rlhf-harmless/test.jsonl.gz: chosen / rejected dialogs,
 *           trained with the Bradley-Terry loss (perl_reward_step_pairwise)
 *   --train-tokens FILE [--eval-tokens FILE]: examples already tokenised
 *           with any tokenizer (format in docs/reward-model.md), for use with
 *           --base pointing at the matching Hugging Face Llama checkpoint.
 * Text is tokenised by bytes (token = byte + 3, BOS 1, EOS 2, pad 0) and cut
 * from the left to fit --seq-len, so the response being judged survives.
 * Examples are split 80/20 into train / held-out by a hash of the
 * conversation id (hh: of the shared prompt), the same split on every run.
 *
 * The base model: --base DIR (default build/models/coffee-base) is loaded
 * when it exists; otherwise a small byte-level Llama is pretrained on the
 * Taskmaster dialogs (data/taskmaster-coffee/dialogs_*.json) with FULL-mode
 * SFT and saved there, so later runs reuse it.
 *
 * Each variant runs in its own child process, so that getrusage's peak RSS
 * measures that variant alone; the parent never touches the library (its
 * worker threads would not survive fork) and prints the comparison.
 * Only <libperl/libperl.h> is used.
 */
#define _POSIX_C_SOURCE 200809L /* fork, pipe, waitpid, clock_gettime, getrusage */

#include <libperl/libperl.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "byte_tokens.h"
#include "coffee_data.h"
#include "eval.h"
#include "json_lite.h"
#include "text_io.h"

#define BASE_CONTEXT 1024        /* the pretrained base's max_seq_len (RoPE tables only) */
#define EVAL_BATCH 32

/* ---- options ---------------------------------------------------------------------- */

typedef struct options {
    const char *data, *mode, *shared, *base, *train_tokens, *eval_tokens;
    int steps, batch, seq_len, threads, eval_max, log_every, recompute;
    int dim, layers, heads, kv_heads, hidden;
    int pretrain_steps, pretrain_batch, pretrain_seq;
    float pretrain_lr, lora_lr, full_lr, alpha;
    int rank;
    uint64_t seed;
} options;

static void options_default(options *o) {
    memset(o, 0, sizeof *o);
    const char *shared = getenv("PERL_SHARED_DIR");
    o->data = "coffee", o->mode = "both", o->shared = shared && *shared ? shared : "../shared";
    o->base = "build/models/coffee-base";
    o->steps = 150, o->batch = 0 /* 16 examples, or 8 pairs */, o->seq_len = 256, o->threads = 0;
    o->eval_max = 0, o->log_every = 0;
    o->dim = 64, o->layers = 4, o->heads = 4, o->kv_heads = 2, o->hidden = 176;
    o->pretrain_steps = 300, o->pretrain_batch = 16, o->pretrain_seq = 192, o->pretrain_lr = 3e-3f;
    o->rank = 8, o->alpha = 16.0f, o->lora_lr = 2e-3f, o->full_lr = 5e-4f;
    o->seed = 1;
}

static void usage(FILE *f) {
    fprintf(f, "usage: reward_train [options]\n"
               "  --data coffee|hh        data set (default coffee: pointwise; hh: pairwise)\n"
               "  --mode lora|full|both   what to train (default both, each in its own process)\n"
               "  --steps N               reward training steps (default 150)\n"
               "  --batch N               examples (coffee) or pairs (hh) per step (default 16 / 8)\n"
               "  --seq-len N             tokens per sequence, cut from the left (default 256)\n"
               "  --threads N             library threads (default 0: all cores)\n"
               "  --eval-max N            score at most N held-out examples (default all)\n"
               "  --recompute 0|1         recompute activations layer by layer in backward (default 0)\n"
               "  --rank N --alpha F      LoRA rank and alpha (default 8, 16; all seven projections)\n"
               "  --lora-lr F --full-lr F peak learning rates (default 2e-3, 5e-4; cosine, 10%% warmup)\n"
               "  --seed N                batch order and initialisation (default 1)\n"
               "  --log-every N           progress lines (default steps / 10)\n"
               "  --shared DIR            data root (default $PERL_SHARED_DIR or ../shared)\n"
               "  --base DIR              Hugging Face Llama directory; pretrained there if missing\n"
               "                          (default build/models/coffee-base)\n"
               "  --train-tokens FILE     pre-tokenised examples instead of --data (needs an existing --base)\n"
               "  --eval-tokens FILE      held-out examples for --train-tokens (default: hash split)\n"
               "base pretraining (only when --base does not exist yet):\n"
               "  --dim N --layers N --heads N --kv-heads N --hidden N   (default 64, 4, 4, 2, 176)\n"
               "  --pretrain-steps N --pretrain-batch N --pretrain-seq N --pretrain-lr F\n"
               "                          (default 300, 16, 192, 3e-3)\n");
}

/* Parses argv into o; returns 1 after --help, -1 on an error. */
static int parse_args(int argc, char **argv, options *o) {
    const ex_option table[] = {
        {"--steps", &o->steps, 1, 10000000, NULL, 0, 0, NULL},
        {"--batch", &o->batch, 1, 65536, NULL, 0, 0, NULL},
        {"--seq-len", &o->seq_len, 3, 1 << 20, NULL, 0, 0, NULL},
        {"--threads", &o->threads, 0, 4096, NULL, 0, 0, NULL},
        {"--eval-max", &o->eval_max, 0, 1 << 30, NULL, 0, 0, NULL},
        {"--log-every", &o->log_every, 0, 1 << 30, NULL, 0, 0, NULL},
        {"--recompute", &o->recompute, 0, 1, NULL, 0, 0, NULL},
        {"--rank", &o->rank, 1, 4096, NULL, 0, 0, NULL},
        {"--dim", &o->dim, 8, 65536, NULL, 0, 0, NULL},
        {"--layers", &o->layers, 1, 1024, NULL, 0, 0, NULL},
        {"--heads", &o->heads, 1, 1024, NULL, 0, 0, NULL},
        {"--kv-heads", &o->kv_heads, 1, 1024, NULL, 0, 0, NULL},
        {"--hidden", &o->hidden, 8, 1 << 20, NULL, 0, 0, NULL},
        {"--pretrain-steps", &o->pretrain_steps, 0, 10000000, NULL, 0, 0, NULL},
        {"--pretrain-batch", &o->pretrain_batch, 1, 65536, NULL, 0, 0, NULL},
        {"--pretrain-seq", &o->pretrain_seq, 3, 1 << 20, NULL, 0, 0, NULL},
        {"--alpha", NULL, 0, 0, &o->alpha, 1e-6f, 1e6f, NULL},
        {"--lora-lr", NULL, 0, 0, &o->lora_lr, 0.0f, 10.0f, NULL},
        {"--full-lr", NULL, 0, 0, &o->full_lr, 0.0f, 10.0f, NULL},
        {"--pretrain-lr", NULL, 0, 0, &o->pretrain_lr, 0.0f, 10.0f, NULL},
        {"--data", NULL, 0, 0, NULL, 0, 0, &o->data},
        {"--mode", NULL, 0, 0, NULL, 0, 0, &o->mode},
        {"--shared", NULL, 0, 0, NULL, 0, 0, &o->shared},
        {"--base", NULL, 0, 0, NULL, 0, 0, &o->base},
        {"--train-tokens", NULL, 0, 0, NULL, 0, 0, &o->train_tokens},
        {"--eval-tokens", NULL, 0, 0, NULL, 0, 0, &o->eval_tokens},
    };
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return usage(stdout), 1;
        int rc = ex_option_arg(table, sizeof table / sizeof table[0], &o->seed, argc, argv, &i);
        if (rc > 0) return usage(stderr), ex_fail("unknown option '%s'", argv[i]);
        if (rc) return -1;
    }
    if (strcmp(o->data, "coffee") != 0 && strcmp(o->data, "hh") != 0) return ex_fail("--data must be coffee or hh");
    if (strcmp(o->mode, "lora") != 0 && strcmp(o->mode, "full") != 0 && strcmp(o->mode, "both") != 0)
        return ex_fail("--mode must be lora, full or both");
    if (o->eval_tokens && !o->train_tokens) return ex_fail("--eval-tokens needs --train-tokens");
    return 0;
}

/* ---- data sets -------------------------------------------------------------------- */

typedef struct example {
    int32_t *tokens[2]; /* pointwise: [0]; pairwise: chosen, rejected */
    int32_t length[2];
    float label; /* pointwise: 0 or 1 */
    int held_out;
    int truncated;
} example;

typedef struct dataset {
    example *items;
    int n, cap, pairwise;
} dataset;

static void dataset_free(dataset *d) {
    for (int i = 0; i < d->n; i++) free(d->items[i].tokens[0]), free(d->items[i].tokens[1]);
    free(d->items);
    memset(d, 0, sizeof *d);
}

static example *dataset_add(dataset *d) {
    if (d->n == d->cap) {
        int cap = d->cap ? 2 * d->cap : 256;
        example *p = realloc(d->items, (size_t)cap * sizeof *p);
        if (!p) return NULL;
        d->items = p, d->cap = cap;
    }
    example *e = &d->items[d->n++];
    memset(e, 0, sizeof *e);
    return e;
}

/* Byte-tokenises text into side `side` of e (BOS + tail + EOS). */
static int set_text(example *e, int side, const char *text, size_t n, int seq_len) {
    e->tokens[side] = malloc((size_t)seq_len * sizeof(int32_t));
    if (!e->tokens[side]) return ex_fail("out of memory");
    e->length[side] = byte_tokens_encode_tail(text, n, e->tokens[side], seq_len);
    e->truncated |= n + 2 > (size_t)seq_len;
    return 0;
}

/* A Taskmaster Coffee record: its rendered context and generation, labelled by the reward. */
typedef struct load_ctx {
    const options *o;
    dataset *d;
} load_ctx;

static int coffee_example(void *ctx, ex_buf *text, size_t context_len, float label, int held_out) {
    const load_ctx *c = ctx;
    (void)context_len;
    example *e = dataset_add(c->d);
    if (!e) return ex_fail("out of memory");
    e->label = label;
    e->held_out = held_out;
    return set_text(e, 0, text->data, text->len, c->o->seq_len);
}

/* Taskmaster Coffee reward_00.json, reward_01.json, ... (until one is missing). */
static int load_coffee(const options *o, dataset *d) {
    load_ctx c = {o, d};
    return coffee_load_rewards(o->shared, coffee_example, &c);
}

/* hh-rlhf's "\n\nHuman: " / "\n\nAssistant: " turns as "user: " / "agent: " lines,
 * the speaker names the base model was pretrained with. */
static int hh_render(const char *s, size_t n, ex_buf *out) {
    static const struct {
        const char *from, *to;
    } roles[] = {{"\n\nHuman: ", "\nuser: "}, {"\n\nAssistant: ", "\nagent: "}};
    size_t i = 0;
    while (i < n) {
        size_t k = 0;
        while (k < 2 && strncmp(s + i, roles[k].from, strlen(roles[k].from)) != 0) k++;
        if (k < 2) {
            if (ex_buf_puts(out, out->len ? roles[k].to : roles[k].to + 1) != 0) return -1;
            i += strlen(roles[k].from);
        } else {
            if (ex_buf_append(out, s + i, 1) != 0) return -1;
            i++;
        }
    }
    return ex_buf_append(out, "", 0);
}

static int hh_record(const jl_value *rec, const char *where, dataset *d, int seq_len) {
    const jl_value *chosen = jl_get(rec, "chosen"), *rejected = jl_get(rec, "rejected");
    if (rec->type != JL_OBJECT || !chosen || chosen->type != JL_STRING || !rejected || rejected->type != JL_STRING)
        return ex_fail("%s: expected an object with strings \"chosen\" and \"rejected\"", where);
    /* the group is the prompt: everything before the last assistant turn */
    size_t prompt = chosen->length;
    for (size_t i = 0; i + 12 <= chosen->length; i++)
        if (memcmp(chosen->string + i, "\n\nAssistant:", 12) == 0) prompt = i;
    ex_buf c = {NULL, 0, 0}, r = {NULL, 0, 0};
    int rc =
        hh_render(chosen->string, chosen->length, &c) == 0 && hh_render(rejected->string, rejected->length, &r) == 0
            ? 0
            : ex_fail("out of memory");
    example *e = rc == 0 ? dataset_add(d) : NULL;
    if (rc == 0 && !e) rc = ex_fail("out of memory");
    if (rc == 0) {
        e->held_out = coffee_held_out(chosen->string, prompt);
        rc = set_text(e, 0, c.data, c.len, seq_len);
        if (rc == 0) rc = set_text(e, 1, r.data, r.len, seq_len);
    }
    ex_buf_free(&c);
    ex_buf_free(&r);
    return rc;
}

static int load_hh(const options *o, dataset *d) {
    char path[4096], err[512];
    snprintf(path, sizeof path, "%s/data/hh-rlhf-harmless/test.jsonl.gz", o->shared);
    char *text;
    size_t len;
    if (ex_read_gzip(path, &text, &len, err, sizeof err) != 0) return ex_fail("%s", err);
    d->pairwise = 1;
    int rc = 0, line = 0;
    for (size_t pos = 0; rc == 0 && pos < len; line++) {
        char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len;
        if (end > pos) { /* blank lines are allowed (a trailing newline) */
            char source[4200];
            jl_value *rec;
            snprintf(source, sizeof source, "%s: line %d", path, line + 1);
            rc = jl_parse(text + pos, end - pos, source, &rec, err, sizeof err) != 0
                     ? ex_fail("%s", err)
                     : hh_record(rec, source, d, o->seq_len);
            jl_free(rec); /* NULL when the parse failed */
        }
        pos = end + 1;
    }
    free(text);
    return rc;
}

/* ---- token files -----------------------------------------------------------------
 * One example per line; '#' starts a comment line; blank lines are skipped.
 *   pointwise:  <label 0|1>: <id> <id> ...
 *   pairwise:   <chosen ids> | <rejected ids>
 * Every line of a file has the same kind.  A sequence longer than --seq-len
 * keeps its first token (BOS) and its last seq_len - 1 tokens. */

typedef struct token_ctx {
    dataset *d;
    int held_out, seq_len;
} token_ctx;

static int token_line(void *ctx, const char *s, const char *end, const char *where) {
    const token_ctx *c = ctx;
    dataset *d = c->d;
    int held_out = c->held_out, seq_len = c->seq_len;
    const char *bar = memchr(s, '|', (size_t)(end - s)), *colon = memchr(s, ':', (size_t)(end - s));
    int pairwise = bar != NULL;
    if (!pairwise && !colon) return ex_fail("%s: expected '<label>: ids' or 'ids | ids'", where);
    if (d->n > 0 && pairwise != d->pairwise) return ex_fail("%s: pointwise and pairwise lines are mixed", where);
    d->pairwise = pairwise;
    example *e = dataset_add(d);
    if (!e) return ex_fail("out of memory");
    e->held_out = held_out >= 0 ? held_out : coffee_held_out(s, (size_t)(end - s));
    if (pairwise)
        return coffee_parse_ids(s, bar, seq_len, &e->tokens[0], &e->length[0], &e->truncated, where) ||
                       coffee_parse_ids(bar + 1, end, seq_len, &e->tokens[1], &e->length[1], &e->truncated, where)
                   ? -1
                   : 0;
    char *stop;
    long label = strtol(s, &stop, 10);
    while (stop < colon && (*stop == ' ' || *stop == '\t')) stop++;
    if (stop != colon || (label != 0 && label != 1)) return ex_fail("%s: the label before ':' must be 0 or 1", where);
    e->label = (float)label;
    return coffee_parse_ids(colon + 1, end, seq_len, &e->tokens[0], &e->length[0], &e->truncated, where);
}

/* held_out: 1 / 0 for every line, or -1 for the hash split. */
static int load_token_file(const char *path, int held_out, int seq_len, dataset *d) {
    token_ctx c = {d, held_out, seq_len};
    int rc = coffee_token_lines(path, token_line, &c);
    if (rc == 0 && d->n == 0) rc = ex_fail("%s: no examples", path);
    return rc;
}

static int load_data(const options *o, dataset *d) {
    if (o->train_tokens) {
        if (load_token_file(o->train_tokens, o->eval_tokens ? 0 : -1, o->seq_len, d) != 0) return -1;
        return o->eval_tokens ? load_token_file(o->eval_tokens, 1, o->seq_len, d) : 0;
    }
    return strcmp(o->data, "hh") == 0 ? load_hh(o, d) : load_coffee(o, d);
}

/* Largest token id of the set (checked against the model's vocabulary up front). */
static int32_t max_token(const dataset *d) {
    int32_t m = 0;
    for (int i = 0; i < d->n; i++)
        for (int s = 0; s < 2; s++)
            for (int t = 0; t < d->items[i].length[s]; t++)
                m = d->items[i].tokens[s][t] > m ? d->items[i].tokens[s][t] : m;
    return m;
}

/* ---- batches ---------------------------------------------------------------------- */

/* Side `side` of examples idx[0..count) as a batch padded to its longest row; their labels
 * into labels when not NULL. */
static perl_batch *batch_fill(ex_batch_buf *b, float *labels, const dataset *d, const int *idx, int count, int side) {
    int seq = 1;
    for (int i = 0; i < count; i++) seq = d->items[idx[i]].length[side] > seq ? d->items[idx[i]].length[side] : seq;
    if (ex_batch_begin(b, count, seq) != 0) return NULL;
    for (int i = 0; i < count; i++) {
        const example *e = &d->items[idx[i]];
        ex_batch_put(b, i, e->tokens[side], e->length[side]);
        if (labels) labels[i] = e->label;
    }
    return &b->batch;
}

/* ---- pretraining the base ---------------------------------------------------------- */

typedef struct corpus {
    int32_t **rows;
    int *lengths;
    int n, cap;
    long skipped_annotations;
} corpus;

static void corpus_free(corpus *c) {
    for (int i = 0; i < c->n; i++) free(c->rows[i]);
    free(c->rows);
    free(c->lengths);
}

/* The value of the annotation named `name` with context `context`, or NULL. */
static const char *annotation(const jl_value *anns, const char *name, const char *context) {
    for (size_t i = 0; i < anns->count; i++) {
        const char *n = jl_string(jl_get(anns->items[i], "name")), *c = jl_string(jl_get(anns->items[i], "context"));
        if (n && c && strcmp(n, name) == 0 && strcmp(c, context) == 0)
            return jl_string(jl_get(anns->items[i], "value"));
    }
    return NULL;
}

/* "<prefix>{"<name>":<json>}\n" with json re-written compactly, as the reward
 * data writes API turns.  Annotation values are free text: a malformed one is
 * skipped (and counted), not an error. */
static int api_line(const char *prefix, const char *name, const char *json, ex_buf *out, corpus *c) {
    jl_value *v;
    char err[256];
    if (!name || !json || jl_parse(json, strlen(json), "annotation", &v, err, sizeof err) != 0) {
        c->skipped_annotations++;
        return 0;
    }
    jl_value key = {JL_STRING, 0, 0, (char *)name, strlen(name), NULL, NULL, 0};
    int ok = ex_buf_puts(out, prefix) == 0 && ex_buf_puts(out, "{") == 0 && jl_write(&key, out) == 0 &&
             ex_buf_puts(out, ":") == 0 && jl_write(v, out) == 0 && ex_buf_puts(out, "}\n") == 0;
    jl_free(v);
    return ok ? 0 : ex_fail("out of memory");
}

/* The API calls annotated on an utterance, in order: a call, then its response. */
static int render_annotations(const jl_value *anns, ex_buf *out, corpus *c) {
    if (!anns || anns->type != JL_ARRAY) return 0;
    for (size_t i = 0; i < anns->count; i++) {
        const char *n = jl_string(jl_get(anns->items[i], "name")), *ctx = jl_string(jl_get(anns->items[i], "context"));
        const char *value = jl_string(jl_get(anns->items[i], "value"));
        if (!n || !ctx) continue;
        int rc = 0;
        if (strcmp(n, "request") == 0)
            rc = api_line("agent: api ", annotation(anns, "api_call", ctx), value, out, c);
        else if (strcmp(n, "response") == 0)
            rc = api_line("api: ", annotation(anns, "api_response", ctx), value, out, c);
        if (rc) return rc;
    }
    return 0;
}

/* A dialog as "user: ..." / "agent: ..." lines with its API calls. */
static int render_dialog(const jl_value *dialog, ex_buf *out, const char *where, corpus *c) {
    const jl_value *utts = jl_get(dialog, "utterances");
    if (!utts || utts->type != JL_ARRAY) return ex_fail("%s: missing array \"utterances\"", where);
    for (size_t u = 0; u < utts->count; u++) {
        const jl_value *utt = utts->items[u];
        const char *speaker = jl_string(jl_get(utt, "speaker")), *text = jl_string(jl_get(utt, "text"));
        if (!speaker || !text) return ex_fail("%s: utterance %zu needs string \"speaker\" and \"text\"", where, u);
        int user = strcmp(speaker, "user") == 0;
        if (!user && strcmp(speaker, "assistant") != 0)
            return ex_fail("%s: utterance %zu: unknown speaker \"%.40s\"", where, u, speaker);
        /* API calls follow the user's request and precede the agent's reply */
        if (!user && render_annotations(jl_get(utt, "annotations"), out, c) != 0) return -1;
        if (ex_buf_puts(out, user ? "user: " : "agent: ") || ex_buf_puts(out, text) || ex_buf_puts(out, "\n"))
            return ex_fail("out of memory");
        if (user && render_annotations(jl_get(utt, "annotations"), out, c) != 0) return -1;
    }
    return 0;
}

static int corpus_add(corpus *c, const ex_buf *text) {
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 1024;
        int32_t **rows = realloc(c->rows, (size_t)cap * sizeof *rows);
        if (rows) c->rows = rows;
        int *lengths = rows ? realloc(c->lengths, (size_t)cap * sizeof *lengths) : NULL;
        if (lengths) c->lengths = lengths;
        if (!rows || !lengths) return ex_fail("out of memory");
        c->cap = cap;
    }
    int n = (int)text->len + 2;
    if ((c->rows[c->n] = malloc((size_t)n * sizeof(int32_t))) == NULL) return ex_fail("out of memory");
    c->lengths[c->n] = byte_tokens_encode_tail(text->data, text->len, c->rows[c->n], n);
    c->n++;
    return 0;
}

static int dialog_item(void *ctx, const jl_value *item, const char *where) {
    corpus *c = ctx;
    ex_buf dialog = {NULL, 0, 0};
    int rc = render_dialog(item, &dialog, where, c);
    if (rc == 0 && dialog.len > 0) rc = corpus_add(c, &dialog);
    ex_buf_free(&dialog);
    return rc;
}

static int load_dialogs(const options *o, corpus *c) {
    int files;
    if (coffee_for_each(o->shared, "dialogs", "dialog", dialog_item, c, &files) != 0) return -1;
    if (c->n == 0) return ex_fail("no dialogs in %s/data/taskmaster-coffee/dialogs_*.json", o->shared);
    return 0;
}

/* A random window of `seq` tokens from a random dialog (shorter dialogs whole). */
static void sample_window(const corpus *c, uint64_t *rng, int seq, int32_t *row, int32_t *length) {
    int d = (int)(ex_rng_next(rng) % (uint64_t)c->n), n = c->lengths[d];
    int start = n > seq ? (int)(ex_rng_next(rng) % (uint64_t)(n - seq + 1)) : 0;
    int len = n - start < seq ? n - start : seq;
    memcpy(row, c->rows[d] + start, (size_t)len * sizeof(int32_t));
    for (int t = len; t < seq; t++) row[t] = BYTE_TOKEN_PAD;
    *length = len;
}

/* FULL-mode SFT of a random byte-level Llama on the dialogs, saved as an HF directory. */
static int pretrain(const options *o, void *result) {
    (void)result;
    perl_set_num_threads(o->threads);
    corpus c = {NULL, NULL, 0, 0, 0};
    double t0 = ex_now_seconds();
    if (o->pretrain_steps > 0) { /* 0 steps saves the random initialisation (for timing larger shapes) */
        if (load_dialogs(o, &c) != 0) return corpus_free(&c), -1;
        long bytes = 0;
        for (int i = 0; i < c.n; i++) bytes += c.lengths[i];
        printf("pretrain: %d dialogs, %.1f MB of text (%ld malformed API annotations skipped), read in %.1f s\n", c.n,
               bytes / 1e6, c.skipped_annotations, ex_now_seconds() - t0);
    }

    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = o->dim, cfg.hidden_dim = o->hidden, cfg.n_layers = o->layers, cfg.n_heads = o->heads;
    cfg.n_kv_heads = o->kv_heads, cfg.vocab_size = BYTE_TOKEN_VOCAB, cfg.max_seq_len = BASE_CONTEXT;
    cfg.tied_embeddings = 1, cfg.bos_token_id = BYTE_TOKEN_BOS, cfg.eos_token_id = BYTE_TOKEN_EOS;
    perl_model *model = NULL;
    perl_lora *lora = NULL;
    int rc = -1, B = o->pretrain_batch, seq = o->pretrain_seq < BASE_CONTEXT ? o->pretrain_seq : BASE_CONTEXT;
    int32_t *tokens = malloc((size_t)B * seq * sizeof(int32_t)), *lengths = malloc((size_t)B * sizeof(int32_t));
    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.mode = LIBPERL_MODE_FULL, lo.train_embeddings = 1;
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = o->pretrain_lr, opt.schedule = LIBPERL_LR_COSINE, opt.warmup_steps = o->pretrain_steps / 20;
    opt.total_steps = o->pretrain_steps, opt.min_lr_ratio = 0.1f, opt.weight_decay = 0.01f;
    if (!tokens || !lengths)
        ex_fail("out of memory");
    else if (perl_model_create_random(&model, &cfg, o->seed) != 0 || perl_lora_create(&lora, model, &lo) != 0 ||
             perl_lora_set_optimizer(lora, &opt) != 0)
        ex_fail("creating the base: %s", perl_last_error());
    else
        rc = 0;
    printf("pretrain: dim %d, %d layers, %d heads (%d kv), hidden %d, vocab %d: %zu parameters; %d steps of %d x %d "
           "tokens\n",
           cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size,
           model ? perl_model_num_params(model) : 0, o->pretrain_steps, B, seq);
    uint64_t rng = o->seed * 0x9e3779b97f4a7c15ull + 1;
    double loss_avg = 0.0, t_start = ex_now_seconds();
    for (int s = 0; rc == 0 && s < o->pretrain_steps; s++) {
        for (int b = 0; b < B; b++) sample_window(&c, &rng, seq, tokens + (size_t)b * seq, lengths + b);
        perl_batch batch;
        perl_batch_init(&batch);
        batch.batch_size = B, batch.seq_len = seq, batch.tokens = tokens, batch.lengths = lengths;
        perl_step_stats st;
        perl_step_stats_init(&st);
        if (perl_lora_sft_step(lora, &batch, NULL, &st) != 0) {
            rc = ex_fail("pretraining step %d: %s", s + 1, perl_last_error());
            break;
        }
        loss_avg = s == 0 ? st.loss : 0.9 * loss_avg + 0.1 * st.loss;
        int every = o->pretrain_steps >= 10 ? o->pretrain_steps / 10 : 1;
        if ((s + 1) % every == 0 || s + 1 == o->pretrain_steps)
            printf("pretrain: step %4d/%d  loss %.3f (%.2f bits/byte)  next-byte acc %.2f  %.2f s/step\n", s + 1,
                   o->pretrain_steps, loss_avg, loss_avg / log(2.0), (double)st.accuracy,
                   (ex_now_seconds() - t_start) / (s + 1));
        fflush(stdout);
    }
    char err[512];
    if (rc == 0 && ex_mkdir_p(o->base, err, sizeof err) != 0) rc = ex_fail("%s", err);
    if (rc == 0 && perl_lora_save(lora, o->base) != 0) rc = ex_fail("saving %s: %s", o->base, perl_last_error());
    if (rc == 0) printf("pretrain: saved the base model to %s (%.0f s)\n", o->base, ex_now_seconds() - t0);
    free(tokens);
    free(lengths);
    perl_lora_free(lora);
    perl_model_free(model);
    corpus_free(&c);
    return rc;
}

/* ---- one reward-model variant -------------------------------------------------------- */

typedef struct variant_result {
    int full;
    size_t trainable;
    double seconds_per_step, eval_seconds, accuracy, auc, majority, mean_margin, last_loss;
    double peak_rss_mb;  /* the whole process (getrusage) */
    double start_rss_mb; /* resident when training starts: base model, data set, runtime */
    double train_hwm_mb; /* peak resident from training start to the end (NaN if not measurable) */
    int n_train, n_eval, steps, threads, batch;
} variant_result;

typedef struct split {
    int *train, *eval;
    int n_train, n_eval, n_truncated;
} split;

static int make_split(const dataset *d, int eval_max, split *s) {
    memset(s, 0, sizeof *s);
    s->train = malloc((size_t)d->n * sizeof(int));
    s->eval = malloc((size_t)d->n * sizeof(int));
    if (!s->train || !s->eval) return ex_fail("out of memory");
    for (int i = 0; i < d->n; i++) {
        if (d->items[i].held_out) {
            if (!eval_max || s->n_eval < eval_max) s->eval[s->n_eval++] = i;
        } else {
            s->train[s->n_train++] = i;
        }
        s->n_truncated += d->items[i].truncated;
    }
    if (s->n_train == 0 || s->n_eval == 0)
        return ex_fail("the split left %d train and %d held-out examples", s->n_train, s->n_eval);
    return 0;
}

/* Held-out metrics: pointwise accuracy / AUC / majority baseline; pairwise accuracy / margin. */
static int evaluate(perl_reward *rw, const dataset *d, const split *sp, variant_result *res) {
    ex_batch_buf b;
    memset(&b, 0, sizeof b);
    float scores[2][EVAL_BATCH];
    int rc = 0;
    ex_scored *all = malloc((size_t)sp->n_eval * sizeof *all);
    if (!all) return ex_fail("out of memory");
    double t0 = ex_now_seconds(), right = 0.0, margin = 0.0, positives = 0.0;
    for (int first = 0; rc == 0 && first < sp->n_eval; first += EVAL_BATCH) {
        int count = sp->n_eval - first < EVAL_BATCH ? sp->n_eval - first : EVAL_BATCH;
        for (int s = 0; rc == 0 && s <= d->pairwise; s++) {
            perl_batch *batch = batch_fill(&b, NULL, d, sp->eval + first, count, s);
            if (!batch)
                rc = -1;
            else if (perl_reward_score(rw, batch, scores[s]) != 0)
                rc = ex_fail("scoring: %s", perl_last_error());
        }
        for (int i = 0; rc == 0 && i < count; i++) {
            const example *e = &d->items[sp->eval[first + i]];
            if (d->pairwise) {
                right += scores[0][i] > scores[1][i];
                margin += scores[0][i] - scores[1][i];
            } else {
                right += (scores[0][i] > 0.0f) == (e->label != 0.0f);
                margin += scores[0][i];
                positives += e->label;
                all[first + i].score = scores[0][i], all[first + i].label = e->label;
            }
        }
    }
    if (rc == 0) {
        res->eval_seconds = ex_now_seconds() - t0;
        res->accuracy = right / sp->n_eval;
        res->mean_margin = margin / sp->n_eval;
        res->auc = d->pairwise ? NAN : ex_roc_auc(all, sp->n_eval);
        double p = positives / sp->n_eval;
        res->majority = d->pairwise ? 0.5 : (p > 0.5 ? p : 1.0 - p);
    }
    ex_batch_buf_free(&b);
    free(all);
    return rc;
}

/* Builds the reward model: adapter, objective (class weights from the training split), optimizer. */
static int make_reward(const options *o, int full, perl_model *m, const dataset *d, const split *sp, perl_lora **lora,
                       perl_reward **rw) {
    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.mode = full ? LIBPERL_MODE_FULL : LIBPERL_MODE_LORA;
    lo.rank = o->rank, lo.alpha = o->alpha, lo.target_modules = LIBPERL_TARGET_ALL, lo.seed = o->seed;
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.seed = o->seed;
    if (d->pairwise) {
        ro.objective = LIBPERL_REWARD_PAIRWISE;
        ro.center_coef = 0.01f; /* keeps scores near 0 without changing their order */
    } else {
        double pos = 0.0;
        for (int i = 0; i < sp->n_train; i++) pos += d->items[sp->train[i]].label;
        double n = sp->n_train, neg = n - pos;
        if (pos == 0.0 || neg == 0.0) return ex_fail("the training split has only one class");
        ro.objective = LIBPERL_REWARD_POINTWISE;
        ro.pos_weight = (float)(n / (2.0 * pos)); /* balanced: each class weighs half */
        ro.neg_weight = (float)(n / (2.0 * neg));
    }
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = full ? o->full_lr : o->lora_lr, opt.schedule = LIBPERL_LR_COSINE, opt.warmup_steps = o->steps / 10;
    opt.total_steps = o->steps, opt.min_lr_ratio = 0.1f;
    if (perl_lora_create(lora, m, &lo) != 0 || perl_reward_create(rw, m, *lora, &ro) != 0 ||
        perl_lora_set_optimizer(*lora, &opt) != 0 || perl_lora_set_recompute(*lora, o->recompute) != 0)
        return ex_fail("creating the reward model: %s", perl_last_error());
    return 0;
}

/* Trains for o->steps, timing each step (the first, which allocates the workspace, is excluded). */
static int train(const options *o, perl_reward *rw, const dataset *d, const split *sp, const char *tag,
                 variant_result *res) {
    int B = o->batch ? o->batch : d->pairwise ? 8 : 16;
    B = B < sp->n_train ? B : sp->n_train;
    res->batch = B;
    ex_batch_buf side[2];
    memset(side, 0, sizeof side);
    int *order = malloc((size_t)sp->n_train * sizeof(int));
    float *labels = malloc((size_t)B * sizeof(float));
    int rc = order && labels ? 0 : ex_fail("out of memory");
    uint64_t rng = o->seed * 0x2545f4914f6cdd1dull + 7;
    int pos = sp->n_train, every = o->log_every ? o->log_every : (o->steps >= 10 ? o->steps / 10 : 1);
    double timed = 0.0, loss_avg = 0.0, acc_avg = 0.0;
    for (int step = 0; rc == 0 && step < o->steps; step++) {
        if (pos + B > sp->n_train) { /* a new epoch */
            memcpy(order, sp->train, (size_t)sp->n_train * sizeof(int));
            ex_shuffle(order, sp->n_train, &rng);
            pos = 0;
        }
        perl_reward_stats st;
        perl_reward_stats_init(&st);
        perl_batch *a = batch_fill(&side[0], labels, d, order + pos, B, 0);
        if (!a) {
            rc = -1;
            break;
        }
        double t0 = ex_now_seconds();
        int status = d->pairwise ? perl_reward_step_pairwise(rw, a, batch_fill(&side[1], NULL, d, order + pos, B, 1),
                                                             NULL, NULL, NULL, &st)
                                 : perl_reward_step_pointwise(rw, a, labels, NULL, &st);
        double dt = ex_now_seconds() - t0;
        if (status != 0) {
            rc = ex_fail("step %d: %s", step + 1, perl_last_error());
            break;
        }
        if (step > 0) timed += dt;
        pos += B;
        loss_avg = step == 0 ? st.loss : 0.9 * loss_avg + 0.1 * st.loss;
        acc_avg = step == 0 ? st.accuracy : 0.9 * acc_avg + 0.1 * st.accuracy;
        if ((step + 1) % every == 0 || step + 1 == o->steps) {
            printf("  [%s] step %4d/%d  loss %.4f  train acc %.3f  grad norm %.3f  lr %.2e  %.3f s/step\n", tag,
                   step + 1, o->steps, loss_avg, acc_avg, (double)st.grad_norm, (double)st.lr,
                   step ? timed / step : dt);
            fflush(stdout);
        }
        res->last_loss = loss_avg;
    }
    res->steps = o->steps;
    res->seconds_per_step = o->steps > 1 ? timed / (o->steps - 1) : 0.0;
    for (int s = 0; s < 2; s++) ex_batch_buf_free(&side[s]);
    free(order);
    free(labels);
    return rc;
}

/* One variant, start to end, in its own process. */
static int run_variant(const options *o, int full, variant_result *res) {
    const char *tag = full ? "full" : "lora";
    memset(res, 0, sizeof *res);
    res->full = full;
    perl_set_num_threads(o->threads);
    res->threads = perl_get_num_threads();
    perl_model *m = NULL;
    perl_lora *lora = NULL;
    perl_reward *rw = NULL;
    dataset d = {NULL, 0, 0, 0};
    split sp = {NULL, NULL, 0, 0, 0};
    int rc = 0;
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    if (perl_model_load(&m, o->base) != 0 || perl_model_get_config(m, &cfg) != 0)
        rc = ex_fail("%s: %s", o->base, perl_last_error());
    else if (o->seq_len > cfg.max_seq_len)
        rc = ex_fail("--seq-len %d exceeds the base model's context %d", o->seq_len, cfg.max_seq_len);
    if (rc == 0) rc = load_data(o, &d);
    if (rc == 0 && max_token(&d) >= cfg.vocab_size)
        rc = ex_fail("token id %d is outside the base model's vocabulary (%d): tokenised for another model?",
                     max_token(&d), cfg.vocab_size);
    if (rc == 0) rc = make_split(&d, o->eval_max, &sp);
    res->start_rss_mb = ex_proc_status_mb("VmRSS");
    int hwm_reset = ex_reset_peak_rss() == 0;
    if (rc == 0) rc = make_reward(o, full, m, &d, &sp, &lora, &rw);
    if (rc == 0) {
        res->trainable = perl_lora_num_params(lora);
        res->n_train = sp.n_train, res->n_eval = sp.n_eval;
        printf("[%s] %s: %d train / %d held-out %s (%d cut to %d tokens); %zu trainable parameters "
               "(base %zu)\n",
               tag, o->train_tokens ? o->train_tokens : o->data, sp.n_train, sp.n_eval,
               d.pairwise ? "pairs" : "examples", sp.n_truncated, o->seq_len, res->trainable, perl_model_num_params(m));
        fflush(stdout);
        rc = train(o, rw, &d, &sp, tag, res);
    }
    if (rc == 0) rc = evaluate(rw, &d, &sp, res);
    res->peak_rss_mb = ex_peak_rss_mb();
    res->train_hwm_mb = hwm_reset ? ex_proc_status_mb("VmHWM") : NAN;
    if (rc == 0) {
        printf("[%s] held-out accuracy %.3f", tag, res->accuracy);
        if (!d.pairwise) printf(" (majority class %.3f), AUC %.3f", res->majority, res->auc);
        printf("; %.3f s/step; peak RSS %.1f MB (training: %.1f MB from %.1f MB at its start)\n", res->seconds_per_step,
               res->peak_rss_mb, res->train_hwm_mb, res->start_rss_mb);
    }
    perl_reward_free(rw);
    perl_lora_free(lora);
    perl_model_free(m);
    free(sp.train);
    free(sp.eval);
    dataset_free(&d);
    return rc;
}

static int run_lora(const options *o, void *result) { return run_variant(o, 0, result); }
static int run_full(const options *o, void *result) { return run_variant(o, 1, result); }

/* ---- processes ---------------------------------------------------------------------- */

/* Runs fn in a child process; its result struct comes back through a pipe. */
static int in_child(int (*fn)(const options *, void *), const options *o, void *result, size_t size) {
    int fds[2];
    if (pipe(fds) != 0) return ex_fail("pipe: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return ex_fail("fork: %s", strerror(errno));
    if (pid == 0) {
        close(fds[0]);
        int rc = fn(o, result);
        ssize_t w = rc == 0 && size ? write(fds[1], result, size) : 0;
        fflush(stdout);
        fflush(stderr);
        _exit(rc == 0 && (size_t)w == size ? 0 : 1);
    }
    close(fds[1]);
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fds[0], (char *)result + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fds[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return ex_fail("waitpid: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || got != size)
        return WIFSIGNALED(status) ? ex_fail("child killed by signal %d", WTERMSIG(status)) : -1;
    return 0;
}

static void print_summary(const options *o, const variant_result *r, int n) {
    printf("\nsummary (%s, %d steps, batch %d, seq-len %d, threads %d%s):\n",
           o->train_tokens ? o->train_tokens : o->data, o->steps, n ? r[0].batch : o->batch, o->seq_len,
           n ? r[0].threads : o->threads, o->recompute ? ", recompute" : "");
    printf("  %-5s %12s %8s %10s %11s %11s %9s %6s\n", "mode", "trainable", "s/step", "peak RSS", "train peak",
           "train added", "held-out", "AUC");
    for (int i = 0; i < n; i++)
        printf("  %-5s %12zu %8.3f %7.1f MB %8.1f MB %8.1f MB %9.3f %6.3f\n", r[i].full ? "full" : "lora",
               r[i].trainable, r[i].seconds_per_step, r[i].peak_rss_mb, r[i].train_hwm_mb,
               r[i].train_hwm_mb - r[i].start_rss_mb, r[i].accuracy, r[i].auc);
    if (n == 2)
        printf("  full / lora: %.1fx trainable parameters, %.2fx time per step, %.2fx peak RSS, %.2fx memory "
               "added by training\n",
               (double)r[1].trainable / (double)r[0].trainable, r[1].seconds_per_step / r[0].seconds_per_step,
               r[1].peak_rss_mb / r[0].peak_rss_mb,
               (r[1].train_hwm_mb - r[1].start_rss_mb) / (r[0].train_hwm_mb - r[0].start_rss_mb));
}

int main(int argc, char **argv) {
    options o;
    ex_program = "reward_train";
    options_default(&o);
    int rc = parse_args(argc, argv, &o);
    if (rc != 0) return rc > 0 ? 0 : 2;
    char config[4200];
    snprintf(config, sizeof config, "%s/config.json", o.base);
    if (!ex_path_exists(config)) {
        if (o.train_tokens) return ex_fail("--train-tokens needs an existing --base (the model the tokens are for)"), 1;
        printf(o.pretrain_steps ? "no base model at %s: pretraining one on the Taskmaster dialogs\n"
                                : "no base model at %s: saving a random one (--pretrain-steps 0)\n",
               o.base);
        if (in_child(pretrain, &o, NULL, 0) != 0) return 1;
    } else {
        printf("base model: %s\n", o.base);
    }
    variant_result results[2];
    int n = 0;
    if (strcmp(o.mode, "full") != 0) {
        if (in_child(run_lora, &o, &results[n], sizeof results[n]) != 0) return 1;
        n++;
    }
    if (strcmp(o.mode, "lora") != 0) {
        if (in_child(run_full, &o, &results[n], sizeof results[n]) != 0) return 1;
        n++;
    }
    print_summary(&o, results, n);
    return 0;
}
