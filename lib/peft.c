/*
 * Adapters in Hugging Face PEFT layout: adapter_config.json and
 * adapter_model.safetensors with
 *   base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
 *   base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
 *   base_model.model.score.weight  (scalar head, [1, dim])
 * with A [r, in] and B [out, r].  FULL-mode adapters are saved as a complete
 * HF model (plus score.safetensors for a head).
 */
#include "fileio.h"
#include "json.h"
#include "lora.h"
#include "safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ADAPTER_CONFIG_MAX_BYTES ((size_t)4 << 20)
#define PEFT_HEAD_NAME "base_model.model.score.weight"
#define PEFT_NAME_LEN 160

static void peft_tensor_name(char *buf, size_t n, int layer, int target, char ab)
{
    snprintf(buf, n, "base_model.model.model.layers.%d.%s.%s.lora_%c.weight", layer,
             lora_target_parent(target), lora_target_name(target), ab);
}

/* ---- save ---------------------------------------------------------------- */

static int write_adapter_config(const perl_lora *lora, const char *dir)
{
    const perl_lora_options *o = &lora->opts;
    json_writer w;
    json_writer_init(&w, 1);
    json_write_object_begin(&w);
    json_write_key(&w, "peft_type");
    json_write_string(&w, "LORA");
    json_write_key(&w, "task_type");
    json_write_string(&w, lora->head ? "SEQ_CLS" : "CAUSAL_LM");
    json_write_key(&w, "base_model_name_or_path");
    json_write_string(&w, lora->model->source_path ? lora->model->source_path : "");
    json_write_key(&w, "r");
    json_write_int(&w, o->rank);
    json_write_key(&w, "lora_alpha");
    json_write_float(&w, o->alpha);
    json_write_key(&w, "lora_dropout");
    json_write_float(&w, o->dropout);
    json_write_key(&w, "target_modules");
    json_write_array_begin(&w);
    for (int t = 0; t < LORA_N_TARGETS; t++)
        if (o->target_modules & (1u << t)) json_write_string(&w, lora_target_name(t));
    json_write_array_end(&w);
    json_write_key(&w, "use_rslora");
    json_write_bool(&w, o->use_rslora);
    json_write_key(&w, "use_dora");
    json_write_bool(&w, 0);
    json_write_key(&w, "bias");
    json_write_string(&w, "none");
    json_write_key(&w, "modules_to_save");
    if (lora->head) {
        json_write_array_begin(&w);
        json_write_string(&w, "score");
        json_write_array_end(&w);
    } else {
        json_write_null(&w);
    }
    json_write_key(&w, "init_lora_weights");
    json_write_bool(&w, 1);
    json_write_key(&w, "fan_in_fan_out");
    json_write_bool(&w, 0);
    json_write_key(&w, "inference_mode");
    json_write_bool(&w, 1);
    json_write_key(&w, "layers_to_transform");
    json_write_null(&w);
    json_write_key(&w, "layers_pattern");
    json_write_null(&w);
    json_write_key(&w, "rank_pattern");
    json_write_object_begin(&w);
    json_write_object_end(&w);
    json_write_key(&w, "alpha_pattern");
    json_write_object_begin(&w);
    json_write_object_end(&w);
    json_write_key(&w, "revision");
    json_write_null(&w);
    json_write_object_end(&w);
    json_write_raw(&w, "\n", 1);
    int rc = json_writer_finish(&w);
    if (rc == LIBPERL_OK) {
        char *path = file_join(dir, "adapter_config.json");
        rc = path ? file_write_atomic(path, w.data, w.len)
                  : perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
        perl_mem_free(path);
    }
    json_writer_free(&w);
    return rc;
}

static int save_full(const perl_lora *lora, const char *dir)
{
    const perl_model *m = lora->model;
    PERL_TRY(model_save_hf_weights(&m->cfg, &lora->full_w, dir));
    if (lora->head == NULL) return LIBPERL_OK;
    st_write_tensor head;
    memset(&head, 0, sizeof head);
    head.name = "score.weight";
    head.ndim = 2;
    head.shape[0] = 1;
    head.shape[1] = m->cfg.dim;
    head.data = lora->head;
    static const char *const metadata[] = {"format", "pt", NULL};
    char *path = file_join(dir, "score.safetensors");
    if (path == NULL) return perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    int rc = st_write(path, &head, 1, metadata);
    perl_mem_free(path);
    return rc;
}

int peft_save(const perl_lora *lora, const char *dir)
{
    PERL_CHECK_ARG(lora != NULL, "perl_lora_save: lora is NULL");
    PERL_CHECK_ARG(dir != NULL && dir[0] != '\0', "perl_lora_save: dir is NULL or empty");
    PERL_TRY(file_mkdir_p(dir));
    if (lora->opts.mode == LIBPERL_MODE_FULL) return save_full(lora, dir);

    const perl_model *m = lora->model;
    int n_layers = m->cfg.n_layers;
    size_t max_tensors = (size_t)n_layers * LORA_N_TARGETS * 2 + 1;
    st_write_tensor *list = perl_mem_calloc(max_tensors, sizeof *list);
    char *names = perl_mem_alloc(max_tensors * PEFT_NAME_LEN);
    char *path = file_join(dir, "adapter_model.safetensors");
    int rc = LIBPERL_OK;
    if (list == NULL || names == NULL || path == NULL) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory saving an adapter");
        goto done;
    }
    size_t n = 0;
    for (int l = 0; l < n_layers; l++) {
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            const lora_module *mod = lora_module_at(lora, l, t);
            if (mod == NULL || mod->A == NULL || mod->B == NULL) continue;
            for (int ab = 0; ab < 2; ab++) {
                char *name = names + n * PEFT_NAME_LEN;
                peft_tensor_name(name, PEFT_NAME_LEN, l, t, ab ? 'B' : 'A');
                st_write_tensor *e = &list[n++];
                e->name = name;
                e->ndim = 2;
                e->shape[0] = ab ? mod->out : lora->opts.rank;
                e->shape[1] = ab ? lora->opts.rank : mod->in;
                e->data = ab ? mod->B : mod->A;
            }
        }
    }
    if (lora->head != NULL) {
        st_write_tensor *e = &list[n++];
        e->name = PEFT_HEAD_NAME;
        e->ndim = 2;
        e->shape[0] = 1;
        e->shape[1] = m->cfg.dim;
        e->data = lora->head;
    }
    static const char *const metadata[] = {"format", "pt", NULL};
    rc = st_write(path, list, n, metadata);
    if (rc == LIBPERL_OK) rc = write_adapter_config(lora, dir);
done:
    perl_mem_free(list);
    perl_mem_free(names);
    perl_mem_free(path);
    return rc;
}

/* ---- load ---------------------------------------------------------------- */

static int target_from_name(const char *s)
{
    for (int t = 0; t < LORA_N_TARGETS; t++)
        if (strcmp(s, lora_target_name(t)) == 0) return t;
    return -1;
}

static int parse_targets(const json_value *v, const char *path, uint32_t *out)
{
    *out = 0;
    if (v == NULL || json_is_null(v))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: missing \"target_modules\"", path);
    if (v->type == JSON_STRING) {
        if (strcmp(v->string, "all-linear") == 0) {
            *out = LIBPERL_TARGET_ALL;
            return LIBPERL_OK;
        }
        int t = target_from_name(v->string);
        if (t < 0)
            return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                             "%s: target_modules \"%.100s\" (a regular expression) is not "
                             "supported; list module names such as [\"q_proj\", \"v_proj\"]",
                             path, v->string);
        *out = 1u << t;
        return LIBPERL_OK;
    }
    if (v->type != JSON_ARRAY || v->count == 0)
        return perl_fail(LIBPERL_ERR_FORMAT,
                         "%s: \"target_modules\" must be a non-empty list of module names", path);
    for (size_t i = 0; i < v->count; i++) {
        const char *s = json_as_string(v->items[i]);
        if (s == NULL)
            return perl_fail(LIBPERL_ERR_FORMAT, "%s: target_modules[%zu] is not a string", path, i);
        int t = target_from_name(s);
        if (t < 0)
            return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                             "%s: target module \"%.100s\" is not supported (q_proj, k_proj, "
                             "v_proj, o_proj, gate_proj, up_proj, down_proj)", path, s);
        *out |= 1u << t;
    }
    return LIBPERL_OK;
}

/* 1 if a config key holds a "nothing" value: absent, null, false, {} or []. */
static int is_unset(const json_value *v)
{
    if (v == NULL || json_is_null(v)) return 1;
    if (v->type == JSON_BOOL) return !v->boolean;
    if (v->type == JSON_OBJECT || v->type == JSON_ARRAY) return v->count == 0;
    return 0;
}

static int parse_adapter_config(const json_value *root, const char *path,
                                perl_lora_options *opts, int *want_head)
{
    if (root->type != JSON_OBJECT)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: expected a JSON object", path);
    const char *peft_type = json_as_string(json_get(root, "peft_type"));
    if (peft_type == NULL)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: missing string \"peft_type\"", path);
    if (strcmp(peft_type, "LORA") != 0)
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: peft_type \"%.40s\" is not supported (LORA)",
                         path, peft_type);
    perl_lora_options_init(opts);
    opts->mode = LIBPERL_MODE_LORA;

    int64_t r;
    if (!json_as_int64(json_get(root, "r"), &r) || r < 1 || r > 65536)
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"r\" must be an integer in [1, 65536]", path);
    opts->rank = (int32_t)r;

    const json_value *av = json_get(root, "lora_alpha");
    double alpha = 8.0; /* PEFT's default */
    if (av != NULL && !json_is_null(av) && !json_as_double(av, &alpha))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"lora_alpha\" must be a number", path);
    if (!(alpha > 0.0) || !(alpha < 1e30))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"lora_alpha\" must be a positive number", path);
    opts->alpha = (float)alpha;

    const json_value *dv = json_get(root, "lora_dropout");
    double dropout = 0.0;
    if (dv != NULL && !json_is_null(dv) && !json_as_double(dv, &dropout))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"lora_dropout\" must be a number", path);
    if (!(dropout >= 0.0 && dropout < 1.0))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"lora_dropout\" %g is outside [0, 1)", path,
                         dropout);
    opts->dropout = (float)dropout;

    const json_value *rv = json_get(root, "use_rslora");
    int rslora = 0;
    if (rv != NULL && !json_is_null(rv) && !json_as_bool(rv, &rslora))
        return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"use_rslora\" must be true or false", path);
    opts->use_rslora = rslora;

    PERL_TRY(parse_targets(json_get(root, "target_modules"), path, &opts->target_modules));

    const char *bias = json_as_string(json_get(root, "bias"));
    if (bias != NULL && strcmp(bias, "none") != 0)
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: bias \"%.40s\" is not supported (none)",
                         path, bias);
    static const char *const unsupported[] = {"use_dora", "fan_in_fan_out", "layers_to_transform",
                                              "rank_pattern", "alpha_pattern"};
    for (size_t i = 0; i < sizeof unsupported / sizeof unsupported[0]; i++)
        if (!is_unset(json_get(root, unsupported[i])))
            return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: \"%s\" is set; not supported", path,
                             unsupported[i]);

    *want_head = 0;
    const char *task = json_as_string(json_get(root, "task_type"));
    if (task != NULL && strcmp(task, "SEQ_CLS") == 0) *want_head = 1;
    const json_value *mts = json_get(root, "modules_to_save");
    if (mts != NULL && !json_is_null(mts)) {
        if (mts->type != JSON_ARRAY)
            return perl_fail(LIBPERL_ERR_FORMAT, "%s: \"modules_to_save\" must be a list", path);
        for (size_t i = 0; i < mts->count; i++) {
            const char *s = json_as_string(mts->items[i]);
            if (s != NULL && strcmp(s, "score") == 0) {
                *want_head = 1;
                continue;
            }
            return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                             "%s: modules_to_save entry \"%.60s\" is not supported (score only)",
                             path, s ? s : "(not a string)");
        }
    }
    return LIBPERL_OK;
}

/* Copies a float tensor of exactly `shape` into dst. */
static int fill_tensor(const st_file *f, const st_tensor *t, int64_t rows, int64_t cols,
                       float *dst)
{
    const int64_t shape[2] = {rows, cols};
    if (!st_shape_is(t, 2, shape)) {
        char got[128], want[128];
        st_shape_str(t->ndim, t->shape, got, sizeof got);
        st_shape_str(2, shape, want, sizeof want);
        return perl_fail(LIBPERL_ERR_SHAPE,
                         "%s: tensor \"%s\" has shape %s, this model and rank need %s", f->path,
                         t->name, got, want);
    }
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
        return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                         "%s: tensor \"%s\" has dtype %s; only F32, BF16 and F16 are supported",
                         f->path, t->name, st_dtype_name(t->dtype));
    return st_to_f32(t, dst);
}

static int load_tensors(perl_lora *lora, const st_file *f, unsigned char *used)
{
    const perl_model *m = lora->model;
    char name[PEFT_NAME_LEN];
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            if (!(lora->opts.target_modules & (1u << t))) continue;
            lora_module *mod = &lora->modules[(size_t)l * LORA_N_TARGETS + (size_t)t];
            if (mod->A == NULL || mod->B == NULL)
                return perl_fail(LIBPERL_ERR_INTERNAL, "adapter module %d/%d was not allocated",
                                 l, t);
            for (int ab = 0; ab < 2; ab++) {
                peft_tensor_name(name, sizeof name, l, t, ab ? 'B' : 'A');
                const st_tensor *st = st_find(f, name);
                if (st == NULL)
                    return perl_fail(LIBPERL_ERR_FORMAT, "%s: missing tensor \"%s\"", f->path,
                                     name);
                used[st - f->tensors] = 1;
                if (ab == 0) PERL_TRY(fill_tensor(f, st, lora->opts.rank, mod->in, mod->A));
                else PERL_TRY(fill_tensor(f, st, mod->out, lora->opts.rank, mod->B));
            }
        }
    }
    if (lora->head != NULL) {
        const st_tensor *st = st_find(f, PEFT_HEAD_NAME);
        if (st == NULL)
            return perl_fail(LIBPERL_ERR_FORMAT, "%s: missing tensor \"%s\"", f->path,
                             PEFT_HEAD_NAME);
        used[st - f->tensors] = 1;
        PERL_TRY(fill_tensor(f, st, 1, m->cfg.dim, lora->head));
    }
    for (size_t i = 0; i < f->n_tensors; i++) {
        if (used[i]) continue;
        const char *nm = f->tensors[i].name;
        static const char prefix[] = "base_model.model.model.layers.";
        if (strncmp(nm, prefix, sizeof prefix - 1) == 0) {
            long layer = strtol(nm + sizeof prefix - 1, NULL, 10);
            if (layer >= m->cfg.n_layers)
                return perl_fail(LIBPERL_ERR_SHAPE,
                                 "%s: tensor \"%s\" is for layer %ld but the model has %d layers",
                                 f->path, nm, layer, m->cfg.n_layers);
        }
        return perl_fail(LIBPERL_ERR_UNSUPPORTED,
                         "%s: tensor \"%s\" is not supported (or not listed in target_modules)",
                         f->path, nm);
    }
    return LIBPERL_OK;
}

int peft_load(perl_lora **out, perl_model *model, const char *dir)
{
    PERL_CHECK_ARG(out != NULL, "perl_lora_load: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(model != NULL, "perl_lora_load: model is NULL");
    PERL_CHECK_ARG(dir != NULL && dir[0] != '\0', "perl_lora_load: dir is NULL or empty");

    char *config_path = file_join(dir, "adapter_config.json");
    char *weights_path = file_join(dir, "adapter_model.safetensors");
    char *bin_path = file_join(dir, "adapter_model.bin");
    char *text = NULL;
    size_t len = 0;
    json_doc *doc = NULL;
    st_file f;
    memset(&f, 0, sizeof f);
    unsigned char *used = NULL;
    perl_lora *lora = NULL;
    perl_lora_options opts;
    int want_head = 0, rc;
    if (config_path == NULL || weights_path == NULL || bin_path == NULL) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    rc = file_read_all(config_path, ADAPTER_CONFIG_MAX_BYTES, &text, &len);
    if (rc == LIBPERL_OK) rc = json_parse(&doc, text, len, config_path);
    if (rc == LIBPERL_OK) rc = parse_adapter_config(json_doc_root(doc), config_path, &opts, &want_head);
    if (rc != LIBPERL_OK) goto done;
    if (!file_exists(weights_path) && file_exists(bin_path)) {
        rc = perl_fail(LIBPERL_ERR_UNSUPPORTED,
                       "%s: only adapter_model.safetensors is supported, not adapter_model.bin",
                       dir);
        goto done;
    }
    rc = st_open(&f, weights_path);
    if (rc != LIBPERL_OK) goto done;
    int with_head = st_find(&f, PEFT_HEAD_NAME) != NULL;
    if (want_head && !with_head) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: missing tensor \"%s\" (the config saves a score "
                                           "head)", weights_path, PEFT_HEAD_NAME);
        goto done;
    }
    used = perl_mem_calloc(f.n_tensors ? f.n_tensors : 1, 1);
    if (used == NULL) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if (opts.rank > model->cfg.dim) {
        rc = perl_fail(LIBPERL_ERR_SHAPE, "%s: rank r = %d exceeds the model's hidden size %d "
                                          "(adapter for another model?)",
                       config_path, opts.rank, model->cfg.dim);
        goto done;
    }
    rc = lora_alloc(&lora, model, &opts, with_head);
    if (rc == LIBPERL_ERR_INVALID_ARGUMENT) {
        char msg[400];
        snprintf(msg, sizeof msg, "%s", perl_last_error());
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: %s", config_path, msg);
    }
    if (rc != LIBPERL_OK) goto done;
    rc = load_tensors(lora, &f, used);
    if (rc == LIBPERL_OK && !perl_isfinite_array(lora->params, lora->n_params))
        rc = perl_fail(LIBPERL_ERR_NUMERIC, "%s: the adapter contains NaN or Inf values",
                       weights_path);

done:
    if (rc != LIBPERL_OK) {
        perl_lora_free(lora);
        lora = NULL;
    }
    st_close(&f);
    perl_mem_free(used);
    json_doc_free(doc);
    perl_mem_free(text);
    perl_mem_free(config_path);
    perl_mem_free(weights_path);
    perl_mem_free(bin_path);
    *out = lora;
    return rc;
}
