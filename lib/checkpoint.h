/* Training-state files: an adapter's parameters, AdamW moments, step and
 * options, plus an opaque blob from the trainer that owns it (reward or
 * policy state).  Layout (little-endian):
 *   "LPSTATE\0" | u32 version | u32 header_bytes | header fields | params |
 *   [adam_m | adam_v] | u64 extra_len | extra | u32 crc32(all before)
 * Written atomically; loaded fully and verified before anything changes. */
#ifndef LIBPERL_CHECKPOINT_H
#define LIBPERL_CHECKPOINT_H

#include "lora.h"

int lora_state_save(const perl_lora *lora, const char *path, const void *extra, size_t extra_len);
/* On success *out_extra (perl_mem_alloc, may be NULL when empty) holds the blob. */
int lora_state_load(perl_lora *lora, const char *path, void **out_extra, size_t *out_extra_len);

uint32_t perl_crc32(uint32_t crc, const void *data, size_t len);

#endif /* LIBPERL_CHECKPOINT_H */
