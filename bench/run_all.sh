#!/usr/bin/env bash
# bench/run_all.sh — builds the benchmarks, runs every configuration in its own
# process (peak RSS is per process), appends the JSON lines to a results file
# and regenerates the tables of docs/benchmarks.md with bench/report.py.
#
#   bench/run_all.sh [--quick] [--only forward|sft|sgemm] [--out FILE] [--no-doc]
#                    [--wait-quiet SECONDS] [--retry-busy N] [--priority NICE]
#                    [--sft-threads LIST]
#
#   --quick        fewer repetitions and smaller batches (a smoke run, ~4.5 min;
#                  its figures are not comparable with the full run's)
#   --only GROUP   run one group of benchmarks
#   --out FILE     results file (default $BUILD/bench/results.jsonl; appended to,
#                  report.py keeps the last line of each configuration)
#   --no-doc       do not rewrite docs/benchmarks.md, print the tables instead
#   --sft-threads "1 2"  thread counts of the SFT runs (default "2"; 1 thread
#                  adds ~24 minutes)
#   --wait-quiet S before each configuration wait up to S seconds for the
#                  machine to be idle (all processes together using < 10% CPU)
#   --retry-busy N rerun a configuration (up to N times) when other processes
#                  took time on the cores it needed while it was timed: more than
#                  (CPUs - threads) + 0.25 cores ("other_cpu" in its JSON line);
#                  the last run is the one reported
#   --priority N   run in a new session whose scheduler autogroup has nice N
#                  (e.g. -15; negative values need root).  With autogroups
#                  (kernel.sched_autogroup_enabled=1) CPU time is shared between
#                  sessions first, so a process's own nice value does not lift
#                  it above other sessions' work; the autogroup's nice does.
#
# Environment: BUILD (default build-bench), PERL_SHARED_DIR (default ../shared),
# PYTHON (default /usr/bin/python3, the interpreter with Debian's PyTorch).
# libperl sets its threads with perl_set_num_threads; the PyTorch scripts set
# OMP_WAIT_POLICY=passive, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and
# torch.set_num_threads before torch loads (see bench/torch_common.py).
# A full run takes about 28 minutes on this 2-core Zen 1 VM (sgemm ~37 GFLOP/s
# per core): 7 for the forward group, 20 for SFT, 1 for the roofline.  --quick
# takes about 4.5; --only splits the run.
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-bench}
PYTHON=${PYTHON:-/usr/bin/python3}
export PERL_SHARED_DIR=${PERL_SHARED_DIR:-$(cd .. && pwd)/shared}
export OMP_WAIT_POLICY=passive
export PYTHONDONTWRITEBYTECODE=1  # no bench/__pycache__ in the tree

args=("$@")
quick=0
only=all
out=
doc=1
wait_quiet=0
retry_busy=0
priority=
sft_threads=2
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --only) only=$2; shift ;;
        --out) out=$2; shift ;;
        --no-doc) doc=0 ;;
        --wait-quiet) wait_quiet=$2; shift ;;
        --retry-busy) retry_busy=$2; shift ;;
        --priority) priority=$2; shift ;;
        --sft-threads) sft_threads=$2; shift ;;
        *) echo "usage: $0 [--quick] [--only forward|sft|sgemm] [--out FILE] [--no-doc] [--wait-quiet S]" \
                "[--retry-busy N] [--priority NICE] [--sft-threads LIST]" >&2
           exit 2 ;;
    esac
    shift
done
out=${out:-$BUILD/bench/results.jsonl}

if [ -n "$priority" ] && [ -z "${RUN_ALL_SESSION:-}" ]; then
    # a session (and so an autogroup) of our own, then its nice value
    RUN_ALL_SESSION=1 exec setsid --wait "$0" ${args[@]+"${args[@]}"}
fi
if [ -n "$priority" ]; then
    echo "$priority" > /proc/self/autogroup
    echo "run_all.sh: $(cat /proc/self/autogroup)" >&2
fi

make --no-print-directory BUILD="$BUILD" bench-build >&2
mkdir -p "$(dirname "$out")"
bin=$BUILD/bench

# Waits (at most $wait_quiet seconds) until the CPUs are >= 90% idle over one second.
wait_for_quiet() {
    [ "$wait_quiet" -gt 0 ] || return 0
    local deadline=$((SECONDS + wait_quiet))
    while [ $SECONDS -lt $deadline ]; do
        local busy
        busy=$(awk 'NR==1 { for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6 }' /proc/stat)
        sleep 1
        busy=$(awk -v prev="$busy" 'NR==1 { for (i = 2; i <= NF; i++) t += $i; split(prev, p, " ");
                                           dt = t - p[1]; di = $5 + $6 - p[2]; print int(100 * (dt - di) / dt) }' /proc/stat)
        [ "$busy" -lt 10 ] && return 0
    done
    echo "run_all.sh: machine still busy after ${wait_quiet}s; measuring anyway" >&2
}

# run CMD...: one configuration, its JSON lines appended to $out and echoed;
# rerun while other processes disturbed it (--retry-busy).
run() {
    local attempt=0 start lines other threads
    while :; do
        wait_for_quiet
        echo "== $*" >&2
        start=$SECONDS
        lines=$("$@")
        printf '%s\n' "$lines" | tee -a "$out"
        # (lines without other_cpu, e.g. sgemm_roofline's, count as undisturbed)
        other=$(printf '%s\n' "$lines" | { grep -o '"other_cpu": [0-9.e-]*' || true; } |
            awk '{ if ($2 > m) m = $2 } END { print m + 0 }')
        threads=$(printf '%s\n' "$lines" | { grep -o '"threads": [0-9]*' || true; } | head -1 | awk '{ print $2 + 0 }')
        echo "   ($((SECONDS - start))s; other processes used ${other} cores meanwhile)" >&2
        attempt=$((attempt + 1))
        if [ "$attempt" -gt "$retry_busy" ] ||
            awk -v o="$other" -v c="$(nproc)" -v t="${threads:-1}" 'BEGIN { f = c - t; if (f < 0) f = 0; exit !(o <= f + 0.25) }'; then
            return 0
        fi
        echo "   busy machine: measuring again ($attempt of $retry_busy)" >&2
    done
}

# ---- the machine -----------------------------------------------------------------------------
RUN_ALL_GROUPS="$only$([ "$quick" = 1 ] && echo ' (quick)'), SFT threads: $sft_threads" "$PYTHON" - <<'EOF' | tee -a "$out"
import json, os, platform, subprocess, sys, time
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""
cpu = sh("lscpu | sed -n 's/^Model name: *//p' | head -1")
family = sh("lscpu | sed -n 's/^CPU family: *//p' | head -1")
model = sh("lscpu | sed -n 's/^Model: *//p' | head -1")
smt = sh("lscpu | sed -n 's/^Thread(s) per core: *//p' | head -1")
caches = sh("lscpu | sed -n 's/^L\\(2\\|3\\) cache: *//p' | tr '\\n' ';'")
flags = sh("grep -m1 -o -w 'avx512f\\|avx2\\|fma' /proc/cpuinfo | sort -u | tr '\\n' ' '")
mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2 / 1048576}' /proc/meminfo")
import torch
print(json.dumps({
    "bench": "machine", "name": "machine",
    "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    "cpu": f"{cpu} (family {family} model {model}), {os.cpu_count()} online CPUs, {smt or '?'} thread(s) per core, "
           f"flags {flags.strip()}, L2/L3 {caches.rstrip(';')}",
    "memory": mem,
    "kernel": platform.release(),
    "compiler": sh("gcc --version | head -1"),
    "blas": "OpenBLAS " + sh("pkg-config --modversion openblas") + " (" +
            sh("pkg-config --variable=libdir openblas").rstrip("/") + ")",
    "pytorch": f"{torch.__version__} (Debian, {sys.executable}), sgemm through libblas.so.3 = the same OpenBLAS",
    "libperl": (sh("git describe --always --dirty 2>/dev/null") or "no commit yet") + ", lib/ sources sha1 " +
               sh("cat lib/*.c lib/*.h include/libperl/libperl.h | sha1sum | cut -c1-12"),
    "make_opt": sh("make -s -p BUILD=/nonexistent help 2>/dev/null | sed -n 's/^OPT = //p' | head -1"),
    "load_average_at_start": open("/proc/loadavg").read().split()[0],
    "groups": os.environ.get("RUN_ALL_GROUPS", "all"),
}))
EOF

blas_lib=$(pkg-config --variable=libdir openblas 2>/dev/null || echo)
blas_lib=${blas_lib:+${blas_lib%/}/}libopenblas.so.0

if [ "$quick" = 1 ]; then
    s_batch=4; s_reps="--warmup 1 --reps 3"
    r_batch=1; r_reps="--warmup 1 --reps 3"
    t_batch=1; t_reps="--warmup 1 --reps 2"
    rl_flags="--quick"
else
    s_batch=8; s_reps="--warmup 2 --reps 7"
    r_batch=4; r_reps="--warmup 1 --reps 5"
    t_batch=4; t_reps="--warmup 1 --reps 5"
    rl_flags=
fi

# ---- 1. forward throughput --------------------------------------------------------------------
if [ "$only" = all ] || [ "$only" = forward ]; then
    for threads in 1 2; do
        for output in logits hidden; do
            run "$bin/forward" --model stories260K --batch $s_batch --seq 256 --threads $threads --output $output $s_reps
            run "$PYTHON" bench/forward_torch.py --model stories260K --batch $s_batch --seq 256 --threads $threads \
                --output $output $s_reps
        done
    done
    for threads in 1 2; do
        for output in logits hidden; do
            run "$bin/forward" --model random768 --batch $r_batch --seq 256 --threads $threads --output $output $r_reps
            run "$PYTHON" bench/forward_torch.py --model random768 --batch $r_batch --seq 256 --threads $threads \
                --output $output $r_reps
        done
    done
fi

# ---- 2. SFT step ------------------------------------------------------------------------------
if [ "$only" = all ] || [ "$only" = sft ]; then
    # LoRA and full, with and without recomputation; the phase breakdown for the plain ones.
    for threads in $sft_threads; do
        for mode in lora full; do
            for recompute in 0 1; do
                phases=
                [ "$recompute" = 0 ] && [ "$quick" = 0 ] && phases=--phases
                run "$bin/sft_step" --mode $mode --recompute $recompute --batch $t_batch --seq 256 \
                    --threads $threads $t_reps $phases
                run "$PYTHON" bench/sft_torch.py --mode $mode --recompute $recompute --batch $t_batch --seq 256 \
                    --threads $threads $t_reps
            done
        done
    done
fi

# ---- 3. the sgemm roofline of those steps -------------------------------------------------------
if [ "$only" = all ] || [ "$only" = sgemm ] || [ "$only" = sft ]; then
    for threads in $(printf '%s\n' 1 2 $sft_threads | sort -un); do
        run "$bin/sgemm_roofline" --threads $threads --tokens $((t_batch * 256)) --batch $t_batch \
            --blas-lib "$blas_lib" $rl_flags
    done
fi

if [ "$doc" = 1 ]; then
    "$PYTHON" bench/report.py "$out" --doc docs/benchmarks.md
    echo "run_all.sh: results in $out; tables rewritten in docs/benchmarks.md" >&2
else
    "$PYTHON" bench/report.py "$out"
fi
