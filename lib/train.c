/* The causal-LM (SFT) objective and the optimizer step shared by every trainer. */
#include "adamw.h"
#include "engine.h"
#include "train.h"

#include <math.h>
#include <string.h>

int lora_engine(perl_lora *lora, engine **out) {
    if (!lora->engine) PERL_TRY(engine_create(&lora->engine, lora->model, lora));
    *out = lora->engine;
    return LIBPERL_OK;
}

/* targets[i] = the next token of the row when it is a loss target, else -1. */
static int sft_targets(const packed_batch *pb, const perl_batch *batch, const uint8_t *mask, int32_t *targets,
                       int *out_count) {
    int count = 0;
    for (int r = 0; r < pb->n_rows; r++) {
        for (int i = pb->row_start[r]; i < pb->row_start[r + 1]; i++) {
            int t = pb->pos[i] + 1; /* the token predicted from position pos[i] */
            int ok = i + 1 < pb->row_start[r + 1] && (!mask || mask[(size_t)r * batch->seq_len + t]);
            targets[i] = ok ? pb->tokens[i + 1] : -1;
            count += ok;
        }
    }
    *out_count = count;
    return LIBPERL_OK;
}

static void sft_grad(void *ctx, int i, float logp, float entropy, float *dlogp, float *dentropy) {
    (void)i, (void)logp, (void)entropy;
    *dlogp = *(const float *)ctx;
    *dentropy = 0.0f;
}

int perl_lora_sft_backward(perl_lora *lora, const perl_batch *batch, const uint8_t *loss_mask,
                           perl_step_stats *out_stats) {
    PERL_CHECK_ARG(lora, "perl_lora_sft_backward: lora is NULL");
    PERL_CHECK_ARG(!out_stats || out_stats->struct_size >= sizeof(perl_step_stats),
                   "out_stats->struct_size too small (call perl_step_stats_init)");
    packed_batch pb;
    PERL_TRY(packed_from_batch(&pb, lora->model, batch));
    int N = pb.n_tokens, rc;
    int32_t *targets = perl_mem_alloc((size_t)N * sizeof(int32_t));
    int32_t *argmax = perl_mem_alloc((size_t)N * sizeof(int32_t));
    float *logp = perl_mem_alloc((size_t)N * sizeof(float));
    engine *e = NULL;
    if (!targets || !argmax || !logp) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    int n_targets;
    sft_targets(&pb, batch, loss_mask, targets, &n_targets);
    if (n_targets == 0) {
        rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "the batch has no target tokens (mask or lengths)");
        goto done;
    }
    if ((rc = lora_engine(lora, &e)) != LIBPERL_OK) goto done;
    if ((rc = engine_forward(e, &pb, 1)) != LIBPERL_OK) goto done;
    float coef = -1.0f / (float)n_targets; /* loss = -mean log p */
    if ((rc = engine_lm_head(e, targets, logp, NULL, argmax, sft_grad, &coef)) != LIBPERL_OK) goto done;
    double loss = 0.0;
    int correct = 0;
    for (int i = 0; i < N; i++) {
        if (targets[i] < 0) continue;
        loss -= logp[i];
        correct += argmax[i] == targets[i];
    }
    loss /= n_targets;
    if (!isfinite(loss)) {
        e->training = 0;
        rc = perl_fail(LIBPERL_ERR_NUMERIC, "SFT loss is not finite; gradients not accumulated");
        goto done;
    }
    if ((rc = engine_backward(e)) != LIBPERL_OK) goto done;
    if (out_stats) {
        out_stats->loss = (float)loss;
        out_stats->n_tokens = n_targets;
        out_stats->accuracy = (float)correct / (float)n_targets;
        out_stats->step = lora->step;
    }
done:
    perl_mem_free(targets);
    perl_mem_free(argmax);
    perl_mem_free(logp);
    packed_free(&pb);
    return rc;
}

int perl_lora_optimizer_step(perl_lora *lora, perl_step_stats *out_stats) {
    PERL_CHECK_ARG(lora, "perl_lora_optimizer_step: lora is NULL");
    PERL_CHECK_ARG(!out_stats || out_stats->struct_size >= sizeof(perl_step_stats),
                   "out_stats->struct_size too small (call perl_step_stats_init)");
    size_t n = lora->n_params;
    if (!lora->adam_m) {
        lora->adam_m = perl_mem_calloc(n, sizeof(float));
        lora->adam_v = perl_mem_calloc(n, sizeof(float));
        if (!lora->adam_m || !lora->adam_v) {
            perl_mem_free(lora->adam_m);
            perl_mem_free(lora->adam_v);
            lora->adam_m = lora->adam_v = NULL;
            return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for AdamW moments (%zu floats)", n);
        }
    }
    if (lora->hook && lora->hook(lora->grads, n, lora->hook_user) != 0)
        return perl_fail(LIBPERL_ERR_CALLBACK, "gradient hook returned an error; parameters unchanged");
    double norm = grad_global_norm(lora->grads, n);
    if (!isfinite(norm))
        return perl_fail(LIBPERL_ERR_NUMERIC, "gradient contains NaN or Inf; parameters unchanged");
    const perl_optim_options *o = &lora->optim;
    if (o->max_grad_norm > 0.0f && norm > o->max_grad_norm) {
        float clip = (float)(o->max_grad_norm / (norm + 1e-6)); /* as torch.nn.utils.clip_grad_norm_ */
        for (size_t i = 0; i < n; i++) lora->grads[i] *= clip;
    }
    float lr = lora_current_lr(lora);
    lora->step++;
    adamw_update(lora->params, lora->grads, lora->adam_m, lora->adam_v, n, lr, o->beta1, o->beta2, o->eps,
                 o->weight_decay, lora->step);
    if (out_stats) {
        out_stats->grad_norm = (float)norm;
        out_stats->lr = lr;
        out_stats->step = lora->step;
    }
    return LIBPERL_OK;
}

int perl_lora_sft_step(perl_lora *lora, const perl_batch *batch, const uint8_t *loss_mask,
                       perl_step_stats *out_stats) {
    PERL_TRY(perl_lora_zero_grad(lora));
    PERL_TRY(perl_lora_sft_backward(lora, batch, loss_mask, out_stats));
    return perl_lora_optimizer_step(lora, out_stats);
}
