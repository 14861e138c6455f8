#!/usr/bin/env python3
"""Generates the reward-model fixtures (tests/fixtures/reward_*) with plain PyTorch.

    /usr/bin/python3 tests/reference/gen_reward_fixtures.py           # (re)write them
    /usr/bin/python3 tests/reference/gen_reward_fixtures.py --check   # regenerate in a temp dir, compare

The base is the committed `tiny` model (tests/fixtures/tiny/, written by
gen_fixtures.py); this script only reads it.  It writes:

  reward_lora/                    a PEFT adapter (all seven targets, r 4, alpha 8,
                                  A and B normal(0, 0.1)) with a score head
                                  (base_model.model.score.weight [1, 32], normal(0, 0.2)),
                                  task_type SEQ_CLS, modules_to_save ["score"]
  reward_pairwise.safetensors     a pairwise step: chosen [3, 9] and rejected [3, 11]
                                  (different padded lengths, one row of length 1),
                                  margins, center_coef 0.1; the scores, loss, accuracy,
                                  mean margin and the gradient of every adapter tensor
                                  and of the head, under their PEFT names
  reward_pointwise.safetensors    a pointwise step: [4, 10] rows, labels, pos_weight 0.7,
                                  neg_weight 2.0; the same outputs

A score is head . h_last, h_last the final RMS-normed hidden state of the
row's last real token.  Padding positions hold random real token ids (not 0),
so a library that read past a row's length would disagree.  All math runs in
float64 on the exact stored float32 values; results are stored as F32.  Before
writing, the gradients are checked against central finite differences and
the scores against each row run alone without padding.
"""

import argparse
import filecmp
import json
import os
import sys
import tempfile

import torch

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gen_fixtures import check_fd, generator  # noqa: E402  (one finite-difference checker)
from llama_ref import LORA_TARGETS, LlamaConfig, LoraAdapter, forward  # noqa: E402
from safetensors_io import load_file, save_file  # noqa: E402

FORMAT = "libperl-fixture"
VERSION = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD_NAME = "base_model.model.score.weight"

LORA_RANK = 4
LORA_ALPHA = 8.0
HEAD_STD = 0.2

PAIRWISE = dict(chosen_seq=9, chosen_lengths=[9, 4, 7], rejected_seq=11, rejected_lengths=[6, 11, 1],
                margins=[0.5, 0.0, -0.25], center_coef=0.1)
POINTWISE = dict(seq=10, lengths=[10, 3, 8, 5], labels=[1.0, 0.0, 0.0, 1.0], pos_weight=0.7, neg_weight=2.0)


def meta(kind, **extra):
    m = {"format": FORMAT, "version": VERSION, "kind": kind,
         "generator": "tests/reference/gen_reward_fixtures.py"}
    m.update({k: str(v) for k, v in extra.items()})
    return m


def load_tiny(fixtures):
    """The tiny model's config and float64 weights, as stored."""
    path = os.path.join(fixtures, "tiny")
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    cfg = LlamaConfig(dim=c["hidden_size"], hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"],
                      n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
                      head_dim=c["head_dim"], vocab_size=c["vocab_size"],
                      max_seq_len=c["max_position_embeddings"], rope_theta=c["rope_theta"],
                      rms_norm_eps=c["rms_norm_eps"], tied_embeddings=c["tie_word_embeddings"],
                      attention_bias=c.get("attention_bias", False))
    weights, _ = load_file(os.path.join(path, "model.safetensors"))
    return cfg, {k: w.double() for k, w in weights.items()}


def write_reward_adapter(path, cfg):
    """A PEFT SEQ_CLS adapter with a score head; returns (adapter, head) as stored, in float64."""
    os.makedirs(path, exist_ok=True)
    adapter = LoraAdapter(cfg, LORA_RANK, LORA_ALPHA, list(LORA_TARGETS))
    adapter.init_random(generator(40), std=0.1)
    head = torch.randn(1, cfg.dim, generator=generator(41), dtype=torch.float32) * HEAD_STD
    config = adapter.adapter_config("tests/fixtures/tiny")
    config["task_type"] = "SEQ_CLS"
    config["modules_to_save"] = ["score"]
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    tensors = dict(adapter.tensors)
    tensors[HEAD_NAME] = head
    save_file(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    stored, _ = load_file(os.path.join(path, "adapter_model.safetensors"))
    copy = LoraAdapter(cfg, adapter.r, adapter.alpha, adapter.targets)
    copy.tensors = {name: stored[name].double() for name in adapter.names()}
    return copy, stored[HEAD_NAME].double()


def make_rows(cfg, seq_len, lengths, seed):
    """tokens [B, seq_len] with random real tokens everywhere (padding too), lengths [B]."""
    tokens = torch.randint(3, cfg.vocab_size, (len(lengths), seq_len), generator=generator(seed))
    return tokens, torch.tensor(lengths, dtype=torch.int64)


def scores_of(cfg, weights, adapter, head, tokens, lengths):
    """head . final hidden state of each row's last real token: [B]."""
    _, hidden = forward(cfg, weights, tokens, lengths, adapter)
    last = hidden[torch.arange(tokens.shape[0]), lengths - 1]
    return last @ head[0]


def pairwise_loss(r_c, r_r, margins, center):
    d = r_c - r_r - margins
    return torch.nn.functional.softplus(-d).mean() + center * ((r_c + r_r) ** 2).mean()


def pointwise_loss(r, labels, pos_w, neg_w):
    w = torch.where(labels != 0, torch.full_like(labels, pos_w), torch.full_like(labels, neg_w))
    bce = torch.nn.functional.softplus(r) - labels * r
    return (w * bce).sum() / w.sum()


# ---- self-checks -------------------------------------------------------------


def check_rows_alone(cfg, weights, adapter, head, tokens, lengths, scores):
    """Each row run alone, unpadded, gives the batch's score: padding never matters."""
    for b in range(tokens.shape[0]):
        n = int(lengths[b])
        alone = scores_of(cfg, weights, adapter, head, tokens[b:b + 1, :n], lengths[b:b + 1])
        err = abs(float(alone[0]) - float(scores[b]))
        assert err <= 1e-12 * max(1.0, abs(float(scores[b]))), f"row {b}: alone {alone[0]} vs batch {scores[b]}"


# ---- fixtures ----------------------------------------------------------------


def with_grads(adapter, head):
    params = dict(adapter.tensors)
    params[HEAD_NAME] = head
    for t in params.values():
        t.requires_grad_(True)
    return params


def gradients(params):
    grads = {name: t.grad.clone() for name, t in params.items()}
    for t in params.values():
        t.requires_grad_(False)
        t.grad = None
    return grads


def gen_pairwise(out, cfg, weights, adapter, head, self_check):
    p = PAIRWISE
    chosen, chosen_len = make_rows(cfg, p["chosen_seq"], p["chosen_lengths"], 42)
    rejected, rejected_len = make_rows(cfg, p["rejected_seq"], p["rejected_lengths"], 43)
    margins = torch.tensor(p["margins"], dtype=torch.float64)
    params = with_grads(adapter, head)

    def loss_fn():
        r_c = scores_of(cfg, weights, adapter, params[HEAD_NAME], chosen, chosen_len)
        r_r = scores_of(cfg, weights, adapter, params[HEAD_NAME], rejected, rejected_len)
        return pairwise_loss(r_c, r_r, margins, p["center_coef"]), r_c, r_r

    loss, r_c, r_r = loss_fn()
    loss.backward()
    grads = gradients(params)
    if self_check:
        with torch.no_grad():
            check_rows_alone(cfg, weights, adapter, head, chosen, chosen_len, r_c)
            check_rows_alone(cfg, weights, adapter, head, rejected, rejected_len, r_r)
        check_fd("pairwise", lambda: loss_fn()[0], params, grads, 44, per_tensor=3)
    r_c, r_r = r_c.detach(), r_r.detach()
    tensors = {
        "chosen_tokens": (chosen, "I32"), "chosen_lengths": (chosen_len, "I32"),
        "rejected_tokens": (rejected, "I32"), "rejected_lengths": (rejected_len, "I32"),
        "margins": (margins, "F32"), "chosen_scores": (r_c, "F32"), "rejected_scores": (r_r, "F32"),
        "loss": (loss.detach().reshape(1), "F32"),
        "accuracy": ((r_c > r_r).double().mean().reshape(1), "F32"),
        "mean_margin": ((r_c - r_r).mean().reshape(1), "F32"),
    }
    tensors.update({f"grad.{name}": (g, "F32") for name, g in grads.items()})
    save_file(os.path.join(out, "reward_pairwise.safetensors"), tensors,
              meta("reward_pairwise", model="tiny", adapter="reward_lora", center_coef=p["center_coef"]))


def gen_pointwise(out, cfg, weights, adapter, head, self_check):
    p = POINTWISE
    tokens, lengths = make_rows(cfg, p["seq"], p["lengths"], 45)
    labels = torch.tensor(p["labels"], dtype=torch.float64)
    params = with_grads(adapter, head)

    def loss_fn():
        r = scores_of(cfg, weights, adapter, params[HEAD_NAME], tokens, lengths)
        return pointwise_loss(r, labels, p["pos_weight"], p["neg_weight"]), r

    loss, r = loss_fn()
    loss.backward()
    grads = gradients(params)
    if self_check:
        with torch.no_grad():
            check_rows_alone(cfg, weights, adapter, head, tokens, lengths, r)
        check_fd("pointwise", lambda: loss_fn()[0], params, grads, 46, per_tensor=3)
    r = r.detach()
    tensors = {
        "tokens": (tokens, "I32"), "lengths": (lengths, "I32"), "labels": (labels, "F32"),
        "scores": (r, "F32"), "loss": (loss.detach().reshape(1), "F32"),
        "accuracy": (((r > 0) == (labels != 0)).double().mean().reshape(1), "F32"),
        "mean_margin": (r.mean().reshape(1), "F32"),
    }
    tensors.update({f"grad.{name}": (g, "F32") for name, g in grads.items()})
    save_file(os.path.join(out, "reward_pointwise.safetensors"), tensors,
              meta("reward_pointwise", model="tiny", adapter="reward_lora", pos_weight=p["pos_weight"],
                   neg_weight=p["neg_weight"]))


def generate(fixtures, out, self_check=True):
    os.makedirs(out, exist_ok=True)
    cfg, weights = load_tiny(fixtures)
    adapter, head = write_reward_adapter(os.path.join(out, "reward_lora"), cfg)
    gen_pairwise(out, cfg, weights, adapter, head, self_check)
    gen_pointwise(out, cfg, weights, adapter, head, self_check)


OUTPUTS = ["reward_lora/adapter_config.json", "reward_lora/adapter_model.safetensors",
           "reward_pairwise.safetensors", "reward_pointwise.safetensors"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fixtures = os.path.join(REPO, "tests", "fixtures")
    parser.add_argument("--fixtures", default=fixtures, help="where tiny/ is read (default: tests/fixtures)")
    parser.add_argument("--out", default=fixtures, help="output directory (default: tests/fixtures)")
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    parser.add_argument("--no-self-check", action="store_true", help="skip the finite-difference checks")
    args = parser.parse_args()
    torch.set_num_threads(1)  # identical float64 reductions run to run
    if not args.check:
        generate(args.fixtures, args.out, not args.no_self_check)
        total = sum(os.path.getsize(os.path.join(args.out, f)) for f in OUTPUTS)
        print(f"wrote {len(OUTPUTS)} files, {total} bytes, to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(args.fixtures, tmp, not args.no_self_check)
        bad = [f for f in OUTPUTS if not os.path.exists(os.path.join(args.out, f))
               or not filecmp.cmp(os.path.join(tmp, f), os.path.join(args.out, f), False)]
        for f in bad:
            print(f"differs: {f}")
        print("reward fixtures are up to date" if not bad else f"{len(bad)} reward fixture files differ")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
