/* Byte-level tokens (see byte_tokens.h). */
#include "byte_tokens.h"

int byte_tokens_encode_tail(const char *text, size_t n, int32_t *out, int max_len) {
    size_t room = (size_t)(max_len - 2), skip = n > room ? n - room : 0;
    int k = 0;
    out[k++] = BYTE_TOKEN_BOS;
    for (size_t i = skip; i < n; i++) out[k++] = (int32_t)(unsigned char)text[i] + BYTE_TOKEN_OFFSET;
    out[k++] = BYTE_TOKEN_EOS;
    return k;
}

size_t byte_tokens_decode(const int32_t *tokens, int n, char *out, size_t out_size) {
    size_t k = 0;
    if (out_size == 0) return 0;
    for (int i = 0; i < n && k + 1 < out_size; i++) {
        int32_t t = tokens[i] - BYTE_TOKEN_OFFSET;
        if (t >= 0 && t < 256) out[k++] = (char)t;
    }
    out[k] = '\0';
    return k;
}
