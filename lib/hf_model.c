/*
 * Hugging Face checkpoints: config.json + model.safetensors (or a sharded
 * model.safetensors.index.json) for Llama, Mistral and Qwen2, and the
 * public perl_model_load / perl_model_save_hf.
 */
#include "fileio.h"
#include "json.h"
#include "model.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define CONFIG_MAX_BYTES ((size_t)16 << 20)
#define INDEX_MAX_BYTES ((size_t)256 << 20)

/* ---- config.json --------------------------------------------------------- */

typedef struct cfg_reader {
    const json_value *root;
    const char *path;
} cfg_reader;

/* Reads an int32 key.  Absent or null: *out = dflt when !required. */
static int cfg_int(const cfg_reader *r, const char *key, int required, int64_t dflt, int64_t lo,
                   int64_t hi, int32_t *out)
{
    const json_value *v = json_get(r->root, key);
    if (v == NULL || json_is_null(v)) {
        if (required)
            return perl_fail(LIBPERL_ERR_FORMAT, "%s: missing required key \"%s\"", r->path, key);
        *out = (int32_t)dflt;
        return LIBPERL_OK;
    }
    int64_t x;
    if (!json_as_int64(v, &x))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"%s\" must be an integer, found %s", r->path,
                         key, v->type == JSON_NUMBER ? "a fraction" : json_type_name(v->type));
    if (x < lo || x > hi)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"%s\" = %lld is outside [%lld, %lld]", r->path,
                         key, (long long)x, (long long)lo, (long long)hi);
    *out = (int32_t)x;
    return LIBPERL_OK;
}

static int cfg_float(const cfg_reader *r, const char *key, double dflt, float *out)
{
    const json_value *v = json_get(r->root, key);
    if (v == NULL || json_is_null(v)) {
        *out = (float)dflt;
        return LIBPERL_OK;
    }
    double x;
    if (!json_as_double(v, &x))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"%s\" must be a number, found %s", r->path, key,
                         json_type_name(v->type));
    if (!(x > 0.0) || !isfinite((float)x))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"%s\" = %g must be a positive finite number",
                         r->path, key, x);
    *out = (float)x;
    return LIBPERL_OK;
}

static int cfg_bool(const cfg_reader *r, const char *key, int dflt, int *out)
{
    const json_value *v = json_get(r->root, key);
    if (v == NULL || json_is_null(v)) {
        *out = dflt;
        return LIBPERL_OK;
    }
    if (!json_as_bool(v, out))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"%s\" must be true or false, found %s", r->path,
                         key, json_type_name(v->type));
    return LIBPERL_OK;
}

/* bos/eos: an integer, a list of integers (first is used), or null (-1). */
static int cfg_token(const cfg_reader *r, const char *key, int32_t dflt, int32_t *out)
{
    const json_value *v = json_get(r->root, key);
    if (v == NULL) {
        *out = dflt;
        return LIBPERL_OK;
    }
    if (json_is_null(v)) {
        *out = -1;
        return LIBPERL_OK;
    }
    if (v->type == JSON_ARRAY) {
        if (v->count == 0) {
            *out = -1;
            return LIBPERL_OK;
        }
        v = v->items[0];
    }
    int64_t x;
    if (!json_as_int64(v, &x) || x < 0 || x > INT32_MAX)
        return perl_fail(LIBPERL_ERR_FORMAT,
                         "%s: \"%s\" must be a non-negative integer or a list of them", r->path,
                         key);
    *out = (int32_t)x;
    return LIBPERL_OK;
}

static int parse_config(perl_model_config *cfg, const json_value *root, const char *path)
{
    if (root->type != JSON_OBJECT)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: expected a JSON object, found %s", path,
                         json_type_name(root->type));
    cfg_reader r = {root, path};

    /* Architecture. */
    const json_value *mt = json_get(root, "model_type");
    const json_value *arch = json_get(root, "architectures");
    const char *model_type = json_as_string(mt);
    if (mt != NULL && model_type == NULL)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"model_type\" must be a string", path);
    const char *arch0 = NULL;
    if (arch != NULL && !json_is_null(arch)) {
        if (arch->type != JSON_ARRAY || arch->count == 0 ||
            (arch0 = json_as_string(arch->items[0])) == NULL)
            return perl_fail(LIBPERL_ERR_FORMAT,
                             "%s: \"architectures\" must be a non-empty list of strings", path);
    }
    if (model_type == NULL && arch0 == NULL)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: neither \"model_type\" nor \"architectures\" "
                                             "says what model this is", path);
    int is_qwen2 = 0;
    if (model_type != NULL) {
        if (strcmp(model_type, "qwen2") == 0) is_qwen2 = 1;
        else if (strcmp(model_type, "llama") != 0 && strcmp(model_type, "mistral") != 0)
            return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                             "%s: model_type \"%.60s\" is not supported (llama, mistral, qwen2)",
                             path, model_type);
    }
    if (arch0 != NULL) {
        if (strcmp(arch0, "Qwen2ForCausalLM") == 0) is_qwen2 = 1;
        else if (strcmp(arch0, "LlamaForCausalLM") != 0 && strcmp(arch0, "MistralForCausalLM") != 0)
            return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                             "%s: architecture \"%.60s\" is not supported (LlamaForCausalLM, "
                             "MistralForCausalLM, Qwen2ForCausalLM)", path, arch0);
    }

    const json_value *rs = json_get(root, "rope_scaling");
    if (rs != NULL && !json_is_null(rs))
        return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                         "%s: \"rope_scaling\" is set; scaled RoPE is not supported", path);
    const json_value *act = json_get(root, "hidden_act");
    if (act != NULL && !json_is_null(act)) {
        const char *a = json_as_string(act);
        if (a == NULL)
            return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"hidden_act\" must be a string", path);
        if (strcmp(a, "silu") != 0)
            return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                             "%s: hidden_act \"%.40s\" is not supported (silu only)", path, a);
    }
    int attention_bias = 0, mlp_bias = 0;
    PERL_TRY(cfg_bool(&r, "attention_bias", 0, &attention_bias));
    PERL_TRY(cfg_bool(&r, "mlp_bias", 0, &mlp_bias));
    if (attention_bias && !is_qwen2)
        /* Llama's attention_bias also puts a bias on o_proj, which the engine lacks. */
        return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                         "%s: \"attention_bias\": true (biases on q/k/v/o) is not supported", path);
    if (mlp_bias)
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: \"mlp_bias\": true is not supported", path);

    perl_model_config_init(cfg);
    const int64_t big = INT32_MAX;
    PERL_TRY(cfg_int(&r, "hidden_size", 1, 0, 1, big, &cfg->dim));
    PERL_TRY(cfg_int(&r, "intermediate_size", 1, 0, 1, big, &cfg->hidden_dim));
    PERL_TRY(cfg_int(&r, "num_hidden_layers", 1, 0, 1, big, &cfg->n_layers));
    PERL_TRY(cfg_int(&r, "num_attention_heads", 1, 0, 1, big, &cfg->n_heads));
    PERL_TRY(cfg_int(&r, "num_key_value_heads", 0, cfg->n_heads, 1, big, &cfg->n_kv_heads));
    PERL_TRY(cfg_int(&r, "head_dim", 0, 0, 1, big, &cfg->head_dim));
    PERL_TRY(cfg_int(&r, "vocab_size", 1, 0, 1, big, &cfg->vocab_size));
    PERL_TRY(cfg_int(&r, "max_position_embeddings", 0, 2048, 1, big, &cfg->max_seq_len));
    PERL_TRY(cfg_float(&r, "rope_theta", 10000.0, &cfg->rope_theta));
    PERL_TRY(cfg_float(&r, "rms_norm_eps", 1e-6, &cfg->rms_norm_eps));
    PERL_TRY(cfg_bool(&r, "tie_word_embeddings", 0, &cfg->tied_embeddings));
    PERL_TRY(cfg_token(&r, "bos_token_id", 1, &cfg->bos_token_id));
    PERL_TRY(cfg_token(&r, "eos_token_id", 2, &cfg->eos_token_id));
    cfg->qkv_bias = is_qwen2 || attention_bias;
    cfg->rope_interleaved = 0;

    /* Sliding-window attention (Mistral; Qwen2 with use_sliding_window) is
     * exact as long as sequences stay within the window. */
    int use_window = 1;
    if (is_qwen2) PERL_TRY(cfg_bool(&r, "use_sliding_window", 0, &use_window));
    if (use_window) {
        int32_t window = 0;
        PERL_TRY(cfg_int(&r, "sliding_window", 0, 0, 0, big, &window));
        if (window > 0 && window < cfg->max_seq_len) cfg->max_seq_len = window;
    }

    perl_model_config probe = *cfg;
    int rc = model_config_validate(&probe);
    if (rc != LIBPERL_OK) {
        if (rc == LIBPERL_ERR_OUT_OF_MEMORY) return rc;
        char msg[400];
        snprintf(msg, sizeof msg, "%s", perl_last_error());
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: %s", path, msg);
    }
    *cfg = probe;
    return LIBPERL_OK;
}

/* ---- weights ------------------------------------------------------------- */

/* A shard file name from an index: a plain name inside the directory. */
static int shard_name_ok(const char *s, size_t len)
{
    if (len == 0 || strlen(s) != len) return 0;
    if (strchr(s, '/') != NULL || strchr(s, '\\') != NULL) return 0;
    if (strstr(s, "..") != NULL) return 0;
    return 1;
}

typedef struct hf_weights {
    st_file *files;
    int n_files;
    json_doc *index;          /* NULL for a single file */
    const json_value *weight_map;
    const char **shard_names; /* [n_files], into the index document */
    int *file_used;
} hf_weights;

static void hf_weights_close(hf_weights *hw)
{
    for (int i = 0; i < hw->n_files; i++) st_close(&hw->files[i]);
    perl_mem_free(hw->files);
    perl_mem_free(hw->file_used);
    perl_mem_free(hw->shard_names);
    json_doc_free(hw->index);
    memset(hw, 0, sizeof *hw);
}

static int open_single(hf_weights *hw, const char *path)
{
    hw->files = perl_mem_calloc(1, sizeof *hw->files);
    hw->file_used = perl_mem_calloc(1, sizeof *hw->file_used);
    if (hw->files == NULL || hw->file_used == NULL)
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory opening '%s'", path);
    PERL_TRY(st_open(&hw->files[0], path));
    hw->n_files = 1;
    return LIBPERL_OK;
}

static int open_sharded(hf_weights *hw, const char *dir, const char *index_path)
{
    char *text = NULL;
    size_t len = 0;
    PERL_TRY(file_read_all(index_path, INDEX_MAX_BYTES, &text, &len));
    int rc = json_parse(&hw->index, text, len, index_path);
    perl_mem_free(text);
    if (rc != LIBPERL_OK) return rc;
    const json_value *root = json_doc_root(hw->index);
    const json_value *wm = json_get(root, "weight_map");
    if (wm == NULL || wm->type != JSON_OBJECT)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: missing \"weight_map\" object", index_path);
    hw->weight_map = wm;
    /* Unique shard names, in first-seen order (few shards: linear search). */
    const char **names = perl_mem_alloc((wm->count ? wm->count : 1) * sizeof *names);
    if (names == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    int n = 0;
    for (size_t i = 0; i < wm->count; i++) {
        const json_value *v = wm->members[i].value;
        const char *s = json_as_string(v);
        if (s == NULL || !shard_name_ok(s, v->string_len)) {
            perl_mem_free(names);
            return perl_fail(LIBPERL_ERR_FORMAT,
                             "%s: weight_map entry \"%.100s\" must name a file in the same "
                             "directory (no '/', '..' or empty names)",
                             index_path, wm->members[i].key);
        }
        int seen = 0;
        for (int k = 0; k < n && !seen; k++) seen = strcmp(names[k], s) == 0;
        if (!seen) names[n++] = s;
    }
    hw->files = perl_mem_calloc(n ? (size_t)n : 1, sizeof *hw->files);
    hw->file_used = perl_mem_calloc(n ? (size_t)n : 1, sizeof *hw->file_used);
    if (hw->files == NULL || hw->file_used == NULL) {
        perl_mem_free(names);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    }
    rc = LIBPERL_OK;
    for (int k = 0; k < n && rc == LIBPERL_OK; k++) {
        char *p = file_join(dir, names[k]);
        if (p == NULL) {
            rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
        rc = st_open(&hw->files[k], p);
        perl_mem_free(p);
        if (rc == LIBPERL_OK) hw->n_files = k + 1;
    }
    hw->shard_names = names;
    return rc;
}

/* Finds a tensor; sets *file_index.  NULL with an error recorded when absent. */
static const st_tensor *find_tensor(hf_weights *hw, const char *name, const char *dir,
                                    int *file_index, int *rc)
{
    if (hw->weight_map == NULL) {
        const st_tensor *t = st_find(&hw->files[0], name);
        if (t == NULL)
            *rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: missing tensor \"%s\"", hw->files[0].path,
                            name);
        *file_index = 0;
        return t;
    }
    const char *shard = json_as_string(json_get(hw->weight_map, name));
    if (shard == NULL) {
        *rc = perl_fail(LIBPERL_ERR_FORMAT,
                        "%s/model.safetensors.index.json: missing tensor \"%s\" in weight_map",
                        dir, name);
        return NULL;
    }
    for (int k = 0; k < hw->n_files; k++) {
        if (strcmp(hw->shard_names[k], shard) == 0) {
            const st_tensor *t = st_find(&hw->files[k], name);
            if (t == NULL)
                *rc = perl_fail(LIBPERL_ERR_FORMAT,
                                "%s: missing tensor \"%s\" (the index places it in this shard)",
                                hw->files[k].path, name);
            *file_index = k;
            return t;
        }
    }
    *rc = perl_fail(LIBPERL_ERR_INTERNAL, "shard \"%s\" was not opened", shard);
    return NULL;
}

static int load_weights(perl_model *m, const char *dir)
{
    hf_weights hw;
    memset(&hw, 0, sizeof hw);
    tensor_slot *slots = NULL;
    const st_tensor **found = NULL;
    int n_slots = 0, rc;
    char *single = file_join(dir, "model.safetensors");
    char *index = file_join(dir, "model.safetensors.index.json");
    char *bin = file_join(dir, "pytorch_model.bin");
    if (single == NULL || index == NULL || bin == NULL) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if (file_exists(single)) {
        rc = open_single(&hw, single);
    } else if (file_exists(index)) {
        rc = open_sharded(&hw, dir, index);
    } else if (file_exists(bin)) {
        rc = perl_fail(LIBPERL_ERR_UNSUPPORTED,
                       "%s: only safetensors weights are supported, not pytorch_model.bin", dir);
    } else {
        rc = perl_fail(LIBPERL_ERR_FORMAT,
                       "%s: no model.safetensors or model.safetensors.index.json", dir);
    }
    if (rc != LIBPERL_OK) goto done;

    rc = model_tensor_slots(&m->cfg, &m->w, &slots, &n_slots);
    if (rc != LIBPERL_OK) goto done;
    found = perl_mem_calloc((size_t)n_slots, sizeof *found);
    if (found == NULL) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    /* Pass 1: every tensor present with the exact shape and a float dtype. */
    size_t convert_floats = 0;
    for (int i = 0; i < n_slots; i++) {
        int fi = 0;
        const st_tensor *t = find_tensor(&hw, slots[i].name, dir, &fi, &rc);
        if (t == NULL) goto done;
        if (!st_shape_is(t, slots[i].ndim, slots[i].shape)) {
            char got[128], want[128];
            st_shape_str(t->ndim, t->shape, got, sizeof got);
            st_shape_str(slots[i].ndim, slots[i].shape, want, sizeof want);
            rc = perl_fail(LIBPERL_ERR_SHAPE, "%s: tensor \"%s\" has shape %s, config.json implies %s",
                           hw.files[fi].path, slots[i].name, got, want);
            goto done;
        }
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16) {
            rc = perl_fail(LIBPERL_ERR_UNSUPPORTED,
                           "%s: tensor \"%s\" has dtype %s; only F32, BF16 and F16 are supported",
                           hw.files[fi].path, slots[i].name, st_dtype_name(t->dtype));
            goto done;
        }
        found[i] = t;
        if (st_f32_inplace(t) == NULL) convert_floats += (size_t)t->numel;
        else hw.file_used[fi] = 1;
    }
    /* Pass 2: converted tensors go into one owned buffer. */
    float *buffer = NULL;
    if (convert_floats > 0) {
        if (convert_floats > SIZE_MAX / sizeof(float)) {
            rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "weights too large");
            goto done;
        }
        buffer = perl_mem_alloc(convert_floats * sizeof(float));
        if (buffer == NULL) {
            rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory converting %zu weights to F32",
                           convert_floats);
            goto done;
        }
        rc = model_add_backing(m, buffer, convert_floats * sizeof(float), 0);
        if (rc != LIBPERL_OK) {
            perl_mem_free(buffer);
            goto done;
        }
    }
    size_t offset = 0;
    for (int i = 0; i < n_slots; i++) {
        const float *inplace = st_f32_inplace(found[i]);
        if (inplace != NULL) {
            /* Read-only mapping: the base weights are never written. */
            *slots[i].ptr = (float *)(uintptr_t)inplace;
            continue;
        }
        float *dst = buffer + offset;
        rc = st_to_f32(found[i], dst);
        if (rc != LIBPERL_OK) goto done;
        *slots[i].ptr = dst;
        offset += (size_t)found[i]->numel;
    }
    /* Hand the mappings that weights point into over to the model. */
    for (int k = 0; k < hw.n_files; k++) {
        if (!hw.file_used[k]) continue;
        rc = model_add_backing(m, hw.files[k].map.addr, hw.files[k].map.size, 1);
        if (rc != LIBPERL_OK) goto done;
        hw.files[k].map.addr = NULL;
        hw.files[k].map.size = 0;
    }
    rc = LIBPERL_OK;

done:
    /* On failure the caller frees the model (and the backings handed over). */
    hf_weights_close(&hw);
    perl_mem_free(slots);
    perl_mem_free(found);
    perl_mem_free(single);
    perl_mem_free(index);
    perl_mem_free(bin);
    return rc;
}

int model_load_hf(perl_model **out, const char *dir)
{
    PERL_CHECK_ARG(out != NULL, "model_load_hf: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(dir != NULL && dir[0] != '\0', "model_load_hf: empty directory name");
    char *config_path = file_join(dir, "config.json");
    if (config_path == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    char *text = NULL;
    size_t len = 0;
    json_doc *doc = NULL;
    perl_model *m = NULL;
    perl_model_config cfg;
    int rc = file_read_all(config_path, CONFIG_MAX_BYTES, &text, &len);
    if (rc == LIBPERL_OK) rc = json_parse(&doc, text, len, config_path);
    if (rc == LIBPERL_OK) rc = parse_config(&cfg, json_doc_root(doc), config_path);
    if (rc == LIBPERL_OK) rc = model_alloc(&m, &cfg);
    if (rc == LIBPERL_OK) rc = load_weights(m, dir);
    if (rc == LIBPERL_OK) {
        model_weights_tie(&m->cfg, &m->w);
        rc = model_init_rope(m);
    }
    json_doc_free(doc);
    perl_mem_free(text);
    perl_mem_free(config_path);
    if (rc != LIBPERL_OK) {
        perl_model_free(m);
        return rc;
    }
    *out = m;
    return LIBPERL_OK;
}

/* ---- saving -------------------------------------------------------------- */

/* Row order converting interleaved RoPE rows (2j, 2j+1) of each head to HF's
 * half split (j, j + D/2), as convert_llama_weights_to_hf's permute:
 * new row h*D + half*D/2 + j  <-  old row h*D + 2j + half. */
static int32_t *rope_row_order(int n_heads, int head_dim)
{
    size_t rows = (size_t)n_heads * (size_t)head_dim;
    int32_t *order = perl_mem_alloc(rows * sizeof *order);
    if (order == NULL) return NULL;
    int half_d = head_dim / 2;
    for (int h = 0; h < n_heads; h++)
        for (int half = 0; half < 2; half++)
            for (int j = 0; j < half_d; j++)
                order[(size_t)h * head_dim + (size_t)half * half_d + j] =
                    (int32_t)((size_t)h * head_dim + 2 * (size_t)j + (size_t)half);
    return order;
}

static int write_config(const perl_model_config *cfg, const char *dir)
{
    json_writer w;
    json_writer_init(&w, 1);
    int qwen = cfg->qkv_bias != 0; /* Llama's attention_bias would add an o_proj bias */
    json_write_object_begin(&w);
    json_write_key(&w, "architectures");
    json_write_array_begin(&w);
    json_write_string(&w, qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM");
    json_write_array_end(&w);
    json_write_key(&w, "model_type");
    json_write_string(&w, qwen ? "qwen2" : "llama");
    json_write_key(&w, "hidden_size");
    json_write_int(&w, cfg->dim);
    json_write_key(&w, "intermediate_size");
    json_write_int(&w, cfg->hidden_dim);
    json_write_key(&w, "num_hidden_layers");
    json_write_int(&w, cfg->n_layers);
    json_write_key(&w, "num_attention_heads");
    json_write_int(&w, cfg->n_heads);
    json_write_key(&w, "num_key_value_heads");
    json_write_int(&w, cfg->n_kv_heads);
    json_write_key(&w, "head_dim");
    json_write_int(&w, cfg->head_dim);
    json_write_key(&w, "vocab_size");
    json_write_int(&w, cfg->vocab_size);
    json_write_key(&w, "max_position_embeddings");
    json_write_int(&w, cfg->max_seq_len);
    json_write_key(&w, "rope_theta");
    json_write_float(&w, cfg->rope_theta);
    json_write_key(&w, "rope_scaling");
    json_write_null(&w);
    json_write_key(&w, "rms_norm_eps");
    json_write_float(&w, cfg->rms_norm_eps);
    json_write_key(&w, "tie_word_embeddings");
    json_write_bool(&w, cfg->tied_embeddings);
    if (qwen) {
        json_write_key(&w, "use_sliding_window");
        json_write_bool(&w, 0);
    } else {
        json_write_key(&w, "attention_bias");
        json_write_bool(&w, 0);
        json_write_key(&w, "mlp_bias");
        json_write_bool(&w, 0);
    }
    json_write_key(&w, "hidden_act");
    json_write_string(&w, "silu");
    json_write_key(&w, "attention_dropout");
    json_write_float(&w, 0.0f);
    json_write_key(&w, "initializer_range");
    json_write_float(&w, 0.02f);
    json_write_key(&w, "bos_token_id");
    if (cfg->bos_token_id >= 0) json_write_int(&w, cfg->bos_token_id);
    else json_write_null(&w);
    json_write_key(&w, "eos_token_id");
    if (cfg->eos_token_id >= 0) json_write_int(&w, cfg->eos_token_id);
    else json_write_null(&w);
    json_write_key(&w, "torch_dtype");
    json_write_string(&w, "float32");
    json_write_key(&w, "use_cache");
    json_write_bool(&w, 1);
    json_write_object_end(&w);
    json_write_raw(&w, "\n", 1);
    int rc = json_writer_finish(&w);
    char *path = NULL;
    if (rc == LIBPERL_OK) {
        path = file_join(dir, "config.json");
        rc = path ? file_write_atomic(path, w.data, w.len)
                  : perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    }
    perl_mem_free(path);
    json_writer_free(&w);
    return rc;
}

int model_save_hf_weights(const perl_model_config *cfg_in, const model_weights *w_in,
                          const char *dir)
{
    PERL_CHECK_ARG(cfg_in != NULL && w_in != NULL, "model_save_hf_weights: NULL argument");
    PERL_CHECK_ARG(dir != NULL && dir[0] != '\0', "save: empty directory name");
    perl_model_config cfg = *cfg_in;
    PERL_TRY(model_config_validate(&cfg));
    model_weights w = *w_in; /* shallow: slots point into the same layer array */
    if (cfg.tied_embeddings) model_weights_tie(&cfg, &w);
    PERL_TRY(file_mkdir_p(dir));

    tensor_slot *slots = NULL;
    int n = 0;
    PERL_TRY(model_tensor_slots(&cfg, &w, &slots, &n));
    st_write_tensor *list = perl_mem_calloc((size_t)n, sizeof *list);
    int32_t *order_q = NULL, *order_k = NULL;
    char *path = file_join(dir, "model.safetensors");
    int rc = LIBPERL_OK;
    if (list == NULL || path == NULL) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory saving to '%s'", dir);
        goto done;
    }
    if (cfg.rope_interleaved) {
        order_q = rope_row_order(cfg.n_heads, cfg.head_dim);
        order_k = rope_row_order(cfg.n_kv_heads, cfg.head_dim);
        if (order_q == NULL || order_k == NULL) {
            rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory saving to '%s'", dir);
            goto done;
        }
    }
    for (int i = 0; i < n; i++) {
        if (*slots[i].ptr == NULL) {
            rc = perl_fail(LIBPERL_ERR_INVALID_ARGUMENT, "save: weight \"%s\" is missing",
                           slots[i].name);
            goto done;
        }
        list[i].name = slots[i].name;
        list[i].ndim = slots[i].ndim;
        list[i].shape[0] = slots[i].shape[0];
        list[i].shape[1] = slots[i].shape[1];
        list[i].data = *slots[i].ptr;
        if (cfg.rope_interleaved) {
            const char *nm = slots[i].name;
            if (strstr(nm, ".self_attn.q_proj.") != NULL) list[i].row_order = order_q;
            else if (strstr(nm, ".self_attn.k_proj.") != NULL) list[i].row_order = order_k;
        }
    }
    static const char *const metadata[] = {"format", "pt", NULL};
    rc = st_write(path, list, (size_t)n, metadata);
    if (rc != LIBPERL_OK) goto done;
    cfg.rope_interleaved = 0; /* the saved weights use HF's convention */
    rc = write_config(&cfg, dir);

done:
    perl_mem_free(slots);
    perl_mem_free(list);
    perl_mem_free(order_q);
    perl_mem_free(order_k);
    perl_mem_free(path);
    return rc;
}

/* ---- public API ---------------------------------------------------------- */

int perl_model_load(perl_model **out, const char *path)
{
    PERL_CHECK_ARG(out != NULL, "perl_model_load: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(path != NULL && path[0] != '\0', "perl_model_load: path is NULL or empty");
    int is_dir = file_is_dir(path);
    if (is_dir < 0) return is_dir;
    perl_model *m = NULL;
    PERL_TRY(is_dir ? model_load_hf(&m, path) : model_load_llama2c(&m, path));
    perl_mem_free(m->source_path);
    m->source_path = perl_mem_strdup(path);
    if (m->source_path == NULL) {
        perl_model_free(m);
        return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    }
    *out = m;
    return LIBPERL_OK;
}

int perl_model_save_hf(const perl_model *model, const char *dir)
{
    PERL_CHECK_ARG(model != NULL, "perl_model_save_hf: model is NULL");
    PERL_CHECK_ARG(dir != NULL && dir[0] != '\0', "perl_model_save_hf: dir is NULL or empty");
    return model_save_hf_weights(&model->cfg, &model->w, dir);
}
