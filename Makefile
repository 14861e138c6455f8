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
LIB_CFLAGS = -std=c11 $(WARN_FLAGS) -fPIC -fvisibility=hidden -pthread -Iinclude -Ilib \
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

EXAMPLE_SRCS := $(wildcard examples/*.c)
EXAMPLES := $(patsubst examples/%.c,$(BUILD)/examples/%,$(EXAMPLE_SRCS))
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

# A string equality test for make functions.
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
	$(if $(call streq,$(file <$@),$(LIB_SIGNATURE)),,$(file >$@,$(LIB_SIGNATURE)))

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
	$(if $(call streq,$(file <$@),$(PC_SIGNATURE)),,$(file >$@,$(PC_SIGNATURE)))

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

$(BUILD)/examples/%: examples/%.c $(SHARED_LINKS) $(BUILD)/lib-flags.stamp | $(BUILD)/examples
	$(CC) $(PROG_CFLAGS) -MMD -MP -MF $@.d -MT $@ -o $@ $< $(LDFLAGS) $(PROG_LDLIBS)
$(BUILD)/bench/%: bench/%.c $(SHARED_LINKS) $(BUILD)/lib-flags.stamp | $(BUILD)/bench
	$(CC) $(PROG_CFLAGS) -MMD -MP -MF $@.d -MT $@ -o $@ $< $(LDFLAGS) $(PROG_LDLIBS)

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
	$(if $(call streq,$(file <$@),$(TEST_SIGNATURE)),,$(file >$@,$(TEST_SIGNATURE)))

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
	@echo "make check: all passed"

check-build: all examples bench-build tests

check-unit: $(TEST_RUNNER)
	$(TEST_RUNNER)

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
	@echo '  install         install-pc install-static install-shared install-includes'
	@echo '  uninstall       remove every installed file'
	@echo '  clean           remove build/'
	@echo 'variables: PREFIX=$(PREFIX) LIBDIR=$(LIBDIR) INCLUDEDIR=$(INCLUDEDIR)'
	@echo '           PKGCONFIGDIR=$(PKGCONFIGDIR) DESTDIR=$(DESTDIR) BLAS=$(BLAS) CC=$(CC) OPT=$(OPT)'

FORCE:

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/tests/*.d $(BUILD)/examples/*.d $(BUILD)/bench/*.d)
