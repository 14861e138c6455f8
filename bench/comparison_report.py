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


def find(recs, **kw):
    for r in recs:
        if all(r.get(k) == v or (k == "impl" and impl_of(r) == v) for k, v in kw.items()):
            return r
    return None


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


# (field, label, whether LoRA / full is a meaningful ratio: not for signed rewards)
DEMO_FIELDS = [("reward_acc_end", "RM held-out accuracy", True), ("rl_reward_start", "RL reward, first tenth", False),
               ("rl_reward_end", "RL reward, last tenth", False),
               ("heldout_reward_after", "held-out reward after RL", False),
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
        for title, render in (("LoRA ÷ full", ratios_table), ("libperl against PyTorch", versus_table),
                              ("Raw medians", raw_table), ("Generation", gen_table)):
            body = render(recs)
            if body.count("\n") > 1:
                print(f"### {title}\n\n{body}\n")
    if a.demo:
        print(f"### The demo's base: LoRA against full fine-tuning\n\n{demo_table(a.demo)}\n")


if __name__ == "__main__":
    main()
