#!/usr/bin/env python3
"""Generates the policy-trainer fixtures (tests/fixtures/policy_*) with plain PyTorch.

    python3 tests/reference/gen_policy_fixtures.py            # (re)write the policy fixtures
    python3 tests/reference/gen_policy_fixtures.py --check    # regenerate in a temp dir, compare

Every objective of perl_policy_step (REINFORCE, RLOO, GRPO, PPO-clip with a
value head and GAE; each KL estimator k1/k2/k3 both in the reward and in the
loss; entropy bonus; whitening; token and sequence normalisation) is written
here a second time, straight from docs/policy.md, on the `tiny` GQA model
(tests/fixtures/tiny) with a non-zero LoRA policy adapter (policy_lora/) and a
value adapter with a scalar head (policy_value/).  Reference math runs in
float64 on the stored float32 values; torch.autograd gives the gradients.
Each case file holds the inputs, the loss and stats, and the gradient of the
policy adapter (PEFT names) and, for PPO, of the value adapter
("value." + PEFT name, head "value.base_model.model.score.weight").  The
options are in the metadata.  tests/test_policy.c reads them.
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

from gen_fixtures import TINY, check_fd, generator, write_json  # noqa: E402
from llama_ref import LORA_TARGETS, LoraAdapter, forward  # noqa: E402
from safetensors_io import load_file, save_file  # noqa: E402

FORMAT = "libperl-fixture"
VERSION = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = "base_model.model.score.weight"

# The batch: 4 rows (2 groups of 2), ragged prompts and responses, padding 0.
PROMPT_LENS = [3, 5, 2, 4]
RESPONSE_LENS = [4, 2, 5, 3]
REWARDS = [1.0, -0.5, 0.25, 2.0]
OLD_NOISE = 0.3  # std of the perturbation of the PPO old log-probs, so some ratios clip

# enums of libperl.h
REINFORCE, RLOO, GRPO, PPO = 0, 1, 2, 3
K1, K2, K3 = 0, 1, 2
IN_REWARD, IN_LOSS = 0, 1
NORM_TOKEN, NORM_SEQUENCE = 0, 1

# Coefficients are dyadic so the float32 options of the C test are these exact values.
BASE = dict(algorithm=REINFORCE, group_size=1, kl_coef=0.125, kl_estimator=K1, kl_mode=IN_REWARD,
            entropy_coef=0.0, whiten=0, loss_norm=NORM_TOKEN, clip_eps=0.25, gamma=1.0, lam=0.9375,
            value_coef=0.5, value_clip=0.0, use_value=0, use_old=0)
CASES = {
    "reinforce_k1_reward": dict(entropy_coef=0.03125),
    "reinforce_k2_loss_seq_whiten": dict(kl_coef=0.25, kl_estimator=K2, kl_mode=IN_LOSS, loss_norm=NORM_SEQUENCE,
                                         whiten=1),
    "rloo_k3_reward": dict(algorithm=RLOO, group_size=2, kl_estimator=K3, entropy_coef=0.0625),
    "rloo_k1_loss_seq": dict(algorithm=RLOO, group_size=2, kl_coef=0.375, kl_mode=IN_LOSS, loss_norm=NORM_SEQUENCE),
    "grpo_k3_loss": dict(algorithm=GRPO, group_size=2, kl_coef=0.0625, kl_estimator=K3, kl_mode=IN_LOSS,
                         entropy_coef=0.03125),
    "grpo_k2_reward_whiten_seq": dict(algorithm=GRPO, group_size=2, kl_estimator=K2, whiten=1,
                                      loss_norm=NORM_SEQUENCE),
    "ppo_k1_reward_vclip": dict(algorithm=PPO, use_value=1, use_old=1, entropy_coef=0.03125, gamma=0.96875,
                                value_clip=0.125),
    "ppo_k3_loss_whiten_seq": dict(algorithm=PPO, use_value=1, use_old=1, kl_estimator=K3, kl_mode=IN_LOSS,
                                   whiten=1, loss_norm=NORM_SEQUENCE, kl_coef=0.25),
    "ppo_k2_reward_novalue": dict(algorithm=PPO, kl_estimator=K2, kl_coef=0.5),
}


def meta(kind, **extra):
    m = {"format": FORMAT, "version": VERSION, "kind": kind,
         "generator": "tests/reference/gen_policy_fixtures.py"}
    m.update({k: str(v) for k, v in extra.items()})
    return m


# ---- models, adapters, batch ---------------------------------------------------


def load_tiny():
    stored, _ = load_file(os.path.join(REPO, "tests", "fixtures", "tiny", "model.safetensors"))
    return {name: w.double() for name, w in stored.items()}


def write_adapter(path, adapter, head=None):
    """PEFT directory; with a head, a SEQ_CLS adapter whose score.weight is the value head.

    Returns float64 copies of what the files hold."""
    os.makedirs(path, exist_ok=True)
    config = adapter.adapter_config("tests/fixtures/tiny")
    tensors = dict(adapter.tensors)
    if head is not None:
        config["task_type"] = "SEQ_CLS"
        config["modules_to_save"] = ["score"]
        tensors[HEAD] = head
    write_json(os.path.join(path, "adapter_config.json"), config)
    save_file(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    stored, _ = load_file(os.path.join(path, "adapter_model.safetensors"))
    copy = LoraAdapter(adapter.cfg, adapter.r, adapter.alpha, adapter.targets, adapter.use_rslora)
    copy.tensors = {name: stored[name].double() for name in adapter.names()}
    return copy, (stored[HEAD].double().reshape(-1) if head is not None else None)


def make_batch():
    """Prompts [4, 5], responses [4, 5] (right-padded with 0), and the concatenation [4, 10]."""
    g = generator(21)
    B, p_max, r_max = len(PROMPT_LENS), max(PROMPT_LENS), max(RESPONSE_LENS)
    prompts = torch.zeros(B, p_max, dtype=torch.int64)
    responses = torch.zeros(B, r_max, dtype=torch.int64)
    seq = max(p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS))
    tokens = torch.zeros(B, seq, dtype=torch.int64)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        prompts[b, :p] = torch.randint(3, TINY.vocab_size, (p,), generator=g)
        responses[b, :r] = torch.randint(3, TINY.vocab_size, (r,), generator=g)
        tokens[b, :p], tokens[b, p:p + r] = prompts[b, :p], responses[b, :r]
    lengths = torch.tensor([p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)])
    return prompts, responses, tokens, lengths


def positions():
    """(row, position that predicts it, response index) of every response token, row after row."""
    return [(b, p - 1 + j, j) for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)) for j in range(r)]


def score(weights, tokens, lengths, adapter):
    """Per response token: log p(token), entropy; and the hidden state at the predicting position."""
    logits, hidden = forward(TINY, weights, tokens, lengths, adapter)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp, entropy, h = [], [], []
    for b, pos, j in positions():
        lp = logp_all[b, pos]
        logp.append(lp[tokens[b, PROMPT_LENS[b] + j]])
        entropy.append(-(lp.exp() * lp).sum())
        h.append(hidden[b, pos])
    return torch.stack(logp), torch.stack(entropy), torch.stack(h)


# ---- the objectives, as docs/policy.md states them --------------------------------


def kl_value(estimator, d):
    if estimator == K1:
        return d
    if estimator == K2:
        return 0.5 * d * d
    return torch.exp(-d) - 1.0 + d


def row_ids():
    return torch.tensor([b for b, _, _ in positions()])


def seq_advantages(c, rewards):
    r = rewards
    if c["algorithm"] == REINFORCE:
        return r - r.mean()  # a fresh trainer's baseline is the first batch's mean
    g = r.view(-1, c["group_size"])
    k = c["group_size"]
    if c["algorithm"] == RLOO:
        return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-8)).reshape(-1)


def whiten(x):
    return (x - x.mean()) / torch.sqrt(x.var() + 1e-8)  # unbiased variance


def weights_of(c):
    rows = row_ids()
    lens = torch.tensor(RESPONSE_LENS, dtype=torch.float64)
    if c["loss_norm"] == NORM_SEQUENCE:
        return 1.0 / (len(RESPONSE_LENS) * lens[rows])
    return torch.full((len(rows),), 1.0 / float(lens.sum()), dtype=torch.float64)


def reverse_cumsum_by_row(x):
    """out[t] = sum of x over t and the later tokens of its row."""
    out, rows = torch.zeros_like(x), row_ids()
    for b in range(len(RESPONSE_LENS)):
        idx = (rows == b).nonzero().reshape(-1)
        out[idx] = torch.flip(torch.cumsum(torch.flip(x[idx], [0]), 0), [0])
    return out


def pg_advantages(c, logp, ref, rewards):
    """REINFORCE / RLOO / GRPO per-token advantages: constants computed at the step's start."""
    adv = seq_advantages(c, rewards)[row_ids()]
    if c["kl_mode"] == IN_REWARD:
        adv = adv - c["kl_coef"] * reverse_cumsum_by_row(kl_value(c["kl_estimator"], logp - ref))
    return whiten(adv) if c["whiten"] else adv


def pg_loss(c, logp, entropy, ref, adv):
    kl = kl_value(c["kl_estimator"], logp - ref)
    loss_kl = c["kl_coef"] * kl if c["kl_mode"] == IN_LOSS else 0.0 * kl
    return (weights_of(c) * (-adv * logp + loss_kl - c["entropy_coef"] * entropy)).sum()


def gae(c, values, kl_reward, rewards):
    adv = torch.zeros_like(values)
    rows = row_ids()
    for b in range(len(RESPONSE_LENS)):
        idx = (rows == b).nonzero().reshape(-1).tolist()
        last = 0.0
        for n, t in reversed(list(enumerate(idx))):
            reward = -c["kl_coef"] * kl_reward[t] if c["kl_mode"] == IN_REWARD else 0.0
            if n == len(idx) - 1:
                reward = reward + rewards[b]
            next_value = values[idx[n + 1]] if n + 1 < len(idx) else 0.0
            delta = reward + c["gamma"] * next_value - values[t]
            last = delta + c["gamma"] * c["lam"] * last
            adv[t] = last
    return adv, adv + values


def ppo_advantages(c, old, ref, old_values, rewards):
    """GAE advantages (whitened if asked) and returns: constants of the step."""
    adv, ret = gae(c, old_values, kl_value(c["kl_estimator"], old - ref), rewards)
    return (whiten(adv) if c["whiten"] else adv), ret


def ppo_losses(c, logp, entropy, ref, old, adv, ret, values, old_values):
    """PPO-clip policy loss, value loss (without value_coef) or None, clip fraction."""
    w = weights_of(c)
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - c["clip_eps"], 1 + c["clip_eps"])
    kl_loss = c["kl_coef"] * kl_value(c["kl_estimator"], logp - ref) if c["kl_mode"] == IN_LOSS else 0.0 * logp
    policy = (w * (torch.maximum(pg1, pg2) + kl_loss - c["entropy_coef"] * entropy)).sum()
    clip_fraction = float((pg2 > pg1).double().mean())
    if values is None:
        return policy, None, clip_fraction
    plain = (values - ret) ** 2
    if c["value_clip"] > 0:
        clipped = old_values + torch.clamp(values - old_values, -c["value_clip"], c["value_clip"])
        plain = torch.maximum(plain, (clipped - ret) ** 2)
    return policy, (w * 0.5 * plain).sum(), clip_fraction


# ---- one case ----------------------------------------------------------------------


class Case:
    """One fixture: the step's constants at the current parameters, then the loss as a function of them."""

    def __init__(self, c, weights, batch, policy, value, value_head, old_all):
        self.c, self.weights, self.policy, self.value, self.value_head = c, weights, policy, value, value_head
        _, _, self.tokens, self.lengths = batch
        self.rewards = torch.tensor(REWARDS, dtype=torch.float64)
        with torch.no_grad():
            self.ref, _, _ = score(weights, self.tokens, self.lengths, None)
            logp, self.entropy0, _ = score(weights, self.tokens, self.lengths, policy)
            if c["algorithm"] != PPO:
                self.stats_logp = logp
                self.adv = pg_advantages(c, logp, self.ref, self.rewards)
                return
            self.old = old_all if c["use_old"] else logp
            self.stats_logp = self.old
            self.old_values = torch.zeros_like(logp)
            if c["use_value"]:
                _, _, h = score(weights, self.tokens, self.lengths, value)
                self.old_values = h @ value_head
            self.adv, self.ret = ppo_advantages(c, self.old, self.ref, self.old_values, self.rewards)

    def losses(self):
        """(policy loss, value loss or None, clip fraction) with gradients to the parameters."""
        c = self.c
        logp, entropy, _ = score(self.weights, self.tokens, self.lengths, self.policy)
        if c["algorithm"] != PPO:
            return pg_loss(c, logp, entropy, self.ref, self.adv), None, 0.0
        values = None
        if c["use_value"]:
            _, _, h = score(self.weights, self.tokens, self.lengths, self.value)
            values = h @ self.value_head
        return ppo_losses(c, logp, entropy, self.ref, self.old, self.adv, self.ret, values, self.old_values)

    def total(self):
        policy, value, _ = self.losses()
        return policy + (self.c["value_coef"] * value if value is not None else 0.0)


def gen_case(out, name, c, weights, batch, policy, value, value_head, old_all, self_check):
    prompts, responses, _, _ = batch
    case = Case(c, weights, batch, policy, value, value_head, old_all)
    params = dict(policy.tensors)
    if c["use_value"]:
        params.update({"value." + k: t for k, t in value.tensors.items()})
        params["value." + HEAD] = value_head
    for t in params.values():
        t.requires_grad_(True)
    policy_loss, value_loss, clip_fraction = case.losses()
    (policy_loss + (c["value_coef"] * value_loss if value_loss is not None else 0.0)).backward()
    grads = {k: t.grad.clone() for k, t in params.items()}
    if self_check:  # the step's constants stay fixed, so this is exactly the gradient the trainer uses
        check_fd(f"policy {name}", case.total, params, grads, 500 + len(name), per_tensor=1)
    for t in params.values():
        t.requires_grad_(False)
        t.grad = None
    kl = float((case.stats_logp - case.ref).sum()) / len(REWARDS)
    tensors = {
        "prompt_tokens": (prompts, "I32"), "prompt_lengths": (torch.tensor(PROMPT_LENS), "I32"),
        "responses": (responses, "I32"), "response_lengths": (torch.tensor(RESPONSE_LENS), "I32"),
        "rewards": (case.rewards, "F32"),
        "loss": (policy_loss.detach().reshape(1), "F32"),
        "kl": (torch.tensor([kl]), "F32"),
        "entropy": (case.entropy0.mean().reshape(1), "F32"),
        "clip_fraction": (torch.tensor([clip_fraction]), "F32"),
        "value_loss": (torch.tensor([float(value_loss) if value_loss is not None else 0.0]), "F32"),
    }
    if c["use_old"]:
        padded = torch.zeros(len(REWARDS), max(RESPONSE_LENS), dtype=torch.float64)
        for t, (b, _, j) in enumerate(positions()):
            padded[b, j] = old_all[t]
        tensors["old_logprobs"] = (padded, "F32")
    tensors.update({k: (g, "F32") for k, g in grads.items()})
    save_file(os.path.join(out, f"policy_{name}.safetensors"), tensors,
              meta("policy", model="tiny", adapter="policy_lora", value_adapter="policy_value", **c))


def generate(out, self_check=True):
    weights = load_tiny()
    policy = LoraAdapter(TINY, 4, 8.0, list(LORA_TARGETS)).init_random(generator(31), std=0.1)
    policy, _ = write_adapter(os.path.join(out, "policy_lora"), policy)
    value = LoraAdapter(TINY, 2, 4.0, ["q_proj", "v_proj"]).init_random(generator(32), std=0.1)
    head = torch.randn(1, TINY.dim, generator=generator(33), dtype=torch.float32) * 0.3
    value, value_head = write_adapter(os.path.join(out, "policy_value"), value, head)
    batch = make_batch()
    _, _, tokens, lengths = batch
    with torch.no_grad():
        logp, _, _ = score(weights, tokens, lengths, policy)
    noise = torch.randn(logp.shape, generator=generator(34), dtype=torch.float64) * OLD_NOISE
    old = (logp + noise).float().double()  # the float32 values the C test reads
    for name, overrides in CASES.items():
        c = dict(BASE, **overrides)
        gen_case(out, name, c, weights, batch, policy, value, value_head, old, self_check)


def policy_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files
                  if os.path.relpath(os.path.join(d, f), root).startswith("policy_"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures"),
                        help="output directory (default: tests/fixtures)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare with --out")
    parser.add_argument("--no-self-check", action="store_true", help="skip the finite-difference checks")
    args = parser.parse_args()
    torch.set_num_threads(1)  # identical float64 reductions run to run
    if not args.check:
        generate(args.out, not args.no_self_check)
        files = policy_files(args.out)
        total = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
        print(f"wrote {len(files)} files, {total} bytes, to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, not args.no_self_check)
        want, have = policy_files(tmp), policy_files(args.out)
        bad = sorted(set(want) ^ set(have))
        bad += [f for f in want if f in have and not filecmp.cmp(os.path.join(tmp, f),
                                                                 os.path.join(args.out, f), False)]
        for f in bad:
            print(f"differs: {f}")
        print("policy fixtures are up to date" if not bad else f"{len(bad)} policy fixture files differ")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
