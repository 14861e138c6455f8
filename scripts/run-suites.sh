#!/bin/sh
# scripts/run-suites.sh RUNNER [WRAPPER...]
#
# Runs the Check runner once per suite (CK_RUN_SUITE=<suite>), optionally
# under a wrapper such as valgrind, prints each suite's time, and fails if
# any suite failed.  Used by `make check-asan` and `make check-valgrind`: one
# process per suite keeps each sanitizer report next to its suite, and lets
# slow suites be skipped.
#
# Environment: SUITES (default: every suite_<name> in tests/test_*.c),
# SKIP_SUITES (names left out), and whatever the runner and wrapper read
# (CK_FORK, ASAN_OPTIONS, ...).  A CK_RUN_SUITE already set selects that
# suite alone.
set -u

runner=${1:?usage: $0 RUNNER [WRAPPER...]}
shift
if [ -n "${CK_RUN_SUITE:-}" ]; then
    SUITES=$CK_RUN_SUITE
fi
if [ -z "${SUITES:-}" ]; then
    SUITES=$(sed -n 's/^Suite[[:space:]]*\*[[:space:]]*suite_\([a-z0-9_]*\)[[:space:]]*([[:space:]]*void[[:space:]]*).*/\1/p' \
        tests/test_*.c | awk '!seen[$0]++')
fi

failed=""
total_start=$(date +%s)
for suite in $SUITES; do
    case " ${SKIP_SUITES:-} " in
        *" $suite "*)
            echo "== $suite: skipped (SKIP_SUITES)"
            continue
            ;;
    esac
    start=$(date +%s)
    if CK_RUN_SUITE=$suite "$@" "$runner"; then
        status=ok
    else
        status=FAILED
        failed="$failed $suite"
    fi
    echo "== $suite: $status in $(($(date +%s) - start)) s"
done
echo "== all suites: $(($(date +%s) - total_start)) s"
if [ -n "$failed" ]; then
    echo "run-suites: FAILED:$failed" >&2
    exit 1
fi
