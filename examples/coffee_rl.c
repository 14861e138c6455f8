/*
 * coffee_rl — RLHF end to end on the Taskmaster Coffee data with libperl:
 * a LoRA reward model (thumbs up/down), then a LoRA policy trained with RLOO
 * (or REINFORCE) against it, KL-regularised toward the frozen base.
 *
 *   build/examples/coffee_rl                 # train the RM, then RL (defaults: a few minutes)
 *   build/examples/coffee_rl --quick         # a smoke run (about a minute on 2 idle cores)
 *   build/examples/coffee_rl --reward DIR    # reuse a reward model saved by an earlier run
 *   build/examples/coffee_rl --help
 *
 * Base: --base DIR, any Hugging Face Llama-family checkpoint directory
 * (config.json + safetensors); default build/models/coffee-base, the
 * byte-level base that examples/reward_train pretrains and caches.  This
 * example does not pretrain: if the base is missing it prints the
 * reward_train command that builds it and exits with status 1.
 *
 * Data: byte tokens (token = byte + 3, BOS 1, EOS 2, pad 0) of
 * $PERL_SHARED_DIR/data/taskmaster-coffee/reward_*.json, rendered exactly as
 * reward_train renders them ("user: ...", "agent: ...", "agent: api {...}",
 * "api: {...}" lines) and split 80/20 by a hash of conversation_id (the same
 * split as reward_train).  The RL prompts are the records' contexts followed
 * by "agent: ", so the policy writes the agent's next turn; a response ends
 * at a newline byte, EOS or --max-new tokens.  With a real tokenizer, pass
 * --rm-tokens / --prompt-tokens / --stop-ids instead (docs/real-data.md).
 *
 * Output (--out DIR, default build/coffee-rl): rl.csv (one line per RL
 * step), reward/ and policy/ (adapters in PEFT layout, perl_lora_save).
 * Only <libperl/libperl.h> is used, plus the host helpers in examples/common.
 */
#include <libperl/libperl.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "byte_tokens.h"
#include "coffee_data.h"
#include "eval.h"
#include "json_lite.h"
#include "text_io.h"

#define EVAL_BATCH 32
#define MAX_STOP 16
#define NEWLINE_TOKEN ('\n' + BYTE_TOKEN_OFFSET)
#define CURVE_WINDOW 5 /* steps averaged for the first-vs-last comparison */

/* ---- options ---------------------------------------------------------------------- */

typedef struct options {
    const char *shared, *base, *reward_dir, *out, *algo, *rm_tokens, *prompt_tokens, *stop_ids;
    int steps, batch, group, max_new, prompt_len, threads, samples, eval_prompts;
    int rm_steps, rm_batch, seq_len, eval_max, rank, quick;
    float temperature, kl_coef, lr, rm_lr, alpha;
    uint64_t seed;
} options;

static void options_default(options *o) {
    memset(o, 0, sizeof *o);
    const char *shared = getenv("PERL_SHARED_DIR");
    o->shared = shared && *shared ? shared : "../shared";
    o->base = "build/models/coffee-base", o->out = "build/coffee-rl", o->algo = "rloo";
    o->steps = 40, o->batch = 16, o->group = 4, o->max_new = 48, o->prompt_len = 160, o->threads = 0;
    o->samples = 3, o->eval_prompts = 32;
    o->rm_steps = 120, o->rm_batch = 16, o->seq_len = 256, o->eval_max = 0, o->rank = 8;
    o->temperature = 0.9f, o->kl_coef = 0.05f, o->lr = 2e-3f, o->rm_lr = 2e-3f, o->alpha = 16.0f;
    o->seed = 1;
}

/* --quick: a smoke run; explicit options given after --quick still win. */
static void options_quick(options *o) {
    o->steps = 12, o->batch = 8, o->max_new = 32, o->eval_prompts = 16;
    o->rm_steps = 30, o->eval_max = 128, o->quick = 1;
}

static void usage(FILE *f) {
    fprintf(f, "usage: coffee_rl [options]\n"
               "  --quick                 small settings (RM 30 steps, RL 12 steps of 8, 128 held-out)\n"
               "  --base DIR              HF Llama-family checkpoint dir (default build/models/coffee-base)\n"
               "  --reward DIR            load a saved reward model instead of training one\n"
               "  --out DIR               rl.csv, reward/ and policy/ adapters (default build/coffee-rl)\n"
               "  --steps N               RL steps (default 40)\n"
               "  --batch N               responses per RL step (default 16 = 4 prompts x group 4)\n"
               "  --algo rloo|reinforce   policy gradient (default rloo)\n"
               "  --group N               RLOO responses per prompt; divides --batch (default 4)\n"
               "  --max-new N             response tokens at most (default 48)\n"
               "  --temperature F         sampling temperature (default 0.9)\n"
               "  --kl-coef F             k1 KL penalty in the reward toward the base (default 0.05)\n"
               "  --lr F                  policy LoRA learning rate (default 2e-3, constant)\n"
               "  --prompt-len N          prompt tokens kept (BOS + tail; default 160)\n"
               "  --eval-prompts N        held-out prompts scored before/after RL (default 32)\n"
               "  --samples N             sample responses printed before/after (default 3)\n"
               "  --rm-steps N --rm-batch N --rm-lr F   reward training (default 120, 16, 2e-3 cosine)\n"
               "  --seq-len N             reward-model tokens, cut from the left (default 256)\n"
               "  --eval-max N            held-out RM examples scored (default all)\n"
               "  --rank N --alpha F      LoRA rank/alpha of both adapters (default 8, 16; all projections)\n"
               "  --threads N             library threads (default 0: all cores)\n"
               "  --seed N                sampling, batches, initialisation (default 1)\n"
               "  --shared DIR            data root (default $PERL_SHARED_DIR or ../shared)\n"
               "pre-tokenised data (a real tokenizer; see docs/real-data.md):\n"
               "  --rm-tokens FILE        '<label 0|1>: ids' lines (reward_train's format)\n"
               "  --prompt-tokens FILE    one prompt per line: space-separated ids\n"
               "  --stop-ids LIST         comma-separated ids that end a response (default: EOS)\n");
}

/* Checks that combine options. */
static int check_options(const options *o) {
    if (strcmp(o->algo, "rloo") != 0 && strcmp(o->algo, "reinforce") != 0)
        return ex_fail("--algo must be rloo or reinforce");
    if (strcmp(o->algo, "rloo") == 0 && (o->group < 2 || o->batch % o->group != 0))
        return ex_fail("rloo needs --group >= 2 dividing --batch (%d, %d)", o->group, o->batch);
    if (o->rm_tokens && !o->prompt_tokens) return ex_fail("--rm-tokens needs --prompt-tokens");
    if (o->prompt_tokens && !o->rm_tokens && !o->reward_dir)
        return ex_fail("--prompt-tokens needs a reward model: --rm-tokens FILE to train one, or --reward DIR");
    if (o->stop_ids && !o->prompt_tokens)
        return ex_fail("--stop-ids is for --prompt-tokens (bytes stop at newline/EOS)");
    return 0;
}

/* Parses argv into o; returns 1 after --help, -1 on an error. */
static int parse_args(int argc, char **argv, options *o) {
    const ex_option table[] = {
        {"--steps", &o->steps, 1, 10000000, NULL, 0, 0, NULL},
        {"--batch", &o->batch, 1, 4096, NULL, 0, 0, NULL},
        {"--group", &o->group, 1, 4096, NULL, 0, 0, NULL},
        {"--max-new", &o->max_new, 1, 1 << 16, NULL, 0, 0, NULL},
        {"--prompt-len", &o->prompt_len, 3, 1 << 20, NULL, 0, 0, NULL},
        {"--threads", &o->threads, 0, 4096, NULL, 0, 0, NULL},
        {"--samples", &o->samples, 0, 1 << 20, NULL, 0, 0, NULL},
        {"--eval-prompts", &o->eval_prompts, 1, 1 << 20, NULL, 0, 0, NULL},
        {"--rm-steps", &o->rm_steps, 1, 10000000, NULL, 0, 0, NULL},
        {"--rm-batch", &o->rm_batch, 1, 65536, NULL, 0, 0, NULL},
        {"--seq-len", &o->seq_len, 3, 1 << 20, NULL, 0, 0, NULL},
        {"--eval-max", &o->eval_max, 0, 1 << 30, NULL, 0, 0, NULL},
        {"--rank", &o->rank, 1, 4096, NULL, 0, 0, NULL},
        {"--temperature", NULL, 0, 0, &o->temperature, 0.0f, 100.0f, NULL},
        {"--kl-coef", NULL, 0, 0, &o->kl_coef, 0.0f, 1e6f, NULL},
        {"--lr", NULL, 0, 0, &o->lr, 0.0f, 10.0f, NULL},
        {"--rm-lr", NULL, 0, 0, &o->rm_lr, 0.0f, 10.0f, NULL},
        {"--alpha", NULL, 0, 0, &o->alpha, 1e-6f, 1e6f, NULL},
        {"--shared", NULL, 0, 0, NULL, 0, 0, &o->shared},
        {"--base", NULL, 0, 0, NULL, 0, 0, &o->base},
        {"--reward", NULL, 0, 0, NULL, 0, 0, &o->reward_dir},
        {"--out", NULL, 0, 0, NULL, 0, 0, &o->out},
        {"--algo", NULL, 0, 0, NULL, 0, 0, &o->algo},
        {"--rm-tokens", NULL, 0, 0, NULL, 0, 0, &o->rm_tokens},
        {"--prompt-tokens", NULL, 0, 0, NULL, 0, 0, &o->prompt_tokens},
        {"--stop-ids", NULL, 0, 0, NULL, 0, 0, &o->stop_ids},
    };
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return usage(stdout), 1;
        if (strcmp(argv[i], "--quick") == 0) {
            options_quick(o);
            continue;
        }
        int rc = ex_option_arg(table, sizeof table / sizeof table[0], &o->seed, argc, argv, &i);
        if (rc > 0) return usage(stderr), ex_fail("unknown option '%s'", argv[i]);
        if (rc) return -1;
    }
    return check_options(o);
}

/* ---- data: token sequences with a label and a split flag ---------------------------- */

typedef struct item {
    int32_t *ids;
    int32_t len;
    float label; /* reward examples: 0 or 1; prompts: unused */
    int held_out;
} item;

typedef struct item_list {
    item *items;
    int n, cap;
} item_list;

static void item_list_free(item_list *l) {
    for (int i = 0; i < l->n; i++) free(l->items[i].ids);
    free(l->items);
    memset(l, 0, sizeof *l);
}

/* Takes ownership of ids. */
static int item_list_add(item_list *l, int32_t *ids, int32_t len, float label, int held_out) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 256;
        item *p = realloc(l->items, (size_t)cap * sizeof *p);
        if (!p) return free(ids), ex_fail("out of memory");
        l->items = p, l->cap = cap;
    }
    l->items[l->n++] = (item){ids, len, label, held_out};
    return 0;
}

/* ---- data: Taskmaster Coffee JSON (rendered as in reward_train) ---------------------- */

/* BOS + the last max_len - 1 bytes of text, no EOS: a prompt the policy continues. */
static int encode_prompt(const char *text, size_t n, int max_len, int32_t **out, int32_t *out_len) {
    int32_t *ids = malloc((size_t)(max_len + 1) * sizeof *ids);
    if (!ids) return ex_fail("out of memory");
    *out_len = byte_tokens_encode_tail(text, n, ids, max_len + 1) - 1; /* drop the EOS */
    *out = ids;
    return 0;
}

typedef struct load_ctx {
    const options *o;
    item_list *rm, *prompts;
} load_ctx;

/* One record: the reward example (context + generation) and the policy prompt (context + "agent: "). */
static int coffee_record(void *ctx, ex_buf *text, size_t context_len, float label, int held) {
    const load_ctx *c = ctx;
    int32_t *ids = malloc((size_t)c->o->seq_len * sizeof *ids), len;
    if (!ids) return ex_fail("out of memory");
    len = byte_tokens_encode_tail(text->data, text->len, ids, c->o->seq_len);
    if (item_list_add(c->rm, ids, len, label, held) != 0) return -1;
    /* the prompt: the context, then the agent's turn prefix ("agent: " replaces the generation) */
    text->len = context_len;
    if (ex_buf_puts(text, "agent: ") != 0) return ex_fail("out of memory");
    if (encode_prompt(text->data, text->len, c->o->prompt_len, &ids, &len) != 0) return -1;
    return item_list_add(c->prompts, ids, len, 0.0f, held);
}

/* reward_00.json, reward_01.json, ... until one is missing. */
static int load_coffee(const options *o, item_list *rm, item_list *prompts) {
    load_ctx c = {o, rm, prompts};
    return coffee_load_rewards(o->shared, coffee_record, &c);
}

/* ---- data: token files ----------------------------------------------------------------
 * reward examples: '<label 0|1>: <ids>' (reward_train's pointwise format);
 * prompts: '<ids>'.  '#' lines and blank lines are skipped; the split is the
 * same per-line hash as reward_train's.  A sequence longer than max_len keeps
 * its first token (BOS) and its last max_len - 1 tokens. */

typedef struct token_ctx {
    int labelled, max_len;
    item_list *l;
} token_ctx;

static int token_line(void *ctx, const char *s, const char *end, const char *where) {
    const token_ctx *c = ctx;
    int held = coffee_held_out(s, (size_t)(end - s));
    float label = 0.0f;
    if (c->labelled) {
        const char *colon = memchr(s, ':', (size_t)(end - s));
        char *stop;
        long v = strtol(s, &stop, 10);
        while (colon && stop < colon && (*stop == ' ' || *stop == '\t')) stop++;
        if (!colon || stop != colon || (v != 0 && v != 1)) return ex_fail("%s: expected '<label 0|1>: ids'", where);
        label = (float)v, s = colon + 1;
    }
    int32_t *ids = NULL, len = 0;
    if (coffee_parse_ids(s, end, c->max_len, &ids, &len, NULL, where) != 0) return -1;
    return item_list_add(c->l, ids, len, label, held);
}

static int load_token_file(const char *path, int labelled, int max_len, item_list *l) {
    token_ctx c = {labelled, max_len, l};
    int rc = coffee_token_lines(path, token_line, &c);
    return rc == 0 && l->n == 0 ? ex_fail("%s: no examples", path) : rc;
}

/* "13,2" into ids[]. */
static int parse_stop_ids(const char *s, int32_t *ids, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > INT32_MAX || *n == MAX_STOP || (*end && *end != ','))
            return ex_fail("--stop-ids: expected up to %d comma-separated token ids, got '%s'", MAX_STOP, s);
        ids[(*n)++] = (int32_t)v;
        s = *end ? end + 1 : end;
    }
    return *n ? 0 : ex_fail("--stop-ids: empty list");
}

/* Largest id of a list, checked against the vocabulary up front (a clear message, not a library range error). */
static int check_vocab(const item_list *l, int vocab, const char *what) {
    for (int i = 0; i < l->n; i++)
        for (int t = 0; t < l->items[i].len; t++)
            if (l->items[i].ids[t] >= vocab)
                return ex_fail("%s: token id %d is outside the base model's vocabulary (%d): tokenised for another "
                               "model?", what, l->items[i].ids[t], vocab);
    return 0;
}

/* Train / held-out indices of a list; a list with one side empty serves both (token files may be small). */
typedef struct split {
    int *train, *eval, n_train, n_eval;
} split;

static int make_split(const item_list *l, int eval_max, split *s) {
    s->train = malloc((size_t)(l->n + 1) * sizeof(int));
    s->eval = malloc((size_t)(l->n + 1) * sizeof(int));
    s->n_train = s->n_eval = 0;
    if (!s->train || !s->eval) return ex_fail("out of memory");
    for (int i = 0; i < l->n; i++) {
        if (!l->items[i].held_out)
            s->train[s->n_train++] = i;
        else if (!eval_max || s->n_eval < eval_max)
            s->eval[s->n_eval++] = i;
    }
    if (s->n_train == 0 || s->n_eval == 0) {
        s->n_train = s->n_eval = 0;
        for (int i = 0; i < l->n; i++) s->train[s->n_train++] = i;
        for (int i = 0; i < l->n && (!eval_max || i < eval_max); i++) s->eval[s->n_eval++] = i;
    }
    return 0;
}

static void split_free(split *s) {
    free(s->train);
    free(s->eval);
}

/* ---- batches ------------------------------------------------------------------------ */

/* Items idx[0..count) of l, each repeated `repeat` times in consecutive rows (RLOO groups). */
static perl_batch *batch_items(ex_batch_buf *b, const item_list *l, const int *idx, int count, int repeat) {
    int seq = 1;
    for (int i = 0; i < count; i++) seq = l->items[idx[i]].len > seq ? l->items[idx[i]].len : seq;
    if (ex_batch_begin(b, count * repeat, seq) != 0) return NULL;
    for (int i = 0; i < count; i++)
        for (int r = 0; r < repeat; r++) ex_batch_put(b, i * repeat + r, l->items[idx[i]].ids, l->items[idx[i]].len);
    return &b->batch;
}

/* ---- the run's state ------------------------------------------------------------------ */

typedef struct app {
    options o;
    perl_model *model;
    perl_model_config cfg;
    perl_lora *rm_lora, *policy;
    perl_reward *rm;
    perl_policy_trainer *trainer;
    item_list rm_items, prompts;
    split rm_split, prompt_split;
    int32_t stop[MAX_STOP];
    int n_stop, byte_level;
    ex_batch_buf prompt_buf, score_buf;
    int32_t *responses, *response_lengths; /* [rows, max_new], [rows] */
    float *rewards;
    int rows; /* capacity of the three arrays above */
} app;

static void app_free(app *a) {
    perl_policy_free(a->trainer);
    perl_reward_free(a->rm);
    perl_lora_free(a->policy);
    perl_lora_free(a->rm_lora);
    perl_model_free(a->model);
    item_list_free(&a->rm_items);
    item_list_free(&a->prompts);
    split_free(&a->rm_split);
    split_free(&a->prompt_split);
    ex_batch_buf_free(&a->prompt_buf);
    ex_batch_buf_free(&a->score_buf);
    free(a->responses);
    free(a->response_lengths);
    free(a->rewards);
}

/* The base: --base if it holds config.json; a missing default base is built by reward_train. */
static int load_base(app *a) {
    char config[4200];
    snprintf(config, sizeof config, "%s/config.json", a->o.base);
    if (!ex_path_exists(config))
        return ex_fail("no base model at %s (no config.json).\n"
                       "  Build the byte-level coffee base first (about 7 minutes on 2 cores), e.g.:\n"
                       "    make examples && build/examples/reward_train --mode lora --steps 1 --base %s\n"
                       "  or pass --base DIR with any Hugging Face Llama-family checkpoint directory.",
                       a->o.base, a->o.base);
    perl_model_config_init(&a->cfg);
    if (perl_model_load(&a->model, a->o.base) != 0 || perl_model_get_config(a->model, &a->cfg) != 0)
        return ex_fail("%s: %s", a->o.base, perl_last_error());
    if (a->o.seq_len > a->cfg.max_seq_len)
        return ex_fail("--seq-len %d exceeds the context %d", a->o.seq_len, a->cfg.max_seq_len);
    if (a->o.prompt_len + a->o.max_new + 2 > a->cfg.max_seq_len) /* + newline and EOS when scoring */
        return ex_fail("--prompt-len + --max-new + 2 (%d) exceeds the context %d", a->o.prompt_len + a->o.max_new + 2,
                       a->cfg.max_seq_len);
    printf("base: %s (dim %d, %d layers, vocab %d, %zu parameters)\n", a->o.base, a->cfg.dim, a->cfg.n_layers,
           a->cfg.vocab_size, perl_model_num_params(a->model));
    return 0;
}

/* Data and stop tokens: byte-level coffee JSON, or token files for another tokenizer. */
static int load_all_data(app *a) {
    const options *o = &a->o;
    a->byte_level = !o->prompt_tokens;
    if (a->byte_level && a->cfg.vocab_size != BYTE_TOKEN_VOCAB)
        return ex_fail("%s has a %d-token vocabulary, not the byte-level %d: tokenise the data for it and pass "
                       "--rm-tokens / --prompt-tokens (docs/real-data.md)",
                       o->base, a->cfg.vocab_size, BYTE_TOKEN_VOCAB);
    if (a->byte_level) {
        if (load_coffee(o, &a->rm_items, &a->prompts) != 0) return -1;
        a->stop[0] = NEWLINE_TOKEN, a->stop[1] = BYTE_TOKEN_EOS, a->n_stop = 2;
    } else {
        if (o->rm_tokens && load_token_file(o->rm_tokens, 1, o->seq_len, &a->rm_items) != 0) return -1;
        if (load_token_file(o->prompt_tokens, 0, o->prompt_len, &a->prompts) != 0) return -1;
        if (!o->stop_ids)
            a->stop[0] = a->cfg.eos_token_id, a->n_stop = 1;
        else if (parse_stop_ids(o->stop_ids, a->stop, &a->n_stop) != 0)
            return -1;
    }
    for (int i = 0; i < a->n_stop; i++)
        if (a->stop[i] >= a->cfg.vocab_size) return ex_fail("stop id %d is outside the vocabulary", a->stop[i]);
    if (check_vocab(&a->rm_items, a->cfg.vocab_size, "reward examples") != 0 ||
        check_vocab(&a->prompts, a->cfg.vocab_size, "prompts") != 0)
        return -1;
    if (make_split(&a->prompts, 0, &a->prompt_split) != 0) return -1;
    if (a->rm_items.n && make_split(&a->rm_items, o->eval_max, &a->rm_split) != 0) return -1;
    printf("data: %d reward examples (%d train / %d held-out scored), %d prompts (%d train / %d held-out)\n",
           a->rm_items.n, a->rm_split.n_train, a->rm_split.n_eval, a->prompts.n, a->prompt_split.n_train,
           a->prompt_split.n_eval);
    return 0;
}

/* ---- reward model ---------------------------------------------------------------------- */

/* Pointwise with balanced class weights from the train split; returns the number of positives. */
static int reward_options(const app *a, perl_reward_options *ro) {
    perl_reward_options_init(ro);
    ro->objective = LIBPERL_REWARD_POINTWISE, ro->seed = a->o.seed;
    int pos = 0, n = a->rm_split.n_train;
    for (int i = 0; i < n; i++) pos += a->rm_items.items[a->rm_split.train[i]].label != 0.0f;
    if (pos > 0 && pos < n) { /* each class weighs half: about 86% of coffee is "good" */
        ro->pos_weight = (float)(n / (2.0 * pos));
        ro->neg_weight = (float)(n / (2.0 * (n - pos)));
    }
    return pos;
}

static int create_reward(app *a) {
    const options *o = &a->o;
    perl_reward_options ro;
    int positives = reward_options(a, &ro);
    if (o->reward_dir) {
        if (perl_reward_load(&a->rm, &a->rm_lora, a->model, o->reward_dir, &ro) != 0)
            return ex_fail("loading the reward model %s: %s", o->reward_dir, perl_last_error());
        printf("reward model: loaded %s (%zu parameters)\n", o->reward_dir, perl_lora_num_params(a->rm_lora));
        return 0;
    }
    if (positives == 0 || positives == a->rm_split.n_train)
        return ex_fail("the reward training split has only one class (%d of %d positive)", positives,
                       a->rm_split.n_train);
    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.rank = o->rank, lo.alpha = o->alpha, lo.target_modules = LIBPERL_TARGET_ALL, lo.seed = o->seed;
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = o->rm_lr, opt.schedule = LIBPERL_LR_COSINE, opt.warmup_steps = o->rm_steps / 10;
    opt.total_steps = o->rm_steps, opt.min_lr_ratio = 0.1f;
    if (perl_lora_create(&a->rm_lora, a->model, &lo) != 0 || perl_reward_create(&a->rm, a->model, a->rm_lora, &ro) != 0 ||
        perl_lora_set_optimizer(a->rm_lora, &opt) != 0)
        return ex_fail("creating the reward model: %s", perl_last_error());
    return 0;
}

/* Pointwise class-weighted BCE for --rm-steps over reshuffled epochs of the train split. */
static int train_reward(app *a) {
    const options *o = &a->o;
    const split *sp = &a->rm_split;
    int B = o->rm_batch < sp->n_train ? o->rm_batch : sp->n_train, pos = sp->n_train, rc = 0;
    int *order = malloc((size_t)sp->n_train * sizeof *order);
    float *labels = malloc((size_t)B * sizeof *labels);
    if (!order || !labels) rc = ex_fail("out of memory");
    uint64_t rng = o->seed * 0x2545f4914f6cdd1dull + 7;
    double t0 = ex_now_seconds(), loss = 0.0, acc = 0.0;
    int every = o->rm_steps >= 10 ? o->rm_steps / 10 : 1;
    for (int step = 0; rc == 0 && step < o->rm_steps; step++, pos += B) {
        if (pos + B > sp->n_train) {
            memcpy(order, sp->train, (size_t)sp->n_train * sizeof *order);
            ex_shuffle(order, sp->n_train, &rng);
            pos = 0;
        }
        for (int i = 0; i < B; i++) labels[i] = a->rm_items.items[order[pos + i]].label;
        perl_batch *b = batch_items(&a->score_buf, &a->rm_items, order + pos, B, 1);
        perl_reward_stats st;
        perl_reward_stats_init(&st);
        if (!b) rc = -1;
        else if (perl_reward_step_pointwise(a->rm, b, labels, NULL, &st) != 0)
            rc = ex_fail("reward step %d: %s", step + 1, perl_last_error());
        if (rc) break;
        loss = step ? 0.9 * loss + 0.1 * st.loss : st.loss, acc = step ? 0.9 * acc + 0.1 * st.accuracy : st.accuracy;
        if ((step + 1) % every == 0 || step + 1 == o->rm_steps)
            printf("  [rm] step %4d/%d  loss %.4f  train acc %.3f  lr %.2e  %.2f s/step\n", step + 1, o->rm_steps, loss,
                   acc, (double)st.lr, (ex_now_seconds() - t0) / (step + 1));
        fflush(stdout);
    }
    free(order);
    free(labels);
    return rc;
}

/* Held-out accuracy at score 0, AUC and the majority-class rate. */
static int evaluate_reward(app *a) {
    const split *sp = &a->rm_split;
    ex_scored *all = malloc((size_t)sp->n_eval * sizeof *all);
    float scores[EVAL_BATCH];
    if (!all) return ex_fail("out of memory");
    double right = 0.0, positives = 0.0, t0 = ex_now_seconds();
    int rc = 0;
    for (int first = 0; rc == 0 && first < sp->n_eval; first += EVAL_BATCH) {
        int count = sp->n_eval - first < EVAL_BATCH ? sp->n_eval - first : EVAL_BATCH;
        perl_batch *b = batch_items(&a->score_buf, &a->rm_items, sp->eval + first, count, 1);
        if (!b) rc = -1;
        else if (perl_reward_score(a->rm, b, scores) != 0) rc = ex_fail("scoring: %s", perl_last_error());
        for (int i = 0; rc == 0 && i < count; i++) {
            float label = a->rm_items.items[sp->eval[first + i]].label;
            right += (scores[i] > 0.0f) == (label != 0.0f), positives += label;
            all[first + i] = (ex_scored){scores[i], label};
        }
    }
    if (rc == 0) {
        double p = positives / sp->n_eval;
        printf("reward model: held-out accuracy %.3f (majority class %.3f), AUC %.3f over %d examples (%.1f s)\n",
               right / sp->n_eval, p > 0.5 ? p : 1.0 - p, ex_roc_auc(all, sp->n_eval), sp->n_eval,
               ex_now_seconds() - t0);
    }
    free(all);
    return rc;
}

/* ---- RL ------------------------------------------------------------------------------- */

static int ensure_rows(app *a, int rows) {
    if (rows <= a->rows) return 0;
    free(a->responses), free(a->response_lengths), free(a->rewards);
    a->responses = malloc((size_t)rows * (size_t)a->o.max_new * sizeof(int32_t));
    a->response_lengths = malloc((size_t)rows * sizeof(int32_t));
    a->rewards = malloc((size_t)rows * sizeof(float));
    a->rows = a->responses && a->response_lengths && a->rewards ? rows : 0;
    return a->rows ? 0 : ex_fail("out of memory");
}

/* Samples a response per prompt row (adapter NULL: the frozen base). */
static int sample(app *a, const perl_lora *adapter, const perl_batch *prompts, uint64_t seed) {
    perl_generate_options g;
    perl_generate_options_init(&g);
    g.max_new_tokens = a->o.max_new, g.temperature = a->o.temperature, g.seed = seed;
    g.stop_tokens = a->stop, g.n_stop_tokens = a->n_stop;
    if (ensure_rows(a, prompts->batch_size) != 0) return -1;
    if (perl_generate(a->model, adapter, prompts, &g, a->responses, a->response_lengths, NULL) != 0)
        return ex_fail("generating: %s", perl_last_error());
    /* -1 marks positions past a row's end; make them a valid id for the trainer's padded layout */
    for (size_t i = 0; i < (size_t)prompts->batch_size * (size_t)a->o.max_new; i++)
        if (a->responses[i] < 0) a->responses[i] = BYTE_TOKEN_PAD;
    return 0;
}

static int is_stop(const app *a, int32_t id) {
    for (int i = 0; i < a->n_stop; i++)
        if (a->stop[i] == id) return 1;
    return 0;
}

/* The reward model's view of a response, matching how its training text ended.
 * Byte-level: "agent: <text>\n" EOS, whatever stopped the response (a cut
 * one is judged as it stands).  Token files: prompt + response, plus EOS
 * unless the response already ends with it. */
static int score_row(const app *a, const int32_t *prompt, int prompt_len, const int32_t *response, int n, int32_t *out) {
    int k = 0;
    memcpy(out, prompt, (size_t)prompt_len * sizeof *out);
    k = prompt_len;
    if (a->byte_level) {
        if (n > 0 && is_stop(a, response[n - 1])) n--;
        memcpy(out + k, response, (size_t)n * sizeof *out);
        k += n;
        out[k++] = NEWLINE_TOKEN;
        out[k++] = BYTE_TOKEN_EOS;
    } else {
        memcpy(out + k, response, (size_t)n * sizeof *out);
        k += n;
        if (response[n - 1] != a->cfg.eos_token_id) out[k++] = a->cfg.eos_token_id;
    }
    return k;
}

/* Rewards for the sampled responses: perl_reward_score on prompt + response. */
static int score(app *a, const perl_batch *prompts) {
    int B = prompts->batch_size, seq = 1, rc = 0;
    for (int b = 0; b < B; b++) /* pad to the longest row, not to max_new: padding costs compute */
        if (prompts->lengths[b] + a->response_lengths[b] + 2 > seq) seq = prompts->lengths[b] + a->response_lengths[b] + 2;
    int32_t *row = malloc((size_t)seq * sizeof *row);
    if (!row || ex_batch_begin(&a->score_buf, B, seq) != 0) return free(row), ex_fail("out of memory");
    for (int b = 0; b < B; b++) {
        int n = score_row(a, prompts->tokens + (size_t)b * prompts->seq_len, prompts->lengths[b],
                          a->responses + (size_t)b * a->o.max_new, a->response_lengths[b], row);
        ex_batch_put(&a->score_buf, b, row, n);
    }
    if (perl_reward_score(a->rm, &a->score_buf.batch, a->rewards) != 0) rc = ex_fail("scoring: %s", perl_last_error());
    free(row);
    return rc;
}

/* Prints a response (and the prompt's last line) as text, or as ids for token files. */
static void print_sample(const app *a, const perl_batch *prompts, int b, float reward) {
    const int32_t *p = prompts->tokens + (size_t)b * prompts->seq_len, *r = a->responses + (size_t)b * a->o.max_new;
    int np = prompts->lengths[b], nr = a->response_lengths[b];
    if (!a->byte_level) {
        printf("    [%+.2f] ids:", (double)reward);
        for (int t = 0; t < nr; t++) printf(" %d", r[t]);
        printf("\n");
        return;
    }
    char prompt[4096], response[1024];
    byte_tokens_decode(p, np, prompt, sizeof prompt);
    byte_tokens_decode(r, nr, response, sizeof response);
    /* the prompt ends "...\n<last turn>\nagent: ": show the last turn, cut to its final 100 bytes */
    size_t n = strlen(prompt), end = n, start;
    while (end > 0 && prompt[end - 1] != '\n') end--;
    if (end > 0) end--;
    for (start = end; start > 0 && prompt[start - 1] != '\n';) start--;
    if (end - start > 100) start = end - 100;
    n = strlen(response);
    if (n && response[n - 1] == '\n') response[n - 1] = '\0';
    printf("    %.*s\n    agent: %s   [reward %+.2f, %d tokens]\n", (int)(end - start), prompt + start, response,
           (double)reward, nr);
}

/* Mean reward of one sample on each of the first --eval-prompts held-out prompts, same seed before and after. */
static int evaluate_policy(app *a, const perl_lora *adapter, const char *tag, double *out_mean) {
    int n = a->prompt_split.n_eval < a->o.eval_prompts ? a->prompt_split.n_eval : a->o.eval_prompts;
    perl_batch *prompts = batch_items(&a->prompt_buf, &a->prompts, a->prompt_split.eval, n, 1);
    if (!prompts || sample(a, adapter, prompts, a->o.seed ^ 0xe7a1ull) != 0 || score(a, prompts) != 0) return -1;
    double sum = 0.0, len = 0.0;
    for (int b = 0; b < n; b++) sum += a->rewards[b], len += a->response_lengths[b];
    *out_mean = sum / n;
    printf("%s: mean reward %+.3f, mean length %.1f over %d held-out prompts; samples:\n", tag, *out_mean, len / n, n);
    for (int b = 0; b < n && b < a->o.samples; b++) print_sample(a, prompts, b, a->rewards[b]);
    fflush(stdout);
    return 0;
}

static int create_policy(app *a) {
    const options *o = &a->o;
    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.rank = o->rank, lo.alpha = o->alpha, lo.target_modules = LIBPERL_TARGET_ALL, lo.seed = o->seed + 1;
    perl_optim_options opt;
    perl_optim_options_init(&opt);
    opt.lr = o->lr;
    perl_policy_options po;
    perl_policy_options_init(&po);
    int rloo = strcmp(o->algo, "rloo") == 0;
    po.algorithm = rloo ? LIBPERL_PG_RLOO : LIBPERL_PG_REINFORCE, po.group_size = rloo ? o->group : 1;
    po.kl_coef = o->kl_coef, po.kl_estimator = LIBPERL_KL_K1, po.kl_mode = LIBPERL_KL_IN_REWARD;
    if (perl_lora_create(&a->policy, a->model, &lo) != 0 || perl_lora_set_optimizer(a->policy, &opt) != 0 ||
        perl_policy_create(&a->trainer, a->model, a->policy, NULL, &po) != 0)
        return ex_fail("creating the policy: %s", perl_last_error());
    printf("policy: LoRA r %d on all projections, %zu parameters; %s, %d responses per step%s, kl_coef %.3g (k1, in "
           "reward), lr %.2g\n",
           o->rank, perl_lora_num_params(a->policy), rloo ? "RLOO" : "REINFORCE", o->batch,
           rloo ? " in groups" : "", (double)o->kl_coef, (double)o->lr);
    return 0;
}

/* One RL step: pick prompts, sample a group per prompt, score, perl_policy_step. */
static int rl_step(app *a, int step, uint64_t *rng, perl_policy_stats *st) {
    int group = strcmp(a->o.algo, "rloo") == 0 ? a->o.group : 1, n = a->o.batch / group, idx[4096];
    for (int i = 0; i < n; i++) idx[i] = a->prompt_split.train[ex_rng_next(rng) % (uint64_t)a->prompt_split.n_train];
    perl_batch *prompts = batch_items(&a->prompt_buf, &a->prompts, idx, n, group);
    if (!prompts || sample(a, a->policy, prompts, a->o.seed * 1000003ull + (uint64_t)step) != 0 ||
        score(a, prompts) != 0)
        return -1;
    perl_policy_stats_init(st);
    /* old_logprobs NULL: RLOO / REINFORCE are on-policy, and tempered log-probs are not the policy's */
    if (perl_policy_step(a->trainer, prompts, a->responses, a->response_lengths, a->o.max_new, a->rewards, NULL, st) != 0)
        return ex_fail("policy step %d: %s", step + 1, perl_last_error());
    return 0;
}

static double window_mean(const double *v, int from, int n) {
    double s = 0.0;
    for (int i = from; i < from + n; i++) s += v[i];
    return n ? s / n : NAN;
}

/* The RL loop, one CSV line per step. */
static int train_policy(app *a, FILE *csv) {
    const options *o = &a->o;
    double *reward = malloc((size_t)o->steps * sizeof *reward), *kl = malloc((size_t)o->steps * sizeof *kl);
    uint64_t rng = o->seed * 0x9e3779b97f4a7c15ull + 3;
    double t_total = 0.0;
    int rc = reward && kl ? 0 : ex_fail("out of memory");
    fprintf(csv, "step,mean_reward,kl,entropy,len,seconds\n");
    for (int step = 0; rc == 0 && step < o->steps; step++) {
        perl_policy_stats st;
        double t0 = ex_now_seconds();
        if ((rc = rl_step(a, step, &rng, &st)) != 0) break;
        double dt = ex_now_seconds() - t0;
        t_total += dt;
        reward[step] = st.mean_reward, kl[step] = st.kl;
        printf("  [rl] step %3d/%d  reward %+.3f (std %.3f)  kl %.4f  entropy %.3f  len %.1f  %.2f s\n", step + 1,
               o->steps, (double)st.mean_reward, (double)st.std_reward, (double)st.kl, (double)st.entropy,
               (double)st.response_length, dt);
        fprintf(csv, "%d,%.6f,%.6f,%.6f,%.3f,%.4f\n", step + 1, (double)st.mean_reward, (double)st.kl,
                (double)st.entropy, (double)st.response_length, dt);
        fflush(stdout);
        fflush(csv);
    }
    if (rc == 0) {
        int w = o->steps / 2 < CURVE_WINDOW ? o->steps / 2 : CURVE_WINDOW; /* windows must not overlap */
        w = w > 0 ? w : 1;
        printf("rl curve: reward %+.3f -> %+.3f, kl %.4f -> %.4f (means of the first / last %d steps); %.2f s/step\n",
               window_mean(reward, 0, w), window_mean(reward, o->steps - w, w), window_mean(kl, 0, w),
               window_mean(kl, o->steps - w, w), w, t_total / o->steps);
    }
    free(reward);
    free(kl);
    return rc;
}

/* ---- main ------------------------------------------------------------------------------ */

static int save_adapter(const perl_lora *lora, const char *out, const char *name) {
    char dir[4200], err[512];
    snprintf(dir, sizeof dir, "%s/%s", out, name);
    if (ex_mkdir_p(dir, err, sizeof err) != 0) return ex_fail("%s", err);
    if (perl_lora_save(lora, dir) != 0) return ex_fail("saving %s: %s", dir, perl_last_error());
    printf("saved %s (PEFT layout: adapter_config.json, adapter_model.safetensors)\n", dir);
    return 0;
}

static int run(app *a) {
    const options *o = &a->o;
    char path[4200], err[512];
    double t0 = ex_now_seconds(), before = 0.0, after = 0.0;
    perl_set_num_threads(o->threads);
    if (load_base(a) != 0 || load_all_data(a) != 0 || create_reward(a) != 0) return -1;
    if (ex_mkdir_p(o->out, err, sizeof err) != 0) return ex_fail("%s", err);
    if (!o->reward_dir) {
        printf("reward model: LoRA r %d, %zu parameters, %d steps of %d\n", o->rank, perl_lora_num_params(a->rm_lora),
               o->rm_steps, o->rm_batch);
        if (train_reward(a) != 0 || save_adapter(a->rm_lora, o->out, "reward") != 0) return -1;
    }
    if (a->rm_items.n && evaluate_reward(a) != 0) return -1;
    if (create_policy(a) != 0 || evaluate_policy(a, NULL, "before RL (base)", &before) != 0) return -1;
    snprintf(path, sizeof path, "%s/rl.csv", o->out);
    FILE *csv = fopen(path, "w");
    if (!csv) return ex_fail("%s: %s", path, strerror(errno));
    int rc = train_policy(a, csv);
    if (fclose(csv) != 0 && rc == 0) rc = ex_fail("%s: %s", path, strerror(errno));
    if (rc == 0) rc = evaluate_policy(a, a->policy, "after RL (policy)", &after);
    if (rc == 0) rc = save_adapter(a->policy, o->out, "policy");
    if (rc == 0)
        printf("done: held-out mean reward %+.3f -> %+.3f; %s written; %.0f s in all, peak RSS %.1f MB, %d threads\n",
               before, after, path, ex_now_seconds() - t0, ex_peak_rss_mb(), perl_get_num_threads());
    return rc;
}

int main(int argc, char **argv) {
    app a;
    ex_program = "coffee_rl";
    memset(&a, 0, sizeof a);
    options_default(&a.o);
    int rc = parse_args(argc, argv, &a.o);
    if (rc != 0) return rc > 0 ? 0 : 2;
    rc = run(&a);
    app_free(&a);
    return rc == 0 ? 0 : 1;
}
