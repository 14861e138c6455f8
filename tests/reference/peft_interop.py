#!/usr/bin/env python3
"""Adapter interop with Hugging Face PEFT: libperl writes, a PEFT-style torch model reads.

    PYTHONPATH=bindings/python /usr/bin/python3 tests/reference/peft_interop.py           # write + expect
    PYTHONPATH=bindings/python python3 tests/reference/peft_interop.py --write            # libperl only
    /usr/bin/python3 tests/reference/peft_interop.py --expect                             # torch only
    PYTHONPATH=bindings/python /usr/bin/python3 tests/reference/peft_interop.py --check   # compare live

--write (libperl through the Python bindings; no torch needed) saves two
adapters for the committed base tests/fixtures/tiny, with every parameter
set to a fixed pseudo-random value through Lora.params():

  tests/fixtures/interop_rslora/  all seven targets, r 4, alpha 6, rsLoRA
                                  (scaling alpha / sqrt(r) = 3), CAUSAL_LM
  tests/fixtures/interop_reward/  q_proj and v_proj, r 2, alpha 3 (scaling
                                  alpha / r = 1.5), with a reward head:
                                  SEQ_CLS, modules_to_save ["score"]

--expect (torch only) applies them the way PEFT does, with its own code
rather than libperl's or llama_ref's LoRA: it reads adapter_config.json
(peft_type, r, lora_alpha, use_rslora, target_modules, task_type,
modules_to_save; every key must be a LoraConfig field), wraps each targeted
nn.Linear in a LoRA layer like peft.tuners.lora.layer.Linear (lora_A /
lora_B sub-modules per adapter name, scaling[adapter]), renames the saved
keys as peft.utils.save_and_load.set_peft_model_state_dict does
("...q_proj.lora_A.weight" -> "...q_proj.lora_A.default.weight",
"score.weight" -> "score.modules_to_save.default.weight") and loads them with
load_state_dict(strict) — so a wrong name or a transposed shape fails.  The
forward is unmerged (base(x) + lora_B(lora_A(x)) * scaling) and, as a
cross-check, merged (W + scaling * B @ A, as merge_and_unload).  The reward
head scores each row's last real token, as LlamaForSequenceClassification
with right padding.  It writes tests/fixtures/interop_expected.safetensors:

  tokens [3, 7] I32, lengths [3] I32
  logits_rslora [3, 7, 67]   the interop_rslora adapter's logits
  logits_reward [3, 7, 67]   the interop_reward adapter's LM logits
  scores_reward [3]          the reward model's scores

tests/test_interop.c (suite_interop) checks libperl against these committed
files, so CI needs neither torch nor this script.  The other direction — a
PEFT-named adapter written by torch loads in libperl — uses the lora_* and
reward_lora fixtures of gen_fixtures.py / gen_reward_fixtures.py.
"""

import argparse
import json
import math
import os
import random
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny")

ADAPTERS = {
    "interop_rslora": dict(rank=4, alpha=6.0, targets="all", use_rslora=True, reward=False, seed=71),
    "interop_reward": dict(rank=2, alpha=3.0, targets=["q_proj", "v_proj"], use_rslora=False, reward=True, seed=72),
}
TOKENS = [[1, 17, 5, 42, 9, 33, 2], [1, 60, 7, 21, 0, 0, 0], [1, 3, 66, 14, 28, 0, 0]]
LENGTHS = [7, 4, 5]
EXPECTED = os.path.join(FIXTURES, "interop_expected.safetensors")
PARAM_STD = 0.1

# The fields of PEFT's LoraConfig (and its PeftConfig bases) an adapter_config.json may hold.
LORA_CONFIG_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "use_dora",
    "layer_replication", "runtime_config", "lora_bias", "eva_config", "corda_config", "trainable_token_indices",
    "target_parameters", "use_qalora", "qalora_group_size",
}


# ---- --write: libperl saves the adapters -----------------------------------------------


def write_adapters():
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    import libperl

    print(f"peft_interop: libperl {libperl.version()} from {libperl.library_path}")
    # A path relative to the repository: it is what adapter_config.json records
    # as base_model_name_or_path, and the committed files must not name this machine.
    os.chdir(REPO)
    with libperl.Model.load(os.path.join("tests", "fixtures", "tiny")) as model:
        for name, a in ADAPTERS.items():
            lora = libperl.Lora(model, rank=a["rank"], alpha=a["alpha"], targets=a["targets"],
                                use_rslora=a["use_rslora"])
            reward = libperl.Reward(model, lora, seed=5) if a["reward"] else None  # adds the head
            rng = random.Random(a["seed"])
            params = lora.params()
            for i in range(len(params)):
                params[i] = rng.gauss(0.0, PARAM_STD)
            out = os.path.join("tests", "fixtures", name)
            lora.save(out)
            print(f"peft_interop: wrote {out} ({len(params)} parameters)")
            if reward is not None:
                reward.close()
            lora.close()


# ---- --expect: PEFT's way, in torch ------------------------------------------------------


def peft_model(torch, adapter_dir):
    """(model, config): the tiny base with the adapter injected and loaded as PEFT does."""
    import torch.nn as nn
    import torch.nn.functional as F

    sys.path.insert(0, HERE)
    import llama_ref
    from safetensors_io import load_file

    with open(os.path.join(BASE, "config.json")) as f:
        hf = json.load(f)
    cfg = llama_ref.LlamaConfig(
        dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
        vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"], rope_theta=hf["rope_theta"],
        rms_norm_eps=hf["rms_norm_eps"], tied_embeddings=hf["tie_word_embeddings"])
    base, _ = load_file(os.path.join(BASE, "model.safetensors"))
    base = {k: v.to(torch.float64) for k, v in base.items()}

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    unknown = set(acfg) - LORA_CONFIG_FIELDS
    if unknown:
        raise SystemExit(f"{adapter_dir}: adapter_config.json keys PEFT's LoraConfig does not have: {unknown}")
    if acfg["peft_type"] != "LORA" or acfg.get("bias", "none") != "none" or acfg.get("fan_in_fan_out"):
        raise SystemExit(f"{adapter_dir}: not a plain LoRA config")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    # peft.tuners.lora.layer.LoraLayer.update_layer
    scaling = alpha / math.sqrt(r) if acfg.get("use_rslora", False) else alpha / r
    targets = acfg["target_modules"]
    targets = set(targets) if isinstance(targets, list) else {targets}

    class LoraLinear(nn.Module):
        """peft.tuners.lora.layer.Linear, reduced to what inference needs."""

        def __init__(self, base_layer):
            super().__init__()
            self.base_layer = base_layer
            self.lora_A = nn.ModuleDict({"default": nn.Linear(base_layer.in_features, r, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base_layer.out_features, bias=False)})
            self.scaling = {"default": scaling}
            self.merged = False

        def forward(self, x):
            result = self.base_layer(x)
            if not self.merged:
                result = result + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]
            return result

        def merge(self):
            # peft: base_layer.weight.data += lora_B.weight @ lora_A.weight * scaling
            delta = self.lora_B["default"].weight @ self.lora_A["default"].weight * self.scaling["default"]
            self.base_layer.weight.data += delta
            self.merged = True

    def linear(name):
        w = base[name]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
        lin.weight.data.copy_(w)
        return lin

    class Attention(nn.Module):
        def __init__(self, i):
            super().__init__()
            for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, t, linear(f"model.layers.{i}.self_attn.{t}.weight"))

    class Mlp(nn.Module):
        def __init__(self, i):
            super().__init__()
            for t in ("gate_proj", "up_proj", "down_proj"):
                setattr(self, t, linear(f"model.layers.{i}.mlp.{t}.weight"))

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.self_attn, self.mlp = Attention(i), Mlp(i)
            self.input_norm = base[f"model.layers.{i}.input_layernorm.weight"]
            self.post_norm = base[f"model.layers.{i}.post_attention_layernorm.weight"]

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(i) for i in range(cfg.n_layers)])

    class CausalLM(nn.Module):
        """The module tree of LlamaForCausalLM / LlamaForSequenceClassification (names only)."""

        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = linear("lm_head.weight")
            self.score = None

        def forward(self, tokens, lengths):
            batch, seq = tokens.shape
            x = base["model.embed_tokens.weight"][tokens]
            cos, sin = llama_ref.rope_cos_sin(cfg, seq, torch.float64)
            for layer in self.model.layers:
                h = llama_ref.rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
                at = layer.self_attn
                q = at.q_proj(h).view(batch, seq, cfg.n_heads, cfg.head_dim).transpose(1, 2)
                k = at.k_proj(h).view(batch, seq, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
                v = at.v_proj(h).view(batch, seq, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
                q, k = llama_ref.apply_rope(q, cos, sin), llama_ref.apply_rope(k, cos, sin)
                a = llama_ref.attention(cfg, q, k, v).transpose(1, 2).reshape(batch, seq, -1)
                x = x + at.o_proj(a)
                h = llama_ref.rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
                m = layer.mlp
                x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
            hidden = llama_ref.rms_norm(x, base["model.norm.weight"], cfg.rms_norm_eps)
            real = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(hidden.dtype)
            logits = self.lm_head(hidden) * real
            scores = None
            if self.score is not None:
                # LlamaForSequenceClassification: the last non-padding token of each row
                last = hidden[torch.arange(batch), lengths - 1]
                scores = self.score.modules_to_save["default"](last).squeeze(-1)
            return logits, scores

    class ModulesToSaveWrapper(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.modules_to_save = nn.ModuleDict({"default": nn.Linear(dim, 1, bias=False, dtype=torch.float64)})

    class PeftModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.base_model = nn.Module()
            self.base_model.model = inner

    inner = CausalLM()
    # inject_adapter: replace every targeted nn.Linear, matched by the last name component
    for mod_name, module in list(inner.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoraLinear(child).to(torch.float64))
    mts = acfg.get("modules_to_save") or []
    if acfg.get("task_type") == "SEQ_CLS" or "score" in mts:
        inner.score = ModulesToSaveWrapper(cfg.dim)
    peft = PeftModel(inner)

    saved, _ = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = {}
    for key, value in saved.items():
        # peft.utils.save_and_load.set_peft_model_state_dict
        if ".lora_A." in key or ".lora_B." in key:
            key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                   ".lora_B.default.weight")
        elif key == "base_model.model.score.weight":
            key = "base_model.model.score.modules_to_save.default.weight"
        state[key] = value.to(torch.float64)
    lora_keys = {k for k in peft.state_dict() if ".lora_" in k or "modules_to_save" in k}
    missing, unexpected = lora_keys - set(state), set(state) - lora_keys
    if missing or unexpected:
        raise SystemExit(f"{adapter_dir}: PEFT-style load: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    peft.load_state_dict(state, strict=False)  # shapes are checked; base weights are already in place
    return inner, acfg, scaling


def expect(write=True):
    import torch

    sys.path.insert(0, HERE)
    from safetensors_io import save_file

    tokens = torch.tensor(TOKENS, dtype=torch.int64)
    lengths = torch.tensor(LENGTHS, dtype=torch.int64)
    out = {"tokens": tokens.to(torch.int32), "lengths": lengths.to(torch.int32)}
    meta = {"format": "libperl-fixture", "version": "1", "kind": "peft_interop", "model": "tiny"}
    with torch.no_grad():
        for name, short in (("interop_rslora", "rslora"), ("interop_reward", "reward")):
            model, acfg, scaling = peft_model(torch, os.path.join(FIXTURES, name))
            logits, scores = model(tokens, lengths)
            for module in model.modules():  # merge_and_unload, then the same forward
                if hasattr(module, "merge"):
                    module.merge()
            merged, merged_scores = model(tokens, lengths)
            diff = (merged - logits).abs().max().item()
            print(f"peft_interop: {name}: r {acfg['r']} alpha {acfg['lora_alpha']} rslora "
                  f"{acfg.get('use_rslora')} scaling {scaling:g}; merged vs unmerged max|diff| {diff:.2e}")
            assert diff < 1e-10, "merged and unmerged PEFT forwards disagree"
            out[f"logits_{short}"] = logits.to(torch.float32)
            meta[f"scaling_{short}"] = repr(scaling)
            if scores is not None:
                assert (merged_scores - scores).abs().max().item() < 1e-10
                out[f"scores_{short}"] = scores.to(torch.float32)
    if write:
        save_file(EXPECTED, out, meta)
        print(f"peft_interop: wrote {os.path.relpath(EXPECTED, REPO)}")
    return out


def check():
    """Compares libperl (through the bindings) with the PEFT-style torch forward, live."""
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    import libperl

    want = expect(write=False)
    worst = 0.0
    with libperl.Model.load(BASE) as model:
        for name, short in (("interop_rslora", "rslora"), ("interop_reward", "reward")):
            lora = libperl.Lora.load(model, os.path.join(FIXTURES, name))
            got = model.forward(TOKENS, LENGTHS, adapter=lora)
            w = want[f"logits_{short}"].numpy()
            rel = float(abs(got - w).max() / abs(w).max())
            print(f"peft_interop: {name} logits: libperl vs PEFT-style torch, relative max|diff| {rel:.2e}")
            worst = max(worst, rel)
            lora.close()
        with libperl.Reward.load(model, os.path.join(FIXTURES, "interop_reward")) as reward:
            got = reward.score(TOKENS, LENGTHS)
            w = want["scores_reward"].numpy()
            rel = float(abs(got - w).max() / abs(w).max())
            print(f"peft_interop: interop_reward scores: relative max|diff| {rel:.2e}")
            worst = max(worst, rel)
    if worst > 1e-4:
        raise SystemExit("peft_interop: FAIL")
    print("peft_interop: ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="only save the adapters with libperl")
    g.add_argument("--expect", action="store_true", help="only compute the expected fixture with torch")
    g.add_argument("--check", action="store_true", help="compare libperl and torch without writing")
    args = ap.parse_args()
    if args.check:
        check()
        return
    if not args.expect:
        write_adapters()
    if not args.write:
        expect()


if __name__ == "__main__":
    main()
