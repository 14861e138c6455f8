/*
 * Byte-level tokenisation for the examples' small models: token = byte + 3,
 * with 0 = padding, 1 = BOS, 2 = EOS.  256 + 3 ids, rounded up to a multiple
 * of 8 (264) so the embedding rows stay aligned; ids 259..263 are unused.
 */
#ifndef EXAMPLES_BYTE_TOKENS_H
#define EXAMPLES_BYTE_TOKENS_H

#include <stddef.h>
#include <stdint.h>

#define BYTE_TOKEN_PAD 0
#define BYTE_TOKEN_BOS 1
#define BYTE_TOKEN_EOS 2
#define BYTE_TOKEN_OFFSET 3
#define BYTE_TOKEN_VOCAB 264

/* out = BOS, the last (max_len - 2) bytes of text, EOS: a long text is cut
 * from the left, so the end (the part being judged) always survives.
 * Returns the token count (2..max_len); max_len >= 3. */
int byte_tokens_encode_tail(const char *text, size_t n, int32_t *out, int max_len);

/* The bytes of tokens[0, n) (special and out-of-range ids skipped) into
 * out[out_size] (NUL-terminated); returns the byte count. */
size_t byte_tokens_decode(const int32_t *tokens, int n, char *out, size_t out_size);

#endif /* EXAMPLES_BYTE_TOKENS_H */
