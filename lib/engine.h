/*
 * The training engine: batched transformer forward that keeps what backward
 * needs, backward into adapter (or full) gradients, and the LM head applied in
 * vocabulary chunks so [tokens, vocab] logits never exist at once.
 *
 * Rows of a batch are packed without padding: token i of the packed batch is
 * row r, position pos[i]; rows occupy [row_start[r], row_start[r+1]).
 */
#ifndef LIBPERL_ENGINE_H
#define LIBPERL_ENGINE_H

#include "lora.h"

typedef struct packed_batch {
    int n_rows;
    int n_tokens;        /* total real tokens N */
    int *row_start;      /* [n_rows + 1] */
    int32_t *tokens;     /* [N] */
    int32_t *pos;        /* [N] position within its row */
} packed_batch;

/* Validates a public batch against the model (ids in range, lengths in
 * 1..seq_len, seq_len <= max_seq_len) and packs it.  Free with packed_free. */
int packed_from_batch(packed_batch *out, const perl_model *m, const perl_batch *batch);
void packed_free(packed_batch *pb);
/* Packed index of (row, t), or -1 when t >= length. */
int packed_index(const packed_batch *pb, int row, int t);

/* Activations of one layer kept for backward. */
typedef struct layer_acts {
    float *xn1, *rstd1;          /* attention-norm output [N, dim] (buffer shared by all slots), [N] */
    float *q, *k, *v;            /* after bias and RoPE: [N, H*D], [N, KV*D] x2 */
    float *att, *lse;            /* attention output [N, H*D], log-sum-exp [N, H] */
    float *x_mid;                /* residual after attention [N, dim] */
    float *xn2, *rstd2;          /* ffn-norm output (shares xn1's buffer), [N] */
    float *gate, *up, *act;      /* [N, hidden] x3: act = silu(gate) * up (shared buffer) */
    float *lora_u[LORA_N_TARGETS]; /* dropout(x) A^T [N, r] per targeted module */
} layer_acts;

typedef struct engine {
    const perl_model *model;
    perl_lora *lora;             /* NULL: frozen base */
    const model_weights *w;      /* weights in use (base or FULL copy) */
    const packed_batch *pb;      /* batch of the last forward */
    int capacity;                /* tokens the buffers were planned for */
    int planned_training;        /* buffers include backward scratch */
    int train_capacity;          /* the most tokens a training forward has asked for */
    int n_slots;                 /* activation slots: n_layers, or 1 (inference / recompute) */
    int training;                /* last forward was a training forward */
    uint64_t dropout_step;       /* dropout stream of the last training forward */
    layer_acts *slots;
    float *resid;                /* [n_layers + 1][N, dim]: input of each layer, then the output */
    float *rstd_final, *hidden, *dhidden;
    /* backward scratch */
    float *d_resid, *d_x, *d_q, *d_k, *d_v, *d_att, *d_gate, *d_up, *d_act, *d_u, *x_drop, *lora_tmp;
    float *arena;
    size_t arena_floats;
    /* LM head chunk buffers */
    float *lm_logits, *lm_h, *lm_dh;
    int lm_chunk;
} engine;

/* A workspace for one (model, adapter) pair; grows to fit each batch and is
 * reused across steps.  adapter may be NULL (frozen base, inference only). */
int engine_create(engine **out, const perl_model *m, perl_lora *adapter);
void engine_free(engine *e);

/* Forward over the packed batch.  training = 1 keeps activations for
 * engine_backward and applies dropout.  Afterwards engine_hidden() holds the
 * final RMS-normed hidden states [N, dim] and engine_dhidden() is zeroed. */
int engine_forward(engine *e, const packed_batch *pb, int training);
float *engine_hidden(engine *e);
float *engine_dhidden(engine *e);

/*
 * The LM head over every packed token i with targets[i] >= 0 (the token to
 * score at position i, usually the next token of the row):
 *   out_logp[i] = log softmax(h_i W_lm^T)[targets[i]]   (0 where skipped)
 *   out_entropy[i] = entropy of that softmax            (optional)
 *   out_argmax[i] = argmax token                        (optional)
 * When grad_fn is non-NULL, it is asked for dL/dlogp_i and dL/dentropy_i for
 * each scored token (it sees logp and entropy), and the gradient is
 * accumulated into engine_dhidden() (and into lm_head gradients in FULL mode
 * with trainable embeddings).  Computed in vocabulary-sized row chunks.
 */
typedef void (*token_grad_fn)(void *ctx, int i, float logp, float entropy, float *out_dlogp,
                              float *out_dentropy);
int engine_lm_head(engine *e, const int32_t *targets, float *out_logp, float *out_entropy,
                   int32_t *out_argmax, token_grad_fn grad_fn, void *ctx);

/* Full logits [N, vocab] (inference; used by perl_model_forward). */
int engine_logits(engine *e, float *out);

/* Backward from engine_dhidden() through every layer, accumulating (+=) into
 * the adapter's gradients.  Requires a training forward. */
int engine_backward(engine *e);

#endif /* LIBPERL_ENGINE_H */
