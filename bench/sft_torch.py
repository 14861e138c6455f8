#!/usr/bin/python3
"""PyTorch equivalent of bench/sft_step.c: one SFT step (forward, shifted
cross-entropy over every next token, backward, clip_grad_norm_(1.0), AdamW)
on the same shapes, one JSON line per configuration (and a phase breakdown).

    OMP_WAIT_POLICY=passive /usr/bin/python3 bench/sft_torch.py \
        [--mode lora|full] [--recompute 0|1] [--rank R] [--batch B] [--seq T] \
        [--threads N] [--warmup W] [--reps R] [--model random768|stories260K]

LoRA: the base weights have requires_grad=False; each of q,k,v,o gets
A [r, in] (Kaiming-uniform a=sqrt(5), PEFT's default) and B [out, r] = 0 with
requires_grad=True, applied as y = x W^T + (alpha/r) (x A^T) B^T, as PEFT's
lora.Linear does (dropout 0).  Full: every tensor, embeddings and lm_head
included, requires grad.  AdamW(lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
weight_decay=0) matches perl_optim_options' defaults; zero_grad(set_to_none=True).
--recompute 1 wraps each decoder layer in torch.utils.checkpoint (non-reentrant).
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_common as tc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--recompute", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="random768", choices=["random768", "stories260K"])
    args = ap.parse_args()

    torch = tc.configure_threads(args.threads)
    import torch.nn.functional as F

    lr_mod = tc.ref()
    t_setup = time.perf_counter()
    if args.model == "random768":
        cfg = tc.random768_config(args.seq)
        weights = tc.random_weights(cfg)
    else:
        shared = os.environ.get("PERL_SHARED_DIR") or "../shared"
        cfg, weights = tc.load_llama2c(os.path.join(shared, "models", "stories260K.bin"))

    alpha = 2.0 * args.rank
    adapter = None
    if args.mode == "lora":
        targets = ("q_proj", "k_proj", "v_proj", "o_proj")
        adapter = lr_mod.LoraAdapter(cfg, args.rank, alpha, targets)
        for i in range(cfg.n_layers):
            for t in adapter.targets:
                out_f, in_f = cfg.linear_shape(t)
                a = torch.empty(args.rank, in_f)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT reset_lora_parameters
                adapter.tensors[adapter.name(i, t, "A")] = a.requires_grad_()
                adapter.tensors[adapter.name(i, t, "B")] = torch.zeros(out_f, args.rank, requires_grad=True)
        params = list(adapter.tensors.values())
    else:
        for w in weights.values():
            w.requires_grad_()
        params = list(weights.values())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    setup_s = time.perf_counter() - t_setup

    batch = args.batch
    tokens = tc.random_tokens(batch, args.seq, cfg.vocab_size)
    inputs_targets = tokens[:, 1:].reshape(-1)

    def step():
        """(loss, t_forward, t_backward, t_optimizer)"""
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits, _ = tc.forward(cfg, weights, tokens, adapter=adapter, training=True,
                               checkpoint=bool(args.recompute))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), inputs_targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t3 = time.perf_counter()
        return float(loss), t1 - t0, t2 - t1, t3 - t2

    times, phases = [], []
    first_loss = last_loss = None
    load_before = tc.loadavg1()
    cpu = wall = busy = 0.0
    for i in range(args.warmup + args.reps):
        with tc.CpuTimer() as t:
            loss, tf, tb, to = step()
        if first_loss is None:
            first_loss = loss
        last_loss = loss
        if i >= args.warmup:
            times.append(t.wall)
            phases.append((tf, tb, to))
            cpu += t.cpu
            wall += t.wall
            busy += t.busy
    med = tc.median(times)

    # model FLOPs: the formula of bench/sft_step.c (torch's head also scores the last position: ignored)
    n = batch * args.seq
    s = batch * (args.seq - 1)
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    ins = [cfg.dim, cfg.dim, cfg.dim, qd, cfg.dim, cfg.dim, cfg.hidden_dim]
    outs = [qd, kvd, kvd, cfg.dim, cfg.hidden_dim, cfg.hidden_dim, cfg.dim]
    dense = cfg.n_layers * sum(2.0 * n * a * b for a, b in zip(ins, outs))
    lora = 0.0 if args.mode == "full" else cfg.n_layers * sum(2.0 * n * args.rank * (a + b)
                                                              for a, b in zip(ins[:4], outs[:4]))
    attn = cfg.n_layers * 4.0 * cfg.head_dim * cfg.n_heads * batch * args.seq * (args.seq + 1) / 2.0
    lm = 2.0 * s * cfg.dim * cfg.vocab_size
    full = args.mode == "full"
    fwd = dense + lora + attn + lm
    bwd = dense * (2.0 if full else 1.0) + 2.0 * lora + 2.0 * attn + lm * (2.0 if full else 1.0)
    flops = fwd + bwd
    hw_flops = flops + (dense + lora + attn if args.recompute else 0.0)
    trainable = sum(p.numel() for p in params)
    name = f"sft_{args.mode}{'_recompute' if args.recompute else ''}"
    rec = {
        "bench": "sft_step", "impl": "pytorch", "name": name, "model": args.model, "mode": args.mode,
        "recompute": args.recompute, "batch": batch, "seq_len": args.seq, "threads": args.threads,
        "shape": {"dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
                  "params": sum(w.numel() for w in weights.values())},
        "trainable_params": trainable, "warmup": args.warmup, "reps": args.reps, "median_s": med,
        "min_s": min(times), "tokens_per_s": n / med, "flops": flops, "hw_flops": hw_flops, "forward_flops": fwd,
        "gflops_per_s": flops / med * 1e-9, "peak_rss_mb": tc.peak_rss_mb(), "setup_s": setup_s,
        "cpu_util": cpu / (wall * args.threads),
        "other_cpu": max(0.0, (busy - cpu) / wall), "online_cpus": os.cpu_count(), "loadavg_before": load_before,
        "first_loss": first_loss, "last_loss": last_loss,
        "config": {"api": "llama_ref layers + F.cross_entropy + backward + clip_grad_norm_ + AdamW",
                   "lora": f"r={args.rank} alpha={alpha:g} targets=q,k,v,o dropout=0" if not full else None,
                   "train_embeddings": 1 if full else 0,
                   "optimizer": "torch.optim.AdamW lr=0.0001 betas=(0.9,0.999) eps=1e-08 wd=0 clip=1 "
                                "(foreach default)",
                   "checkpoint": "torch.utils.checkpoint per layer, use_reentrant=False" if args.recompute else None,
                   "dtype": "f32", **tc.thread_env()},
    }
    print(json.dumps(rec), flush=True)
    print(json.dumps({
        "bench": "sft_phases", "impl": "pytorch", "name": name, "model": args.model, "mode": args.mode,
        "recompute": args.recompute, "batch": batch, "seq_len": args.seq, "threads": args.threads,
        "reps": args.reps, "step_median_s": med,
        "forward_loss_s": tc.median([p[0] for p in phases]),
        "backward_s": tc.median([p[1] for p in phases]),
        "optimizer_step_s": tc.median([p[2] for p in phases]),
        "forward_flops": fwd, "backward_flops": hw_flops - fwd, "lm_head_fwd_flops": lm,
        "peak_rss_mb": tc.peak_rss_mb(),
    }), flush=True)


if __name__ == "__main__":
    main()
