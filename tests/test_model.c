/*
 * stories260K against a straightforward single-token llama2.c-style forward
 * (a KV cache, one position at a time, interleaved RoPE computed from the
 * formula, not from the library's tables), and the llama2.c -> HF converter
 * round trip.  Skips with a message when the shared model is absent.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "test_util.h"

/* ---- the reference: llama2.c's run.c forward, restated ---------------------- */

typedef struct ref_state {
    const perl_model *m;
    float *x, *xb, *xb2, *hb, *hb2, *q, *att, *logits, *key_cache, *value_cache;
} ref_state;

static void ref_rmsnorm(float *o, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    ss = 1.0f / sqrtf(ss / n + eps);
    for (int j = 0; j < n; j++) o[j] = w[j] * (ss * x[j]);
}

static void ref_matmul(float *out, const float *x, const float *w, int n, int d) { /* W [d, n] */
    for (int i = 0; i < d; i++) {
        float v = 0.0f;
        for (int j = 0; j < n; j++) v += w[(size_t)i * n + j] * x[j];
        out[i] = v;
    }
}

static void ref_softmax(float *x, int n) {
    float max = x[0], sum = 0.0f;
    for (int i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    for (int i = 0; i < n; i++) x[i] = expf(x[i] - max), sum += x[i];
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static void ref_init(ref_state *s, const perl_model *m) {
    const perl_model_config *c = &m->cfg;
    int kv_dim = c->n_kv_heads * c->head_dim;
    s->m = m;
    s->x = calloc((size_t)c->dim, sizeof(float));
    s->xb = calloc((size_t)c->dim, sizeof(float));
    s->xb2 = calloc((size_t)c->dim, sizeof(float));
    s->hb = calloc((size_t)c->hidden_dim, sizeof(float));
    s->hb2 = calloc((size_t)c->hidden_dim, sizeof(float));
    s->q = calloc((size_t)c->dim, sizeof(float));
    s->att = calloc((size_t)c->n_heads * c->max_seq_len, sizeof(float));
    s->logits = calloc((size_t)c->vocab_size, sizeof(float));
    s->key_cache = calloc((size_t)c->n_layers * c->max_seq_len * kv_dim, sizeof(float));
    s->value_cache = calloc((size_t)c->n_layers * c->max_seq_len * kv_dim, sizeof(float));
}

static void ref_free(ref_state *s) {
    free(s->x), free(s->xb), free(s->xb2), free(s->hb), free(s->hb2), free(s->q), free(s->att);
    free(s->logits), free(s->key_cache), free(s->value_cache);
}

static float *ref_forward(ref_state *s, int token, int pos) {
    const perl_model_config *c = &s->m->cfg;
    const model_weights *w = &s->m->w;
    int dim = c->dim, head_size = c->head_dim, kv_dim = c->n_kv_heads * head_size;
    int kv_mul = c->n_heads / c->n_kv_heads, hidden = c->hidden_dim;
    memcpy(s->x, w->tok_emb + (size_t)token * dim, (size_t)dim * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        const layer_weights *L = &w->layers[l];
        ref_rmsnorm(s->xb, s->x, L->attn_norm, dim, c->rms_norm_eps);
        size_t loff = (size_t)l * c->max_seq_len * kv_dim;
        float *k = s->key_cache + loff + (size_t)pos * kv_dim, *v = s->value_cache + loff + (size_t)pos * kv_dim;
        ref_matmul(s->q, s->xb, L->wq, dim, dim);
        ref_matmul(k, s->xb, L->wk, dim, kv_dim);
        ref_matmul(v, s->xb, L->wv, dim, kv_dim);
        for (int i = 0; i < dim; i += 2) { /* llama2.c's interleaved RoPE */
            int head_dim = i % head_size;
            float freq = 1.0f / powf(10000.0f, head_dim / (float)head_size);
            float val = pos * freq, fcr = cosf(val), fci = sinf(val);
            int rotn = i < kv_dim ? 2 : 1;
            for (int r = 0; r < rotn; r++) {
                float *vec = r == 0 ? s->q : k;
                float v0 = vec[i], v1 = vec[i + 1];
                vec[i] = v0 * fcr - v1 * fci;
                vec[i + 1] = v0 * fci + v1 * fcr;
            }
        }
        for (int h = 0; h < c->n_heads; h++) {
            float *q = s->q + h * head_size, *att = s->att + h * c->max_seq_len;
            for (int t = 0; t <= pos; t++) {
                const float *kt = s->key_cache + loff + (size_t)t * kv_dim + (h / kv_mul) * head_size;
                float score = 0.0f;
                for (int i = 0; i < head_size; i++) score += q[i] * kt[i];
                att[t] = score / sqrtf((float)head_size);
            }
            ref_softmax(att, pos + 1);
            float *xb = s->xb + h * head_size;
            memset(xb, 0, (size_t)head_size * sizeof(float));
            for (int t = 0; t <= pos; t++) {
                const float *vt = s->value_cache + loff + (size_t)t * kv_dim + (h / kv_mul) * head_size;
                for (int i = 0; i < head_size; i++) xb[i] += att[t] * vt[i];
            }
        }
        ref_matmul(s->xb2, s->xb, L->wo, dim, dim);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];
        ref_rmsnorm(s->xb, s->x, L->ffn_norm, dim, c->rms_norm_eps);
        ref_matmul(s->hb, s->xb, L->w_gate, dim, hidden);
        ref_matmul(s->hb2, s->xb, L->w_up, dim, hidden);
        for (int i = 0; i < hidden; i++) {
            float val = s->hb[i];
            s->hb[i] = val * (1.0f / (1.0f + expf(-val))) * s->hb2[i];
        }
        ref_matmul(s->xb, s->hb, L->w_down, hidden, dim);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb[i];
    }
    ref_rmsnorm(s->x, s->x, w->final_norm, dim, c->rms_norm_eps);
    ref_matmul(s->logits, s->x, w->lm_head, dim, c->vocab_size);
    return s->logits;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* ---- tests -------------------------------------------------------------------- */

static perl_model *load_stories(void) {
    char path[4096];
    test_shared_path(path, sizeof path, "models/stories260K.bin");
    if (!test_file_exists(path)) {
        printf("SKIP: %s not found (set PERL_SHARED_DIR); stories260K tests skipped\n", path);
        return NULL;
    }
    perl_model *m;
    ck_assert_msg(perl_model_load(&m, path) == LIBPERL_OK, "%s", perl_last_error());
    return m;
}

#define SEQ 48

/* Greedy tokens from BOS by the reference, with its logits at every position. */
static void reference_greedy(const perl_model *m, int32_t *tokens, float *logits) {
    ref_state s;
    ref_init(&s, m);
    tokens[0] = m->cfg.bos_token_id;
    for (int pos = 0; pos < SEQ; pos++) {
        float *l = ref_forward(&s, tokens[pos], pos);
        memcpy(logits + (size_t)pos * m->cfg.vocab_size, l, (size_t)m->cfg.vocab_size * sizeof(float));
        if (pos + 1 < SEQ) tokens[pos + 1] = argmax(l, m->cfg.vocab_size);
    }
    ref_free(&s);
}

static float max_rel_diff(const float *a, const float *b, size_t n) {
    float worst = 0.0f, scale = 1e-6f;
    for (size_t i = 0; i < n; i++) worst = fmaxf(worst, fabsf(a[i] - b[i])), scale = fmaxf(scale, fabsf(b[i]));
    return worst / scale;
}

START_TEST(stories_matches_llama2c_reference) {
    perl_model *m = load_stories();
    if (!m) return;
    ck_assert_int_eq(m->cfg.dim, 64);
    ck_assert_int_eq(m->cfg.n_layers, 5);
    ck_assert_int_eq(m->cfg.n_kv_heads, 4);
    ck_assert_int_eq(m->cfg.rope_interleaved, 1);
    int V = m->cfg.vocab_size;
    int32_t ref_tokens[SEQ];
    float *ref_logits = malloc((size_t)SEQ * V * sizeof(float)), *logits = malloc((size_t)SEQ * V * sizeof(float));
    reference_greedy(m, ref_tokens, ref_logits);
    perl_batch b;
    perl_batch_init(&b);
    b.batch_size = 1, b.seq_len = SEQ, b.tokens = ref_tokens;
    ck_assert_int_eq(perl_model_forward(m, NULL, &b, logits, NULL), LIBPERL_OK);
    float rel = max_rel_diff(logits, ref_logits, (size_t)SEQ * V);
    printf("stories260K: batched forward vs llama2.c reference over %d positions: max rel diff %.2e\n", SEQ, rel);
    ck_assert_float_lt(rel, 1e-4f);
    /* greedy decoding by the library's full recomputation gives the same tokens */
    for (int pos = 0; pos + 1 < SEQ; pos++)
        ck_assert_int_eq(argmax(logits + (size_t)pos * V, V), ref_tokens[pos + 1]);
    printf("stories260K greedy from BOS:");
    for (int i = 0; i < 16; i++) printf(" %d", ref_tokens[i]);
    printf(" ...\n");
    free(ref_logits);
    free(logits);
    perl_model_free(m);
}
END_TEST

START_TEST(converter_round_trip) {
    perl_model *m = load_stories();
    if (!m) return;
    char dir[4096];
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    ck_assert_msg(perl_model_save_hf(m, dir) == LIBPERL_OK, "%s", perl_last_error());
    perl_model *hf;
    ck_assert_msg(perl_model_load(&hf, dir) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_int_eq(hf->cfg.rope_interleaved, 0); /* permuted to the HF convention */
    int V = m->cfg.vocab_size;
    int32_t tokens[2 * SEQ];
    int32_t lengths[2] = {SEQ, SEQ / 2 + 3};
    for (int i = 0; i < 2 * SEQ; i++) tokens[i] = (int32_t)((i * 37 + 11) % V);
    perl_batch b;
    perl_batch_init(&b);
    b.batch_size = 2, b.seq_len = SEQ, b.tokens = tokens, b.lengths = lengths;
    float *a = malloc((size_t)2 * SEQ * V * sizeof(float)), *c = malloc((size_t)2 * SEQ * V * sizeof(float));
    ck_assert_int_eq(perl_model_forward(m, NULL, &b, a, NULL), LIBPERL_OK);
    ck_assert_int_eq(perl_model_forward(hf, NULL, &b, c, NULL), LIBPERL_OK);
    float rel = max_rel_diff(c, a, (size_t)2 * SEQ * V);
    printf("llama2.c -> HF -> load: max rel logit diff %.2e\n", rel);
    ck_assert_float_lt(rel, 1e-5f);
    free(a);
    free(c);
    perl_model_free(hf);
    perl_model_free(m);
    test_remove_tree(dir);
}
END_TEST

Suite *suite_model(void) {
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("stories260K");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, stories_matches_llama2c_reference);
    tcase_add_test(tc, converter_round_trip);
    suite_add_tcase(s, tc);
    return s;
}
