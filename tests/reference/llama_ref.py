"""A minimal, readable pure-torch Llama: the reference libperl is tested against.

It follows Hugging Face's LlamaForCausalLM (and Qwen2's q/k/v biases) exactly:

    x = embed_tokens[tokens]
    for each layer:
        h = rms_norm(x, input_layernorm)
        q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)
        q, k = rope(q), rope(k)                       # HF half-split rotate_half
        a = softmax(q k^T / sqrt(head_dim) + causal) v  # kv head j serves q heads j*rep..
        x = x + a Wo^T
        h = rms_norm(x, post_attention_layernorm)
        x = x + (silu(h Wgate^T) * (h Wup^T)) Wdown^T
    hidden = rms_norm(x, norm)
    logits = hidden lm_head^T                         # lm_head = embed_tokens when tied

and LoRA as PEFT does it on any of q,k,v,o,gate,up,down:

    y = base(x) + scale * lora_B(lora_A(dropout(x))),  scale = alpha/r or alpha/sqrt(r) (rsLoRA)

Weights are a dict keyed by Hugging Face tensor names; adapters a dict keyed
by PEFT names.  Everything is functional, so torch.autograd gives gradients
with respect to any of them.  Run it in float64 for reference numbers.

Batches are right-padded [B, T] with lengths[b] real tokens in row b.  With
causal attention a real token never sees the padding after it, so padding
cannot change real outputs; padding outputs are returned as zeros.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_parent(target):
    """PEFT / HF parent module of a target: self_attn or mlp."""
    return "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


@dataclass
class LlamaConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tied_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2 style; no o_proj bias)
    bos_token_id: int = 1
    eos_token_id: int = 2

    def to_hf_config(self, torch_dtype="float32"):
        """config.json of a Hugging Face checkpoint: LlamaForCausalLM, or
        Qwen2ForCausalLM when q/k/v carry biases (Llama's attention_bias would
        also put a bias on o_proj, which this architecture does not have)."""
        cfg = {
            "architectures": ["Qwen2ForCausalLM" if self.attention_bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if self.attention_bias else "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tied_embeddings,
            "mlp_bias": False,
            "hidden_act": "silu",
            "rope_scaling": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
        }
        if not self.attention_bias:
            cfg["attention_bias"] = False
        return cfg

    def linear_shape(self, target):
        """(out, in) of a projection."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        return {
            "q_proj": (q_out, self.dim),
            "k_proj": (kv_out, self.dim),
            "v_proj": (kv_out, self.dim),
            "o_proj": (self.dim, q_out),
            "gate_proj": (self.hidden_dim, self.dim),
            "up_proj": (self.hidden_dim, self.dim),
            "down_proj": (self.dim, self.hidden_dim),
        }[target]


def linear_name(layer, target):
    """HF name of a projection weight: model.layers.{i}.self_attn.q_proj.weight."""
    return f"model.layers.{layer}.{lora_parent(target)}.{target}.weight"


def weight_shapes(cfg):
    """HF tensor name -> shape, in the order HF checkpoints list them."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (cfg.dim,)
        for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[linear_name(i, target)] = cfg.linear_shape(target)
            if cfg.attention_bias and target != "o_proj":
                shapes[p + f"self_attn.{target}.bias"] = (cfg.linear_shape(target)[0],)
        shapes[p + "post_attention_layernorm.weight"] = (cfg.dim,)
        for target in ("gate_proj", "up_proj", "down_proj"):
            shapes[linear_name(i, target)] = cfg.linear_shape(target)
    shapes["model.norm.weight"] = (cfg.dim,)
    if not cfg.tied_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def init_weights(cfg, generator, std=0.1, dtype=torch.float32):
    """Random weights: matrices and biases normal(0, std), norm weights 1 + std * normal."""
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32) * std
        weights[name] = (1.0 + noise if name.endswith("norm.weight") else noise).to(dtype)
    return weights


# ---- the layers ----------------------------------------------------------


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight, in at least float32 (HF upcasts)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xc.to(x.dtype)


def rope_cos_sin(cfg, seq_len, dtype):
    """cos, sin [seq_len, head_dim]: inv_freq = 1/theta^(2i/D), angles repeated for both halves."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    """HF's half split: (x1, x2) -> (-x2, x1) over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; rotates pair (i, i + D/2) by angle pos * inv_freq[i]."""
    return x * cos + rotate_half(x) * sin


class LoraAdapter:
    """A PEFT LoRA adapter: tensors keyed by PEFT names, A [r, in], B [out, r]."""

    def __init__(self, cfg, r, alpha, targets, use_rslora=False, dropout=0.0):
        assert all(t in LORA_TARGETS for t in targets)
        self.cfg = cfg
        self.r = r
        self.alpha = alpha
        self.targets = [t for t in LORA_TARGETS if t in targets]  # canonical order
        self.use_rslora = use_rslora
        self.dropout = dropout
        self.tensors = {}

    @property
    def scale(self):
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @staticmethod
    def name(layer, target, which):
        """PEFT name: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight."""
        return f"base_model.model.model.layers.{layer}.{lora_parent(target)}.{target}.lora_{which}.weight"

    def names(self):
        """Every adapter tensor name, layer by layer, A before B."""
        return [
            self.name(i, t, w) for i in range(self.cfg.n_layers) for t in self.targets for w in "AB"
        ]

    def init_random(self, generator, std=0.1, dtype=torch.float32):
        """A and B both normal(0, std), so that gradients of both are non-trivial."""
        for i in range(self.cfg.n_layers):
            for t in self.targets:
                out_features, in_features = self.cfg.linear_shape(t)
                for which, shape in (("A", (self.r, in_features)), ("B", (out_features, self.r))):
                    w = torch.randn(shape, generator=generator, dtype=torch.float32) * std
                    self.tensors[self.name(i, t, which)] = w.to(dtype)
        return self

    def pair(self, layer, target):
        """(A, B) of a module, or None when it is not targeted."""
        if target not in self.targets:
            return None
        return self.tensors[self.name(layer, target, "A")], self.tensors[self.name(layer, target, "B")]

    def adapter_config(self, base_model_name_or_path):
        """adapter_config.json of a PEFT checkpoint."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": list(self.targets),
            "use_rslora": self.use_rslora,
            "lora_dropout": self.dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
        }


def projection(weights, adapter, layer, target, x, training=False):
    """y = x W^T (+ b) (+ scale * dropout(x) A^T B^T)."""
    y = x @ weights[linear_name(layer, target)].T
    bias = weights.get(f"model.layers.{layer}.{lora_parent(target)}.{target}.bias")
    if bias is not None:
        y = y + bias
    pair = adapter.pair(layer, target) if adapter is not None else None
    if pair is not None:
        a, b = pair
        xd = F.dropout(x, p=adapter.dropout, training=training) if adapter.dropout > 0 else x
        y = y + adapter.scale * ((xd @ a.T) @ b.T)
    return y


def attention(cfg, q, k, v):
    """Grouped-query causal attention; q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, H, T, D]."""
    n_rep = cfg.n_heads // cfg.n_kv_heads
    # HF repeat_kv: kv head j is shared by q heads j*n_rep .. j*n_rep + n_rep - 1
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    seq_len = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def forward(cfg, weights, tokens, lengths=None, adapter=None, training=False):
    """Returns (logits [B, T, vocab], hidden [B, T, dim]); padding positions are zero.

    tokens [B, T] int64, lengths [B] (None: every row is T long).  hidden is
    the final RMS-normed hidden state, the input of lm_head.
    """
    batch, seq_len = tokens.shape
    dtype = weights["model.embed_tokens.weight"].dtype
    h_dim = cfg.head_dim
    cos, sin = rope_cos_sin(cfg, seq_len, dtype)
    x = weights["model.embed_tokens.weight"][tokens]  # [B, T, dim]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = projection(weights, adapter, i, "q_proj", h, training)
        k = projection(weights, adapter, i, "k_proj", h, training)
        v = projection(weights, adapter, i, "v_proj", h, training)
        q = q.view(batch, seq_len, cfg.n_heads, h_dim).transpose(1, 2)
        k = k.view(batch, seq_len, cfg.n_kv_heads, h_dim).transpose(1, 2)
        v = v.view(batch, seq_len, cfg.n_kv_heads, h_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attention(cfg, q, k, v).transpose(1, 2).reshape(batch, seq_len, cfg.n_heads * h_dim)
        x = x + projection(weights, adapter, i, "o_proj", a, training)
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = projection(weights, adapter, i, "gate_proj", h, training)
        up = projection(weights, adapter, i, "up_proj", h, training)
        x = x + projection(weights, adapter, i, "down_proj", F.silu(gate) * up, training)
    hidden = rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps)
    lm_head = weights["model.embed_tokens.weight"] if cfg.tied_embeddings else weights["lm_head.weight"]
    logits = hidden @ lm_head.T
    real = real_mask(tokens, lengths).unsqueeze(-1).to(dtype)
    return logits * real, hidden * real


def real_mask(tokens, lengths):
    """[B, T] bool: position t of row b holds a real token (t < lengths[b])."""
    batch, seq_len = tokens.shape
    if lengths is None:
        return torch.ones(batch, seq_len, dtype=torch.bool)
    return torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)


def target_mask(tokens, lengths, loss_mask=None):
    """[B, T] bool: token t is an SFT target (1 <= t < length and loss_mask[b, t] != 0)."""
    targets = real_mask(tokens, lengths).clone()
    targets[:, 0] = False
    if loss_mask is not None:
        targets &= loss_mask != 0
    return targets


def sft_loss(logits, tokens, lengths, loss_mask=None):
    """Mean over target tokens of -log p(tokens[b, t] | tokens[b, :t]), read at position t-1.

    Returns (loss, number of target tokens).  Equivalent to HF's shifted
    cross-entropy with labels = -100 wherever the target mask is false.
    """
    targets = target_mask(tokens, lengths, loss_mask)[:, 1:]  # token t predicted at t-1
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logp = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    n = int(targets.sum())
    return -token_logp[targets].sum() / n, n


def merge(cfg, weights, adapter):
    """Base weights with the adapter folded in: W' = W + scale * B @ A (biases unchanged)."""
    merged = dict(weights)
    for i in range(cfg.n_layers):
        for target in adapter.targets:
            a, b = adapter.pair(i, target)
            name = linear_name(i, target)
            merged[name] = weights[name] + adapter.scale * (b @ a)
    return merged


# ---- a second, deliberately naive implementation --------------------------


def forward_loop(cfg, weights, row, adapter=None):
    """Logits [len(row), vocab] of one unpadded sequence, token by token and head by head.

    Shares nothing with forward() except rms_norm and projection, so the two
    cross-check each other (RoPE pairing, GQA head mapping, causal mask).
    """
    w = weights
    d = cfg.head_dim
    seq_len = len(row)
    x = torch.stack([w["model.embed_tokens.weight"][int(t)] for t in row])
    n_rep = cfg.n_heads // cfg.n_kv_heads

    def rope_one(vec, pos):
        out = vec.clone()
        for i in range(d // 2):
            angle = pos / (cfg.rope_theta ** (2.0 * i / d))
            c, s = math.cos(angle), math.sin(angle)
            x1, x2 = vec[i], vec[i + d // 2]
            out[i] = x1 * c - x2 * s
            out[i + d // 2] = x2 * c + x1 * s
        return out

    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = projection(w, adapter, i, "q_proj", h)
        k = projection(w, adapter, i, "k_proj", h)
        v = projection(w, adapter, i, "v_proj", h)
        attn_out = torch.zeros(seq_len, cfg.n_heads * d, dtype=x.dtype)
        for head in range(cfg.n_heads):
            kv = head // n_rep
            for t in range(seq_len):
                qt = rope_one(q[t, head * d : (head + 1) * d], t)
                scores = []
                for s in range(t + 1):
                    ks = rope_one(k[s, kv * d : (kv + 1) * d], s)
                    scores.append(float(qt @ ks) / math.sqrt(d))
                top = max(scores)
                probs = [math.exp(sc - top) for sc in scores]
                total = sum(probs)
                for s in range(t + 1):
                    attn_out[t, head * d : (head + 1) * d] += probs[s] / total * v[s, kv * d : (kv + 1) * d]
        x = x + projection(w, adapter, i, "o_proj", attn_out)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g = projection(w, adapter, i, "gate_proj", h)
        u = projection(w, adapter, i, "up_proj", h)
        x = x + projection(w, adapter, i, "down_proj", g / (1.0 + torch.exp(-g)) * u)
    hidden = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    lm_head = w["model.embed_tokens.weight"] if cfg.tied_embeddings else w["lm_head.weight"]
    return hidden @ lm_head.T
