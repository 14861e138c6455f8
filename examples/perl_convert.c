/*
 * perl_convert — write models in Hugging Face layout with libperl's public API.
 *
 *   perl_convert llama2c IN.bin OUTDIR
 *       Converts a llama2.c checkpoint to config.json + model.safetensors
 *       (RoPE weights permuted to HF's convention, so logits are unchanged).
 *   perl_convert random OUTDIR [--dim D] [--hidden H] [--layers L] [--heads NH]
 *                [--kv-heads NKV] [--vocab V] [--seq S] [--seed N] [--tied 0|1]
 *       Writes a randomly initialised model (defaults: perl_model_config_init).
 *   perl_convert info PATH
 *       Loads a model (llama2.c file or HF directory) and prints its config.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libperl/libperl.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage:\n"
            "  perl_convert llama2c IN.bin OUTDIR\n"
            "  perl_convert random OUTDIR [--dim D] [--hidden H] [--layers L] [--heads NH]\n"
            "               [--kv-heads NKV] [--vocab V] [--seq S] [--seed N] [--tied 0|1]\n"
            "  perl_convert info PATH\n"
            "\n"
            "llama2c  convert a llama2.c checkpoint to a Hugging Face directory\n"
            "         (config.json + model.safetensors, float32)\n"
            "random   write a model with random weights (unset sizes use libperl's defaults)\n"
            "info     print the configuration of a llama2.c file or HF directory\n");
}

static int fail(const char *what, int status)
{
    fprintf(stderr, "perl_convert: %s: %s (%s)\n", what, perl_last_error(),
            perl_status_str(status));
    return 1;
}

/* Strict decimal parse into [lo, hi]. */
static int parse_long(const char *flag, const char *text, long long lo, long long hi,
                      long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "perl_convert: %s expects an integer in [%lld, %lld], got '%s'\n", flag,
                lo, hi, text);
        return -1;
    }
    *out = v;
    return 0;
}

static void print_config(const perl_model *m)
{
    perl_model_config c;
    perl_model_config_init(&c);
    perl_model_get_config(m, &c);
    printf("dim %d, hidden_dim %d, layers %d, heads %d, kv_heads %d, head_dim %d\n", c.dim,
           c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
    printf("vocab %d, max_seq_len %d, rope_theta %g, rms_norm_eps %g\n", c.vocab_size,
           c.max_seq_len, (double)c.rope_theta, (double)c.rms_norm_eps);
    printf("tied_embeddings %d, qkv_bias %d, rope %s, bos %d, eos %d\n", c.tied_embeddings,
           c.qkv_bias, c.rope_interleaved ? "interleaved (llama2.c)" : "half-split (HF)",
           c.bos_token_id, c.eos_token_id);
    printf("parameters: %zu\n", perl_model_num_params(m));
}

static int cmd_llama2c(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "perl_convert llama2c: expected IN.bin and OUTDIR\n\n");
        usage(stderr);
        return 2;
    }
    perl_model *m = NULL;
    int rc = perl_model_load(&m, argv[2]);
    if (rc != LIBPERL_OK) return fail("loading the checkpoint", rc);
    print_config(m);
    rc = perl_model_save_hf(m, argv[3]);
    perl_model_free(m);
    if (rc != LIBPERL_OK) return fail("saving", rc);
    printf("wrote %s/config.json and %s/model.safetensors\n", argv[3], argv[3]);
    return 0;
}

static int cmd_random(int argc, char **argv)
{
    if (argc < 3 || argv[2][0] == '-') {
        fprintf(stderr, "perl_convert random: expected OUTDIR\n\n");
        usage(stderr);
        return 2;
    }
    const char *outdir = argv[2];
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    long long seed = 0;
    for (int i = 3; i < argc; i += 2) {
        const char *flag = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "perl_convert: %s needs a value\n", flag);
            return 2;
        }
        long long v;
        int32_t *field = NULL;
        if (strcmp(flag, "--dim") == 0) field = &cfg.dim;
        else if (strcmp(flag, "--hidden") == 0) field = &cfg.hidden_dim;
        else if (strcmp(flag, "--layers") == 0) field = &cfg.n_layers;
        else if (strcmp(flag, "--heads") == 0) field = &cfg.n_heads;
        else if (strcmp(flag, "--kv-heads") == 0) field = &cfg.n_kv_heads;
        else if (strcmp(flag, "--vocab") == 0) field = &cfg.vocab_size;
        else if (strcmp(flag, "--seq") == 0) field = &cfg.max_seq_len;
        else if (strcmp(flag, "--tied") == 0) field = &cfg.tied_embeddings;
        if (field != NULL) {
            long long hi = field == &cfg.tied_embeddings ? 1 : INT32_MAX;
            long long lo = field == &cfg.tied_embeddings ? 0 : 1;
            if (parse_long(flag, argv[i + 1], lo, hi, &v) != 0) return 2;
            *field = (int32_t)v;
        } else if (strcmp(flag, "--seed") == 0) {
            if (parse_long(flag, argv[i + 1], 0, LLONG_MAX, &seed) != 0) return 2;
        } else {
            fprintf(stderr, "perl_convert: unknown option '%s'\n\n", flag);
            usage(stderr);
            return 2;
        }
    }
    perl_model *m = NULL;
    int rc = perl_model_create_random(&m, &cfg, (uint64_t)seed);
    if (rc != LIBPERL_OK) return fail("creating the model", rc);
    print_config(m);
    rc = perl_model_save_hf(m, outdir);
    perl_model_free(m);
    if (rc != LIBPERL_OK) return fail("saving", rc);
    printf("wrote %s/config.json and %s/model.safetensors\n", outdir, outdir);
    return 0;
}

static int cmd_info(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "perl_convert info: expected PATH\n\n");
        usage(stderr);
        return 2;
    }
    perl_model *m = NULL;
    int rc = perl_model_load(&m, argv[2]);
    if (rc != LIBPERL_OK) return fail("loading", rc);
    print_config(m);
    perl_model_free(m);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "llama2c") == 0) return cmd_llama2c(argc, argv);
    if (strcmp(argv[1], "random") == 0) return cmd_random(argc, argv);
    if (strcmp(argv[1], "info") == 0) return cmd_info(argc, argv);
    fprintf(stderr, "perl_convert: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
