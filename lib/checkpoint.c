/* Training-state checkpoints (see checkpoint.h for the layout). */
#include "checkpoint.h"

#include "fileio.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

#define STATE_MAGIC "LPSTATE"
#define STATE_VERSION 1u
#define STATE_MAX_BYTES ((size_t)1 << 40)

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

uint32_t perl_crc32(uint32_t crc, const void *data, size_t len) {
    pthread_once(&crc_once, crc_table_init); /* trainers may save on several threads at once */
    const uint32_t *table = crc_table;
    const unsigned char *p = data;
    crc = ~crc;
    for (size_t i = 0; i < len; i++) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* The fields that must match for a state to fit an adapter, then the state. */
typedef struct state_header {
    int32_t mode, rank, dim, n_layers;
    uint32_t target_modules;
    int32_t has_head, has_moments;
    uint64_t n_params;
    int64_t step;
    uint64_t dropout_counter;
    float lr_override;
    float lr, beta1, beta2, eps, weight_decay, max_grad_norm, min_lr_ratio;
    int32_t schedule, warmup_steps, total_steps;
    uint64_t seed; /* dropout masks derive from (seed, dropout_counter) */
} state_header;

typedef struct writer {
    atomic_file file;
    uint32_t crc;
    int rc;
} writer;

static void put(writer *w, const void *data, size_t len) {
    if (w->rc != LIBPERL_OK) return;
    w->crc = perl_crc32(w->crc, data, len);
    w->rc = atomic_file_write(&w->file, data, len);
}

static state_header header_of(const perl_lora *lora) {
    state_header h;
    memset(&h, 0, sizeof h); /* padding bytes too: the CRC covers them */
    int lora_mode = lora->opts.mode == LIBPERL_MODE_LORA; /* rank and targets mean nothing in FULL mode */
    h.mode = lora->opts.mode, h.rank = lora_mode ? lora->opts.rank : 0, h.dim = lora->model->cfg.dim;
    h.n_layers = lora->model->cfg.n_layers, h.target_modules = lora_mode ? lora->opts.target_modules : 0;
    h.seed = lora->opts.seed;
    h.has_head = lora->head != NULL, h.has_moments = lora->adam_m != NULL;
    h.n_params = lora->n_params, h.step = lora->step, h.dropout_counter = lora->dropout_counter;
    h.lr_override = lora->lr_override;
    const perl_optim_options *o = &lora->optim;
    h.lr = o->lr, h.beta1 = o->beta1, h.beta2 = o->beta2, h.eps = o->eps, h.weight_decay = o->weight_decay;
    h.max_grad_norm = o->max_grad_norm, h.min_lr_ratio = o->min_lr_ratio, h.schedule = o->schedule;
    h.warmup_steps = o->warmup_steps, h.total_steps = o->total_steps;
    return h;
}

int lora_state_save(const perl_lora *lora, const char *path, const void *extra, size_t extra_len) {
    writer w = {.crc = 0, .rc = LIBPERL_OK};
    PERL_TRY(atomic_file_open(&w.file, path));
    state_header h = header_of(lora);
    uint32_t version = STATE_VERSION, header_bytes = (uint32_t)sizeof h;
    uint64_t extra64 = extra_len;
    size_t bytes = lora->n_params * sizeof(float);
    put(&w, STATE_MAGIC, 8);
    put(&w, &version, sizeof version);
    put(&w, &header_bytes, sizeof header_bytes);
    put(&w, &h, sizeof h);
    put(&w, lora->params, bytes);
    if (h.has_moments) {
        put(&w, lora->adam_m, bytes);
        put(&w, lora->adam_v, bytes);
    }
    put(&w, &extra64, sizeof extra64);
    if (extra_len) put(&w, extra, extra_len);
    uint32_t crc = w.crc;
    if (w.rc == LIBPERL_OK) w.rc = atomic_file_write(&w.file, &crc, sizeof crc);
    if (w.rc != LIBPERL_OK) {
        atomic_file_abort(&w.file);
        return w.rc;
    }
    return atomic_file_commit(&w.file);
}

/* The optimizer fields must pass perl_lora_set_optimizer's checks (and the
 * counters be sane): a crafted file with a valid CRC could otherwise install
 * a NaN learning rate or a negative warmup, which overflows lr_schedule's
 * int arithmetic (found by fuzzing, tests/fuzz/fuzz_train_state.c). */
static int header_values_ok(const state_header *h) {
    return isfinite(h->lr) && h->lr >= 0.0f && h->beta1 >= 0.0f && h->beta1 < 1.0f && h->beta2 >= 0.0f &&
           h->beta2 < 1.0f && h->eps > 0.0f && isfinite(h->eps) && h->weight_decay >= 0.0f &&
           isfinite(h->weight_decay) && isfinite(h->max_grad_norm) && h->schedule >= LIBPERL_LR_CONSTANT &&
           h->schedule <= LIBPERL_LR_COSINE && h->warmup_steps >= 0 && h->total_steps >= 0 &&
           h->min_lr_ratio >= 0.0f && h->min_lr_ratio <= 1.0f && h->step >= 0 && h->step < ((int64_t)1 << 62) &&
           isfinite(h->lr_override);
}

typedef struct reader {
    const unsigned char *p;
    size_t left;
} reader;

static const void *take(reader *r, size_t len) {
    if (len > r->left) return NULL;
    const void *p = r->p;
    r->p += len, r->left -= len;
    return p;
}

int lora_state_load(perl_lora *lora, const char *path, void **out_extra, size_t *out_extra_len) {
    *out_extra = NULL;
    *out_extra_len = 0;
    file_map map;
    PERL_TRY(file_map_open(&map, path));
    int rc = LIBPERL_ERR_FORMAT;
    reader r = {map.addr, map.size};
    uint32_t version, header_bytes, stored_crc;
    state_header h;
    const void *magic = take(&r, 8), *pv = take(&r, 4), *pb = take(&r, 4);
    if (!magic || !pv || !pb || memcmp(magic, STATE_MAGIC, 8) != 0) { /* pv, pb: a file of 8..15 bytes */
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: not a libperl training state (bad magic)", path);
        goto done;
    }
    memcpy(&version, pv, 4);
    memcpy(&header_bytes, pb, 4);
    if (version != STATE_VERSION || header_bytes != sizeof h) {
        rc = perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: training state version %u (header %u bytes) not supported", path,
                       version, header_bytes);
        goto done;
    }
    if (map.size < 4 || perl_crc32(0, map.addr, map.size - 4) !=
                            (memcpy(&stored_crc, (const char *)map.addr + map.size - 4, 4), stored_crc)) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: checksum mismatch (truncated or corrupt training state)", path);
        goto done;
    }
    const void *ph = take(&r, sizeof h); /* a valid CRC says nothing about the size (fuzzing found this) */
    if (!ph) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: training state truncated inside its header", path);
        goto done;
    }
    memcpy(&h, ph, sizeof h);
    state_header mine = header_of(lora);
    if (h.mode != mine.mode || h.rank != mine.rank || h.dim != mine.dim || h.n_layers != mine.n_layers ||
        h.target_modules != mine.target_modules || h.has_head != mine.has_head || h.n_params != mine.n_params) {
        rc = perl_fail(LIBPERL_ERR_SHAPE,
                       "%s: state is for another adapter (mode %d rank %d targets 0x%x head %d, %llu params; "
                       "this one: mode %d rank %d targets 0x%x head %d, %llu params)",
                       path, h.mode, h.rank, h.target_modules, h.has_head, (unsigned long long)h.n_params, mine.mode,
                       mine.rank, mine.target_modules, mine.has_head, (unsigned long long)mine.n_params);
        goto done;
    }
    if (!header_values_ok(&h)) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: training state holds invalid optimizer settings or step count", path);
        goto done;
    }
    size_t bytes = (size_t)h.n_params * sizeof(float);
    const void *params = take(&r, bytes);
    const void *m = h.has_moments ? take(&r, bytes) : NULL, *v = h.has_moments ? take(&r, bytes) : NULL;
    const void *pe = take(&r, 8);
    uint64_t extra_len = 0;
    if (pe) memcpy(&extra_len, pe, 8);
    const void *extra = pe ? take(&r, (size_t)extra_len) : NULL;
    if (!params || (h.has_moments && (!m || !v)) || !pe || (extra_len && !extra) || r.left != 4) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: training state sections do not add up to the file size", path);
        goto done;
    }
    /* As peft_load: non-finite values would reach the kernels (an all-NaN
     * logit row overruns lm_head.c's argmax scan; found by fuzzing). */
    int finite = perl_isfinite_array(params, (size_t)h.n_params) &&
                 (!h.has_moments || (perl_isfinite_array(m, (size_t)h.n_params) &&
                                     perl_isfinite_array(v, (size_t)h.n_params)));
    for (size_t i = 0; finite && h.has_moments && i < (size_t)h.n_params; i++) {
        float vi;
        memcpy(&vi, (const char *)v + i * sizeof(float), sizeof vi); /* the mapping may be unaligned */
        finite = vi >= 0.0f;
    }
    if (!finite) {
        rc = perl_fail(LIBPERL_ERR_NUMERIC, "%s: training state holds NaN, Inf or negative second moments", path);
        goto done;
    }
    float *new_m = NULL, *new_v = NULL;
    void *extra_copy = NULL;
    if (h.has_moments) {
        new_m = perl_mem_alloc(bytes);
        new_v = perl_mem_alloc(bytes);
    }
    if (extra_len) extra_copy = perl_mem_alloc((size_t)extra_len);
    if ((h.has_moments && (!new_m || !new_v)) || (extra_len && !extra_copy)) {
        perl_mem_free(new_m);
        perl_mem_free(new_v);
        perl_mem_free(extra_copy);
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory loading a training state");
        goto done;
    }
    /* everything verified: commit */
    memcpy(lora->params, params, bytes);
    memset(lora->grads, 0, bytes);
    perl_mem_free(lora->adam_m);
    perl_mem_free(lora->adam_v);
    lora->adam_m = new_m, lora->adam_v = new_v;
    if (h.has_moments) memcpy(new_m, m, bytes), memcpy(new_v, v, bytes);
    lora->step = h.step;
    lora->dropout_counter = h.dropout_counter;
    lora->opts.seed = h.seed;
    lora->lr_override = h.lr_override;
    perl_optim_options *o = &lora->optim;
    o->lr = h.lr, o->beta1 = h.beta1, o->beta2 = h.beta2, o->eps = h.eps, o->weight_decay = h.weight_decay;
    o->max_grad_norm = h.max_grad_norm, o->min_lr_ratio = h.min_lr_ratio, o->schedule = h.schedule;
    o->warmup_steps = h.warmup_steps, o->total_steps = h.total_steps;
    if (extra_len) memcpy(extra_copy, extra, (size_t)extra_len);
    *out_extra = extra_copy;
    *out_extra_len = (size_t)extra_len;
    rc = LIBPERL_OK;
done:
    file_map_close(&map);
    return rc;
}

int perl_lora_save_state(const perl_lora *lora, const char *path) {
    PERL_CHECK_ARG(lora, "perl_lora_save_state: lora is NULL");
    PERL_CHECK_ARG(path && *path, "perl_lora_save_state: path is NULL or empty");
    return lora_state_save(lora, path, NULL, 0);
}

int perl_lora_load_state(perl_lora *lora, const char *path) {
    PERL_CHECK_ARG(lora, "perl_lora_load_state: lora is NULL");
    PERL_CHECK_ARG(path && *path, "perl_lora_load_state: path is NULL or empty");
    void *extra;
    size_t extra_len;
    PERL_TRY(lora_state_load(lora, path, &extra, &extra_len));
    perl_mem_free(extra);
    return LIBPERL_OK;
}
