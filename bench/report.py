#!/usr/bin/env python3
"""Turns benchmark JSON lines into the Markdown tables of docs/benchmarks.md.

    python3 bench/report.py RESULTS.jsonl [...]                # print every table
    python3 bench/report.py RESULTS.jsonl --doc docs/benchmarks.md   # rewrite the doc's tables

Every benchmark program prints one JSON object per line with at least
"bench" (the group), "name" and usually "impl" (libperl / pytorch / openblas),
"threads", "median_s", "tokens_per_s", "peak_rss_mb".  Lines are grouped by
"bench"; each group becomes one table.  Known groups (forward, sft_step,
sft_phases, sgemm_roofline, sgemm, machine) have tailored tables; any other
group gets the generic table: one row per configuration (every field that is
not a measurement, impl or config), libperl and PyTorch side by side when both
exist, and the libperl/PyTorch ratios.

In --doc mode, the table of group G replaces whatever lies between the lines
    <!-- report:G -->   and   <!-- /report:G -->
A group with no such block in the doc is appended as a new "## G" section
with its block, so a new benchmark only has to print JSON lines with a new
"bench" value; the prose around the table is written by hand.  Lines that
are not JSON objects (build output, warnings) are ignored.
"""

import argparse
import json
import re
import sys

# Fields that are measurements or bookkeeping, never part of a configuration key (besides
# these, any field ending in _s, _mb, _per_s or flops).
MEASURE = {
    "impl", "median_s", "min_s", "mean_s", "tokens_per_s", "flops", "hw_flops", "forward_flops", "gflops_per_s",
    "peak_rss_mb", "start_rss_mb", "import_rss_mb", "checksum", "config", "warmup", "reps", "setup_s", "cpu_util",
    "loadavg_before", "first_loss", "last_loss", "trainable_params", "shape", "bench", "other_cpu", "online_cpus",
}


def is_measure(field):
    return field in MEASURE or field.endswith(("_s", "_mb", "_per_s", "flops"))


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    # a configuration measured twice (a rerun appended to the file): the last one wins
    latest = {}
    for r in rows:
        latest[json.dumps({k: v for k, v in r.items() if not is_measure(k) or k in ("impl", "bench")},
                          sort_keys=True)] = r
    return list(latest.values())


def fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.{digits}f}"
    return str(v)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(out)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def pair(rows, key_fields):
    """{key: {impl: row}} in first-seen order."""
    groups = {}
    for r in rows:
        key = tuple(r.get(k) for k in key_fields)
        groups.setdefault(key, {})[r.get("impl", "?")] = r
    return groups


def disturbed(r):
    """Other processes took time on the cores this measurement's threads needed (the machine is shared):
    they used more than the cores left free, plus 0.15."""
    other, cpus = r.get("other_cpu"), r.get("online_cpus")
    if other is None or not cpus:
        return False
    return other > max(0, cpus - r.get("threads", 1)) + 0.25


def busy_note(rows):
    """Names the measurements that were disturbed by other processes."""
    busy = [r for r in rows if disturbed(r)]
    if not busy:
        return ""
    names = ", ".join(f"{r.get('impl')} {r.get('name')} {r.get('model', '')} t={r.get('threads')} "
                      f"({r['other_cpu']:.2f})" for r in busy)
    return ("\n\nDisturbed: other processes used cores these measurements needed "
            f"(cores used by others in parentheses): {names}.")


# ---- tailored tables ---------------------------------------------------------------------------


def render_machine(rows):
    """The machine (last description), then one line per run that produced the results."""
    per_run = ("date", "libperl", "load_average_at_start", "groups")
    r = rows[-1]
    lines = ["| | |", "|---|---|"]
    for k, v in r.items():
        if k in ("bench", "name") or k in per_run:
            continue
        lines.append(f"| {k} | {v} |")
    runs = [[x.get(k) for k in per_run] for x in sorted(rows, key=lambda x: x.get("date", ""))]
    return "\n".join(lines) + "\n\nRuns whose results are shown:\n\n" + table(
        ["date", "libperl tree", "load average at start", "benchmark groups"], runs)


def render_forward(rows):
    keys = ["model", "output", "batch", "seq_len", "threads"]
    groups = pair(rows, keys)
    out = []
    for key, impls in groups.items():
        lp, pt = impls.get("libperl"), impls.get("pytorch")
        g = lambda r, f: r.get(f) if r else None  # noqa: E731
        out.append(list(key) + [
            g(lp, "median_s"), g(lp, "tokens_per_s"), g(lp, "gflops_per_s"), g(lp, "peak_rss_mb"),
            g(pt, "median_s"), g(pt, "tokens_per_s"), g(pt, "peak_rss_mb"),
            ratio(g(lp, "tokens_per_s"), g(pt, "tokens_per_s")), ratio(g(lp, "peak_rss_mb"), g(pt, "peak_rss_mb")),
        ])
    header = ["model", "output", "batch", "seq", "threads", "libperl median s", "libperl tok/s", "libperl GFLOP/s",
              "libperl peak RSS MB", "PyTorch median s", "PyTorch tok/s", "PyTorch peak RSS MB",
              "speed libperl/PyTorch", "RSS libperl/PyTorch"]
    return table(header, out) + busy_note(rows)


def roofline_for(roof, r):
    """The sgemm_roofline row for a step row (same threads and step variant)."""
    want = r.get("name")
    for x in roof:
        if (x.get("name") == want and x.get("threads") == r.get("threads")
                and x.get("tokens") == r.get("batch", 0) * r.get("seq_len", 0)
                and x.get("shape", {}).get("dim") == r.get("shape", {}).get("dim")):
            return x
    return None


def render_sft(rows, all_groups):
    roof = all_groups.get("sgemm_roofline", [])
    keys = ["model", "mode", "recompute", "batch", "seq_len", "threads"]
    groups = pair(rows, keys)
    out = []
    for key, impls in groups.items():
        lp, pt = impls.get("libperl"), impls.get("pytorch")
        g = lambda r, f: r.get(f) if r else None  # noqa: E731
        out.append(list(key) + [
            g(lp, "trainable_params"),
            g(lp, "median_s"), g(lp, "tokens_per_s"), g(lp, "peak_rss_mb"),
            g(pt, "median_s"), g(pt, "tokens_per_s"), g(pt, "peak_rss_mb"),
            ratio(g(lp, "tokens_per_s"), g(pt, "tokens_per_s")), ratio(g(lp, "peak_rss_mb"), g(pt, "peak_rss_mb")),
        ])
    header = ["model", "mode", "recompute", "batch", "seq", "threads", "trainable params",
              "libperl median s", "libperl tok/s", "libperl peak RSS MB",
              "PyTorch median s", "PyTorch tok/s", "PyTorch peak RSS MB",
              "speed libperl/PyTorch", "RSS libperl/PyTorch"]
    text = table(header, out)

    # efficiency: model FLOPs per second and the sgemm roofline
    eff = []
    for key, impls in groups.items():
        for impl in ("libperl", "pytorch"):
            r = impls.get(impl)
            if not r:
                continue
            rl = roofline_for(roof, r)
            peak = rl.get("square_2048_gflops_per_s") if rl else None
            ideal = rl.get("ideal_gemm_s") if rl else None
            eff.append([impl, r.get("mode"), r.get("recompute"), r.get("threads"), r.get("flops", 0) / 1e9,
                        r.get("gflops_per_s"), peak, ratio(r.get("gflops_per_s"), peak),
                        ideal, ratio(ideal, r.get("median_s")), r.get("first_loss"), r.get("last_loss")])
    if eff:
        text += "\n\nModel FLOPs per step (GEMMs + attention, recomputation not counted), achieved rate, and the " \
                "sgemm roofline (bench/sgemm_roofline.c at the same thread count): \"sgemm peak\" is cblas_sgemm " \
                "on 2048×2048×2048; \"GEMM-ideal s\" is the time the step's own GEMMs take when each runs at its " \
                "measured cblas_sgemm rate, so \"GEMM-ideal / step\" is the share of the step a perfect non-GEMM " \
                "part would leave:\n\n"
        text += table(["impl", "mode", "recompute", "threads", "GFLOP/step", "GFLOP/s", "sgemm peak GFLOP/s",
                       "fraction of peak", "GEMM-ideal s", "GEMM-ideal / step", "loss step 1", "loss last"], eff)
    return text + busy_note(rows)


def render_phases(rows):
    out = []
    for r in rows:
        if r.get("impl") == "libperl":
            fwd = r.get("forward_hidden_s")
            lp = r.get("token_logprobs_s")
            bwd = r.get("sft_backward_s")
            out.append(["libperl", r.get("mode"), r.get("recompute"), r.get("threads"), r.get("step_median_s"),
                        lp, bwd - lp if bwd is not None and lp is not None else None, r.get("optimizer_step_s"),
                        fwd, lp - fwd if lp is not None and fwd is not None else None])
        else:
            out.append(["pytorch", r.get("mode"), r.get("recompute"), r.get("threads"), r.get("step_median_s"),
                        r.get("forward_loss_s"), r.get("backward_s"), r.get("optimizer_step_s"), None, None])
    header = ["impl", "mode", "recompute", "threads", "step s", "forward + loss s", "backward s", "optimizer s",
              "forward (hidden only) s", "LM head + log-softmax s"]
    return table(header, out)


def render_roofline(rows):
    out = []
    for r in rows:
        out.append([r.get("name"), r.get("threads"), r.get("gemm_flops", 0) / 1e9, r.get("ideal_gemm_s"),
                    r.get("gemm_gflops_per_s"), r.get("peak_gflops_per_s"), r.get("square_2048_gflops_per_s")])
    header = ["GEMMs of", "threads", "GFLOP", "ideal s", "mean GFLOP/s", "best shape GFLOP/s", "2048³ GFLOP/s"]
    note = f"\n\nBLAS: {rows[0].get('blas')}; LM-head chunk {rows[0].get('lm_chunk')} rows." if rows else ""
    return table(header, out) + note + busy_note([r for r in rows if r.get("name") == "sft_lora"])


def render_sgemm(rows):
    by_shape = {}
    for r in rows:
        key = (r.get("name"), r.get("op"), r.get("M"), r.get("N"), r.get("K"))
        by_shape.setdefault(key, {})[r.get("threads")] = r.get("gflops_per_s")
    threads = sorted({r.get("threads") for r in rows})
    out = [list(k) + [v.get(t) for t in threads] for k, v in by_shape.items()]
    return table(["GEMM", "op", "M", "N", "K"] + [f"GFLOP/s {t}T" for t in threads], out)


# ---- generic table -----------------------------------------------------------------------------


def render_generic(rows):
    fields = []
    for r in rows:
        for k, v in r.items():
            if not is_measure(k) and k not in fields and not isinstance(v, (dict, list)):
                fields.append(k)
    groups = pair(rows, fields)
    impls = []
    for r in rows:
        if r.get("impl", "?") not in impls:
            impls.append(r.get("impl", "?"))
    header = list(fields)
    for impl in impls:
        header += [f"{impl} median s", f"{impl} tok/s", f"{impl} peak RSS MB"]
    both = "libperl" in impls and "pytorch" in impls
    if both:
        header += ["speed libperl/PyTorch", "RSS libperl/PyTorch"]
    out = []
    for key, by_impl in groups.items():
        row = list(key)
        for impl in impls:
            r = by_impl.get(impl, {})
            row += [r.get("median_s"), r.get("tokens_per_s"), r.get("peak_rss_mb")]
        if both:
            lp, pt = by_impl.get("libperl", {}), by_impl.get("pytorch", {})
            row += [ratio(lp.get("tokens_per_s"), pt.get("tokens_per_s")),
                    ratio(lp.get("peak_rss_mb"), pt.get("peak_rss_mb"))]
        out.append(row)
    return table(header, out) + busy_note(rows)


def render_all(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r.get("bench", "misc"), []).append(r)
    tailored = {
        "machine": render_machine,
        "forward": render_forward,
        "sft_step": lambda rs: render_sft(rs, groups),
        "sft_phases": render_phases,
        "sgemm_roofline": render_roofline,
        "sgemm": render_sgemm,
    }
    return {name: tailored.get(name, render_generic)(rs) for name, rs in groups.items()}


def update_doc(path, tables):
    with open(path) as f:
        doc = f.read()
    for name, text in tables.items():
        pattern = re.compile(r"(<!-- report:%s -->).*?(<!-- /report:%s -->)" % (re.escape(name), re.escape(name)),
                             re.S)
        if pattern.search(doc):
            doc = pattern.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(2), doc)
        else:
            print(f"report.py: no block for '{name}' in {path}: appending a section", file=sys.stderr)
            doc = doc.rstrip("\n") + f"\n\n## {name}\n\n<!-- report:{name} -->\n{text}\n<!-- /report:{name} -->\n"
    with open(path, "w") as f:
        f.write(doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="files of JSON lines")
    ap.add_argument("--doc", help="rewrite the report blocks of this Markdown file")
    args = ap.parse_args()
    tables = render_all(load(args.results))
    if args.doc:
        update_doc(args.doc, tables)
    else:
        for name, text in tables.items():
            print(f"## {name}\n\n{text}\n")


if __name__ == "__main__":
    main()
