//! Raw declarations of `include/libperl/libperl.h`, one to one.
//!
//! Every struct is `#[repr(C)]` with the header's fields in the header's order
//! and types; `tests/layout.rs` checks each size against the `struct_size` that
//! the library's `*_init` function writes.  Everything here is `unsafe` to
//! call: use the safe wrapper in the crate root.
#![allow(non_camel_case_types, missing_docs)]

use std::os::raw::{c_char, c_int, c_uint, c_void};

// ---- 2. status codes ---------------------------------------------------------------

pub const LIBPERL_OK: c_int = 0;
pub const LIBPERL_ERR_INVALID_ARGUMENT: c_int = -1;
pub const LIBPERL_ERR_OUT_OF_MEMORY: c_int = -2;
pub const LIBPERL_ERR_IO: c_int = -3;
pub const LIBPERL_ERR_FORMAT: c_int = -4;
pub const LIBPERL_ERR_UNSUPPORTED: c_int = -5;
pub const LIBPERL_ERR_SHAPE: c_int = -6;
pub const LIBPERL_ERR_RANGE: c_int = -7;
pub const LIBPERL_ERR_NUMERIC: c_int = -8;
pub const LIBPERL_ERR_STATE: c_int = -9;
pub const LIBPERL_ERR_CALLBACK: c_int = -10;
pub const LIBPERL_ERR_INTERNAL: c_int = -11;

// ---- 5. enums ------------------------------------------------------------------------

pub const LIBPERL_TARGET_Q: u32 = 1 << 0;
pub const LIBPERL_TARGET_K: u32 = 1 << 1;
pub const LIBPERL_TARGET_V: u32 = 1 << 2;
pub const LIBPERL_TARGET_O: u32 = 1 << 3;
pub const LIBPERL_TARGET_GATE: u32 = 1 << 4;
pub const LIBPERL_TARGET_UP: u32 = 1 << 5;
pub const LIBPERL_TARGET_DOWN: u32 = 1 << 6;
pub const LIBPERL_TARGET_ATTENTION: u32 = 0x0f;
pub const LIBPERL_TARGET_ALL: u32 = 0x7f;

pub const LIBPERL_LORA_INIT_KAIMING: i32 = 0;
pub const LIBPERL_LORA_INIT_GAUSSIAN: i32 = 1;
pub const LIBPERL_MODE_LORA: i32 = 0;
pub const LIBPERL_MODE_FULL: i32 = 1;
pub const LIBPERL_LR_CONSTANT: i32 = 0;
pub const LIBPERL_LR_LINEAR: i32 = 1;
pub const LIBPERL_LR_COSINE: i32 = 2;
pub const LIBPERL_REWARD_PAIRWISE: i32 = 0;
pub const LIBPERL_REWARD_POINTWISE: i32 = 1;
pub const LIBPERL_PG_REINFORCE: i32 = 0;
pub const LIBPERL_PG_RLOO: i32 = 1;
pub const LIBPERL_PG_GRPO: i32 = 2;
pub const LIBPERL_PG_PPO: i32 = 3;
pub const LIBPERL_KL_K1: i32 = 0;
pub const LIBPERL_KL_K2: i32 = 1;
pub const LIBPERL_KL_K3: i32 = 2;
pub const LIBPERL_KL_IN_REWARD: i32 = 0;
pub const LIBPERL_KL_IN_LOSS: i32 = 1;
pub const LIBPERL_NORM_TOKEN: i32 = 0;
pub const LIBPERL_NORM_SEQUENCE: i32 = 1;

// ---- opaque handles ------------------------------------------------------------------

#[repr(C)]
pub struct perl_model {
    _private: [u8; 0],
}
#[repr(C)]
pub struct perl_lora {
    _private: [u8; 0],
}
#[repr(C)]
pub struct perl_reward {
    _private: [u8; 0],
}
#[repr(C)]
pub struct perl_policy_trainer {
    _private: [u8; 0],
}

// ---- structs -------------------------------------------------------------------------

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_model_config {
    pub struct_size: usize,
    pub dim: i32,
    pub hidden_dim: i32,
    pub n_layers: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub vocab_size: i32,
    pub max_seq_len: i32,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub tied_embeddings: i32,
    pub qkv_bias: i32,
    pub rope_interleaved: i32,
    pub bos_token_id: i32,
    pub eos_token_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct perl_batch {
    pub struct_size: usize,
    pub batch_size: i32,
    pub seq_len: i32,
    pub tokens: *const i32,
    pub lengths: *const i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_lora_options {
    pub struct_size: usize,
    pub mode: i32,
    pub rank: i32,
    pub alpha: f32,
    pub dropout: f32,
    pub target_modules: u32,
    pub use_rslora: i32,
    pub init: i32,
    pub seed: u64,
    pub train_embeddings: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_optim_options {
    pub struct_size: usize,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    pub schedule: i32,
    pub warmup_steps: i32,
    pub total_steps: i32,
    pub min_lr_ratio: f32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_step_stats {
    pub struct_size: usize,
    pub loss: f32,
    pub grad_norm: f32,
    pub lr: f32,
    pub step: i64,
    pub n_tokens: i64,
    pub accuracy: f32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct perl_generate_options {
    pub struct_size: usize,
    pub max_new_tokens: i32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u64,
    pub stop_tokens: *const i32,
    pub n_stop_tokens: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_reward_options {
    pub struct_size: usize,
    pub objective: i32,
    pub center_coef: f32,
    pub pos_weight: f32,
    pub neg_weight: f32,
    pub head_init_std: f32,
    pub seed: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_reward_stats {
    pub struct_size: usize,
    pub loss: f32,
    pub accuracy: f32,
    pub mean_margin: f32,
    pub grad_norm: f32,
    pub lr: f32,
    pub step: i64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_policy_options {
    pub struct_size: usize,
    pub algorithm: i32,
    pub group_size: i32,
    pub baseline_decay: f32,
    pub kl_coef: f32,
    pub kl_estimator: i32,
    pub kl_mode: i32,
    pub kl_target: f32,
    pub kl_horizon: f32,
    pub entropy_coef: f32,
    pub whiten_advantages: i32,
    pub loss_norm: i32,
    pub clip_eps: f32,
    pub ppo_epochs: i32,
    pub ppo_minibatches: i32,
    pub gamma: f32,
    pub lambda: f32,
    pub value_coef: f32,
    pub value_clip: f32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct perl_policy_stats {
    pub struct_size: usize,
    pub loss: f32,
    pub mean_reward: f32,
    pub std_reward: f32,
    pub kl: f32,
    pub entropy: f32,
    pub response_length: f32,
    pub clip_fraction: f32,
    pub value_loss: f32,
    pub grad_norm: f32,
    pub lr: f32,
    pub kl_coef: f32,
    pub step: i64,
}

/// `typedef int (*perl_grad_hook)(float *grads, size_t count, void *user);`
pub type perl_grad_hook = Option<unsafe extern "C" fn(grads: *mut f32, count: usize, user: *mut c_void) -> c_int>;

extern "C" {
    // 1. version
    pub fn perl_version() -> *const c_char;
    pub fn perl_version_number() -> c_uint;
    // 2. errors
    pub fn perl_status_str(status: c_int) -> *const c_char;
    pub fn perl_last_error() -> *const c_char;
    pub fn perl_clear_error();
    // 3. threads
    pub fn perl_set_num_threads(n: c_int) -> c_int;
    pub fn perl_get_num_threads() -> c_int;
    // 4. model
    pub fn perl_model_config_init(cfg: *mut perl_model_config);
    pub fn perl_model_load(out: *mut *mut perl_model, path: *const c_char) -> c_int;
    pub fn perl_model_create_random(out: *mut *mut perl_model, cfg: *const perl_model_config, seed: u64) -> c_int;
    pub fn perl_model_save_hf(model: *const perl_model, dir: *const c_char) -> c_int;
    pub fn perl_model_free(model: *mut perl_model);
    pub fn perl_model_get_config(model: *const perl_model, out: *mut perl_model_config) -> c_int;
    pub fn perl_model_num_params(model: *const perl_model) -> usize;
    pub fn perl_batch_init(batch: *mut perl_batch);
    pub fn perl_model_forward(
        model: *const perl_model,
        adapter: *const perl_lora,
        batch: *const perl_batch,
        logits: *mut f32,
        hidden: *mut f32,
    ) -> c_int;
    pub fn perl_model_token_logprobs(
        model: *const perl_model,
        adapter: *const perl_lora,
        batch: *const perl_batch,
        out: *mut f32,
    ) -> c_int;
    // 5. lora
    pub fn perl_lora_options_init(opts: *mut perl_lora_options);
    pub fn perl_lora_create(out: *mut *mut perl_lora, model: *mut perl_model, opts: *const perl_lora_options) -> c_int;
    pub fn perl_lora_free(lora: *mut perl_lora);
    pub fn perl_lora_num_params(lora: *const perl_lora) -> usize;
    pub fn perl_lora_params(
        lora: *mut perl_lora,
        out_params: *mut *mut f32,
        out_grads: *mut *mut f32,
        out_count: *mut usize,
    ) -> c_int;
    pub fn perl_lora_save(lora: *const perl_lora, dir: *const c_char) -> c_int;
    pub fn perl_lora_load(out: *mut *mut perl_lora, model: *mut perl_model, dir: *const c_char) -> c_int;
    pub fn perl_lora_merge(out: *mut *mut perl_model, lora: *const perl_lora) -> c_int;
    pub fn perl_optim_options_init(opts: *mut perl_optim_options);
    pub fn perl_lora_set_optimizer(lora: *mut perl_lora, opts: *const perl_optim_options) -> c_int;
    pub fn perl_lora_set_lr(lora: *mut perl_lora, lr: f32) -> c_int;
    pub fn perl_lora_set_grad_hook(lora: *mut perl_lora, hook: perl_grad_hook, user: *mut c_void) -> c_int;
    pub fn perl_lora_set_recompute(lora: *mut perl_lora, enabled: c_int) -> c_int;
    pub fn perl_step_stats_init(stats: *mut perl_step_stats);
    pub fn perl_lora_zero_grad(lora: *mut perl_lora) -> c_int;
    pub fn perl_lora_sft_backward(
        lora: *mut perl_lora,
        batch: *const perl_batch,
        loss_mask: *const u8,
        out_stats: *mut perl_step_stats,
    ) -> c_int;
    pub fn perl_lora_optimizer_step(lora: *mut perl_lora, out_stats: *mut perl_step_stats) -> c_int;
    pub fn perl_lora_sft_step(
        lora: *mut perl_lora,
        batch: *const perl_batch,
        loss_mask: *const u8,
        out_stats: *mut perl_step_stats,
    ) -> c_int;
    pub fn perl_lora_save_state(lora: *const perl_lora, path: *const c_char) -> c_int;
    pub fn perl_lora_load_state(lora: *mut perl_lora, path: *const c_char) -> c_int;
    // 6. generation
    pub fn perl_generate_options_init(opts: *mut perl_generate_options);
    pub fn perl_generate(
        model: *const perl_model,
        adapter: *const perl_lora,
        prompts: *const perl_batch,
        opts: *const perl_generate_options,
        out_tokens: *mut i32,
        out_lengths: *mut i32,
        out_logprobs: *mut f32,
    ) -> c_int;
    // 7. reward
    pub fn perl_reward_options_init(opts: *mut perl_reward_options);
    pub fn perl_reward_create(
        out: *mut *mut perl_reward,
        model: *mut perl_model,
        lora: *mut perl_lora,
        opts: *const perl_reward_options,
    ) -> c_int;
    pub fn perl_reward_free(reward: *mut perl_reward);
    pub fn perl_reward_stats_init(stats: *mut perl_reward_stats);
    pub fn perl_reward_step_pairwise(
        reward: *mut perl_reward,
        chosen: *const perl_batch,
        rejected: *const perl_batch,
        margins: *const f32,
        out_chosen: *mut f32,
        out_rejected: *mut f32,
        out_stats: *mut perl_reward_stats,
    ) -> c_int;
    pub fn perl_reward_step_pointwise(
        reward: *mut perl_reward,
        batch: *const perl_batch,
        labels: *const f32,
        out_scores: *mut f32,
        out_stats: *mut perl_reward_stats,
    ) -> c_int;
    pub fn perl_reward_score(reward: *mut perl_reward, batch: *const perl_batch, out_scores: *mut f32) -> c_int;
    pub fn perl_reward_load(
        out: *mut *mut perl_reward,
        out_lora: *mut *mut perl_lora,
        model: *mut perl_model,
        dir: *const c_char,
        opts: *const perl_reward_options,
    ) -> c_int;
    // 8. policy
    pub fn perl_policy_options_init(opts: *mut perl_policy_options);
    pub fn perl_policy_create(
        out: *mut *mut perl_policy_trainer,
        model: *mut perl_model,
        policy: *mut perl_lora,
        value: *mut perl_lora,
        opts: *const perl_policy_options,
    ) -> c_int;
    pub fn perl_policy_free(trainer: *mut perl_policy_trainer);
    pub fn perl_policy_stats_init(stats: *mut perl_policy_stats);
    pub fn perl_policy_step(
        trainer: *mut perl_policy_trainer,
        prompts: *const perl_batch,
        responses: *const i32,
        response_lengths: *const i32,
        max_response_len: i32,
        rewards: *const f32,
        old_logprobs: *const f32,
        out_stats: *mut perl_policy_stats,
    ) -> c_int;
    pub fn perl_policy_save(trainer: *const perl_policy_trainer, dir: *const c_char) -> c_int;
    pub fn perl_policy_load(trainer: *mut perl_policy_trainer, dir: *const c_char) -> c_int;
}
