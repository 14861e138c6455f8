/*
 * Adapter interop with Hugging Face PEFT, both directions, against committed
 * fixtures (so CI needs no torch):
 *
 *   libperl -> PEFT   tests/fixtures/interop_rslora/ and interop_reward/ were
 *                     written by perl_lora_save (tests/reference/peft_interop.py
 *                     --write); the same script loaded them the way PEFT does
 *                     (names, shapes, scaling incl. rsLoRA, modules_to_save)
 *                     and stored the logits and reward scores in
 *                     interop_expected.safetensors.  Here libperl must give
 *                     those numbers, and a fresh perl_lora_save must still
 *                     write exactly the files PEFT was shown (same tensor
 *                     names, shapes, dtypes, bytes and config keys).
 *   PEFT -> libperl   the lora_* adapters (and reward_lora with its score
 *                     head) were written by torch with PEFT names
 *                     (tests/reference/gen_fixtures.py, gen_reward_fixtures.py);
 *                     they must load and reproduce torch's logits / scores.
 *
 * The fixture directory is $LIBPERL_FIXTURE_DIR, else tests/fixtures, else
 * ../tests/fixtures.
 */
#define _POSIX_C_SOURCE 200809L

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libperl/libperl.h"
#include "safetensors.h"
#include "test_util.h"

#define INTEROP_RTOL 1e-4 /* float32 library vs float64 torch, relative to max |reference| */

static const char *interop_fixture_dir(void)
{
    static char dir[512]; /* short enough that dir + '/' + name fits callers' path buffers */
    if (dir[0] == '\0' && test_fixture_dir(dir, sizeof dir, "interop_expected.safetensors") == NULL)
        ck_abort_msg("interop fixtures not found: set LIBPERL_FIXTURE_DIR or run from the repository root");
    return dir;
}

static const char *fx(char *buf, size_t n, const char *name)
{
    int len = snprintf(buf, n, "%s/%s", interop_fixture_dir(), name);
    ck_assert_msg(len > 0 && (size_t)len < n, "path too long: %s", name);
    return buf;
}

static void open_fixture(st_file *f, const char *name)
{
    char path[1200];
    fx(path, sizeof path, name);
    ck_assert_msg(st_open(f, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    const char *format = st_metadata(f, "format");
    ck_assert_msg(format != NULL && strcmp(format, "libperl-fixture") == 0, "%s: not a libperl fixture", path);
}

/* A float or int32 copy of a fixture tensor with exactly `numel` elements (free()). */
static void *tensor_copy(const st_file *f, const char *name, size_t numel, int want_i32)
{
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: no tensor %s", f->path, name);
    ck_assert_msg(t->numel == numel, "%s: %s has %llu elements, expected %zu", f->path, name,
                  (unsigned long long)t->numel, numel);
    void *out = malloc(numel * 4);
    ck_assert_ptr_nonnull(out);
    if (want_i32) {
        ck_assert_msg(t->dtype == ST_I32, "%s: %s is not I32", f->path, name);
        memcpy(out, t->data, numel * 4);
    } else {
        ck_assert_msg(st_to_f32(t, out) == LIBPERL_OK, "%s: %s", name, perl_last_error());
    }
    return out;
}

/* Prints the worst difference relative to max |want|; returns it (inf on non-finite). */
static double rel_diff(const char *what, const float *got, const float *want, size_t n)
{
    double max_ref = 0.0, max_diff = 0.0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) finite = 0;
        max_ref = fmax(max_ref, fabs((double)want[i]));
        max_diff = fmax(max_diff, fabs((double)got[i] - (double)want[i]));
    }
    double rel = !finite ? INFINITY : max_ref > 0.0 ? max_diff / max_ref : max_diff;
    printf("interop: %-58s max|ref| %.3e  max|diff| %.3e  rel %.3e\n", what, max_ref, max_diff, rel);
    fflush(stdout);
    return rel;
}

static perl_model *load_tiny(void)
{
    char path[1200];
    perl_model *model = NULL;
    fx(path, sizeof path, "tiny");
    ck_assert_msg(perl_model_load(&model, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    return model;
}

typedef struct rows {
    int32_t *tokens, *lengths;
    perl_batch batch;
} rows;

static void rows_read(rows *r, const st_file *f, const char *tokens_key, const char *lengths_key)
{
    const st_tensor *t = st_find(f, tokens_key);
    ck_assert_msg(t != NULL && t->ndim == 2, "%s: no 2-D tensor %s", f->path, tokens_key);
    int b = (int)t->shape[0], s = (int)t->shape[1];
    r->tokens = tensor_copy(f, tokens_key, (size_t)b * (size_t)s, 1);
    r->lengths = tensor_copy(f, lengths_key, (size_t)b, 1);
    perl_batch_init(&r->batch);
    r->batch.batch_size = b;
    r->batch.seq_len = s;
    r->batch.tokens = r->tokens;
    r->batch.lengths = r->lengths;
}

static void rows_free(rows *r)
{
    free(r->tokens);
    free(r->lengths);
}

static float *logits_of(const perl_model *model, const perl_lora *lora, const rows *r, size_t *out_n)
{
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    ck_assert_int_eq(perl_model_get_config(model, &cfg), LIBPERL_OK);
    size_t n = (size_t)r->batch.batch_size * (size_t)r->batch.seq_len * (size_t)cfg.vocab_size;
    float *logits = malloc(n * sizeof *logits);
    ck_assert_ptr_nonnull(logits);
    ck_assert_msg(perl_model_forward(model, lora, &r->batch, logits, NULL) == LIBPERL_OK, "forward: %s",
                  perl_last_error());
    *out_n = n;
    return logits;
}

/* ---- libperl -> PEFT ------------------------------------------------------- */

START_TEST(test_libperl_adapter_matches_peft)
{
    char path[1200];
    st_file f;
    rows r;
    size_t n;
    perl_model *model = load_tiny();
    perl_lora *lora = NULL;

    open_fixture(&f, "interop_expected.safetensors");
    rows_read(&r, &f, "tokens", "lengths");
    ck_assert_msg(perl_lora_load(&lora, model, fx(path, sizeof path, "interop_rslora")) == LIBPERL_OK, "%s",
                  perl_last_error());
    float *got = logits_of(model, lora, &r, &n);
    float *want = tensor_copy(&f, "logits_rslora", n, 0);
    ck_assert_msg(rel_diff("interop_rslora logits (rsLoRA, all targets) vs PEFT", got, want, n) <= INTEROP_RTOL,
                  "libperl's rsLoRA adapter, applied the PEFT way, gives other logits");
    free(got);
    free(want);
    perl_lora_free(lora);
    rows_free(&r);
    st_close(&f);
    perl_model_free(model);
}
END_TEST

START_TEST(test_libperl_reward_matches_peft)
{
    char path[1200];
    st_file f;
    rows r;
    size_t n;
    perl_model *model = load_tiny();
    perl_reward *reward = NULL;
    perl_lora *lora = NULL;
    perl_reward_options opts;

    open_fixture(&f, "interop_expected.safetensors");
    rows_read(&r, &f, "tokens", "lengths");
    perl_reward_options_init(&opts);
    ck_assert_msg(perl_reward_load(&reward, &lora, model, fx(path, sizeof path, "interop_reward"), &opts) ==
                      LIBPERL_OK,
                  "%s", perl_last_error());
    float scores[8];
    ck_assert_int_le(r.batch.batch_size, 8);
    ck_assert_msg(perl_reward_score(reward, &r.batch, scores) == LIBPERL_OK, "%s", perl_last_error());
    float *want = tensor_copy(&f, "scores_reward", (size_t)r.batch.batch_size, 0);
    ck_assert_msg(rel_diff("interop_reward scores (SEQ_CLS, score head) vs PEFT", scores, want,
                           (size_t)r.batch.batch_size) <= INTEROP_RTOL,
                  "reward scores differ from PEFT's");
    free(want);
    float *got = logits_of(model, lora, &r, &n);
    want = tensor_copy(&f, "logits_reward", n, 0);
    ck_assert_msg(rel_diff("interop_reward LM logits (q,v r 2 alpha 3) vs PEFT", got, want, n) <= INTEROP_RTOL,
                  "logits differ from PEFT's");
    free(got);
    free(want);
    perl_reward_free(reward);
    perl_lora_free(lora);
    rows_free(&r);
    st_close(&f);
    perl_model_free(model);
}
END_TEST

/* The config as text, without base_model_name_or_path (it records the path the
 * base was loaded from, which depends on the working directory). */
static char *config_text(const char *path)
{
    size_t len;
    char *text = test_read_file(path, &len);
    ck_assert_msg(text != NULL, "cannot read %s", path);
    char *line = strstr(text, "\"base_model_name_or_path\"");
    if (line != NULL) {
        char *end = strchr(line, '\n');
        ck_assert_ptr_nonnull(end);
        memmove(line, end + 1, strlen(end + 1) + 1);
    }
    return text;
}

static const char *const saved_adapters[] = {"interop_rslora", "interop_reward"};

/* What perl_lora_save writes today must be what PEFT was shown. */
START_TEST(test_saver_writes_the_layout_peft_read)
{
    const char *name = saved_adapters[_i];
    char src[1200], tmp[1024], a[1300], b[1300];
    perl_model *model = load_tiny();
    perl_lora *lora = NULL;
    st_file committed, fresh;

    fx(src, sizeof src, name);
    ck_assert_msg(perl_lora_load(&lora, model, src) == LIBPERL_OK, "%s: %s", src, perl_last_error());
    ck_assert_int_eq(test_make_temp_dir(tmp, sizeof tmp), 0);
    ck_assert_msg(perl_lora_save(lora, tmp) == LIBPERL_OK, "%s", perl_last_error());

    snprintf(a, sizeof a, "%s/adapter_model.safetensors", src);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", tmp);
    ck_assert_msg(st_open(&committed, a) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_msg(st_open(&fresh, b) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_msg(committed.n_tensors == fresh.n_tensors, "%s: %zu tensors saved, PEFT read %zu", name,
                  fresh.n_tensors, committed.n_tensors);
    size_t n_params = 0;
    for (size_t i = 0; i < committed.n_tensors; i++) {
        const st_tensor *want = &committed.tensors[i];
        const st_tensor *got = st_find(&fresh, want->name);
        ck_assert_msg(got != NULL, "%s: perl_lora_save no longer writes %s", name, want->name);
        ck_assert_msg(got->dtype == ST_F32 && got->dtype == want->dtype, "%s: dtype of %s", name, want->name);
        ck_assert_int_eq(got->ndim, want->ndim);
        for (int d = 0; d < want->ndim; d++) ck_assert_int_eq(got->shape[d], want->shape[d]);
        ck_assert_msg(got->nbytes == want->nbytes && memcmp(got->data, want->data, want->nbytes) == 0,
                      "%s: %s differs from the committed bytes", name, want->name);
        n_params += (size_t)want->numel;
    }
    ck_assert_uint_eq(n_params, perl_lora_num_params(lora));
    printf("interop: %s: perl_lora_save wrote the %zu tensors PEFT loaded, bit for bit\n", name,
           committed.n_tensors);
    st_close(&committed);
    st_close(&fresh);

    snprintf(a, sizeof a, "%s/adapter_config.json", src);
    snprintf(b, sizeof b, "%s/adapter_config.json", tmp);
    char *want_cfg = config_text(a), *got_cfg = config_text(b);
    ck_assert_msg(strcmp(want_cfg, got_cfg) == 0, "%s: adapter_config.json changed:\n%s\nPEFT read:\n%s", name,
                  got_cfg, want_cfg);
    free(want_cfg);
    free(got_cfg);

    test_remove_tree(tmp);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

/* ---- PEFT -> libperl ------------------------------------------------------- */

static const char *const peft_subsets[] = {"qv", "qkvo", "mlp", "all", "all_rslora"};

START_TEST(test_peft_adapter_loads)
{
    const char *subset = peft_subsets[_i];
    char name[64], file[128], path[1200], what[160];
    st_file f, weights;
    rows r;
    size_t n;
    perl_model *model = load_tiny();
    perl_lora *lora = NULL;

    snprintf(name, sizeof name, "lora_%s", subset);
    ck_assert_msg(perl_lora_load(&lora, model, fx(path, sizeof path, name)) == LIBPERL_OK, "%s: %s", name,
                  perl_last_error());
    /* every tensor torch wrote became a parameter */
    snprintf(file, sizeof file, "%s/adapter_model.safetensors", name);
    ck_assert_msg(st_open(&weights, fx(path, sizeof path, file)) == LIBPERL_OK, "%s", perl_last_error());
    size_t numel = 0;
    for (size_t i = 0; i < weights.n_tensors; i++) numel += (size_t)weights.tensors[i].numel;
    st_close(&weights);
    ck_assert_uint_eq(numel, perl_lora_num_params(lora));

    snprintf(file, sizeof file, "lora_grads_%s.safetensors", subset);
    open_fixture(&f, file);
    rows_read(&r, &f, "tokens", "lengths");
    float *got = logits_of(model, lora, &r, &n);
    float *want = tensor_copy(&f, "logits", n, 0);
    snprintf(what, sizeof what, "torch-written %s (scale %s) logits", name, st_metadata(&f, "scale"));
    ck_assert_msg(rel_diff(what, got, want, n) <= INTEROP_RTOL, "%s: logits differ from torch's", name);
    free(got);
    free(want);
    rows_free(&r);
    st_close(&f);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

START_TEST(test_peft_reward_adapter_loads)
{
    char path[1200];
    st_file f;
    rows chosen, rejected;
    perl_model *model = load_tiny();
    perl_reward *reward = NULL;
    perl_lora *lora = NULL;
    perl_reward_options opts;
    float got[16];

    perl_reward_options_init(&opts);
    ck_assert_msg(perl_reward_load(&reward, &lora, model, fx(path, sizeof path, "reward_lora"), &opts) ==
                      LIBPERL_OK,
                  "%s", perl_last_error());
    open_fixture(&f, "reward_pairwise.safetensors");
    rows_read(&chosen, &f, "chosen_tokens", "chosen_lengths");
    rows_read(&rejected, &f, "rejected_tokens", "rejected_lengths");
    ck_assert_int_le(chosen.batch.batch_size, 16);
    ck_assert_int_le(rejected.batch.batch_size, 16);

    ck_assert_msg(perl_reward_score(reward, &chosen.batch, got) == LIBPERL_OK, "%s", perl_last_error());
    float *want = tensor_copy(&f, "chosen_scores", (size_t)chosen.batch.batch_size, 0);
    ck_assert(rel_diff("torch-written reward_lora (SEQ_CLS) chosen scores", got, want,
                       (size_t)chosen.batch.batch_size) <= INTEROP_RTOL);
    free(want);
    ck_assert_msg(perl_reward_score(reward, &rejected.batch, got) == LIBPERL_OK, "%s", perl_last_error());
    want = tensor_copy(&f, "rejected_scores", (size_t)rejected.batch.batch_size, 0);
    ck_assert(rel_diff("torch-written reward_lora (SEQ_CLS) rejected scores", got, want,
                       (size_t)rejected.batch.batch_size) <= INTEROP_RTOL);
    free(want);

    rows_free(&chosen);
    rows_free(&rejected);
    st_close(&f);
    perl_reward_free(reward);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

Suite *suite_interop(void)
{
    Suite *s = suite_create("interop");
    TCase *tc = tcase_create("peft");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_libperl_adapter_matches_peft);
    tcase_add_test(tc, test_libperl_reward_matches_peft);
    tcase_add_loop_test(tc, test_saver_writes_the_layout_peft_read, 0,
                        (int)(sizeof saved_adapters / sizeof saved_adapters[0]));
    tcase_add_loop_test(tc, test_peft_adapter_loads, 0, (int)(sizeof peft_subsets / sizeof peft_subsets[0]));
    tcase_add_test(tc, test_peft_reward_adapter_loads);
    suite_add_tcase(s, tc);
    return s;
}
