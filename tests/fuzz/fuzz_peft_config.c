/*
 * libFuzzer target: a PEFT adapter_config.json, through perl_lora_load on a
 * scratch directory whose adapter_model.safetensors is the lora_qv fixture
 * (made for the tiny model, which is loaded once).  Covers peft_type, r,
 * lora_alpha, dropout, target_modules, the unsupported-option checks and the
 * shape checks that follow; an adapter that loads must run a forward pass.
 */
#include "fuzz_common.h"

#include "lora.h"

static char config_path[1024];
static perl_model *model;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    perl_set_num_threads(1);
    char path[1024];
    FUZZ_REQUIRE(perl_model_load(&model, fuzz_fixture_path(path, sizeof path, "tiny")) ==
                     LIBPERL_OK, "load %s", path);
    fuzz_link(fuzz_fixture_path(path, sizeof path, "lora_qv/adapter_model.safetensors"),
              "adapter_model.safetensors");
    fuzz_scratch_path(config_path, sizeof config_path, "adapter_config.json");
    if (fuzz_seed_dir() == NULL) return 0;
    fuzz_seed_from_fixture("lora_qv", "lora_qv/adapter_config.json");
    fuzz_seed_from_fixture("lora_all", "lora_all/adapter_config.json");
    fuzz_seed_from_fixture("lora_all_rslora", "lora_all_rslora/adapter_config.json");
    fuzz_write_seed_str("string_target",
                        "{\"peft_type\":\"LORA\",\"r\":4,\"lora_alpha\":8,\"target_modules\":"
                        "\"q_proj\",\"bias\":\"none\",\"use_dora\":false,\"rank_pattern\":{},"
                        "\"alpha_pattern\":{},\"layers_to_transform\":null}");
    fuzz_write_seed_str("seq_cls",
                        "{\"peft_type\":\"LORA\",\"task_type\":\"SEQ_CLS\",\"r\":4,"
                        "\"lora_alpha\":8.0,\"lora_dropout\":0.1,\"use_rslora\":true,"
                        "\"target_modules\":[\"v_proj\",\"q_proj\"],\"modules_to_save\":[\"score\"]}");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fuzz_write_file(config_path, data, size) != 0) abort();
    perl_lora *lora = NULL;
    int rc = perl_lora_load(&lora, model, fuzz_scratch_dir());
    if (rc == LIBPERL_OK) {
        if (lora == NULL) abort();
        fuzz_exercise_model(model, lora);
    } else if (lora != NULL || perl_last_error()[0] == '\0') {
        abort();
    }
    perl_lora_free(lora);
    return 0;
}
