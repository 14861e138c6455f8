/*
 * The demo (examples/perl_demo.c) end to end: runs the built program in
 * --quick mode with a fixed seed into a scratch directory and checks that it
 * exits 0 (every stage improved on its starting point) and wrote what it
 * promises: the metrics CSV, the adapters, and the PNG plot when gnuplot is
 * installed (otherwise the note that the plot was skipped).  A second run
 * loads the first run's base (--base) and does the reward and RL stages by
 * full fine-tuning (--full), as bench/demo_comparison.sh does, and must
 * improve too and write its JSON results.
 *
 * The program is looked up as $LIBPERL_BUILD_DIR/examples/perl_demo, else
 * next to this runner (<build>/tests/run_tests -> <build>/examples/), else
 * build/examples/perl_demo relative to the working directory (the repo root).
 */
#define _POSIX_C_SOURCE 200809L /* fork, execv, waitpid, readlink, setenv */

#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_util.h"

/* The quick run's RL stage is short (40 steps on a 60-step reward model), so
 * whether it improves depends on the seed; with seed 3 it does by a clear
 * margin (-0.85 -> -0.57 here).  The run is bitwise deterministic, so a
 * change of outcome means the numerics changed: re-check the full demo. */
#define DEMO_SEED "3"
#define DEMO_TIMEOUT_SECONDS 240 /* per run: ~30-60 s on two idle cores; generous for loaded CI machines */

static int is_executable(const char *path)
{
    return access(path, X_OK) == 0;
}

/* Finds the demo program; returns 0 and fills buf, or -1 with buf = the last path tried. */
static int find_demo(char *buf, size_t n)
{
    const char *build = getenv("LIBPERL_BUILD_DIR");
    if (build != NULL && build[0] != '\0') {
        snprintf(buf, n, "%s/examples/perl_demo", build);
        return is_executable(buf) ? 0 : -1;
    }
    /* Beside the runner: <build>/tests/run_tests -> <build>/examples/perl_demo. */
    char exe[4096];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash != NULL) {
            *slash = '\0'; /* <build>/tests */
            slash = strrchr(exe, '/');
            if (slash != NULL) {
                *slash = '\0'; /* <build> */
                int written = snprintf(buf, n, "%s/examples/perl_demo", exe);
                if (written > 0 && (size_t)written < n && is_executable(buf)) return 0;
            }
        }
    }
    snprintf(buf, n, "build/examples/perl_demo");
    return is_executable(buf) ? 0 : -1;
}

/* Runs argv with stdout and stderr into log_path; returns the exit status, or -1. */
static int run_logged(char *const argv[], const char *log_path)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) _exit(126);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
        alarm(DEMO_TIMEOUT_SECONDS); /* never outlive the test that started it */
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

static long size_of(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static int gnuplot_installed(void)
{
    const char *path = getenv("PATH");
    char full[4352];
    while (path != NULL && *path) {
        size_t n = strcspn(path, ":");
        snprintf(full, sizeof full, "%.*s/gnuplot", (int)n, n ? path : ".");
        if (access(full, X_OK) == 0) return 1;
        path += n + (path[n] == ':');
    }
    return 0;
}

/* The last ~1500 characters of the log, for failure messages. */
static const char *log_tail(const char *log)
{
    size_t n = log ? strlen(log) : 0;
    return log == NULL ? "(no log)" : (n > 1500 ? log + n - 1500 : log);
}

START_TEST(demo_quick_run_improves_every_stage)
{
    char demo[4096], dir[4096], out[4200], log_path[4200], path[4400];
    ck_assert_msg(find_demo(demo, sizeof demo) == 0,
                  "the demo program %s is not built (make examples, or set LIBPERL_BUILD_DIR)", demo);
    ck_assert_int_eq(test_make_temp_dir(dir, sizeof dir), 0);
    test_path(out, sizeof out, dir, "out");
    test_path(log_path, sizeof log_path, dir, "demo.log");

    char *argv[] = {demo, "--quick", "--seed", DEMO_SEED, "--threads", "2", "--out", out, NULL};
    int status = run_logged(argv, log_path);
    char *log = test_read_file(log_path, NULL);
    ck_assert_msg(status == 0, "perl_demo --quick exited with %d; its output ends:\n%s", status, log_tail(log));
    ck_assert_msg(log != NULL && strstr(log, "Summary") != NULL, "no summary in the output:\n%s", log_tail(log));

    /* metrics.csv: the header and one row per RL step */
    test_path(path, sizeof path, out, "metrics.csv");
    char *csv = test_read_file(path, NULL);
    ck_assert_msg(csv != NULL, "%s was not written", path);
    ck_assert_msg(strncmp(csv, "step,mean_reward,", 17) == 0, "unexpected CSV header in %s", path);
    int lines = 0;
    for (const char *p = csv; *p; p++) lines += *p == '\n';
    ck_assert_msg(lines >= 3, "%s has %d lines; expected a header and RL steps", path, lines);
    free(csv);

    /* the adapters in PEFT layout and the frozen base in HF layout */
    static const char *const files[] = {"reward_adapter/adapter_config.json", "reward_adapter/adapter_model.safetensors",
                                        "policy_adapter/adapter_config.json", "policy_adapter/adapter_model.safetensors",
                                        "base_model/config.json", "base_model/model.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        test_path(path, sizeof path, out, files[i]);
        ck_assert_msg(size_of(path) > 0, "%s is missing or empty", path);
    }

    /* the plot, or the note that it was skipped */
    test_path(path, sizeof path, out, "rl_curves.png");
    if (gnuplot_installed()) {
        ck_assert_msg(size_of(path) > 8, "gnuplot is installed but %s is missing or empty:\n%s", path, log_tail(log));
        char *png = test_read_file(path, NULL);
        ck_assert_msg(png != NULL && memcmp(png, "\x89PNG", 4) == 0, "%s is not a PNG", path);
        free(png);
    } else {
        ck_assert_msg(strstr(log, "plot skipped") != NULL, "no plot and no 'plot skipped' note:\n%s", log_tail(log));
    }
    free(log);

    /* the comparison run: the saved base, full fine-tuning, JSON results */
    char base[4400], out_full[4200], json[4400];
    test_path(base, sizeof base, out, "base_model");
    test_path(out_full, sizeof out_full, dir, "out_full");
    test_path(json, sizeof json, dir, "results.json");
    char *argv_full[] = {demo, "--quick", "--seed", DEMO_SEED, "--threads", "2", "--base", base, "--full",
                         "--out", out_full, "--json", json, NULL};
    status = run_logged(argv_full, log_path);
    log = test_read_file(log_path, NULL);
    ck_assert_msg(status == 0, "perl_demo --quick --full --base exited with %d; its output ends:\n%s", status,
                  log_tail(log));
    ck_assert_msg(strstr(log, "pretrain: skipped") != NULL, "the base was not loaded:\n%s", log_tail(log));
    char *results = test_read_file(json, NULL);
    ck_assert_msg(results != NULL, "%s was not written", json);
    ck_assert_msg(strstr(results, "\"mode\": \"full\"") != NULL && strstr(results, "\"rl_step_s\"") != NULL &&
                      strstr(results, "\"reward_peak_rss_mb\"") != NULL,
                  "unexpected results JSON: %s", results);
    test_path(path, sizeof path, out_full, "policy_adapter/model.safetensors"); /* FULL: a whole model */
    ck_assert_msg(size_of(path) > 0, "%s is missing or empty", path);
    free(results);
    free(log);
    test_remove_tree(dir);
}
END_TEST

Suite *suite_demo(void)
{
    Suite *suite = suite_create("demo");
    TCase *tc = tcase_create("quick");
    tcase_set_timeout(tc, 2 * DEMO_TIMEOUT_SECONDS + 10);
    tcase_add_test(tc, demo_quick_run_improves_every_stage);
    suite_add_tcase(suite, tc);
    return suite;
}
