/* Inference entry points on perl_model: logits, hidden states, token log-probs. */
#include "engine.h"

#include <string.h>

void perl_batch_init(perl_batch *batch) {
    if (!batch) return;
    memset(batch, 0, sizeof *batch);
    batch->struct_size = sizeof *batch;
}

/* Packs, runs an inference forward in a fresh workspace (so a shared model
 * stays read-only and thread-safe). */
static int run_forward(const perl_model *m, const perl_lora *adapter, const perl_batch *batch, packed_batch *pb,
                       engine **out) {
    *out = NULL;
    PERL_CHECK_ARG(m, "model is NULL");
    if (adapter && adapter->model != m)
        return perl_fail(LIBPERL_ERR_SHAPE, "the adapter was created for another model");
    PERL_TRY(packed_from_batch(pb, m, batch));
    engine *e;
    int rc = engine_create(&e, m, (perl_lora *)adapter); /* inference never writes the adapter */
    if (rc == LIBPERL_OK) rc = engine_forward(e, pb, 0);
    if (rc != LIBPERL_OK) {
        engine_free(e);
        packed_free(pb);
        return rc;
    }
    *out = e;
    return LIBPERL_OK;
}

/* Scatters packed rows [N, width] into padded [B, T, width] with zero padding. */
static void unpack_rows(float *dst, const float *src, const packed_batch *pb, int seq_len, int width) {
    memset(dst, 0, (size_t)pb->n_rows * seq_len * width * sizeof(float));
    for (int r = 0; r < pb->n_rows; r++) {
        int len = pb->row_start[r + 1] - pb->row_start[r];
        memcpy(dst + (size_t)r * seq_len * width, src + (size_t)pb->row_start[r] * width,
               (size_t)len * width * sizeof(float));
    }
}

int perl_model_forward(const perl_model *m, const perl_lora *adapter, const perl_batch *batch, float *logits,
                       float *hidden) {
    packed_batch pb;
    engine *e;
    PERL_TRY(run_forward(m, adapter, batch, &pb, &e));
    int rc = LIBPERL_OK;
    if (hidden) unpack_rows(hidden, e->hidden, &pb, batch->seq_len, m->cfg.dim);
    if (logits) {
        float *packed = perl_mem_alloc((size_t)pb.n_tokens * m->cfg.vocab_size * sizeof(float));
        if (!packed) {
            rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory for logits");
        } else {
            engine_logits(e, packed);
            unpack_rows(logits, packed, &pb, batch->seq_len, m->cfg.vocab_size);
            perl_mem_free(packed);
        }
    }
    engine_free(e);
    packed_free(&pb);
    return rc;
}

int perl_model_token_logprobs(const perl_model *m, const perl_lora *adapter, const perl_batch *batch, float *out) {
    PERL_CHECK_ARG(out, "perl_model_token_logprobs: out is NULL");
    packed_batch pb;
    engine *e;
    PERL_TRY(run_forward(m, adapter, batch, &pb, &e));
    int N = pb.n_tokens, rc;
    int32_t *targets = perl_mem_alloc((size_t)N * sizeof(int32_t));
    float *logp = perl_mem_alloc((size_t)N * sizeof(float));
    if (!targets || !logp) {
        rc = perl_fail(LIBPERL_ERR_OUT_OF_MEMORY, "out of memory");
    } else {
        for (int i = 0; i < N; i++) targets[i] = i + 1 < N && pb.pos[i + 1] == pb.pos[i] + 1 ? pb.tokens[i + 1] : -1;
        rc = engine_lm_head(e, targets, logp, NULL, NULL, NULL, NULL);
        if (rc == LIBPERL_OK) unpack_rows(out, logp, &pb, batch->seq_len, 1);
    }
    perl_mem_free(targets);
    perl_mem_free(logp);
    engine_free(e);
    packed_free(&pb);
    return rc;
}
