/*
 * perl_reward: a reward model is the frozen base, an adapter (LoRA or FULL)
 * and a scalar head on the final RMS-normed hidden state of each sequence's
 * last real token:  r = head . h_last.
 *
 * Objectives (B examples, all means over the batch):
 *   pairwise:  L = mean softplus(-(r_c - r_r - m)) + center_coef * mean (r_c + r_r)^2
 *   pointwise: L = sum w_b BCE(sigmoid(r_b), y_b) / sum w_b,  w_b = pos_weight or neg_weight
 * A pairwise step runs chosen and rejected as one packed batch of 2B rows, so
 * one forward and one backward serve both sides.  The head's gradient and the
 * gradient into the hidden state are both rank-one per row:
 *   dhead += dL/dr_b * h_last_b,   dh_last_b = dL/dr_b * head,
 * and the engine's backward carries dh_last into the adapter.
 *
 * Every input is validated before anything changes; a step that fails later
 * (non-finite loss, hook error) leaves parameters, moments, step and the
 * dropout stream as they were (gradients are scratch and may be overwritten).
 */
#include "fileio.h"
#include "safetensors.h"
#include "train.h"

#include <math.h>
#include <string.h>

struct perl_reward {
    perl_model *model;
    perl_lora *lora;
    perl_reward_options opts;
};

void perl_reward_options_init(perl_reward_options *opts) {
    if (!opts) return;
    memset(opts, 0, sizeof *opts);
    opts->struct_size = sizeof *opts;
    opts->objective = LIBPERL_REWARD_PAIRWISE;
    opts->center_coef = 0.0f;
    opts->pos_weight = 1.0f;
    opts->neg_weight = 1.0f;
    opts->head_init_std = 0.0f; /* 0: 1 / sqrt(dim + 1), resolved at create (the model's dim is not known here) */
    opts->seed = 0;
}

void perl_reward_stats_init(perl_reward_stats *stats) {
    if (!stats) return;
    memset(stats, 0, sizeof *stats);
    stats->struct_size = sizeof *stats;
}

static int validate_options(const perl_reward_options *o) {
    PERL_CHECK_ARG(o, "reward options are NULL (call perl_reward_options_init)");
    PERL_CHECK_ARG(o->struct_size >= sizeof(perl_reward_options),
                   "reward options struct_size %zu is too small (call perl_reward_options_init)", o->struct_size);
    PERL_CHECK_ARG(o->objective == LIBPERL_REWARD_PAIRWISE || o->objective == LIBPERL_REWARD_POINTWISE,
                   "unknown reward objective %d", o->objective);
    PERL_CHECK_ARG(isfinite(o->center_coef) && o->center_coef >= 0.0f, "center_coef must be finite and >= 0");
    PERL_CHECK_ARG(isfinite(o->pos_weight) && o->pos_weight >= 0.0f, "pos_weight must be finite and >= 0");
    PERL_CHECK_ARG(isfinite(o->neg_weight) && o->neg_weight >= 0.0f, "neg_weight must be finite and >= 0");
    PERL_CHECK_ARG(o->pos_weight > 0.0f || o->neg_weight > 0.0f, "pos_weight and neg_weight are both 0");
    PERL_CHECK_ARG(isfinite(o->head_init_std) && o->head_init_std >= 0.0f,
                   "head_init_std must be finite and >= 0 (0 selects 1/sqrt(dim + 1))");
    return LIBPERL_OK;
}

int perl_reward_create(perl_reward **out, perl_model *model, perl_lora *lora, const perl_reward_options *opts) {
    PERL_CHECK_ARG(out, "perl_reward_create: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(model, "perl_reward_create: model is NULL");
    PERL_CHECK_ARG(lora, "perl_reward_create: lora is NULL");
    PERL_TRY(validate_options(opts));
    if (lora->model != model)
        return perl_fail(LIBPERL_ERR_SHAPE, "perl_reward_create: the adapter belongs to another model");
    perl_reward *rw = perl_mem_calloc(1, sizeof *rw);
    if (!rw) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    float std = opts->head_init_std > 0.0f ? opts->head_init_std : 1.0f / sqrtf((float)model->cfg.dim + 1.0f);
    int rc = lora_ensure_head(lora, std, opts->seed); /* keeps a head that is already there (loaded) */
    if (rc != LIBPERL_OK) {
        perl_mem_free(rw);
        return rc;
    }
    rw->model = model;
    rw->lora = lora;
    rw->opts = *opts;
    rw->opts.struct_size = sizeof rw->opts;
    *out = rw;
    return LIBPERL_OK;
}

void perl_reward_free(perl_reward *reward) { perl_mem_free(reward); }

/* ---- batches ------------------------------------------------------------------ */

/* Packs a (and b, when given, as rows a->batch_size .. 2B-1) into one batch. */
static int pack_rows(packed_batch *out, const perl_model *m, const perl_batch *a, const perl_batch *b) {
    if (!b) return packed_from_batch(out, m, a);
    packed_batch pa, pb;
    memset(out, 0, sizeof *out);
    PERL_TRY(packed_from_batch(&pa, m, a));
    int rc = packed_from_batch(&pb, m, b);
    if (rc != LIBPERL_OK) {
        packed_free(&pa);
        return rc;
    }
    int rows = pa.n_rows + pb.n_rows, n = pa.n_tokens + pb.n_tokens;
    out->n_rows = rows;
    out->n_tokens = n;
    out->row_start = perl_mem_alloc((size_t)(rows + 1) * sizeof(int));
    out->tokens = perl_mem_alloc((size_t)n * sizeof(int32_t));
    out->pos = perl_mem_alloc((size_t)n * sizeof(int32_t));
    if (!out->row_start || !out->tokens || !out->pos) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory packing a pairwise batch");
    } else {
        memcpy(out->row_start, pa.row_start, (size_t)pa.n_rows * sizeof(int));
        for (int r = 0; r <= pb.n_rows; r++) out->row_start[pa.n_rows + r] = pa.n_tokens + pb.row_start[r];
        memcpy(out->tokens, pa.tokens, (size_t)pa.n_tokens * sizeof(int32_t));
        memcpy(out->tokens + pa.n_tokens, pb.tokens, (size_t)pb.n_tokens * sizeof(int32_t));
        memcpy(out->pos, pa.pos, (size_t)pa.n_tokens * sizeof(int32_t));
        memcpy(out->pos + pa.n_tokens, pb.pos, (size_t)pb.n_tokens * sizeof(int32_t));
    }
    packed_free(&pa);
    packed_free(&pb);
    if (rc != LIBPERL_OK) packed_free(out);
    return rc;
}

/* The packed index of row r's last real token. */
static int last_token(const packed_batch *pb, int r) { return pb->row_start[r + 1] - 1; }

/* scores[r] = head . hidden[last token of r], accumulated in double. */
static void head_forward(double *scores, const packed_batch *pb, const float *hidden, const float *head, int dim) {
    for (int r = 0; r < pb->n_rows; r++) {
        const float *h = hidden + (size_t)last_token(pb, r) * dim;
        double s = 0.0;
        for (int j = 0; j < dim; j++) s += (double)head[j] * h[j];
        scores[r] = s;
    }
}

/* dhead += sum_r dr[r] h_last_r;  dhidden[last token of r] += dr[r] head. */
static void head_backward(float *dhidden, float *dhead, const packed_batch *pb, const float *hidden, const float *head,
                          const double *dr, int dim) {
    for (int r = 0; r < pb->n_rows; r++) {
        size_t i = (size_t)last_token(pb, r) * dim;
        for (int j = 0; j < dim; j++) {
            dhead[j] += (float)(dr[r] * hidden[i + j]);
            dhidden[i + j] += (float)(dr[r] * head[j]);
        }
    }
}

/* ---- objectives --------------------------------------------------------------- */

/* log(1 + e^x) without overflow. */
static double softplus(double x) { return (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x))); }
static double sigmoid(double x) { return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x)); }

typedef struct objective_out {
    double loss, accuracy, mean_margin;
} objective_out;

/* Scores are [r_chosen (B) | r_rejected (B)]; dr gets dL/dr in the same layout. */
static objective_out pairwise_objective(const double *r, int B, const float *margins, double center, double *dr) {
    objective_out o = {0.0, 0.0, 0.0};
    for (int b = 0; b < B; b++) {
        double rc = r[b], rr = r[B + b], d = rc - rr - (margins ? margins[b] : 0.0), sum = rc + rr;
        o.loss += softplus(-d) + center * sum * sum;
        o.accuracy += rc > rr;
        o.mean_margin += rc - rr;
        double dd = -sigmoid(-d), dc = 2.0 * center * sum; /* d softplus(-d)/dd, d (sum^2)/d r */
        dr[b] = (dd + dc) / B;
        dr[B + b] = (-dd + dc) / B;
    }
    o.loss /= B, o.accuracy /= B, o.mean_margin /= B;
    return o;
}

/* Weighted BCE on sigmoid(r): BCE = softplus(r) - y r;  dBCE/dr = sigmoid(r) - y. */
static objective_out pointwise_objective(const double *r, int B, const float *labels, double pos_w, double neg_w,
                                         double *dr) {
    objective_out o = {0.0, 0.0, 0.0};
    double total_w = 0.0;
    for (int b = 0; b < B; b++) total_w += labels[b] != 0.0f ? pos_w : neg_w;
    for (int b = 0; b < B; b++) {
        double y = labels[b], w = y != 0.0 ? pos_w : neg_w;
        o.loss += w * (softplus(r[b]) - y * r[b]);
        o.accuracy += (r[b] > 0.0) == (y != 0.0);
        o.mean_margin += r[b];
        dr[b] = w * (sigmoid(r[b]) - y) / total_w;
    }
    o.loss /= total_w, o.accuracy /= B, o.mean_margin /= B;
    return o;
}

/* ---- the training step -------------------------------------------------------- */

typedef struct step_inputs {
    int objective;
    int n_examples;       /* pairs or rows */
    const float *margins; /* pairwise, may be NULL */
    const float *labels;  /* pointwise */
} step_inputs;

static int finite_doubles(const double *x, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* Forward, objective, backward and optimizer over a validated packed batch;
 * scores[n_rows] receives the scores before the update. */
static int reward_train(perl_reward *rw, const packed_batch *pb, const step_inputs *in, double *scores,
                        perl_reward_stats *out_stats) {
    perl_lora *lora = rw->lora;
    int dim = rw->model->cfg.dim, rows = pb->n_rows;
    double *dr = perl_mem_alloc((size_t)rows * sizeof(double));
    if (!dr) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    uint64_t dropout_counter = lora->dropout_counter; /* restored on failure: a retry sees the same masks */
    engine *e = NULL;
    int rc = lora_engine(lora, &e);
    if (rc == LIBPERL_OK) rc = perl_lora_zero_grad(lora);
    if (rc == LIBPERL_OK) rc = engine_forward(e, pb, 1);
    if (rc != LIBPERL_OK) goto done;
    head_forward(scores, pb, engine_hidden(e), lora->head, dim);
    objective_out o =
        in->objective == LIBPERL_REWARD_PAIRWISE
            ? pairwise_objective(scores, in->n_examples, in->margins, rw->opts.center_coef, dr)
            : pointwise_objective(scores, in->n_examples, in->labels, rw->opts.pos_weight, rw->opts.neg_weight, dr);
    if (!isfinite(o.loss) || !finite_doubles(scores, rows) || !finite_doubles(dr, rows)) {
        e->training = 0; /* the activations are not used */
        rc = perl_fail(LIBPERL_ERR_NUMERIC, "reward loss or scores are not finite; parameters unchanged");
        goto done;
    }
    head_backward(engine_dhidden(e), lora->dhead, pb, engine_hidden(e), lora->head, dr, dim);
    if ((rc = engine_backward(e)) != LIBPERL_OK) goto done;
    perl_step_stats st;
    perl_step_stats_init(&st);
    if ((rc = perl_lora_optimizer_step(lora, &st)) != LIBPERL_OK) goto done;
    if (out_stats) {
        out_stats->loss = (float)o.loss;
        out_stats->accuracy = (float)o.accuracy;
        out_stats->mean_margin = (float)o.mean_margin;
        out_stats->grad_norm = st.grad_norm;
        out_stats->lr = st.lr;
        out_stats->step = st.step;
    }
done:
    if (rc != LIBPERL_OK) lora->dropout_counter = dropout_counter;
    perl_mem_free(dr);
    return rc;
}

static int check_batch(const perl_batch *batch, const char *what) {
    PERL_CHECK_ARG(batch, "%s batch is NULL", what);
    PERL_CHECK_ARG(batch->struct_size >= sizeof(perl_batch),
                   "%s batch: struct_size %zu is too small (call perl_batch_init)", what, batch->struct_size);
    return LIBPERL_OK;
}

static int check_stats(const perl_reward_stats *s) {
    PERL_CHECK_ARG(!s || s->struct_size >= sizeof(perl_reward_stats),
                   "out_stats->struct_size too small (call perl_reward_stats_init)");
    return LIBPERL_OK;
}

static int check_objective(const perl_reward *rw, int objective, const char *fn) {
    if (rw->opts.objective == objective) return LIBPERL_OK;
    return perl_fail(LIBPERL_ERR_STATE, "%s: the reward model was created with the %s objective", fn,
                     rw->opts.objective == LIBPERL_REWARD_PAIRWISE ? "pairwise" : "pointwise");
}

static void store_scores(float *dst, const double *src, int n) {
    if (dst)
        for (int i = 0; i < n; i++) dst[i] = (float)src[i];
}

int perl_reward_step_pairwise(perl_reward *reward, const perl_batch *chosen, const perl_batch *rejected,
                              const float *margins, float *out_chosen, float *out_rejected,
                              perl_reward_stats *out_stats) {
    PERL_CHECK_ARG(reward, "perl_reward_step_pairwise: reward is NULL");
    PERL_TRY(check_batch(chosen, "perl_reward_step_pairwise: chosen"));
    PERL_TRY(check_batch(rejected, "perl_reward_step_pairwise: rejected"));
    PERL_TRY(check_stats(out_stats));
    PERL_TRY(check_objective(reward, LIBPERL_REWARD_PAIRWISE, "perl_reward_step_pairwise"));
    PERL_CHECK_ARG(chosen->batch_size == rejected->batch_size,
                   "perl_reward_step_pairwise: %d chosen rows but %d rejected rows", chosen->batch_size,
                   rejected->batch_size);
    if (margins && chosen->batch_size > 0 && !perl_isfinite_array(margins, (size_t)chosen->batch_size))
        return perl_fail(LIBPERL_ERR_NUMERIC, "perl_reward_step_pairwise: margins contain NaN or Inf");
    packed_batch pb;
    PERL_TRY(pack_rows(&pb, reward->model, chosen, rejected));
    int B = chosen->batch_size, rc;
    double *scores = perl_mem_alloc((size_t)pb.n_rows * sizeof(double));
    if (!scores) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    } else {
        step_inputs in = {LIBPERL_REWARD_PAIRWISE, B, margins, NULL};
        rc = reward_train(reward, &pb, &in, scores, out_stats);
        if (rc == LIBPERL_OK) {
            store_scores(out_chosen, scores, B);
            store_scores(out_rejected, scores + B, B);
        }
    }
    perl_mem_free(scores);
    packed_free(&pb);
    return rc;
}

static int check_labels(const float *labels, int n) {
    for (int b = 0; b < n; b++) {
        if (!isfinite(labels[b]))
            return perl_fail(LIBPERL_ERR_NUMERIC, "perl_reward_step_pointwise: label %d is NaN or Inf", b);
        if (labels[b] != 0.0f && labels[b] != 1.0f)
            return perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "perl_reward_step_pointwise: label %d is %g, not 0 or 1", b,
                             (double)labels[b]);
    }
    return LIBPERL_OK;
}

int perl_reward_step_pointwise(perl_reward *reward, const perl_batch *batch, const float *labels, float *out_scores,
                               perl_reward_stats *out_stats) {
    PERL_CHECK_ARG(reward, "perl_reward_step_pointwise: reward is NULL");
    PERL_TRY(check_batch(batch, "perl_reward_step_pointwise:"));
    PERL_CHECK_ARG(labels, "perl_reward_step_pointwise: labels is NULL");
    PERL_TRY(check_stats(out_stats));
    PERL_TRY(check_objective(reward, LIBPERL_REWARD_POINTWISE, "perl_reward_step_pointwise"));
    PERL_CHECK_ARG(batch->batch_size > 0, "perl_reward_step_pointwise: batch_size %d must be positive",
                   batch->batch_size);
    PERL_TRY(check_labels(labels, batch->batch_size));
    double total_w = 0.0;
    for (int b = 0; b < batch->batch_size; b++)
        total_w += labels[b] != 0.0f ? reward->opts.pos_weight : reward->opts.neg_weight;
    PERL_CHECK_ARG(total_w > 0.0, "perl_reward_step_pointwise: every example of the batch has class weight 0");
    packed_batch pb;
    PERL_TRY(pack_rows(&pb, reward->model, batch, NULL));
    int rc;
    double *scores = perl_mem_alloc((size_t)pb.n_rows * sizeof(double));
    if (!scores) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    } else {
        step_inputs in = {LIBPERL_REWARD_POINTWISE, pb.n_rows, NULL, labels};
        rc = reward_train(reward, &pb, &in, scores, out_stats);
        if (rc == LIBPERL_OK) store_scores(out_scores, scores, pb.n_rows);
    }
    perl_mem_free(scores);
    packed_free(&pb);
    return rc;
}

/* Scores rows [r0, r1) of pb in one inference forward, through a view that
 * shares pb's tokens; scores[r] for r in [r0, r1). */
static int score_rows(engine *e, const packed_batch *pb, int r0, int r1, const float *head, int dim, double *scores) {
    int rows = r1 - r0, first = pb->row_start[r0];
    int *row_start = perl_mem_alloc((size_t)(rows + 1) * sizeof(int));
    if (!row_start) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    for (int r = 0; r <= rows; r++) row_start[r] = pb->row_start[r0 + r] - first;
    packed_batch view = {rows, row_start[rows], row_start, pb->tokens + first, pb->pos + first};
    int rc = engine_forward(e, &view, 0);
    if (rc == LIBPERL_OK) head_forward(scores + r0, &view, engine_hidden(e), head, dim);
    perl_mem_free(row_start);
    return rc;
}

/*
 * Inference on the adapter's own workspace (an inference forward neither
 * keeps activations nor advances dropout).  Once that workspace has been
 * planned for training, a larger batch would grow every training buffer with
 * it, so rows are scored in chunks that fit the tokens it already holds (a
 * single longer row still grows it).  Rows are independent, so chunking does
 * not change what is computed.
 */
int perl_reward_score(perl_reward *reward, const perl_batch *batch, float *out_scores) {
    PERL_CHECK_ARG(reward, "perl_reward_score: reward is NULL");
    PERL_CHECK_ARG(out_scores, "perl_reward_score: out_scores is NULL");
    packed_batch pb;
    PERL_TRY(pack_rows(&pb, reward->model, batch, NULL));
    engine *e = NULL;
    double *scores = perl_mem_alloc((size_t)pb.n_rows * sizeof(double));
    int rc = scores ? lora_engine(reward->lora, &e) : perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    int limit = rc == LIBPERL_OK && e->arena && e->planned_training ? e->capacity : pb.n_tokens;
    for (int r0 = 0, r1; rc == LIBPERL_OK && r0 < pb.n_rows; r0 = r1) {
        r1 = r0 + 1; /* grow the chunk while the next row still fits */
        while (r1 < pb.n_rows && pb.row_start[r1 + 1] - pb.row_start[r0] <= limit) r1++;
        rc = score_rows(e, &pb, r0, r1, reward->lora->head, reward->model->cfg.dim, scores);
    }
    if (rc == LIBPERL_OK) store_scores(out_scores, scores, pb.n_rows);
    perl_mem_free(scores);
    packed_free(&pb);
    return rc;
}

/* ---- loading ------------------------------------------------------------------ */

/* The architecture fields that must agree for saved FULL weights to fit `model`. */
static int same_shape(const perl_model_config *a, const perl_model_config *b) {
    return a->dim == b->dim && a->hidden_dim == b->hidden_dim && a->n_layers == b->n_layers &&
           a->n_heads == b->n_heads && a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
           a->vocab_size == b->vocab_size && a->tied_embeddings == b->tied_embeddings && a->qkv_bias == b->qkv_bias;
}

/* 1 when the saved model's embedding (and untied lm_head) differ from the base's. */
static int embeddings_differ(const perl_model *saved, const perl_model *base) {
    size_t n = (size_t)base->cfg.vocab_size * base->cfg.dim * sizeof(float);
    if (memcmp(saved->w.tok_emb, base->w.tok_emb, n) != 0) return 1;
    return !base->cfg.tied_embeddings && memcmp(saved->w.lm_head, base->w.lm_head, n) != 0;
}

/* Copies every trainable tensor of a FULL adapter from `saved`. */
static int copy_full_weights(perl_lora *lora, perl_model *saved) {
    tensor_slot *dst, *src;
    int n, n_src;
    PERL_TRY(model_tensor_slots(&lora->model->cfg, &lora->full_w, &dst, &n));
    int rc = model_tensor_slots(&saved->cfg, &saved->w, &src, &n_src);
    if (rc != LIBPERL_OK) {
        perl_mem_free(dst);
        return rc;
    }
    const float *begin = lora->params, *end = lora->params + lora->n_params;
    for (int i = 0; i < n && i < n_src; i++) {
        size_t count = (size_t)src[i].shape[0] * (size_t)(src[i].ndim == 2 ? src[i].shape[1] : 1);
        /* frozen tensors (embeddings when not trained) point into the base: never write there */
        if (*dst[i].ptr >= begin && *dst[i].ptr < end) memcpy(*dst[i].ptr, *src[i].ptr, count * sizeof(float));
    }
    perl_mem_free(dst);
    perl_mem_free(src);
    return LIBPERL_OK;
}

/* Reads score.safetensors (written beside a FULL model) into lora->head. */
static int load_score_file(perl_lora *lora, const char *dir) {
    char *path = file_join(dir, "score.safetensors");
    if (!path) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    st_file f;
    int rc = file_exists(path)
                 ? st_open(&f, path)
                 : perl_fail(LIBPERL_ERR_FORMAT, "%s: missing (a reward model saves its head there)", path);
    if (rc == LIBPERL_OK) {
        const st_tensor *t = st_find(&f, "score.weight");
        const int64_t shape[2] = {1, lora->model->cfg.dim};
        if (!t || !st_shape_is(t, 2, shape))
            rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: needs a tensor \"score.weight\" of shape [1, %d]", path,
                           lora->model->cfg.dim);
        else
            rc = st_to_f32(t, lora->head);
        st_close(&f);
    }
    perl_mem_free(path);
    return rc;
}

/* A FULL-mode reward model saved by perl_lora_save: an HF model directory
 * plus score.safetensors, loaded as a FULL adapter on `model`. */
static int load_full(perl_lora **out, perl_model *model, const char *dir) {
    perl_model *saved;
    PERL_TRY(perl_model_load(&saved, dir));
    int rc = LIBPERL_OK;
    perl_lora *lora = NULL;
    if (!same_shape(&saved->cfg, &model->cfg))
        rc = perl_fail(LIBPERL_ERR_SHAPE, "%s: the saved model's architecture differs from the base model's", dir);
    else if (saved->cfg.rope_interleaved != model->cfg.rope_interleaved)
        rc = perl_fail(LIBPERL_ERR_UNSUPPORTED,
                       "%s: saved with HF RoPE order but the base uses llama2.c order; load the directory as the "
                       "base model instead",
                       dir);
    if (rc == LIBPERL_OK) {
        perl_lora_options o;
        perl_lora_options_init(&o);
        o.mode = LIBPERL_MODE_FULL;
        o.train_embeddings = embeddings_differ(saved, model);
        rc = perl_lora_create(&lora, model, &o);
    }
    if (rc == LIBPERL_OK) rc = copy_full_weights(lora, saved);
    if (rc == LIBPERL_OK) rc = lora_ensure_head(lora, 0.0f, 0);
    if (rc == LIBPERL_OK) rc = load_score_file(lora, dir);
    if (rc == LIBPERL_OK && !perl_isfinite_array(lora->params, lora->n_params))
        rc = perl_fail(LIBPERL_ERR_NUMERIC, "%s: the saved reward model contains NaN or Inf", dir);
    perl_model_free(saved);
    if (rc != LIBPERL_OK) {
        perl_lora_free(lora);
        lora = NULL;
    }
    *out = lora;
    return rc;
}

int perl_reward_load(perl_reward **out, perl_lora **out_lora, perl_model *model, const char *dir,
                     const perl_reward_options *opts) {
    PERL_CHECK_ARG(out && out_lora, "perl_reward_load: out or out_lora is NULL");
    *out = NULL;
    *out_lora = NULL;
    PERL_CHECK_ARG(model, "perl_reward_load: model is NULL");
    PERL_CHECK_ARG(dir && *dir, "perl_reward_load: dir is NULL or empty");
    PERL_TRY(validate_options(opts));
    char *peft_config = file_join(dir, "adapter_config.json");
    if (!peft_config) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    int is_peft = file_exists(peft_config);
    perl_mem_free(peft_config);
    perl_lora *lora;
    PERL_TRY(is_peft ? perl_lora_load(&lora, model, dir) : load_full(&lora, model, dir));
    int rc = lora->head ? LIBPERL_OK
                        : perl_fail(LIBPERL_ERR_FORMAT,
                                    "%s: the adapter has no score head (base_model.model.score.weight); to start a "
                                    "reward model from it use perl_lora_load + perl_reward_create",
                                    dir);
    if (rc == LIBPERL_OK) rc = perl_reward_create(out, model, lora, opts);
    if (rc != LIBPERL_OK) {
        perl_lora_free(lora);
        return rc;
    }
    *out_lora = lora;
    return LIBPERL_OK;
}
