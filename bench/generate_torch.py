#!/usr/bin/env python3
"""PyTorch side of bench/generate.c: KV-cached greedy decode from BOS.

The math is tests/reference/llama_ref.py's Llama (HF LlamaForCausalLM, eager
attention), restated as a cached decoder the way HF generate() runs on CPU:
one forward per new token over [batch, 1] with a preallocated K/V cache,
torch.no_grad, F.linear projections, argmax.  stories260K is read with
bench/torch_common.load_llama2c (RoPE rows permuted to HF's half split), so the
greedy tokens equal libperl's and llama2c_decode's.

    OMP_WAIT_POLICY=passive python3 bench/generate_torch.py --model stories260K|random768 \
        --batch B --new N --threads T --reps R

Prints one JSON line (same fields as bench/generate.c).
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
    ap.add_argument("--model", default="stories260K")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    torch = tc.configure_threads(a.threads)
    import torch.nn.functional as F

    lr = tc.ref()
    if a.model == "random768":
        cfg = tc.random768_config(512)
        cfg.max_seq_len = 512
        w = tc.random_weights(cfg)
    else:
        path = a.model
        if a.model == "stories260K":
            path = os.path.join(os.environ.get("PERL_SHARED_DIR") or "../shared", "models", "stories260K.bin")
        cfg, w = tc.load_llama2c(path)
    n_new = min(a.new, cfg.max_seq_len)
    B, H, Hkv, D, L = a.batch, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    rep = H // Hkv
    cos_all, sin_all = lr.rope_cos_sin(cfg, cfg.max_seq_len, torch.float32)
    lm_head = w["model.embed_tokens.weight"] if cfg.tied_embeddings else w["lm_head.weight"]
    layers = []
    for i in range(L):
        p = f"model.layers.{i}."
        layers.append([w[p + n] for n in ("input_layernorm.weight", "self_attn.q_proj.weight",
                                          "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                          "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")])
    eps = cfg.rms_norm_eps

    def decode():
        kc = torch.zeros(L, B, Hkv, n_new, D)
        vc = torch.zeros(L, B, Hkv, n_new, D)
        tok = torch.full((B,), 1, dtype=torch.int64)  # BOS
        out = []
        for pos in range(n_new):
            x = w["model.embed_tokens.weight"][tok].unsqueeze(1)  # [B, 1, dim]
            cos, sin = cos_all[pos:pos + 1], sin_all[pos:pos + 1]
            for i, (n1, wq, wk, wv, wo, n2, wg, wu, wd) in enumerate(layers):
                h = lr.rms_norm(x, n1, eps)
                q = F.linear(h, wq).view(B, 1, H, D).transpose(1, 2)
                k = F.linear(h, wk).view(B, 1, Hkv, D).transpose(1, 2)
                v = F.linear(h, wv).view(B, 1, Hkv, D).transpose(1, 2)
                q, k = lr.apply_rope(q, cos, sin), lr.apply_rope(k, cos, sin)
                kc[i, :, :, pos:pos + 1] = k
                vc[i, :, :, pos:pos + 1] = v
                kk = kc[i, :, :, :pos + 1].repeat_interleave(rep, dim=1)
                vv = vc[i, :, :, :pos + 1].repeat_interleave(rep, dim=1)
                att = torch.softmax((q @ kk.transpose(-1, -2)) / math.sqrt(D), dim=-1) @ vv
                x = x + F.linear(att.transpose(1, 2).reshape(B, 1, H * D), wo)
                h = lr.rms_norm(x, n2, eps)
                x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
            logits = F.linear(lr.rms_norm(x, w["model.norm.weight"], eps), lm_head)[:, 0]
            tok = logits.argmax(-1)
            out.append(tok)
        return torch.stack(out, 1)

    load0 = tc.loadavg1()
    with torch.no_grad():
        for _ in range(a.warmup):
            decode()
        times, cpus = [], []
        for _ in range(a.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            toks = decode()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    med, cmed = tc.median(times), tc.median(cpus)
    rec = {"bench": "generate", "impl": "pytorch", "model": a.model, "batch": B, "new_tokens": n_new,
           "threads": a.threads, "reps": a.reps, "precision": "fp32", "median_s": round(med, 5),
           "min_s": round(min(times), 5), "tokens_per_s": round(B * n_new / med, 1),
           "per_stream_tokens_per_s": round(n_new / med, 1), "median_cpu_s": round(cmed, 5),
           "tokens_per_cpu_s": round(B * n_new / cmed, 1), "peak_rss_mb": round(tc.peak_rss_mb(), 1),
           "loadavg_start": load0, "loadavg_end": tc.loadavg1(), "first_tokens": toks[0, :16].tolist()}
    rec.update(tc.thread_env())
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
