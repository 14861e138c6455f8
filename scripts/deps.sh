#!/usr/bin/env bash
# scripts/deps.sh [demo|check|bench|abi]
#
# Makes sure the Debian packages that `make <mode>` needs are installed.
# Quiet when they are.  Missing ones are installed with apt-get when running
# as root; otherwise (or when that fails) it prints exactly what is missing
# and the command to install it, and exits 1.  Optional packages (gnuplot for
# the demo's plot, abigail-tools for `make check-abi`) are installed when
# possible; their absence is a warning.
#
# Environment: BLAS=openblas (default) or BLAS=blis selects the BLAS package.
set -euo pipefail

mode=${1:-demo}
case "$mode" in
    demo | check | bench | abi | clang) ;;
    *)
        echo "usage: $0 [demo|check|bench|abi|clang]" >&2
        exit 2
        ;;
esac

case "${BLAS:-openblas}" in
    openblas) blas_package=libopenblas-dev ;;
    blis) blas_package=libblis-dev ;;
    *)
        echo "deps.sh: BLAS must be openblas or blis, not '${BLAS}'" >&2
        exit 2
        ;;
esac

# Enough to build the library, the examples and the benchmarks.
required=(gcc libc6-dev make binutils pkg-config "$blas_package")
optional=()
case "$mode" in
    check)
        required+=(g++ check) # g++: the header and install checks in C++; check: unit tests
        # each runs in make check when present: the demo's plot, the Python
        # bindings' tests (numpy for the zero-copy paths), the 2-rank MPI test
        optional+=(gnuplot-nox python3 python3-numpy openmpi-bin libopenmpi-dev)
        ;;
    demo) optional+=(gnuplot-nox) ;; # the demo plots its training curves when gnuplot exists
    bench) ;;
    abi) optional+=(abigail-tools) ;; # abidw/abidiff: without them check-abi compares symbols only
    clang) required+=(clang check) ;;   # make check-clang: the whole tree built with clang -Werror
esac

install_command() {
    echo "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $*"
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "deps.sh: warning: not a Debian system (no dpkg-query); make sure these are installed:" \
        "${required[*]}" >&2
    exit 0
fi

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

can_install=no
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    can_install=yes
fi

apt_updated=no
apt_install() {
    if [ "$apt_updated" = no ]; then
        apt-get update -q || return 1
        apt_updated=yes
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

missing=()
for package in "${required[@]}"; do
    is_installed "$package" || missing+=("$package")
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$can_install" = yes ]; then
        echo "deps.sh: installing ${missing[*]}" >&2
        if ! apt_install "${missing[@]}"; then
            echo "deps.sh: error: could not install the required packages: ${missing[*]}" >&2
            echo "deps.sh: install them with: $(install_command "${missing[@]}")" >&2
            exit 1
        fi
    else
        echo "deps.sh: error: missing required packages: ${missing[*]}" >&2
        echo "deps.sh: install them as root with: $(install_command "${missing[@]}")" >&2
        exit 1
    fi
fi

# Optional packages.  gnuplot counts as present when any package provides the command.
for package in ${optional[@]+"${optional[@]}"}; do
    if [ "$package" = gnuplot-nox ] && command -v gnuplot >/dev/null 2>&1; then
        continue
    fi
    if is_installed "$package"; then
        continue
    fi
    if [ "$can_install" = yes ] && apt_install "$package" >/dev/null 2>&1; then
        continue
    fi
    echo "deps.sh: warning: optional package $package is not installed (the parts that need it are" \
        "skipped); install it with: $(install_command "$package")" >&2
done
exit 0
