#!/usr/bin/env python3
"""Generates libperl's reference fixtures (tests/fixtures/) with plain PyTorch.

    /usr/bin/python3 tests/reference/gen_fixtures.py            # (re)write tests/fixtures
    /usr/bin/python3 tests/reference/gen_fixtures.py --check    # regenerate in a temp dir, compare

Models and adapters are written as Hugging Face / PEFT directories; every
expected result goes into a safetensors file whose __metadata__ says
{"format": "libperl-fixture", "version": "1", "kind": ...}.  Weights are drawn
in float32 (what the files hold), read back from the files, and all reference
math runs in float64 on those exact values; results are stored as float32.
docs/reference-fixtures.md lists every file and key.

Before writing anything the script checks itself: the batched model against a
naive token-by-token one, padding independence, LoRA and full gradients
against float64 finite differences, AdamW against the formula, merge against
the adapter.  Any mismatch is an assertion error.
"""

import argparse
import dataclasses
import filecmp
import json
import math
import os
import sys
import tempfile

import torch

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_ref import (  # noqa: E402
    LORA_TARGETS,
    LlamaConfig,
    LoraAdapter,
    forward,
    forward_loop,
    init_weights,
    merge,
    sft_loss,
    target_mask,
    weight_shapes,
)
from safetensors_io import load_file, save_file  # noqa: E402

FORMAT = "libperl-fixture"
VERSION = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = LlamaConfig(
    dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=67,
    max_seq_len=32, rope_theta=10000.0, rms_norm_eps=1e-5, tied_embeddings=False,
    attention_bias=False,
)
TINY_BIAS = dataclasses.replace(TINY, n_kv_heads=4, attention_bias=True, tied_embeddings=True)

# The ragged batch every fixture uses: 3 right-padded rows of 9.
SEQ_LEN = 9
LENGTHS = [9, 5, 7]
PAD_TOKEN = 0
# Targets excluded from the SFT loss (row, t).  loss_mask[b, 0] is set to 1 on
# purpose: position 0 is never a target whatever the mask says.  Padding is 0.
MASKED_OUT = [(0, 3), (0, 4), (1, 2), (2, 6)]

LORA_RANK = 4
LORA_ALPHA = 8.0
LORA_SUBSETS = {
    "qv": (["q_proj", "v_proj"], False),
    "qkvo": (["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "mlp": (["gate_proj", "up_proj", "down_proj"], False),
    "all": (list(LORA_TARGETS), False),
    "all_rslora": (list(LORA_TARGETS), True),
}

ADAMW = dict(n=37, steps=5, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, max_grad_norm=0.5)


def generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def meta(kind, **extra):
    m = {"format": FORMAT, "version": VERSION, "kind": kind,
         "generator": "tests/reference/gen_fixtures.py"}
    m.update({k: str(v) for k, v in extra.items()})
    return m


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---- inputs ----------------------------------------------------------------


def make_batch(cfg):
    """tokens [3, 9] (padding = 0), lengths [3], loss_mask [3, 9]."""
    lengths = torch.tensor(LENGTHS, dtype=torch.int64)
    tokens = torch.randint(3, cfg.vocab_size, (len(LENGTHS), SEQ_LEN), generator=generator(3))
    real = torch.arange(SEQ_LEN).unsqueeze(0) < lengths.unsqueeze(1)
    tokens[~real] = PAD_TOKEN
    loss_mask = real.to(torch.int64)
    for b, t in MASKED_OUT:
        loss_mask[b, t] = 0
    return tokens, lengths, loss_mask


# ---- HF / PEFT directories ---------------------------------------------------


def write_model_dir(path, cfg, weights, dtype="F32"):
    """config.json + model.safetensors in HF layout; returns the weights as stored (float64)."""
    os.makedirs(path, exist_ok=True)
    torch_dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
    write_json(os.path.join(path, "config.json"), cfg.to_hf_config(torch_dtype))
    assert list(weights) == list(weight_shapes(cfg))
    save_file(os.path.join(path, "model.safetensors"),
              {name: (w, dtype) for name, w in weights.items()}, {"format": "pt"})
    stored, _ = load_file(os.path.join(path, "model.safetensors"))
    return {name: w.double() for name, w in stored.items()}


def write_adapter_dir(path, adapter, base_name):
    """adapter_config.json + adapter_model.safetensors in PEFT layout; returns a float64 copy."""
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, "adapter_config.json"), adapter.adapter_config(base_name))
    save_file(os.path.join(path, "adapter_model.safetensors"), adapter.tensors, {"format": "pt"})
    stored, _ = load_file(os.path.join(path, "adapter_model.safetensors"))
    copy = LoraAdapter(adapter.cfg, adapter.r, adapter.alpha, adapter.targets, adapter.use_rslora)
    copy.tensors = {name: stored[name].double() for name in adapter.names()}
    assert list(stored) == adapter.names()
    return copy


# ---- self-checks -------------------------------------------------------------


def check_close(what, got, want, rtol):
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def check_forward(cfg, weights, tokens, lengths, adapter=None):
    """The batched model equals the naive one row by row, and padding never matters."""
    logits, _ = forward(cfg, weights, tokens, lengths, adapter)
    for b in range(tokens.shape[0]):
        n = int(lengths[b])
        check_close(f"forward_loop row {b}", forward_loop(cfg, weights, tokens[b, :n], adapter),
                    logits[b, :n], 1e-12)
        alone, _ = forward(cfg, weights, tokens[b : b + 1, :n], None, adapter)
        check_close(f"unpadded row {b}", alone[0], logits[b, :n], 1e-12)
    other = tokens.clone()
    other[tokens == PAD_TOKEN] = cfg.vocab_size - 1
    other_logits, _ = forward(cfg, weights, other, lengths, adapter)
    assert torch.equal(other_logits, logits), "padding tokens changed real logits"


def check_fd(what, loss_fn, params, grads, seed, per_tensor=4, h=1e-6):
    """Central finite differences in float64 on a few entries of each tensor (incl. the largest)."""
    g = generator(seed)
    with torch.no_grad():
        for name, p in params.items():
            flat, gflat = p.view(-1), grads[name].reshape(-1)
            picks = torch.randint(flat.numel(), (per_tensor,), generator=g).tolist()
            picks.append(int(gflat.abs().argmax()))
            for j in picks:
                orig = float(flat[j])
                flat[j] = orig + h
                plus = float(loss_fn())
                flat[j] = orig - h
                minus = float(loss_fn())
                flat[j] = orig
                fd, ag = (plus - minus) / (2 * h), float(gflat[j])
                assert abs(fd - ag) <= 1e-7 + 1e-5 * abs(ag), \
                    f"{what}: {name}[{j}] finite difference {fd:.10e} vs autograd {ag:.10e}"


# ---- fixtures ----------------------------------------------------------------


def gen_forward(out, name, cfg, weights, tokens, lengths):
    logits, hidden = forward(cfg, weights, tokens, lengths)
    save_file(os.path.join(out, f"forward_{name}.safetensors"), {
        "tokens": (tokens, "I32"), "lengths": (lengths, "I32"),
        "logits": (logits, "F32"), "hidden": (hidden, "F32"),
    }, meta("forward", model=name, seq_len=SEQ_LEN, pad_token=PAD_TOKEN))
    return logits


def sft_inputs(tokens, lengths, loss_mask):
    return {"tokens": (tokens, "I32"), "lengths": (lengths, "I32"), "loss_mask": (loss_mask, "I32")}


def gen_lora(out, cfg, weights, tokens, lengths, loss_mask, subset, seed, self_check):
    targets, rslora = LORA_SUBSETS[subset]
    adapter = LoraAdapter(cfg, LORA_RANK, LORA_ALPHA, targets, use_rslora=rslora)
    adapter.init_random(generator(seed), std=0.1)
    adapter = write_adapter_dir(os.path.join(out, f"lora_{subset}"), adapter, "tests/fixtures/tiny")
    for t in adapter.tensors.values():
        t.requires_grad_(True)
    logits, _ = forward(cfg, weights, tokens, lengths, adapter, training=True)
    loss, n_targets = sft_loss(logits, tokens, lengths, loss_mask)
    loss.backward()
    grads = {name: t.grad.clone() for name, t in adapter.tensors.items()}
    if self_check:
        check_fd(f"lora_{subset}", lambda: sft_loss(forward(cfg, weights, tokens, lengths, adapter)[0],
                                                    tokens, lengths, loss_mask)[0],
                 adapter.tensors, grads, seed + 1000)
    tensors = sft_inputs(tokens, lengths, loss_mask)
    tensors["loss"] = (loss.detach().reshape(1), "F32")
    tensors["n_targets"] = (torch.tensor([n_targets]), "I32")
    tensors["logits"] = (logits.detach(), "F32")
    tensors.update({name: (g, "F32") for name, g in grads.items()})
    save_file(os.path.join(out, f"lora_grads_{subset}.safetensors"), tensors,
              meta("lora_grads", model="tiny", adapter=f"lora_{subset}", r=LORA_RANK,
                   alpha=LORA_ALPHA, use_rslora=int(rslora), scale=adapter.scale,
                   targets=",".join(adapter.targets)))
    for t in adapter.tensors.values():
        t.requires_grad_(False)
    return adapter, logits.detach()


def gen_full(out, name, cfg, weights, tokens, lengths, loss_mask, self_check):
    params = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    logits, _ = forward(cfg, params, tokens, lengths)
    loss, n_targets = sft_loss(logits, tokens, lengths, loss_mask)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    if self_check:
        check_fd(f"full_{name}", lambda: sft_loss(forward(cfg, params, tokens, lengths)[0],
                                                  tokens, lengths, loss_mask)[0],
                 params, grads, 77, per_tensor=2)
    tensors = sft_inputs(tokens, lengths, loss_mask)
    tensors["loss"] = (loss.detach().reshape(1), "F32")
    tensors["n_targets"] = (torch.tensor([n_targets]), "I32")
    tensors["logits"] = (logits.detach(), "F32")
    tensors.update({k: (g, "F32") for k, g in grads.items()})
    save_file(os.path.join(out, f"full_grads_{name}.safetensors"), tensors,
              meta("full_grads", model=name, tied_embeddings=int(cfg.tied_embeddings)))


def adamw_reference(params0, grads, clip, a):
    """The same AdamW written out (llm.c form) to pin down what torch computes."""
    p = params0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    out = []
    for step in range(1, grads.shape[0] + 1):
        g = grads[step - 1].clone()
        if clip:
            g *= min(1.0, a["max_grad_norm"] / (float(g.norm()) + 1e-6))  # torch's clip_grad_norm_
        m = a["beta1"] * m + (1 - a["beta1"]) * g
        v = a["beta2"] * v + (1 - a["beta2"]) * g * g
        m_hat = m / (1 - a["beta1"] ** step)
        v_hat = v / (1 - a["beta2"] ** step)
        p = p - a["lr"] * (m_hat / (v_hat.sqrt() + a["eps"]) + a["weight_decay"] * p)
        out.append(p.clone())
    return torch.stack(out)


def gen_adamw(out):
    a = ADAMW
    g = generator(5)
    params0 = torch.randn(a["n"], generator=g)
    grads = torch.randn(a["steps"], a["n"], generator=g)
    grads[2] *= 0.3 / grads[2].norm()  # a step under the clip threshold: coefficient 1
    params0, grads = params0.double(), grads.float().double()

    def run(clip):
        p = torch.nn.Parameter(params0.clone())
        opt = torch.optim.AdamW([p], lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"],
                                weight_decay=a["weight_decay"])
        after, norms = [], []
        for s in range(a["steps"]):
            p.grad = grads[s].clone()
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_([p], a["max_grad_norm"])))
            else:
                norms.append(float(p.grad.norm()))
            opt.step()
            after.append(p.detach().clone())
        return torch.stack(after), torch.tensor(norms, dtype=torch.float64)

    params, norms = run(clip=False)
    params_clipped, norms_clipped = run(clip=True)
    assert torch.allclose(norms, norms_clipped, rtol=1e-15, atol=0)
    clipped = [float(n) > a["max_grad_norm"] for n in norms]
    assert clipped == [True, True, False, True, True], "want exactly step 3 under the threshold"
    check_close("adamw", params, adamw_reference(params0, grads, False, a), 1e-12)
    check_close("adamw clipped", params_clipped, adamw_reference(params0, grads, True, a), 1e-12)
    save_file(os.path.join(out, "adamw.safetensors"), {
        "params_init": (params0, "F32"), "grads": (grads, "F32"), "grad_norm": (norms, "F32"),
        "params": (params, "F32"), "params_clipped": (params_clipped, "F32"),
    }, meta("adamw", **a))


def gen_merge(out, cfg, weights, adapter, adapter_logits, tokens, lengths):
    merged = {k: w.float() for k, w in merge(cfg, weights, adapter).items()}
    stored = write_model_dir(os.path.join(out, "merged_all"), cfg, merged)
    logits, _ = forward(cfg, stored, tokens, lengths)
    check_close("merged vs adapter logits", logits, adapter_logits, 1e-5)
    save_file(os.path.join(out, "merge_all.safetensors"), {
        "tokens": (tokens, "I32"), "lengths": (lengths, "I32"), "logits": (logits, "F32"),
    }, meta("merge", model="tiny", adapter="lora_all", merged="merged_all"))


def generate(out, self_check=True):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    tiny32 = init_weights(TINY, generator(1), std=0.1)
    bias32 = init_weights(TINY_BIAS, generator(2), std=0.1)
    tiny = write_model_dir(os.path.join(out, "tiny"), TINY, tiny32)
    tiny_bias = write_model_dir(os.path.join(out, "tiny_bias"), TINY_BIAS, bias32)
    # the same weights stored in half precision: the loader must convert exactly
    tiny_bf16 = write_model_dir(os.path.join(out, "tiny_bf16"), TINY, tiny32, "BF16")
    tiny_f16 = write_model_dir(os.path.join(out, "tiny_f16"), TINY, tiny32, "F16")

    tokens, lengths, loss_mask = make_batch(TINY)
    assert int(target_mask(tokens, lengths, loss_mask).sum()) == sum(LENGTHS) - 3 - len(MASKED_OUT)
    if self_check:
        check_forward(TINY, tiny, tokens, lengths)
        check_forward(TINY_BIAS, tiny_bias, tokens, lengths)

    with torch.no_grad():
        gen_forward(out, "tiny", TINY, tiny, tokens, lengths)
        gen_forward(out, "tiny_bias", TINY_BIAS, tiny_bias, tokens, lengths)
        gen_forward(out, "tiny_bf16", TINY, tiny_bf16, tokens, lengths)
        gen_forward(out, "tiny_f16", TINY, tiny_f16, tokens, lengths)

    adapters = {}
    for k, subset in enumerate(LORA_SUBSETS):
        adapters[subset] = gen_lora(out, TINY, tiny, tokens, lengths, loss_mask, subset, 10 + k,
                                    self_check)
    if self_check:
        check_forward(TINY, tiny, tokens, lengths, adapters["all"][0])

    gen_full(out, "tiny", TINY, tiny, tokens, lengths, loss_mask, self_check)
    gen_full(out, "tiny_bias", TINY_BIAS, tiny_bias, tokens, lengths, loss_mask, self_check)
    gen_adamw(out)
    with torch.no_grad():
        gen_merge(out, TINY, tiny, *adapters["all"], tokens, lengths)


def list_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures"),
                        help="output directory (default: tests/fixtures)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare with --out")
    parser.add_argument("--no-self-check", action="store_true",
                        help="skip the finite-difference and naive-model checks")
    args = parser.parse_args()
    torch.set_num_threads(1)  # identical float64 reductions run to run
    if not args.check:
        generate(args.out, not args.no_self_check)
        total = sum(os.path.getsize(os.path.join(args.out, f)) for f in list_files(args.out))
        print(f"wrote {len(list_files(args.out))} files, {total} bytes, to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, not args.no_self_check)
        # Other scripts (gen_reward_fixtures.py, ...) write into the same
        # folder: compare only the files this script writes.
        want = list_files(tmp)
        bad = sorted(f for f in want if not os.path.exists(os.path.join(args.out, f)))
        bad += [f for f in want if f not in bad and not filecmp.cmp(os.path.join(tmp, f),
                                                                 os.path.join(args.out, f), False)]
        for f in bad:
            print(f"differs: {f}")
        print("fixtures are up to date" if not bad else f"{len(bad)} fixture files differ")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
