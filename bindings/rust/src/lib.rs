//! Safe Rust bindings to libperl: LoRA adapters on a frozen Llama base,
//! trained as reward models and as RL policies.
//!
//! ```no_run
//! use libperl::{Batch, Lora, LoraOptions, Model, ModelConfig, Reward, RewardOptions};
//!
//! # fn main() -> libperl::Result<()> {
//! let model = Model::random(&ModelConfig { vocab_size: 64, ..Default::default() }, 1)?;
//! let mut lora = Lora::new(&model, &LoraOptions { rank: 4, ..Default::default() })?;
//! let mut reward = Reward::new(&model, &mut lora, &RewardOptions::default())?;
//! let chosen = Batch::new(&[1, 5, 6, 7], 1, 4)?;
//! let rejected = Batch::new(&[1, 50, 51, 52], 1, 4)?;
//! let step = reward.step_pairwise(&chosen, &rejected, None)?;
//! println!("loss {}", step.stats.loss);
//! # Ok(()) }
//! ```
//!
//! Ownership follows the C library's rules, enforced by the borrow checker:
//! a [`Lora`] borrows its [`Model`] (`Lora<'m>`), a [`Reward`] and a
//! [`PolicyTrainer`] borrow the model and mutably borrow their adapters, and
//! every handle is freed by `Drop`, dependents first.  A model cannot be
//! dropped while an adapter uses it:
//!
//! ```compile_fail,E0505
//! use libperl::{Lora, LoraOptions, Model, ModelConfig};
//! let model = Model::random(&ModelConfig::default(), 1).unwrap();
//! let lora = Lora::new(&model, &LoraOptions::default()).unwrap();
//! drop(model); // error[E0505]: cannot move out of `model` because it is borrowed
//! lora.num_params();
//! ```
//!
//! Errors are [`Error`] values carrying the status code and the library's
//! `perl_last_error()` message.
#![warn(missing_docs)]

pub mod sys;

use std::ffi::{CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::os::raw::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::{self, NonNull};

// ---- option and statistics structs: the C structs, with Default = *_init --------------

/// Architecture of a Llama-family model (`perl_model_config`).
pub type ModelConfig = sys::perl_model_config;
/// Adapter options (`perl_lora_options`).
pub type LoraOptions = sys::perl_lora_options;
/// AdamW options (`perl_optim_options`).
pub type OptimOptions = sys::perl_optim_options;
/// Statistics of an SFT / optimizer step (`perl_step_stats`).
pub type StepStats = sys::perl_step_stats;
/// Reward-model options (`perl_reward_options`).
pub type RewardOptions = sys::perl_reward_options;
/// Statistics of a reward-model step (`perl_reward_stats`).
pub type RewardStats = sys::perl_reward_stats;
/// Policy-trainer options (`perl_policy_options`).
pub type PolicyOptions = sys::perl_policy_options;
/// Statistics of an RL step (`perl_policy_stats`).
pub type PolicyStats = sys::perl_policy_stats;

macro_rules! default_from_init {
    ($($ty:ty => $init:ident),* $(,)?) => {$(
        impl Default for $ty {
            /// The library's defaults, `struct_size` set (the matching `*_init` function).
            fn default() -> Self {
                let mut s = std::mem::MaybeUninit::<$ty>::zeroed();
                // SAFETY: the init function writes every field of the struct.
                unsafe {
                    sys::$init(s.as_mut_ptr());
                    s.assume_init()
                }
            }
        }
    )*};
}

default_from_init! {
    sys::perl_model_config => perl_model_config_init,
    sys::perl_lora_options => perl_lora_options_init,
    sys::perl_optim_options => perl_optim_options_init,
    sys::perl_step_stats => perl_step_stats_init,
    sys::perl_reward_options => perl_reward_options_init,
    sys::perl_reward_stats => perl_reward_stats_init,
    sys::perl_policy_options => perl_policy_options_init,
    sys::perl_policy_stats => perl_policy_stats_init,
}

/// Target-module flags for [`LoraOptions::target_modules`].
pub mod target {
    pub use crate::sys::{
        LIBPERL_TARGET_ALL as ALL, LIBPERL_TARGET_ATTENTION as ATTENTION, LIBPERL_TARGET_DOWN as DOWN,
        LIBPERL_TARGET_GATE as GATE, LIBPERL_TARGET_K as K, LIBPERL_TARGET_O as O, LIBPERL_TARGET_Q as Q,
        LIBPERL_TARGET_UP as UP, LIBPERL_TARGET_V as V,
    };
}

/// Policy-gradient algorithms for [`PolicyOptions::algorithm`].
pub mod algorithm {
    pub use crate::sys::{
        LIBPERL_PG_GRPO as GRPO, LIBPERL_PG_PPO as PPO, LIBPERL_PG_REINFORCE as REINFORCE, LIBPERL_PG_RLOO as RLOO,
    };
}

pub use sys::{
    LIBPERL_KL_IN_LOSS, LIBPERL_KL_IN_REWARD, LIBPERL_KL_K1, LIBPERL_KL_K2, LIBPERL_KL_K3, LIBPERL_LORA_INIT_GAUSSIAN,
    LIBPERL_LORA_INIT_KAIMING, LIBPERL_LR_CONSTANT, LIBPERL_LR_COSINE, LIBPERL_LR_LINEAR, LIBPERL_MODE_FULL,
    LIBPERL_MODE_LORA, LIBPERL_NORM_SEQUENCE, LIBPERL_NORM_TOKEN, LIBPERL_REWARD_PAIRWISE, LIBPERL_REWARD_POINTWISE,
};

// ---- errors ------------------------------------------------------------------------------

/// A libperl status code (`perl_status`); values never change between releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub i32);

impl Status {
    /// NULL pointer, bad size, bad option value.
    pub const INVALID_ARGUMENT: Status = Status(sys::LIBPERL_ERR_INVALID_ARGUMENT);
    /// An allocation failed.
    pub const OUT_OF_MEMORY: Status = Status(sys::LIBPERL_ERR_OUT_OF_MEMORY);
    /// open/read/write failed.
    pub const IO: Status = Status(sys::LIBPERL_ERR_IO);
    /// A malformed file.
    pub const FORMAT: Status = Status(sys::LIBPERL_ERR_FORMAT);
    /// A valid but unsupported feature.
    pub const UNSUPPORTED: Status = Status(sys::LIBPERL_ERR_UNSUPPORTED);
    /// Shapes or configs do not match.
    pub const SHAPE: Status = Status(sys::LIBPERL_ERR_SHAPE);
    /// A token id, length or index out of range.
    pub const RANGE: Status = Status(sys::LIBPERL_ERR_RANGE);
    /// NaN or Inf in inputs, loss or gradients.
    pub const NUMERIC: Status = Status(sys::LIBPERL_ERR_NUMERIC);
    /// The call is not valid in the object's state.
    pub const STATE: Status = Status(sys::LIBPERL_ERR_STATE);
    /// A host callback (the gradient hook) failed.
    pub const CALLBACK: Status = Status(sys::LIBPERL_ERR_CALLBACK);
    /// A bug in libperl.
    pub const INTERNAL: Status = Status(sys::LIBPERL_ERR_INTERNAL);

    /// The C enumerator's name, e.g. `"LIBPERL_ERR_SHAPE"`.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "LIBPERL_OK",
            -1 => "LIBPERL_ERR_INVALID_ARGUMENT",
            -2 => "LIBPERL_ERR_OUT_OF_MEMORY",
            -3 => "LIBPERL_ERR_IO",
            -4 => "LIBPERL_ERR_FORMAT",
            -5 => "LIBPERL_ERR_UNSUPPORTED",
            -6 => "LIBPERL_ERR_SHAPE",
            -7 => "LIBPERL_ERR_RANGE",
            -8 => "LIBPERL_ERR_NUMERIC",
            -9 => "LIBPERL_ERR_STATE",
            -10 => "LIBPERL_ERR_CALLBACK",
            -11 => "LIBPERL_ERR_INTERNAL",
            _ => "LIBPERL_ERR_UNKNOWN",
        }
    }

    /// The library's static text for the status (`perl_status_str`).
    pub fn description(self) -> &'static str {
        // SAFETY: perl_status_str returns a static NUL-terminated string, never NULL.
        unsafe { CStr::from_ptr(sys::perl_status_str(self.0)) }.to_str().unwrap_or("?")
    }
}

/// A failed libperl call: the status and the library's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
    function: &'static str,
}

impl Error {
    /// The status code.
    pub fn status(&self) -> Status {
        self.status
    }
    /// What exactly was wrong (the calling thread's `perl_last_error()`).
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The C function (or wrapper check) that failed.
    pub fn function(&self) -> &'static str {
        self.function
    }
    fn invalid(function: &'static str, message: String) -> Error {
        Error { status: Status::INVALID_ARGUMENT, message, function }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({}): {}", self.function, self.status.description(), self.status.name(), self.message)
    }
}

impl std::error::Error for Error {}

/// `Result<T, libperl::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

fn check(rc: c_int, function: &'static str) -> Result<()> {
    if rc == sys::LIBPERL_OK {
        return Ok(());
    }
    // SAFETY: perl_last_error never returns NULL; the text is copied before any other call.
    let message = unsafe { CStr::from_ptr(sys::perl_last_error()) }.to_string_lossy().into_owned();
    Err(Error { status: Status(rc), message, function })
}

fn path_cstring(path: &Path, function: &'static str) -> Result<CString> {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().into_owned().into_bytes();
    CString::new(bytes).map_err(|_| Error::invalid(function, format!("path {:?} contains a NUL byte", path)))
}

fn expect_len(function: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(function, format!("{what} has {got} elements, expected {want}")))
    }
}

// ---- library-wide ----------------------------------------------------------------------

/// The library's version, e.g. `"0.1.0"`.
pub fn version() -> &'static str {
    // SAFETY: a static string.
    unsafe { CStr::from_ptr(sys::perl_version()) }.to_str().unwrap_or("?")
}

/// The library's `LIBPERL_VERSION_NUMBER` (major * 10000 + minor * 100 + patch).
pub fn version_number() -> u32 {
    // SAFETY: no arguments.
    unsafe { sys::perl_version_number() }
}

/// Threads for libperl and its BLAS (`n <= 0`: every CPU).  Process-wide.
pub fn set_num_threads(n: i32) -> Result<()> {
    // SAFETY: no pointers.
    check(unsafe { sys::perl_set_num_threads(n) }, "perl_set_num_threads")
}

/// The current thread count.
pub fn num_threads() -> i32 {
    // SAFETY: no arguments.
    unsafe { sys::perl_get_num_threads() }
}

// ---- batches ---------------------------------------------------------------------------

/// A borrowed batch of right-padded token rows `[batch_size, seq_len]` (`perl_batch`).
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    raw: sys::perl_batch,
    _data: PhantomData<&'a [i32]>,
}

impl<'a> Batch<'a> {
    /// `tokens` row-major `[batch_size, seq_len]`; every row is `seq_len` long
    /// unless [`Batch::with_lengths`] says otherwise.
    pub fn new(tokens: &'a [i32], batch_size: usize, seq_len: usize) -> Result<Batch<'a>> {
        expect_len("Batch::new", "tokens", tokens.len(), batch_size * seq_len)?;
        if batch_size > i32::MAX as usize || seq_len > i32::MAX as usize {
            return Err(Error::invalid("Batch::new", "batch too large".into()));
        }
        let mut raw = sys::perl_batch {
            struct_size: 0,
            batch_size: 0,
            seq_len: 0,
            tokens: ptr::null(),
            lengths: ptr::null(),
        };
        // SAFETY: raw is a valid perl_batch.
        unsafe { sys::perl_batch_init(&mut raw) };
        raw.batch_size = batch_size as i32;
        raw.seq_len = seq_len as i32;
        raw.tokens = tokens.as_ptr();
        Ok(Batch { raw, _data: PhantomData })
    }

    /// Real tokens per row (`1..=seq_len`); the rest of each row is padding.
    pub fn with_lengths(mut self, lengths: &'a [i32]) -> Result<Batch<'a>> {
        expect_len("Batch::with_lengths", "lengths", lengths.len(), self.rows())?;
        self.raw.lengths = lengths.as_ptr();
        Ok(self)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.raw.batch_size as usize
    }

    /// Padded row length.
    pub fn seq_len(&self) -> usize {
        self.raw.seq_len as usize
    }

    /// The raw struct (pointers valid for `'a`).
    pub fn as_raw(&self) -> &sys::perl_batch {
        &self.raw
    }
}

/// Owned, right-padded token rows built from ragged sequences: `Padded::new(&[vec![1, 2], vec![3]])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Padded {
    /// `[rows, seq_len]` row-major, padded with `pad_id`.
    pub tokens: Vec<i32>,
    /// Real length of each row.
    pub lengths: Vec<i32>,
    /// The padded width.
    pub seq_len: usize,
}

impl Padded {
    /// Pads with token 0.
    pub fn new<S: AsRef<[i32]>>(rows: &[S]) -> Padded {
        Padded::with_pad(rows, 0)
    }
    /// Pads with `pad_id`.
    pub fn with_pad<S: AsRef<[i32]>>(rows: &[S], pad_id: i32) -> Padded {
        let seq_len = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows.len() * seq_len);
        let mut lengths = Vec::with_capacity(rows.len());
        for r in rows {
            let r = r.as_ref();
            tokens.extend_from_slice(r);
            tokens.extend(std::iter::repeat(pad_id).take(seq_len - r.len()));
            lengths.push(r.len() as i32);
        }
        Padded { tokens, lengths, seq_len }
    }
    /// A [`Batch`] over these rows.
    pub fn batch(&self) -> Result<Batch<'_>> {
        Batch::new(&self.tokens, self.lengths.len(), self.seq_len)?.with_lengths(&self.lengths)
    }
}

// ---- perl_model ------------------------------------------------------------------------

/// A frozen base model (`perl_model`).  Shareable read-only across threads.
pub struct Model {
    raw: NonNull<sys::perl_model>,
}

// SAFETY: the C library documents a perl_model as safe to share read-only between threads;
// every method here takes &self and only reads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// Sampling settings for [`Model::generate`] (`perl_generate_options` without the stop-token pointer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// New tokens per row (>= 1).
    pub max_new_tokens: i32,
    /// 0: greedy; > 0: sample.
    pub temperature: f32,
    /// 0: off.
    pub top_k: i32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// The same seed gives the same samples.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        let mut raw = std::mem::MaybeUninit::<sys::perl_generate_options>::zeroed();
        // SAFETY: the init function writes every field.
        let raw = unsafe {
            sys::perl_generate_options_init(raw.as_mut_ptr());
            raw.assume_init()
        };
        GenerateOptions {
            max_new_tokens: raw.max_new_tokens,
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
            min_p: raw.min_p,
            seed: raw.seed,
        }
    }
}

/// The output of [`Model::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// `[rows, max_new_tokens]`, padded with -1.
    pub tokens: Vec<i32>,
    /// New tokens per row.
    pub lengths: Vec<i32>,
    /// `[rows, max_new_tokens]` log-probabilities of the sampled tokens.
    pub logprobs: Vec<f32>,
    /// The row stride of `tokens` and `logprobs`.
    pub max_new_tokens: usize,
}

impl Generation {
    /// The sampled tokens of one row (without padding).
    pub fn response(&self, row: usize) -> &[i32] {
        let start = row * self.max_new_tokens;
        &self.tokens[start..start + self.lengths[row] as usize]
    }
}

fn adapter_ptr(adapter: Option<&Lora<'_>>) -> *const sys::perl_lora {
    adapter.map_or(ptr::null(), |a| a.raw.as_ptr() as *const _)
}

impl Model {
    fn from_raw(raw: *mut sys::perl_model, function: &'static str) -> Result<Model> {
        NonNull::new(raw)
            .map(|raw| Model { raw })
            .ok_or_else(|| Error { status: Status::INTERNAL, message: "returned NULL".into(), function })
    }

    /// Loads a Hugging Face directory or a llama2.c checkpoint file.
    pub fn load<P: AsRef<Path>>(path: P) -> Result<Model> {
        let c = path_cstring(path.as_ref(), "perl_model_load")?;
        let mut out = ptr::null_mut();
        // SAFETY: valid out pointer and NUL-terminated path.
        check(unsafe { sys::perl_model_load(&mut out, c.as_ptr()) }, "perl_model_load")?;
        Model::from_raw(out, "perl_model_load")
    }

    /// A model with random weights from `seed`.
    pub fn random(config: &ModelConfig, seed: u64) -> Result<Model> {
        let mut cfg = *config;
        cfg.struct_size = std::mem::size_of::<ModelConfig>();
        let mut out = ptr::null_mut();
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_model_create_random(&mut out, &cfg, seed) }, "perl_model_create_random")?;
        Model::from_raw(out, "perl_model_create_random")
    }

    /// The raw handle (still owned by this object).
    pub fn as_ptr(&self) -> *mut sys::perl_model {
        self.raw.as_ptr()
    }

    /// The architecture.
    pub fn config(&self) -> ModelConfig {
        let mut cfg = ModelConfig::default();
        // SAFETY: a live model and an initialised config; cannot fail for those.
        let rc = unsafe { sys::perl_model_get_config(self.raw.as_ptr(), &mut cfg) };
        debug_assert_eq!(rc, 0);
        cfg
    }

    /// Parameters of the base model.
    pub fn num_params(&self) -> usize {
        // SAFETY: a live model.
        unsafe { sys::perl_model_num_params(self.raw.as_ptr()) }
    }

    /// Writes the model in Hugging Face layout into `dir`.
    pub fn save_hf<P: AsRef<Path>>(&self, dir: P) -> Result<()> {
        let c = path_cstring(dir.as_ref(), "perl_model_save_hf")?;
        // SAFETY: a live model, a C string.
        check(unsafe { sys::perl_model_save_hf(self.raw.as_ptr(), c.as_ptr()) }, "perl_model_save_hf")
    }

    /// Logits `[rows, seq_len, vocab]` of a batch, through `adapter` (None: the base).
    pub fn forward(&self, adapter: Option<&Lora<'_>>, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let n = batch.rows() * batch.seq_len() * self.config().vocab_size as usize;
        let mut logits = vec![0.0f32; n];
        self.forward_into(adapter, batch, Some(&mut logits), None)?;
        Ok(logits)
    }

    /// The forward pass into caller buffers: logits `[rows, seq_len, vocab]`
    /// and/or final hidden states `[rows, seq_len, dim]`.
    pub fn forward_into(
        &self,
        adapter: Option<&Lora<'_>>,
        batch: &Batch<'_>,
        logits: Option<&mut [f32]>,
        hidden: Option<&mut [f32]>,
    ) -> Result<()> {
        let cfg = self.config();
        let positions = batch.rows() * batch.seq_len();
        if let Some(l) = &logits {
            expect_len("perl_model_forward", "logits", l.len(), positions * cfg.vocab_size as usize)?;
        }
        if let Some(h) = &hidden {
            expect_len("perl_model_forward", "hidden", h.len(), positions * cfg.dim as usize)?;
        }
        let lp = logits.map_or(ptr::null_mut(), |l| l.as_mut_ptr());
        let hp = hidden.map_or(ptr::null_mut(), |h| h.as_mut_ptr());
        // SAFETY: buffers sized above; the batch's pointers live for its lifetime.
        check(
            unsafe { sys::perl_model_forward(self.raw.as_ptr(), adapter_ptr(adapter), &batch.raw, lp, hp) },
            "perl_model_forward",
        )
    }

    /// `out[b, t] = log p(tokens[b, t+1] | tokens[b, ..=t])`, `[rows, seq_len]`.
    pub fn token_logprobs(&self, adapter: Option<&Lora<'_>>, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; batch.rows() * batch.seq_len()];
        // SAFETY: out sized [rows, seq_len].
        check(
            unsafe {
                sys::perl_model_token_logprobs(self.raw.as_ptr(), adapter_ptr(adapter), &batch.raw, out.as_mut_ptr())
            },
            "perl_model_token_logprobs",
        )?;
        Ok(out)
    }

    /// Samples continuations of `prompts` (a row stops after any of `stop_tokens`).
    pub fn generate(
        &self,
        adapter: Option<&Lora<'_>>,
        prompts: &Batch<'_>,
        options: &GenerateOptions,
        stop_tokens: &[i32],
    ) -> Result<Generation> {
        if options.max_new_tokens < 1 {
            return Err(Error::invalid("perl_generate", "max_new_tokens must be >= 1".into()));
        }
        let mut raw = std::mem::MaybeUninit::<sys::perl_generate_options>::zeroed();
        // SAFETY: the init function writes every field.
        let mut raw = unsafe {
            sys::perl_generate_options_init(raw.as_mut_ptr());
            raw.assume_init()
        };
        raw.max_new_tokens = options.max_new_tokens;
        raw.temperature = options.temperature;
        raw.top_k = options.top_k;
        raw.top_p = options.top_p;
        raw.min_p = options.min_p;
        raw.seed = options.seed;
        raw.stop_tokens = if stop_tokens.is_empty() { ptr::null() } else { stop_tokens.as_ptr() };
        raw.n_stop_tokens = stop_tokens.len() as i32;
        let m = options.max_new_tokens as usize;
        let rows = prompts.rows();
        let mut out = Generation {
            tokens: vec![0; rows * m],
            lengths: vec![0; rows],
            logprobs: vec![0.0; rows * m],
            max_new_tokens: m,
        };
        // SAFETY: outputs sized [rows, m] and [rows]; stop_tokens outlives the call.
        check(
            unsafe {
                sys::perl_generate(
                    self.raw.as_ptr(),
                    adapter_ptr(adapter),
                    &prompts.raw,
                    &raw,
                    out.tokens.as_mut_ptr(),
                    out.lengths.as_mut_ptr(),
                    out.logprobs.as_mut_ptr(),
                )
            },
            "perl_generate",
        )?;
        Ok(out)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: owned handle; every borrower (Lora<'m> etc.) is gone, as the borrow checker proves.
        unsafe { sys::perl_model_free(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        f.debug_struct("Model")
            .field("dim", &c.dim)
            .field("n_layers", &c.n_layers)
            .field("vocab_size", &c.vocab_size)
            .field("num_params", &self.num_params())
            .finish()
    }
}

// ---- perl_lora ---------------------------------------------------------------------------

/// A LoRA (or full fine-tuning) adapter on a [`Model`] that it borrows for `'m`.
pub struct Lora<'m> {
    raw: NonNull<sys::perl_lora>,
    hook: Option<Box<dyn Send + 'm>>,
    _model: PhantomData<&'m Model>,
}

// SAFETY: an adapter is used by one thread at a time (&mut for every mutation); the hook is Send.
unsafe impl Send for Lora<'_> {}

unsafe extern "C" fn grad_hook_trampoline<F>(grads: *mut f32, count: usize, user: *mut c_void) -> c_int
where
    F: FnMut(&mut [f32]) -> bool,
{
    // SAFETY: user is the Box<F> installed by set_grad_hook, alive while installed;
    // grads points at `count` floats owned by the adapter for the duration of the call.
    let f = unsafe { &mut *(user as *mut F) };
    let slice: &mut [f32] = if count == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(grads, count) } };
    // A panic must not unwind into C: report it as a hook failure.
    match catch_unwind(AssertUnwindSafe(|| f(slice))) {
        Ok(true) => 0,
        _ => 1,
    }
}

impl<'m> Lora<'m> {
    fn from_raw(raw: *mut sys::perl_lora, function: &'static str) -> Result<Lora<'m>> {
        NonNull::new(raw)
            .map(|raw| Lora { raw, hook: None, _model: PhantomData })
            .ok_or_else(|| Error { status: Status::INTERNAL, message: "returned NULL".into(), function })
    }

    /// Creates an adapter on `model`.
    pub fn new(model: &'m Model, options: &LoraOptions) -> Result<Lora<'m>> {
        let mut opts = *options;
        opts.struct_size = std::mem::size_of::<LoraOptions>();
        let mut out = ptr::null_mut();
        // SAFETY: valid pointers; the model outlives the adapter ('m).
        check(unsafe { sys::perl_lora_create(&mut out, model.raw.as_ptr(), &opts) }, "perl_lora_create")?;
        Lora::from_raw(out, "perl_lora_create")
    }

    /// Loads a PEFT-layout adapter directory for `model`.
    pub fn load<P: AsRef<Path>>(model: &'m Model, dir: P) -> Result<Lora<'m>> {
        let c = path_cstring(dir.as_ref(), "perl_lora_load")?;
        let mut out = ptr::null_mut();
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_lora_load(&mut out, model.raw.as_ptr(), c.as_ptr()) }, "perl_lora_load")?;
        Lora::from_raw(out, "perl_lora_load")
    }

    /// The raw handle (still owned by this object).
    pub fn as_ptr(&self) -> *mut sys::perl_lora {
        self.raw.as_ptr()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        // SAFETY: a live adapter.
        unsafe { sys::perl_lora_num_params(self.raw.as_ptr()) }
    }

    fn raw_views(&self) -> (*mut f32, *mut f32, usize) {
        let (mut p, mut g, mut n) = (ptr::null_mut(), ptr::null_mut(), 0usize);
        // SAFETY: a live adapter, valid out pointers; cannot fail for those.
        let rc = unsafe { sys::perl_lora_params(self.raw.as_ptr(), &mut p, &mut g, &mut n) };
        debug_assert_eq!(rc, 0);
        (p, g, n)
    }

    /// The trainable parameters, one contiguous block (layout stable for the handle's life).
    pub fn params(&self) -> &[f32] {
        let (p, _, n) = self.raw_views();
        // SAFETY: n floats owned by the adapter, borrowed as long as &self.
        if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(p, n) } }
    }

    /// The parameters, writable (e.g. to broadcast weights across ranks).
    pub fn params_mut(&mut self) -> &mut [f32] {
        let (p, _, n) = self.raw_views();
        // SAFETY: as params(), exclusively borrowed.
        if n == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(p, n) } }
    }

    /// The accumulated gradients (same layout as the parameters).
    pub fn grads(&self) -> &[f32] {
        let (_, g, n) = self.raw_views();
        // SAFETY: as params().
        if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(g, n) } }
    }

    /// Parameters and gradients, both writable.
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        let (p, g, n) = self.raw_views();
        if n == 0 {
            return (&mut [], &mut []);
        }
        // SAFETY: two disjoint blocks of n floats, exclusively borrowed.
        unsafe { (std::slice::from_raw_parts_mut(p, n), std::slice::from_raw_parts_mut(g, n)) }
    }

    /// Saves in Hugging Face PEFT layout into `dir`.
    pub fn save<P: AsRef<Path>>(&self, dir: P) -> Result<()> {
        let c = path_cstring(dir.as_ref(), "perl_lora_save")?;
        // SAFETY: a live adapter, a C string.
        check(unsafe { sys::perl_lora_save(self.raw.as_ptr(), c.as_ptr()) }, "perl_lora_save")
    }

    /// A new, independent model with the adapter merged in (W + scale B A).
    pub fn merge(&self) -> Result<Model> {
        let mut out = ptr::null_mut();
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_lora_merge(&mut out, self.raw.as_ptr()) }, "perl_lora_merge")?;
        Model::from_raw(out, "perl_lora_merge")
    }

    /// Sets the AdamW optimizer.
    pub fn set_optimizer(&mut self, options: &OptimOptions) -> Result<()> {
        let mut o = *options;
        o.struct_size = std::mem::size_of::<OptimOptions>();
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_lora_set_optimizer(self.raw.as_ptr(), &o) }, "perl_lora_set_optimizer")
    }

    /// Overrides the learning rate (`lr < 0` restores the schedule).
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        // SAFETY: a live adapter.
        check(unsafe { sys::perl_lora_set_lr(self.raw.as_ptr(), lr) }, "perl_lora_set_lr")
    }

    /// Turns activation recomputation on or off.
    pub fn set_recompute(&mut self, enabled: bool) -> Result<()> {
        // SAFETY: a live adapter.
        check(unsafe { sys::perl_lora_set_recompute(self.raw.as_ptr(), enabled as c_int) }, "perl_lora_set_recompute")
    }

    /// Installs a gradient hook, called between backward and the update with
    /// the whole gradient (e.g. to all-reduce it).  Returning `false` (or
    /// panicking) aborts the step with [`Status::CALLBACK`], parameters unchanged.
    pub fn set_grad_hook<F>(&mut self, hook: F) -> Result<()>
    where
        F: FnMut(&mut [f32]) -> bool + Send + 'm,
    {
        let mut boxed = Box::new(hook);
        let user = &mut *boxed as *mut F as *mut c_void;
        // SAFETY: the box is kept in self.hook (its heap address is stable) until replaced or dropped,
        // and the C side is told to forget it first in either case.
        check(
            unsafe { sys::perl_lora_set_grad_hook(self.raw.as_ptr(), Some(grad_hook_trampoline::<F>), user) },
            "perl_lora_set_grad_hook",
        )?;
        self.hook = Some(boxed);
        Ok(())
    }

    /// Removes the gradient hook.
    pub fn clear_grad_hook(&mut self) -> Result<()> {
        // SAFETY: a live adapter.
        check(
            unsafe { sys::perl_lora_set_grad_hook(self.raw.as_ptr(), None, ptr::null_mut()) },
            "perl_lora_set_grad_hook",
        )?;
        self.hook = None;
        Ok(())
    }

    /// Zeroes the gradients.
    pub fn zero_grad(&mut self) -> Result<()> {
        // SAFETY: a live adapter.
        check(unsafe { sys::perl_lora_zero_grad(self.raw.as_ptr()) }, "perl_lora_zero_grad")
    }

    fn mask_ptr(batch: &Batch<'_>, loss_mask: Option<&[u8]>, function: &'static str) -> Result<*const u8> {
        match loss_mask {
            None => Ok(ptr::null()),
            Some(m) => {
                expect_len(function, "loss_mask", m.len(), batch.rows() * batch.seq_len())?;
                Ok(m.as_ptr())
            }
        }
    }

    /// Causal-LM loss and backward; gradients accumulate.
    pub fn sft_backward(&mut self, batch: &Batch<'_>, loss_mask: Option<&[u8]>) -> Result<StepStats> {
        let mask = Self::mask_ptr(batch, loss_mask, "perl_lora_sft_backward")?;
        let mut stats = StepStats::default();
        // SAFETY: valid pointers, mask sized [rows, seq_len].
        check(
            unsafe { sys::perl_lora_sft_backward(self.raw.as_ptr(), &batch.raw, mask, &mut stats) },
            "perl_lora_sft_backward",
        )?;
        Ok(stats)
    }

    /// Gradient hook, clipping, AdamW.
    pub fn optimizer_step(&mut self) -> Result<StepStats> {
        let mut stats = StepStats::default();
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_lora_optimizer_step(self.raw.as_ptr(), &mut stats) }, "perl_lora_optimizer_step")?;
        Ok(stats)
    }

    /// zero_grad + sft_backward + optimizer_step.
    pub fn sft_step(&mut self, batch: &Batch<'_>, loss_mask: Option<&[u8]>) -> Result<StepStats> {
        let mask = Self::mask_ptr(batch, loss_mask, "perl_lora_sft_step")?;
        let mut stats = StepStats::default();
        // SAFETY: valid pointers.
        check(
            unsafe { sys::perl_lora_sft_step(self.raw.as_ptr(), &batch.raw, mask, &mut stats) },
            "perl_lora_sft_step",
        )?;
        Ok(stats)
    }

    /// Saves the complete training state into one file.
    pub fn save_state<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        let c = path_cstring(path.as_ref(), "perl_lora_save_state")?;
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_lora_save_state(self.raw.as_ptr(), c.as_ptr()) }, "perl_lora_save_state")
    }

    /// Restores a state saved by [`Lora::save_state`].
    pub fn load_state<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        let c = path_cstring(path.as_ref(), "perl_lora_load_state")?;
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_lora_load_state(self.raw.as_ptr(), c.as_ptr()) }, "perl_lora_load_state")
    }
}

impl Drop for Lora<'_> {
    fn drop(&mut self) {
        // SAFETY: owned handle; rewards/trainers borrowing it are gone.  The hook box is
        // dropped after this, once the C object that could call it no longer exists.
        unsafe { sys::perl_lora_free(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Lora<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lora").field("num_params", &self.num_params()).field("hook", &self.hook.is_some()).finish()
    }
}

// ---- perl_reward -----------------------------------------------------------------------------

enum LoraSlot<'a, 'm> {
    Borrowed(&'a mut Lora<'m>),
    Owned(Lora<'m>),
}

/// A reward model: the frozen model, an adapter (borrowed, or owned after
/// [`Reward::load`]) and a scalar head (`perl_reward`).
pub struct Reward<'a, 'm> {
    raw: NonNull<sys::perl_reward>,
    lora: LoraSlot<'a, 'm>,
}

// SAFETY: used by one thread at a time; every call takes &mut self.
unsafe impl Send for Reward<'_, '_> {}

/// The result of [`Reward::step_pairwise`].
#[derive(Debug, Clone, PartialEq)]
pub struct PairwiseStep {
    /// Loss, accuracy, margin, ...
    pub stats: RewardStats,
    /// Scores of the chosen rows before the update.
    pub chosen: Vec<f32>,
    /// Scores of the rejected rows before the update.
    pub rejected: Vec<f32>,
}

impl<'a, 'm> Reward<'a, 'm> {
    /// A reward model on `model` with `lora` (which gains a score head).
    pub fn new(model: &'m Model, lora: &'a mut Lora<'m>, options: &RewardOptions) -> Result<Reward<'a, 'm>> {
        let mut o = *options;
        o.struct_size = std::mem::size_of::<RewardOptions>();
        let mut out = ptr::null_mut();
        // SAFETY: valid pointers; model and lora outlive the reward model.
        check(
            unsafe { sys::perl_reward_create(&mut out, model.raw.as_ptr(), lora.raw.as_ptr(), &o) },
            "perl_reward_create",
        )?;
        let raw = NonNull::new(out).ok_or_else(|| Error {
            status: Status::INTERNAL,
            message: "returned NULL".into(),
            function: "perl_reward_create",
        })?;
        Ok(Reward { raw, lora: LoraSlot::Borrowed(lora) })
    }

    /// Loads a reward model saved with [`Lora::save`] (adapter + score head); it owns its adapter.
    pub fn load<P: AsRef<Path>>(model: &'m Model, dir: P, options: &RewardOptions) -> Result<Reward<'m, 'm>> {
        let c = path_cstring(dir.as_ref(), "perl_reward_load")?;
        let mut o = *options;
        o.struct_size = std::mem::size_of::<RewardOptions>();
        let (mut out, mut lora) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: valid pointers.
        check(
            unsafe { sys::perl_reward_load(&mut out, &mut lora, model.raw.as_ptr(), c.as_ptr(), &o) },
            "perl_reward_load",
        )?;
        let lora = Lora::from_raw(lora, "perl_reward_load");
        let raw = NonNull::new(out);
        match (raw, lora) {
            (Some(raw), Ok(lora)) => Ok(Reward { raw, lora: LoraSlot::Owned(lora) }),
            (raw, lora) => {
                // SAFETY: free whatever was returned, reward first.
                if let Some(r) = raw {
                    unsafe { sys::perl_reward_free(r.as_ptr()) }
                }
                drop(lora);
                Err(Error { status: Status::INTERNAL, message: "returned NULL".into(), function: "perl_reward_load" })
            }
        }
    }

    /// The adapter (with its head at the end of its parameters).
    pub fn lora(&self) -> &Lora<'m> {
        match &self.lora {
            LoraSlot::Borrowed(l) => l,
            LoraSlot::Owned(l) => l,
        }
    }

    /// The adapter, mutably (optimizer settings, hooks).
    pub fn lora_mut(&mut self) -> &mut Lora<'m> {
        match &mut self.lora {
            LoraSlot::Borrowed(l) => l,
            LoraSlot::Owned(l) => l,
        }
    }

    /// One Bradley–Terry step on `chosen`/`rejected` pairs (`margins`: None or one per pair).
    pub fn step_pairwise(
        &mut self,
        chosen: &Batch<'_>,
        rejected: &Batch<'_>,
        margins: Option<&[f32]>,
    ) -> Result<PairwiseStep> {
        let n = chosen.rows();
        if let Some(m) = margins {
            expect_len("perl_reward_step_pairwise", "margins", m.len(), n)?;
        }
        let mut out = PairwiseStep { stats: RewardStats::default(), chosen: vec![0.0; n], rejected: vec![0.0; rejected.rows()] };
        // SAFETY: outputs sized per batch; margins sized [n].
        check(
            unsafe {
                sys::perl_reward_step_pairwise(
                    self.raw.as_ptr(),
                    &chosen.raw,
                    &rejected.raw,
                    margins.map_or(ptr::null(), |m| m.as_ptr()),
                    out.chosen.as_mut_ptr(),
                    out.rejected.as_mut_ptr(),
                    &mut out.stats,
                )
            },
            "perl_reward_step_pairwise",
        )?;
        Ok(out)
    }

    /// One thumbs-up/down step; `labels` are 0 or 1.  Returns the stats and the scores before the update.
    pub fn step_pointwise(&mut self, batch: &Batch<'_>, labels: &[f32]) -> Result<(RewardStats, Vec<f32>)> {
        expect_len("perl_reward_step_pointwise", "labels", labels.len(), batch.rows())?;
        let mut stats = RewardStats::default();
        let mut scores = vec![0.0f32; batch.rows()];
        // SAFETY: sized above.
        check(
            unsafe {
                sys::perl_reward_step_pointwise(
                    self.raw.as_ptr(),
                    &batch.raw,
                    labels.as_ptr(),
                    scores.as_mut_ptr(),
                    &mut stats,
                )
            },
            "perl_reward_step_pointwise",
        )?;
        Ok((stats, scores))
    }

    /// Scores without gradients, one per row.
    pub fn score(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let mut scores = vec![0.0f32; batch.rows()];
        // SAFETY: sized [rows].
        check(
            unsafe { sys::perl_reward_score(self.raw.as_ptr(), &batch.raw, scores.as_mut_ptr()) },
            "perl_reward_score",
        )?;
        Ok(scores)
    }

    /// Saves the adapter and its head (PEFT layout).
    pub fn save<P: AsRef<Path>>(&self, dir: P) -> Result<()> {
        self.lora().save(dir)
    }
}

impl Drop for Reward<'_, '_> {
    fn drop(&mut self) {
        // SAFETY: owned handle, freed before an owned adapter (fields drop after this).
        unsafe { sys::perl_reward_free(self.raw.as_ptr()) }
    }
}

// ---- perl_policy_trainer ---------------------------------------------------------------------

/// RL on a policy adapter with KL to the frozen base (`perl_policy_trainer`).
pub struct PolicyTrainer<'a, 'm> {
    raw: NonNull<sys::perl_policy_trainer>,
    policy: &'a mut Lora<'m>,
    value: Option<&'a mut Lora<'m>>,
}

// SAFETY: used by one thread at a time; every mutation takes &mut self.
unsafe impl Send for PolicyTrainer<'_, '_> {}

/// The rows of one RL step: responses `[rows, max_response_len]` after the prompts.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'r> {
    /// Response tokens, row-major `[rows, max_response_len]` (padding ignored).
    pub responses: &'r [i32],
    /// Response lengths (>= 1).
    pub response_lengths: &'r [i32],
    /// The row stride of `responses`.
    pub max_response_len: usize,
    /// One finite reward per row.
    pub rewards: &'r [f32],
    /// None (taken from the current policy) or `[rows, max_response_len]` sampling log-probs.
    pub old_logprobs: Option<&'r [f32]>,
}

impl<'r> Rollout<'r> {
    /// A rollout straight from [`Model::generate`].
    pub fn from_generation(g: &'r Generation, rewards: &'r [f32]) -> Rollout<'r> {
        Rollout {
            responses: &g.tokens,
            response_lengths: &g.lengths,
            max_response_len: g.max_new_tokens,
            rewards,
            old_logprobs: None,
        }
    }
}

impl<'a, 'm> PolicyTrainer<'a, 'm> {
    /// A trainer on `model` for `policy` (and, for PPO with a value function, `value`).
    pub fn new(
        model: &'m Model,
        policy: &'a mut Lora<'m>,
        value: Option<&'a mut Lora<'m>>,
        options: &PolicyOptions,
    ) -> Result<PolicyTrainer<'a, 'm>> {
        let mut o = *options;
        o.struct_size = std::mem::size_of::<PolicyOptions>();
        let mut out = ptr::null_mut();
        let vp = value.as_ref().map_or(ptr::null_mut(), |v| v.raw.as_ptr());
        // SAFETY: valid pointers; everything borrowed outlives the trainer.
        check(
            unsafe { sys::perl_policy_create(&mut out, model.raw.as_ptr(), policy.raw.as_ptr(), vp, &o) },
            "perl_policy_create",
        )?;
        let raw = NonNull::new(out).ok_or_else(|| Error {
            status: Status::INTERNAL,
            message: "returned NULL".into(),
            function: "perl_policy_create",
        })?;
        Ok(PolicyTrainer { raw, policy, value })
    }

    /// The policy adapter.
    pub fn policy(&self) -> &Lora<'m> {
        self.policy
    }

    /// The policy adapter, mutably (learning rate, gradient hook).
    pub fn policy_mut(&mut self) -> &mut Lora<'m> {
        self.policy
    }

    /// The value adapter, if any.
    pub fn value(&self) -> Option<&Lora<'m>> {
        self.value.as_deref()
    }

    /// One RL step on `prompts` and their responses.
    pub fn step(&mut self, prompts: &Batch<'_>, rollout: &Rollout<'_>) -> Result<PolicyStats> {
        const F: &str = "perl_policy_step";
        let rows = prompts.rows();
        let width = rollout.max_response_len;
        expect_len(F, "responses", rollout.responses.len(), rows * width)?;
        expect_len(F, "response_lengths", rollout.response_lengths.len(), rows)?;
        expect_len(F, "rewards", rollout.rewards.len(), rows)?;
        if let Some(old) = rollout.old_logprobs {
            expect_len(F, "old_logprobs", old.len(), rows * width)?;
        }
        if width > i32::MAX as usize {
            return Err(Error::invalid(F, "max_response_len too large".into()));
        }
        let mut stats = PolicyStats::default();
        // SAFETY: every buffer sized above.
        check(
            unsafe {
                sys::perl_policy_step(
                    self.raw.as_ptr(),
                    &prompts.raw,
                    rollout.responses.as_ptr(),
                    rollout.response_lengths.as_ptr(),
                    width as i32,
                    rollout.rewards.as_ptr(),
                    rollout.old_logprobs.map_or(ptr::null(), |o| o.as_ptr()),
                    &mut stats,
                )
            },
            F,
        )?;
        Ok(stats)
    }

    /// Saves a checkpoint directory (adapter/, trainer_state.bin, ...).
    pub fn save<P: AsRef<Path>>(&self, dir: P) -> Result<()> {
        let c = path_cstring(dir.as_ref(), "perl_policy_save")?;
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_policy_save(self.raw.as_ptr(), c.as_ptr()) }, "perl_policy_save")
    }

    /// Restores a checkpoint saved by [`PolicyTrainer::save`].
    pub fn load<P: AsRef<Path>>(&mut self, dir: P) -> Result<()> {
        let c = path_cstring(dir.as_ref(), "perl_policy_load")?;
        // SAFETY: valid pointers.
        check(unsafe { sys::perl_policy_load(self.raw.as_ptr(), c.as_ptr()) }, "perl_policy_load")
    }
}

impl Drop for PolicyTrainer<'_, '_> {
    fn drop(&mut self) {
        // SAFETY: owned handle; the borrowed adapters outlive it.
        unsafe { sys::perl_policy_free(self.raw.as_ptr()) }
    }
}
