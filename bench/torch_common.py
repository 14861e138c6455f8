"""Shared helpers for the PyTorch side of the benchmarks (bench/*_torch.py).

Import order matters: call `configure_threads(n)` before importing torch
anywhere, so that OMP_WAIT_POLICY=passive and OPENBLAS_NUM_THREADS reach the
OpenMP runtime and OpenBLAS when they load.  PyTorch here (Debian 1.13) does
its sgemm through libblas.so.3 = the same pthreads OpenBLAS libperl links, and
its own parallel loops through OpenMP; with OpenMP's default (active) wait
policy the idle OpenMP threads spin against OpenBLAS's threads and 2 threads
run slower than 1.

The model is tests/reference/llama_ref.py's pure-torch Llama (Hugging Face
LlamaForCausalLM math, eager attention with materialised causal scores, as HF
runs on CPU), with two benchmark-only changes: no padding mask (every row is
full length, so it would be a multiplication by one) and an optional LM head,
so the hidden-only forward skips the [tokens, vocab] product.
"""

import os
import resource
import struct
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configure_threads(n):
    """Environment for n threads; must run before `import torch`."""
    if "torch" in sys.modules:
        raise RuntimeError("configure_threads must run before torch is imported")
    os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    import torch  # noqa: E402  (deliberately late)

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)
    return torch


def thread_env():
    """What the run used, for the JSON record."""
    import torch

    return {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)


def loadavg1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def machine_busy_s():
    """Busy CPU seconds of the whole machine (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


class CpuTimer:
    """Wall and process CPU time of a region (cpu_util = cpu / (wall * threads)), and the machine's
    busy time, so that other = busy - cpu is what other processes used meanwhile."""

    def __enter__(self):
        self.b0, self.w0, self.c0 = machine_busy_s(), time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.busy = machine_busy_s() - self.b0


def ref():
    """tests/reference/llama_ref.py as a module."""
    sys.path.insert(0, os.path.join(REPO, "tests", "reference"))
    import llama_ref

    return llama_ref


def random768_config(seq_len=256):
    lr = ref()
    return lr.LlamaConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64,
                          vocab_size=32000, max_seq_len=max(seq_len, 256), tied_embeddings=False)


def random_weights(cfg, seed=1234):
    """normal(0, 0.02) matrices and unit norms, as perl_model_create_random."""
    import torch

    lr = ref()
    weights = {}
    gen = torch.Generator().manual_seed(seed)
    for name, shape in lr.weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape)
        else:
            weights[name] = torch.randn(shape, generator=gen) * 0.02
    return weights


def load_llama2c(path):
    """(cfg, weights) of a llama2.c checkpoint (legacy format), RoPE permuted to HF's half split."""
    import numpy as np
    import torch

    lr = ref()
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = np.frombuffer(f.read(), dtype="<f4")
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    cfg = lr.LlamaConfig(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         head_dim=head_dim, vocab_size=vocab, max_seq_len=seq_len, tied_embeddings=shared)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        t = torch.from_numpy(data[pos:pos + n].copy()).reshape(shape)
        pos += n
        return t

    def permute(w, heads):
        """llama2.c interleaved RoPE rows -> HF half split (HF's convert_llama_weights_to_hf permute)."""
        out_dim, in_dim = w.shape
        return w.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq, wk, wv = take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    w = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rms_att[i]
        w[p + "self_attn.q_proj.weight"] = permute(wq[i], n_heads)
        w[p + "self_attn.k_proj.weight"] = permute(wk[i], n_kv_heads)
        w[p + "self_attn.v_proj.weight"] = wv[i]
        w[p + "self_attn.o_proj.weight"] = wo[i]
        w[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        w[p + "mlp.gate_proj.weight"] = w1[i]
        w[p + "mlp.down_proj.weight"] = w2[i]
        w[p + "mlp.up_proj.weight"] = w3[i]
    if not shared:
        w["lm_head.weight"] = take(vocab, dim)
    return cfg, w


def random_tokens(batch, seq_len, vocab):
    """The token ids bench/forward.c and bench/sft_step.c use (xorshift64 from the same seed), so
    both sides see the same batch and their losses can be compared."""
    import torch

    mask = (1 << 64) - 1
    s = 0x9E3779B97F4A7C15
    ids = []
    for _ in range(batch * seq_len):
        s ^= (s << 13) & mask
        s ^= s >> 7
        s ^= (s << 17) & mask
        ids.append(s % vocab)
    return torch.tensor(ids, dtype=torch.int64).view(batch, seq_len)


def decoder_layer(cfg, weights, adapter, i, x, cos, sin, training):
    """One Llama layer, as llama_ref.forward's loop body."""
    import torch.nn.functional as F

    lr = ref()
    batch, seq_len, _ = x.shape
    d = cfg.head_dim
    p = f"model.layers.{i}."
    h = lr.rms_norm(x, weights[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = lr.projection(weights, adapter, i, "q_proj", h, training)
    k = lr.projection(weights, adapter, i, "k_proj", h, training)
    v = lr.projection(weights, adapter, i, "v_proj", h, training)
    q = q.view(batch, seq_len, cfg.n_heads, d).transpose(1, 2)
    k = k.view(batch, seq_len, cfg.n_kv_heads, d).transpose(1, 2)
    v = v.view(batch, seq_len, cfg.n_kv_heads, d).transpose(1, 2)
    q, k = lr.apply_rope(q, cos, sin), lr.apply_rope(k, cos, sin)
    a = lr.attention(cfg, q, k, v).transpose(1, 2).reshape(batch, seq_len, cfg.n_heads * d)
    x = x + lr.projection(weights, adapter, i, "o_proj", a, training)
    h = lr.rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate = lr.projection(weights, adapter, i, "gate_proj", h, training)
    up = lr.projection(weights, adapter, i, "up_proj", h, training)
    return x + lr.projection(weights, adapter, i, "down_proj", F.silu(gate) * up, training)


def forward(cfg, weights, tokens, adapter=None, training=False, want_logits=True, checkpoint=False):
    """(logits or None, hidden): llama_ref.forward without the padding mask; checkpoint=True
    recomputes each layer in backward (torch.utils.checkpoint, non-reentrant)."""
    import torch.utils.checkpoint

    lr = ref()
    seq_len = tokens.shape[1]
    dtype = weights["model.embed_tokens.weight"].dtype
    cos, sin = lr.rope_cos_sin(cfg, seq_len, dtype)
    x = weights["model.embed_tokens.weight"][tokens]
    for i in range(cfg.n_layers):
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(decoder_layer, cfg, weights, adapter, i, x, cos, sin, training,
                                                  use_reentrant=False)
        else:
            x = decoder_layer(cfg, weights, adapter, i, x, cos, sin, training)
    hidden = lr.rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps)
    if not want_logits:
        return None, hidden
    lm_head = weights["model.embed_tokens.weight"] if cfg.tied_embeddings else weights["lm_head.weight"]
    return hidden @ lm_head.T, hidden


def model_flops(cfg, batch, seq_len, logits=True):
    """Model FLOPs of one forward (same formula as bench/forward.c)."""
    n = batch * seq_len
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = 2.0 * n * (cfg.dim * qd + 2 * cfg.dim * kvd + qd * cfg.dim + 3 * cfg.dim * cfg.hidden_dim)
    attn = 4.0 * cfg.head_dim * cfg.n_heads * batch * seq_len * (seq_len + 1) / 2.0
    return cfg.n_layers * (per_layer + attn) + (2.0 * n * cfg.dim * cfg.vocab_size if logits else 0.0)
