#!/usr/bin/env python3
"""Markdown tables for docs/perl-comparison.md from the JSON lines that
bench/comparison.sh and bench/demo_comparison.sh append.

    python3 bench/comparison_report.py build/bench/comparison.jsonl \
        [--demo build/bench/demo_comparison.jsonl]

For each configuration the last line wins (a rerun replaces an earlier one).
Prints: the LoRA / full ratios beside the paper's, libperl against PyTorch for
the same step (issue 9's fp32 targets), the raw medians (with the RL step's
generate / score / train phases), generation throughput, and the demo-base
comparison (quality at equal steps, seconds per step, peak RSS).
"""

import argparse
import json
import statistics

PAPER = {"rm": "0.5, 0.5", "rl": "0.85, 0.75"}  # LoRA / full: time, memory ("up to 2x", "50% less", ...)
TASK_NAME = {"rm": "RM step", "rl": "RL loop"}


def load(path):
    """The last record of each configuration, in first-seen order."""
    recs = {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        key = (r.get("bench"), r.get("task"), r.get("mode"), r.get("base"), r.get("model"), r.get("batch"),
               r.get("seq"), r.get("prompt"), r.get("response"), r.get("threads"), r.get("new_tokens", r.get("new")),
               r.get("impl"), r.get("openmp"), r.get("recompute"), r.get("seed"))
        recs.pop(key, None)
        recs[key] = r
    return list(recs.values())


def impl_of(r):
    return r.get("impl", "libperl" if r["bench"] == "perl_comparison" else "pytorch")


def shape_of(r):
    shape = f"{r['batch']} pairs x {r['seq']}" if r["task"] == "rm" else f"{r['batch']} x ({r['prompt']} + {r['response']})"
    return shape + (", recompute" if r.get("recompute") else "")


def f(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(f(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def steps(recs):
    return [r for r in recs if r.get("bench") in ("perl_comparison", "rm_torch", "rl_torch")]


def groups(recs):
    """(task, base, shape) in first-seen order."""
    seen = []
    for r in steps(recs):
        g = (r["task"], r["base"], shape_of(r))
        if g not in seen:
            seen.append(g)
    return seen


def pick(recs, task, base, shape, impl, mode):
    for r in steps(recs):
        if (r["task"], r["base"], shape_of(r), impl_of(r), r["mode"]) == (task, base, shape, impl, mode):
            return r
    return None


def ratio(a, b, field):
    return a[field] / b[field] if a and b and a.get(field) and b.get(field) else None


def ratios_table(recs):
    rows = []
    for task, base, shape in groups(recs):
        lp = [pick(recs, task, base, shape, "libperl", m) for m in ("lora", "full")]
        pt = [pick(recs, task, base, shape, "pytorch", m) for m in ("lora", "full")]
        rows.append([TASK_NAME[task], base, shape, PAPER[task], ratio(*lp, "median_s"), ratio(*lp, "peak_rss_mb"),
                     ratio(*pt, "median_s"), ratio(*pt, "peak_rss_mb")])
    return table(["step", "base", "shape", "paper (time, memory)", "libperl time", "libperl peak RSS",
                  "PyTorch time", "PyTorch peak RSS"], rows)


def versus_table(recs):
    rows = []
    for task, base, shape in groups(recs):
        for mode in ("lora", "full"):
            a, b = pick(recs, task, base, shape, "libperl", mode), pick(recs, task, base, shape, "pytorch", mode)
            if not (a and b):
                continue
            row = [TASK_NAME[task], base, shape, mode, b["median_s"] / a["median_s"], a["peak_rss_mb"] / b["peak_rss_mb"]]
            if task == "rl" and a.get("train_s") and b.get("train_s"):
                row.append(b["train_s"] / a["train_s"])
            else:
                row.append(None)
            rows.append(row)
    return table(["step", "base", "shape", "mode", "speed-up (PyTorch s ÷ libperl s)", "libperl RSS ÷ PyTorch",
                  "policy-gradient step (train phase) speed-up"], rows)


def raw_table(recs):
    rows = []
    for r in steps(recs):
        rows.append([TASK_NAME[r["task"]], r["base"], shape_of(r), impl_of(r), r["mode"], r["median_s"],
                     r.get("tokens_per_s"), r["peak_rss_mb"], r.get("process_cpu_s"), r.get("generate_s"),
                     r.get("score_s"), r.get("train_s"),
                     f"{r.get('loadavg_start', 0):.2f}–{r.get('loadavg_end', 0):.2f}"])
    return table(["step", "base", "shape", "impl", "mode", "median s/step", "tok/s", "peak RSS MB", "process CPU s",
                  "generate s", "score s", "train s", "load avg"], rows)


def gen_table(recs):
    rows = []
    for r in recs:
        if r.get("bench") not in ("generate", "llama2c_decode"):
            continue
        impl = r.get("impl", "llama2c") + (" (OpenMP)" if r.get("openmp") else "")
        rows.append([r.get("model"), impl, r.get("batch", 1), r.get("threads", 1), r.get("new_tokens"),
                     r.get("tokens_per_s"), r.get("tokens_per_cpu_s"), r.get("peak_rss_mb")])
    return table(["model", "impl", "batch", "threads", "new tokens", "tok/s (wall)", "tok/CPU-s", "peak RSS MB"], rows)


def sel(recs, **kw):
    """The last record whose fields equal kw (impl compared through impl_of)."""
    hit = None
    for r in recs:
        if all((impl_of(r) if k == "impl" else r.get(k, 0 if k in ("recompute", "openmp") else None)) == v
               for k, v in kw.items()):
            hit = r
    return hit


def targets_table(recs):
    """Issue 9's targets that these JSON lines can answer (the SFT roofline row
    comes from bench/report.py's tables in docs/benchmarks.md)."""
    rows = []
    rm = dict(task="rm", batch=4, seq=256, threads=1)
    rl = dict(task="rl", batch=4, prompt=192, response=64, threads=1)

    def g(r, field):
        return r.get(field) if r else None

    def step_row(label, base, shape, spec, field):
        a = sel(recs, impl="libperl", mode="lora", base=base, recompute=0, **spec)
        b = sel(recs, impl="pytorch", mode="lora", base=base, **spec)
        if not (a and b):
            return
        speed = g(b, field) / g(a, field) if g(a, field) and g(b, field) else None
        rows.append([label, f"{base}, {shape}", f"{g(b, field):.2f} s", f"{g(a, field):.2f} s",
                     f"{speed:.2f}x" if speed else None, "yes" if speed and speed >= 1.3 else "no"])
        if field != "median_s":
            return  # a phase of the same process: its peak RSS is the loop's
        rss = g(a, "peak_rss_mb") / g(b, "peak_rss_mb")
        rows.append([f"peak RSS <= 0.4x PyTorch ({label.split(' ')[1]} {label.split(' ')[2]})", f"{base}, {shape}",
                     f"{g(b, 'peak_rss_mb'):,.0f} MB", f"{g(a, 'peak_rss_mb'):,.0f} MB", f"{rss:.2f}",
                     "yes" if rss <= 0.4 else "no"])
        c = sel(recs, impl="libperl", mode="lora", base=base, recompute=1, **spec)
        if c:  # the other point of the trade-off: libperl recomputing activations, PyTorch not
            rss, speed = c["peak_rss_mb"] / b["peak_rss_mb"], b["median_s"] / c["median_s"]
            rows.append([f"  the same, libperl with --recompute 1: speed-up {speed:.2f}x", f"{base}, {shape}",
                         f"{b['peak_rss_mb']:,.0f} MB", f"{c['peak_rss_mb']:,.0f} MB", f"{rss:.2f}",
                         "yes" if rss <= 0.4 else "no"])

    for base in ("random768", "random288"):
        step_row("LoRA RM step >= 1.3x PyTorch", base, "4 pairs x 256", rm, "median_s")
        step_row("LoRA RL loop >= 1.3x PyTorch", base, "4 x (192 + 64)", rl, "median_s")
        step_row("LoRA policy-gradient step (train phase) >= 1.3x PyTorch", base, "4 x (192 + 64)", rl, "train_s")
    for spec, label, t_goal, m_goal in ((rm, "LoRA / full, RM step", 0.5, 0.35), (rl, "LoRA / full, RL loop", 0.70, 0.45)):
        for recompute in (0, 1):
            out = []
            for impl in ("pytorch", "libperl"):
                lo = sel(recs, impl=impl, mode="lora", base="random768", **spec)
                fu = sel(recs, impl=impl, mode="full", base="random768", **spec)
                if impl == "libperl":
                    lo = sel(recs, impl=impl, mode="lora", base="random768", recompute=recompute, **spec)
                    fu = sel(recs, impl=impl, mode="full", base="random768", recompute=recompute, **spec)
                elif recompute:
                    lo = fu = None
                out.append((lo["median_s"] / fu["median_s"], lo["peak_rss_mb"] / fu["peak_rss_mb"]) if lo and fu else None)
            if out[1] is None:
                continue
            met = f"time {'yes' if out[1][0] <= t_goal else 'no'}, memory {'yes' if out[1][1] <= m_goal else 'no'}"
            rows.append([f"{label}: time <= {t_goal}, memory <= {m_goal}" + (" (recompute)" if recompute else ""),
                         "random768", f"{out[0][0]:.2f} / {out[0][1]:.2f}" if out[0] else "–",
                         f"{out[1][0]:.2f} / {out[1][1]:.2f}", "–", met])
    lp1 = sel(recs, bench="generate", impl="libperl", model="stories260K", batch=1, threads=1)
    l2c = sel(recs, bench="generate", impl="llama2c", model="stories260K", openmp=0)
    if lp1 and l2c:
        r = lp1["tokens_per_cpu_s"] / l2c["tokens_per_cpu_s"]
        rows.append(["single-stream decode >= llama2.c-style (tok/CPU-s)", "stories260K, 256 tokens",
                     f"{l2c['tokens_per_cpu_s']:,.0f}", f"{lp1['tokens_per_cpu_s']:,.0f}", f"{r:.2f}x",
                     "yes" if r >= 1 else "no"])
    for model in ("stories260K", "random768"):
        one = sel(recs, bench="generate", impl="libperl", model=model, batch=1, threads=1)
        sixteen = sel(recs, bench="generate", impl="libperl", model=model, batch=16, threads=1)
        if one and sixteen:
            r = sixteen["tokens_per_s"] / one["tokens_per_s"]
            rows.append(["batch-16 decode >= 8x single stream (tok/s)", model, "–",
                         f"{one['tokens_per_s']:,.0f} -> {sixteen['tokens_per_s']:,.0f}", f"{r:.2f}x",
                         "yes" if r >= 8 else "no"])
    return table(["target", "shape", "PyTorch", "libperl", "ratio", "met?"], rows)


# (field, label, whether LoRA / full is a meaningful ratio: not for signed rewards)
DEMO_FIELDS = [("reward_acc_end", "RM held-out accuracy", True), ("rl_reward_start", "RL reward, first tenth", False),
               ("rl_reward_end", "RL reward, last tenth", False),
               ("heldout_reward_after", "held-out reward after RL", False),
               ("rules_before", "replies following all rules before RL (the base)", False),
               ("rules_after", "replies following all rules after RL", True), ("rl_kl_end", "KL at the end", True),
               ("reward_step_s", "RM s/step", True), ("rl_step_s", "RL s/step", True),
               ("reward_peak_rss_mb", "peak RSS after RM, MB", True), ("rl_peak_rss_mb", "peak RSS after RL, MB", True),
               ("reward_params", "trainable parameters (RM)", True)]


def demo_table(path):
    recs = [json.loads(x) for x in open(path) if x.startswith("{")]
    by_mode = {m: [r for r in recs if r["mode"] == m] for m in ("lora", "full")}
    seeds = sorted({r["seed"] for r in recs})
    rows = []
    for field, label, has_ratio in DEMO_FIELDS:
        vals = {m: [r[field] for r in by_mode[m]] for m in by_mode}
        means = {m: statistics.mean(v) if v else None for m, v in vals.items()}
        per_seed = {m: " / ".join(f(x) for x in v) for m, v in vals.items()}
        rows.append([label, means["lora"], per_seed["lora"], means["full"], per_seed["full"],
                     means["lora"] / means["full"] if has_ratio and means["lora"] and means["full"] else None])
    head = f"seeds {', '.join(map(str, seeds))}; threads {recs[0]['threads']}" if recs else "no runs"
    return head + "\n\n" + table(["", "LoRA (mean)", "LoRA per seed", "full (mean)", "full per seed", "LoRA ÷ full"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="?", help="comparison.sh output")
    ap.add_argument("--demo", help="demo_comparison.sh output")
    a = ap.parse_args()
    if a.jsonl:
        recs = load(a.jsonl)
        for title, render in (("Issue 9's targets", targets_table), ("LoRA ÷ full", ratios_table), ("libperl against PyTorch", versus_table),
                              ("Raw medians", raw_table), ("Generation", gen_table)):
            body = render(recs)
            if body.count("\n") > 1:
                print(f"### {title}\n\n{body}\n")
    if a.demo:
        print(f"### The demo's base: LoRA against full fine-tuning\n\n{demo_table(a.demo)}\n")


if __name__ == "__main__":
    main()
