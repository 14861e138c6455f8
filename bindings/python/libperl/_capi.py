"""Raw ctypes declarations of include/libperl/libperl.h.

Every public function and struct is declared here, one to one with the
header; the classes in libperl/__init__.py are built on top.  Structs mirror
the C layout field by field (ctypes applies the platform's C alignment rules),
and the test suite checks each one's size against the struct_size that the
library's *_init function writes.

The shared library is found, in order, at:
  1. $LIBPERL_LIBRARY (a path to libperlrl.so.0 or any file name ctypes accepts);
  2. build/libperlrl.so.0 relative to the repository holding this package;
  3. ctypes.util.find_library("perlrl") (an installed libperlrl.so).
"""

import ctypes
import ctypes.util
import os

from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint, c_uint32, c_uint64, c_uint8, c_void_p)

# ---- locating the library ---------------------------------------------------

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def library_candidates():
    """The paths/names tried, in order (for error messages and tests)."""
    out = []
    env = os.environ.get("LIBPERL_LIBRARY")
    if env:
        out.append(env)
    out.append(os.path.join(_REPO, "build", "libperlrl.so.0"))
    found = ctypes.util.find_library("perlrl")
    if found:
        out.append(found)
    return out


def _load():
    env = os.environ.get("LIBPERL_LIBRARY")
    if env:
        # An explicit choice is never silently replaced by another copy.
        return ctypes.CDLL(env), env
    errors = []
    for cand in library_candidates():
        if os.path.sep in cand and not os.path.exists(cand):
            errors.append(f"{cand}: not found")
            continue
        try:
            return ctypes.CDLL(cand), cand
        except OSError as e:  # pragma: no cover - depends on the system
            errors.append(f"{cand}: {e}")
    raise OSError("libperl: cannot find libperlrl (set LIBPERL_LIBRARY, run `make` in the "
                  "repository, or install the library): " + "; ".join(errors or ["nothing tried"]))


lib, library_path = _load()

# ---- constants ----------------------------------------------------------------

LIBPERL_OK = 0
STATUS_NAMES = {
    0: "LIBPERL_OK",
    -1: "LIBPERL_ERR_INVALID_ARGUMENT",
    -2: "LIBPERL_ERR_OUT_OF_MEMORY",
    -3: "LIBPERL_ERR_IO",
    -4: "LIBPERL_ERR_FORMAT",
    -5: "LIBPERL_ERR_UNSUPPORTED",
    -6: "LIBPERL_ERR_SHAPE",
    -7: "LIBPERL_ERR_RANGE",
    -8: "LIBPERL_ERR_NUMERIC",
    -9: "LIBPERL_ERR_STATE",
    -10: "LIBPERL_ERR_CALLBACK",
    -11: "LIBPERL_ERR_INTERNAL",
}

TARGET_Q, TARGET_K, TARGET_V, TARGET_O = 1, 2, 4, 8
TARGET_GATE, TARGET_UP, TARGET_DOWN = 16, 32, 64
TARGET_ATTENTION, TARGET_ALL = 0x0F, 0x7F
LORA_INIT_KAIMING, LORA_INIT_GAUSSIAN = 0, 1
MODE_LORA, MODE_FULL = 0, 1
LR_CONSTANT, LR_LINEAR, LR_COSINE = 0, 1, 2
REWARD_PAIRWISE, REWARD_POINTWISE = 0, 1
PG_REINFORCE, PG_RLOO, PG_GRPO, PG_PPO = 0, 1, 2, 3
KL_K1, KL_K2, KL_K3 = 0, 1, 2
KL_IN_REWARD, KL_IN_LOSS = 0, 1
NORM_TOKEN, NORM_SEQUENCE = 0, 1

# ---- structs (field for field as in the header) --------------------------------


class _Struct(Structure):
    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self._fields_
                           if not name.startswith("_") and not name.endswith("tokens"))
        return f"{type(self).__name__}({fields})"

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}


class perl_model_config(_Struct):
    _fields_ = [("struct_size", c_size_t), ("dim", c_int32), ("hidden_dim", c_int32),
                ("n_layers", c_int32), ("n_heads", c_int32), ("n_kv_heads", c_int32),
                ("head_dim", c_int32), ("vocab_size", c_int32), ("max_seq_len", c_int32),
                ("rope_theta", c_float), ("rms_norm_eps", c_float), ("tied_embeddings", c_int32),
                ("qkv_bias", c_int32), ("rope_interleaved", c_int32), ("bos_token_id", c_int32),
                ("eos_token_id", c_int32)]


class perl_batch(_Struct):
    _fields_ = [("struct_size", c_size_t), ("batch_size", c_int32), ("seq_len", c_int32),
                ("tokens", POINTER(c_int32)), ("lengths", POINTER(c_int32))]


class perl_lora_options(_Struct):
    _fields_ = [("struct_size", c_size_t), ("mode", c_int32), ("rank", c_int32), ("alpha", c_float),
                ("dropout", c_float), ("target_modules", c_uint32), ("use_rslora", c_int32),
                ("init", c_int32), ("seed", c_uint64), ("train_embeddings", c_int32)]


class perl_optim_options(_Struct):
    _fields_ = [("struct_size", c_size_t), ("lr", c_float), ("beta1", c_float), ("beta2", c_float),
                ("eps", c_float), ("weight_decay", c_float), ("max_grad_norm", c_float),
                ("schedule", c_int32), ("warmup_steps", c_int32), ("total_steps", c_int32),
                ("min_lr_ratio", c_float)]


class perl_step_stats(_Struct):
    _fields_ = [("struct_size", c_size_t), ("loss", c_float), ("grad_norm", c_float), ("lr", c_float),
                ("step", c_int64), ("n_tokens", c_int64), ("accuracy", c_float)]


class perl_generate_options(_Struct):
    _fields_ = [("struct_size", c_size_t), ("max_new_tokens", c_int32), ("temperature", c_float),
                ("top_k", c_int32), ("top_p", c_float), ("min_p", c_float), ("seed", c_uint64),
                ("stop_tokens", POINTER(c_int32)), ("n_stop_tokens", c_int32)]


class perl_reward_options(_Struct):
    _fields_ = [("struct_size", c_size_t), ("objective", c_int32), ("center_coef", c_float),
                ("pos_weight", c_float), ("neg_weight", c_float), ("head_init_std", c_float),
                ("seed", c_uint64)]


class perl_reward_stats(_Struct):
    _fields_ = [("struct_size", c_size_t), ("loss", c_float), ("accuracy", c_float),
                ("mean_margin", c_float), ("grad_norm", c_float), ("lr", c_float), ("step", c_int64)]


class perl_policy_options(_Struct):
    _fields_ = [("struct_size", c_size_t), ("algorithm", c_int32), ("group_size", c_int32),
                ("baseline_decay", c_float), ("kl_coef", c_float), ("kl_estimator", c_int32),
                ("kl_mode", c_int32), ("kl_target", c_float), ("kl_horizon", c_float),
                ("entropy_coef", c_float), ("whiten_advantages", c_int32), ("loss_norm", c_int32),
                ("clip_eps", c_float), ("ppo_epochs", c_int32), ("ppo_minibatches", c_int32),
                ("gamma", c_float), ("lambda_", c_float), ("value_coef", c_float),
                ("value_clip", c_float)]


class perl_policy_stats(_Struct):
    _fields_ = [("struct_size", c_size_t), ("loss", c_float), ("mean_reward", c_float),
                ("std_reward", c_float), ("kl", c_float), ("entropy", c_float),
                ("response_length", c_float), ("clip_fraction", c_float), ("value_loss", c_float),
                ("grad_norm", c_float), ("lr", c_float), ("kl_coef", c_float), ("step", c_int64)]


# Each option/stats struct and the function that initialises it.
STRUCT_INITS = {
    perl_model_config: "perl_model_config_init",
    perl_batch: "perl_batch_init",
    perl_lora_options: "perl_lora_options_init",
    perl_optim_options: "perl_optim_options_init",
    perl_step_stats: "perl_step_stats_init",
    perl_generate_options: "perl_generate_options_init",
    perl_reward_options: "perl_reward_options_init",
    perl_reward_stats: "perl_reward_stats_init",
    perl_policy_options: "perl_policy_options_init",
    perl_policy_stats: "perl_policy_stats_init",
}

# Opaque handles are plain void pointers.
perl_model_p = c_void_p
perl_lora_p = c_void_p
perl_reward_p = c_void_p
perl_policy_trainer_p = c_void_p

perl_grad_hook = CFUNCTYPE(c_int, POINTER(c_float), c_size_t, c_void_p)

_I32P = POINTER(c_int32)
_F32P = POINTER(c_float)

# ---- functions: (name, restype, argtypes) in header order ---------------------------

_FUNCTIONS = [
    # 1. version
    ("perl_version", c_char_p, []),
    ("perl_version_number", c_uint, []),
    # 2. errors
    ("perl_status_str", c_char_p, [c_int]),
    ("perl_last_error", c_char_p, []),
    ("perl_clear_error", None, []),
    # 3. threads
    ("perl_set_num_threads", c_int, [c_int]),
    ("perl_get_num_threads", c_int, []),
    # 4. model
    ("perl_model_config_init", None, [POINTER(perl_model_config)]),
    ("perl_model_load", c_int, [POINTER(perl_model_p), c_char_p]),
    ("perl_model_create_random", c_int, [POINTER(perl_model_p), POINTER(perl_model_config), c_uint64]),
    ("perl_model_save_hf", c_int, [perl_model_p, c_char_p]),
    ("perl_model_free", None, [perl_model_p]),
    ("perl_model_get_config", c_int, [perl_model_p, POINTER(perl_model_config)]),
    ("perl_model_num_params", c_size_t, [perl_model_p]),
    ("perl_batch_init", None, [POINTER(perl_batch)]),
    ("perl_model_forward", c_int, [perl_model_p, perl_lora_p, POINTER(perl_batch), _F32P, _F32P]),
    ("perl_model_token_logprobs", c_int, [perl_model_p, perl_lora_p, POINTER(perl_batch), _F32P]),
    # 5. lora
    ("perl_lora_options_init", None, [POINTER(perl_lora_options)]),
    ("perl_lora_create", c_int, [POINTER(perl_lora_p), perl_model_p, POINTER(perl_lora_options)]),
    ("perl_lora_free", None, [perl_lora_p]),
    ("perl_lora_num_params", c_size_t, [perl_lora_p]),
    ("perl_lora_params", c_int, [perl_lora_p, POINTER(_F32P), POINTER(_F32P), POINTER(c_size_t)]),
    ("perl_lora_save", c_int, [perl_lora_p, c_char_p]),
    ("perl_lora_load", c_int, [POINTER(perl_lora_p), perl_model_p, c_char_p]),
    ("perl_lora_merge", c_int, [POINTER(perl_model_p), perl_lora_p]),
    ("perl_optim_options_init", None, [POINTER(perl_optim_options)]),
    ("perl_lora_set_optimizer", c_int, [perl_lora_p, POINTER(perl_optim_options)]),
    ("perl_lora_set_lr", c_int, [perl_lora_p, c_float]),
    ("perl_lora_set_grad_hook", c_int, [perl_lora_p, perl_grad_hook, c_void_p]),
    ("perl_lora_set_recompute", c_int, [perl_lora_p, c_int]),
    ("perl_step_stats_init", None, [POINTER(perl_step_stats)]),
    ("perl_lora_zero_grad", c_int, [perl_lora_p]),
    ("perl_lora_sft_backward", c_int, [perl_lora_p, POINTER(perl_batch), POINTER(c_uint8),
                                       POINTER(perl_step_stats)]),
    ("perl_lora_optimizer_step", c_int, [perl_lora_p, POINTER(perl_step_stats)]),
    ("perl_lora_sft_step", c_int, [perl_lora_p, POINTER(perl_batch), POINTER(c_uint8),
                                   POINTER(perl_step_stats)]),
    ("perl_lora_save_state", c_int, [perl_lora_p, c_char_p]),
    ("perl_lora_load_state", c_int, [perl_lora_p, c_char_p]),
    # 6. generation
    ("perl_generate_options_init", None, [POINTER(perl_generate_options)]),
    ("perl_generate", c_int, [perl_model_p, perl_lora_p, POINTER(perl_batch), POINTER(perl_generate_options),
                              _I32P, _I32P, _F32P]),
    # 7. reward
    ("perl_reward_options_init", None, [POINTER(perl_reward_options)]),
    ("perl_reward_create", c_int, [POINTER(perl_reward_p), perl_model_p, perl_lora_p,
                                   POINTER(perl_reward_options)]),
    ("perl_reward_free", None, [perl_reward_p]),
    ("perl_reward_stats_init", None, [POINTER(perl_reward_stats)]),
    ("perl_reward_step_pairwise", c_int, [perl_reward_p, POINTER(perl_batch), POINTER(perl_batch), _F32P,
                                          _F32P, _F32P, POINTER(perl_reward_stats)]),
    ("perl_reward_step_pointwise", c_int, [perl_reward_p, POINTER(perl_batch), _F32P, _F32P,
                                           POINTER(perl_reward_stats)]),
    ("perl_reward_score", c_int, [perl_reward_p, POINTER(perl_batch), _F32P]),
    ("perl_reward_load", c_int, [POINTER(perl_reward_p), POINTER(perl_lora_p), perl_model_p, c_char_p,
                                 POINTER(perl_reward_options)]),
    # 8. policy
    ("perl_policy_options_init", None, [POINTER(perl_policy_options)]),
    ("perl_policy_create", c_int, [POINTER(perl_policy_trainer_p), perl_model_p, perl_lora_p, perl_lora_p,
                                   POINTER(perl_policy_options)]),
    ("perl_policy_free", None, [perl_policy_trainer_p]),
    ("perl_policy_stats_init", None, [POINTER(perl_policy_stats)]),
    ("perl_policy_step", c_int, [perl_policy_trainer_p, POINTER(perl_batch), _I32P, _I32P, c_int32, _F32P,
                                 _F32P, POINTER(perl_policy_stats)]),
    ("perl_policy_save", c_int, [perl_policy_trainer_p, c_char_p]),
    ("perl_policy_load", c_int, [perl_policy_trainer_p, c_char_p]),
]

FUNCTION_NAMES = [name for name, _, _ in _FUNCTIONS]
MISSING = []  # functions the loaded library does not export (an older build)

for _name, _restype, _argtypes in _FUNCTIONS:
    try:
        _fn = getattr(lib, _name)
    except AttributeError:
        MISSING.append(_name)
        continue
    _fn.restype = _restype
    _fn.argtypes = _argtypes
    globals()[_name] = _fn


def new_struct(cls):
    """A struct filled by its *_init function (struct_size set, defaults in place)."""
    s = cls()
    getattr(lib, STRUCT_INITS[cls])(ctypes.byref(s))
    return s
