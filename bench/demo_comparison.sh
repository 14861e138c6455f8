#!/bin/sh
# The PERL comparison on the demo's own base (docs/perl-comparison.md): the
# demo's reward-model and RL stages with LoRA adapters, then with full
# fine-tuning, on the same pretrained base, the same data and the same number
# of steps.  Each run is its own process (peak RSS is per process) and appends
# perl_demo's JSON (quality, median seconds per step, peak RSS) plus the
# process's CPU seconds to $OUT.
#
#   BUILD=build SEEDS="1 2 3" bench/demo_comparison.sh
#
# The base is build/demo/base_model, which `make demo` writes; when it is
# missing, this script runs the demo once to make it.  Environment: BUILD
# (default build), OUT (default build/bench/demo_comparison.jsonl), SEEDS
# (default "1 2 3"), THREADS (default 1), PY (default /usr/bin/python3).
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
OUT=${OUT:-build/bench/demo_comparison.jsonl}
SEEDS=${SEEDS:-"1 2 3"}
THREADS=${THREADS:-1}
PY=${PY:-/usr/bin/python3}
BASE=build/demo/base_model
DEMO="$BUILD/examples/perl_demo"
mkdir -p "$(dirname "$OUT")" build/demo-compare

make -s BUILD="$BUILD" "$DEMO"
if [ ! -d "$BASE" ]; then
    echo "demo_comparison: $BASE is missing; running the demo once to pretrain it" >&2
    "$DEMO" --out build/demo >/dev/null
fi

for seed in $SEEDS; do
    for mode in lora full; do
        flag=$([ "$mode" = full ] && echo --full || true)
        dir="build/demo-compare/$mode-$seed"
        tmp=$(mktemp)
        # shellcheck disable=SC2086 # $flag is empty or one word
        if /usr/bin/time -f '%U %S %e %M' -o "$tmp.time" "$DEMO" --base "$BASE" $flag --seed "$seed" \
            --threads "$THREADS" --out "$dir" --json "$tmp.json" >"$dir.log" 2>&1; then
            status=improved
        else
            status=failed
        fi
        "$PY" bench/annotate_run.py "$tmp.json" "$tmp.time" "verdict=$status" >>"$OUT"
        tail -n 1 "$OUT"
        rm -f "$tmp" "$tmp.time" "$tmp.json"
    done
done
