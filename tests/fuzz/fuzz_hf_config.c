/*
 * libFuzzer target: a Hugging Face config.json, through the real loader
 * (model_load_hf on a scratch directory whose model.safetensors is the tiny
 * fixture's).  Covers the JSON parser, parse_config's key checks and the
 * model_config_validate limits; a config that loads must give a model whose
 * forward pass runs.
 */
#include "fuzz_common.h"

#include "model.h"

static char config_path[1024];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    perl_set_num_threads(1);
    char weights[1024];
    fuzz_fixture_path(weights, sizeof weights, "tiny/model.safetensors");
    fuzz_link(weights, "model.safetensors");
    fuzz_scratch_path(config_path, sizeof config_path, "config.json");
    if (fuzz_seed_dir() == NULL) return 0;
    fuzz_seed_from_fixture("tiny", "tiny/config.json");
    fuzz_seed_from_fixture("tiny_bias", "tiny_bias/config.json");
    fuzz_seed_from_fixture("tiny_bf16", "tiny_bf16/config.json");
    /* Variants reaching the other branches: qwen2 + sliding window, token
     * lists, tied embeddings, mistral, defaults only. */
    fuzz_write_seed_str(
        "qwen2_window",
        "{\"model_type\":\"qwen2\",\"architectures\":[\"Qwen2ForCausalLM\"],\"hidden_size\":32,"
        "\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
        "\"num_key_value_heads\":2,\"head_dim\":8,\"vocab_size\":67,\"max_position_embeddings\":32,"
        "\"use_sliding_window\":true,\"sliding_window\":16,\"rope_theta\":1e6,"
        "\"rms_norm_eps\":1e-6,\"bos_token_id\":[1,3],\"eos_token_id\":null}");
    fuzz_write_seed_str(
        "mistral_tied",
        "{\"model_type\":\"mistral\",\"hidden_size\":32,\"intermediate_size\":64,"
        "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
        "\"vocab_size\":67,\"tie_word_embeddings\":true,\"sliding_window\":null,"
        "\"hidden_act\":\"silu\",\"rope_scaling\":null,\"attention_bias\":false,\"mlp_bias\":false}");
    fuzz_write_seed_str("minimal",
                        "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":32,"
                        "\"intermediate_size\":64,\"num_hidden_layers\":2,"
                        "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"vocab_size\":67}");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fuzz_write_file(config_path, data, size) != 0) abort();
    perl_model *m = NULL;
    int rc = model_load_hf(&m, fuzz_scratch_dir());
    if (rc == LIBPERL_OK) {
        if (m == NULL) abort();
        fuzz_exercise_model(m, NULL);
    } else if (m != NULL || perl_last_error()[0] == '\0') {
        abort(); /* a failure must leave *out NULL and say why */
    }
    perl_model_free(m);
    return 0;
}
