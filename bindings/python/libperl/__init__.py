"""libperl: Python bindings (ctypes) for the libperl C library.

    import libperl
    with libperl.Model.random(seed=1) as model, libperl.Lora(model, rank=4) as lora:
        reward = libperl.Reward(model, lora)
        stats, chosen, rejected = reward.step_pairwise([[1, 5, 6]], [[1, 7]])

Handles free themselves: close() (or a `with` block, or garbage collection)
releases the C object.  Every object keeps a reference to what it borrows
(an adapter to its model, a reward model and a policy trainer to their model
and adapters), so the C library's ownership rules can never be broken from
Python, and closing a model first closes whatever still depends on it.

Arrays: with numpy, inputs are passed zero-copy when they are already
C-contiguous int32/float32 (otherwise converted once with
numpy.ascontiguousarray) and results are numpy arrays; Lora.params() and
Lora.grads() are numpy views of the adapter's own memory.  Without numpy (or
with LIBPERL_NO_NUMPY=1 in the environment) inputs are sequences, results are
nested lists, and params()/grads() are ctypes float arrays over the same memory
(indexable, sliceable and assignable; memoryview() works on them).

Errors raise LibperlError (or a subclass named after the status) carrying
.status, .status_name and .message (the library's perl_last_error()).
"""

import collections
import ctypes
import os
import weakref
from ctypes import POINTER, byref, c_float, c_int32, c_size_t, c_uint8

from . import _capi as C
from ._capi import (KL_IN_LOSS, KL_IN_REWARD, KL_K1, KL_K2, KL_K3, LORA_INIT_GAUSSIAN,  # noqa: F401
                    LORA_INIT_KAIMING, LR_CONSTANT, LR_COSINE, LR_LINEAR, MODE_FULL, MODE_LORA,
                    NORM_SEQUENCE, NORM_TOKEN, PG_GRPO, PG_PPO, PG_REINFORCE, PG_RLOO, REWARD_PAIRWISE,
                    REWARD_POINTWISE, TARGET_ALL, TARGET_ATTENTION, TARGET_DOWN, TARGET_GATE, TARGET_K,
                    TARGET_O, TARGET_Q, TARGET_UP, TARGET_V)

if os.environ.get("LIBPERL_NO_NUMPY"):
    np = None
else:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - depends on the environment
        np = None

HAVE_NUMPY = np is not None
__version__ = "0.1.0"

# The raw structs, for callers who want every field.
ModelConfig = C.perl_model_config
LoraOptions = C.perl_lora_options
OptimOptions = C.perl_optim_options
GenerateOptions = C.perl_generate_options
RewardOptions = C.perl_reward_options
PolicyOptions = C.perl_policy_options
StepStats = C.perl_step_stats
RewardStats = C.perl_reward_stats
PolicyStats = C.perl_policy_stats

__all__ = [
    "LibperlError", "Model", "Lora", "Reward", "PolicyTrainer", "GenerateResult", "HAVE_NUMPY",
    "version", "version_number", "library_path", "set_num_threads", "get_num_threads", "options",
    "ModelConfig", "LoraOptions", "OptimOptions", "GenerateOptions", "RewardOptions", "PolicyOptions",
    "StepStats", "RewardStats", "PolicyStats", "pad",
]

# ---- errors ---------------------------------------------------------------------------


class LibperlError(Exception):
    """A libperl call failed.  .status (negative int), .status_name
    ("LIBPERL_ERR_SHAPE"), .message (perl_last_error(), the exact reason)."""

    def __init__(self, status, message, function=None):
        self.status = int(status)
        self.status_name = C.STATUS_NAMES.get(self.status, f"status {self.status}")
        self.message = message
        self.function = function
        text = C.perl_status_str(self.status).decode("utf-8", "replace")
        where = f"{function}: " if function else ""
        super().__init__(f"{where}{text} ({self.status_name}): {message}" if message
                         else f"{where}{text} ({self.status_name})")


def _error_class(name):
    return type(name, (LibperlError,), {"__doc__": f"LibperlError with a {name} status."})


InvalidArgumentError = _error_class("InvalidArgumentError")
OutOfMemoryError = _error_class("OutOfMemoryError")
IOFailureError = _error_class("IOFailureError")
FormatError = _error_class("FormatError")
UnsupportedError = _error_class("UnsupportedError")
ShapeError = _error_class("ShapeError")
RangeError = _error_class("RangeError")
NumericError = _error_class("NumericError")
StateError = _error_class("StateError")
CallbackError = _error_class("CallbackError")
InternalError = _error_class("InternalError")
_ERRORS = {-1: InvalidArgumentError, -2: OutOfMemoryError, -3: IOFailureError, -4: FormatError,
           -5: UnsupportedError, -6: ShapeError, -7: RangeError, -8: NumericError, -9: StateError,
           -10: CallbackError, -11: InternalError}


def _check(status, function):
    if status != 0:
        message = C.perl_last_error().decode("utf-8", "replace")
        raise _ERRORS.get(status, LibperlError)(status, message, function)


def _call(name, *args):
    fn = getattr(C, name, None)
    if fn is None:
        raise LibperlError(-11, f"{name} is not exported by {C.library_path} (an older library?)", name)
    _check(fn(*args), name)


# ---- library-wide -------------------------------------------------------------------


def version():
    """The library's version string, e.g. "0.1.0"."""
    return C.perl_version().decode()


def version_number():
    return int(C.perl_version_number())


library_path = C.library_path


def set_num_threads(n):
    """Threads for libperl and its BLAS (n <= 0: all CPUs).  Process-wide."""
    _check(C.perl_set_num_threads(int(n)), "perl_set_num_threads")


def get_num_threads():
    return int(C.perl_get_num_threads())


def options(cls, **fields):
    """A struct initialised by its *_init function, then `fields` applied:
    options(LoraOptions, rank=4).  Unknown field names raise TypeError."""
    s = C.new_struct(cls)
    names = {n for n, _ in cls._fields_}
    for key, value in fields.items():
        attr = "lambda_" if key == "lambda" else key
        if attr not in names or attr == "struct_size":
            raise TypeError(f"{cls.__name__} has no field {key!r}")
        setattr(s, attr, value)
    return s


_TARGET_NAMES = {"q": TARGET_Q, "q_proj": TARGET_Q, "k": TARGET_K, "k_proj": TARGET_K, "v": TARGET_V,
                 "v_proj": TARGET_V, "o": TARGET_O, "o_proj": TARGET_O, "gate": TARGET_GATE,
                 "gate_proj": TARGET_GATE, "up": TARGET_UP, "up_proj": TARGET_UP, "down": TARGET_DOWN,
                 "down_proj": TARGET_DOWN, "attention": TARGET_ATTENTION, "all": TARGET_ALL,
                 "all-linear": TARGET_ALL}


def _targets(value):
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = [value]
    flags = 0
    for name in value:
        if name not in _TARGET_NAMES:
            raise ValueError(f"unknown target module {name!r}")
        flags |= _TARGET_NAMES[name]
    return flags


def _enum(value, names, what):
    if isinstance(value, str):
        key = value.lower()
        if key not in names:
            raise ValueError(f"unknown {what} {value!r} (one of {', '.join(names)})")
        return names[key]
    return int(value)


_ALGORITHMS = {"reinforce": PG_REINFORCE, "rloo": PG_RLOO, "grpo": PG_GRPO, "ppo": PG_PPO}
_KL_ESTIMATORS = {"k1": KL_K1, "k2": KL_K2, "k3": KL_K3}
_KL_MODES = {"reward": KL_IN_REWARD, "in_reward": KL_IN_REWARD, "loss": KL_IN_LOSS, "in_loss": KL_IN_LOSS}
_LOSS_NORMS = {"token": NORM_TOKEN, "sequence": NORM_SEQUENCE}
_OBJECTIVES = {"pairwise": REWARD_PAIRWISE, "pointwise": REWARD_POINTWISE}
_SCHEDULES = {"constant": LR_CONSTANT, "linear": LR_LINEAR, "cosine": LR_COSINE}
_MODES = {"lora": MODE_LORA, "full": MODE_FULL}
_INITS = {"kaiming": LORA_INIT_KAIMING, "gaussian": LORA_INIT_GAUSSIAN}

# ---- arrays ---------------------------------------------------------------------------


def _is_ndarray(x):
    return np is not None and isinstance(x, np.ndarray)


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


class _Buffer:
    """A C-contiguous buffer (numpy array or ctypes array) with its pointer and shape."""

    __slots__ = ("obj", "ptr", "shape")

    def __init__(self, obj, ptr, shape):
        self.obj, self.ptr, self.shape = obj, ptr, shape


def _input(x, ctype, shape=None, what="array"):
    """A read-only input as a C buffer: zero-copy for a C-contiguous numpy
    array of the right dtype.  `shape` (optional) is checked."""
    ndtype = {c_int32: "int32", c_float: "float32", c_uint8: "uint8"}[ctype]
    if np is not None and not isinstance(x, ctypes.Array):
        arr = np.ascontiguousarray(x, dtype=ndtype)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            if arr.size == _prod(shape):
                arr = arr.reshape(shape)
            else:
                raise ValueError(f"{what}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
        return _Buffer(arr, arr.ctypes.data_as(POINTER(ctype)), tuple(arr.shape))
    if isinstance(x, ctypes.Array):
        flat = x
    else:
        flat = _flatten(x)
    if shape is not None and len(flat) != _prod(shape):
        raise ValueError(f"{what}: {len(flat)} values, expected {_prod(shape)} for shape {tuple(shape)}")
    if not isinstance(flat, ctypes.Array):
        flat = (ctype * len(flat))(*flat)
    return _Buffer(flat, ctypes.cast(flat, POINTER(ctype)), tuple(shape) if shape else (len(flat),))


def _flatten(x):
    out = []

    def walk(v):
        if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, bytes))
                                            and hasattr(v, "__getitem__")):
            for item in v:
                walk(item)
        else:
            out.append(v)

    walk(x)
    return out


def _output(ctype, shape):
    """A zero-initialised output buffer: numpy array, or ctypes array without numpy."""
    if np is not None:
        arr = np.zeros(shape, dtype={c_int32: np.int32, c_float: np.float32}[ctype])
        return _Buffer(arr, arr.ctypes.data_as(POINTER(ctype)), tuple(shape))
    flat = (ctype * max(1, _prod(shape)))()
    return _Buffer(flat, ctypes.cast(flat, POINTER(ctype)), tuple(shape))


def _result(buf):
    """What the caller gets back: the numpy array itself, or nested lists."""
    if np is not None:
        return buf.obj
    flat = list(buf.obj)[:_prod(buf.shape)]

    def nest(values, shape):
        if len(shape) <= 1:
            return values
        step = _prod(shape[1:])
        return [nest(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]

    return nest(flat, buf.shape)


def pad(sequences, pad_id=0):
    """Right-pads token sequences: returns (tokens [B, T], lengths [B]) as
    numpy int32 arrays (lists without numpy)."""
    seqs = [list(map(int, s)) for s in sequences]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad: every sequence needs at least one token")
    width = max(len(s) for s in seqs)
    rows = [s + [pad_id] * (width - len(s)) for s in seqs]
    lengths = [len(s) for s in seqs]
    if np is not None:
        return np.asarray(rows, dtype=np.int32), np.asarray(lengths, dtype=np.int32)
    return rows, lengths


def _is_ragged(tokens):
    if _is_ndarray(tokens):
        return False
    rows = list(tokens)
    if not rows or not all(isinstance(row, (list, tuple)) or _is_ndarray(row) for row in rows):
        return False  # one flat sequence (a single row), or empty
    return len({len(row) for row in rows}) > 1


class _Batch:
    """A perl_batch over caller data (kept alive as long as this object)."""

    def __init__(self, tokens, lengths=None, what="tokens"):
        if lengths is None and _is_ragged(tokens):
            tokens, lengths = pad(tokens)
        if _is_ndarray(tokens):
            shape = tuple(tokens.shape)
            if len(shape) == 1:
                tokens = tokens.reshape(1, -1)
                shape = tokens.shape
            if len(shape) != 2:
                raise ValueError(f"{what}: expected a 2-D array [batch, seq_len], got shape {shape}")
            rows, width = int(shape[0]), int(shape[1])
        else:
            tokens = list(tokens)
            if tokens and not (isinstance(tokens[0], (list, tuple)) or _is_ndarray(tokens[0])):
                tokens = [tokens]  # one flat sequence: a single row
            tokens = [list(row) for row in tokens]
            rows, width = len(tokens), (len(tokens[0]) if tokens else 0)
        self.tokens = _input(tokens, c_int32, (rows, width), what)
        self.lengths = None if lengths is None else _input(lengths, c_int32, (rows,), f"{what} lengths")
        self.batch = C.new_struct(C.perl_batch)
        self.batch.batch_size = rows
        self.batch.seq_len = width
        self.batch.tokens = self.tokens.ptr
        self.batch.lengths = self.lengths.ptr if self.lengths is not None else None

    @property
    def rows(self):
        return self.batch.batch_size

    @property
    def seq_len(self):
        return self.batch.seq_len

    def ref(self):
        return byref(self.batch)


def _stats_dict(s):
    return {name: getattr(s, name) for name, _ in s._fields_ if name != "struct_size"}


def _handle(obj, name="object"):
    if obj is None:
        return None
    h = obj._h
    if not h:
        raise StateError(-9, f"the {type(obj).__name__} is closed", name)
    return h


# ---- handle base ---------------------------------------------------------------------


class _Handle:
    """Owns one C handle; dependents (weakly referenced) are closed first."""

    _free_name = None

    def __init__(self):
        self._h = None
        self._dependents = weakref.WeakSet()

    def _attach(self, *parents):
        for p in parents:
            if p is not None:
                p._dependents.add(self)

    @property
    def closed(self):
        return not self._h

    def close(self):
        """Frees the C object (and first anything still borrowing it).  Idempotent."""
        h = getattr(self, "_h", None)
        if not h:
            return
        for dep in list(getattr(self, "_dependents", ())):
            dep.close()
        self._h = None
        if self._free_name is not None:
            getattr(C, self._free_name)(h)

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __bool__(self):
        return True


# ---- perl_model -------------------------------------------------------------------


GenerateResult = collections.namedtuple("GenerateResult", "tokens lengths logprobs")
GenerateResult.__doc__ = """Model.generate's result: tokens [B, max_new_tokens] (padded with -1),
lengths [B] (new tokens per row), logprobs [B, max_new_tokens] (of each sampled token)."""


class Model(_Handle):
    """A frozen base model (perl_model)."""

    _free_name = "perl_model_free"

    def __init__(self, _handle=None):
        super().__init__()
        if _handle is None:
            raise TypeError("use Model.load(path) or Model.random(...)")
        self._h = _handle

    @classmethod
    def load(cls, path):
        """Loads a Hugging Face directory or a llama2.c checkpoint file."""
        h = C.perl_model_p()
        _call("perl_model_load", byref(h), os.fsencode(path))
        return cls(h)

    @classmethod
    def random(cls, config=None, seed=0, **fields):
        """Random weights.  config: a ModelConfig (default: perl_model_config_init's
        small shape); keyword fields override it (dim=32, n_layers=1, ...)."""
        cfg = C.new_struct(C.perl_model_config)
        if config is not None:
            ctypes.memmove(byref(cfg), byref(config), ctypes.sizeof(cfg))
            cfg.struct_size = ctypes.sizeof(cfg)
        for key, value in fields.items():
            if key not in cfg.as_dict() or key == "struct_size":
                raise TypeError(f"ModelConfig has no field {key!r}")
            setattr(cfg, key, value)
        h = C.perl_model_p()
        _call("perl_model_create_random", byref(h), byref(cfg), int(seed))
        return cls(h)

    @property
    def config(self):
        cfg = C.new_struct(C.perl_model_config)
        _call("perl_model_get_config", _handle(self), byref(cfg))
        return cfg

    @property
    def num_params(self):
        return int(C.perl_model_num_params(_handle(self)))

    def save_hf(self, directory):
        _call("perl_model_save_hf", _handle(self), os.fsencode(directory))

    def forward(self, tokens, lengths=None, adapter=None, logits=True, hidden=False):
        """Logits [B, T, vocab] (and/or final hidden states [B, T, dim]).
        Returns logits, hidden, or (logits, hidden) when both are asked for."""
        b = _Batch(tokens, lengths)
        cfg = self.config
        out_l = _output(c_float, (b.rows, b.seq_len, cfg.vocab_size)) if logits else None
        out_h = _output(c_float, (b.rows, b.seq_len, cfg.dim)) if hidden else None
        _call("perl_model_forward", _handle(self), _handle(adapter), b.ref(),
              out_l.ptr if out_l else None, out_h.ptr if out_h else None)
        if logits and hidden:
            return _result(out_l), _result(out_h)
        return _result(out_l) if logits else (_result(out_h) if hidden else None)

    def token_logprobs(self, tokens, lengths=None, adapter=None):
        """out[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1]); [B, T]."""
        b = _Batch(tokens, lengths)
        out = _output(c_float, (b.rows, b.seq_len))
        _call("perl_model_token_logprobs", _handle(self), _handle(adapter), b.ref(), out.ptr)
        return _result(out)

    def generate(self, prompts, lengths=None, adapter=None, options=None, stop_tokens=None, **fields):
        """Samples continuations.  fields: max_new_tokens, temperature, top_k,
        top_p, min_p, seed.  Returns GenerateResult(tokens, lengths, logprobs)."""
        b = _Batch(prompts, lengths, "prompts")
        opts = _merge_options(C.perl_generate_options, options, fields)
        stops = None
        if stop_tokens:
            stops = _input(list(stop_tokens) if not _is_ndarray(stop_tokens) else stop_tokens, c_int32,
                           None, "stop_tokens")
            opts.stop_tokens = stops.ptr
            opts.n_stop_tokens = _prod(stops.shape)
        n = int(opts.max_new_tokens)
        if n < 1:
            raise ValueError("max_new_tokens must be >= 1")
        out_t = _output(c_int32, (b.rows, n))
        out_n = _output(c_int32, (b.rows,))
        out_p = _output(c_float, (b.rows, n))
        _call("perl_generate", _handle(self), _handle(adapter), b.ref(), byref(opts), out_t.ptr, out_n.ptr,
              out_p.ptr)
        del stops
        return GenerateResult(_result(out_t), _result(out_n), _result(out_p))

    def __repr__(self):
        if self.closed:
            return "<libperl.Model closed>"
        c = self.config
        return (f"<libperl.Model dim={c.dim} layers={c.n_layers} heads={c.n_heads}/{c.n_kv_heads} "
                f"vocab={c.vocab_size} params={self.num_params}>")


def _merge_options(cls, options, fields, renames=None):
    """A struct from *_init, then a given struct's values, then keyword fields (with enum names)."""
    s = C.new_struct(cls)
    if options is not None:
        if not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}")
        size = s.struct_size
        ctypes.memmove(byref(s), byref(options), ctypes.sizeof(s))
        s.struct_size = size
    names = {n for n, _ in cls._fields_}
    for key, value in fields.items():
        attr = "lambda_" if key == "lambda" else key
        if attr not in names or attr == "struct_size":
            raise TypeError(f"unknown option {key!r} for {cls.__name__}")
        if renames and attr in renames:
            value = renames[attr](value)
        setattr(s, attr, value)
    return s


# ---- perl_lora ------------------------------------------------------------------------


class Lora(_Handle):
    """A LoRA (or full fine-tuning) adapter on a Model; keeps the model alive."""

    _free_name = "perl_lora_free"

    def __init__(self, model, options=None, _handle_=None, **fields):
        super().__init__()
        if not isinstance(model, Model):
            raise TypeError("model must be a libperl.Model")
        self.model = model
        self._hook = None  # the ctypes callback: must live as long as it is installed
        self._hook_error = None
        if _handle_ is not None:
            self._h = _handle_
        else:
            if "targets" in fields:
                fields["target_modules"] = fields.pop("targets")
            opts = _merge_options(C.perl_lora_options, options, fields, {
                "target_modules": _targets, "mode": lambda v: _enum(v, _MODES, "mode"),
                "init": lambda v: _enum(v, _INITS, "init"), "use_rslora": int,
                "train_embeddings": int})
            h = C.perl_lora_p()
            _call("perl_lora_create", byref(h), _handle(model), byref(opts))
            self._h = h
        self._attach(model)

    @classmethod
    def load(cls, model, directory):
        """Loads a PEFT-layout adapter (adapter_config.json + adapter_model.safetensors)."""
        h = C.perl_lora_p()
        _call("perl_lora_load", byref(h), _handle(model), os.fsencode(directory))
        return cls(model, _handle_=h)

    @property
    def num_params(self):
        return int(C.perl_lora_num_params(_handle(self)))

    def _views(self):
        p, g, n = POINTER(c_float)(), POINTER(c_float)(), c_size_t()
        _call("perl_lora_params", _handle(self), byref(p), byref(g), byref(n))
        return p, g, int(n.value)

    def _view(self, ptr, n):
        # A ctypes array over the adapter's memory that holds a reference to
        # this Lora, so the memory outlives every view unless close() is called.
        if n == 0:
            return np.zeros(0, dtype=np.float32) if np is not None else (c_float * 0)()
        buf = (c_float * n).from_address(ctypes.addressof(ptr.contents))
        buf._libperl_owner = self
        if np is not None:
            return np.frombuffer(buf, dtype=np.float32)  # writable, zero-copy; .base is buf
        return buf

    def params(self):
        """The trainable parameters as one flat float32 view of the adapter's
        memory (writes go straight to the adapter).  Valid until close()."""
        p, _, n = self._views()
        return self._view(p, n)

    def grads(self):
        """The accumulated gradients, a view like params()."""
        _, g, n = self._views()
        return self._view(g, n)

    def save(self, directory):
        _call("perl_lora_save", _handle(self), os.fsencode(directory))

    def merge(self):
        """A new Model with W + scale * B A folded in."""
        h = C.perl_model_p()
        _call("perl_lora_merge", byref(h), _handle(self))
        return Model(h)

    def set_optimizer(self, options=None, **fields):
        """AdamW settings: lr, beta1, beta2, eps, weight_decay, max_grad_norm,
        schedule ("constant"/"linear"/"cosine"), warmup_steps, total_steps, min_lr_ratio."""
        opts = _merge_options(C.perl_optim_options, options, fields,
                              {"schedule": lambda v: _enum(v, _SCHEDULES, "schedule")})
        _call("perl_lora_set_optimizer", _handle(self), byref(opts))

    def set_lr(self, lr):
        _call("perl_lora_set_lr", _handle(self), float(lr))

    def set_recompute(self, enabled=True):
        _call("perl_lora_set_recompute", _handle(self), 1 if enabled else 0)

    def set_grad_hook(self, fn):
        """fn(grads) is called between backward and the update with the whole
        gradient (a writable float32 view); a truthy return value or an
        exception aborts the step (the exception is re-raised).  None removes it."""
        if fn is None:
            _call("perl_lora_set_grad_hook", _handle(self), C.perl_grad_hook(), None)
            self._hook = None
            return

        def trampoline(ptr, count, _user):
            try:
                n = int(count)
                buf = (c_float * n).from_address(ctypes.addressof(ptr.contents)) if n else (c_float * 0)()
                view = np.frombuffer(buf, dtype=np.float32) if np is not None else buf
                return 1 if fn(view) else 0
            except BaseException as e:  # noqa: B902 - reported after the C call returns
                self._hook_error = e
                return 1

        hook = C.perl_grad_hook(trampoline)
        _call("perl_lora_set_grad_hook", _handle(self), hook, None)
        self._hook = hook

    def _run(self, name, *args):
        """A call that may run the gradient hook: re-raise the hook's exception."""
        self._hook_error = None
        try:
            _call(name, *args)
        except CallbackError as e:
            err, self._hook_error = self._hook_error, None
            if err is not None:
                raise err from e
            raise

    def zero_grad(self):
        _call("perl_lora_zero_grad", _handle(self))

    def sft_backward(self, tokens, lengths=None, loss_mask=None):
        """Causal-LM loss and backward (gradients accumulate).  Returns the stats dict."""
        b = _Batch(tokens, lengths)
        mask = _input(loss_mask, c_uint8, (b.rows, b.seq_len), "loss_mask") if loss_mask is not None else None
        stats = C.new_struct(C.perl_step_stats)
        _call("perl_lora_sft_backward", _handle(self), b.ref(), mask.ptr if mask else None, byref(stats))
        return _stats_dict(stats)

    def optimizer_step(self):
        stats = C.new_struct(C.perl_step_stats)
        self._run("perl_lora_optimizer_step", _handle(self), byref(stats))
        return _stats_dict(stats)

    def sft_step(self, tokens, lengths=None, loss_mask=None):
        """zero_grad + sft_backward + optimizer_step; returns the stats dict."""
        b = _Batch(tokens, lengths)
        mask = _input(loss_mask, c_uint8, (b.rows, b.seq_len), "loss_mask") if loss_mask is not None else None
        stats = C.new_struct(C.perl_step_stats)
        self._run("perl_lora_sft_step", _handle(self), b.ref(), mask.ptr if mask else None, byref(stats))
        return _stats_dict(stats)

    def save_state(self, path):
        _call("perl_lora_save_state", _handle(self), os.fsencode(path))

    def load_state(self, path):
        _call("perl_lora_load_state", _handle(self), os.fsencode(path))

    def close(self):
        super().close()
        self._hook = None

    def __repr__(self):
        return "<libperl.Lora closed>" if self.closed else f"<libperl.Lora params={self.num_params}>"


# ---- perl_reward ------------------------------------------------------------------


class Reward(_Handle):
    """A reward model: the frozen model + an adapter + a scalar head.

    Reward(model, lora, objective="pairwise", ...) borrows `lora` (which gains
    a head); Reward.load(model, dir) also creates and owns its adapter (.lora)."""

    _free_name = "perl_reward_free"

    def __init__(self, model, lora, options=None, _handle_=None, _owns_lora=False, **fields):
        super().__init__()
        self.model, self.lora, self._owns_lora = model, lora, _owns_lora
        if _handle_ is not None:
            self._h = _handle_
        else:
            opts = _merge_options(C.perl_reward_options, options, fields,
                                  {"objective": lambda v: _enum(v, _OBJECTIVES, "objective")})
            h = C.perl_reward_p()
            _call("perl_reward_create", byref(h), _handle(model), _handle(lora), byref(opts))
            self._h = h
        self._attach(model, lora)

    @classmethod
    def load(cls, model, directory, options=None, **fields):
        opts = _merge_options(C.perl_reward_options, options, fields,
                              {"objective": lambda v: _enum(v, _OBJECTIVES, "objective")})
        h, lh = C.perl_reward_p(), C.perl_lora_p()
        _call("perl_reward_load", byref(h), byref(lh), _handle(model), os.fsencode(directory), byref(opts))
        try:
            lora = Lora(model, _handle_=lh)
        except BaseException:
            C.perl_reward_free(h)
            C.perl_lora_free(lh)
            raise
        return cls(model, lora, _handle_=h, _owns_lora=True)

    def step_pairwise(self, chosen, rejected, chosen_lengths=None, rejected_lengths=None, margins=None):
        """One Bradley–Terry step.  Returns (stats dict, chosen scores, rejected scores)
        with the scores computed before the update."""
        bc, br = _Batch(chosen, chosen_lengths, "chosen"), _Batch(rejected, rejected_lengths, "rejected")
        m = _input(margins, c_float, (bc.rows,), "margins") if margins is not None else None
        oc, orj = _output(c_float, (bc.rows,)), _output(c_float, (br.rows,))
        stats = C.new_struct(C.perl_reward_stats)
        self.lora._run("perl_reward_step_pairwise", _handle(self), bc.ref(), br.ref(), m.ptr if m else None,
                       oc.ptr, orj.ptr, byref(stats))
        return _stats_dict(stats), _result(oc), _result(orj)

    def step_pointwise(self, tokens, labels, lengths=None):
        """One thumbs-up/down step; labels are 0 or 1.  Returns (stats dict, scores)."""
        b = _Batch(tokens, lengths)
        lab = _input(labels, c_float, (b.rows,), "labels")
        out = _output(c_float, (b.rows,))
        stats = C.new_struct(C.perl_reward_stats)
        self.lora._run("perl_reward_step_pointwise", _handle(self), b.ref(), lab.ptr, out.ptr, byref(stats))
        return _stats_dict(stats), _result(out)

    def score(self, tokens, lengths=None):
        """Scores [B] without gradients."""
        b = _Batch(tokens, lengths)
        out = _output(c_float, (b.rows,))
        _call("perl_reward_score", _handle(self), b.ref(), out.ptr)
        return _result(out)

    def save(self, directory):
        """Saves the adapter with its score head (PEFT layout)."""
        self.lora.save(directory)

    def close(self):
        owned, self._owns_lora = self._owns_lora, False
        super().close()
        if owned and self.lora is not None:
            self.lora.close()

    def __repr__(self):
        return "<libperl.Reward closed>" if self.closed else "<libperl.Reward>"


# ---- perl_policy_trainer --------------------------------------------------------------


class PolicyTrainer(_Handle):
    """RL on a policy adapter with KL to the frozen base (perl_policy_trainer).

    PolicyTrainer(model, policy, value=None, algorithm="rloo", group_size=2, kl_coef=0.05, ...)"""

    _free_name = "perl_policy_free"

    def __init__(self, model, policy, value=None, options=None, **fields):
        super().__init__()
        self.model, self.policy, self.value = model, policy, value
        opts = _merge_options(C.perl_policy_options, options, fields, {
            "algorithm": lambda v: _enum(v, _ALGORITHMS, "algorithm"),
            "kl_estimator": lambda v: _enum(v, _KL_ESTIMATORS, "KL estimator"),
            "kl_mode": lambda v: _enum(v, _KL_MODES, "KL mode"),
            "loss_norm": lambda v: _enum(v, _LOSS_NORMS, "loss normalisation"),
            "whiten_advantages": int})
        h = C.perl_policy_trainer_p()
        _call("perl_policy_create", byref(h), _handle(model), _handle(policy), _handle(value), byref(opts))
        self._h = h
        self._attach(model, policy, value)

    def step(self, prompts, responses, rewards, prompt_lengths=None, response_lengths=None, old_logprobs=None):
        """One RL step on (prompt, response) rows.  responses may be ragged lists
        or the tokens of Model.generate (with its lengths).  Returns the stats dict."""
        bp = _Batch(prompts, prompt_lengths, "prompts")
        if response_lengths is None and _is_ragged(responses):
            responses, response_lengths = pad(responses)
        if _is_ndarray(responses):
            shape = responses.shape
        else:
            responses = [list(r) for r in responses]
            shape = (len(responses), len(responses[0]) if responses else 0)
        if len(shape) != 2 or shape[0] != bp.rows:
            raise ValueError(f"responses: shape {tuple(shape)}, expected [{bp.rows}, max_response_len]")
        rows, width = int(shape[0]), int(shape[1])
        resp = _input(responses, c_int32, (rows, width), "responses")
        if response_lengths is None:  # a rectangular batch: every response is `width` long
            response_lengths = [width] * rows
        rlen = _input(response_lengths, c_int32, (rows,), "response_lengths")
        rew = _input(rewards, c_float, (rows,), "rewards")
        old = _input(old_logprobs, c_float, (rows, width), "old_logprobs") if old_logprobs is not None else None
        stats = C.new_struct(C.perl_policy_stats)
        self.policy._run("perl_policy_step", _handle(self), bp.ref(), resp.ptr, rlen.ptr, width, rew.ptr,
                         old.ptr if old else None, byref(stats))
        return _stats_dict(stats)

    def save(self, directory):
        _call("perl_policy_save", _handle(self), os.fsencode(directory))

    def load(self, directory):
        _call("perl_policy_load", _handle(self), os.fsencode(directory))

    def __repr__(self):
        return "<libperl.PolicyTrainer closed>" if self.closed else "<libperl.PolicyTrainer>"
