#!/usr/bin/python3
"""PyTorch equivalent of bench/forward.c: eval / no_grad fp32 forward, logits for
every position or hidden states only, one JSON line on stdout.

    OMP_WAIT_POLICY=passive /usr/bin/python3 bench/forward_torch.py \
        [--model stories260K|random768] [--batch B] [--seq T] [--threads N] \
        [--output logits|hidden] [--warmup W] [--reps R]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_common as tc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stories260K", choices=["stories260K", "random768"])
    ap.add_argument("--path", default=None)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default="logits", choices=["logits", "hidden"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()

    start_rss = tc.current_rss_mb()
    torch = tc.configure_threads(args.threads)
    import_rss = tc.current_rss_mb()
    if args.model == "stories260K":
        shared = os.environ.get("PERL_SHARED_DIR") or "../shared"
        path = args.path or os.path.join(shared, "models", "stories260K.bin")
        cfg, weights = tc.load_llama2c(path)
        batch = args.batch or 8
    else:
        cfg = tc.random768_config(args.seq)
        weights = tc.random_weights(cfg)
        batch = args.batch or 4
    tokens = tc.random_tokens(batch, args.seq, cfg.vocab_size)
    want_logits = args.output == "logits"

    times = []
    cpu = wall = busy = 0.0
    load_before = tc.loadavg1()
    with torch.no_grad():
        for i in range(args.warmup + args.reps):
            with tc.CpuTimer() as t:
                logits, hidden = tc.forward(cfg, weights, tokens, want_logits=want_logits)
            if i >= args.warmup:
                times.append(t.wall)
                cpu += t.cpu
                wall += t.wall
                busy += t.busy
    med = tc.median(times)
    flops = tc.model_flops(cfg, batch, args.seq, want_logits)
    n_params = sum(w.numel() for w in weights.values())
    rec = {
        "bench": "forward", "impl": "pytorch", "name": f"forward_{args.output}", "model": args.model,
        "output": args.output, "batch": batch, "seq_len": args.seq, "threads": args.threads,
        "shape": {"dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "params": n_params},
        "warmup": args.warmup, "reps": args.reps, "median_s": med, "min_s": min(times),
        "mean_s": sum(times) / len(times), "tokens_per_s": batch * args.seq / med, "flops": flops,
        "gflops_per_s": flops / med * 1e-9, "peak_rss_mb": tc.peak_rss_mb(), "start_rss_mb": start_rss,
        "import_rss_mb": import_rss, "cpu_util": cpu / (wall * args.threads),
        "other_cpu": max(0.0, (busy - cpu) / wall), "online_cpus": os.cpu_count(), "loadavg_before": load_before,
        "config": {"api": "eval, torch.no_grad(), llama_ref layers (eager attention)", "dtype": "f32",
                   "lengths": "all full", "tied_embeddings": cfg.tied_embeddings, **tc.thread_env()},
    }
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
