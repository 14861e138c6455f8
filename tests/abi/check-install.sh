#!/bin/sh
# `make check-install`: install into a scratch DESTDIR, build a C and a C++
# consumer with nothing but `pkg-config --cflags --libs libperl`, run them
# against the installed tree, uninstall, and expect no file left behind.
# Run from the repository root by the Makefile, which sets MAKE, CC, CXX,
# PKG_CONFIG, VERSION and ABI_VERSION.
set -eu

: "${MAKE:=make}" "${CC:=gcc}" "${CXX:=g++}" "${PKG_CONFIG:=pkg-config}"
: "${VERSION:?}" "${ABI_VERSION:?}"
prefix=/usr/local
# Every location explicit, so variables given to the outer make cannot move them.
locations="PREFIX=$prefix EXEC_PREFIX=$prefix LIBDIR=$prefix/lib INCLUDEDIR=$prefix/include PKGCONFIGDIR=$prefix/lib/pkgconfig"

tree=$(mktemp -d "${TMPDIR:-/tmp}/libperl-destdir.XXXXXX")
work=$(mktemp -d "${TMPDIR:-/tmp}/libperl-consumer.XXXXXX")
trap 'rm -rf "$tree" "$work"' EXIT INT TERM

fail() {
    echo "check-install: FAIL: $*" >&2
    exit 1
}

echo "check-install: make install DESTDIR=$tree PREFIX=$prefix"
# shellcheck disable=SC2086  # $locations is a list of words
$MAKE --no-print-directory install DESTDIR="$tree" $locations >"$work/install.log" 2>&1 ||
    { cat "$work/install.log" >&2; fail "make install failed"; }

libdir="$tree$prefix/lib"
for f in "$prefix/include/libperl/libperl.h" "$prefix/lib/libperlrl.a" \
         "$prefix/lib/libperlrl.so.$VERSION" "$prefix/lib/libperlrl.so.$ABI_VERSION" \
         "$prefix/lib/libperlrl.so" "$prefix/lib/pkgconfig/libperl.pc"; do
    [ -e "$tree$f" ] || fail "make install did not install $f"
done
[ "$(readlink "$libdir/libperlrl.so.$ABI_VERSION")" = "libperlrl.so.$VERSION" ] ||
    fail "libperlrl.so.$ABI_VERSION does not point to libperlrl.so.$VERSION"

# Only pkg-config says where things are: the .pc's own paths, re-rooted
# into the scratch tree by the sysroot.
PKG_CONFIG_PATH="$libdir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
PKG_CONFIG_SYSROOT_DIR="$tree"
export PKG_CONFIG_PATH PKG_CONFIG_SYSROOT_DIR
[ "$($PKG_CONFIG --modversion libperl)" = "$VERSION" ] || fail "pkg-config --modversion libperl"
flags=$($PKG_CONFIG --cflags --libs libperl)
echo "check-install: pkg-config --cflags --libs libperl: $flags"
case " $flags " in
    *" -lperlrl "*) ;;
    *) fail "pkg-config --libs libperl does not name -lperlrl" ;;
esac

# shellcheck disable=SC2086  # $flags is a list of words
$CC -std=c99 -Wall -Wextra -Werror -o "$work/consumer_c" tests/abi/consumer.c $flags ||
    fail "cannot build tests/abi/consumer.c"
# shellcheck disable=SC2086
$CXX -std=c++11 -Wall -Wextra -Werror -o "$work/consumer_cpp" tests/abi/consumer.cpp $flags ||
    fail "cannot build tests/abi/consumer.cpp"

for exe in consumer_c consumer_cpp; do
    # The installed copy must be the one that is loaded.
    resolved=$(LD_LIBRARY_PATH="$libdir" ldd "$work/$exe" | awk '$1 == "libperlrl.so.'"$ABI_VERSION"'" { print $3 }')
    case "$resolved" in
        "$libdir"/*) ;;
        *) fail "$exe loads libperlrl.so.$ABI_VERSION from '$resolved', not from $libdir" ;;
    esac
    LD_LIBRARY_PATH="$libdir" "$work/$exe" || fail "$exe exited with status $?"
done

echo "check-install: make uninstall DESTDIR=$tree PREFIX=$prefix"
# shellcheck disable=SC2086
$MAKE --no-print-directory uninstall DESTDIR="$tree" $locations >"$work/uninstall.log" 2>&1 ||
    { cat "$work/uninstall.log" >&2; fail "make uninstall failed"; }
left=$(find "$tree" ! -type d)
[ -z "$left" ] || fail "make uninstall left files behind:
$left"
[ ! -d "$tree$prefix/include/libperl" ] || fail "make uninstall left $prefix/include/libperl"

echo "check-install: ok"
