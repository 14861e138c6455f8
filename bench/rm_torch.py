#!/usr/bin/env python3
"""PyTorch side of `perl_comparison --task rm`: one pairwise (Bradley-Terry)
reward-model training step, LoRA (r=8, alpha=16, q,k,v,o, B=0 init) vs full
fine-tuning (every layer weight and norm trainable, embeddings frozen, as
libperl's LIBPERL_MODE_FULL default), scalar head on the final hidden state of
the last token, AdamW (lr 1e-5) with global-norm clipping at 1.0, fp32.

The model is bench/torch_common's llama_ref Llama (HF math, eager attention).
Chosen and rejected rows go through one forward of 2*batch rows.

    OMP_WAIT_POLICY=passive python3 bench/rm_torch.py --mode lora|full --base random768|random288 \
        --batch 2 --seq 64 --steps 5 --warmup 1 --threads 1

Prints one JSON line with perl_comparison's fields plus loadavg and CPU time.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_common as tc  # noqa: E402


def base_config(name, seq):
    lr = tc.ref()
    medium = name == "random768"
    return lr.LlamaConfig(dim=768 if medium else 288, hidden_dim=2048 if medium else 768,
                          n_layers=12 if medium else 6, n_heads=12 if medium else 6,
                          n_kv_heads=4 if medium else 6, head_dim=64 if medium else 48, vocab_size=32000,
                          max_seq_len=512, tied_embeddings=False)


def fill_tokens(n, vocab, seed):
    """perl_comparison.c's fill_tokens."""
    return [3 + (i * 2654435761 + seed * 97) % (vocab - 3) for i in range(n)]


def make_trainable(torch, cfg, weights, mode, seed):
    """(weights used by the trainable model, adapter or None, list of trainable tensors)."""
    lr = tc.ref()
    if mode == "lora":
        ad = lr.LoraAdapter(cfg, 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
        ad.init_random(torch.Generator().manual_seed(seed), std=0.02)
        for name, t in ad.tensors.items():
            if ".lora_B." in name:
                t.zero_()
            t.requires_grad_(True)
        return weights, ad, list(ad.tensors.values())
    own = dict(weights)
    params = []
    for name, t in weights.items():
        if name.startswith("model.layers.") or name == "model.norm.weight":
            own[name] = t.detach().clone().requires_grad_(True)  # private trainable copy
            params.append(own[name])
    return own, None, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--base", default="random768")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch = tc.configure_threads(a.threads)
    import torch.nn.functional as F

    cfg = base_config(a.base, a.seq)
    base = tc.random_weights(cfg)
    w, adapter, params = make_trainable(torch, cfg, base, a.mode, 7)
    head = (torch.randn(1, cfg.dim, generator=torch.Generator().manual_seed(0)) / (cfg.dim + 1) ** 0.5)
    head.requires_grad_(True)
    params.append(head)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    n = a.batch * a.seq
    chosen = torch.tensor(fill_tokens(n, cfg.vocab_size, 1)).view(a.batch, a.seq)
    rejected = torch.tensor(fill_tokens(n, cfg.vocab_size, 2)).view(a.batch, a.seq)
    both = torch.cat([chosen, rejected])

    def step():
        opt.zero_grad(set_to_none=True)
        _, hidden = tc.forward(cfg, w, both, adapter=adapter, training=True, want_logits=False)
        r = F.linear(hidden[:, -1], head)[:, 0]
        loss = -F.logsigmoid(r[:a.batch] - r[a.batch:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    load0 = tc.loadavg1()
    for _ in range(a.warmup):
        step()
    times, cpus = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    med = tc.median(times)
    rec = {"bench": "rm_torch", "impl": "pytorch", "task": "rm", "mode": a.mode, "base": a.base,
           "batch": a.batch, "seq": a.seq, "prompt": 0, "response": 0, "threads": a.threads, "steps": a.steps,
           "precision": "fp32", "median_s": round(med, 4), "median_cpu_s": round(tc.median(cpus), 4),
           "tokens_per_s": round(2 * n / med, 1), "peak_rss_mb": round(tc.peak_rss_mb(), 1),
           "trainable_params": sum(p.numel() for p in params), "loadavg_start": load0,
           "loadavg_end": tc.loadavg1()}
    rec.update(tc.thread_env())
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
