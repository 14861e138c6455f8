/*
 * libFuzzer target: llama2.c checkpoints (the legacy version-0 layout: a
 * 28-byte header of seven int32s, then every weight as F32), loaded through
 * perl_model_load on a scratch file.  The loader must refuse any header
 * whose implied size is not exactly the file's, without overflow; a file it
 * accepts must run a forward pass.
 */
#include "fuzz_common.h"

static char model_path[1024];

/* A llama2.c file of the given header with deterministic weights. */
static void write_llama2c_seed(const char *name, const int32_t h[7])
{
    int32_t dim = h[0], hidden = h[1], layers = h[2], heads = h[3], kv = h[4], seq = h[6];
    int32_t vocab = h[5] < 0 ? -h[5] : h[5];
    size_t head = (size_t)(dim / heads), kvd = head * (size_t)kv;
    size_t floats = (size_t)vocab * dim + 2 * (size_t)layers * dim +
                    (size_t)layers * ((size_t)2 * dim * dim + 2 * kvd * dim + 3 * (size_t)hidden * dim) +
                    (size_t)dim + (size_t)seq * head; /* two RoPE tables of seq * head / 2 */
    if (h[5] < 0) floats += (size_t)vocab * dim;       /* untied classifier */
    size_t bytes = 28 + floats * 4;
    unsigned char *buf = malloc(bytes);
    memcpy(buf, h, 28);
    for (size_t i = 0; i < floats; i++) {
        float v = (float)((int)(i * 2654435761u % 2001) - 1000) * 1e-4f;
        memcpy(buf + 28 + 4 * i, &v, 4);
    }
    fuzz_write_seed(name, buf, bytes);
    free(buf);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    perl_set_num_threads(1);
    fuzz_scratch_path(model_path, sizeof model_path, "model.bin");
    if (fuzz_seed_dir() == NULL) return 0;
    /* dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (< 0: untied), seq_len */
    static const int32_t tied[7] = {8, 16, 1, 2, 1, 12, 4};
    static const int32_t untied[7] = {8, 12, 2, 2, 2, -10, 3};
    static const int32_t gqa[7] = {16, 24, 1, 4, 2, 9, 2};
    write_llama2c_seed("tied_gqa1", tied);
    write_llama2c_seed("untied", untied);
    write_llama2c_seed("gqa", gqa);
    static const int32_t header_only[7] = {288, 768, 6, 6, 6, 32000, 256}; /* stories15M's header */
    fuzz_write_seed("stories15M_header", header_only, sizeof header_only);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fuzz_write_file(model_path, data, size) != 0) abort();
    perl_model *m = NULL;
    int rc = perl_model_load(&m, model_path);
    if (rc == LIBPERL_OK) {
        if (m == NULL) abort();
        fuzz_exercise_model(m, NULL);
    } else if (m != NULL || perl_last_error()[0] == '\0') {
        abort();
    }
    perl_model_free(m);
    return 0;
}
