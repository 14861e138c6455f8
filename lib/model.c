/* perl_model: configuration, the tensor list of the HF layout, weight
 * storage, RoPE tables, random initialisation. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>

/* Upper bounds that reject corrupt headers long before allocation. */
#define MAX_DIM 65536
#define MAX_HIDDEN (1 << 20)
#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 1024
#define MAX_VOCAB (1 << 22)
#define MAX_SEQ (1 << 17)

void perl_model_config_init(perl_model_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->struct_size = sizeof *cfg;
    cfg->dim = 64;
    cfg->hidden_dim = 172;
    cfg->n_layers = 2;
    cfg->n_heads = 8;
    cfg->n_kv_heads = 4;
    cfg->head_dim = 0;
    cfg->vocab_size = 512;
    cfg->max_seq_len = 256;
    cfg->rope_theta = 10000.0f;
    cfg->rms_norm_eps = 1e-5f;
    cfg->tied_embeddings = 1;
    cfg->qkv_bias = 0;
    cfg->rope_interleaved = 0;
    cfg->bos_token_id = 1;
    cfg->eos_token_id = 2;
}

static int check_range(const char *name, int64_t value, int64_t lo, int64_t hi) {
    if (value < lo || value > hi)
        return perl_fail(LIBPERL_ERR_RANGE, "model config: %s = %lld is outside [%lld, %lld]", name,
                         (long long)value, (long long)lo, (long long)hi);
    return LIBPERL_OK;
}

int model_config_validate(perl_model_config *cfg) {
    PERL_TRY(check_range("dim", cfg->dim, 1, MAX_DIM));
    PERL_TRY(check_range("hidden_dim", cfg->hidden_dim, 1, MAX_HIDDEN));
    PERL_TRY(check_range("n_layers", cfg->n_layers, 1, MAX_LAYERS));
    PERL_TRY(check_range("n_heads", cfg->n_heads, 1, MAX_HEADS));
    PERL_TRY(check_range("n_kv_heads", cfg->n_kv_heads, 1, cfg->n_heads));
    PERL_TRY(check_range("vocab_size", cfg->vocab_size, 1, MAX_VOCAB));
    PERL_TRY(check_range("max_seq_len", cfg->max_seq_len, 1, MAX_SEQ));
    if (cfg->n_heads % cfg->n_kv_heads != 0)
        return perl_fail(LIBPERL_ERR_SHAPE, "model config: n_heads %d is not a multiple of n_kv_heads %d",
                         cfg->n_heads, cfg->n_kv_heads);
    if (cfg->head_dim == 0) {
        if (cfg->dim % cfg->n_heads != 0)
            return perl_fail(LIBPERL_ERR_SHAPE, "model config: dim %d is not a multiple of n_heads %d",
                             cfg->dim, cfg->n_heads);
        cfg->head_dim = cfg->dim / cfg->n_heads;
    }
    PERL_TRY(check_range("head_dim", cfg->head_dim, 2, MAX_HEAD_DIM));
    if (cfg->head_dim % 2 != 0)
        return perl_fail(LIBPERL_ERR_SHAPE, "model config: head_dim %d must be even for RoPE", cfg->head_dim);
    if (!(cfg->rope_theta > 0.0f) || !isfinite(cfg->rope_theta))
        return perl_fail(LIBPERL_ERR_RANGE, "model config: rope_theta must be positive");
    if (!(cfg->rms_norm_eps > 0.0f) || !(cfg->rms_norm_eps < 1.0f))
        return perl_fail(LIBPERL_ERR_RANGE, "model config: rms_norm_eps must be in (0, 1)");
    if (cfg->bos_token_id >= cfg->vocab_size || cfg->eos_token_id >= cfg->vocab_size)
        return perl_fail(LIBPERL_ERR_RANGE, "model config: bos/eos token id outside the vocabulary");
    cfg->tied_embeddings = cfg->tied_embeddings ? 1 : 0;
    cfg->qkv_bias = cfg->qkv_bias ? 1 : 0;
    cfg->rope_interleaved = cfg->rope_interleaved ? 1 : 0;
    cfg->struct_size = sizeof *cfg;
    return LIBPERL_OK;
}

int model_alloc(perl_model **out, const perl_model_config *cfg_in) {
    *out = NULL;
    perl_model_config cfg = *cfg_in;
    PERL_TRY(model_config_validate(&cfg));
    perl_model *m = perl_mem_calloc(1, sizeof *m);
    if (!m) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory allocating a model");
    m->cfg = cfg;
    m->w.layers = perl_mem_calloc((size_t)cfg.n_layers, sizeof *m->w.layers);
    if (!m->w.layers) {
        perl_mem_free(m);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory allocating a model");
    }
    *out = m;
    return LIBPERL_OK;
}

/* Appends one slot; names use HF's layout. */
static void add_slot(tensor_slot *slots, int *n, float **ptr, int64_t rows, int64_t cols,
                     const char *fmt, int layer) {
    tensor_slot *s = &slots[(*n)++];
    snprintf(s->name, sizeof s->name, fmt, layer);
    s->ndim = cols > 0 ? 2 : 1;
    s->shape[0] = rows;
    s->shape[1] = cols > 0 ? cols : 0;
    s->ptr = ptr;
}

int model_tensor_slots(const perl_model_config *cfg, model_weights *w, tensor_slot **out, int *count) {
    int max_slots = 3 + cfg->n_layers * 12;
    tensor_slot *slots = perl_mem_calloc((size_t)max_slots, sizeof *slots);
    if (!slots) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory listing tensors");
    int n = 0;
    int64_t dim = cfg->dim, hid = cfg->hidden_dim, vocab = cfg->vocab_size;
    int64_t q_out = (int64_t)cfg->n_heads * cfg->head_dim, kv_out = (int64_t)cfg->n_kv_heads * cfg->head_dim;
    add_slot(slots, &n, &w->tok_emb, vocab, dim, "model.embed_tokens.weight", 0);
    for (int l = 0; l < cfg->n_layers; l++) {
        layer_weights *L = &w->layers[l];
        add_slot(slots, &n, &L->attn_norm, dim, 0, "model.layers.%d.input_layernorm.weight", l);
        add_slot(slots, &n, &L->wq, q_out, dim, "model.layers.%d.self_attn.q_proj.weight", l);
        add_slot(slots, &n, &L->wk, kv_out, dim, "model.layers.%d.self_attn.k_proj.weight", l);
        add_slot(slots, &n, &L->wv, kv_out, dim, "model.layers.%d.self_attn.v_proj.weight", l);
        if (cfg->qkv_bias) {
            add_slot(slots, &n, &L->bq, q_out, 0, "model.layers.%d.self_attn.q_proj.bias", l);
            add_slot(slots, &n, &L->bk, kv_out, 0, "model.layers.%d.self_attn.k_proj.bias", l);
            add_slot(slots, &n, &L->bv, kv_out, 0, "model.layers.%d.self_attn.v_proj.bias", l);
        }
        add_slot(slots, &n, &L->wo, dim, q_out, "model.layers.%d.self_attn.o_proj.weight", l);
        add_slot(slots, &n, &L->ffn_norm, dim, 0, "model.layers.%d.post_attention_layernorm.weight", l);
        add_slot(slots, &n, &L->w_gate, hid, dim, "model.layers.%d.mlp.gate_proj.weight", l);
        add_slot(slots, &n, &L->w_up, hid, dim, "model.layers.%d.mlp.up_proj.weight", l);
        add_slot(slots, &n, &L->w_down, dim, hid, "model.layers.%d.mlp.down_proj.weight", l);
    }
    add_slot(slots, &n, &w->final_norm, dim, 0, "model.norm.weight", 0);
    if (!cfg->tied_embeddings) add_slot(slots, &n, &w->lm_head, vocab, dim, "lm_head.weight", 0);
    *out = slots;
    *count = n;
    return LIBPERL_OK;
}

static size_t slot_count(const tensor_slot *s) {
    return (size_t)s->shape[0] * (size_t)(s->ndim == 2 ? s->shape[1] : 1);
}

size_t model_weights_count(const perl_model_config *cfg) {
    size_t dim = (size_t)cfg->dim, hid = (size_t)cfg->hidden_dim, vocab = (size_t)cfg->vocab_size;
    size_t q_out = (size_t)cfg->n_heads * (size_t)cfg->head_dim;
    size_t kv_out = (size_t)cfg->n_kv_heads * (size_t)cfg->head_dim;
    size_t per_layer = 2 * dim + q_out * dim + 2 * kv_out * dim + dim * q_out + 3 * hid * dim;
    if (cfg->qkv_bias) per_layer += q_out + 2 * kv_out;
    size_t total = vocab * dim + (size_t)cfg->n_layers * per_layer + dim;
    if (!cfg->tied_embeddings) total += vocab * dim;
    return total;
}

void model_weights_point(const perl_model_config *cfg, model_weights *w, float *buffer) {
    tensor_slot *slots;
    int n;
    /* Listing cannot fail for a validated config except on OOM; then the
     * pointers stay NULL and the caller's NULL checks catch it. */
    if (model_tensor_slots(cfg, w, &slots, &n) != LIBPERL_OK) return;
    size_t offset = 0;
    for (int i = 0; i < n; i++) {
        *slots[i].ptr = buffer + offset;
        offset += slot_count(&slots[i]);
    }
    perl_mem_free(slots);
    model_weights_tie(cfg, w);
}

void model_weights_tie(const perl_model_config *cfg, model_weights *w) {
    if (cfg->tied_embeddings) w->lm_head = w->tok_emb;
}

int model_add_backing(perl_model *m, void *addr, size_t len, int is_mmap) {
    model_backing *grown = realloc(m->backing, (size_t)(m->n_backing + 1) * sizeof *grown);
    if (!grown) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    m->backing = grown;
    m->backing[m->n_backing++] = (model_backing){addr, len, is_mmap};
    return LIBPERL_OK;
}

int model_init_rope(perl_model *m) {
    int half = m->cfg.head_dim / 2;
    size_t n = (size_t)m->cfg.max_seq_len * (size_t)half;
    perl_mem_free(m->rope_cos);
    perl_mem_free(m->rope_sin);
    m->rope_cos = perl_mem_alloc(n * sizeof(float));
    m->rope_sin = perl_mem_alloc(n * sizeof(float));
    if (!m->rope_cos || !m->rope_sin) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for RoPE tables");
    for (int p = 0; p < m->cfg.max_seq_len; p++) {
        for (int j = 0; j < half; j++) {
            /* inv_freq_j = theta^(-2j / head_dim), in double like HF's float32 arange/pow */
            double inv_freq = 1.0 / pow((double)m->cfg.rope_theta, (2.0 * j) / m->cfg.head_dim);
            float angle = (float)p * (float)inv_freq;
            m->rope_cos[(size_t)p * half + j] = cosf(angle);
            m->rope_sin[(size_t)p * half + j] = sinf(angle);
        }
    }
    return LIBPERL_OK;
}

int perl_model_create_random(perl_model **out, const perl_model_config *cfg, uint64_t seed) {
    PERL_CHECK_ARG(out, "perl_model_create_random: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(cfg, "perl_model_create_random: cfg is NULL");
    PERL_CHECK_ARG(cfg->struct_size >= sizeof(perl_model_config),
                   "perl_model_create_random: cfg->struct_size %zu is too small (call perl_model_config_init)",
                   cfg->struct_size);
    perl_model *m;
    PERL_TRY(model_alloc(&m, cfg));
    size_t count = model_weights_count(&m->cfg);
    float *buffer = perl_mem_alloc(count * sizeof(float));
    if (!buffer || model_add_backing(m, buffer, count * sizeof(float), 0) != LIBPERL_OK) {
        perl_mem_free(buffer);
        perl_model_free(m);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for %zu weights", count);
    }
    model_weights_point(&m->cfg, &m->w, buffer);
    tensor_slot *slots;
    int n;
    int rc = model_tensor_slots(&m->cfg, &m->w, &slots, &n);
    if (rc != LIBPERL_OK) {
        perl_model_free(m);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        float *t = *slots[i].ptr;
        size_t len = slot_count(&slots[i]);
        int is_norm = slots[i].ndim == 1 && strstr(slots[i].name, "norm") != NULL;
        int is_bias = slots[i].ndim == 1 && !is_norm;
        for (size_t j = 0; j < len; j++)
            t[j] = is_norm ? 1.0f : is_bias ? 0.0f : 0.02f * perl_rand_normal(seed, (uint64_t)i, j);
    }
    perl_mem_free(slots);
    rc = model_init_rope(m);
    if (rc != LIBPERL_OK) {
        perl_model_free(m);
        return rc;
    }
    m->source_path = perl_mem_strdup("random");
    *out = m;
    return LIBPERL_OK;
}

void perl_model_free(perl_model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_backing; i++) {
        if (m->backing[i].is_mmap) munmap(m->backing[i].addr, m->backing[i].len);
        else perl_mem_free(m->backing[i].addr);
    }
    free(m->backing);
    perl_mem_free(m->w.layers);
    perl_mem_free(m->rope_cos);
    perl_mem_free(m->rope_sin);
    perl_mem_free(m->source_path);
    perl_mem_free(m);
}

int perl_model_get_config(const perl_model *m, perl_model_config *out) {
    PERL_CHECK_ARG(m, "perl_model_get_config: model is NULL");
    PERL_CHECK_ARG(out, "perl_model_get_config: out is NULL");
    size_t size = out->struct_size;
    PERL_CHECK_ARG(size >= offsetof(perl_model_config, dim) + sizeof(int32_t),
                   "perl_model_get_config: out->struct_size %zu is too small", size);
    if (size > sizeof *out) size = sizeof *out;
    memcpy(out, &m->cfg, size);
    out->struct_size = size;
    return LIBPERL_OK;
}

size_t perl_model_num_params(const perl_model *m) {
    return m ? model_weights_count(&m->cfg) : 0;
}
