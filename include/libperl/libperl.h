/*
 * libperl — Parameter-Efficient Reinforcement Learning (PERL) in C.
 *
 * LoRA adapters on a frozen Llama-family transformer, trained as reward models
 * (pairwise Bradley–Terry or thumbs-up/down) and as policies (policy gradient
 * on reward scores, KL-regularised toward the frozen anchor).  One frozen
 * perl_model serves any number of adapters; the reference policy is the base
 * with the adapter switched off (pass NULL), never a copy.
 *
 * This header is the manual.  Read it top to bottom:
 *   1. version and exports        4. perl_model  (frozen base: load, run)
 *   2. status codes and errors    5. perl_lora   (adapters, training engine)
 *   3. threads                    6. perl_reward / perl_policy_trainer
 *
 * Conventions
 *   - Every function returning int returns LIBPERL_OK (0) or a negative
 *     perl_status; perl_last_error() then says exactly what was wrong, for the
 *     calling thread.  The library never aborts, exits or prints.
 *   - Output parameters come first and are named `out`.  Handles are opaque,
 *     created by *_create / *_load, released by *_free (which accepts NULL).
 *   - Option structs begin with `struct_size`; fill them with the matching
 *     *_init() function (or *_INIT macro) before changing fields, so new
 *     fields can be appended without breaking the ABI.
 *   - Token ids are int32.  Batches are row-major [batch_size, seq_len],
 *     right-padded, with a per-row length.
 *   - Threading: a perl_model may be shared read-only by many threads; each
 *     perl_lora / perl_reward / perl_policy_trainer is used by one thread at a
 *     time.
 */
#ifndef LIBPERL_LIBPERL_H
#define LIBPERL_LIBPERL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------- */
/* 1. Version and exports                                                    */
/* ------------------------------------------------------------------------- */

#define LIBPERL_VERSION_MAJOR 0
#define LIBPERL_VERSION_MINOR 1
#define LIBPERL_VERSION_PATCH 0
#define LIBPERL_VERSION_NUMBER \
    (LIBPERL_VERSION_MAJOR * 10000 + LIBPERL_VERSION_MINOR * 100 + LIBPERL_VERSION_PATCH)
#define LIBPERL_VERSION_STRING "0.1.0"

#if defined(_WIN32)
#  define LIBPERL_API
#elif defined(__GNUC__) && __GNUC__ >= 4
#  define LIBPERL_API __attribute__((visibility("default")))
#else
#  define LIBPERL_API
#endif

/** The library's version as "MAJOR.MINOR.PATCH" (static string). */
LIBPERL_API const char *perl_version(void);
/** The library's LIBPERL_VERSION_NUMBER; compare with the header's to detect a mismatch. */
LIBPERL_API unsigned perl_version_number(void);

/* ------------------------------------------------------------------------- */
/* 2. Status codes and errors                                                */
/* ------------------------------------------------------------------------- */

/** Status codes.  Values never change between releases. */
typedef enum perl_status {
    LIBPERL_OK = 0,
    LIBPERL_ERR_INVALID_ARGUMENT = -1, /**< NULL pointer, zero/negative size, bad option value */
    LIBPERL_ERR_OUT_OF_MEMORY = -2,    /**< an allocation failed */
    LIBPERL_ERR_IO = -3,               /**< open/read/write/fsync/rename failed (errno text in message) */
    LIBPERL_ERR_FORMAT = -4,           /**< a file is malformed, truncated or corrupt */
    LIBPERL_ERR_UNSUPPORTED = -5,      /**< a valid but unsupported feature (dtype, architecture) */
    LIBPERL_ERR_SHAPE = -6,            /**< shapes or configs do not match (adapter for another model) */
    LIBPERL_ERR_RANGE = -7,            /**< token id, length or index out of range */
    LIBPERL_ERR_NUMERIC = -8,          /**< NaN or Inf in inputs, loss or gradients; state unchanged */
    LIBPERL_ERR_STATE = -9,            /**< the call is not valid in the object's current state */
    LIBPERL_ERR_CALLBACK = -10,        /**< a host callback returned non-zero; state unchanged */
    LIBPERL_ERR_INTERNAL = -11         /**< a bug in libperl; please report it */
} perl_status;

/** Static English text for a status code ("invalid argument", ...). Never NULL. */
LIBPERL_API const char *perl_status_str(int status);

/**
 * The calling thread's last error message, describing the most recent failed
 * call on this thread ("" if none).  Valid until the next libperl call on the
 * same thread.
 */
LIBPERL_API const char *perl_last_error(void);

/** Clears the calling thread's last error message. */
LIBPERL_API void perl_clear_error(void);

/* ------------------------------------------------------------------------- */
/* 3. Threads                                                                */
/* ------------------------------------------------------------------------- */

/**
 * Sets the number of threads used by libperl's own parallel loops *and* by the
 * BLAS (one setting, so the two never oversubscribe the cores).  Library
 * threads block while idle; they never spin against the BLAS's threads.
 * n <= 0 selects the number of online CPUs.  Process-wide.
 */
LIBPERL_API int perl_set_num_threads(int n);
/** The current thread count (>= 1). */
LIBPERL_API int perl_get_num_threads(void);

/* ------------------------------------------------------------------------- */
/* 4. perl_model: the frozen base                                            */
/* ------------------------------------------------------------------------- */

typedef struct perl_model perl_model;
typedef struct perl_lora perl_lora;

/** Architecture of a Llama-family decoder. */
typedef struct perl_model_config {
    size_t struct_size;     /**< sizeof(perl_model_config) */
    int32_t dim;            /**< hidden size */
    int32_t hidden_dim;     /**< SwiGLU intermediate size */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;     /**< grouped-query attention; divides n_heads */
    int32_t head_dim;       /**< per-head size; 0 = dim / n_heads */
    int32_t vocab_size;
    int32_t max_seq_len;    /**< context length */
    float rope_theta;       /**< 10000 for Llama 2 */
    float rms_norm_eps;     /**< 1e-5 for llama2.c, from config.json otherwise */
    int32_t tied_embeddings;/**< 1: lm_head shares the token embedding */
    int32_t qkv_bias;       /**< 1: q/k/v projections have biases (Qwen2) */
    int32_t rope_interleaved;/**< 1: rotate pairs (2i, 2i+1) (llama2.c); 0: HF half split */
    int32_t bos_token_id;
    int32_t eos_token_id;
} perl_model_config;

/** Fills *cfg with a small Llama shape (dim 64, 2 layers, ...) and sets struct_size. */
LIBPERL_API void perl_model_config_init(perl_model_config *cfg);

/**
 * Loads a model.  A directory is read as a Hugging Face Llama-family
 * checkpoint (config.json + model.safetensors, or a sharded
 * model.safetensors.index.json); a regular file as a llama2.c checkpoint.
 * F32 weights are mmap'd read-only and used in place; BF16/F16 weights are
 * converted to F32 once at load.  Everything is validated before use.
 */
LIBPERL_API int perl_model_load(perl_model **out, const char *path);

/** Creates a model with random weights (normal(0, 0.02) matrices, unit norms) from a seed. */
LIBPERL_API int perl_model_create_random(perl_model **out, const perl_model_config *cfg,
                                         uint64_t seed);

/**
 * Writes the model in Hugging Face layout into directory `dir` (created if
 * missing): config.json and model.safetensors (F32), each written atomically.
 * llama2.c-style interleaved RoPE weights are permuted to HF's half-split
 * convention, so the saved model computes the same logits.
 */
LIBPERL_API int perl_model_save_hf(const perl_model *model, const char *dir);

/** Releases the model.  All adapters and trainers on it must be freed first. */
LIBPERL_API void perl_model_free(perl_model *model);

/** Copies the model's architecture into *out (set out->struct_size first, or use init). */
LIBPERL_API int perl_model_get_config(const perl_model *model, perl_model_config *out);

/** Number of parameters of the base model (tied embeddings counted once). */
LIBPERL_API size_t perl_model_num_params(const perl_model *model);

/** A batch of token sequences, right-padded to seq_len. */
typedef struct perl_batch {
    size_t struct_size;      /**< sizeof(perl_batch) */
    int32_t batch_size;      /**< rows */
    int32_t seq_len;         /**< padded row length (<= model max_seq_len) */
    const int32_t *tokens;   /**< [batch_size * seq_len], row-major */
    const int32_t *lengths;  /**< [batch_size] real tokens per row, 1..seq_len; NULL: all seq_len */
} perl_batch;

/** Sets struct_size and zeroes the rest. */
LIBPERL_API void perl_batch_init(perl_batch *batch);

/**
 * Batched forward pass with `adapter` (NULL: the frozen base).
 * logits: NULL or [batch_size, seq_len, vocab_size]; hidden: NULL or
 * [batch_size, seq_len, dim] (final RMS-normed hidden states).  Padding
 * positions are written as zeros.
 */
LIBPERL_API int perl_model_forward(const perl_model *model, const perl_lora *adapter,
                                   const perl_batch *batch, float *logits, float *hidden);

/**
 * Log-probabilities of each next token: out[b, t] = log p(tokens[b, t+1] |
 * tokens[b, 0..t]) for t + 1 < length, 0 elsewhere.  [batch_size, seq_len].
 * Never materialises the [tokens, vocab] logits.
 */
LIBPERL_API int perl_model_token_logprobs(const perl_model *model, const perl_lora *adapter,
                                          const perl_batch *batch, float *out);

/* ------------------------------------------------------------------------- */
/* 5. perl_lora: adapters and the training engine                            */
/* ------------------------------------------------------------------------- */

/** Target modules (bit flags). */
enum {
    LIBPERL_TARGET_Q = 1 << 0,
    LIBPERL_TARGET_K = 1 << 1,
    LIBPERL_TARGET_V = 1 << 2,
    LIBPERL_TARGET_O = 1 << 3,
    LIBPERL_TARGET_GATE = 1 << 4,
    LIBPERL_TARGET_UP = 1 << 5,
    LIBPERL_TARGET_DOWN = 1 << 6,
    LIBPERL_TARGET_ATTENTION = 0x0f,
    LIBPERL_TARGET_ALL = 0x7f
};

/** Initialisation of the A matrices (B is always zero, so a new adapter equals the base). */
typedef enum perl_lora_init {
    LIBPERL_LORA_INIT_KAIMING = 0,  /**< Kaiming-uniform(a=sqrt(5)), as PEFT's default */
    LIBPERL_LORA_INIT_GAUSSIAN = 1  /**< normal(0, 1/r), as PEFT's init_lora_weights="gaussian" */
} perl_lora_init;

/** What an adapter trains. */
typedef enum perl_lora_mode {
    LIBPERL_MODE_LORA = 0,  /**< low-rank adapters; the base stays frozen and shared */
    LIBPERL_MODE_FULL = 1   /**< full fine-tuning: a private trainable copy of every weight */
} perl_lora_mode;

typedef struct perl_lora_options {
    size_t struct_size;       /**< sizeof(perl_lora_options) */
    int32_t mode;             /**< perl_lora_mode */
    int32_t rank;             /**< r >= 1 */
    float alpha;              /**< lora_alpha */
    float dropout;            /**< on the adapter input, training only; [0, 1) */
    uint32_t target_modules;  /**< LIBPERL_TARGET_* flags */
    int32_t use_rslora;       /**< 1: scaling alpha / sqrt(r); 0: alpha / r */
    int32_t init;             /**< perl_lora_init */
    uint64_t seed;            /**< initialisation and dropout */
    int32_t train_embeddings; /**< FULL mode: 1 also trains the token embedding / lm_head */
} perl_lora_options;

/** Defaults: LoRA r=8, alpha=16, dropout 0, targets q,k,v,o, Kaiming, seed 0. */
LIBPERL_API void perl_lora_options_init(perl_lora_options *opts);

/** Creates an adapter on `model` (which must outlive it). */
LIBPERL_API int perl_lora_create(perl_lora **out, perl_model *model, const perl_lora_options *opts);
LIBPERL_API void perl_lora_free(perl_lora *lora);

/** Number of trainable parameters (adapter matrices plus any scalar head). */
LIBPERL_API size_t perl_lora_num_params(const perl_lora *lora);

/**
 * Direct access to the contiguous trainable parameters and gradients (the
 * layout is stable for the life of the handle; a scalar head, when present,
 * is at the end).  Used for broadcasting initial weights across ranks and in
 * tests.
 */
LIBPERL_API int perl_lora_params(perl_lora *lora, float **out_params, float **out_grads,
                                 size_t *out_count);

/**
 * Saves in Hugging Face PEFT layout into directory `dir`: adapter_config.json
 * and adapter_model.safetensors (tensor names
 * base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, A [r, in],
 * B [out, r]; a scalar head as base_model.model.score.weight).  Each file is
 * written atomically; a failed save leaves the previous files intact.
 * FULL-mode adapters are saved as a complete HF model instead.
 */
LIBPERL_API int perl_lora_save(const perl_lora *lora, const char *dir);

/** Loads a PEFT-layout adapter for `model`; shapes are checked against the model. */
LIBPERL_API int perl_lora_load(perl_lora **out, perl_model *model, const char *dir);

/**
 * Merges the adapter into a copy of the base weights: W' = W + scale * B A.
 * The result is an independent model (for export with perl_model_save_hf).
 */
LIBPERL_API int perl_lora_merge(perl_model **out, const perl_lora *lora);

/* ---- optimizer ---------------------------------------------------------- */

typedef enum perl_lr_schedule {
    LIBPERL_LR_CONSTANT = 0,
    LIBPERL_LR_LINEAR = 1,   /**< warmup, then linear decay to min_lr_ratio * lr at total_steps */
    LIBPERL_LR_COSINE = 2    /**< warmup, then cosine decay to min_lr_ratio * lr at total_steps */
} perl_lr_schedule;

/** AdamW with decoupled weight decay and bias correction, global-norm clipping. */
typedef struct perl_optim_options {
    size_t struct_size;   /**< sizeof(perl_optim_options) */
    float lr;             /**< peak learning rate */
    float beta1, beta2, eps;
    float weight_decay;   /**< decoupled (AdamW) */
    float max_grad_norm;  /**< clip the global L2 norm to this; <= 0 disables */
    int32_t schedule;     /**< perl_lr_schedule */
    int32_t warmup_steps;
    int32_t total_steps;
    float min_lr_ratio;
} perl_optim_options;

/** Defaults: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, clip 1.0, constant. */
LIBPERL_API void perl_optim_options_init(perl_optim_options *opts);

/** Sets the optimizer of an adapter (the adapter owns its AdamW moments and step count). */
LIBPERL_API int perl_lora_set_optimizer(perl_lora *lora, const perl_optim_options *opts);

/** Host-set learning rate for the next steps, overriding the schedule; lr < 0 restores it. */
LIBPERL_API int perl_lora_set_lr(perl_lora *lora, float lr);

/**
 * Gradient hook: called between backward and the optimizer update with the
 * whole gradient as one contiguous float array, e.g. to all-reduce it across
 * data-parallel ranks.  The hook may modify the gradients in place.  A
 * non-zero return aborts the step with LIBPERL_ERR_CALLBACK and parameters
 * unchanged.
 */
typedef int (*perl_grad_hook)(float *grads, size_t count, void *user);

/** Installs (or with NULL removes) the gradient hook. */
LIBPERL_API int perl_lora_set_grad_hook(perl_lora *lora, perl_grad_hook hook, void *user);

/** Per-layer activation recomputation (gradient checkpointing): 1 on, 0 off. */
LIBPERL_API int perl_lora_set_recompute(perl_lora *lora, int enabled);

/** Statistics of one training step. */
typedef struct perl_step_stats {
    size_t struct_size;  /**< sizeof(perl_step_stats) */
    float loss;
    float grad_norm;     /**< global L2 norm before clipping */
    float lr;            /**< learning rate used */
    int64_t step;        /**< optimizer steps taken so far, including this one */
    int64_t n_tokens;    /**< tokens contributing to the loss */
    float accuracy;      /**< SFT: next-token argmax accuracy on masked tokens */
} perl_step_stats;

LIBPERL_API void perl_step_stats_init(perl_step_stats *stats);

/** Zeroes the accumulated gradients. */
LIBPERL_API int perl_lora_zero_grad(perl_lora *lora);

/**
 * Causal-LM (SFT) loss and backward, accumulating gradients (+=).
 * loss_mask: NULL (every next token counts) or [batch_size, seq_len] where
 * loss_mask[b, t] != 0 makes token t (t >= 1) a target predicted from
 * tokens[0..t-1].  The loss is the mean over target tokens.  out_stats may be
 * NULL.
 */
LIBPERL_API int perl_lora_sft_backward(perl_lora *lora, const perl_batch *batch,
                                       const uint8_t *loss_mask, perl_step_stats *out_stats);

/**
 * Optimizer step: gradient hook, NaN/Inf check, global-norm clipping,
 * AdamW, step += 1.  Gradients are left as computed (zero them before the
 * next accumulation).  On failure parameters are unchanged.
 */
LIBPERL_API int perl_lora_optimizer_step(perl_lora *lora, perl_step_stats *out_stats);

/** One SFT training step: zero_grad + sft_backward + optimizer_step. */
LIBPERL_API int perl_lora_sft_step(perl_lora *lora, const perl_batch *batch,
                                   const uint8_t *loss_mask, perl_step_stats *out_stats);

/* ---- training state --------------------------------------------------- */

/**
 * Saves the adapter's complete training state into one file (written
 * atomically, CRC-checked): parameters, AdamW moments, optimizer options,
 * step, learning-rate override and dropout stream.  Loading it into an
 * adapter of the same shape resumes training bit-exactly.
 */
LIBPERL_API int perl_lora_save_state(const perl_lora *lora, const char *path);
/** Restores a state saved by perl_lora_save_state; on failure the adapter is unchanged. */
LIBPERL_API int perl_lora_load_state(perl_lora *lora, const char *path);

/* ------------------------------------------------------------------------- */
/* 6. Generation                                                             */
/* ------------------------------------------------------------------------- */

/** Sampling settings for perl_generate. */
typedef struct perl_generate_options {
    size_t struct_size;         /**< sizeof(perl_generate_options) */
    int32_t max_new_tokens;     /**< >= 1 */
    float temperature;          /**< 0: greedy (exact argmax); > 0: sample */
    int32_t top_k;              /**< 0: off */
    float top_p;                /**< 1: off; nucleus mass in (0, 1] */
    float min_p;                /**< 0: off; drop tokens with p < min_p * p_max */
    uint64_t seed;              /**< per call; the same seed gives the same samples */
    const int32_t *stop_tokens; /**< a row ends after emitting any of these (kept in the output) */
    int32_t n_stop_tokens;
} perl_generate_options;

/** Defaults: 64 new tokens, temperature 1, no top-k/top-p/min-p, seed 0, no stop tokens. */
LIBPERL_API void perl_generate_options_init(perl_generate_options *opts);

/**
 * Samples continuations of a batch of prompts of different lengths with a KV
 * cache: one batched prefill, then decode steps that run every unfinished row
 * through one set of matrix products.  adapter NULL samples from the base.
 * out_tokens [batch_size, max_new_tokens] (padded with -1), out_lengths
 * [batch_size], out_logprobs (NULL or [batch_size, max_new_tokens]): the
 * log-probability of each sampled token under the sampling distribution
 * (after temperature and filtering; for greedy, under the unmodified
 * softmax).  Prompt length + max_new_tokens must fit the context.
 */
LIBPERL_API int perl_generate(const perl_model *model, const perl_lora *adapter, const perl_batch *prompts,
                              const perl_generate_options *opts, int32_t *out_tokens, int32_t *out_lengths,
                              float *out_logprobs);

/* ------------------------------------------------------------------------- */
/* 7. perl_reward: reward models                                             */
/* ------------------------------------------------------------------------- */

typedef struct perl_reward perl_reward;

typedef enum perl_reward_objective {
    LIBPERL_REWARD_PAIRWISE = 0,  /**< Bradley–Terry: -log sigmoid(r_chosen - r_rejected - margin) */
    LIBPERL_REWARD_POINTWISE = 1  /**< thumbs up/down: weighted BCE on sigmoid(r) */
} perl_reward_objective;

typedef struct perl_reward_options {
    size_t struct_size;   /**< sizeof(perl_reward_options) */
    int32_t objective;    /**< perl_reward_objective */
    float center_coef;    /**< pairwise: + center_coef * mean((r_chosen + r_rejected)^2); 0 off */
    float pos_weight;     /**< pointwise: weight of label-1 examples */
    float neg_weight;     /**< pointwise: weight of label-0 examples */
    float head_init_std;  /**< score head init: normal(0, head_init_std) */
    uint64_t seed;        /**< head initialisation */
} perl_reward_options;

/** Defaults: pairwise, no centering, class weights 1, head std 1/sqrt(dim + 1) (as HF), seed 0. */
LIBPERL_API void perl_reward_options_init(perl_reward_options *opts);

/**
 * Creates a reward model: the frozen `model` plus `lora` (LoRA or FULL mode)
 * plus a scalar head on the final hidden state of each sequence's last real
 * token.  The head becomes part of the adapter's parameters (saved with it as
 * score.weight).  The reward model borrows model and lora: both must outlive it.
 */
LIBPERL_API int perl_reward_create(perl_reward **out, perl_model *model, perl_lora *lora,
                                   const perl_reward_options *opts);
LIBPERL_API void perl_reward_free(perl_reward *reward);

/** Statistics of one reward-model step. */
typedef struct perl_reward_stats {
    size_t struct_size;  /**< sizeof(perl_reward_stats) */
    float loss;
    float accuracy;      /**< pairwise: r_chosen > r_rejected; pointwise: (r > 0) == label */
    float mean_margin;   /**< pairwise: mean r_chosen - r_rejected; pointwise: mean score */
    float grad_norm;
    float lr;
    int64_t step;
} perl_reward_stats;

LIBPERL_API void perl_reward_stats_init(perl_reward_stats *stats);

/**
 * One pairwise training step on batch_size pairs: forward both sides, loss,
 * backward, gradient hook, AdamW.  margins: NULL or [batch_size] (finite).
 * out_chosen / out_rejected: NULL or [batch_size] scores before the update.
 * On any error the parameters are unchanged.
 */
LIBPERL_API int perl_reward_step_pairwise(perl_reward *reward, const perl_batch *chosen,
                                          const perl_batch *rejected, const float *margins,
                                          float *out_chosen, float *out_rejected,
                                          perl_reward_stats *out_stats);

/** One pointwise step; labels [batch_size] each exactly 0 or 1.  out_scores may be NULL. */
LIBPERL_API int perl_reward_step_pointwise(perl_reward *reward, const perl_batch *batch,
                                           const float *labels, float *out_scores,
                                           perl_reward_stats *out_stats);

/** Scores a batch without gradients: out_scores [batch_size]. */
LIBPERL_API int perl_reward_score(perl_reward *reward, const perl_batch *batch, float *out_scores);

/**
 * Loads a reward model saved with perl_lora_save (PEFT layout with
 * score.weight): creates the adapter (*out_lora, owned by the caller, free it
 * after the reward model) and the reward model on `model`.
 */
LIBPERL_API int perl_reward_load(perl_reward **out, perl_lora **out_lora, perl_model *model,
                                 const char *dir, const perl_reward_options *opts);

/* ------------------------------------------------------------------------- */
/* 8. perl_policy_trainer: RL on a LoRA policy with KL to the frozen anchor  */
/* ------------------------------------------------------------------------- */

typedef struct perl_policy_trainer perl_policy_trainer;

typedef enum perl_pg_algorithm {
    LIBPERL_PG_REINFORCE = 0, /**< advantage = reward - moving-average baseline */
    LIBPERL_PG_RLOO = 1,      /**< k samples per prompt, leave-one-out baseline */
    LIBPERL_PG_GRPO = 2,      /**< group-normalised advantages (reward - mean) / std */
    LIBPERL_PG_PPO = 3        /**< PPO-clip over epochs of minibatches; GAE with a value head */
} perl_pg_algorithm;

typedef enum perl_kl_estimator {
    LIBPERL_KL_K1 = 0, /**< log p - log p_ref */
    LIBPERL_KL_K2 = 1, /**< (log p - log p_ref)^2 / 2 */
    LIBPERL_KL_K3 = 2  /**< exp(log p_ref - log p) - 1 - (log p_ref - log p) */
} perl_kl_estimator;

typedef enum perl_kl_mode {
    LIBPERL_KL_IN_REWARD = 0, /**< per-token penalty -kl_coef * kl_t folded into the return */
    LIBPERL_KL_IN_LOSS = 1    /**< kl_coef * mean kl added to the loss (GRPO style) */
} perl_kl_mode;

typedef enum perl_loss_norm {
    LIBPERL_NORM_TOKEN = 0,   /**< mean over all response tokens of the batch */
    LIBPERL_NORM_SEQUENCE = 1 /**< mean over tokens within a sequence, then over sequences */
} perl_loss_norm;

typedef struct perl_policy_options {
    size_t struct_size;        /**< sizeof(perl_policy_options) */
    int32_t algorithm;         /**< perl_pg_algorithm */
    int32_t group_size;        /**< RLOO/GRPO: responses per prompt (consecutive rows); divides the batch */
    float baseline_decay;      /**< REINFORCE: baseline = decay * baseline + (1 - decay) * mean reward */
    float kl_coef;             /**< initial KL coefficient (>= 0) */
    int32_t kl_estimator;      /**< perl_kl_estimator */
    int32_t kl_mode;           /**< perl_kl_mode */
    float kl_target;           /**< > 0: adaptive coefficient (Ziegler et al.) toward this KL per sequence */
    float kl_horizon;          /**< adaptive controller horizon (in samples) */
    float entropy_coef;        /**< entropy bonus (>= 0) */
    int32_t whiten_advantages; /**< 1: normalise advantages to zero mean, unit std over the batch */
    int32_t loss_norm;         /**< perl_loss_norm */
    float clip_eps;            /**< PPO ratio clip */
    int32_t ppo_epochs;        /**< PPO passes over the batch */
    int32_t ppo_minibatches;   /**< PPO minibatches per epoch (divides the batch) */
    float gamma, lambda;       /**< PPO GAE discount and lambda */
    float value_coef;          /**< PPO value loss weight */
    float value_clip;          /**< PPO value clip (0: off) */
} perl_policy_options;

/** Defaults: REINFORCE, baseline decay 0.9, kl_coef 0.05 k1 in reward, per-token norm, PPO eps 0.2,
 *  1 epoch, 1 minibatch, gamma 1, lambda 0.95, value_coef 0.5, group size 1. */
LIBPERL_API void perl_policy_options_init(perl_policy_options *opts);

/**
 * Creates a policy trainer on `model` with the policy adapter `policy` (LoRA
 * or FULL) and, for PPO with a value function, `value` (a second adapter whose
 * scalar head predicts values; NULL otherwise).  The reference policy is
 * `model` with no adapter (LoRA mode), so no copy exists; for a FULL-mode
 * policy the reference is the base too.  Borrows all three.
 */
LIBPERL_API int perl_policy_create(perl_policy_trainer **out, perl_model *model, perl_lora *policy,
                                   perl_lora *value, const perl_policy_options *opts);
LIBPERL_API void perl_policy_free(perl_policy_trainer *trainer);

/** Statistics of one RL step (means over the batch). */
typedef struct perl_policy_stats {
    size_t struct_size;   /**< sizeof(perl_policy_stats) */
    float loss;
    float mean_reward, std_reward;
    float kl;             /**< mean per-sequence KL (sum over tokens of the k1 estimate) */
    float entropy;        /**< mean per-token entropy of the policy */
    float response_length;
    float clip_fraction;  /**< PPO: fraction of tokens whose ratio was clipped */
    float value_loss;
    float grad_norm;
    float lr;
    float kl_coef;        /**< coefficient used in this step */
    int64_t step;
} perl_policy_stats;

LIBPERL_API void perl_policy_stats_init(perl_policy_stats *stats);

/**
 * One RL step on batch_size (prompt, response) rows: policy log-probs with
 * gradients, reference log-probs with the adapter off, the objective, backward,
 * gradient hook, AdamW (PPO: several updates).  responses [batch_size,
 * max_response_len] with response_lengths [batch_size] (>= 1), rewards
 * [batch_size] finite; old_logprobs NULL (taken from the current policy) or
 * [batch_size, max_response_len] from perl_generate.  prompt + response must
 * fit the context.  On any error the trainer is unchanged.
 */
LIBPERL_API int perl_policy_step(perl_policy_trainer *trainer, const perl_batch *prompts,
                                 const int32_t *responses, const int32_t *response_lengths,
                                 int32_t max_response_len, const float *rewards,
                                 const float *old_logprobs, perl_policy_stats *out_stats);

/**
 * Saves a trainer checkpoint into directory `dir`: the policy adapter in PEFT
 * layout (adapter/), the value adapter and head (value/) if any, and
 * trainer_state.bin (optimizer moments, step, baseline, KL coefficient, RNG).
 */
LIBPERL_API int perl_policy_save(const perl_policy_trainer *trainer, const char *dir);
/** Restores a checkpoint into a trainer created with the same shapes; resumes bit-exactly. */
LIBPERL_API int perl_policy_load(perl_policy_trainer *trainer, const char *dir);

#ifdef __cplusplus
}
#endif

#endif /* LIBPERL_LIBPERL_H */
