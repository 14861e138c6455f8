#!/usr/bin/env python3
"""PyTorch side of `perl_comparison --task rl`: one RL loop step =
  1. generate: KV-cached sampling (temperature 1) of `response` tokens from the
     policy for `batch` prompts of `prompt` tokens, keeping the log-probs;
  2. score: the reward model (its own LoRA / full copy + scalar head on the last
     token's final hidden state) on prompt + response, no gradients;
  3. policy step: policy log-probs with gradients, reference log-probs without
     (LoRA: the same base with the adapter disabled; full: a separate frozen
     reference copy of the weights), REINFORCE with a moving-average baseline and
     a per-token k1 KL penalty (coef 0.05) folded into the return, per-token mean
     loss, global-norm clip 1.0, AdamW lr 1e-5.
Same shapes, modes and optimizer as bench/perl_comparison.c; fp32.

    OMP_WAIT_POLICY=passive python3 bench/rl_torch.py --mode lora|full --base random768 \
        --batch 4 --prompt 32 --response 16 --steps 5 --warmup 1 --threads 1
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_common as tc  # noqa: E402
from rm_torch import base_config, fill_tokens, make_trainable  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--base", default="random768")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch = tc.configure_threads(a.threads)
    import torch.nn.functional as F

    lr = tc.ref()
    cfg = base_config(a.base, a.prompt + a.response)
    base = tc.random_weights(cfg)  # LoRA: the one frozen base; full: the reference copy
    pw, padapter, pparams = make_trainable(torch, cfg, base, a.mode, 11)
    rw, radapter, rparams = make_trainable(torch, cfg, base, a.mode, 12)
    head = torch.randn(1, cfg.dim, generator=torch.Generator().manual_seed(0)) / (cfg.dim + 1) ** 0.5
    rparams.append(head.requires_grad_(True))
    opt = torch.optim.AdamW(pparams, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    B, P, R, T = a.batch, a.prompt, a.response, a.prompt + a.response
    prompts = torch.tensor(fill_tokens(B * P, cfg.vocab_size, 3)).view(B, P)
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rep = H // Hkv
    cos_all, sin_all = lr.rope_cos_sin(cfg, T, torch.float32)
    eps = cfg.rms_norm_eps

    def cached_forward(w, ad, tokens, pos0, kc, vc):
        """Logits of the last position of tokens [B, n] at positions pos0.., filling the cache."""
        n = tokens.shape[1]
        cos, sin = cos_all[pos0:pos0 + n], sin_all[pos0:pos0 + n]
        x = w["model.embed_tokens.weight"][tokens]
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            h = lr.rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = lr.projection(w, ad, i, "q_proj", h).view(B, n, H, D).transpose(1, 2)
            k = lr.projection(w, ad, i, "k_proj", h).view(B, n, Hkv, D).transpose(1, 2)
            v = lr.projection(w, ad, i, "v_proj", h).view(B, n, Hkv, D).transpose(1, 2)
            q, k = lr.apply_rope(q, cos, sin), lr.apply_rope(k, cos, sin)
            kc[i][:, :, pos0:pos0 + n] = k
            vc[i][:, :, pos0:pos0 + n] = v
            kk = kc[i][:, :, :pos0 + n].repeat_interleave(rep, dim=1)
            vv = vc[i][:, :, :pos0 + n].repeat_interleave(rep, dim=1)
            s = (q @ kk.transpose(-1, -2)) / math.sqrt(D)
            if n > 1:
                mask = torch.ones(n, pos0 + n, dtype=torch.bool).tril(pos0)
                s = s.masked_fill(~mask, float("-inf"))
            att = torch.softmax(s, dim=-1) @ vv
            x = x + lr.projection(w, ad, i, "o_proj", att.transpose(1, 2).reshape(B, n, H * D))
            h = lr.rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + lr.projection(w, ad, i, "down_proj",
                                  F.silu(lr.projection(w, ad, i, "gate_proj", h)) * lr.projection(w, ad, i, "up_proj", h))
        hidden = lr.rms_norm(x[:, -1], w["model.norm.weight"], eps)
        return F.linear(hidden, w["lm_head.weight"])

    def generate(gen):
        kc = [torch.zeros(B, Hkv, T, D) for _ in range(cfg.n_layers)]
        vc = [torch.zeros(B, Hkv, T, D) for _ in range(cfg.n_layers)]
        logits = cached_forward(pw, padapter, prompts, 0, kc, vc)
        toks, logps = [], []
        for t in range(R):
            lp = torch.log_softmax(logits, -1)
            tok = torch.multinomial(lp.exp(), 1, generator=gen)[:, 0]
            toks.append(tok)
            logps.append(lp.gather(-1, tok[:, None])[:, 0])
            if t + 1 < R:
                logits = cached_forward(pw, padapter, tok[:, None], P + t, kc, vc)
        return torch.stack(toks, 1), torch.stack(logps, 1)

    def response_logprobs(w, ad, seq, training):
        logits, _ = tc.forward(cfg, w, seq, adapter=ad, training=training)
        lp = torch.log_softmax(logits[:, P - 1:T - 1], -1)
        return lp.gather(-1, seq[:, P:, None])[..., 0]

    baseline = [0.0]
    phases = {"generate_s": [], "score_s": [], "train_s": []}  # as perl_comparison splits the step

    def step(i):
        t0 = time.perf_counter()
        with torch.no_grad():
            resp, _old = generate(torch.Generator().manual_seed(100 + i))
            t1 = time.perf_counter()
            seq = torch.cat([prompts, resp], 1)
            _, hidden = tc.forward(cfg, rw, seq, adapter=radapter, want_logits=False)
            rewards = F.linear(hidden[:, -1], head)[:, 0]
            t2 = time.perf_counter()
            ref_lp = response_logprobs(base, None, seq, False)  # LoRA: adapter off; full: reference copy
        opt.zero_grad(set_to_none=True)
        lp = response_logprobs(pw, padapter, seq, True)
        kl = lp.detach() - ref_lp  # k1 per token
        shaped = -0.05 * kl
        shaped[:, -1] += rewards - baseline[0]
        returns = shaped.flip(1).cumsum(1).flip(1)  # reward-to-go
        loss = -(returns * lp).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pparams, 1.0)
        opt.step()
        baseline[0] = 0.9 * baseline[0] + 0.1 * float(rewards.mean())
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):  # train = reference + policy step
            phases[k].append(v)

    load0 = tc.loadavg1()
    for i in range(a.warmup):
        step(i)
    for v in phases.values():
        v.clear()
    times, cpus = [], []
    for i in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(100 + i)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    med = tc.median(times)
    rec = {"bench": "rl_torch", "impl": "pytorch", "task": "rl", "mode": a.mode, "base": a.base, "batch": B,
           "seq": 0, "prompt": P, "response": R, "threads": a.threads, "steps": a.steps, "precision": "fp32",
           "median_s": round(med, 4), "median_cpu_s": round(tc.median(cpus), 4),
           "tokens_per_s": round(B * T / med, 1), "peak_rss_mb": round(tc.peak_rss_mb(), 1),
           "trainable_params": sum(p.numel() for p in pparams), "loadavg_start": load0,
           "loadavg_end": tc.loadavg1()}
    rec.update({k: round(tc.median(v), 4) for k, v in phases.items()})
    rec.update(tc.thread_env())
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
