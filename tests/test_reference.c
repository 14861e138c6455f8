/*
 * Correctness against PyTorch: every tensor the library computes is compared
 * with fixtures written by tests/reference/gen_fixtures.py (a pure-torch
 * Hugging Face Llama run in float64), printing the worst-case difference per
 * tensor (llm.c's test_gpt2.c).  docs/reference-fixtures.md lists the files,
 * their keys and why the tolerances are what they are.
 *
 * The fixture directory is $LIBPERL_FIXTURE_DIR, else tests/fixtures (the
 * runner starts in the repository root), else ../tests/fixtures.
 */
#define _POSIX_C_SOURCE 200809L /* getenv, snprintf */

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adamw.h"
#include "libperl/libperl.h"
#include "lora.h"
#include "model.h"
#include "safetensors.h"
#include "test_util.h"

/* Worst |difference| over a tensor, relative to its largest |reference|
 * value.  Float32 kernels reproduce the float64 reference to ~1e-6 of the
 * tensor's scale; a wrong convention (RoPE pairing, GQA head mapping, a
 * missing scale) is off by O(1).  See docs/reference-fixtures.md. */
#define FORWARD_RTOL 1e-4  /* logits and final hidden states */
#define GRAD_RTOL 1e-3     /* LoRA and full fine-tuning gradients */
#define LOSS_RTOL 1e-4     /* the SFT loss (a scalar) */
#define ADAMW_ATOL 1e-5    /* parameters after AdamW steps: |diff| <= tol * max(1, |ref|) */
#define NORM_RTOL 1e-5     /* global gradient norms */
#define MERGE_RTOL 1e-5    /* merged weights W + scale * B A */

#define FIXTURE_SEQ_LEN 9
#define FIXTURE_ROWS 3

/* ---- fixture files ------------------------------------------------------- */

static const char *fixture_dir(void)
{
    static char dir[512]; /* short enough that dir + '/' + name fits callers' path buffers */
    if (dir[0] == '\0' && test_fixture_dir(dir, sizeof dir, "tiny/config.json") == NULL)
        ck_abort_msg("reference fixtures not found: set LIBPERL_FIXTURE_DIR or run from the repository root");
    return dir;
}

/* "<fixture dir>/<name>" in a caller's buffer. */
static const char *fixture_path(char *buf, size_t n, const char *name)
{
    int len = snprintf(buf, n, "%s/%s", fixture_dir(), name);
    ck_assert_msg(len > 0 && (size_t)len < n, "fixture path too long: %s", name);
    return buf;
}

/* Opens a fixture file and checks its magic (format) and version. */
static void fixture_open(st_file *f, const char *name)
{
    char path[1200];
    const char *format, *version;

    fixture_path(path, sizeof path, name);
    ck_assert_msg(st_open(f, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    format = st_metadata(f, "format");
    version = st_metadata(f, "version");
    ck_assert_msg(format != NULL && strcmp(format, "libperl-fixture") == 0,
                  "%s: not a libperl fixture (__metadata__.format)", path);
    ck_assert_msg(version != NULL && strcmp(version, "1") == 0,
                  "%s: fixture version %s, this test reads version 1", path, version ? version : "(none)");
}

static const st_tensor *fixture_tensor(const st_file *f, const char *name, size_t numel)
{
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: no tensor %s", f->path, name);
    ck_assert_msg(t->numel == numel, "%s: %s has %llu elements, expected %zu", f->path, name,
                  (unsigned long long)t->numel, numel);
    return t;
}

/* A float copy of an F32/BF16/F16 tensor of `numel` elements (free()). */
static float *fixture_f32(const st_file *f, const char *name, size_t numel)
{
    const st_tensor *t = fixture_tensor(f, name, numel);
    float *out = malloc(numel * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_msg(st_to_f32(t, out) == LIBPERL_OK, "%s: %s: %s", f->path, name, perl_last_error());
    return out;
}

/* An int32 copy of an I32 tensor (free()). */
static int32_t *fixture_i32(const st_file *f, const char *name, size_t numel)
{
    const st_tensor *t = fixture_tensor(f, name, numel);
    int32_t *out = malloc(numel * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_msg(t->dtype == ST_I32, "%s: %s is %s, expected I32", f->path, name, st_dtype_name(t->dtype));
    memcpy(out, t->data, numel * sizeof *out);
    return out;
}

static double fixture_scalar(const st_file *f, const char *name)
{
    float *v = fixture_f32(f, name, 1);
    double x = v[0];
    free(v);
    return x;
}

/* The ragged batch every fixture uses: tokens [3, 9], lengths [3], optional mask. */
typedef struct fixture_batch {
    int32_t *tokens;
    int32_t *lengths;
    uint8_t *loss_mask; /* NULL when the fixture has none */
    perl_batch batch;
} fixture_batch;

static void fixture_batch_read(fixture_batch *fb, const st_file *f)
{
    const size_t n = FIXTURE_ROWS * FIXTURE_SEQ_LEN;

    fb->tokens = fixture_i32(f, "tokens", n);
    fb->lengths = fixture_i32(f, "lengths", FIXTURE_ROWS);
    fb->loss_mask = NULL;
    if (st_find(f, "loss_mask") != NULL) {
        int32_t *mask = fixture_i32(f, "loss_mask", n);
        fb->loss_mask = malloc(n);
        ck_assert_ptr_nonnull(fb->loss_mask);
        for (size_t i = 0; i < n; i++) fb->loss_mask[i] = mask[i] != 0;
        free(mask);
    }
    perl_batch_init(&fb->batch);
    fb->batch.batch_size = FIXTURE_ROWS;
    fb->batch.seq_len = FIXTURE_SEQ_LEN;
    fb->batch.tokens = fb->tokens;
    fb->batch.lengths = fb->lengths;
}

static void fixture_batch_free(fixture_batch *fb)
{
    free(fb->tokens);
    free(fb->lengths);
    free(fb->loss_mask);
}

static perl_model *load_model(const char *name)
{
    char path[1200];
    perl_model *model = NULL;

    fixture_path(path, sizeof path, name);
    ck_assert_msg(perl_model_load(&model, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    return model;
}

static perl_lora *load_adapter(perl_model *model, const char *name)
{
    char path[1200];
    perl_lora *lora = NULL;

    fixture_path(path, sizeof path, name);
    ck_assert_msg(perl_lora_load(&lora, model, path) == LIBPERL_OK, "%s: %s", path, perl_last_error());
    return lora;
}

/* ---- comparison ---------------------------------------------------------- */

/* Prints the worst-case absolute and relative (to max |want|) difference of
 * one tensor and returns the relative one (infinity on a non-finite value). */
static double report_diff(const char *what, const float *got, const float *want, size_t n)
{
    double max_ref = 0.0, max_diff = 0.0, rel;
    size_t worst = 0;
    int finite = 1;

    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!isfinite(got[i])) finite = 0;
        if (fabs((double)want[i]) > max_ref) max_ref = fabs((double)want[i]);
        if (d > max_diff) {
            max_diff = d;
            worst = i;
        }
    }
    rel = !finite ? INFINITY : max_ref > 0.0 ? max_diff / max_ref : max_diff;
    printf("reference: %-66s max|ref| %.3e  max|diff| %.3e (at %zu)  rel %.3e\n", what, max_ref,
           max_diff, worst, rel);
    fflush(stdout);
    return rel;
}

/* Compares and counts a failure instead of stopping, so every tensor is
 * printed before the test fails. */
static int expect_close(const char *what, const float *got, const float *want, size_t n, double rtol)
{
    double rel = report_diff(what, got, want, n);
    if (rel <= rtol) return 0;
    printf("reference: FAIL %s: relative difference %.3e > %.0e\n", what, rel, rtol);
    return 1;
}

/* Padding positions (t >= length) of a [rows, seq, width] output must be zero. */
static void expect_zero_padding(const char *what, const float *x, const int32_t *lengths, size_t width)
{
    for (int b = 0; b < FIXTURE_ROWS; b++)
        for (int t = lengths[b]; t < FIXTURE_SEQ_LEN; t++)
            for (size_t j = 0; j < width; j++)
                ck_assert_msg(x[((size_t)b * FIXTURE_SEQ_LEN + (size_t)t) * width + j] == 0.0f,
                              "%s: padding position (%d, %d) is not zero", what, b, t);
}

static void expect_loss(const char *what, float got, double want)
{
    double rel = fabs((double)got - want) / fmax(1.0, fabs(want));
    printf("reference: %-66s got %.7f  want %.7f  rel %.3e\n", what, (double)got, want, rel);
    ck_assert_msg(rel <= LOSS_RTOL, "%s: loss %.7f, reference %.7f", what, (double)got, want);
}

/* Logits [3, 9, vocab] of the fixture batch (free()). */
static float *forward_logits(const perl_model *model, const perl_lora *lora, const fixture_batch *fb)
{
    size_t n = (size_t)FIXTURE_ROWS * FIXTURE_SEQ_LEN * (size_t)model->cfg.vocab_size;
    float *logits = malloc(n * sizeof *logits);
    ck_assert_ptr_nonnull(logits);
    ck_assert_msg(perl_model_forward(model, lora, &fb->batch, logits, NULL) == LIBPERL_OK, "forward: %s",
                  perl_last_error());
    return logits;
}

static size_t logits_count(const perl_model *model)
{
    return (size_t)FIXTURE_ROWS * FIXTURE_SEQ_LEN * (size_t)model->cfg.vocab_size;
}

/* ---- forward ------------------------------------------------------------- */

/* F32 weights, Qwen2-style biases with tied embeddings, and the F32 weights
 * stored as BF16 / F16 (the reference uses the rounded values). */
static const char *const forward_models[] = {"tiny", "tiny_bias", "tiny_bf16", "tiny_f16"};

START_TEST(test_forward)
{
    const char *name = forward_models[_i];
    char file[128], what[160];
    st_file f;
    fixture_batch fb;
    perl_model *model = load_model(name);
    const size_t n_hidden = (size_t)FIXTURE_ROWS * FIXTURE_SEQ_LEN * (size_t)model->cfg.dim;
    float *logits, *hidden, *want_logits, *want_hidden;
    int failures = 0;

    snprintf(file, sizeof file, "forward_%s.safetensors", name);
    fixture_open(&f, file);
    fixture_batch_read(&fb, &f);
    want_logits = fixture_f32(&f, "logits", logits_count(model));
    want_hidden = fixture_f32(&f, "hidden", n_hidden);
    logits = malloc(logits_count(model) * sizeof *logits);
    hidden = malloc(n_hidden * sizeof *hidden);
    ck_assert_ptr_nonnull(logits);
    ck_assert_ptr_nonnull(hidden);

    ck_assert_msg(perl_model_forward(model, NULL, &fb.batch, logits, hidden) == LIBPERL_OK, "%s: %s", name,
                  perl_last_error());
    snprintf(what, sizeof what, "%s logits", name);
    failures += expect_close(what, logits, want_logits, logits_count(model), FORWARD_RTOL);
    expect_zero_padding(what, logits, fb.lengths, (size_t)model->cfg.vocab_size);
    snprintf(what, sizeof what, "%s hidden", name);
    failures += expect_close(what, hidden, want_hidden, n_hidden, FORWARD_RTOL);
    expect_zero_padding(what, hidden, fb.lengths, (size_t)model->cfg.dim);
    ck_assert_msg(failures == 0, "%s: %d tensors differ from the reference", name, failures);

    free(logits);
    free(hidden);
    free(want_logits);
    free(want_hidden);
    fixture_batch_free(&fb);
    st_close(&f);
    perl_model_free(model);
}
END_TEST

/* A fresh adapter has B = 0, so it must not change a single bit of the output. */
START_TEST(test_zero_b_adapter_is_identity)
{
    perl_model *model = load_model("tiny");
    perl_lora_options opts;
    perl_lora *lora = NULL;
    st_file f;
    fixture_batch fb;
    float *base, *adapted;

    perl_lora_options_init(&opts);
    opts.target_modules = LIBPERL_TARGET_ALL;
    opts.rank = 4;
    opts.alpha = 8.0f;
    ck_assert_msg(perl_lora_create(&lora, model, &opts) == LIBPERL_OK, "%s", perl_last_error());
    fixture_open(&f, "forward_tiny.safetensors");
    fixture_batch_read(&fb, &f);

    base = forward_logits(model, NULL, &fb);
    adapted = forward_logits(model, lora, &fb);
    report_diff("zero-B adapter logits vs base", adapted, base, logits_count(model));
    ck_assert_msg(memcmp(base, adapted, logits_count(model) * sizeof *base) == 0,
                  "a B = 0 adapter changed the logits");

    free(base);
    free(adapted);
    fixture_batch_free(&fb);
    st_close(&f);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

/* ---- LoRA gradients ------------------------------------------------------ */

static const char *const lora_subsets[] = {"qv", "qkvo", "mlp", "all", "all_rslora"};

/* PEFT module names by lora_target_index, spelled out here rather than taken
 * from the library so that the naming itself is under test. */
static const char *const peft_targets[LORA_N_TARGETS] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"};

static void peft_name(char *buf, size_t n, int layer, int target, char which)
{
    snprintf(buf, n, "base_model.model.model.layers.%d.%s.%s.lora_%c.weight", layer,
             target <= LORA_O ? "self_attn" : "mlp", peft_targets[target], which);
}

/* Keys of a gradient fixture that are not gradients. */
static const size_t sft_fixture_inputs = 6; /* tokens lengths loss_mask loss n_targets logits */

START_TEST(test_lora_grads)
{
    const char *subset = lora_subsets[_i];
    char file[128], what[320], name[256];
    st_file f;
    fixture_batch fb;
    perl_model *model = load_model("tiny");
    perl_lora *lora;
    perl_step_stats stats;
    float *logits, *want_logits;
    const char *scale_text;
    size_t n_grads = 0;
    int failures = 0;

    snprintf(name, sizeof name, "lora_%s", subset);
    lora = load_adapter(model, name);
    snprintf(file, sizeof file, "lora_grads_%s.safetensors", subset);
    fixture_open(&f, file);
    fixture_batch_read(&fb, &f);
    ck_assert_ptr_nonnull(fb.loss_mask);

    scale_text = st_metadata(&f, "scale");
    ck_assert_ptr_nonnull(scale_text);
    ck_assert_msg(fabs((double)lora->scale - strtod(scale_text, NULL)) < 1e-6, "%s: scale %g, expected %s",
                  subset, (double)lora->scale, scale_text);

    /* the adapter's forward */
    logits = forward_logits(model, lora, &fb);
    want_logits = fixture_f32(&f, "logits", logits_count(model));
    snprintf(what, sizeof what, "lora_%s logits", subset);
    failures += expect_close(what, logits, want_logits, logits_count(model), FORWARD_RTOL);

    /* SFT loss and backward */
    perl_step_stats_init(&stats);
    ck_assert_int_eq(perl_lora_zero_grad(lora), LIBPERL_OK);
    ck_assert_msg(perl_lora_sft_backward(lora, &fb.batch, fb.loss_mask, &stats) == LIBPERL_OK, "%s: %s",
                  subset, perl_last_error());
    snprintf(what, sizeof what, "lora_%s loss", subset);
    expect_loss(what, stats.loss, fixture_scalar(&f, "loss"));
    {
        int32_t *n_targets = fixture_i32(&f, "n_targets", 1);
        ck_assert_int_eq(stats.n_tokens, n_targets[0]);
        free(n_targets);
    }

    for (int layer = 0; layer < model->cfg.n_layers; layer++) {
        for (int target = 0; target < LORA_N_TARGETS; target++) {
            const lora_module *mod = lora_module_at(lora, layer, target);
            int present = mod != NULL && mod->A != NULL;
            peft_name(name, sizeof name, layer, target, 'A');
            ck_assert_msg(present == (st_find(&f, name) != NULL), "%s: module %s is %s in the adapter", subset,
                          name, present ? "present" : "absent");
            if (!present) continue;
            {
                const size_t n_a = (size_t)lora->opts.rank * (size_t)mod->in;
                const size_t n_b = (size_t)mod->out * (size_t)lora->opts.rank;
                float *want_a = fixture_f32(&f, name, n_a);
                float *want_b;
                snprintf(what, sizeof what, "lora_%s d%s", subset, name);
                failures += expect_close(what, mod->dA, want_a, n_a, GRAD_RTOL);
                peft_name(name, sizeof name, layer, target, 'B');
                want_b = fixture_f32(&f, name, n_b);
                snprintf(what, sizeof what, "lora_%s d%s", subset, name);
                failures += expect_close(what, mod->dB, want_b, n_b, GRAD_RTOL);
                free(want_a);
                free(want_b);
                n_grads += 2;
            }
        }
    }
    ck_assert_msg(n_grads + sft_fixture_inputs == f.n_tensors, "%s: compared %zu gradients, fixture has %zu",
                  subset, n_grads, f.n_tensors - sft_fixture_inputs);
    ck_assert_msg(failures == 0, "lora_%s: %d tensors differ from the reference", subset, failures);

    free(logits);
    free(want_logits);
    fixture_batch_free(&fb);
    st_close(&f);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

/* ---- full fine-tuning gradients ----------------------------------------- */

/* tiny: untied lm_head; tiny_bias: q/k/v biases and tied embeddings, whose
 * embedding gradient includes the lm_head contribution. */
static const char *const full_models[] = {"tiny", "tiny_bias"};

START_TEST(test_full_grads)
{
    const char *model_name = full_models[_i];
    char file[128], what[256];
    st_file f;
    fixture_batch fb;
    perl_model *model = load_model(model_name);
    perl_lora_options opts;
    perl_lora *lora = NULL;
    perl_step_stats stats;
    tensor_slot *slots = NULL;
    int n_slots = 0, failures = 0;

    perl_lora_options_init(&opts);
    opts.mode = LIBPERL_MODE_FULL;
    opts.train_embeddings = 1;
    ck_assert_msg(perl_lora_create(&lora, model, &opts) == LIBPERL_OK, "%s: %s", model_name, perl_last_error());
    snprintf(file, sizeof file, "full_grads_%s.safetensors", model_name);
    fixture_open(&f, file);
    fixture_batch_read(&fb, &f);

    perl_step_stats_init(&stats);
    ck_assert_int_eq(perl_lora_zero_grad(lora), LIBPERL_OK);
    ck_assert_msg(perl_lora_sft_backward(lora, &fb.batch, fb.loss_mask, &stats) == LIBPERL_OK, "%s: %s",
                  model_name, perl_last_error());
    snprintf(what, sizeof what, "full_%s loss", model_name);
    expect_loss(what, stats.loss, fixture_scalar(&f, "loss"));

    ck_assert_int_eq(model_tensor_slots(&model->cfg, &lora->full_dw, &slots, &n_slots), LIBPERL_OK);
    for (int i = 0; i < n_slots; i++) {
        size_t numel = (size_t)slots[i].shape[0] * (slots[i].ndim == 2 ? (size_t)slots[i].shape[1] : 1);
        const float *grad = *slots[i].ptr;
        float *want;
        ck_assert_msg(grad != NULL, "%s: no gradient for %s", model_name, slots[i].name);
        want = fixture_f32(&f, slots[i].name, numel);
        snprintf(what, sizeof what, "full_%s %s", model_name, slots[i].name);
        failures += expect_close(what, grad, want, numel, GRAD_RTOL);
        free(want);
    }
    ck_assert_msg((size_t)n_slots + sft_fixture_inputs == f.n_tensors,
                  "%s: compared %d gradients, fixture has %zu", model_name, n_slots,
                  f.n_tensors - sft_fixture_inputs);
    ck_assert_msg(failures == 0, "full_%s: %d tensors differ from the reference", model_name, failures);

    perl_mem_free(slots);
    fixture_batch_free(&fb);
    st_close(&f);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

/* ---- AdamW ---------------------------------------------------------------- */

/* The kernel alone: adamw_update and grad_global_norm on the 37 parameters,
 * clipping as torch.nn.utils.clip_grad_norm_ does (coefficient
 * max_norm / (norm + 1e-6), at most 1). */
START_TEST(test_adamw_kernel)
{
    const int clip = _i;
    const size_t n = 37;
    const int steps = 5;
    st_file f;
    float *params, *step_grads, *grad_norm, *want, grads[37], m[37] = {0}, v[37] = {0};
    int failures = 0;

    fixture_open(&f, "adamw.safetensors");
    params = fixture_f32(&f, "params_init", n);
    step_grads = fixture_f32(&f, "grads", (size_t)steps * n);
    grad_norm = fixture_f32(&f, "grad_norm", (size_t)steps);
    want = fixture_f32(&f, clip ? "params_clipped" : "params", (size_t)steps * n);
    for (int s = 0; s < steps; s++) {
        char what[128];
        double norm = grad_global_norm(step_grads + (size_t)s * n, n);
        double coef = clip ? fmin(1.0, 0.5 / (norm + 1e-6)) : 1.0;
        ck_assert_msg(fabs(norm - grad_norm[s]) <= NORM_RTOL * grad_norm[s], "step %d: norm %.7g, reference %.7g",
                      s + 1, norm, (double)grad_norm[s]);
        for (size_t j = 0; j < n; j++) grads[j] = (float)(step_grads[(size_t)s * n + j] * coef);
        adamw_update(params, grads, m, v, n, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, s + 1);
        snprintf(what, sizeof what, "adamw_update%s step %d params", clip ? " clipped" : "", s + 1);
        report_diff(what, params, want + (size_t)s * n, n);
        for (size_t j = 0; j < n; j++) {
            double ref = want[(size_t)s * n + j];
            if (fabs((double)params[j] - ref) > ADAMW_ATOL * fmax(1.0, fabs(ref))) failures++;
        }
    }
    ck_assert_msg(failures == 0, "adamw_update%s: %d parameter values beyond tolerance", clip ? " clipped" : "",
                  failures);
    free(params);
    free(step_grads);
    free(grad_norm);
    free(want);
    st_close(&f);
}
END_TEST

/* Through the public optimizer: the fixture's 37 parameters are placed at
 * the start of an adapter's parameter block; the rest of the block is zero
 * with zero gradients, so the global norm and every update of the 37 are
 * exactly those of torch.optim.AdamW on the 37 alone (and the zeros must stay
 * zero). */

START_TEST(test_adamw)
{
    const int clip = _i;
    const size_t n = 37;
    const int steps = 5;
    perl_model *model = load_model("tiny");
    perl_lora_options opts;
    perl_optim_options optim;
    perl_lora *lora = NULL;
    float *params, *grads, *params_init, *step_grads, *grad_norm, *want;
    size_t count = 0;
    st_file f;
    int failures = 0;

    perl_lora_options_init(&opts);
    ck_assert_msg(perl_lora_create(&lora, model, &opts) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_int_eq(perl_lora_params(lora, &params, &grads, &count), LIBPERL_OK);
    ck_assert_msg(count >= n, "adapter has %zu parameters, need %zu", count, n);

    perl_optim_options_init(&optim);
    optim.lr = 1e-2f;
    optim.beta1 = 0.9f;
    optim.beta2 = 0.999f;
    optim.eps = 1e-8f;
    optim.weight_decay = 0.1f;
    optim.max_grad_norm = clip ? 0.5f : 0.0f;
    optim.schedule = LIBPERL_LR_CONSTANT;
    optim.warmup_steps = 0;
    optim.total_steps = steps;
    ck_assert_msg(perl_lora_set_optimizer(lora, &optim) == LIBPERL_OK, "%s", perl_last_error());

    fixture_open(&f, "adamw.safetensors");
    params_init = fixture_f32(&f, "params_init", n);
    step_grads = fixture_f32(&f, "grads", (size_t)steps * n);
    grad_norm = fixture_f32(&f, "grad_norm", (size_t)steps);
    want = fixture_f32(&f, clip ? "params_clipped" : "params", (size_t)steps * n);

    memset(params, 0, count * sizeof *params);
    memcpy(params, params_init, n * sizeof *params);
    for (int s = 0; s < steps; s++) {
        perl_step_stats stats;
        char what[128];
        double norm_rel;
        perl_step_stats_init(&stats);
        ck_assert_int_eq(perl_lora_zero_grad(lora), LIBPERL_OK);
        memcpy(grads, step_grads + (size_t)s * n, n * sizeof *grads);
        ck_assert_msg(perl_lora_optimizer_step(lora, &stats) == LIBPERL_OK, "step %d: %s", s + 1,
                      perl_last_error());
        ck_assert_int_eq(stats.step, s + 1);
        ck_assert_msg(fabsf(stats.lr - 1e-2f) <= 1e-9f, "step %d: lr %g", s + 1, (double)stats.lr);
        norm_rel = fabs((double)stats.grad_norm - grad_norm[s]) / grad_norm[s];
        ck_assert_msg(norm_rel <= NORM_RTOL, "step %d: grad norm %.7g, reference %.7g", s + 1,
                      (double)stats.grad_norm, (double)grad_norm[s]);

        snprintf(what, sizeof what, "adamw%s step %d params", clip ? " clipped" : "", s + 1);
        report_diff(what, params, want + (size_t)s * n, n);
        for (size_t j = 0; j < n; j++) {
            double ref = want[(size_t)s * n + j];
            if (fabs((double)params[j] - ref) > ADAMW_ATOL * fmax(1.0, fabs(ref))) failures++;
        }
        for (size_t j = n; j < count; j++)
            ck_assert_msg(params[j] == 0.0f, "step %d: parameter %zu with zero gradient moved", s + 1, j);
    }
    ck_assert_msg(failures == 0, "adamw%s: %d parameter values beyond tolerance", clip ? " clipped" : "",
                  failures);

    free(params_init);
    free(step_grads);
    free(grad_norm);
    free(want);
    st_close(&f);
    perl_lora_free(lora);
    perl_model_free(model);
}
END_TEST

/* ---- merge --------------------------------------------------------------- */

START_TEST(test_merge)
{
    perl_model *model = load_model("tiny");
    perl_model *reference = load_model("merged_all");
    perl_lora *lora = load_adapter(model, "lora_all");
    perl_model *merged = NULL;
    tensor_slot *got = NULL, *want = NULL;
    int n_got = 0, n_want = 0, failures = 0;
    float *merged_logits, *adapter_logits, *reference_logits, *want_logits;
    st_file f;
    fixture_batch fb;

    ck_assert_msg(perl_lora_merge(&merged, lora) == LIBPERL_OK, "%s", perl_last_error());

    /* the merged weights equal W + scale * B A computed in float64 */
    ck_assert_int_eq(model_tensor_slots(&merged->cfg, &merged->w, &got, &n_got), LIBPERL_OK);
    ck_assert_int_eq(model_tensor_slots(&reference->cfg, &reference->w, &want, &n_want), LIBPERL_OK);
    ck_assert_int_eq(n_got, n_want);
    for (int i = 0; i < n_got; i++) {
        size_t numel = (size_t)got[i].shape[0] * (got[i].ndim == 2 ? (size_t)got[i].shape[1] : 1);
        char what[200];
        ck_assert_str_eq(got[i].name, want[i].name);
        snprintf(what, sizeof what, "merged %s", got[i].name);
        failures += expect_close(what, *got[i].ptr, *want[i].ptr, numel, MERGE_RTOL);
    }

    /* the merged model's logits equal the reference's and the adapter's */
    fixture_open(&f, "merge_all.safetensors");
    fixture_batch_read(&fb, &f);
    want_logits = fixture_f32(&f, "logits", logits_count(model));
    merged_logits = forward_logits(merged, NULL, &fb);
    reference_logits = forward_logits(reference, NULL, &fb);
    adapter_logits = forward_logits(model, lora, &fb);
    failures += expect_close("merge_all logits (perl_lora_merge)", merged_logits, want_logits,
                             logits_count(model), FORWARD_RTOL);
    failures += expect_close("merge_all logits (merged_all/ loaded)", reference_logits, want_logits,
                             logits_count(model), FORWARD_RTOL);
    failures += expect_close("merge_all logits (merged vs adapter)", merged_logits, adapter_logits,
                             logits_count(model), FORWARD_RTOL);
    ck_assert_msg(failures == 0, "merge: %d tensors differ from the reference", failures);

    free(merged_logits);
    free(adapter_logits);
    free(reference_logits);
    free(want_logits);
    fixture_batch_free(&fb);
    st_close(&f);
    perl_mem_free(got);
    perl_mem_free(want);
    perl_model_free(merged);
    perl_lora_free(lora);
    perl_model_free(reference);
    perl_model_free(model);
}
END_TEST

Suite *suite_reference(void)
{
    Suite *s = suite_create("reference");
    TCase *tc;

    tc = tcase_create("forward");
    tcase_add_loop_test(tc, test_forward, 0, (int)(sizeof forward_models / sizeof forward_models[0]));
    tcase_add_test(tc, test_zero_b_adapter_is_identity);
    suite_add_tcase(s, tc);

    tc = tcase_create("lora_grads");
    tcase_add_loop_test(tc, test_lora_grads, 0, (int)(sizeof lora_subsets / sizeof lora_subsets[0]));
    suite_add_tcase(s, tc);

    tc = tcase_create("full_grads");
    tcase_add_loop_test(tc, test_full_grads, 0, (int)(sizeof full_models / sizeof full_models[0]));
    suite_add_tcase(s, tc);

    tc = tcase_create("adamw");
    tcase_add_loop_test(tc, test_adamw_kernel, 0, 2); /* 0: no clipping, 1: clip at 0.5 */
    tcase_add_loop_test(tc, test_adamw, 0, 2); /* 0: no clipping, 1: clip at 0.5 */
    suite_add_tcase(s, tc);

    tc = tcase_create("merge");
    tcase_add_test(tc, test_merge);
    suite_add_tcase(s, tc);
    return s;
}
