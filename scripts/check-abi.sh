#!/bin/sh
# scripts/check-abi.sh [--update] LIBRARY   (run from the repository root by
# `make check-abi` / `make update-abi`)
#
# 1. The exported functions (nm -D) equal tests/abi/symbols.txt, and so does
#    the list of LIBPERL_API declarations in include/libperl/libperl.h.
# 2. abidiff of LIBRARY against tests/abi/libperl.abi (written by abidw from a
#    -g build, public types only): fails on an incompatible change.  Removed
#    functions set abidiff's bit 8 (ABIDIFF_ABI_INCOMPATIBLE_CHANGE).  A
#    changed public struct layout only sets bit 4 (ABIDIFF_ABI_CHANGE), as
#    added functions do, so bit 4 fails too unless the report's summary
#    counts no changed function or variable.  Members appended to perl_*
#    structs are compatible (struct_size) and suppressed by
#    tests/abi/abidiff.supp.  Skipped with a warning when abigail-tools is
#    not installed.
#
# --update rewrites both files from LIBRARY (after an intended ABI change, or
# when the header gains functions).
set -eu

update=no
if [ "${1:-}" = --update ]; then
    update=yes
    shift
fi
lib=${1:?usage: $0 [--update] LIBRARY}
header=include/libperl/libperl.h
symbols=tests/abi/symbols.txt
baseline=tests/abi/libperl.abi
suppressions=tests/abi/abidiff.supp
work=$(mktemp -d "${TMPDIR:-/tmp}/libperl-abi.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

fail() {
    echo "check-abi: FAIL: $*" >&2
    exit 1
}

# Exported functions, without version suffixes and version-node symbols.
nm -D --defined-only "$lib" |
    awk '$2 != "A" { sub(/@.*/, "", $3); print $3 }' |
    grep -v -x -E '_init|_fini|_edata|_end|__bss_start' |
    LC_ALL=C sort -u >"$work/exports"

# LIBPERL_API declarations: comments removed by the preprocessor (macros kept
# unexpanded), then the identifier before the first '(' of each declaration.
${CC:-cc} -fpreprocessed -dD -E -P -x c "$header" 2>/dev/null |
    grep -v '^[[:space:]]*#' | tr '\n' ' ' | tr ';' '\n' |
    grep 'LIBPERL_API' |
    sed -n 's/^.*LIBPERL_API[^(]*[^A-Za-z0-9_(]\([A-Za-z_][A-Za-z0-9_]*\)[[:space:]]*(.*$/\1/p' |
    LC_ALL=C sort -u >"$work/declared"

if ! cmp -s "$work/exports" "$work/declared"; then
    echo "check-abi: exports of $lib (<) and LIBPERL_API declarations of $header (>) differ:" >&2
    diff "$work/exports" "$work/declared" >&2 || :
    fail "the library and the header disagree"
fi

if [ "$update" = yes ]; then
    cp "$work/exports" "$symbols"
    echo "check-abi: wrote $symbols ($(wc -l <"$symbols") functions)"
else
    [ -f "$symbols" ] || fail "$symbols is missing (make update-abi)"
    if ! cmp -s "$work/exports" "$symbols"; then
        echo "check-abi: exports of $lib (<) and $symbols (>) differ:" >&2
        diff "$work/exports" "$symbols" >&2 || :
        fail "$symbols is out of step with the header: review the change, then make update-abi"
    fi
    echo "check-abi: $(wc -l <"$symbols") exported functions match $symbols and $header"
fi

if ! command -v abidw >/dev/null 2>&1 || ! command -v abidiff >/dev/null 2>&1; then
    echo "check-abi: WARNING: abigail-tools is not installed, abidiff skipped" \
        "(apt-get install abigail-tools)" >&2
    exit 0
fi
abidw --headers-dir include/libperl --drop-private-types --no-corpus-path --no-show-locs \
    --out-file "$work/current.abi" "$lib" ||
    fail "abidw failed on $lib"
if [ "$update" = yes ]; then
    cp "$work/current.abi" "$baseline"
    echo "check-abi: wrote $baseline"
    exit 0
fi
[ -f "$baseline" ] || fail "$baseline is missing (make update-abi)"
status=0
abidiff --suppressions "$suppressions" --headers-dir2 include/libperl "$baseline" "$work/current.abi" \
    >"$work/report" 2>&1 || status=$?
if [ $((status & 3)) -ne 0 ]; then
    cat "$work/report" >&2
    fail "abidiff could not compare (status $status)"
fi
if [ $((status & 8)) -ne 0 ]; then
    cat "$work/report" >&2
    fail "incompatible ABI change against $baseline (bump ABI_VERSION in the Makefile, then make update-abi)"
fi
# "Functions changes summary: 0 Removed, 1 Changed (2 filtered out), 3 Added functions"
changed=$(sed -n 's/^\(Functions\|Variables\) changes summary: [0-9]* Removed, \([0-9]*\) Changed.*/\2/p' \
    "$work/report" | awk '{ n += $1 } END { print n + 0 }')
if [ $((status & 4)) -ne 0 ] && [ "$changed" -ne 0 ]; then
    cat "$work/report" >&2
    fail "$changed public functions or variables changed type against $baseline (an ABI break:" \
        "bump ABI_VERSION in the Makefile, then make update-abi)"
fi
if [ $((status & 4)) -ne 0 ]; then
    echo "check-abi: compatible ABI changes against $baseline (e.g. added functions):"
    sed 's/^/    /' "$work/report"
fi
echo "check-abi: ok"
