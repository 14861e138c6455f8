/*
 * libFuzzer target: the safetensors reader (st_parse over a memory image):
 * header length, the JSON header, dtypes, shapes, offsets, overlap checks,
 * then every accessor a loader uses on an accepted file.
 */
#include "fuzz_common.h"

#include "safetensors.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    if (fuzz_seed_dir() == NULL) return 0;
    /* Real files written by the library and by PyTorch. */
    fuzz_seed_from_fixture("adamw.safetensors", "adamw.safetensors");
    fuzz_seed_from_fixture("forward_tiny_bf16.safetensors", "forward_tiny_bf16.safetensors");
    fuzz_seed_from_fixture("forward_tiny_f16.safetensors", "forward_tiny_f16.safetensors");
    fuzz_seed_from_fixture("lora_qv.safetensors", "lora_qv/adapter_model.safetensors");
    /* Small hand-made images: other dtypes, metadata, empty and zero-sized tensors. */
    static const struct {
        const char *name, *header;
        size_t data_len;
    } images[] = {
        {"empty_header", "{}", 0},
        {"metadata_only", "{\"__metadata__\":{\"format\":\"pt\"}}", 0},
        {"i64_and_u8",
         "{\"a\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[3,1],\"data_offsets\":[16,19]}}",
         19},
        {"zero_sized",
         "{\"z\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[0,0]},"
         "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}",
         4},
        {"f16_bf16_f64",
         "{\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[4,8]},"
         "\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[8,16]},"
         "\"__metadata__\":{\"k\":\"v\"}}",
         16},
    };
    for (size_t i = 0; i < sizeof images / sizeof images[0]; i++) {
        size_t hl = strlen(images[i].header), total = 8 + hl + images[i].data_len;
        unsigned char *buf = calloc(1, total);
        for (int b = 0; b < 8; b++) buf[b] = (unsigned char)((uint64_t)hl >> (8 * b));
        memcpy(buf + 8, images[i].header, hl);
        for (size_t k = 0; k < images[i].data_len; k++) buf[8 + hl + k] = (unsigned char)(k * 37 + 60);
        fuzz_write_seed(images[i].name, buf, total);
        free(buf);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file f;
    if (st_parse(&f, data, size, "fuzz.safetensors") != LIBPERL_OK) return 0;
    (void)st_metadata(&f, "format");
    for (size_t i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        /* The reader promised: names findable, data inside the image. */
        if (st_find(&f, t->name) != t) abort();
        if (t->nbytes > 0 && ((const uint8_t *)t->data < data ||
                              (const uint8_t *)t->data + t->nbytes > data + size))
            abort();
        char shape[128];
        st_shape_str(t->ndim, t->shape, shape, sizeof shape);
        (void)st_shape_is(t, t->ndim, t->shape);
        (void)st_f32_inplace(t);
        if (t->dtype == ST_F32 || t->dtype == ST_F16 || t->dtype == ST_BF16) {
            if (t->numel > ((uint64_t)1 << 20)) continue;
            float *dst = malloc((size_t)t->numel * sizeof(float) + 1);
            if (dst == NULL) continue;
            if (st_to_f32(t, dst) != LIBPERL_OK) abort();
            free(dst);
        } else if (t->numel <= 16) {
            float dst[16];
            (void)st_to_f32(t, dst); /* must refuse cleanly */
        }
    }
    st_close(&f);
    return 0;
}
