#!/bin/sh
# tests/test_mpi.sh [PATH/TO/mpi_policy] — run by `make check-mpi`.
#
# Data-parallel RL must equal single-process RL over the same global batch:
#   1. mpirun -np 2 mpi_policy            (each rank: its own prompts; gradients all-reduced)
#   2. mpi_policy --emulate-ranks 2       (one process, both ranks' prompts in one step)
#   3. mpi_policy --compare: the two checkpoints' adapters agree to 1e-6;
#   4. and, so that the comparison is known to be sensitive, a run over only
#      rank 0's prompts (--emulate-ranks 1) must NOT agree.
# The optimizer is AdamW with eps = 1 and no clipping, which makes the update
# proportional to the gradient (plain AdamW normalises it away), so that a
# wrong normalisation (a sum instead of a mean) would fail step 3 too.
set -eu

bin=${1:-build/examples/mpi_policy}
: "${MPIRUN:=mpirun}"
[ -x "$bin" ] || { echo "test_mpi: $bin not built (make mpi)" >&2; exit 1; }
command -v "$MPIRUN" >/dev/null 2>&1 || { echo "test_mpi: $MPIRUN not found" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/libperl-mpi.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# Loopback TCP only: no shared-memory segments or network interfaces needed,
# which keeps it working in containers; root is allowed (CI runs as root).
mpirun_local="$MPIRUN --allow-run-as-root --oversubscribe --mca btl self,tcp --mca btl_tcp_if_include lo"
args="--steps 3 --prompts-per-rank 2 --group 2 --adam-eps 1 --lr 0.2 --clip 0 --threads 1"

fail() {
    echo "test_mpi: FAIL: $*" >&2
    exit 1
}

echo "test_mpi: $mpirun_local -np 2 $bin $args"
# shellcheck disable=SC2086  # word lists
$mpirun_local -np 2 "$bin" $args --out "$work/mpi" >"$work/mpi.log" 2>&1 || {
    cat "$work/mpi.log" >&2
    fail "the 2-rank run failed"
}
cat "$work/mpi.log"
grep -q "all-reduced [1-9][0-9]* bytes/rank" "$work/mpi.log" || fail "no gradient bytes were all-reduced"
grep -q "replicas agree: max |param - rank 0 param| = 0$" "$work/mpi.log" || fail "the replicas diverged"
[ -f "$work/mpi/adapter/adapter_model.safetensors" ] && [ -f "$work/mpi/trainer_state.bin" ] ||
    fail "rank 0 did not save the checkpoint"

# shellcheck disable=SC2086
$mpirun_local -np 1 "$bin" $args --emulate-ranks 2 --out "$work/single" >"$work/single.log" 2>&1 || {
    cat "$work/single.log" >&2
    fail "the single-process run failed"
}
"$bin" --compare "$work/mpi" "$work/single" --tol 1e-6 || fail "2 ranks != 1 process over the same global batch"

# shellcheck disable=SC2086
$mpirun_local -np 1 "$bin" $args --emulate-ranks 1 --out "$work/half" >"$work/half.log" 2>&1 || {
    cat "$work/half.log" >&2
    fail "the half-batch run failed"
}
if "$bin" --compare "$work/mpi" "$work/half" --tol 1e-6 >"$work/half.cmp" 2>&1; then
    cat "$work/half.cmp"
    fail "the comparison cannot tell the full batch from half of it"
fi
echo "test_mpi: ok (a half batch differs: $(sed -n 's/.*max |a - b| = \([^ ]*\).*/\1/p' "$work/half.cmp"))"
