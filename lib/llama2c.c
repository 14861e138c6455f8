/*
 * llama2.c checkpoints (legacy version 0, as written by export.py's
 * legacy_export and run.c's reader):
 *   7 little-endian int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 *   vocab_size (negative: the classifier is not shared), seq_len;
 *   float32 tensors: token_embedding [vocab, dim], rms_att [L, dim],
 *   wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim],
 *   rms_ffn [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden],
 *   w3 [L, hidden, dim], rms_final [dim], freq_cis_real and freq_cis_imag
 *   [seq_len, head_size / 2] each (unused), and, only when vocab_size < 0,
 *   wcls [vocab, dim].
 * The whole file is mapped and the weights are used in place: the 28-byte
 * header keeps every float 4-byte aligned.
 */
#include "fileio.h"
#include "model.h"

#include <stdio.h>
#include <string.h>

#define LLAMA2C_HEADER_BYTES 28
#define LLAMA2C_MAGIC_V1 0x616b3432 /* "ak42": export.py versions 1 and 2 */

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* a * b with overflow detection; sets *overflow. */
static uint64_t mul_u64(uint64_t a, uint64_t b, int *overflow)
{
    if (a != 0 && b > UINT64_MAX / a) {
        *overflow = 1;
        return 0;
    }
    return a * b;
}

static uint64_t add_u64(uint64_t a, uint64_t b, int *overflow)
{
    if (b > UINT64_MAX - a) {
        *overflow = 1;
        return 0;
    }
    return a + b;
}

int model_load_llama2c(perl_model **out, const char *path)
{
    PERL_CHECK_ARG(out != NULL, "model_load_llama2c: out is NULL");
    *out = NULL;
    PERL_CHECK_ARG(path != NULL && path[0] != '\0', "model_load_llama2c: empty path");
    if (!host_is_little_endian())
        return perl_fail(LIBPERL_ERR_UNSUPPORTED, "%s: llama2.c files need a little-endian host",
                         path);

    file_map map;
    PERL_TRY(file_map_open(&map, path));
    int rc = LIBPERL_OK;
    perl_model *m = NULL;
    if (map.size < LLAMA2C_HEADER_BYTES) {
        rc = perl_fail(LIBPERL_ERR_FORMAT,
                       "%s: %zu bytes is shorter than the 28-byte llama2.c header", path,
                       map.size);
        goto fail;
    }
    int32_t h[7];
    memcpy(h, map.addr, sizeof h);
    if (h[0] == LLAMA2C_MAGIC_V1) {
        rc = perl_fail(LIBPERL_ERR_UNSUPPORTED,
                       "%s: llama2.c version-1/2 export (magic \"ak42\") is not supported; "
                       "export with the legacy (version 0) format", path);
        goto fail;
    }
    static const char *const field[7] = {"dim", "hidden_dim", "n_layers", "n_heads",
                                         "n_kv_heads", "vocab_size", "seq_len"};
    for (int i = 0; i < 7; i++) {
        int ok = i == 5 ? (h[i] != 0 && h[i] != INT32_MIN) : h[i] > 0;
        if (!ok) {
            rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: header field %s = %d is invalid "
                                               "(not a llama2.c checkpoint?)",
                           path, field[i], h[i]);
            goto fail;
        }
    }
    int32_t dim = h[0], hidden = h[1], n_layers = h[2], n_heads = h[3], n_kv = h[4];
    int32_t vocab = h[5] < 0 ? -h[5] : h[5], seq_len = h[6];
    int shared = h[5] > 0;
    if (n_kv > n_heads || n_heads % n_kv != 0) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: n_heads %d is not a multiple of n_kv_heads %d",
                       path, n_heads, n_kv);
        goto fail;
    }
    if (dim % n_heads != 0) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: dim %d is not a multiple of n_heads %d", path,
                       dim, n_heads);
        goto fail;
    }

    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = dim;
    cfg.hidden_dim = hidden;
    cfg.n_layers = n_layers;
    cfg.n_heads = n_heads;
    cfg.n_kv_heads = n_kv;
    cfg.head_dim = dim / n_heads;
    cfg.vocab_size = vocab;
    cfg.max_seq_len = seq_len;
    cfg.rope_theta = 10000.0f;
    cfg.rms_norm_eps = 1e-5f;
    cfg.tied_embeddings = shared;
    cfg.qkv_bias = 0;
    cfg.rope_interleaved = 1;
    cfg.bos_token_id = 1;
    cfg.eos_token_id = 2;
    {
        perl_model_config probe = cfg;
        rc = model_config_validate(&probe);
        if (rc != LIBPERL_OK) {
            if (rc != LIBPERL_ERR_OUT_OF_MEMORY) {
                char msg[400];
                snprintf(msg, sizeof msg, "%s", perl_last_error());
                rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: bad header: %s", path, msg);
            }
            goto fail;
        }
    }

    /* Sizes in floats, overflow-checked (the caps above keep them small, but
     * the arithmetic should not depend on that). */
    int of = 0;
    uint64_t D = (uint64_t)dim, H = (uint64_t)hidden, L = (uint64_t)n_layers,
             V = (uint64_t)vocab, S = (uint64_t)seq_len;
    uint64_t head_size = D / (uint64_t)n_heads;
    uint64_t kv_dim = head_size * (uint64_t)n_kv;
    uint64_t n_emb = mul_u64(V, D, &of);
    uint64_t n_norm = mul_u64(L, D, &of);
    uint64_t n_wq = mul_u64(L, mul_u64(D, D, &of), &of);
    uint64_t n_wk = mul_u64(L, mul_u64(kv_dim, D, &of), &of);
    uint64_t n_wo = n_wq;
    uint64_t n_ffn = mul_u64(L, mul_u64(H, D, &of), &of);
    uint64_t n_rope = mul_u64(S, head_size / 2, &of);
    uint64_t total = 0;
    const uint64_t parts[] = {n_emb, n_norm, n_wq, n_wk, n_wk, n_wo, n_norm,
                              n_ffn, n_ffn,  n_ffn, D,  n_rope, n_rope};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) total = add_u64(total, parts[i], &of);
    uint64_t with_cls = add_u64(total, n_emb, &of);
    uint64_t expected = shared ? total : with_cls;
    uint64_t expected_bytes = add_u64(LLAMA2C_HEADER_BYTES, mul_u64(expected, 4, &of), &of);
    uint64_t cls_bytes = add_u64(LLAMA2C_HEADER_BYTES, mul_u64(with_cls, 4, &of), &of);
    if (of) {
        rc = perl_fail(LIBPERL_ERR_FORMAT, "%s: header describes an impossibly large model", path);
        goto fail;
    }
    if ((uint64_t)map.size < expected_bytes) {
        rc = perl_fail(LIBPERL_ERR_FORMAT,
                       "%s: truncated: the header (dim %d, hidden %d, layers %d, vocab %d, "
                       "seq_len %d) needs %llu bytes, the file has %zu",
                       path, dim, hidden, n_layers, h[5], seq_len,
                       (unsigned long long)expected_bytes, map.size);
        goto fail;
    }
    /* Some exporters append the classifier even when it is shared; accept
     * exactly that, nothing else. */
    if ((uint64_t)map.size != expected_bytes && !(shared && (uint64_t)map.size == cls_bytes)) {
        rc = perl_fail(LIBPERL_ERR_FORMAT,
                       "%s: %llu unexpected trailing bytes after the %llu bytes the header "
                       "describes (wrong header or corrupt file)",
                       path, (unsigned long long)((uint64_t)map.size - expected_bytes),
                       (unsigned long long)expected_bytes);
        goto fail;
    }

    rc = model_alloc(&m, &cfg);
    if (rc != LIBPERL_OK) goto fail;
    rc = model_add_backing(m, map.addr, map.size, 1);
    if (rc != LIBPERL_OK) goto fail;
    map.addr = NULL; /* owned by the model now */
    map.size = 0;

    float *p = (float *)((unsigned char *)m->backing[m->n_backing - 1].addr + LLAMA2C_HEADER_BYTES);
    model_weights *w = &m->w;
    size_t d = (size_t)D, hd = (size_t)H, kvd = (size_t)kv_dim;
    w->tok_emb = p;
    p += n_emb;
    float *rms_att = p;
    p += n_norm;
    float *wq = p;
    p += n_wq;
    float *wk = p;
    p += n_wk;
    float *wv = p;
    p += n_wk;
    float *wo = p;
    p += n_wo;
    float *rms_ffn = p;
    p += n_norm;
    float *w1 = p;
    p += n_ffn;
    float *w2 = p;
    p += n_ffn;
    float *w3 = p;
    p += n_ffn;
    w->final_norm = p;
    p += d;
    p += 2 * n_rope; /* freq_cis_real, freq_cis_imag: recomputed instead */
    w->lm_head = shared ? w->tok_emb : p;
    for (size_t l = 0; l < (size_t)L; l++) {
        layer_weights *lw = &w->layers[l];
        lw->attn_norm = rms_att + l * d;
        lw->wq = wq + l * d * d;
        lw->wk = wk + l * kvd * d;
        lw->wv = wv + l * kvd * d;
        lw->wo = wo + l * d * d;
        lw->bq = lw->bk = lw->bv = NULL;
        lw->ffn_norm = rms_ffn + l * d;
        lw->w_gate = w1 + l * hd * d;
        lw->w_down = w2 + l * d * hd;
        lw->w_up = w3 + l * hd * d;
    }
    model_weights_tie(&m->cfg, w);
    rc = model_init_rope(m);
    if (rc != LIBPERL_OK) goto fail;
    *out = m;
    return LIBPERL_OK;

fail:
    perl_model_free(m);
    file_map_close(&map);
    return rc;
}
