/*
 * perl_demo — PERL (Parameter-Efficient RLHF) end to end, in about three
 * minutes on two cores, with nothing downloaded.
 *
 *   make demo                      (or: build/examples/perl_demo [options])
 *
 * The world is a coffee shop.  A seeded grammar writes dialogs such as
 *
 *   customer: can i get a large latte with oat milk please
 *   barista: sure, a large latte with oat milk. thanks!
 *
 * and four rules a person can read say what a good barista reply is: it
 * confirms the size and the milk the customer asked for, it is polite (a
 * "sure" / "of course" / "certainly" and a thank-you), and it does not repeat
 * itself.  The demo runs the whole PERL recipe on that world:
 *
 *   1. pretrain  A tiny byte-level Llama (token = byte + 3) is trained from
 *                random weights on dialogs whose replies break a rule about
 *                half of the time, with the FULL fine-tuning engine; the
 *                result is frozen as the base model (perl_lora_merge).
 *   2. reward    A LoRA reward model (perl_reward_*) learns from preference
 *                pairs (a good reply vs. one that breaks one rule) with the
 *                pairwise Bradley-Terry loss; accuracy is measured on
 *                held-out pairs.
 *   3. rl        A LoRA policy samples replies (perl_generate), the reward
 *                model scores them (perl_reward_score), and the policy
 *                trainer (perl_policy_step, RLOO with a KL penalty toward the
 *                frozen base = the adapter switched off) improves it.
 *
 * The host owns every loop: the library computes one step at a time, and
 * everything else here — data, batching, progress, metrics, files — is the
 * host's.  Of libperl only <libperl/libperl.h> is used; the clock and the
 * peak-RSS reading come from the examples' shared helpers (common/eval.h).
 *
 * Outputs (under --out, default build/demo): base_model/ (HF layout),
 * reward_adapter/ and policy_adapter/ (PEFT layout; with --full, whole models
 * in HF layout), metrics.csv (one row per RL step) and rl_curves.png
 * (gnuplot).  The exit status is 0 only when every stage improved on its
 * starting point.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, isatty, fileno, posix_spawnp, mkdir */

#include <libperl/libperl.h>

#include "eval.h"

#include <errno.h>
#include <math.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ========================================================================= */
/* Options and the size of each stage                                        */
/* ========================================================================= */

typedef struct demo_options {
    int quick;            /* a few steps per stage (tests) */
    uint64_t seed;        /* everything random derives from it */
    int threads;          /* 0: all cores */
    int full;             /* reward model and policy: full fine-tuning instead of LoRA */
    const char *out_dir;  /* where files go */
    const char *base_dir; /* load this base instead of pretraining one (NULL: pretrain) */
    const char *json_path; /* the results as one JSON object (NULL: none) */
} demo_options;

/* How much work each stage does.  The defaults take about three minutes on
 * two cores; --quick takes well under a minute. */
typedef struct demo_plan {
    int model_dim, model_hidden_dim, model_layers, model_heads;
    int pretrain_steps, pretrain_batch;
    float pretrain_lr;
    int reward_steps, reward_batch, reward_eval_pairs;
    float reward_lr, reward_lr_full;
    int rl_steps, rl_prompts, rl_group; /* a step samples rl_prompts * rl_group replies */
    float rl_lr, rl_lr_full, rl_kl_coef;
    int eval_replies; /* replies sampled to count rule-following before/after RL */
} demo_plan;

static demo_plan plan_for(int quick)
{
    demo_plan p;
    p.model_dim = 64;
    p.model_hidden_dim = 172;
    p.model_layers = 2;
    p.model_heads = 4;
    p.pretrain_steps = quick ? 120 : 700;
    p.pretrain_batch = 16;
    p.pretrain_lr = 3e-3f;
    p.reward_steps = quick ? 60 : 250;
    p.reward_batch = 16;
    p.reward_eval_pairs = quick ? 64 : 256;
    p.reward_lr = 2e-3f;
    p.reward_lr_full = 2e-4f; /* full fine-tuning moves every weight: a tenth of LoRA's rate */
    p.rl_steps = quick ? 40 : 120; /* fewer makes the quick check a coin toss */
    p.rl_prompts = 8;
    p.rl_group = 4;
    p.rl_lr = 2e-3f;
    p.rl_lr_full = 2e-4f;
    p.rl_kl_coef = 0.2f;
    p.eval_replies = quick ? 64 : 128;
    return p;
}

/* ========================================================================= */
/* Small utilities: medians, random numbers, errors, files                   */
/* ========================================================================= */

/* The median of n step times (sorts them). */
static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_seconds(double *t, int n)
{
    if (n <= 0) return 0;
    qsort(t, (size_t)n, sizeof *t, compare_doubles);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* splitmix64: a tiny, good-enough generator for the data grammar. */
typedef struct demo_rng {
    uint64_t state;
} demo_rng;

static uint64_t rng_next(demo_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform integer in [0, n). */
static int rng_below(demo_rng *r, int n)
{
    return (int)(rng_next(r) % (uint64_t)n);
}

/* Uniform float in [0, 1). */
static float rng_uniform(demo_rng *r)
{
    return (float)(rng_next(r) >> 40) / (float)(1u << 24);
}

/* Reports a failed libperl call; returns rc so callers can `return check(...)`. */
static int check(int rc, const char *what)
{
    if (rc != LIBPERL_OK)
        fprintf(stderr, "perl_demo: %s failed: %s: %s\n", what, perl_status_str(rc), perl_last_error());
    return rc;
}

#define TRY(call)                                        \
    do {                                                 \
        int try_rc_ = check((call), #call);              \
        if (try_rc_ != LIBPERL_OK) return try_rc_;       \
    } while (0)

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (p == NULL) {
        fprintf(stderr, "perl_demo: out of memory\n");
        exit(EXIT_FAILURE);
    }
    return p;
}

/* mkdir -p. */
static int make_dirs(const char *path)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return -1;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

static void join_path(char *buf, size_t n, const char *dir, const char *name)
{
    snprintf(buf, n, "%s/%s", dir, name);
}

static long file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

/* ========================================================================= */
/* The coffee-shop world: orders, prompts, replies and the four rules        */
/* ========================================================================= */

#define N_ELEMS(a) ((int)(sizeof(a) / sizeof((a)[0])))

static const char *const SIZES[] = {"small", "medium", "large"};
static const char *const DRINKS[] = {"latte", "mocha", "cappuccino", "flat white", "americano"};
static const char *const MILKS[] = {"oat", "soy", "almond", "whole"};
static const char *const REQUESTS[] = {"can i get", "could i have", "i'd like", "i'll take"};
static const char *const POLITE_OPENERS[] = {"sure,", "of course,", "certainly,"};
static const char *const THANKS[] = {"thanks!", "thank you!"};
static const char *const RUDE_OPENERS[] = {"ugh,", "fine,", "whatever,"};
static const char *const RUDE_CLOSERS[] = {"next!", "pay over there."};

typedef struct order {
    int size, drink, milk, request, please;
} order;

static order random_order(demo_rng *r)
{
    order o;
    o.size = rng_below(r, N_ELEMS(SIZES));
    o.drink = rng_below(r, N_ELEMS(DRINKS));
    o.milk = rng_below(r, N_ELEMS(MILKS));
    o.request = rng_below(r, N_ELEMS(REQUESTS));
    o.please = rng_below(r, 2);
    return o;
}

/* The rules, as bits of a "broken rules" mask. */
enum {
    RULE_SIZE = 1,   /* confirms the size asked for */
    RULE_MILK = 2,   /* confirms the milk asked for */
    RULE_POLITE = 4, /* "sure"/"of course"/"certainly" and a thank-you */
    RULE_REPEAT = 8  /* does not repeat itself: no word twice */
};
#define N_RULES 4
static const char *const RULE_NAMES[N_RULES] = {"wrong size", "wrong milk", "impolite", "repeats itself"};

/* What kind of reply to write: a good one, or one that breaks one rule. */
typedef enum reply_kind { REPLY_GOOD, REPLY_WRONG_SIZE, REPLY_WRONG_MILK, REPLY_RUDE, REPLY_REPEATS } reply_kind;

#define TEXT_CAP 256

/* "customer: can i get a large latte with oat milk please\nbarista:" */
static void write_prompt(char *buf, size_t n, const order *o)
{
    snprintf(buf, n, "customer: %s a %s %s with %s milk%s\nbarista:", REQUESTS[o->request], SIZES[o->size],
             DRINKS[o->drink], MILKS[o->milk], o->please ? " please" : "");
}

/* " sure, a large latte with oat milk. thanks!" or a variant breaking one rule. */
static void write_reply(char *buf, size_t n, const order *o, reply_kind kind, demo_rng *r)
{
    int size = o->size, milk = o->milk;
    const char *opener = POLITE_OPENERS[rng_below(r, N_ELEMS(POLITE_OPENERS))];
    const char *closer = THANKS[rng_below(r, N_ELEMS(THANKS))];
    if (kind == REPLY_WRONG_SIZE) size = (size + 1 + rng_below(r, N_ELEMS(SIZES) - 1)) % N_ELEMS(SIZES);
    if (kind == REPLY_WRONG_MILK) milk = (milk + 1 + rng_below(r, N_ELEMS(MILKS) - 1)) % N_ELEMS(MILKS);
    if (kind == REPLY_RUDE) {
        opener = RUDE_OPENERS[rng_below(r, N_ELEMS(RUDE_OPENERS))];
        closer = RUDE_CLOSERS[rng_below(r, N_ELEMS(RUDE_CLOSERS))];
    }
    const char *s = SIZES[size], *d = DRINKS[o->drink], *m = MILKS[milk];
    if (kind != REPLY_REPEATS) {
        snprintf(buf, n, " %s a %s %s with %s milk. %s", opener, s, d, m, closer);
        return;
    }
    switch (rng_below(r, 3)) { /* three ways of repeating oneself */
    case 0: snprintf(buf, n, " %s %s a %s %s with %s milk. %s", opener, opener, s, d, m, closer); break;
    case 1: snprintf(buf, n, " %s a %s %s, a %s %s with %s milk. %s", opener, s, d, s, d, m, closer); break;
    default: snprintf(buf, n, " %s a %s %s with %s milk. %s %s", opener, s, d, m, closer, closer); break;
    }
}

/* Pretraining replies break a rule about half of the time, so the base model
 * says both good and bad things and RL has something to improve. */
static reply_kind random_pretrain_kind(demo_rng *r)
{
    float u = rng_uniform(r);
    if (u < 0.44f) return REPLY_GOOD;
    return (reply_kind)(1 + rng_below(r, 4));
}

/* Does `word` occur in `text` as a whole word? */
static int has_word(const char *text, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = strstr(text, word); p; p = strstr(p + 1, word)) {
        int starts = p == text || !(p[-1] >= 'a' && p[-1] <= 'z');
        int ends = !(p[n] >= 'a' && p[n] <= 'z');
        if (starts && ends) return 1;
    }
    return 0;
}

/* Splits text into lowercase words (letters and apostrophes); returns the count. */
static int split_words(const char *text, char words[][24], int max_words)
{
    int n = 0;
    for (const char *p = text; *p && n < max_words;) {
        while (*p && !((*p >= 'a' && *p <= 'z') || *p == '\'')) p++;
        int len = 0;
        while (*p && ((*p >= 'a' && *p <= 'z') || *p == '\'')) {
            if (len < 23) words[n][len++] = *p;
            p++;
        }
        if (len > 0) words[n++][len] = '\0';
    }
    return n;
}

/* The four rules applied to a reply: returns the mask of broken rules (0 = good). */
static int broken_rules(const order *o, const char *reply)
{
    int broken = 0;
    char want[32];

    /* size: the requested size and no other */
    for (int i = 0; i < N_ELEMS(SIZES); i++)
        if (has_word(reply, SIZES[i]) != (i == o->size)) broken |= RULE_SIZE;
    /* milk: "<milk> milk" for the requested milk and no other */
    for (int i = 0; i < N_ELEMS(MILKS); i++) {
        snprintf(want, sizeof want, "%s milk", MILKS[i]);
        if (has_word(reply, want) != (i == o->milk)) broken |= RULE_MILK;
    }
    /* polite: a polite opener and a thank-you */
    int opener = has_word(reply, "sure") || has_word(reply, "of course") || has_word(reply, "certainly");
    int thanks = has_word(reply, "thanks") || has_word(reply, "thank you");
    if (!opener || !thanks) broken |= RULE_POLITE;
    /* repetition: no word twice (a good reply never needs one twice) */
    char words[48][24];
    int n = split_words(reply, words, 48);
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (strcmp(words[i], words[j]) == 0) broken |= RULE_REPEAT;
    return broken;
}

/* "wrong size, impolite" for a mask; "follows the rules" for 0. */
static void describe_rules(char *buf, size_t n, int broken)
{
    if (broken == 0) {
        snprintf(buf, n, "follows the rules");
        return;
    }
    buf[0] = '\0';
    for (int i = 0; i < N_RULES; i++) {
        if (!(broken & (1 << i))) continue;
        size_t used = strlen(buf);
        snprintf(buf + used, n - used, "%s%s", used ? ", " : "", RULE_NAMES[i]);
    }
}

/* ========================================================================= */
/* Tokens: one byte = one token                                              */
/* ========================================================================= */

/* token = byte + 3; 0 is padding, 1 begins and 2 ends a sequence. */
enum { TOKEN_PAD = 0, TOKEN_BOS = 1, TOKEN_EOS = 2, TOKEN_BYTE0 = 3, VOCAB_SIZE = 259 + 1 };
#define CONTEXT 160 /* the longest dialog is ~150 bytes */

/* Appends the bytes of text as tokens; returns the new length. */
static int append_text(int32_t *tokens, int len, const char *text)
{
    for (const unsigned char *p = (const unsigned char *)text; *p && len < CONTEXT; p++)
        tokens[len++] = TOKEN_BYTE0 + *p;
    return len;
}

/* Decodes tokens up to the first EOS/pad into printable text. */
static void decode_tokens(char *buf, size_t n, const int32_t *tokens, int count)
{
    size_t used = 0;
    for (int i = 0; i < count && used + 1 < n; i++) {
        int t = tokens[i];
        if (t == TOKEN_EOS || t == TOKEN_PAD || t < 0) break;
        if (t < TOKEN_BYTE0) continue;
        int c = t - TOKEN_BYTE0;
        buf[used++] = (c >= 32 && c < 127) ? (char)c : (c == '\n' ? '|' : '?');
    }
    buf[used] = '\0';
}

/* A right-padded batch of token rows, stride CONTEXT, viewed as a perl_batch. */
typedef struct token_rows {
    int32_t *tokens;  /* [capacity, CONTEXT] */
    int32_t *lengths; /* [capacity] */
    int capacity, count;
} token_rows;

static void rows_init(token_rows *r, int capacity)
{
    r->tokens = xcalloc((size_t)capacity * CONTEXT, sizeof(int32_t));
    r->lengths = xcalloc((size_t)capacity, sizeof(int32_t));
    r->capacity = capacity;
    r->count = 0;
}

static void rows_free(token_rows *r)
{
    free(r->tokens);
    free(r->lengths);
    memset(r, 0, sizeof *r);
}

static int32_t *rows_row(token_rows *r, int i)
{
    return r->tokens + (size_t)i * CONTEXT;
}

/* Adds a row BOS + prompt + reply (+ EOS). */
static void rows_add_text(token_rows *r, const char *prompt, const char *reply, int add_eos)
{
    int32_t *row = rows_row(r, r->count);
    int len = 0;
    row[len++] = TOKEN_BOS;
    len = append_text(row, len, prompt);
    if (reply) len = append_text(row, len, reply);
    if (add_eos && len < CONTEXT) row[len++] = TOKEN_EOS;
    for (int i = len; i < CONTEXT; i++) row[i] = TOKEN_PAD;
    r->lengths[r->count++] = len;
}

/* The perl_batch view: stride CONTEXT, lengths per row. */
static perl_batch rows_batch(const token_rows *r)
{
    perl_batch b;
    perl_batch_init(&b);
    b.batch_size = r->count;
    b.seq_len = CONTEXT;
    b.tokens = r->tokens;
    b.lengths = r->lengths;
    return b;
}

/* ========================================================================= */
/* Progress: a bar with rate and ETA on a terminal, a line per 10% otherwise */
/* ========================================================================= */

typedef struct progress {
    const char *label;
    int total;
    double start, last_draw;
    int tty;
    int next_decile; /* non-TTY: print when done reaches this tenth */
} progress;

static void progress_start(progress *p, const char *label, int total)
{
    p->label = label;
    p->total = total;
    p->start = p->last_draw = ex_now_seconds();
    p->tty = isatty(fileno(stderr));
    p->next_decile = 1;
}

static void format_duration(char *buf, size_t n, double seconds)
{
    int s = seconds < 0 || !isfinite(seconds) ? 0 : (int)(seconds + 0.5);
    snprintf(buf, n, "%d:%02d", s / 60, s % 60);
}

/* Redraws the bar (TTY) or prints a line at each 10% (log files, CI). */
static void progress_update(progress *p, int done, const char *metrics)
{
    double t = ex_now_seconds(), elapsed = t - p->start;
    double rate = elapsed > 0 ? done / elapsed : 0;
    char eta[16], bar[21], speed[24];
    format_duration(eta, sizeof eta, rate > 0 ? (p->total - done) / rate : 0);
    if (rate >= 1 || rate <= 0)
        snprintf(speed, sizeof speed, "%5.1f it/s", rate);
    else
        snprintf(speed, sizeof speed, "%5.2f s/it", 1 / rate); /* slow steps read better as seconds each */
    int filled = p->total > 0 ? 20 * done / p->total : 20;
    for (int i = 0; i < 20; i++) bar[i] = i < filled ? '#' : '.';
    bar[20] = '\0';
    if (p->tty) {
        if (done < p->total && t - p->last_draw < 0.1) return; /* at most 10 redraws a second */
        p->last_draw = t;
        fprintf(stderr, "\r  %-8s [%s] %3d%% %4d/%-4d %s  ETA %s  %s\033[K", p->label, bar, 100 * done / p->total,
                done, p->total, speed, eta, metrics);
        if (done == p->total) fputc('\n', stderr);
    } else {
        if (done * 10 < p->next_decile * p->total && done != p->total) return;
        while (p->next_decile * p->total <= done * 10) p->next_decile++;
        fprintf(stderr, "  %-8s %3d%% %4d/%-4d %s  ETA %s  %s\n", p->label, 100 * done / p->total, done, p->total,
                speed, eta, metrics);
    }
    fflush(stderr);
}

/* ========================================================================= */
/* What the stages report                                                    */
/* ========================================================================= */

typedef struct demo_results {
    float pretrain_loss_start, pretrain_loss_end;
    double pretrain_seconds;
    float reward_acc_start, reward_acc_end;
    double reward_seconds;
    float rl_reward_start, rl_reward_end, rl_kl_end, rl_entropy_start, rl_entropy_end;
    float rules_before, rules_after;   /* held-out prompts: fraction of replies that follow all rules */
    float reward_before, reward_after; /* held-out prompts: mean reward of the replies */
    float broken_before[N_RULES], broken_after[N_RULES]; /* held-out prompts: fraction breaking each rule */
    double rl_seconds;
    int plot_written;
    int pretrain_skipped;                        /* the base came from --base */
    size_t reward_params, policy_params;         /* trainable parameters */
    double reward_step_seconds, rl_step_seconds; /* medians over the stage's steps */
    double reward_peak_rss_mb, rl_peak_rss_mb;   /* process high-water mark at the end of the stage */
} demo_results;

/* ========================================================================= */
/* Stage 1: pretrain a tiny byte-level Llama with the FULL engine            */
/* ========================================================================= */

static void tiny_llama_config(perl_model_config *cfg, const demo_plan *plan)
{
    perl_model_config_init(cfg);
    cfg->dim = plan->model_dim;
    cfg->hidden_dim = plan->model_hidden_dim;
    cfg->n_layers = plan->model_layers;
    cfg->n_heads = plan->model_heads;
    cfg->n_kv_heads = plan->model_heads;
    cfg->head_dim = 0;
    cfg->vocab_size = VOCAB_SIZE;
    cfg->max_seq_len = CONTEXT;
    cfg->tied_embeddings = 1;
    cfg->bos_token_id = TOKEN_BOS;
    cfg->eos_token_id = TOKEN_EOS;
}

/* Trains every weight of a random model on generated dialogs, then freezes
 * the result into *out_base (an independent model). */
static int stage_pretrain(const demo_plan *plan, const demo_options *opt, perl_model **out_base,
                          demo_results *res)
{
    perl_model_config cfg;
    tiny_llama_config(&cfg, plan);
    perl_model *init = NULL;
    TRY(perl_model_create_random(&init, &cfg, opt->seed));
    fprintf(stderr, "\n[1/3] pretrain: a byte-level Llama (dim %d, %d layers, %d heads, %zu parameters) "
                    "from random weights, FULL fine-tuning\n",
            cfg.dim, cfg.n_layers, cfg.n_heads, perl_model_num_params(init));

    /* FULL mode: the adapter holds a private trainable copy of every weight. */
    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.mode = LIBPERL_MODE_FULL;
    lo.train_embeddings = 1;
    lo.seed = opt->seed;
    perl_lora *full = NULL;
    int rc = check(perl_lora_create(&full, init, &lo), "perl_lora_create (FULL)");

    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = plan->pretrain_lr;
    oo.weight_decay = 0.01f;
    oo.schedule = LIBPERL_LR_COSINE;
    oo.warmup_steps = plan->pretrain_steps / 20;
    oo.total_steps = plan->pretrain_steps;
    oo.min_lr_ratio = 0.1f;
    if (rc == LIBPERL_OK) rc = check(perl_lora_set_optimizer(full, &oo), "perl_lora_set_optimizer");

    token_rows rows;
    rows_init(&rows, plan->pretrain_batch);
    demo_rng rng = {opt->seed ^ 0x5eedda7aull};
    progress bar;
    progress_start(&bar, "pretrain", plan->pretrain_steps);
    double loss_sum = 0; /* running mean over the last tenth of the steps */
    int loss_count = 0, tail_from = plan->pretrain_steps - plan->pretrain_steps / 10;
    float smoothed = 0;
    for (int step = 0; rc == LIBPERL_OK && step < plan->pretrain_steps; step++) {
        rows.count = 0;
        for (int i = 0; i < plan->pretrain_batch; i++) {
            char prompt[TEXT_CAP], reply[TEXT_CAP];
            order o = random_order(&rng);
            write_prompt(prompt, sizeof prompt, &o);
            write_reply(reply, sizeof reply, &o, random_pretrain_kind(&rng), &rng);
            rows_add_text(&rows, prompt, reply, 1);
        }
        perl_batch batch = rows_batch(&rows);
        perl_step_stats st;
        perl_step_stats_init(&st);
        rc = check(perl_lora_sft_step(full, &batch, NULL /* every next token */, &st), "perl_lora_sft_step");
        if (rc != LIBPERL_OK) break;
        if (step == 0) res->pretrain_loss_start = smoothed = st.loss;
        smoothed = 0.9f * smoothed + 0.1f * st.loss;
        if (step >= tail_from) loss_sum += st.loss, loss_count++;
        char metrics[96];
        snprintf(metrics, sizeof metrics, "loss %.3f  next-byte acc %.2f", smoothed, st.accuracy);
        progress_update(&bar, step + 1, metrics);
    }
    res->pretrain_loss_end = loss_count ? (float)(loss_sum / loss_count) : res->pretrain_loss_start;
    res->pretrain_seconds = ex_now_seconds() - bar.start;
    rows_free(&rows);

    /* Freeze: a FULL adapter merges into an independent model. */
    if (rc == LIBPERL_OK) rc = check(perl_lora_merge(out_base, full), "perl_lora_merge");
    perl_lora_free(full);
    perl_model_free(init);
    if (rc == LIBPERL_OK)
        fprintf(stderr, "  loss %.3f -> %.3f nats/byte in %.1f s; frozen as the base model\n",
                res->pretrain_loss_start, res->pretrain_loss_end, res->pretrain_seconds);
    return rc;
}

/* ========================================================================= */
/* Stage 2: a LoRA reward model trained on preference pairs                  */
/* ========================================================================= */

/* Preference pairs: for the same order, a good reply (chosen) and one that
 * breaks one rule (rejected). */
typedef struct pair_set {
    token_rows chosen, rejected;
    int *broken_rule; /* [capacity] index into RULE_NAMES of the rule the rejected side breaks */
} pair_set;

static void pairs_init(pair_set *p, int capacity)
{
    rows_init(&p->chosen, capacity);
    rows_init(&p->rejected, capacity);
    p->broken_rule = xcalloc((size_t)capacity, sizeof(int));
}

static void pairs_free(pair_set *p)
{
    rows_free(&p->chosen);
    rows_free(&p->rejected);
    free(p->broken_rule);
}

/* Which rule a rejected reply breaks.  Politeness and repetition are learnt
 * from a few dozen pairs; checking the size and the milk means comparing the
 * reply with the prompt, so training draws those pairs more often. */
static reply_kind random_rejected_kind(demo_rng *r, int favour_hard_rules)
{
    if (!favour_hard_rules) return (reply_kind)(1 + rng_below(r, 4));
    float u = rng_uniform(r);
    return u < 0.45f ? REPLY_WRONG_SIZE : u < 0.80f ? REPLY_WRONG_MILK : u < 0.90f ? REPLY_RUDE : REPLY_REPEATS;
}

/* Fills p with n pairs.  They are minimal pairs (the same random choices of
 * wording on both sides), so the only difference is the broken rule. */
static void make_pairs(pair_set *p, int n, int favour_hard_rules, demo_rng *rng)
{
    p->chosen.count = p->rejected.count = 0;
    for (int i = 0; i < n; i++) {
        char prompt[TEXT_CAP], good[TEXT_CAP], bad[TEXT_CAP];
        order o = random_order(rng);
        reply_kind broken = random_rejected_kind(rng, favour_hard_rules);
        demo_rng wording = {rng_next(rng)};
        demo_rng same_wording = wording;
        write_prompt(prompt, sizeof prompt, &o);
        write_reply(good, sizeof good, &o, REPLY_GOOD, &wording);
        write_reply(bad, sizeof bad, &o, broken, &same_wording);
        rows_add_text(&p->chosen, prompt, good, 1);
        rows_add_text(&p->rejected, prompt, bad, 1);
        p->broken_rule[i] = (int)broken - 1;
    }
}

/* Held-out accuracy, overall and per broken rule: the fraction of pairs
 * where r(chosen) > r(rejected). */
static int reward_accuracy(perl_reward *rm, const pair_set *p, float *out, float out_per_rule[N_RULES])
{
    int n = p->chosen.count, correct = 0, rule_correct[N_RULES] = {0}, rule_count[N_RULES] = {0};
    float *score_chosen = xcalloc((size_t)n, sizeof(float));
    float *score_rejected = xcalloc((size_t)n, sizeof(float));
    perl_batch chosen = rows_batch(&p->chosen), rejected = rows_batch(&p->rejected);
    int rc = check(perl_reward_score(rm, &chosen, score_chosen), "perl_reward_score");
    if (rc == LIBPERL_OK) rc = check(perl_reward_score(rm, &rejected, score_rejected), "perl_reward_score");
    for (int i = 0; i < n; i++) {
        int ok = score_chosen[i] > score_rejected[i];
        correct += ok;
        rule_correct[p->broken_rule[i]] += ok;
        rule_count[p->broken_rule[i]]++;
    }
    *out = (float)correct / (float)n;
    for (int k = 0; k < N_RULES && out_per_rule; k++)
        out_per_rule[k] = rule_count[k] ? (float)rule_correct[k] / (float)rule_count[k] : 0.0f;
    free(score_chosen);
    free(score_rejected);
    return rc;
}

/* The adapter of the reward model and of the policy: LoRA rank 16 on all
 * seven projections of every layer (the base is tiny, so this is still ~40k
 * parameters), or with --full a private trainable copy of every layer weight
 * (the embeddings stay frozen, as in the paper's full fine-tuning baseline). */
static void adapter_options(perl_lora_options *lo, uint64_t seed, int full)
{
    perl_lora_options_init(lo);
    lo->mode = full ? LIBPERL_MODE_FULL : LIBPERL_MODE_LORA;
    lo->rank = 16;
    lo->alpha = 32;
    lo->target_modules = LIBPERL_TARGET_ALL;
    lo->seed = seed;
}

static const char *adapter_kind(const demo_options *opt)
{
    return opt->full ? "FULL fine-tuning" : "LoRA";
}

/* Creates *out_lora and *out_rm on the frozen base and trains them. */
static int stage_reward(const demo_plan *plan, const demo_options *opt, perl_model *base, perl_lora **out_lora,
                        perl_reward **out_rm, demo_results *res)
{
    perl_lora_options lo;
    adapter_options(&lo, opt->seed + 1, opt->full);
    TRY(perl_lora_create(out_lora, base, &lo));
    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = opt->full ? plan->reward_lr_full : plan->reward_lr;
    oo.schedule = LIBPERL_LR_COSINE;
    oo.warmup_steps = plan->reward_steps / 20;
    oo.total_steps = plan->reward_steps;
    oo.min_lr_ratio = 0.1f;
    TRY(perl_lora_set_optimizer(*out_lora, &oo));
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.center_coef = 0.01f; /* keeps scores near zero, so rewards read easily */
    ro.seed = opt->seed + 2;
    TRY(perl_reward_create(out_rm, base, *out_lora, &ro));
    res->reward_params = perl_lora_num_params(*out_lora);
    if (opt->full)
        fprintf(stderr, "\n[2/3] reward model: FULL fine-tuning of a copy of the base + a scalar head (%zu trainable "
                        "parameters), pairwise Bradley-Terry\n",
                res->reward_params);
    else
        fprintf(stderr, "\n[2/3] reward model: LoRA r=%d on the frozen base + a scalar head (%zu trainable "
                        "parameters), pairwise Bradley-Terry\n",
                lo.rank, res->reward_params);

    /* Held-out pairs come from their own stream, so they are never trained
     * on, and test the four rules equally often. */
    pair_set eval, train;
    pairs_init(&eval, plan->reward_eval_pairs);
    pairs_init(&train, plan->reward_batch);
    demo_rng eval_rng = {opt->seed ^ 0xe7a1e7a1ull}, train_rng = {opt->seed ^ 0x7a1a7a1aull};
    make_pairs(&eval, plan->reward_eval_pairs, 0, &eval_rng);
    float per_rule[N_RULES];
    int rc = reward_accuracy(*out_rm, &eval, &res->reward_acc_start, per_rule);

    progress bar;
    progress_start(&bar, "reward", plan->reward_steps);
    float smoothed_acc = 0.5f, smoothed_loss = 0.693f;
    double *step_seconds = xcalloc((size_t)plan->reward_steps, sizeof(double));
    int steps_done = 0;
    for (int step = 0; rc == LIBPERL_OK && step < plan->reward_steps; step++) {
        double step_start = ex_now_seconds();
        make_pairs(&train, plan->reward_batch, 1, &train_rng);
        perl_batch chosen = rows_batch(&train.chosen), rejected = rows_batch(&train.rejected);
        perl_reward_stats st;
        perl_reward_stats_init(&st);
        rc = check(perl_reward_step_pairwise(*out_rm, &chosen, &rejected, NULL, NULL, NULL, &st),
                   "perl_reward_step_pairwise");
        if (rc != LIBPERL_OK) break;
        step_seconds[steps_done++] = ex_now_seconds() - step_start;
        smoothed_acc = 0.9f * smoothed_acc + 0.1f * st.accuracy;
        smoothed_loss = 0.9f * smoothed_loss + 0.1f * st.loss;
        char metrics[96];
        snprintf(metrics, sizeof metrics, "loss %.3f  train acc %.2f  margin %+.2f", smoothed_loss, smoothed_acc,
                 st.mean_margin);
        progress_update(&bar, step + 1, metrics);
    }
    if (rc == LIBPERL_OK) rc = reward_accuracy(*out_rm, &eval, &res->reward_acc_end, per_rule);
    res->reward_seconds = ex_now_seconds() - bar.start;
    res->reward_step_seconds = median_seconds(step_seconds, steps_done);
    res->reward_peak_rss_mb = ex_peak_rss_mb();
    free(step_seconds);
    if (rc == LIBPERL_OK) {
        fprintf(stderr, "  held-out accuracy %.1f%% -> %.1f%% on %d pairs (chance 50%%) in %.1f s; by broken rule:",
                100 * res->reward_acc_start, 100 * res->reward_acc_end, plan->reward_eval_pairs, res->reward_seconds);
        for (int k = 0; k < N_RULES; k++) fprintf(stderr, "%s %s %.0f%%", k ? "," : "", RULE_NAMES[k], 100 * per_rule[k]);
        fputc('\n', stderr);
    }
    pairs_free(&eval);
    pairs_free(&train);
    return rc;
}

/* ========================================================================= */
/* Sampling replies and scoring them                                         */
/* ========================================================================= */

#define MAX_NEW_TOKENS 64

/* A batch of sampled replies to prompts, with what we learn about them. */
typedef struct rollout {
    int n;                  /* rows */
    order *orders;          /* [n] */
    token_rows prompts;     /* BOS + prompt */
    int32_t *responses;     /* [n, MAX_NEW_TOKENS] as sampled (pad 0 after the end) */
    int32_t *response_lengths;
    float *logprobs;        /* [n, MAX_NEW_TOKENS] from the sampler */
    float *rewards;         /* [n] reward-model scores */
    int *broken;            /* [n] broken-rule masks (for people; the policy never sees them) */
} rollout;

static void rollout_init(rollout *r, int n)
{
    r->n = n;
    r->orders = xcalloc((size_t)n, sizeof(order));
    rows_init(&r->prompts, n);
    r->responses = xcalloc((size_t)n * MAX_NEW_TOKENS, sizeof(int32_t));
    r->response_lengths = xcalloc((size_t)n, sizeof(int32_t));
    r->logprobs = xcalloc((size_t)n * MAX_NEW_TOKENS, sizeof(float));
    r->rewards = xcalloc((size_t)n, sizeof(float));
    r->broken = xcalloc((size_t)n, sizeof(int));
}

static void rollout_free(rollout *r)
{
    free(r->orders);
    rows_free(&r->prompts);
    free(r->responses);
    free(r->response_lengths);
    free(r->logprobs);
    free(r->rewards);
    free(r->broken);
}

/* Sets the prompts: n / group distinct orders, each repeated group times
 * (consecutive rows, as RLOO expects). */
static void rollout_set_prompts(rollout *r, int group, demo_rng *rng)
{
    r->prompts.count = 0;
    for (int i = 0; i < r->n; i += group) {
        order o = random_order(rng);
        char prompt[TEXT_CAP];
        write_prompt(prompt, sizeof prompt, &o);
        for (int j = 0; j < group && i + j < r->n; j++) {
            r->orders[i + j] = o;
            rows_add_text(&r->prompts, prompt, NULL, 0);
        }
    }
}

/* The reply text of row i. */
static void rollout_reply(const rollout *r, int i, char *buf, size_t n)
{
    decode_tokens(buf, n, r->responses + (size_t)i * MAX_NEW_TOKENS, r->response_lengths[i]);
}

/* Samples replies with `adapter` (NULL: the frozen base), scores them with the
 * reward model on prompt + reply, and checks them against the rules. */
static int rollout_sample(rollout *r, perl_model *base, const perl_lora *adapter, perl_reward *rm, uint64_t seed)
{
    perl_batch prompts = rows_batch(&r->prompts);
    perl_generate_options go;
    perl_generate_options_init(&go);
    go.max_new_tokens = MAX_NEW_TOKENS;
    go.temperature = 1.0f;
    go.seed = seed;
    const int32_t stop = TOKEN_EOS;
    go.stop_tokens = &stop;
    go.n_stop_tokens = 1;
    TRY(perl_generate(base, adapter, &prompts, &go, r->responses, r->response_lengths, r->logprobs));

    /* Score prompt + reply (the reply ends with EOS when the model stopped). */
    token_rows full;
    rows_init(&full, r->n);
    for (int i = 0; i < r->n; i++) {
        int32_t *row = rows_row(&full, i), *resp = r->responses + (size_t)i * MAX_NEW_TOKENS;
        int len = r->prompts.lengths[i];
        memcpy(row, rows_row(&r->prompts, i), (size_t)len * sizeof(int32_t));
        for (int t = 0; t < r->response_lengths[i] && len < CONTEXT; t++) row[len++] = resp[t];
        for (int t = r->response_lengths[i]; t < MAX_NEW_TOKENS; t++) resp[t] = TOKEN_PAD; /* was -1 */
        full.lengths[i] = len;
        full.count++;
        char reply[TEXT_CAP];
        rollout_reply(r, i, reply, sizeof reply);
        r->broken[i] = broken_rules(&r->orders[i], reply);
    }
    perl_batch scored = rows_batch(&full);
    int rc = check(perl_reward_score(rm, &scored, r->rewards), "perl_reward_score");
    rows_free(&full);
    return rc;
}

static float rollout_rule_rate(const rollout *r)
{
    int good = 0;
    for (int i = 0; i < r->n; i++) good += r->broken[i] == 0;
    return (float)good / (float)r->n;
}

static float rollout_mean_reward(const rollout *r)
{
    double s = 0;
    for (int i = 0; i < r->n; i++) s += r->rewards[i];
    return (float)(s / r->n);
}

/* Samples `plan->eval_replies` replies to fixed prompts, prints the first few,
 * and returns the fraction that follow all rules. */
static int show_samples(const char *title, const demo_plan *plan, const demo_options *opt, perl_model *base,
                        const perl_lora *adapter, perl_reward *rm, float *out_rule_rate, float *out_reward,
                        float out_broken[N_RULES])
{
    rollout r;
    rollout_init(&r, plan->eval_replies);
    demo_rng rng = {opt->seed ^ 0x5a3b1e5ull}; /* the same prompts before and after RL */
    rollout_set_prompts(&r, 1, &rng);
    int rc = rollout_sample(&r, base, adapter, rm, opt->seed ^ 0xfeedull);
    if (rc == LIBPERL_OK) {
        *out_rule_rate = rollout_rule_rate(&r);
        *out_reward = rollout_mean_reward(&r);
        printf("\n%s (temperature 1; %d replies, %.0f%% follow all four rules, mean reward %+.2f)\n  broken:",
               title, r.n, 100 * *out_rule_rate, *out_reward);
        for (int k = 0; k < N_RULES; k++) {
            int count = 0;
            for (int i = 0; i < r.n; i++) count += (r.broken[i] >> k) & 1;
            out_broken[k] = (float)count / (float)r.n;
            printf("%s %s %.0f%%", k ? "," : "", RULE_NAMES[k], 100 * out_broken[k]);
        }
        printf("\n");
        for (int i = 0; i < 5 && i < r.n; i++) {
            char prompt[TEXT_CAP], reply[TEXT_CAP], verdict[96];
            write_prompt(prompt, sizeof prompt, &r.orders[i]);
            rollout_reply(&r, i, reply, sizeof reply);
            describe_rules(verdict, sizeof verdict, r.broken[i]);
            *strchr(prompt, '\n') = '\0';
            printf("  %s\n  barista:%-48s  reward %+5.2f  %s\n", prompt, reply, r.rewards[i], verdict);
        }
        fflush(stdout);
    }
    rollout_free(&r);
    return rc;
}

/* ========================================================================= */
/* Stage 3: RL on a LoRA policy with KL to the frozen base                   */
/* ========================================================================= */

static int write_csv_header(FILE *csv)
{
    return fprintf(csv, "step,mean_reward,std_reward,kl,kl_coef,entropy,response_length,loss,grad_norm,lr,"
                        "rule_pass_rate,seconds\n") < 0 ? -1 : 0;
}

static int stage_rl(const demo_plan *plan, const demo_options *opt, perl_model *base, perl_reward *rm,
                    perl_lora **out_policy, const char *csv_path, demo_results *res)
{
    perl_lora_options lo;
    adapter_options(&lo, opt->seed + 3, opt->full);
    TRY(perl_lora_create(out_policy, base, &lo));
    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = opt->full ? plan->rl_lr_full : plan->rl_lr;
    TRY(perl_lora_set_optimizer(*out_policy, &oo));

    /* RLOO: group_size replies per prompt, each judged against the mean of the
     * others; KL to the base (the adapter switched off) is folded into the reward. */
    perl_policy_options po;
    perl_policy_options_init(&po);
    po.algorithm = LIBPERL_PG_RLOO;
    po.group_size = plan->rl_group;
    po.kl_coef = plan->rl_kl_coef;
    po.kl_estimator = LIBPERL_KL_K1;
    po.kl_mode = LIBPERL_KL_IN_REWARD;
    perl_policy_trainer *trainer = NULL;
    TRY(perl_policy_create(&trainer, base, *out_policy, NULL, &po));
    res->policy_params = perl_lora_num_params(*out_policy);
    fprintf(stderr, "\n[3/3] RL: %s policy (%zu trainable parameters), RLOO with %d replies per prompt, "
                    "%d prompts per step, KL coefficient %.2g toward the frozen base\n",
            adapter_kind(opt), res->policy_params, plan->rl_group, plan->rl_prompts, plan->rl_kl_coef);

    FILE *csv = fopen(csv_path, "w");
    if (csv == NULL || write_csv_header(csv) != 0) {
        fprintf(stderr, "perl_demo: cannot write %s: %s\n", csv_path, strerror(errno));
        if (csv) fclose(csv);
        perl_policy_free(trainer);
        return LIBPERL_ERR_IO;
    }

    rollout r;
    rollout_init(&r, plan->rl_prompts * plan->rl_group);
    demo_rng rng = {opt->seed ^ 0x21ull};
    progress bar;
    progress_start(&bar, "rl", plan->rl_steps);
    int window = plan->rl_steps / 10 > 0 ? plan->rl_steps / 10 : 1; /* start/end = mean of the first/last tenth */
    double first_sum = 0, last_sum = 0;
    double *step_seconds = xcalloc((size_t)plan->rl_steps, sizeof(double));
    int steps_done = 0;
    int rc = LIBPERL_OK;
    for (int step = 0; step < plan->rl_steps; step++) {
        double step_start = ex_now_seconds();
        /* 1. sample replies from the current policy and score them */
        rollout_set_prompts(&r, plan->rl_group, &rng);
        rc = rollout_sample(&r, base, *out_policy, rm, opt->seed * 1000003ull + (uint64_t)step);
        if (rc != LIBPERL_OK) break;
        /* 2. one policy-gradient step on them */
        perl_batch prompts = rows_batch(&r.prompts);
        perl_policy_stats st;
        perl_policy_stats_init(&st);
        rc = check(perl_policy_step(trainer, &prompts, r.responses, r.response_lengths, MAX_NEW_TOKENS, r.rewards,
                                    r.logprobs, &st),
                   "perl_policy_step");
        if (rc != LIBPERL_OK) break;
        step_seconds[steps_done++] = ex_now_seconds() - step_start;
        /* 3. metrics */
        float rules = rollout_rule_rate(&r);
        fprintf(csv, "%d,%.5f,%.5f,%.5f,%.5f,%.5f,%.2f,%.5f,%.5f,%.6g,%.4f,%.2f\n", step + 1, st.mean_reward,
                st.std_reward, st.kl, st.kl_coef, st.entropy, st.response_length, st.loss, st.grad_norm, st.lr,
                rules, ex_now_seconds() - bar.start);
        if (step < window) first_sum += st.mean_reward;
        if (step >= plan->rl_steps - window) last_sum += st.mean_reward;
        if (step == 0) res->rl_entropy_start = st.entropy;
        res->rl_entropy_end = st.entropy;
        res->rl_kl_end = st.kl;
        char metrics[128];
        snprintf(metrics, sizeof metrics, "reward %+.2f  KL %.2f  entropy %.2f  len %.0f  rules ok %3.0f%%",
                 st.mean_reward, st.kl, st.entropy, st.response_length, 100 * rules);
        progress_update(&bar, step + 1, metrics);
    }
    res->rl_reward_start = (float)(first_sum / window);
    res->rl_reward_end = (float)(last_sum / window);
    res->rl_seconds = ex_now_seconds() - bar.start;
    res->rl_step_seconds = median_seconds(step_seconds, steps_done);
    res->rl_peak_rss_mb = ex_peak_rss_mb();
    free(step_seconds);
    if (fclose(csv) != 0 && rc == LIBPERL_OK) {
        fprintf(stderr, "perl_demo: cannot write %s: %s\n", csv_path, strerror(errno));
        rc = LIBPERL_ERR_IO;
    }
    if (rc == LIBPERL_OK)
        fprintf(stderr, "  mean reward %+.2f -> %+.2f (first/last tenth of the steps), KL %.2f, in %.1f s\n",
                res->rl_reward_start, res->rl_reward_end, res->rl_kl_end, res->rl_seconds);
    rollout_free(&r);
    perl_policy_free(trainer);
    return rc;
}

/* ========================================================================= */
/* The plot: reward and KL over RL steps, with gnuplot when it is installed  */
/* ========================================================================= */

/* Is `program` an executable on $PATH? */
static int on_path(const char *program)
{
    const char *path = getenv("PATH");
    char dir[4096], full[4352];
    while (path && *path) {
        size_t n = strcspn(path, ":");
        snprintf(dir, sizeof dir, "%.*s", (int)n, path);
        snprintf(full, sizeof full, "%s/%s", n ? dir : ".", program);
        if (access(full, X_OK) == 0) return 1;
        path += n + (path[n] == ':');
    }
    return 0;
}

/* Writes s as a gnuplot single-quoted string ('' stands for a quote). */
static void gnuplot_quoted(FILE *f, const char *s)
{
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', f);
        fputc(*s, f);
    }
    fputc('\'', f);
}

/* Returns 1 when the PNG was written, 0 when gnuplot is missing or failed. */
static int plot_curves(const char *csv_path, const char *gp_path, const char *png_path)
{
    if (!on_path("gnuplot")) {
        printf("\nplot skipped: gnuplot is not installed (apt-get install gnuplot-nox, or run `make demo` as "
               "root: scripts/deps.sh installs it); the numbers are in %s\n",
               csv_path);
        return 0;
    }
    FILE *gp = fopen(gp_path, "w");
    if (gp == NULL) {
        fprintf(stderr, "perl_demo: cannot write %s: %s\n", gp_path, strerror(errno));
        return 0;
    }
    /* pngcairo draws nicer lines; the plain png terminal exists more widely. */
    fprintf(gp, "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,500 } "
                "else { set terminal png size 900,500 }\n");
    fprintf(gp, "set output ");
    gnuplot_quoted(gp, png_path);
    fprintf(gp, "\nset datafile separator ','\n"
                "set title 'PERL demo: RL on a LoRA policy (thin: each step, thick: smoothed)'\n"
                "set xlabel 'RL step'\nset ylabel 'mean reward'\nset y2label 'KL to the frozen base (per reply)'\n"
                "set ytics nomirror\nset y2tics\nset key top left\nset grid\n");
    /* each step is noisy (32 replies to 8 new orders), so a smoothed curve is drawn over the raw one */
    static const char *const series[] = {
        "using 1:2 skip 1 with lines linewidth 1 linecolor rgb '#cdb4e6' notitle",
        "using 1:2 skip 1 smooth bezier linewidth 3 linecolor rgb '#6a1b9a' title 'mean reward'",
        "using 1:4 skip 1 axes x1y2 with lines linewidth 1 linecolor rgb '#a8dccf' notitle",
        "using 1:4 skip 1 axes x1y2 smooth bezier linewidth 3 linecolor rgb '#00796b' title 'KL (right axis)'"};
    fprintf(gp, "plot ");
    for (int i = 0; i < 4; i++) {
        gnuplot_quoted(gp, csv_path);
        fprintf(gp, " %s%s", series[i], i < 3 ? ", \\\n     " : "\n");
    }
    if (fclose(gp) != 0) return 0;

    char *argv[] = {"gnuplot", (char *)gp_path, NULL};
    pid_t pid;
    int status;
    if (posix_spawnp(&pid, "gnuplot", NULL, NULL, argv, environ) != 0 || waitpid(pid, &status, 0) < 0 ||
        !WIFEXITED(status) || WEXITSTATUS(status) != 0 || file_size(png_path) <= 0) {
        printf("\nplot skipped: gnuplot failed on %s\n", gp_path);
        return 0;
    }
    return 1;
}

/* ========================================================================= */
/* Command line and main                                                     */
/* ========================================================================= */

static void usage(FILE *f)
{
    fprintf(f, "usage: perl_demo [--quick] [--seed N] [--threads N] [--out DIR] [--base DIR] [--full] [--json FILE]\n"
               "  --quick      a few steps per stage (about 30 s; for tests)\n"
               "  --seed N     seed for data, weights and sampling (default 1)\n"
               "  --threads N  threads for libperl and the BLAS (default: all cores)\n"
               "  --out DIR    output directory (default build/demo)\n"
               "  --base DIR   skip pretraining: load this base (e.g. build/demo/base_model)\n"
               "  --full       reward model and policy by full fine-tuning instead of LoRA\n"
               "               (the PERL comparison, docs/perl-comparison.md)\n"
               "  --json FILE  also write the results (quality, seconds per step, peak RSS) as JSON\n");
}

static int parse_args(int argc, char **argv, demo_options *o)
{
    o->quick = 0;
    o->seed = 1;
    o->threads = 0;
    o->full = 0;
    o->out_dir = "build/demo";
    o->base_dir = NULL;
    o->json_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (strcmp(a, "--quick") == 0) {
            o->quick = 1;
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(EXIT_SUCCESS);
        } else if (strcmp(a, "--seed") == 0 && value) {
            o->seed = strtoull(value, &end, 10), i++;
        } else if (strcmp(a, "--threads") == 0 && value) {
            o->threads = (int)strtol(value, &end, 10), i++;
        } else if (strcmp(a, "--out") == 0 && value && value[0]) {
            o->out_dir = value, i++;
        } else if (strcmp(a, "--base") == 0 && value && value[0]) {
            o->base_dir = value, i++;
        } else if (strcmp(a, "--json") == 0 && value && value[0]) {
            o->json_path = value, i++;
        } else if (strcmp(a, "--full") == 0) {
            o->full = 1;
        } else {
            fprintf(stderr, "perl_demo: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return -1;
        }
        if (end != NULL && (*end != '\0' || end == value)) {
            fprintf(stderr, "perl_demo: '%s' needs a number, not '%s'\n", a, value);
            return -1;
        }
    }
    return 0;
}

/* The results as one JSON object, for bench/demo_comparison.sh. */
static int write_json(const char *path, const demo_options *o, const demo_results *r)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "perl_demo: cannot write %s: %s\n", path, strerror(errno));
        return LIBPERL_ERR_IO;
    }
    fprintf(f,
            "{\"bench\": \"perl_demo\", \"mode\": \"%s\", \"precision\": \"fp32\", \"seed\": %llu, "
            "\"threads\": %d, \"quick\": %d,\n"
            " \"reward_params\": %zu, \"reward_acc_start\": %.4f, \"reward_acc_end\": %.4f, "
            "\"reward_step_s\": %.5f, \"reward_stage_s\": %.2f, \"reward_peak_rss_mb\": %.1f,\n"
            " \"policy_params\": %zu, \"rl_reward_start\": %.4f, \"rl_reward_end\": %.4f, \"rl_kl_end\": %.4f, "
            "\"heldout_reward_before\": %.4f, \"heldout_reward_after\": %.4f, \"rules_before\": %.4f, "
            "\"rules_after\": %.4f, \"rl_step_s\": %.5f, \"rl_stage_s\": %.2f, \"rl_peak_rss_mb\": %.1f}\n",
            o->full ? "full" : "lora", (unsigned long long)o->seed, perl_get_num_threads(), o->quick,
            r->reward_params, r->reward_acc_start, r->reward_acc_end, r->reward_step_seconds, r->reward_seconds,
            r->reward_peak_rss_mb, r->policy_params, r->rl_reward_start, r->rl_reward_end, r->rl_kl_end,
            r->reward_before, r->reward_after, r->rules_before, r->rules_after, r->rl_step_seconds, r->rl_seconds,
            r->rl_peak_rss_mb);
    if (fclose(f) != 0) {
        fprintf(stderr, "perl_demo: cannot write %s: %s\n", path, strerror(errno));
        return LIBPERL_ERR_IO;
    }
    return LIBPERL_OK;
}

/* Did each stage improve on its starting point?  Prints the summary table.
 * The reward model starts as a random function of the text (chance is 50%),
 * so it must end clearly above chance; RL is judged on held-out prompts. */
static int summarize(const demo_results *r, double total_seconds)
{
    int pretrain_ok = r->pretrain_skipped || r->pretrain_loss_end < 0.8f * r->pretrain_loss_start;
    int reward_ok = r->reward_acc_end >= 0.6f && r->reward_acc_end > r->reward_acc_start;
    int rl_ok = r->reward_after > r->reward_before;
    printf("\nSummary\n"
           "  stage     metric                                 start      end   time  verdict\n"
           "  pretrain  loss (nats per byte)                %8.3f %8.3f %5.0fs  %s\n"
           "  reward    held-out pair accuracy (chance 50%%) %7.1f%% %7.1f%% %5.0fs  %s\n"
           "  rl        mean reward, held-out prompts       %+8.2f %+8.2f %5.0fs  %s\n"
           "  rl        mean reward while training          %+8.2f %+8.2f\n"
           "  rl        KL to the frozen base (per reply)   %8.2f %8.2f\n"
           "  rl        entropy (per token)                 %8.2f %8.2f\n"
           "  rl        replies following all four rules    %7.0f%% %7.0f%%\n",
           r->pretrain_loss_start, r->pretrain_loss_end, r->pretrain_seconds,
           r->pretrain_skipped ? "loaded" : pretrain_ok ? "improved" : "FAILED",
           100 * r->reward_acc_start, 100 * r->reward_acc_end, r->reward_seconds, reward_ok ? "improved" : "FAILED",
           r->reward_before, r->reward_after, r->rl_seconds, rl_ok ? "improved" : "FAILED", r->rl_reward_start,
           r->rl_reward_end, 0.0, r->rl_kl_end, r->rl_entropy_start, r->rl_entropy_end, 100 * r->rules_before,
           100 * r->rules_after);
    for (int k = 0; k < N_RULES; k++) {
        char label[64];
        snprintf(label, sizeof label, "  ... breaking \"%s\"", RULE_NAMES[k]);
        printf("  rl        %-36s%7.0f%% %7.0f%%\n", label, 100 * r->broken_before[k], 100 * r->broken_after[k]);
    }
    printf("  total %.0f s on %d thread%s\n", total_seconds, perl_get_num_threads(),
           perl_get_num_threads() == 1 ? "" : "s");
    return pretrain_ok && reward_ok && rl_ok;
}

/* The whole demo; returns the process exit status. */
static int run_demo(const demo_options *o, const demo_plan *p)
{
    demo_options opt = *o;
    demo_plan plan = *p;
    double t0 = ex_now_seconds();

    if (perl_version_number() != LIBPERL_VERSION_NUMBER) {
        fprintf(stderr, "perl_demo: built against libperl %s but running with %s\n", LIBPERL_VERSION_STRING,
                perl_version());
        return 1;
    }
    if (check(perl_set_num_threads(opt.threads), "perl_set_num_threads") != LIBPERL_OK) return 1;
    if (make_dirs(opt.out_dir) != 0) {
        fprintf(stderr, "perl_demo: cannot create %s: %s\n", opt.out_dir, strerror(errno));
        return 1;
    }
    char base_dir[4096], reward_dir[4096], policy_dir[4096], csv_path[4096], gp_path[4096], png_path[4096];
    join_path(base_dir, sizeof base_dir, opt.out_dir, "base_model");
    join_path(reward_dir, sizeof reward_dir, opt.out_dir, "reward_adapter");
    join_path(policy_dir, sizeof policy_dir, opt.out_dir, "policy_adapter");
    join_path(csv_path, sizeof csv_path, opt.out_dir, "metrics.csv");
    join_path(gp_path, sizeof gp_path, opt.out_dir, "rl_curves.gp");
    join_path(png_path, sizeof png_path, opt.out_dir, "rl_curves.png");

    printf("PERL demo (libperl %s, %d thread%s, seed %llu%s): a barista learns manners.\n"
           "A good reply confirms the size and the milk that were asked for, is polite and does not repeat "
           "itself.\n",
           perl_version(), perl_get_num_threads(), perl_get_num_threads() == 1 ? "" : "s",
           (unsigned long long)opt.seed, opt.quick ? ", quick" : opt.full ? ", FULL fine-tuning" : "");
    fflush(stdout);

    demo_results res;
    memset(&res, 0, sizeof res);
    perl_model *base = NULL;
    perl_lora *reward_lora = NULL, *policy = NULL;
    perl_reward *rm = NULL;
    int rc;
    if (opt.base_dir != NULL) {
        rc = check(perl_model_load(&base, opt.base_dir), "perl_model_load (--base)");
        res.pretrain_skipped = 1;
        if (rc == LIBPERL_OK) fprintf(stderr, "\n[1/3] pretrain: skipped, the base comes from %s\n", opt.base_dir);
    } else {
        rc = stage_pretrain(&plan, &opt, &base, &res);
        if (rc == LIBPERL_OK) rc = check(perl_model_save_hf(base, base_dir), "perl_model_save_hf");
    }
    if (rc == LIBPERL_OK) rc = stage_reward(&plan, &opt, base, &reward_lora, &rm, &res);
    if (rc == LIBPERL_OK) rc = check(perl_lora_save(reward_lora, reward_dir), "perl_lora_save (reward)");
    if (rc == LIBPERL_OK)
        rc = show_samples("Replies before RL: the frozen base", &plan, &opt, base, NULL, rm, &res.rules_before,
                          &res.reward_before, res.broken_before);
    if (rc == LIBPERL_OK) rc = stage_rl(&plan, &opt, base, rm, &policy, csv_path, &res);
    if (rc == LIBPERL_OK)
        rc = show_samples("Replies after RL: base + policy adapter", &plan, &opt, base, policy, rm,
                          &res.rules_after, &res.reward_after, res.broken_after);
    if (rc == LIBPERL_OK) rc = check(perl_lora_save(policy, policy_dir), "perl_lora_save (policy)");
    if (rc == LIBPERL_OK) res.plot_written = plot_curves(csv_path, gp_path, png_path);

    int improved = 0;
    if (rc == LIBPERL_OK && opt.json_path != NULL) rc = write_json(opt.json_path, &opt, &res);
    if (rc == LIBPERL_OK) {
        improved = summarize(&res, ex_now_seconds() - t0);
        /* perl_lora_save writes LoRA adapters in PEFT layout and FULL ones as
         * whole models (Hugging Face layout, plus score.safetensors for a head) */
        const char *layout = opt.full ? "Hugging Face layout" : "PEFT layout";
        printf("\nFiles\n"
               "  %-40s the frozen base (Hugging Face layout)\n"
               "  %-40s reward model: %s + score head (%s)\n"
               "  %-40s RL policy (%s)\n"
               "  %-40s one row per RL step\n",
               opt.base_dir ? opt.base_dir : base_dir, reward_dir, adapter_kind(&opt), layout, policy_dir, layout,
               csv_path);
        if (res.plot_written) printf("  %-40s reward and KL over RL steps\n", png_path);
        if (!improved) printf("\nperl_demo: a stage did not improve on its starting point (see FAILED above)\n");
    }
    perl_lora_free(policy);
    perl_reward_free(rm);
    perl_lora_free(reward_lora);
    perl_model_free(base);
    return rc == LIBPERL_OK && improved ? EXIT_SUCCESS : EXIT_FAILURE;
}

int main(int argc, char **argv)
{
    demo_options opt;
    if (parse_args(argc, argv, &opt) != 0) return 2;
    demo_plan plan = plan_for(opt.quick);
    return run_demo(&opt, &plan);
}
