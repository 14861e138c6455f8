#!/bin/sh
# The PERL comparison (docs/perl-comparison.md): LoRA vs full fine-tuning for
# the reward-model step and the RL loop step, libperl (bench/perl_comparison)
# beside PyTorch (bench/rm_torch.py, bench/rl_torch.py), and generation
# throughput: libperl (bench/generate) vs llama2.c-style decoding
# (bench/llama2c_decode, plain and -fopenmp) vs PyTorch (bench/generate_torch.py).
# Every configuration runs in its own process (peak RSS is per process) and
# appends one JSON line to $OUT (default build/bench/comparison.jsonl); each
# line gets the load average before/after and the process's CPU seconds from
# /usr/bin/time, because this machine is shared and wall-clock figures are noisy.
#
#   BUILD=build-k SECTIONS="rm rl gen" STEPS=5 bench/comparison.sh
#
# Environment: BUILD (default build), OUT, SECTIONS (any of rm rl gen; default
# all), STEPS (timed steps, default 5), REPS (generation reps, default 5),
# THREADS (rm/rl threads, default 1), PY (default /usr/bin/python3),
# PERL_SHARED_DIR (default ../shared), RM_BATCH (pairs, 2), RM_SEQ (64), RL_BATCH (4),
# RL_PROMPT (32), RL_RESPONSE (16),
# BASES (rm/rl bases, default "random768 random288"; the demo's saved base
# build/demo/base_model is added to rm and rl when it exists), RECOMPUTE (1: libperl
# recomputes activations per layer, --recompute 1; the PyTorch scripts have no such
# option, so they are skipped), DEMO_SEQ / DEMO_PROMPT / DEMO_RESPONSE (the demo
# base's shapes: its context is 160 tokens; default 128 / 64 / 64).
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
OUT=${OUT:-build/bench/comparison.jsonl}
SECTIONS=${SECTIONS:-"rm rl gen"}
STEPS=${STEPS:-5}
REPS=${REPS:-5}
THREADS=${THREADS:-1}
PY=${PY:-/usr/bin/python3}
RM_BATCH=${RM_BATCH:-2}
RM_SEQ=${RM_SEQ:-64}
RL_BATCH=${RL_BATCH:-4}
RL_PROMPT=${RL_PROMPT:-32}
RL_RESPONSE=${RL_RESPONSE:-16}
BASES=${BASES:-"random768 random288"}
RECOMPUTE=${RECOMPUTE:-0}
DEMO_SEQ=${DEMO_SEQ:-128}
DEMO_PROMPT=${DEMO_PROMPT:-64}
DEMO_RESPONSE=${DEMO_RESPONSE:-64}
DEMO_BASE=build/demo/base_model
export OMP_WAIT_POLICY=passive
export PERL_SHARED_DIR=${PERL_SHARED_DIR:-../shared}
mkdir -p "$(dirname "$OUT")"

make -s BUILD="$BUILD" "$BUILD/bench/perl_comparison" "$BUILD/bench/generate" "$BUILD/bench/llama2c_decode"
# llama2.c's `make runomp`: the same source with OpenMP
cc -std=c11 -O3 -march=native -fopenmp -o "$BUILD/bench/llama2c_decode_omp" bench/llama2c_decode.c -lm

# run LABEL-FREE-CMD...: one process, its JSON line + loadavg + CPU seconds
run() {
    l0=$(cut -d' ' -f1 /proc/loadavg)
    tmp=$(mktemp)
    if /usr/bin/time -f '%U %S %e %M' -o "$tmp.time" "$@" >"$tmp" 2>"$tmp.err"; then
        l1=$(cut -d' ' -f1 /proc/loadavg)
        "$PY" bench/annotate_run.py "$tmp" "$tmp.time" "loadavg_start=$l0" "loadavg_end=$l1" "command=$*" >>"$OUT"
        tail -n 1 "$OUT"
    else
        echo "FAILED: $*" >&2
        cat "$tmp.err" >&2
    fi
    rm -f "$tmp" "$tmp.time" "$tmp.err"
}

PC="$BUILD/bench/perl_comparison"
# the PyTorch side of a step, unless libperl recomputes (PyTorch has no matching option here)
torch_run() {
    [ "$RECOMPUTE" = 0 ] || return 0
    run "$@"
}
for section in $SECTIONS; do
    case $section in
    rm)
        # LoRA and full alternate so each ratio comes from one run window
        for base in $BASES; do
            for mode in lora full; do
                run "$PC" --task rm --mode $mode --base $base --batch "$RM_BATCH" --seq "$RM_SEQ" --steps "$STEPS" --warmup 1 --threads "$THREADS" --recompute "$RECOMPUTE"
                torch_run "$PY" bench/rm_torch.py --mode $mode --base $base --batch "$RM_BATCH" --seq "$RM_SEQ" --steps "$STEPS" --warmup 1 --threads "$THREADS"
            done
        done
        if [ -d "$DEMO_BASE" ]; then
            for mode in lora full; do
                run "$PC" --task rm --mode $mode --base "$DEMO_BASE" --batch "$RM_BATCH" --seq "$DEMO_SEQ" --steps "$STEPS" --warmup 1 --threads "$THREADS" --recompute "$RECOMPUTE"
            done
        fi
        ;;
    rl)
        for base in $BASES; do
            for mode in lora full; do
                run "$PC" --task rl --mode $mode --base $base --batch "$RL_BATCH" --prompt "$RL_PROMPT" --response "$RL_RESPONSE" --steps "$STEPS" --warmup 1 --threads "$THREADS" --recompute "$RECOMPUTE"
                torch_run "$PY" bench/rl_torch.py --mode $mode --base $base --batch "$RL_BATCH" --prompt "$RL_PROMPT" --response "$RL_RESPONSE" --steps "$STEPS" --warmup 1 --threads "$THREADS"
            done
        done
        if [ -d "$DEMO_BASE" ]; then
            for mode in lora full; do
                run "$PC" --task rl --mode $mode --base "$DEMO_BASE" --batch "$RL_BATCH" --prompt "$DEMO_PROMPT" --response "$DEMO_RESPONSE" --steps "$STEPS" --warmup 1 --threads "$THREADS" --recompute "$RECOMPUTE"
            done
        fi
        ;;
    gen)
        for t in 1 2; do
            run "$BUILD/bench/generate" --model stories260K --batch 1 --new 256 --threads $t --reps "$REPS"
            run "$BUILD/bench/generate" --model stories260K --batch 16 --new 256 --threads $t --reps "$REPS"
            OMP_NUM_THREADS=$t run "$BUILD/bench/llama2c_decode_omp" --model stories260K --new 256 --reps "$REPS"
        done
        run "$BUILD/bench/llama2c_decode" --model stories260K --new 256 --reps "$REPS"
        run "$PY" bench/generate_torch.py --model stories260K --batch 1 --new 256 --threads 1 --reps "$REPS"
        run "$PY" bench/generate_torch.py --model stories260K --batch 16 --new 256 --threads 1 --reps "$REPS"
        run "$BUILD/bench/generate" --model random768 --batch 1 --new 64 --threads 1 --reps "$REPS"
        run "$BUILD/bench/generate" --model random768 --batch 16 --new 64 --threads 1 --reps "$REPS"
        run "$BUILD/bench/llama2c_decode" --model random768 --new 64 --reps "$REPS"
        run "$PY" bench/generate_torch.py --model random768 --batch 1 --new 64 --threads 1 --reps "$REPS"
        run "$PY" bench/generate_torch.py --model random768 --batch 16 --new 64 --threads 1 --reps "$REPS"
        ;;
    *) echo "comparison.sh: unknown section $section" >&2; exit 2 ;;
    esac
done
