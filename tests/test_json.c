/* JSON: the strict parser (valid documents, Unicode, malformed inputs) and the writer. */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "json.h"

static json_doc *parse_ok(const char *text, size_t len)
{
    json_doc *doc = NULL;
    int rc = json_parse(&doc, text, len, "test.json");
    ck_assert_msg(rc == LIBPERL_OK, "parse of <%.*s> failed: %s", (int)len, text, perl_last_error());
    ck_assert_ptr_nonnull(doc);
    return doc;
}

static json_doc *parse_str(const char *text)
{
    return parse_ok(text, strlen(text));
}

START_TEST(test_object_order_and_lookup)
{
    json_doc *doc = parse_str(" {\"b\": 1, \"a\": [true, false, null], \"c\": {\"d\": \"e\"}} ");
    const json_value *root = json_doc_root(doc);
    ck_assert_int_eq(root->type, JSON_OBJECT);
    ck_assert_uint_eq(root->count, 3);
    /* document order is kept */
    ck_assert_str_eq(root->members[0].key, "b");
    ck_assert_str_eq(root->members[1].key, "a");
    ck_assert_str_eq(root->members[2].key, "c");
    int64_t i = 0;
    ck_assert(json_as_int64(json_get(root, "b"), &i));
    ck_assert_int_eq(i, 1);
    const json_value *a = json_get(root, "a");
    ck_assert_uint_eq(json_array_len(a), 3);
    int bv = 0;
    ck_assert(json_as_bool(json_array_at(a, 0), &bv) && bv == 1);
    ck_assert(json_as_bool(json_array_at(a, 1), &bv) && bv == 0);
    ck_assert(json_is_null(json_array_at(a, 2)));
    ck_assert_ptr_null(json_array_at(a, 3));
    ck_assert_str_eq(json_as_string(json_get(json_get(root, "c"), "d")), "e");
    ck_assert_ptr_null(json_get(root, "missing"));
    ck_assert_ptr_null(json_get(a, "b")); /* not an object */
    ck_assert_ptr_null(json_as_string(json_get(root, "b")));
    ck_assert(!json_as_int64(json_get(root, "a"), &i));
    json_doc_free(doc);
}
END_TEST

START_TEST(test_scalars_and_empty_containers)
{
    const char *docs[] = {"0", "-0", "true", "false", "null", "\"\"", "[]", "{}", "[[]]",
                          "{\"\":{}}", " \t\r\n[ ]\n", "\xEF\xBB\xBF{}"};
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) json_doc_free(parse_str(docs[i]));
    /* input is (bytes, length): what follows the length is not looked at */
    json_doc *doc = parse_ok("[1,2]garbage", 5);
    ck_assert_uint_eq(json_array_len(json_doc_root(doc)), 2);
    json_doc_free(doc);
}
END_TEST

START_TEST(test_numbers)
{
    json_doc *doc = parse_str("[0, -12, 3.25, 1e3, 2.0, -1.5E-2, 9223372036854775807, "
                              "-9223372036854775808, 9223372036854775808, 1e-400, "
                              "123456789012345678901234567890]");
    const json_value *r = json_doc_root(doc);
    const json_value *v;
    int64_t i;
    double d;
    v = json_array_at(r, 0);
    ck_assert(v->is_integer && v->integer == 0);
    v = json_array_at(r, 1);
    ck_assert(v->is_integer && v->integer == -12 && v->number == -12.0);
    v = json_array_at(r, 2);
    ck_assert(!v->is_integer && v->number == 3.25);
    ck_assert(!json_as_int64(v, &i));
    v = json_array_at(r, 3);
    ck_assert(!v->is_integer && v->number == 1000.0);
    ck_assert(json_as_int64(v, &i) && i == 1000); /* integral doubles convert */
    ck_assert(json_as_int64(json_array_at(r, 4), &i) && i == 2);
    ck_assert(json_as_double(json_array_at(r, 5), &d) && fabs(d + 0.015) < 1e-15);
    v = json_array_at(r, 6);
    ck_assert(v->is_integer && v->integer == INT64_MAX);
    v = json_array_at(r, 7);
    ck_assert(v->is_integer && v->integer == INT64_MIN);
    v = json_array_at(r, 8);
    ck_assert(!v->is_integer && v->number == 9223372036854775808.0);
    ck_assert(!json_as_int64(v, &i));
    v = json_array_at(r, 9);
    ck_assert(v->number == 0.0); /* underflow is fine */
    v = json_array_at(r, 10);
    ck_assert(!v->is_integer && fabs(v->number / 1.2345678901234568e29 - 1.0) < 1e-15);
    json_doc_free(doc);
}
END_TEST

START_TEST(test_strings_and_unicode)
{
    json_doc *doc = parse_str("[\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\", \"\\u00e9\\u20AC\", "
                              "\"\\ud83d\\ude00\", \"caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80\", "
                              "\"x\\u0000y\", \"\\uFFFF\\uDBFF\\uDFFF\"]");
    const json_value *r = json_doc_root(doc);
    ck_assert_str_eq(json_as_string(json_array_at(r, 0)), "a\"b\\c/d\b\f\n\r\t");
    ck_assert_str_eq(json_as_string(json_array_at(r, 1)), "\xC3\xA9\xE2\x82\xAC");
    ck_assert_str_eq(json_as_string(json_array_at(r, 2)), "\xF0\x9F\x98\x80");
    ck_assert_str_eq(json_as_string(json_array_at(r, 3)), "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
    const json_value *nul = json_array_at(r, 4);
    ck_assert_uint_eq(nul->string_len, 3);
    ck_assert(memcmp(nul->string, "x\0y", 3) == 0);
    ck_assert_str_eq(json_as_string(json_array_at(r, 5)), "\xEF\xBF\xBF\xF4\x8F\xBF\xBF");
    json_doc_free(doc);

    /* Unicode keys are looked up by their decoded bytes. */
    doc = parse_str("{\"\\u00e9t\\u00e9\": 1}");
    ck_assert_ptr_nonnull(json_get(json_doc_root(doc), "\xC3\xA9t\xC3\xA9"));
    json_doc_free(doc);
}
END_TEST

START_TEST(test_depth_limit)
{
    char buf[2 * (JSON_MAX_DEPTH + 1) + 1];
    for (int depth = JSON_MAX_DEPTH; depth <= JSON_MAX_DEPTH + 1; depth++) {
        size_t n = 0;
        for (int i = 0; i < depth; i++) buf[n++] = '[';
        for (int i = 0; i < depth; i++) buf[n++] = ']';
        json_doc *doc = NULL;
        int rc = json_parse(&doc, buf, n, "deep.json");
        if (depth <= JSON_MAX_DEPTH) {
            ck_assert_msg(rc == LIBPERL_OK, "depth %d: %s", depth, perl_last_error());
            json_doc_free(doc);
        } else {
            ck_assert_int_eq(rc, LIBPERL_ERR_FORMAT);
            ck_assert_ptr_null(doc);
            ck_assert_ptr_nonnull(strstr(perl_last_error(), "deeper"));
        }
    }
}
END_TEST

/* Every malformed input fails with FORMAT and a "source:line:col:" message. */
static const struct {
    const char *text;
    size_t len; /* 0: strlen */
    const char *expect; /* substring of the message, or NULL */
} malformed[] = {
    {"", 0, "expected a value"},
    {"   ", 0, "expected a value"},
    {"{", 0, NULL},
    {"}", 0, "expected a value"},
    {"[", 0, NULL},
    {"[1,]", 0, "expected a value"},
    {"[,1]", 0, "expected a value"},
    {"[1 2]", 0, "',' or ']'"},
    {"[1,2", 0, "',' or ']'"},
    {"{\"a\"}", 0, "':'"},
    {"{\"a\":}", 0, "expected a value"},
    {"{\"a\":1,}", 0, "string key"},
    {"{\"a\":1 \"b\":2}", 0, "',' or '}'"},
    {"{a:1}", 0, "string key"},
    {"{'a':1}", 0, "string key"},
    {"{\"a\":1,\"a\":2}", 0, "duplicate key"},
    {"01", 0, "leading zero"},
    {"-01", 0, "leading zero"},
    {"-", 0, "digit"},
    {"1.", 0, "decimal point"},
    {".5", 0, "expected a value"},
    {"+1", 0, "expected a value"},
    {"1e", 0, "exponent"},
    {"1e+", 0, "exponent"},
    {"0x10", 0, "end of input"},
    {"1e400", 0, "out of range"},
    {"-1e400", 0, "out of range"},
    {"NaN", 0, "expected a value"},
    {"Infinity", 0, "expected a value"},
    {"-Infinity", 0, "digit"},
    {"tru", 0, "'true'"},
    {"True", 0, "expected a value"},
    {"nul", 0, "'null'"},
    {"nulls", 0, "end of input"},
    {"\"abc", 0, "unterminated"},
    {"\"abc\\\"", 0, "unterminated"},
    {"\"\\x\"", 0, "invalid escape"},
    {"\"\\u12\"", 0, "hex digits"},
    {"\"\\uZZZZ\"", 0, "hex digits"},
    {"\"\\ud800\"", 0, "surrogate"},
    {"\"\\udc00\"", 0, "lone low surrogate"},
    {"\"\\ud800\\u0041\"", 0, "low surrogate"},
    {"\"\\ud800x\"", 0, "surrogate"},
    {"\"a\tb\"", 0, "control character"},
    {"\"a\nb\"", 0, "control character"},
    {"\"\x01\"", 0, "control character"},
    {"\"\xff\"", 0, "UTF-8"},
    {"\"\xc0\xaf\"", 0, "UTF-8"},         /* overlong '/' */
    {"\"\xed\xa0\x80\"", 0, "UTF-8"},     /* UTF-8-encoded surrogate */
    {"\"\xf4\x90\x80\x80\"", 0, "UTF-8"}, /* > U+10FFFF */
    {"\"\xe2\x82\"", 0, "UTF-8"},         /* truncated sequence */
    {"[1] [2]", 0, "end of input"},
    {"1 2", 0, "end of input"},
    {"{} x", 0, "end of input"},
    {"[1]\0", 4, "end of input"},
    {"\xEF\xBB", 0, "expected a value"},
    {"[\x0b]", 0, "expected a value"}, /* vertical tab is not JSON whitespace */
};

START_TEST(test_malformed)
{
    for (size_t i = 0; i < sizeof malformed / sizeof malformed[0]; i++) {
        const char *text = malformed[i].text;
        size_t len = malformed[i].len ? malformed[i].len : strlen(text);
        json_doc *doc = (json_doc *)1;
        perl_clear_error();
        int rc = json_parse(&doc, text, len, "bad.json");
        ck_assert_msg(rc == LIBPERL_ERR_FORMAT, "case %zu <%s> was accepted (rc %d)", i, text, rc);
        ck_assert_ptr_null(doc);
        const char *msg = perl_last_error();
        ck_assert_msg(strncmp(msg, "bad.json:1:", 11) == 0, "case %zu: message without position: %s",
                      i, msg);
        if (malformed[i].expect)
            ck_assert_msg(strstr(msg, malformed[i].expect) != NULL,
                          "case %zu <%s>: message \"%s\" lacks \"%s\"", i, text, msg,
                          malformed[i].expect);
    }
}
END_TEST

START_TEST(test_error_position)
{
    const char *text = "{\n  \"a\": 1,\n  \"b\": tru\n}";
    json_doc *doc = NULL;
    ck_assert_int_eq(json_parse(&doc, text, strlen(text), "cfg.json"), LIBPERL_ERR_FORMAT);
    /* "tru" starts at line 3, column 8; the mismatch is at column 11 */
    ck_assert_msg(strstr(perl_last_error(), "cfg.json:3:11:") != NULL, "%s", perl_last_error());
    ck_assert_msg(strstr(perl_last_error(), "expected 'true'") != NULL, "%s", perl_last_error());

    /* columns count characters, not bytes */
    text = "[\"\xC3\xA9\xC3\xA9\", x]";
    ck_assert_int_eq(json_parse(&doc, text, strlen(text), "u.json"), LIBPERL_ERR_FORMAT);
    ck_assert_msg(strstr(perl_last_error(), "u.json:1:8:") != NULL, "%s", perl_last_error());
}
END_TEST

START_TEST(test_writer_round_trip)
{
    json_writer w;
    for (int pretty = 0; pretty <= 1; pretty++) {
        json_writer_init(&w, pretty);
        json_write_object_begin(&w);
        json_write_key(&w, "s");
        json_write_string(&w, "quote\" back\\ nl\n tab\t ctl\x01 del\x7f caf\xC3\xA9");
        json_write_key(&w, "i");
        json_write_int(&w, -42);
        json_write_key(&w, "big");
        json_write_int(&w, INT64_MAX);
        json_write_key(&w, "eps");
        json_write_float(&w, 1e-5f);
        json_write_key(&w, "tenth");
        json_write_float(&w, 0.1f);
        json_write_key(&w, "d");
        json_write_double(&w, 0.1);
        json_write_key(&w, "theta");
        json_write_float(&w, 10000.0f);
        json_write_key(&w, "arr");
        json_write_array_begin(&w);
        json_write_bool(&w, 1);
        json_write_null(&w);
        json_write_array_begin(&w);
        json_write_array_end(&w);
        json_write_object_begin(&w);
        json_write_object_end(&w);
        json_write_array_end(&w);
        json_write_key(&w, "k\"ey");
        json_write_string_n(&w, "a\0b", 3);
        json_write_object_end(&w);
        ck_assert_int_eq(json_writer_finish(&w), LIBPERL_OK);
        ck_assert_uint_eq(strlen(w.data), w.len);

        json_doc *doc = parse_ok(w.data, w.len);
        const json_value *r = json_doc_root(doc);
        ck_assert_str_eq(json_as_string(json_get(r, "s")),
                         "quote\" back\\ nl\n tab\t ctl\x01 del\x7f caf\xC3\xA9");
        int64_t i;
        ck_assert(json_as_int64(json_get(r, "i"), &i) && i == -42);
        ck_assert(json_as_int64(json_get(r, "big"), &i) && i == INT64_MAX);
        double d;
        ck_assert(json_as_double(json_get(r, "eps"), &d) && (float)d == 1e-5f);
        ck_assert(json_as_double(json_get(r, "tenth"), &d) && (float)d == 0.1f);
        ck_assert(json_as_double(json_get(r, "d"), &d) && d == 0.1);
        ck_assert(json_as_double(json_get(r, "theta"), &d) && d == 10000.0);
        ck_assert_uint_eq(json_array_len(json_get(r, "arr")), 4);
        const json_value *k = json_get(r, "k\"ey");
        ck_assert(k != NULL && k->string_len == 3 && memcmp(k->string, "a\0b", 3) == 0);
        json_doc_free(doc);
        if (!pretty) {
            /* shortest forms */
            ck_assert_ptr_nonnull(strstr(w.data, "\"eps\":1e-05"));
            ck_assert_ptr_nonnull(strstr(w.data, "\"tenth\":0.1,"));
            ck_assert_ptr_nonnull(strstr(w.data, "\"theta\":10000.0,"));
        }
        json_writer_free(&w);
    }
}
END_TEST

START_TEST(test_writer_errors)
{
    json_writer w;
    json_writer_init(&w, 0);
    json_write_array_begin(&w);
    json_write_float(&w, NAN);
    json_write_array_end(&w);
    ck_assert_int_ne(json_writer_finish(&w), LIBPERL_OK);
    json_writer_free(&w);

    json_writer_init(&w, 0);
    json_write_object_begin(&w);
    ck_assert_int_ne(json_writer_finish(&w), LIBPERL_OK); /* unclosed */
    json_writer_free(&w);

    json_writer_init(&w, 0);
    json_write_array_begin(&w);
    json_write_key(&w, "k"); /* key inside an array */
    json_write_array_end(&w);
    ck_assert_int_ne(json_writer_finish(&w), LIBPERL_OK);
    json_writer_free(&w);
}
END_TEST

Suite *suite_json(void)
{
    Suite *s = suite_create("json");
    TCase *tc = tcase_create("parse");
    tcase_add_test(tc, test_object_order_and_lookup);
    tcase_add_test(tc, test_scalars_and_empty_containers);
    tcase_add_test(tc, test_numbers);
    tcase_add_test(tc, test_strings_and_unicode);
    tcase_add_test(tc, test_depth_limit);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_error_position);
    suite_add_tcase(s, tc);
    tc = tcase_create("write");
    tcase_add_test(tc, test_writer_round_trip);
    tcase_add_test(tc, test_writer_errors);
    suite_add_tcase(s, tc);
    return s;
}
