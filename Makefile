# libperl — GNU Makefile.  `make help` lists the targets; docs/building.md explains them.
#
# The library is built as libperlrl (-lperlrl), not libperl: Debian's Perl
# already owns libperl.so / -lperl.  The pkg-config module keeps the project's
# name: `pkg-config --cflags --libs libperl`.

.DEFAULT_GOAL := all
SHELL := /bin/sh
.SUFFIXES:
.DELETE_ON_ERROR:

# ---- version: read out of the public header, so it lives in one place (zstd's libzstd.mk)
LIBPERL_H := include/libperl/libperl.h
header_version = $(shell awk '$$2 == "LIBPERL_VERSION_$(1)" { print $$3; exit }' $(LIBPERL_H))
VERSION_MAJOR := $(call header_version,MAJOR)
VERSION_MINOR := $(call header_version,MINOR)
VERSION_PATCH := $(call header_version,PATCH)
ifeq ($(strip $(VERSION_MAJOR)),)
$(error cannot read LIBPERL_VERSION_MAJOR from $(LIBPERL_H))
endif
ifeq ($(strip $(VERSION_MINOR)),)
$(error cannot read LIBPERL_VERSION_MINOR from $(LIBPERL_H))
endif
ifeq ($(strip $(VERSION_PATCH)),)
$(error cannot read LIBPERL_VERSION_PATCH from $(LIBPERL_H))
endif
VERSION := $(VERSION_MAJOR).$(VERSION_MINOR).$(VERSION_PATCH)
# The ABI version (the SONAME's number).  It is not the release's major
# number: it changes only when the ABI breaks (see docs/building.md).
ABI_VERSION := 0

# ---- install locations
PREFIX ?= /usr/local
EXEC_PREFIX ?= $(PREFIX)
LIBDIR ?= $(EXEC_PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
DESTDIR ?=
INSTALL ?= install
INSTALL_DATA ?= $(INSTALL) -m 644
INSTALL_PROGRAM ?= $(INSTALL) -m 755

# ---- tools (CC ?= gcc would never apply: make predefines CC=cc)
ifeq ($(origin CC),default)
CC := gcc
endif
ifeq ($(origin CXX),default)
CXX := g++
endif
CLANG ?= clang
PKG_CONFIG ?= pkg-config
NPROC := $(shell nproc 2>/dev/null || echo 2)

# ---- BLAS: openblas (default) or blis
BLAS ?= openblas
ifeq ($(BLAS),openblas)
BLAS_PC := openblas
BLAS_FALLBACK_LIBS := -lopenblas
BLAS_DEFINE := -DLIBPERL_BLAS_OPENBLAS
else ifeq ($(BLAS),blis)
BLAS_PC := blis
BLAS_FALLBACK_LIBS := -lblis
BLAS_DEFINE := -DLIBPERL_BLAS_BLIS
else
$(error BLAS must be openblas or blis, not '$(BLAS)')
endif
# Debian's BLIS ships no blis.pc: fall back to -l<name>, and then name the
# library in Libs.private instead of Requires.private (a Requires.private on a
# missing module would break `pkg-config libperl` for every consumer).
BLAS_HAS_PC := $(shell $(PKG_CONFIG) --exists $(BLAS_PC) 2>/dev/null && echo yes)
ifeq ($(BLAS_HAS_PC),yes)
BLAS_CFLAGS := $(shell $(PKG_CONFIG) --cflags $(BLAS_PC) 2>/dev/null)
BLAS_LIBS := $(shell $(PKG_CONFIG) --libs $(BLAS_PC) 2>/dev/null)
PC_REQUIRES_PRIVATE := $(BLAS_PC)
PC_LIBS_PRIVATE := -lm -lpthread
else
BLAS_CFLAGS :=
BLAS_LIBS := $(BLAS_FALLBACK_LIBS)
PC_REQUIRES_PRIVATE :=
PC_LIBS_PRIVATE := $(BLAS_FALLBACK_LIBS) -lm -lpthread
endif

# Check's flags are needed only by the test runner: looked up once, on first use.
CHECK_CFLAGS = $(eval CHECK_CFLAGS := $$(shell $(PKG_CONFIG) --cflags check 2>/dev/null))$(CHECK_CFLAGS)
CHECK_LIBS = $(eval CHECK_LIBS := $$(shell $(PKG_CONFIG) --libs check 2>/dev/null || echo -lcheck))$(CHECK_LIBS)

# ---- flags.  OPT, CFLAGS, CPPFLAGS and LDFLAGS are the caller's; the rest is required.
# 256-bit vectors: gcc tunes some AMD cores (znver1) for 128-bit ones, halving
# the throughput of the vectorised kernels.
OPT ?= -O3 -march=native -mprefer-vector-width=256
WARN_FLAGS := -Wall -Wextra -Wpedantic -Werror
DEP_FLAGS = -MMD -MP
# -fno-math-errno: the library never reads errno after sqrtf/expf, and without
# it gcc keeps every loop that calls them scalar (AdamW, norms).
# -fno-trapping-math: the library never reads the floating-point exception
# flags; without it gcc will not if-convert a float comparison, so loops with a
# clamp (perl_expf in every softmax) stay scalar.  Neither flag changes a value.
LIB_CFLAGS = -std=c11 $(WARN_FLAGS) -fPIC -fvisibility=hidden -fno-math-errno -fno-trapping-math -pthread \
             -Iinclude -Ilib \
             $(BLAS_CFLAGS) $(BLAS_DEFINE) $(OPT) $(CPPFLAGS) $(CFLAGS)
LIB_LDLIBS = $(BLAS_LIBS) -lm -lpthread
TEST_CFLAGS = -std=c11 $(WARN_FLAGS) -pthread -Iinclude -Ilib -Itests -I$(BUILD)/tests \
              $(BLAS_CFLAGS) $(BLAS_DEFINE) $(CHECK_CFLAGS) $(OPT) $(CPPFLAGS) $(CFLAGS)
TEST_LDLIBS = $(CHECK_LIBS) $(BLAS_LIBS) -lm -lpthread
# Examples and benchmarks are hosts: public header only, linked to the shared library.
PROG_CFLAGS = -std=c11 $(WARN_FLAGS) -pthread -Iinclude $(OPT) $(CPPFLAGS) $(CFLAGS)
PROG_LDLIBS = -L$(BUILD) -lperlrl -Wl,-rpath,'$$ORIGIN/..' -lm -lpthread

# ---- files
BUILD ?= build
LIB_SRCS := $(wildcard lib/*.c)
LIB_OBJS := $(patsubst lib/%.c,$(BUILD)/obj/%.o,$(LIB_SRCS))
SHARED_REAL := $(BUILD)/libperlrl.so.$(VERSION)
SHARED_SONAME := libperlrl.so.$(ABI_VERSION)
SHARED_LINKS := $(BUILD)/$(SHARED_SONAME) $(BUILD)/libperlrl.so
STATIC := $(BUILD)/libperlrl.a
PC := $(BUILD)/libperl.pc

TEST_AREA_SRCS := $(wildcard tests/test_*.c)
TEST_SRCS := $(wildcard tests/*.c)
TEST_OBJS := $(patsubst tests/%.c,$(BUILD)/tests/%.o,$(TEST_SRCS))
TEST_RUNNER := $(BUILD)/tests/run_tests
SUITES_GEN := $(BUILD)/tests/suites.gen.h

# examples/mpi_*.c need mpicc: built by `make mpi`, not by `examples`.
EXAMPLE_SRCS := $(filter-out examples/mpi_%.c,$(wildcard examples/*.c))
EXAMPLES := $(patsubst examples/%.c,$(BUILD)/examples/%,$(EXAMPLE_SRCS))
# Host-side helpers (JSON, data files, byte tokens) linked into every example.
EXAMPLE_COMMON_SRCS := $(wildcard examples/common/*.c)
EXAMPLE_COMMON_HDRS := $(wildcard examples/common/*.h)
BENCH_SRCS := $(wildcard bench/*.c)
BENCHES := $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_SRCS))
DEMO := $(BUILD)/examples/perl_demo

DEPS := scripts/deps.sh
# `make check` / `make demo` build in parallel unless the caller chose -j (checked
# in the recipe: MAKEFLAGS shows -j only there).
PARALLEL = $(if $(filter -j% --jobserver%,$(MAKEFLAGS)),,-j$(NPROC))
SUBMAKE := $(MAKE) --no-print-directory

# Data shared by the tests and the demo (models, data sets) sits beside the repo.
PERL_SHARED_DIR ?= $(abspath $(CURDIR)/../shared)
export PERL_SHARED_DIR

# A string equality test for make functions.  Stamps compare $(strip)ped
# text: GNU make 4.3's $(file <) sometimes keeps the final newline (it depends
# on the size of make's expansion buffer), which made every build a full one.
streq = $(if $(subst x$(1),,x$(2))$(subst x$(2),,x$(1)),,yes)

# =============================================================================
.PHONY: all lib shared static pc
all: shared static pc
lib: shared static
shared: $(SHARED_REAL) $(SHARED_LINKS)
static: $(STATIC)
pc: $(PC)

$(BUILD) $(BUILD)/obj $(BUILD)/tests $(BUILD)/examples $(BUILD)/bench $(BUILD)/check-header:
	@mkdir -p $@

# Objects are rebuilt when the compiler or its flags change (git's GIT-CFLAGS idea).
LIB_SIGNATURE = $(CC) $(LIB_CFLAGS)
$(BUILD)/lib-flags.stamp: FORCE | $(BUILD)
	$(if $(call streq,$(strip $(file <$@)),$(strip $(LIB_SIGNATURE))),,$(file >$@,$(LIB_SIGNATURE)))

$(BUILD)/obj/%.o: lib/%.c $(BUILD)/lib-flags.stamp | $(BUILD)/obj
	$(CC) $(LIB_CFLAGS) $(DEP_FLAGS) -c $< -o $@

$(SHARED_REAL): $(LIB_OBJS) lib/libperl.map | $(BUILD)
	$(if $(LIB_OBJS),,$(error no lib/*.c sources to build))
	$(CC) -shared -pthread -Wl,-soname,$(SHARED_SONAME) -Wl,--version-script=lib/libperl.map \
	    -Wl,--no-undefined $(OPT) $(LDFLAGS) -o $@ $(LIB_OBJS) $(LIB_LDLIBS)

$(BUILD)/$(SHARED_SONAME): $(SHARED_REAL)
	ln -sf $(notdir $<) $@
$(BUILD)/libperlrl.so: $(BUILD)/$(SHARED_SONAME)
	ln -sf $(notdir $<) $@

$(STATIC): $(LIB_OBJS) | $(BUILD)
	$(if $(LIB_OBJS),,$(error no lib/*.c sources to build))
	rm -f $@
	$(AR) rcs $@ $(LIB_OBJS)

# The .pc depends on the install locations, so it is regenerated when they change.
PC_SIGNATURE = $(VERSION)|$(PREFIX)|$(EXEC_PREFIX)|$(LIBDIR)|$(INCLUDEDIR)|$(PC_REQUIRES_PRIVATE)|$(PC_LIBS_PRIVATE)
$(BUILD)/pc.stamp: FORCE | $(BUILD)
	$(if $(call streq,$(strip $(file <$@)),$(strip $(PC_SIGNATURE))),,$(file >$@,$(PC_SIGNATURE)))

# Paths under the prefix are written relative to ${prefix}, so the file stays
# right when a packager relocates the tree.
# $(call pc_relative,PATH,BASE,BASE_VARIABLE)
pc_relative = $(if $(call streq,$(1),$(2)),$${$(3)},$(if $(filter $(2)/%,$(1)),$${$(3)}/$(patsubst $(2)/%,%,$(1)),$(1)))
$(PC): libperl.pc.in $(BUILD)/pc.stamp Makefile | $(BUILD)
	sed -e 's|@PREFIX@|$(PREFIX)|' \
	    -e 's|@EXEC_PREFIX@|$(call pc_relative,$(EXEC_PREFIX),$(PREFIX),prefix)|' \
	    -e 's|@LIBDIR@|$(call pc_relative,$(LIBDIR),$(EXEC_PREFIX),exec_prefix)|' \
	    -e 's|@INCLUDEDIR@|$(call pc_relative,$(INCLUDEDIR),$(PREFIX),prefix)|' \
	    -e 's|@VERSION@|$(VERSION)|' \
	    -e 's|@REQUIRES_PRIVATE@|$(PC_REQUIRES_PRIVATE)|' \
	    -e 's|@LIBS_PRIVATE@|$(PC_LIBS_PRIVATE)|' \
	    $< > $@

# ---- examples and benchmarks: one program per file, linked to the shared library
.PHONY: examples bench-build bench demo
examples: $(EXAMPLES)
bench-build: $(BENCHES)

# The example's own source comes last: gcc writes the -MF file of the last source.
$(BUILD)/examples/%: examples/%.c $(EXAMPLE_COMMON_SRCS) $(EXAMPLE_COMMON_HDRS) $(SHARED_LINKS) \
                     $(BUILD)/lib-flags.stamp | $(BUILD)/examples
	$(CC) $(PROG_CFLAGS) -Iexamples/common -MMD -MP -MF $@.d -MT $@ -o $@ $(EXAMPLE_COMMON_SRCS) $< \
	    $(LDFLAGS) $(PROG_LDLIBS)
$(BUILD)/bench/%: bench/%.c $(SHARED_LINKS) $(BUILD)/lib-flags.stamp | $(BUILD)/bench
	$(CC) $(PROG_CFLAGS) -MMD -MP -MF $@.d -MT $@ -o $@ $< $(LDFLAGS) $(PROG_LDLIBS)
# Times internal kernels, which the shared library does not export: static link.
$(BUILD)/bench/attention_kernels: bench/attention_kernels.c $(STATIC) $(BUILD)/lib-flags.stamp | $(BUILD)/bench
	$(CC) $(LIB_CFLAGS) -MMD -MP -MF $@.d -MT $@ -o $@ $< $(STATIC) $(LDFLAGS) $(LIB_LDLIBS)

# Benchmarks are slow: `make bench` builds and runs each one; `make check` only builds them.
bench:
	@$(DEPS) bench
	@$(SUBMAKE) $(PARALLEL) bench-build
	@set -e; for b in $(BENCHES); do echo "== $$b"; $$b; done

demo:
	@$(DEPS) demo
	@$(SUBMAKE) $(PARALLEL) all examples
	@if [ ! -x $(DEMO) ]; then \
	    echo "make demo: $(DEMO) was not built: examples/perl_demo.c does not exist yet" >&2; \
	    exit 1; \
	fi
	$(DEMO) $(DEMO_ARGS)

# ---- tests: one file per area; the suite list is generated, so a new
# tests/test_<area>.c needs no edit anywhere else.
.PHONY: tests check check-build check-unit check-header check-install
tests: $(TEST_RUNNER)

$(SUITES_GEN): FORCE | $(BUILD)/tests
	@set -e; \
	names=$$(sed -n 's/^Suite[[:space:]]*\*[[:space:]]*\(suite_[a-z0-9_]*\)[[:space:]]*([[:space:]]*void[[:space:]]*).*/\1/p' \
	    $(TEST_AREA_SRCS) /dev/null | awk '!seen[$$0]++'); \
	{ echo '/* Generated by the Makefile from tests/test_*.c: do not edit. */'; \
	  echo '#ifndef LIBPERL_SUITES_GEN_H'; \
	  echo '#define LIBPERL_SUITES_GEN_H'; \
	  echo '#include <check.h>'; \
	  for n in $$names; do echo "Suite *$$n(void);"; done; \
	  echo 'static Suite *(*const libperl_test_suites[])(void) = {'; \
	  for n in $$names; do echo "    $$n,"; done; \
	  echo '    NULL'; \
	  echo '};'; \
	  echo '#endif'; } > $@.tmp; \
	if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv -f $@.tmp $@; fi

TEST_SIGNATURE = $(CC) $(TEST_CFLAGS)
$(BUILD)/tests/flags.stamp: FORCE | $(BUILD)/tests
	$(if $(call streq,$(strip $(file <$@)),$(strip $(TEST_SIGNATURE))),,$(file >$@,$(TEST_SIGNATURE)))

$(BUILD)/tests/check_main.o: $(SUITES_GEN)
$(BUILD)/tests/%.o: tests/%.c $(BUILD)/tests/flags.stamp | $(BUILD)/tests
	$(CC) $(TEST_CFLAGS) $(DEP_FLAGS) -c $< -o $@

# Tests link the static archive (they may use lib/ internals); test_abi
# inspects the shared object, so the runner depends on it too.
$(TEST_RUNNER): $(TEST_OBJS) $(STATIC) $(SHARED_LINKS)
	$(CC) -pthread $(OPT) $(LDFLAGS) -o $@ $(TEST_OBJS) $(STATIC) $(TEST_LDLIBS)

# The fast complete suite.  Sub-makes run after scripts/deps.sh, so the
# pkg-config look-ups see packages it has just installed.
check:
	@$(DEPS) check
	@$(SUBMAKE) $(PARALLEL) check-build
	@$(SUBMAKE) check-header
	@$(SUBMAKE) check-unit
	@$(SUBMAKE) check-install
	@$(SUBMAKE) check-guides
	@if command -v $(PYTHON) >/dev/null 2>&1; then $(SUBMAKE) check-python; \
	 else echo "make check: $(PYTHON) not found, check-python skipped"; fi
	@if command -v $(CARGO) >/dev/null 2>&1; then $(SUBMAKE) check-rust; \
	 else echo "make check: $(CARGO) not found, check-rust skipped"; fi
	@if command -v $(MPICC) >/dev/null 2>&1 && command -v $(MPIRUN) >/dev/null 2>&1; then $(SUBMAKE) check-mpi; \
	 else echo "make check: $(MPICC)/$(MPIRUN) not found, check-mpi skipped"; fi
	@echo "make check: every step passed; unit tests:"
	@tail -n 1 $(BUILD)/tests/check-unit.log | sed 's/^run_tests: [0-9]* suites*: /unit: /'

check-build: all examples bench-build tests

# Tests that look for built artefacts (the ABI test, the demo test) find them
# through LIBPERL_BUILD_DIR, so BUILD=other-dir works too.
check-unit: $(TEST_RUNNER)
	@{ LIBPERL_BUILD_DIR=$${LIBPERL_BUILD_DIR:-$(BUILD)} $(TEST_RUNNER); echo $$? > $(BUILD)/tests/check-unit.rc; } \
	    2>&1 | tee $(BUILD)/tests/check-unit.log
	@exit $$(cat $(BUILD)/tests/check-unit.rc)

# The public header, alone, pedantic: C99 and C11 (gcc, and clang when
# present) and C++11 (g++).  Compiled to objects under build/check-header/.
HEADER_TU := tests/abi/header_check.c
HEADER_CHECK_FLAGS := -Iinclude -pedantic -Wall -Wextra -Werror
HEADER_C_FLAGS := $(HEADER_CHECK_FLAGS) -Wstrict-prototypes -Wmissing-prototypes
check-header: | $(BUILD)/check-header
	$(CC) -std=c99 $(HEADER_C_FLAGS) -c $(HEADER_TU) -o $(BUILD)/check-header/cc-c99.o
	$(CC) -std=c11 $(HEADER_C_FLAGS) -c $(HEADER_TU) -o $(BUILD)/check-header/cc-c11.o
	@set -e; if command -v $(CLANG) >/dev/null 2>&1; then \
	    for std in c99 c11; do \
	        echo "$(CLANG) -std=$$std $(HEADER_C_FLAGS) -c $(HEADER_TU)"; \
	        $(CLANG) -std=$$std $(HEADER_C_FLAGS) -c $(HEADER_TU) -o $(BUILD)/check-header/clang-$$std.o; \
	    done; \
	else echo "check-header: $(CLANG) not found, clang builds skipped"; fi
	$(CXX) -std=c++11 -x c++ $(HEADER_CHECK_FLAGS) -c $(HEADER_TU) -o $(BUILD)/check-header/cxx-c++11.o
	@echo "check-header: ok"

# Install into a scratch DESTDIR, build C and C++ consumers with nothing but
# `pkg-config --cflags --libs libperl`, run them, uninstall, expect no files left.
check-install: all
	@MAKE='$(MAKE)' CC='$(CC)' CXX='$(CXX)' PKG_CONFIG='$(PKG_CONFIG)' \
	    VERSION='$(VERSION)' ABI_VERSION='$(ABI_VERSION)' sh tests/abi/check-install.sh

# ---- bindings, MPI, guides, API reference (docs/python.md, docs/rust.md,
# docs/distributed.md).  `make check` runs check-python, check-rust and
# check-mpi only when their tools exist; asked for by name they need them.
.PHONY: check-python check-rust check-guides mpi check-mpi docs
PYTHON ?= python3
CARGO ?= cargo
MPICC ?= mpicc
MPIRUN ?= mpirun
DOXYGEN ?= doxygen
MPI_EXAMPLE := $(BUILD)/examples/mpi_policy

# The unittest suite against this build's library; again without numpy when
# numpy is installed (the bindings' list-based path).
check-python: $(SHARED_LINKS)
	@set -e; lib=$(abspath $(BUILD)/$(SHARED_SONAME)); \
	run() { PYTHONDONTWRITEBYTECODE=1 LIBPERL_LIBRARY=$$lib "$$@" $(PYTHON) -m unittest discover -s bindings/python/tests; }; \
	echo "check-python: $(PYTHON) -m unittest discover -s bindings/python/tests"; run env; \
	if $(PYTHON) -c 'import numpy' 2>/dev/null; then echo "check-python: again with LIBPERL_NO_NUMPY=1"; \
	    run env LIBPERL_NO_NUMPY=1; fi

check-rust: $(SHARED_LINKS)
	cd bindings/rust && CARGO_TARGET_DIR=$(abspath $(BUILD))/cargo LIBPERL_LIB_DIR=$(abspath $(BUILD)) \
	    $(CARGO) test --offline

# Every complete C program in docs/guide-*.md, compiled and run.
check-guides: $(SHARED_LINKS)
	@CC='$(CC)' sh tests/check_guides.sh $(BUILD)

mpi: $(MPI_EXAMPLE)
$(MPI_EXAMPLE): examples/mpi_policy.c $(SHARED_LINKS) $(BUILD)/lib-flags.stamp | $(BUILD)/examples
	@command -v $(MPICC) >/dev/null 2>&1 || \
	    { echo "make mpi: $(MPICC) not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
	$(MPICC) $(PROG_CFLAGS) -MMD -MP -MF $@.d -MT $@ -o $@ $< $(LDFLAGS) $(PROG_LDLIBS)

# 2 ranks vs one process over the same global batch (tests/test_mpi.sh).
check-mpi: $(MPI_EXAMPLE)
	MPIRUN='$(MPIRUN)' sh tests/test_mpi.sh $(MPI_EXAMPLE)

# The API reference from the public header (and the guides) into $(BUILD)/docs/html.
docs:
	@command -v $(DOXYGEN) >/dev/null 2>&1 || \
	    { echo "make docs: $(DOXYGEN) not found (apt-get install -y --no-install-recommends doxygen)" >&2; exit 1; }
	@mkdir -p $(BUILD)/docs
	LIBPERL_DOCS_DIR=$(BUILD)/docs LIBPERL_VERSION=$(VERSION) $(DOXYGEN) docs/Doxyfile
	@if [ -s $(BUILD)/docs/warnings.log ]; then cat $(BUILD)/docs/warnings.log; fi
	@if grep -q 'libperl\.h' $(BUILD)/docs/warnings.log 2>/dev/null; then \
	    echo "make docs: the header's documentation has errors" >&2; exit 1; fi
	@echo "make docs: $(BUILD)/docs/html/index.html"

# ---- install / uninstall (zstd's layout of targets)
.PHONY: install install-pc install-static install-shared install-includes uninstall
install: install-pc install-static install-shared install-includes

install-pc: $(PC)
	$(INSTALL) -d -m 755 $(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL_DATA) $(PC) $(DESTDIR)$(PKGCONFIGDIR)/libperl.pc

install-static: $(STATIC)
	$(INSTALL) -d -m 755 $(DESTDIR)$(LIBDIR)
	$(INSTALL_DATA) $(STATIC) $(DESTDIR)$(LIBDIR)/libperlrl.a

install-shared: $(SHARED_REAL)
	$(INSTALL) -d -m 755 $(DESTDIR)$(LIBDIR)
	$(INSTALL_PROGRAM) $(SHARED_REAL) $(DESTDIR)$(LIBDIR)/libperlrl.so.$(VERSION)
	ln -sf libperlrl.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SHARED_SONAME)
	ln -sf $(SHARED_SONAME) $(DESTDIR)$(LIBDIR)/libperlrl.so

install-includes:
	$(INSTALL) -d -m 755 $(DESTDIR)$(INCLUDEDIR)/libperl
	$(INSTALL_DATA) $(LIBPERL_H) $(DESTDIR)$(INCLUDEDIR)/libperl/libperl.h

uninstall:
	rm -f $(DESTDIR)$(PKGCONFIGDIR)/libperl.pc
	rm -f $(DESTDIR)$(LIBDIR)/libperlrl.a
	rm -f $(DESTDIR)$(LIBDIR)/libperlrl.so $(DESTDIR)$(LIBDIR)/$(SHARED_SONAME)
	rm -f $(DESTDIR)$(LIBDIR)/libperlrl.so.$(VERSION)
	rm -f $(DESTDIR)$(INCLUDEDIR)/libperl/libperl.h
	if [ -d $(DESTDIR)$(INCLUDEDIR)/libperl ]; then rmdir $(DESTDIR)$(INCLUDEDIR)/libperl 2>/dev/null || :; fi

# ---- hardening (docs/hardening.md): fuzzing, sanitizers, valgrind, ABI.
# Each builds into its own directory through a sub-make of this Makefile with
# OPT (and CC) replaced, so the ordinary build and its flags stay untouched.
.PHONY: fuzz fuzz-build fuzz-seeds check-asan check-valgrind check-tsan check-abi update-abi check-clang

# libFuzzer targets, one per tests/fuzz/fuzz_*.c, linked to a clang
# ASan+UBSan build of the library.  `make fuzz FUZZ_SECONDS=600
# FUZZ_TARGETS=fuzz_json` runs one target for ten minutes.
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_FLAGS ?=
FUZZ_SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=all
FUZZ_OPT := -O1 -g -fno-omit-frame-pointer $(FUZZ_SANITIZE)
FUZZ_ENV := ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1
FUZZ_ALL := $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))

fuzz-build:
	@command -v $(CLANG) >/dev/null 2>&1 || { echo "make fuzz: $(CLANG) not found (apt-get install clang libclang-rt-dev)" >&2; exit 1; }
	@$(SUBMAKE) $(PARALLEL) BUILD=$(FUZZ_BUILD) CC=$(CLANG) OPT='$(FUZZ_OPT) -fsanitize=fuzzer-no-link' static
	@$(SUBMAKE) $(PARALLEL) $(addprefix $(FUZZ_BUILD)/,$(FUZZ_ALL))

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_common.h $(wildcard $(FUZZ_BUILD)/libperlrl.a)
	$(CLANG) -std=c11 $(WARN_FLAGS) $(FUZZ_OPT) -fsanitize=fuzzer -pthread -Iinclude -Ilib \
	    $(BLAS_CFLAGS) $(BLAS_DEFINE) -o $@ $< $(FUZZ_BUILD)/libperlrl.a $(LIB_LDLIBS)

# Runs each target for FUZZ_SECONDS on its committed seeds plus a working
# corpus under $(FUZZ_BUILD)/corpus/; crashes land in $(FUZZ_BUILD)/artifacts/.
fuzz: fuzz-build
	@set -e; mkdir -p $(FUZZ_BUILD)/artifacts; \
	for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	    echo "== $$t: $(FUZZ_SECONDS) s (log: $(FUZZ_BUILD)/$$t.log)"; \
	    if ! $(FUZZ_ENV) $(FUZZ_BUILD)/$$t -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=2560 \
	        -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t- $(FUZZ_FLAGS) \
	        $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t >$(FUZZ_BUILD)/$$t.log 2>&1; then \
	        tail -n 60 $(FUZZ_BUILD)/$$t.log; echo "make fuzz: $$t FAILED" >&2; exit 1; \
	    fi; \
	    grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|#[0-9]+.*DONE)' \
	        $(FUZZ_BUILD)/$$t.log || :; \
	done; echo "make fuzz: no crash in $(FUZZ_TARGETS)"

# Regenerates tests/fuzz/corpus/<target>/ from the seeds each target writes.
fuzz-seeds: fuzz-build
	@set -e; for t in $(FUZZ_ALL); do \
	    rm -rf tests/fuzz/corpus/$$t; mkdir -p tests/fuzz/corpus/$$t; \
	    LIBPERL_FUZZ_WRITE_SEEDS=tests/fuzz/corpus/$$t $(FUZZ_ENV) $(FUZZ_BUILD)/$$t -runs=0 >/dev/null 2>&1; \
	    echo "$$t: $$(ls tests/fuzz/corpus/$$t | wc -l) seeds"; \
	done; du -sh tests/fuzz/corpus

# The whole Check suite under AddressSanitizer + UBSan (gcc), in-process
# (CK_FORK=no) so LeakSanitizer sees every test's allocations.
ASAN_BUILD ?= build-asan
# Every UBSan report is fatal except the kinds that tests/ubsan-suppressions.txt
# lists (known bugs awaiting a fix): those recover, so the file can suppress them.
UBSAN_RECOVER := -fsanitize-recover=float-cast-overflow,shift-base
ASAN_OPT ?= -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all $(UBSAN_RECOVER)
ASAN_ENV := CK_FORK=no LIBPERL_BUILD_DIR=$(ASAN_BUILD) \
            ASAN_OPTIONS=detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=$(CURDIR)/tests/ubsan-suppressions.txt
# The demo suite is a whole training run with its own 240 s limit, which an
# ASan build on two cores can exceed; its library paths are covered elsewhere.
ASAN_SKIP_SUITES ?= demo
check-asan:
	@$(DEPS) check
	@$(SUBMAKE) $(PARALLEL) BUILD=$(ASAN_BUILD) OPT='$(ASAN_OPT)' all examples tests
	$(ASAN_ENV) SKIP_SUITES='$(ASAN_SKIP_SUITES)' sh scripts/run-suites.sh $(ASAN_BUILD)/tests/run_tests

# Every C file of the tree (library, tests, examples, benchmarks) built with
# clang under the same -Werror flags: the code must stay warning-free on both
# compilers, and gcc alone does not show clang's warnings.  Builds only.
CLANG_BUILD ?= build-clang
check-clang:
	@$(DEPS) clang
	@$(SUBMAKE) $(PARALLEL) BUILD=$(CLANG_BUILD) CC=$(CLANG) all examples bench-build tests
	@echo "check-clang: the tree builds warning-free with $(CLANG)"

# The Check suite under valgrind memcheck: no leak, no invalid access.  Slow:
# select suites with CK_RUN_SUITE=<area> (docs/hardening.md lists the times).
# OpenBLAS is held to its Haswell kernels, which valgrind decodes.
VALGRIND ?= valgrind
VALGRIND_SKIP_SUITES ?= demo
VALGRIND_BUILD ?= build-valgrind
VALGRIND_OPT ?= -O2 -g
VALGRIND_FLAGS ?= --leak-check=full --show-leak-kinds=definite,indirect \
                  --errors-for-leak-kinds=definite,indirect --error-exitcode=1 --num-callers=40
check-valgrind:
	@$(DEPS) check
	@command -v $(VALGRIND) >/dev/null 2>&1 || { echo "make check-valgrind: $(VALGRIND) not found (apt-get install valgrind)" >&2; exit 1; }
	@$(SUBMAKE) $(PARALLEL) BUILD=$(VALGRIND_BUILD) OPT='$(VALGRIND_OPT)' all examples tests
	CK_FORK=no LIBPERL_BUILD_DIR=$(VALGRIND_BUILD) OPENBLAS_CORETYPE=Haswell SKIP_SUITES='$(VALGRIND_SKIP_SUITES)' \
	    sh scripts/run-suites.sh $(VALGRIND_BUILD)/tests/run_tests $(VALGRIND) $(VALGRIND_FLAGS)

# ThreadSanitizer over the multi-threaded paths: the pool at 2 threads, one
# model shared by trainers on two host threads (suite hardening, case threads).
TSAN_BUILD ?= build-tsan
TSAN_OPT ?= -O1 -g -fsanitize=thread
TSAN_SUITE ?= hardening
TSAN_CASE ?= threads
check-tsan:
	@$(DEPS) check
	@$(SUBMAKE) $(PARALLEL) BUILD=$(TSAN_BUILD) OPT='$(TSAN_OPT)' all examples tests
	CK_FORK=no CK_RUN_SUITE=$(TSAN_SUITE) CK_RUN_CASE=$(TSAN_CASE) LIBPERL_NUM_THREADS=2 \
	    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$(CURDIR)/tests/tsan-suppressions.txt \
	    LIBPERL_BUILD_DIR=$(TSAN_BUILD) \
	    $(TSAN_BUILD)/tests/run_tests

# ABI: exports == tests/abi/symbols.txt == the header's LIBPERL_API list, and
# abidiff against tests/abi/libperl.abi fails on an incompatible change (added
# functions are compatible).  Built with -g so abidw sees the types.
# `make update-abi` rewrites both files (only when an ABI change is intended).
ABI_BUILD ?= build-abi
ABI_OPT ?= -O2 -g
check-abi:
	@$(DEPS) abi
	@$(SUBMAKE) $(PARALLEL) BUILD=$(ABI_BUILD) OPT='$(ABI_OPT)' shared
	@sh scripts/check-abi.sh $(ABI_BUILD)/libperlrl.so
update-abi:
	@$(DEPS) abi
	@$(SUBMAKE) $(PARALLEL) BUILD=$(ABI_BUILD) OPT='$(ABI_OPT)' shared
	@sh scripts/check-abi.sh --update $(ABI_BUILD)/libperlrl.so

.PHONY: clean-hardening
clean-hardening:
	rm -rf $(FUZZ_BUILD) $(ASAN_BUILD) $(VALGRIND_BUILD) $(TSAN_BUILD) $(ABI_BUILD) $(CLANG_BUILD)

# ---- housekeeping
.PHONY: clean help FORCE
clean:
	rm -rf $(BUILD)

help:
	@echo 'libperl $(VERSION) — targets:'
	@echo '  all (default)   build/libperlrl.so.$(VERSION), build/libperlrl.a, build/libperl.pc'
	@echo '  check           dependencies, full build, header check, unit tests, install test'
	@echo '  demo            dependencies, build, run build/examples/perl_demo'
	@echo '  examples        build examples/*.c into build/examples/'
	@echo '  bench           build and run bench/*.c (bench-build: build only)'
	@echo '  check-header    compile the public header alone as C99, C11 and C++11'
	@echo '  check-unit      build and run the Check unit tests (tests/test_*.c)'
	@echo '  check-install   install into a scratch DESTDIR, link C/C++ consumers, uninstall'
	@echo '  check-guides    compile and run the C programs of docs/guide-*.md'
	@echo '  check-python    the Python bindings unittest suite (bindings/python/tests)'
	@echo '  check-rust      cargo test --offline of bindings/rust (CARGO_TARGET_DIR=$(BUILD)/cargo)'
	@echo '  mpi, check-mpi  build examples/mpi_policy.c with mpicc; 2-rank vs 1-process test'
	@echo '  docs            Doxygen API reference into $(BUILD)/docs/html'
	@echo '  fuzz            build and run each libFuzzer target for FUZZ_SECONDS (fuzz-seeds: regenerate seeds)'
	@echo '  check-asan      the Check suite under ASan+UBSan (build-asan/)'
	@echo '  check-clang     the whole tree built with clang -Werror (build-clang/)'
	@echo '  check-valgrind  the Check suite under valgrind memcheck (CK_RUN_SUITE=<area> to select)'
	@echo '  check-tsan      the threaded tests under ThreadSanitizer (build-tsan/)'
	@echo '  check-abi       exports vs tests/abi/symbols.txt, abidiff vs tests/abi/libperl.abi (update-abi)'
	@echo '  install         install-pc install-static install-shared install-includes'
	@echo '  uninstall       remove every installed file'
	@echo '  clean           remove build/'
	@echo 'variables: PREFIX=$(PREFIX) LIBDIR=$(LIBDIR) INCLUDEDIR=$(INCLUDEDIR)'
	@echo '           PKGCONFIGDIR=$(PKGCONFIGDIR) DESTDIR=$(DESTDIR) BLAS=$(BLAS) CC=$(CC) OPT=$(OPT)'

FORCE:

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/tests/*.d $(BUILD)/examples/*.d $(BUILD)/bench/*.d)
