/*
 * libFuzzer target: model.safetensors.index.json of a sharded Hugging Face
 * checkpoint.  The scratch directory holds the tiny fixture's config.json
 * and its weights split into two shards (written once at start-up); the
 * fuzzer varies the index: weight_map entries, shard names (path traversal
 * must be refused), missing or duplicated tensors.
 */
#include "fuzz_common.h"

#include "model.h"
#include "safetensors.h"

static char index_path[1024];
static const char *const shard_names[2] = {"model-00001-of-00002.safetensors",
                                           "model-00002-of-00002.safetensors"};

/* Splits the tiny fixture into two shards and returns the seed index. */
static char *write_shards(void)
{
    char src[1024], path[1024];
    st_file f;
    FUZZ_REQUIRE(st_open(&f, fuzz_fixture_path(src, sizeof src, "tiny/model.safetensors")) ==
                     LIBPERL_OK, "open %s", src);
    size_t cap = 256 + f.n_tensors * 160;
    char *index = malloc(cap);
    size_t len = (size_t)snprintf(index, cap, "{\"metadata\":{\"total_size\":%zu},\"weight_map\":{",
                                  f.size - f.data_offset);
    st_write_tensor *parts[2];
    size_t counts[2] = {0, 0};
    float *converted[256] = {0};
    FUZZ_REQUIRE(f.n_tensors < 256, "too many tensors");
    for (int s = 0; s < 2; s++) parts[s] = calloc(f.n_tensors, sizeof(st_write_tensor));
    for (size_t i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        int s = i < f.n_tensors / 2 ? 0 : 1;
        st_write_tensor *w = &parts[s][counts[s]++];
        w->name = t->name;
        w->ndim = t->ndim;
        memcpy(w->shape, t->shape, sizeof w->shape);
        converted[i] = malloc((size_t)t->numel * sizeof(float) + 1);
        FUZZ_REQUIRE(st_to_f32(t, converted[i]) == LIBPERL_OK, "convert %s", t->name);
        w->data = converted[i];
        len += (size_t)snprintf(index + len, cap - len, "%s\"%s\":\"%s\"", i ? "," : "", t->name,
                                shard_names[s]);
    }
    snprintf(index + len, cap - len, "}}");
    for (int s = 0; s < 2; s++) {
        FUZZ_REQUIRE(st_write(fuzz_scratch_path(path, sizeof path, shard_names[s]), parts[s],
                              counts[s], NULL) == LIBPERL_OK, "write shard");
        free(parts[s]);
    }
    for (size_t i = 0; i < f.n_tensors; i++) free(converted[i]);
    st_close(&f);
    return index;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    perl_set_num_threads(1);
    char config[1024];
    fuzz_link(fuzz_fixture_path(config, sizeof config, "tiny/config.json"), "config.json");
    fuzz_scratch_path(index_path, sizeof index_path, "model.safetensors.index.json");
    char *index = write_shards();
    if (fuzz_seed_dir() != NULL) {
        fuzz_write_seed_str("valid_index", index);
        /* a shard name trying to leave the directory, and a non-object map */
        fuzz_write_seed_str("traversal", "{\"weight_map\":{\"model.norm.weight\":\"../x\"}}");
        fuzz_write_seed_str("not_object", "{\"weight_map\":[]}");
        fuzz_write_seed_str("one_tensor",
                            "{\"weight_map\":{\"model.embed_tokens.weight\":"
                            "\"model-00001-of-00002.safetensors\"}}");
    }
    free(index);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fuzz_write_file(index_path, data, size) != 0) abort();
    perl_model *m = NULL;
    int rc = model_load_hf(&m, fuzz_scratch_dir());
    if (rc == LIBPERL_OK) {
        if (m == NULL) abort();
        fuzz_exercise_model(m, NULL);
    } else if (m != NULL || perl_last_error()[0] == '\0') {
        abort();
    }
    perl_model_free(m);
    return 0;
}
