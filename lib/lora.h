/*
 * Adapters: the trainable part attached to a frozen perl_model.  Parameters,
 * gradients and AdamW moments each live in one contiguous buffer (llm.c
 * style), so the optimizer and a gradient all-reduce are one flat loop.
 *
 * LoRA mode: y = x W^T + scale * (dropout(x) A^T) B^T for each targeted
 * linear; A [r, in], B [out, r].  FULL mode: the block holds a private copy of
 * every base weight (the full fine-tuning baseline).
 * An optional scalar head (reward model / value head), `dim` floats, sits at
 * the end of the block: score = head . h_last.
 */
#ifndef LIBPERL_LORA_H
#define LIBPERL_LORA_H

#include "model.h"

enum lora_target_index {
    LORA_Q = 0, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_N_TARGETS
};

typedef struct lora_module {
    float *A, *B;     /* [rank, in], [out, rank]; NULL when not targeted */
    float *dA, *dB;   /* gradients, same shapes */
    int in, out;
} lora_module;

struct perl_lora {
    perl_model *model;
    perl_lora_options opts;
    float scale;                 /* alpha / r or alpha / sqrt(r) */

    float *params, *grads;       /* [n_params] each */
    float *adam_m, *adam_v;      /* [n_params] each; NULL until the first step */
    size_t n_params;

    lora_module *modules;        /* [n_layers * LORA_N_TARGETS] (LoRA mode) */
    model_weights full_w;        /* FULL mode: weights inside params */
    model_weights full_dw;       /* FULL mode: gradients inside grads (frozen parts NULL) */

    float *head, *dhead;         /* scalar head [dim] or NULL */

    perl_optim_options optim;
    int64_t step;                /* optimizer steps taken */
    float lr_override;           /* < 0: use the schedule */
    perl_grad_hook hook;
    void *hook_user;
    int recompute;
    uint64_t dropout_counter;    /* advances once per training forward */
    struct engine *engine;       /* training workspace, reused across steps */
};

/* The weights a forward with this adapter uses (base when lora is NULL or LoRA mode). */
const model_weights *lora_weights(const perl_model *m, const perl_lora *lora);

/* The LoRA module for (layer, target) or NULL when absent / not LoRA mode. */
const lora_module *lora_module_at(const perl_lora *lora, int layer, int target);

/* Appends a scalar head of `dim` floats (normal(0, init_std), seeded) to the
 * parameter block if the adapter has none.  Fails with STATE once optimizer
 * moments exist. */
int lora_ensure_head(perl_lora *lora, float init_std, uint64_t seed);

/* Learning rate for the next step from schedule / override. */
float lora_current_lr(const perl_lora *lora);

/* Allocates an adapter block for opts without initialising values (for load). */
int lora_alloc(perl_lora **out, perl_model *model, const perl_lora_options *opts, int with_head);

/* HF PEFT module names ("q_proj", ...) by lora_target_index; and the parent
 * ("self_attn" / "mlp"). */
const char *lora_target_name(int target);
const char *lora_target_parent(int target);

/* peft.c */
int peft_save(const perl_lora *lora, const char *dir);
int peft_load(perl_lora **out, perl_model *model, const char *dir);

#endif /* LIBPERL_LORA_H */
