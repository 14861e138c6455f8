#!/bin/sh
# tests/check_guides.sh BUILD_DIR — run by `make check-guides`.
#
# Every ```c block of docs/guide-*.md that defines main() is a complete
# program: extract it, compile it against the public header alone (C11,
# -Wall -Wextra -Wpedantic -Werror), link it to BUILD_DIR/libperlrl.so, and
# run it in a scratch directory (the programs write their files there).
set -eu

build=${1:-build}
: "${CC:=gcc}"
[ -e "$build/libperlrl.so" ] || { echo "check-guides: $build/libperlrl.so not built" >&2; exit 1; }
libdir=$(cd "$build" && pwd)
include=$(pwd)/include
work=$(mktemp -d "${TMPDIR:-/tmp}/libperl-guides.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

n=0
for guide in docs/guide-*.md; do
    # one file per fenced C block; keep those with a main()
    awk -v out="$work/$(basename "$guide" .md)" '
        /^```c[[:space:]]*$/ { inside = 1; k++; file = out "-" k ".c"; next }
        /^```/ && inside { inside = 0; close(file); next }
        inside { print > file }
    ' "$guide"
    for src in "$work/$(basename "$guide" .md)"-*.c; do
        [ -e "$src" ] || continue
        grep -q 'int main(' "$src" || continue
        exe=${src%.c}
        echo "check-guides: $guide: $(basename "$src")"
        $CC -std=c11 -Wall -Wextra -Wpedantic -Werror -I"$include" -o "$exe" "$src" \
            -L"$libdir" -lperlrl -Wl,-rpath,"$libdir" -lm ||
            { echo "check-guides: FAIL: a program in $guide does not compile" >&2; exit 1; }
        (cd "$work" && "$exe" >"$exe.log" 2>&1) ||
            { cat "$exe.log" >&2; echo "check-guides: FAIL: the program in $guide failed" >&2; exit 1; }
        sed 's/^/    /' "$exe.log"
        n=$((n + 1))
    done
done
[ "$n" -ge 4 ] || { echo "check-guides: FAIL: found $n programs, expected one per guide" >&2; exit 1; }
echo "check-guides: ok ($n programs compiled and ran)"
