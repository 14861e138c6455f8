/*
 * ABI: what build/libperlrl.so exports, and that it can sit in one process
 * beside Debian's Perl.  Debian's Perl owns libperl.so and the functions
 * perl_alloc, perl_construct, perl_parse, perl_run, perl_destruct, perl_free
 * and perl_clone, so our exports must never include them; everything we
 * export starts with perl_ (the version script, lib/libperl.map) and is
 * declared LIBPERL_API in the public header.
 *
 * The shared object is found relative to the current directory (make check
 * runs from the repository root); LIBPERL_BUILD_DIR overrides the build
 * directory.  Uses nm and readelf from binutils.
 */
#define _POSIX_C_SOURCE 200809L /* popen, pclose */

#include <check.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libperl/libperl.h"

/* Perl's embedding API (perlembed): names libperl must never define. */
static const char *const perl_interpreter_functions[] = {
    "perl_alloc", "perl_construct", "perl_parse", "perl_run",
    "perl_destruct", "perl_free", "perl_clone",
};
#define N_PERL_INTERPRETER_FUNCTIONS \
    (sizeof(perl_interpreter_functions) / sizeof(perl_interpreter_functions[0]))

/* Linker-defined symbols some toolchains export; not ours, never checked. */
static const char *const linker_symbols[] = {"_init", "_fini", "_edata", "_end", "__bss_start"};
#define N_LINKER_SYMBOLS (sizeof(linker_symbols) / sizeof(linker_symbols[0]))

/* ---- a small list of strings --------------------------------------------- */

typedef struct name_list {
    char **names;
    size_t count;
    size_t capacity;
} name_list;

static void name_list_add(name_list *list, const char *name, size_t length)
{
    if (list->count == list->capacity) {
        list->capacity = list->capacity ? 2 * list->capacity : 64;
        list->names = realloc(list->names, list->capacity * sizeof(*list->names));
        ck_assert_ptr_nonnull(list->names);
    }
    char *copy = malloc(length + 1);
    ck_assert_ptr_nonnull(copy);
    memcpy(copy, name, length);
    copy[length] = '\0';
    list->names[list->count++] = copy;
}

static int name_list_contains(const name_list *list, const char *name)
{
    for (size_t i = 0; i < list->count; i++)
        if (strcmp(list->names[i], name) == 0) return 1;
    return 0;
}

static void name_list_free(name_list *list)
{
    for (size_t i = 0; i < list->count; i++) free(list->names[i]);
    free(list->names);
    memset(list, 0, sizeof(*list));
}

static int is_linker_symbol(const char *name)
{
    for (size_t i = 0; i < N_LINKER_SYMBOLS; i++)
        if (strcmp(name, linker_symbols[i]) == 0) return 1;
    return 0;
}

/* ---- locating the build --------------------------------------------------- */

static char source_root[256];  /* "" or "../" ...: prefix of the repository root */
static char shared_object[512];

static int readable(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) return 0;
    fclose(f);
    return 1;
}

/* Finds build/libperlrl.so from the repository root or one of its subfolders. */
static void locate_build(void)
{
    static const char *const roots[] = {"", "../", "../../"};
    const char *build_dir = getenv("LIBPERL_BUILD_DIR");

    if (build_dir != NULL && build_dir[0] != '\0') {
        snprintf(shared_object, sizeof(shared_object), "%s/libperlrl.so", build_dir);
        snprintf(source_root, sizeof(source_root), "%s/../", build_dir);
        ck_assert_msg(readable(shared_object), "LIBPERL_BUILD_DIR: cannot read %s", shared_object);
        return;
    }
    for (size_t i = 0; i < sizeof(roots) / sizeof(roots[0]); i++) {
        snprintf(shared_object, sizeof(shared_object), "%sbuild/libperlrl.so", roots[i]);
        if (readable(shared_object)) {
            snprintf(source_root, sizeof(source_root), "%s", roots[i]);
            return;
        }
    }
    ck_abort_msg("cannot find build/libperlrl.so from the current directory "
                 "(run from the repository root, or set LIBPERL_BUILD_DIR)");
}

/* ---- reading symbols ------------------------------------------------------ */

/*
 * The defined dynamic symbols of a shared object (`nm -D --defined-only`),
 * without version suffixes ("perl_version@@LIBPERL_0" -> "perl_version") and
 * without absolute version-node symbols (type A, e.g. "LIBPERL_0").
 */
static void read_dynamic_symbols(name_list *out, const char *path)
{
    char command[1024];
    char line[1024];
    FILE *pipe;
    int status;

    snprintf(command, sizeof(command), "nm -D --defined-only '%s' 2>&1", path);
    pipe = popen(command, "r");
    ck_assert_msg(pipe != NULL, "cannot run: %s", command);
    while (fgets(line, sizeof(line), pipe) != NULL) {
        char value[128], type[8], name[512];
        if (sscanf(line, "%127s %7s %511s", value, type, name) != 3) continue;
        if (strcmp(type, "A") == 0) continue;
        name_list_add(out, name, strcspn(name, "@"));
    }
    status = pclose(pipe);
    ck_assert_msg(status == 0, "`%s` failed (status %d): is binutils installed?", command, status);
}

/* The exported functions of libperlrl.so, linker symbols left out. */
static void read_our_exports(name_list *out)
{
    name_list all = {0};
    locate_build();
    read_dynamic_symbols(&all, shared_object);
    for (size_t i = 0; i < all.count; i++) {
        if (is_linker_symbol(all.names[i])) {
            fprintf(stderr, "test_abi: note: %s exports linker symbol %s (ignored)\n",
                    shared_object, all.names[i]);
            continue;
        }
        name_list_add(out, all.names[i], strlen(all.names[i]));
    }
    name_list_free(&all);
    ck_assert_msg(out->count > 0, "%s exports no symbols", shared_object);
}

/* The names declared LIBPERL_API in the public header (comments ignored). */
static void read_header_api(name_list *out)
{
    char path[512];
    FILE *f;
    char *text;
    long size;

    snprintf(path, sizeof(path), "%sinclude/libperl/libperl.h", source_root);
    f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    size = ftell(f);
    ck_assert_int_ge(size, 0);
    rewind(f);
    text = malloc((size_t)size + 1);
    ck_assert_ptr_nonnull(text);
    ck_assert_uint_eq(fread(text, 1, (size_t)size, f), (size_t)size);
    text[size] = '\0';
    fclose(f);

    /* Blank out comments, keeping newlines (so "line starts with #" still works). */
    for (char *p = text; *p != '\0'; p++) {
        if (p[0] == '/' && p[1] == '*') {
            char *end = strstr(p + 2, "*/");
            char *stop = end ? end + 2 : p + strlen(p);
            for (; p < stop; p++)
                if (*p != '\n') *p = ' ';
            p--;
        } else if (p[0] == '/' && p[1] == '/') {
            for (; *p != '\0' && *p != '\n'; p++) *p = ' ';
            if (*p == '\0') break;
        }
    }

    for (char *p = strstr(text, "LIBPERL_API"); p != NULL; p = strstr(p + 1, "LIBPERL_API")) {
        /* Skip the macro's own definitions (preprocessor lines). */
        char *line = p;
        while (line > text && line[-1] != '\n') line--;
        while (*line == ' ' || *line == '\t') line++;
        if (*line == '#') continue;

        char *paren = p + strlen("LIBPERL_API");
        while (*paren != '\0' && *paren != '(' && *paren != ';') paren++;
        if (*paren != '(') continue;
        char *end = paren;
        while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n')) end--;
        char *begin = end;
        while (begin > p && (begin[-1] == '_' || (begin[-1] >= 'a' && begin[-1] <= 'z') ||
                             (begin[-1] >= 'A' && begin[-1] <= 'Z') ||
                             (begin[-1] >= '0' && begin[-1] <= '9')))
            begin--;
        if (end > begin) name_list_add(out, begin, (size_t)(end - begin));
    }
    free(text);
    ck_assert_msg(out->count > 0, "no LIBPERL_API declarations found in %s", path);
}

/* ---- (a) exports ---------------------------------------------------------- */

START_TEST(test_exports_are_prefixed)
{
    name_list exports = {0};
    read_our_exports(&exports);
    for (size_t i = 0; i < exports.count; i++)
        ck_assert_msg(strncmp(exports.names[i], "perl_", 5) == 0,
                      "%s exports %s, which does not start with perl_ (see lib/libperl.map)",
                      shared_object, exports.names[i]);
    ck_assert_msg(name_list_contains(&exports, "perl_version"), "perl_version is not exported");
    name_list_free(&exports);
}
END_TEST

START_TEST(test_exports_avoid_perl_interpreter_names)
{
    name_list exports = {0};
    read_our_exports(&exports);
    for (size_t i = 0; i < N_PERL_INTERPRETER_FUNCTIONS; i++)
        ck_assert_msg(!name_list_contains(&exports, perl_interpreter_functions[i]),
                      "%s exports %s, a function of Perl's embedding API", shared_object,
                      perl_interpreter_functions[i]);
    name_list_free(&exports);
}
END_TEST

/* Every export is public API, and all of the public API is exported. */
START_TEST(test_exports_match_header)
{
    name_list exports = {0};
    name_list declared = {0};
    read_our_exports(&exports);
    read_header_api(&declared);
    for (size_t i = 0; i < exports.count; i++)
        ck_assert_msg(name_list_contains(&declared, exports.names[i]),
                      "%s exports %s, which is not declared LIBPERL_API in libperl.h "
                      "(an internal function must not be LIBPERL_API)",
                      shared_object, exports.names[i]);
    for (size_t i = 0; i < declared.count; i++)
        ck_assert_msg(name_list_contains(&exports, declared.names[i]),
                      "libperl.h declares %s, but %s does not define it", declared.names[i],
                      shared_object);
    name_list_free(&exports);
    name_list_free(&declared);
}
END_TEST

/* ---- (b) no clash with Debian's libperl.so -------------------------------- */

START_TEST(test_no_clash_with_system_perl)
{
    static const char *const patterns[] = {
        "/usr/lib/x86_64-linux-gnu/libperl.so.5*",
        "/usr/lib/*-linux-gnu*/libperl.so.5*",
        "/usr/lib/libperl.so.5*",
        "/usr/lib64/libperl.so.5*",
    };
    name_list exports = {0};
    name_list perl_symbols = {0};
    const char *perl_library = NULL;
    glob_t matches = {0};

    read_our_exports(&exports);
    for (size_t i = 0; i < sizeof(patterns) / sizeof(patterns[0]) && perl_library == NULL; i++) {
        if (glob(patterns[i], 0, NULL, &matches) == 0 && matches.gl_pathc > 0)
            perl_library = matches.gl_pathv[0];
        else
            globfree(&matches);
    }

    if (perl_library == NULL) {
        fprintf(stderr, "test_abi: Perl's libperl.so not present, compared against the built-in list\n");
        for (size_t i = 0; i < N_PERL_INTERPRETER_FUNCTIONS; i++)
            name_list_add(&perl_symbols, perl_interpreter_functions[i],
                          strlen(perl_interpreter_functions[i]));
    } else {
        read_dynamic_symbols(&perl_symbols, perl_library);
        ck_assert_msg(name_list_contains(&perl_symbols, "perl_alloc"),
                      "%s does not export perl_alloc: not Perl's library?", perl_library);
    }

    for (size_t i = 0; i < exports.count; i++)
        ck_assert_msg(!name_list_contains(&perl_symbols, exports.names[i]),
                      "%s and %s both export %s", shared_object,
                      perl_library ? perl_library : "Perl", exports.names[i]);

    if (perl_library != NULL) globfree(&matches);
    name_list_free(&exports);
    name_list_free(&perl_symbols);
}
END_TEST

/* ---- (c) SONAME ----------------------------------------------------------- */

/* The SONAME recorded in `path`, via readelf -d (objdump -p as a fallback). */
static int read_soname(char *out, size_t out_size, const char *path)
{
    static const char *const commands[] = {"readelf -d '%s' 2>/dev/null",
                                           "objdump -p '%s' 2>/dev/null"};
    for (size_t c = 0; c < sizeof(commands) / sizeof(commands[0]); c++) {
        char command[1024];
        char line[1024];
        int found = 0;
        snprintf(command, sizeof(command), commands[c], path);
        FILE *pipe = popen(command, "r");
        if (pipe == NULL) continue;
        while (fgets(line, sizeof(line), pipe) != NULL) {
            if (found || strstr(line, "SONAME") == NULL) continue;
            char *open = strchr(line, '[');
            if (open != NULL) { /* readelf: " ... (SONAME)  Library soname: [libperlrl.so.0]" */
                size_t length = strcspn(open + 1, "]");
                snprintf(out, out_size, "%.*s", (int)length, open + 1);
                found = 1;
            } else if (sscanf(line, " SONAME %255s", out) == 1) { /* objdump */
                found = 1;
            }
        }
        pclose(pipe);
        if (found) return 1;
    }
    return 0;
}

START_TEST(test_soname)
{
    char soname[256] = "";
    locate_build();
    ck_assert_msg(read_soname(soname, sizeof(soname), shared_object),
                  "no SONAME found in %s (readelf/objdump missing?)", shared_object);
    ck_assert_str_eq(soname, "libperlrl.so.0");
}
END_TEST

/* ---- (d) version and status strings -------------------------------------- */

START_TEST(test_version_matches_header)
{
    ck_assert_uint_eq(perl_version_number(), (unsigned)LIBPERL_VERSION_NUMBER);
    ck_assert_ptr_nonnull(perl_version());
    ck_assert_str_eq(perl_version(), LIBPERL_VERSION_STRING);
}
END_TEST

START_TEST(test_status_strings)
{
    static const int statuses[] = {
        LIBPERL_OK,           LIBPERL_ERR_INVALID_ARGUMENT, LIBPERL_ERR_OUT_OF_MEMORY,
        LIBPERL_ERR_IO,       LIBPERL_ERR_FORMAT,           LIBPERL_ERR_UNSUPPORTED,
        LIBPERL_ERR_SHAPE,    LIBPERL_ERR_RANGE,            LIBPERL_ERR_NUMERIC,
        LIBPERL_ERR_STATE,    LIBPERL_ERR_CALLBACK,         LIBPERL_ERR_INTERNAL,
    };
    const size_t n = sizeof(statuses) / sizeof(statuses[0]);

    for (size_t i = 0; i < n; i++) {
        const char *text = perl_status_str(statuses[i]);
        ck_assert_msg(text != NULL, "perl_status_str(%d) is NULL", statuses[i]);
        ck_assert_msg(text[0] != '\0', "perl_status_str(%d) is empty", statuses[i]);
        for (size_t j = 0; j < i; j++)
            ck_assert_msg(strcmp(text, perl_status_str(statuses[j])) != 0,
                          "perl_status_str(%d) and perl_status_str(%d) are both \"%s\"",
                          statuses[i], statuses[j], text);
    }
    /* Unknown codes still get text, never NULL. */
    ck_assert_ptr_nonnull(perl_status_str(1));
    ck_assert_ptr_nonnull(perl_status_str(-1000));
}
END_TEST

Suite *suite_abi(void)
{
    Suite *suite = suite_create("abi");
    TCase *exports = tcase_create("exports");
    TCase *perl = tcase_create("perl_clash");
    TCase *soname = tcase_create("soname");
    TCase *version = tcase_create("version");

    tcase_add_test(exports, test_exports_are_prefixed);
    tcase_add_test(exports, test_exports_avoid_perl_interpreter_names);
    tcase_add_test(exports, test_exports_match_header);
    tcase_add_test(perl, test_no_clash_with_system_perl);
    tcase_add_test(soname, test_soname);
    tcase_add_test(version, test_version_matches_header);
    tcase_add_test(version, test_status_strings);

    suite_add_tcase(suite, exports);
    suite_add_tcase(suite, perl);
    suite_add_tcase(suite, soname);
    suite_add_tcase(suite, version);
    return suite;
}
