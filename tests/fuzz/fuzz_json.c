/*
 * libFuzzer target: the strict JSON parser every loader's text goes through
 * (config.json, adapter_config.json, the shard index, safetensors headers),
 * with the accessors walked over each accepted document.  Fast, so it
 * explores the grammar far deeper than the file-level targets.
 */
#include "fuzz_common.h"

#include "json.h"

static size_t walk(const json_value *v, int depth)
{
    if (depth > JSON_MAX_DEPTH + 1) abort(); /* the parser promised a depth limit */
    size_t n = 1;
    int64_t i;
    double d;
    int b;
    (void)json_as_int64(v, &i);
    (void)json_as_double(v, &d);
    (void)json_as_bool(v, &b);
    (void)json_as_string(v);
    if (v->type == JSON_STRING && v->string[v->string_len] != '\0') abort();
    if (v->type == JSON_ARRAY) {
        if (json_array_len(v) != v->count) abort();
        for (size_t k = 0; k < v->count; k++) n += walk(json_array_at(v, k), depth + 1);
        if (json_array_at(v, v->count) != NULL) abort();
    } else if (v->type == JSON_OBJECT) {
        for (size_t k = 0; k < v->count; k++) {
            const json_member *m = &v->members[k];
            /* keys with an embedded NUL cannot be looked up by C string */
            if (strlen(m->key) == m->key_len && json_get(v, m->key) != m->value) abort();
            n += walk(m->value, depth + 1);
        }
    }
    return n;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    if (fuzz_seed_dir() == NULL) return 0;
    fuzz_seed_from_fixture("config", "tiny/config.json");
    fuzz_seed_from_fixture("adapter_config", "lora_all/adapter_config.json");
    fuzz_write_seed_str("scalars", "[0,-0,1e308,-1.5e-3,9223372036854775807,-9223372036854775808,"
                                   "18446744073709551616,true,false,null,\"\"]");
    fuzz_write_seed_str("strings", "{\"a\\u0000b\":\"\\ud83d\\ude00\\n\\t\\\"\\\\\\/\",\"\xc3\xa9\":"
                                   "\"\xf0\x9f\x98\x80\"}");
    fuzz_write_seed_str("nested", "\xef\xbb\xbf{\"a\":[[[{\"b\":[{}]}]]],\"c\":{\"d\":{}}}");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_doc *doc = NULL;
    if (json_parse(&doc, (const char *)data, size, "fuzz.json") != LIBPERL_OK) {
        if (doc != NULL) abort();
        return 0;
    }
    (void)walk(json_doc_root(doc), 0);
    json_doc_free(doc);
    return 0;
}
