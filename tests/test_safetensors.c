/* safetensors: writer/reader round trip, dtype conversion, and every kind of
 * malformed file rejected cleanly (including every truncation of a valid one). */
#include "test_util.h"

#include <check.h>
#include <stdint.h>
#include <string.h>

#include "fileio.h"
#include "safetensors.h"

/* A file image: 8-byte little-endian header length, header, data. */
static unsigned char *make_image(const char *header, const void *data, size_t data_len,
                                 size_t *out_len)
{
    size_t hl = strlen(header);
    size_t len = 8 + hl + data_len;
    unsigned char *buf = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (data_len) memcpy(buf + 8 + hl, data, data_len);
    *out_len = len;
    return buf;
}

/* Parses header + data_len zero bytes and expects `status` with `expect` in the message. */
static void expect_bad(const char *header, size_t data_len, int status, const char *expect)
{
    unsigned char *zeros = calloc(1, data_len ? data_len : 1);
    size_t len;
    unsigned char *img = make_image(header, zeros, data_len, &len);
    st_file f;
    perl_clear_error();
    int rc = st_parse(&f, img, len, "bad.safetensors");
    ck_assert_msg(rc == status, "header %s: rc %d, expected %d (%s)", header, rc, status,
                  perl_last_error());
    ck_assert_msg(strstr(perl_last_error(), "bad.safetensors") != NULL, "no file name in: %s",
                  perl_last_error());
    if (expect)
        ck_assert_msg(strstr(perl_last_error(), expect) != NULL, "message \"%s\" lacks \"%s\"",
                      perl_last_error(), expect);
    ck_assert_ptr_null(f.tensors);
    ck_assert_ptr_null(f.header);
    free(img);
    free(zeros);
}

static char tmpdir[512];

static void setup_tmp(void)
{
    ck_assert_int_eq(test_make_temp_dir(tmpdir, sizeof tmpdir), 0);
}

static void teardown_tmp(void)
{
    test_remove_tree(tmpdir);
    fileio_set_write_fault(-1);
}

/* Writes the three-tensor sample file; returns its path in buf. */
static const float sample_a[6] = {1, 2, 3, 4, 5, 6};
static const float sample_b[3] = {-1.5f, 0.25f, 1e-30f};
static const int32_t sample_rows[2] = {1, 0};

static char *write_sample(char *buf, size_t n)
{
    st_write_tensor t[4];
    memset(t, 0, sizeof t);
    t[0].name = "layer.a";
    t[0].ndim = 2;
    t[0].shape[0] = 2;
    t[0].shape[1] = 3;
    t[0].data = sample_a;
    t[1].name = "b";
    t[1].ndim = 1;
    t[1].shape[0] = 3;
    t[1].data = sample_b;
    t[2].name = "empty";
    t[2].ndim = 2;
    t[2].shape[0] = 0;
    t[2].shape[1] = 4;
    t[3].name = "a.permuted";
    t[3].ndim = 2;
    t[3].shape[0] = 2;
    t[3].shape[1] = 3;
    t[3].data = sample_a;
    t[3].row_order = sample_rows;
    static const char *const meta[] = {"format", "pt", "note", "caf\xC3\xA9 \"q\"", NULL};
    test_path(buf, n, tmpdir, "sample.safetensors");
    int rc = st_write(buf, t, 4, meta);
    ck_assert_msg(rc == LIBPERL_OK, "st_write: %s", perl_last_error());
    return buf;
}

START_TEST(test_round_trip)
{
    char path[600];
    write_sample(path, sizeof path);
    st_file f;
    ck_assert_msg(st_open(&f, path) == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_uint_eq(f.n_tensors, 4);
    ck_assert_uint_eq(f.data_offset % 8, 0); /* header padded for alignment */
    ck_assert_str_eq(st_metadata(&f, "format"), "pt");
    ck_assert_str_eq(st_metadata(&f, "note"), "caf\xC3\xA9 \"q\"");
    ck_assert_ptr_null(st_metadata(&f, "missing"));

    const st_tensor *a = st_find(&f, "layer.a");
    ck_assert_ptr_nonnull(a);
    ck_assert_int_eq(a->dtype, ST_F32);
    const int64_t sa[2] = {2, 3};
    ck_assert(st_shape_is(a, 2, sa));
    ck_assert_uint_eq(a->numel, 6);
    const float *pa = st_f32_inplace(a);
    ck_assert_ptr_nonnull(pa); /* aligned F32 is used in place */
    ck_assert(memcmp(pa, sample_a, sizeof sample_a) == 0);

    const st_tensor *b = st_find(&f, "b");
    ck_assert_ptr_nonnull(b);
    float out[3];
    ck_assert_int_eq(st_to_f32(b, out), LIBPERL_OK);
    ck_assert(memcmp(out, sample_b, sizeof out) == 0);

    const st_tensor *e = st_find(&f, "empty");
    ck_assert_ptr_nonnull(e);
    ck_assert_uint_eq(e->numel, 0);
    ck_assert_int_eq(e->shape[1], 4);

    const st_tensor *p = st_find(&f, "a.permuted");
    ck_assert_ptr_nonnull(p);
    const float *pp = st_f32_inplace(p);
    ck_assert(memcmp(pp, sample_a + 3, 3 * sizeof(float)) == 0);
    ck_assert(memcmp(pp + 3, sample_a, 3 * sizeof(float)) == 0);

    ck_assert_ptr_null(st_find(&f, "__metadata__"));
    ck_assert_ptr_null(st_find(&f, "nope"));
    st_close(&f);
    ck_assert_int_eq(test_count_entries(tmpdir), 1); /* no temp files left */
}
END_TEST

START_TEST(test_half_precision)
{
    /* BF16: 1.0, -2.0, 0.5; F16: 1.0, -2.0, 0.5, 65504 */
    unsigned char data[14] = {0x80, 0x3F, 0x00, 0xC0, 0x00, 0x3F,
                              0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0xFF, 0x7B};
    const char *hdr = "{\"h\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]},"
                      "\"g\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[6,14]}}";
    size_t len;
    unsigned char *img = make_image(hdr, data, sizeof data, &len);
    st_file f;
    ck_assert_msg(st_parse(&f, img, len, "half") == LIBPERL_OK, "%s", perl_last_error());
    const st_tensor *h = st_find(&f, "h"), *g = st_find(&f, "g");
    ck_assert(h && g && h->dtype == ST_BF16 && g->dtype == ST_F16);
    ck_assert_ptr_null(st_f32_inplace(h));
    float out[4];
    ck_assert_int_eq(st_to_f32(h, out), LIBPERL_OK);
    ck_assert(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.5f);
    ck_assert_int_eq(st_to_f32(g, out), LIBPERL_OK);
    ck_assert(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.5f && out[3] == 65504.0f);
    st_close(&f);
    free(img);
}
END_TEST

START_TEST(test_other_dtypes_and_unaligned)
{
    /* A known but non-float dtype parses, but does not convert. */
    unsigned char data[16 + 8] = {0};
    float vals[2] = {3.0f, -4.0f};
    /* Header of 21 bytes: data starts at 29, so F32 data is not 4-byte aligned. */
    const char *hdr = "{\"i\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
                      "\"f\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}";
    memcpy(data + 16, vals, sizeof vals);
    char padded[256];
    snprintf(padded, sizeof padded, "%s", hdr);
    while ((8 + strlen(padded)) % 4 != 1) strcat(padded, " ");
    size_t len;
    unsigned char *img = make_image(padded, data, sizeof data, &len);
    st_file f;
    ck_assert_msg(st_parse(&f, img, len, "mixed") == LIBPERL_OK, "%s", perl_last_error());
    const st_tensor *i = st_find(&f, "i"), *ft = st_find(&f, "f");
    ck_assert(i && ft && i->dtype == ST_I64);
    float out[2];
    ck_assert_int_eq(st_to_f32(i, out), LIBPERL_ERR_UNSUPPORTED);
    ck_assert_ptr_null(st_f32_inplace(ft)); /* unaligned: must be copied */
    ck_assert_int_eq(st_to_f32(ft, out), LIBPERL_OK);
    ck_assert(out[0] == 3.0f && out[1] == -4.0f);
    st_close(&f);
    free(img);
}
END_TEST

START_TEST(test_bad_header_length)
{
    unsigned char img[16] = {0};
    st_file f;
    /* shorter than the length field */
    for (size_t n = 0; n < 8; n++)
        ck_assert_int_eq(st_parse(&f, img, n, "bad.safetensors"), LIBPERL_ERR_FORMAT);
    /* length 0 */
    ck_assert_int_eq(st_parse(&f, img, 16, "bad.safetensors"), LIBPERL_ERR_FORMAT);
    /* absurd length (> 100 MB), and 2^64 - 1 */
    img[4] = 1;
    ck_assert_int_eq(st_parse(&f, img, 16, "bad.safetensors"), LIBPERL_ERR_FORMAT);
    memset(img, 0xFF, 8);
    ck_assert_int_eq(st_parse(&f, img, 16, "bad.safetensors"), LIBPERL_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "header length"));
}
END_TEST

START_TEST(test_header_larger_than_file)
{
    size_t len;
    unsigned char *img = make_image("{}", NULL, 0, &len);
    img[0] = 3; /* claims 3 header bytes, file has 2 */
    st_file f;
    ck_assert_int_eq(st_parse(&f, img, len, "bad.safetensors"), LIBPERL_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "exceeds"));
    free(img);
}
END_TEST

START_TEST(test_truncated_data)
{
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 12,
               LIBPERL_ERR_FORMAT, "outside");
}
END_TEST

START_TEST(test_overlapping_offsets)
{
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
               24, LIBPERL_ERR_FORMAT, "overlap");
    /* identical ranges overlap too */
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
               8, LIBPERL_ERR_FORMAT, "overlap");
}
END_TEST

START_TEST(test_out_of_bounds_offsets)
{
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[100,104]}}", 8,
               LIBPERL_ERR_FORMAT, "outside");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18446744073709551615]}}",
               8, LIBPERL_ERR_FORMAT, NULL);
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8,
               LIBPERL_ERR_FORMAT, "non-negative");
}
END_TEST

START_TEST(test_begin_after_end)
{
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 16,
               LIBPERL_ERR_FORMAT, "begin");
}
END_TEST

START_TEST(test_shape_size_mismatch)
{
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 24,
               LIBPERL_ERR_FORMAT, "needs 24");
    expect_bad("{\"t\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16,
               LIBPERL_ERR_FORMAT, "needs 8");
}
END_TEST

START_TEST(test_unknown_dtype)
{
    expect_bad("{\"t\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", 16,
               LIBPERL_ERR_UNSUPPORTED, "F128");
    expect_bad("{\"t\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
               LIBPERL_ERR_UNSUPPORTED, NULL);
}
END_TEST

START_TEST(test_non_object_header)
{
    expect_bad("[1, 2, 3]", 0, LIBPERL_ERR_FORMAT, "object");
    expect_bad("\"str\"", 0, LIBPERL_ERR_FORMAT, NULL);
    expect_bad("{\"t\": [1, 2]}", 0, LIBPERL_ERR_FORMAT, "expected an object");
    expect_bad("{\"t\": {\"dtype\": \"F32\", \"shape\": [1]", 0, LIBPERL_ERR_FORMAT, NULL);
    expect_bad("{\"t\": 1} trailing", 0, LIBPERL_ERR_FORMAT, NULL);
}
END_TEST

START_TEST(test_bad_entries)
{
    expect_bad("{\"t\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, LIBPERL_ERR_FORMAT, "dtype");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, LIBPERL_ERR_FORMAT, "shape");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, LIBPERL_ERR_FORMAT, "data_offsets");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
               LIBPERL_ERR_FORMAT, "data_offsets");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8,
               LIBPERL_ERR_FORMAT, "data_offsets");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
               LIBPERL_ERR_FORMAT, "shape[0]");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
               LIBPERL_ERR_FORMAT, "shape[0]");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4,
               LIBPERL_ERR_FORMAT, "shape[0]");
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
               4, LIBPERL_ERR_FORMAT, "rank");
    /* absurd dimensions: the byte size overflows */
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
               "\"data_offsets\":[0,4]}}", 4, LIBPERL_ERR_FORMAT, "absurd");
    expect_bad("{\"t\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],"
               "\"data_offsets\":[0,4]}}", 4, LIBPERL_ERR_FORMAT, "absurd");
    /* duplicate names */
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               8, LIBPERL_ERR_FORMAT, "duplicate");
    /* metadata must map strings to strings */
    expect_bad("{\"__metadata__\":{\"format\":1}}", 0, LIBPERL_ERR_FORMAT, "__metadata__");
    expect_bad("{\"__metadata__\":[]}", 0, LIBPERL_ERR_FORMAT, "__metadata__");
    /* a NUL inside a tensor name */
    expect_bad("{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
               LIBPERL_ERR_FORMAT, "NUL");
}
END_TEST

START_TEST(test_zero_sized_tensors_may_share_offsets)
{
    const char *hdr = "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"c\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[8,8]}}";
    unsigned char data[8] = {0};
    size_t len;
    unsigned char *img = make_image(hdr, data, sizeof data, &len);
    st_file f;
    ck_assert_msg(st_parse(&f, img, len, "zero") == LIBPERL_OK, "%s", perl_last_error());
    ck_assert_uint_eq(f.n_tensors, 3);
    st_close(&f);
    free(img);
}
END_TEST

/* Every proper prefix of a valid file is rejected cleanly (run under valgrind
 * or ASan, each prefix is an exact-size allocation, so over-reads show). */
START_TEST(test_every_truncation)
{
    char path[600];
    write_sample(path, sizeof path);
    size_t len = 0;
    unsigned char *full = test_read_file(path, &len);
    ck_assert_ptr_nonnull(full);
    st_file f;
    ck_assert_int_eq(st_parse(&f, full, len, "full"), LIBPERL_OK);
    st_close(&f);
    for (size_t n = 0; n < len; n++) {
        unsigned char *prefix = malloc(n ? n : 1);
        memcpy(prefix, full, n);
        int rc = st_parse(&f, prefix, n, "prefix");
        ck_assert_msg(rc == LIBPERL_ERR_FORMAT, "prefix of %zu/%zu bytes: rc %d", n, len, rc);
        ck_assert_ptr_null(f.tensors);
        free(prefix);
    }
    /* the same through files, for a spread of lengths */
    char tpath[600];
    test_path(tpath, sizeof tpath, tmpdir, "cut.safetensors");
    for (size_t n = 0; n < len; n += 13) {
        ck_assert_int_eq(test_write_file(tpath, full, n), 0);
        ck_assert_int_eq(st_open(&f, tpath), LIBPERL_ERR_FORMAT);
        ck_assert_ptr_nonnull(strstr(perl_last_error(), "cut.safetensors"));
    }
    free(full);
}
END_TEST

START_TEST(test_open_errors)
{
    st_file f;
    char path[600];
    test_path(path, sizeof path, tmpdir, "does-not-exist.safetensors");
    ck_assert_int_eq(st_open(&f, path), LIBPERL_ERR_IO);
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "does-not-exist.safetensors"));
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "No such file"));
    ck_assert_int_eq(st_open(&f, tmpdir), LIBPERL_ERR_IO);
    ck_assert_ptr_nonnull(strstr(perl_last_error(), "directory"));
}
END_TEST

START_TEST(test_failed_write_keeps_old_file)
{
    char path[600];
    write_sample(path, sizeof path);
    size_t old_len;
    char *old = test_read_file(path, &old_len);
    ck_assert_ptr_nonnull(old);

    float big[1000];
    for (int i = 0; i < 1000; i++) big[i] = (float)i;
    st_write_tensor t;
    memset(&t, 0, sizeof t);
    t.name = "big";
    t.ndim = 1;
    t.shape[0] = 1000;
    t.data = big;
    for (int64_t fault = 0; fault < 4200; fault += 700) {
        fileio_set_write_fault(fault);
        int rc = st_write(path, &t, 1, NULL);
        ck_assert_msg(rc == LIBPERL_ERR_IO, "fault after %lld bytes: rc %d", (long long)fault, rc);
        ck_assert_ptr_nonnull(strstr(perl_last_error(), "No space"));
        fileio_set_write_fault(-1);
        size_t now_len;
        char *now = test_read_file(path, &now_len);
        ck_assert(now != NULL && now_len == old_len && memcmp(now, old, old_len) == 0);
        free(now);
        ck_assert_int_eq(test_count_entries(tmpdir), 1); /* the temp file is gone */
    }
    /* without the fault the write replaces the file */
    ck_assert_int_eq(st_write(path, &t, 1, NULL), LIBPERL_OK);
    st_file f;
    ck_assert_int_eq(st_open(&f, path), LIBPERL_OK);
    ck_assert_uint_eq(f.n_tensors, 1);
    ck_assert(memcmp(st_f32_inplace(st_find(&f, "big")), big, sizeof big) == 0);
    st_close(&f);
    free(old);
}
END_TEST

START_TEST(test_writer_rejects_bad_input)
{
    char path[600];
    test_path(path, sizeof path, tmpdir, "w.safetensors");
    float x[2] = {1, 2};
    st_write_tensor t[2];
    memset(t, 0, sizeof t);
    t[0].name = "x";
    t[0].ndim = 1;
    t[0].shape[0] = 2;
    t[0].data = x;
    t[1] = t[0];
    ck_assert_int_eq(st_write(path, t, 2, NULL), LIBPERL_ERR_INVALID_ARGUMENT); /* duplicate */
    t[1].name = "__metadata__";
    ck_assert_int_eq(st_write(path, t, 2, NULL), LIBPERL_ERR_INVALID_ARGUMENT);
    t[1].name = "y";
    t[1].shape[0] = -1;
    ck_assert_int_eq(st_write(path, t, 2, NULL), LIBPERL_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(test_count_entries(tmpdir), 0);
    /* an empty file (no tensors) is valid */
    ck_assert_int_eq(st_write(path, NULL, 0, NULL), LIBPERL_OK);
    st_file f;
    ck_assert_int_eq(st_open(&f, path), LIBPERL_OK);
    ck_assert_uint_eq(f.n_tensors, 0);
    st_close(&f);
}
END_TEST

Suite *suite_safetensors(void)
{
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("valid");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_round_trip);
    tcase_add_test(tc, test_half_precision);
    tcase_add_test(tc, test_other_dtypes_and_unaligned);
    tcase_add_test(tc, test_zero_sized_tensors_may_share_offsets);
    suite_add_tcase(s, tc);

    tc = tcase_create("malformed");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_bad_header_length);
    tcase_add_test(tc, test_header_larger_than_file);
    tcase_add_test(tc, test_truncated_data);
    tcase_add_test(tc, test_overlapping_offsets);
    tcase_add_test(tc, test_out_of_bounds_offsets);
    tcase_add_test(tc, test_begin_after_end);
    tcase_add_test(tc, test_shape_size_mismatch);
    tcase_add_test(tc, test_unknown_dtype);
    tcase_add_test(tc, test_non_object_header);
    tcase_add_test(tc, test_bad_entries);
    tcase_add_test(tc, test_every_truncation);
    tcase_add_test(tc, test_open_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("write");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_failed_write_keeps_old_file);
    tcase_add_test(tc, test_writer_rejects_bad_input);
    suite_add_tcase(s, tc);
    return s;
}
