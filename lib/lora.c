/* perl_lora: creation, parameter layout, initialisation, merge, options. */
#include "lora.h"

#include "adamw.h"
#include "blas.h"
#include "engine.h"

#include <math.h>
#include <string.h>

static const char *const target_names[LORA_N_TARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"};

const char *lora_target_name(int target) {
    return target >= 0 && target < LORA_N_TARGETS ? target_names[target] : NULL;
}

const char *lora_target_parent(int target) { return target <= LORA_O ? "self_attn" : "mlp"; }

void perl_lora_options_init(perl_lora_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->mode = LIBPERL_MODE_LORA;
    o->rank = 8;
    o->alpha = 16.0f;
    o->dropout = 0.0f;
    o->target_modules = LIBPERL_TARGET_Q | LIBPERL_TARGET_K | LIBPERL_TARGET_V | LIBPERL_TARGET_O;
    o->use_rslora = 0;
    o->init = LIBPERL_LORA_INIT_KAIMING;
    o->seed = 0;
    o->train_embeddings = 0;
}

void perl_optim_options_init(perl_optim_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->lr = 1e-4f;
    o->beta1 = 0.9f;
    o->beta2 = 0.999f;
    o->eps = 1e-8f;
    o->weight_decay = 0.0f;
    o->max_grad_norm = 1.0f;
    o->schedule = LIBPERL_LR_CONSTANT;
    o->min_lr_ratio = 0.0f;
}

void perl_step_stats_init(perl_step_stats *s) {
    if (!s) return;
    memset(s, 0, sizeof *s);
    s->struct_size = sizeof *s;
}

/* (in, out) of a target's linear in layer terms. */
static void target_shape(const perl_model_config *c, int target, int *in, int *out) {
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    switch (target) {
    case LORA_Q: *in = c->dim, *out = qd; break;
    case LORA_K:
    case LORA_V: *in = c->dim, *out = kvd; break;
    case LORA_O: *in = qd, *out = c->dim; break;
    case LORA_GATE:
    case LORA_UP: *in = c->dim, *out = c->hidden_dim; break;
    default: *in = c->hidden_dim, *out = c->dim; break;
    }
}

static int is_embedding_slot(const tensor_slot *s) {
    return strcmp(s->name, "model.embed_tokens.weight") == 0 || strcmp(s->name, "lm_head.weight") == 0;
}

static size_t slot_floats(const tensor_slot *s) {
    return (size_t)s->shape[0] * (size_t)(s->ndim == 2 ? s->shape[1] : 1);
}

/*
 * Assigns every pointer into params/grads in the fixed layout, returning the
 * float count: LoRA mode: for each layer, each targeted module, A then B;
 * FULL mode: the HF tensor order (embeddings only when trained).  Then the
 * head.  With params == NULL only counts.
 */
static int lora_layout(perl_lora *lora, int with_head, size_t *out_count) {
    const perl_model_config *c = &lora->model->cfg;
    float *P = lora->params, *G = lora->grads;
    size_t off = 0;
    if (lora->opts.mode == LIBPERL_MODE_LORA) {
        int r = lora->opts.rank;
        for (int l = 0; l < c->n_layers; l++) {
            for (int t = 0; t < LORA_N_TARGETS; t++) {
                lora_module *mod = &lora->modules[l * LORA_N_TARGETS + t];
                memset(mod, 0, sizeof *mod);
                if (!(lora->opts.target_modules & (1u << t))) continue;
                target_shape(c, t, &mod->in, &mod->out);
                size_t na = (size_t)r * mod->in, nb = (size_t)mod->out * r;
                if (P) {
                    mod->A = P + off, mod->dA = G + off;
                    mod->B = P + off + na, mod->dB = G + off + na;
                }
                off += na + nb;
            }
        }
    } else {
        tensor_slot *slots, *dslots;
        int n;
        PERL_TRY(model_tensor_slots(c, &lora->full_w, &slots, &n));
        int rc = model_tensor_slots(c, &lora->full_dw, &dslots, &n);
        if (rc != LIBPERL_OK) {
            perl_mem_free(slots);
            return rc;
        }
        tensor_slot *base_slots;
        rc = model_tensor_slots(c, &lora->model->w, &base_slots, &n);
        if (rc != LIBPERL_OK) {
            perl_mem_free(slots);
            perl_mem_free(dslots);
            return rc;
        }
        for (int i = 0; i < n; i++) {
            if (is_embedding_slot(&slots[i]) && !lora->opts.train_embeddings) {
                *slots[i].ptr = *base_slots[i].ptr; /* frozen: shared with the base */
                *dslots[i].ptr = NULL;
                continue;
            }
            if (P) *slots[i].ptr = P + off, *dslots[i].ptr = G + off;
            off += slot_floats(&slots[i]);
        }
        perl_mem_free(slots);
        perl_mem_free(dslots);
        perl_mem_free(base_slots);
        if (c->tied_embeddings) {
            lora->full_w.lm_head = lora->full_w.tok_emb;
            lora->full_dw.lm_head = lora->full_dw.tok_emb;
        } else if (!lora->opts.train_embeddings) {
            lora->full_w.lm_head = lora->model->w.lm_head;
            lora->full_dw.lm_head = NULL;
        }
    }
    lora->head = lora->dhead = NULL;
    if (with_head) {
        if (P) lora->head = P + off, lora->dhead = G + off;
        off += (size_t)c->dim;
    }
    *out_count = off;
    return LIBPERL_OK;
}

static int validate_options(const perl_model *m, const perl_lora_options *o) {
    PERL_CHECK_ARG(o->struct_size >= sizeof(perl_lora_options),
                   "lora options struct_size %zu is too small (call perl_lora_options_init)", o->struct_size);
    PERL_CHECK_ARG(o->mode == LIBPERL_MODE_LORA || o->mode == LIBPERL_MODE_FULL, "unknown adapter mode %d", o->mode);
    if (o->mode == LIBPERL_MODE_FULL) return LIBPERL_OK;
    PERL_CHECK_ARG(o->rank >= 1 && o->rank <= PERL_MIN(m->cfg.dim, 4096), "LoRA rank %d outside [1, %d]", o->rank,
                   PERL_MIN(m->cfg.dim, 4096));
    PERL_CHECK_ARG(isfinite(o->alpha) && o->alpha > 0.0f, "lora_alpha must be a positive number");
    PERL_CHECK_ARG(o->dropout >= 0.0f && o->dropout < 1.0f, "lora dropout %g outside [0, 1)", (double)o->dropout);
    PERL_CHECK_ARG(o->target_modules != 0 && (o->target_modules & ~(uint32_t)LIBPERL_TARGET_ALL) == 0,
                   "target_modules 0x%x must be a non-empty set of LIBPERL_TARGET_* flags", o->target_modules);
    PERL_CHECK_ARG(o->init == LIBPERL_LORA_INIT_KAIMING || o->init == LIBPERL_LORA_INIT_GAUSSIAN,
                   "unknown LoRA init %d", o->init);
    return LIBPERL_OK;
}

int lora_alloc(perl_lora **out, perl_model *model, const perl_lora_options *opts, int with_head) {
    *out = NULL;
    PERL_TRY(validate_options(model, opts));
    perl_lora *lora = perl_mem_calloc(1, sizeof *lora);
    if (!lora) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    lora->model = model;
    lora->opts = *opts;
    lora->opts.struct_size = sizeof lora->opts;
    lora->scale = opts->mode == LIBPERL_MODE_FULL ? 1.0f
                  : opts->use_rslora               ? opts->alpha / sqrtf((float)opts->rank)
                                                   : opts->alpha / (float)opts->rank;
    lora->lr_override = -1.0f;
    perl_optim_options_init(&lora->optim);
    int rc = LIBPERL_ERR_OUT_OF_MEMORY;
    lora->modules = perl_mem_calloc((size_t)model->cfg.n_layers * LORA_N_TARGETS, sizeof *lora->modules);
    lora->full_w.layers = perl_mem_calloc((size_t)model->cfg.n_layers, sizeof(layer_weights));
    lora->full_dw.layers = perl_mem_calloc((size_t)model->cfg.n_layers, sizeof(layer_weights));
    if (!lora->modules || !lora->full_w.layers || !lora->full_dw.layers) goto fail;
    size_t n;
    rc = lora_layout(lora, with_head, &n);
    if (rc != LIBPERL_OK) goto fail;
    rc = LIBPERL_ERR_OUT_OF_MEMORY;
    lora->params = perl_mem_alloc(n * sizeof(float));
    lora->grads = perl_mem_calloc(n, sizeof(float));
    if (!lora->params || !lora->grads) goto fail;
    lora->n_params = n;
    rc = lora_layout(lora, with_head, &n);
    if (rc != LIBPERL_OK) goto fail;
    *out = lora;
    return LIBPERL_OK;
fail:
    perl_lora_free(lora);
    return rc == LIBPERL_ERR_OUT_OF_MEMORY ? perl_fail(rc, "out of memory for an adapter") : rc;
}

/* Copies the base weights into a FULL-mode block. */
static int copy_base_weights(perl_lora *lora) {
    const perl_model_config *c = &lora->model->cfg;
    tensor_slot *dst, *src;
    int n;
    PERL_TRY(model_tensor_slots(c, &lora->full_w, &dst, &n));
    int rc = model_tensor_slots(c, &lora->model->w, &src, &n);
    if (rc != LIBPERL_OK) {
        perl_mem_free(dst);
        return rc;
    }
    for (int i = 0; i < n; i++)
        if (*dst[i].ptr != *src[i].ptr) memcpy(*dst[i].ptr, *src[i].ptr, slot_floats(&src[i]) * sizeof(float));
    perl_mem_free(dst);
    perl_mem_free(src);
    return LIBPERL_OK;
}

int perl_lora_create(perl_lora **out, perl_model *model, const perl_lora_options *opts) {
    PERL_CHECK_ARG(out, "perl_lora_create: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(model, "perl_lora_create: model is NULL");
    PERL_CHECK_ARG(opts, "perl_lora_create: opts is NULL");
    perl_lora *lora;
    PERL_TRY(lora_alloc(&lora, model, opts, 0));
    if (opts->mode == LIBPERL_MODE_FULL) {
        int rc = copy_base_weights(lora);
        if (rc != LIBPERL_OK) {
            perl_lora_free(lora);
            return rc;
        }
    } else {
        int r = opts->rank;
        for (int i = 0; i < model->cfg.n_layers * LORA_N_TARGETS; i++) {
            lora_module *mod = &lora->modules[i];
            if (!mod->A) continue;
            /* Kaiming-uniform(a = sqrt(5)) bound = 1 / sqrt(fan_in); Gaussian std = 1 / r (PEFT) */
            float bound = 1.0f / sqrtf((float)mod->in);
            for (size_t j = 0; j < (size_t)r * mod->in; j++)
                mod->A[j] = opts->init == LIBPERL_LORA_INIT_GAUSSIAN
                                ? perl_rand_normal(opts->seed, (uint64_t)i, j) / (float)r
                                : (2.0f * perl_rand_uniform(opts->seed, (uint64_t)i, j) - 1.0f) * bound;
            memset(mod->B, 0, (size_t)mod->out * r * sizeof(float));
        }
    }
    *out = lora;
    return LIBPERL_OK;
}

void perl_lora_free(perl_lora *lora) {
    if (!lora) return;
    engine_free(lora->engine);
    perl_mem_free(lora->modules);
    perl_mem_free(lora->full_w.layers);
    perl_mem_free(lora->full_dw.layers);
    perl_mem_free(lora->params);
    perl_mem_free(lora->grads);
    perl_mem_free(lora->adam_m);
    perl_mem_free(lora->adam_v);
    perl_mem_free(lora);
}

const model_weights *lora_weights(const perl_model *m, const perl_lora *lora) {
    return lora && lora->opts.mode == LIBPERL_MODE_FULL ? &lora->full_w : &m->w;
}

const lora_module *lora_module_at(const perl_lora *lora, int layer, int target) {
    if (!lora || lora->opts.mode != LIBPERL_MODE_LORA) return NULL;
    const lora_module *mod = &lora->modules[layer * LORA_N_TARGETS + target];
    return mod->A ? mod : NULL;
}

int lora_ensure_head(perl_lora *lora, float init_std, uint64_t seed) {
    if (lora->head) return LIBPERL_OK;
    if (lora->adam_m) return perl_fail(LIBPERL_ERR_STATE, "cannot add a head after training has started");
    size_t dim = (size_t)lora->model->cfg.dim, n = lora->n_params + dim;
    float *params = perl_mem_alloc(n * sizeof(float)), *grads = perl_mem_calloc(n, sizeof(float));
    if (!params || !grads) {
        perl_mem_free(params);
        perl_mem_free(grads);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory adding a head");
    }
    memcpy(params, lora->params, lora->n_params * sizeof(float));
    memcpy(grads, lora->grads, lora->n_params * sizeof(float));
    perl_mem_free(lora->params);
    perl_mem_free(lora->grads);
    lora->params = params;
    lora->grads = grads;
    size_t count;
    PERL_TRY(lora_layout(lora, 1, &count));
    lora->n_params = count;
    for (size_t j = 0; j < dim; j++) lora->head[j] = init_std * perl_rand_normal(seed, 0x4eadull, j);
    /* the engine's cached weight pointers point into the old block */
    engine_free(lora->engine);
    lora->engine = NULL;
    return LIBPERL_OK;
}

size_t perl_lora_num_params(const perl_lora *lora) { return lora ? lora->n_params : 0; }

int perl_lora_params(perl_lora *lora, float **out_params, float **out_grads, size_t *out_count) {
    PERL_CHECK_ARG(lora, "perl_lora_params: lora is NULL");
    if (out_params) *out_params = lora->params;
    if (out_grads) *out_grads = lora->grads;
    if (out_count) *out_count = lora->n_params;
    return LIBPERL_OK;
}

int perl_lora_save(const perl_lora *lora, const char *dir) {
    PERL_CHECK_ARG(lora, "perl_lora_save: lora is NULL");
    PERL_CHECK_ARG(dir && *dir, "perl_lora_save: dir is NULL or empty");
    return peft_save(lora, dir);
}

int perl_lora_load(perl_lora **out, perl_model *model, const char *dir) {
    PERL_CHECK_ARG(out, "perl_lora_load: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(model, "perl_lora_load: model is NULL");
    PERL_CHECK_ARG(dir && *dir, "perl_lora_load: dir is NULL or empty");
    return peft_load(out, model, dir);
}

int perl_lora_merge(perl_model **out, const perl_lora *lora) {
    PERL_CHECK_ARG(out, "perl_lora_merge: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(lora, "perl_lora_merge: lora is NULL");
    const perl_model *base = lora->model;
    perl_model *m;
    PERL_TRY(model_alloc(&m, &base->cfg));
    size_t count = model_weights_count(&m->cfg);
    float *buffer = perl_mem_alloc(count * sizeof(float));
    if (!buffer || model_add_backing(m, buffer, count * sizeof(float), 0) != LIBPERL_OK) {
        perl_mem_free(buffer);
        perl_model_free(m);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory merging an adapter");
    }
    model_weights_point(&m->cfg, &m->w, buffer);
    tensor_slot *dst, *src;
    int n, rc = model_tensor_slots(&m->cfg, &m->w, &dst, &n);
    if (rc == LIBPERL_OK) {
        rc = model_tensor_slots(&m->cfg, (model_weights *)lora_weights(base, lora), &src, &n);
        if (rc == LIBPERL_OK) {
            for (int i = 0; i < n; i++) memcpy(*dst[i].ptr, *src[i].ptr, slot_floats(&src[i]) * sizeof(float));
            perl_mem_free(src);
        }
        perl_mem_free(dst);
    }
    if (rc == LIBPERL_OK) rc = model_init_rope(m);
    if (rc != LIBPERL_OK) {
        perl_model_free(m);
        return rc;
    }
    for (int l = 0; l < m->cfg.n_layers; l++) {
        layer_weights *L = &m->w.layers[l];
        float *targets[LORA_N_TARGETS] = {L->wq, L->wk, L->wv, L->wo, L->w_gate, L->w_up, L->w_down};
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            const lora_module *mod = lora_module_at(lora, l, t);
            if (!mod) continue;
            /* W[out, in] += scale * B[out, r] A[r, in] */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mod->out, mod->in, lora->opts.rank, lora->scale,
                        mod->B, lora->opts.rank, mod->A, mod->in, 1.0f, targets[t], mod->in);
        }
    }
    m->source_path = perl_mem_strdup(base->source_path ? base->source_path : "");
    *out = m;
    return LIBPERL_OK;
}

int perl_lora_set_optimizer(perl_lora *lora, const perl_optim_options *o) {
    PERL_CHECK_ARG(lora, "perl_lora_set_optimizer: lora is NULL");
    PERL_CHECK_ARG(o, "perl_lora_set_optimizer: opts is NULL");
    PERL_CHECK_ARG(o->struct_size >= sizeof(perl_optim_options),
                   "optimizer options struct_size %zu is too small (call perl_optim_options_init)", o->struct_size);
    PERL_CHECK_ARG(isfinite(o->lr) && o->lr >= 0.0f, "learning rate must be finite and >= 0");
    PERL_CHECK_ARG(o->beta1 >= 0.0f && o->beta1 < 1.0f && o->beta2 >= 0.0f && o->beta2 < 1.0f,
                   "betas must be in [0, 1)");
    PERL_CHECK_ARG(o->eps > 0.0f && isfinite(o->eps), "eps must be positive");
    PERL_CHECK_ARG(o->weight_decay >= 0.0f && isfinite(o->weight_decay), "weight_decay must be >= 0");
    PERL_CHECK_ARG(isfinite(o->max_grad_norm), "max_grad_norm must be finite");
    PERL_CHECK_ARG(o->schedule >= LIBPERL_LR_CONSTANT && o->schedule <= LIBPERL_LR_COSINE, "unknown schedule %d",
                   o->schedule);
    PERL_CHECK_ARG(o->warmup_steps >= 0 && o->total_steps >= 0, "warmup/total steps must be >= 0");
    PERL_CHECK_ARG(o->min_lr_ratio >= 0.0f && o->min_lr_ratio <= 1.0f, "min_lr_ratio must be in [0, 1]");
    lora->optim = *o;
    lora->optim.struct_size = sizeof lora->optim;
    return LIBPERL_OK;
}

int perl_lora_set_lr(perl_lora *lora, float lr) {
    PERL_CHECK_ARG(lora, "perl_lora_set_lr: lora is NULL");
    PERL_CHECK_ARG(!isnan(lr) && !isinf(lr), "learning rate must be finite");
    lora->lr_override = lr < 0.0f ? -1.0f : lr;
    return LIBPERL_OK;
}

float lora_current_lr(const perl_lora *lora) {
    return lora->lr_override >= 0.0f ? lora->lr_override : lr_schedule(&lora->optim, lora->step);
}

int perl_lora_set_grad_hook(perl_lora *lora, perl_grad_hook hook, void *user) {
    PERL_CHECK_ARG(lora, "perl_lora_set_grad_hook: lora is NULL");
    lora->hook = hook;
    lora->hook_user = user;
    return LIBPERL_OK;
}

int perl_lora_set_recompute(perl_lora *lora, int enabled) {
    PERL_CHECK_ARG(lora, "perl_lora_set_recompute: lora is NULL");
    lora->recompute = enabled ? 1 : 0;
    engine_free(lora->engine); /* re-plan the activation slots */
    lora->engine = NULL;
    return LIBPERL_OK;
}

int perl_lora_zero_grad(perl_lora *lora) {
    PERL_CHECK_ARG(lora, "perl_lora_zero_grad: lora is NULL");
    memset(lora->grads, 0, lora->n_params * sizeof(float));
    return LIBPERL_OK;
}
