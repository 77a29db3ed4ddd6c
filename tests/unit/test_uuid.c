/* UUIDs: parse, format, v7 order, bad input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "eventastic.h"

static void test_uuid_parse_format_round_trip(void **state)
{
    (void)state;
    es_uuid id;
    assert_int_equal(es_uuid_parse("0190A1B2-c3d4-7e5f-8a6b-1c2d3e4f5a6b",
                                   &id), 0);
    char text[ES_UUID_STRLEN + 1];
    assert_string_equal(es_uuid_format(&id, text),
                        "0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6b");
    assert_int_equal(id.bytes[0], 0x01);
    assert_int_equal(id.bytes[15], 0x6b);
}

static void test_uuid_parse_rejects_bad_input(void **state)
{
    (void)state;
    static const char *bad[] = {
        "",
        "not-a-uuid",
        "0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6",   /* short */
        "0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6b0", /* long */
        "0190a1b2c3d4-7e5f-8a6b-1c2d3e4f5a6b0",  /* hyphen missing */
        "0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6g",  /* not hex */
        "{0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6}",
    };
    es_uuid id = {{0}};
    id.bytes[0] = 42;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(es_uuid_parse(bad[i], &id), ES_EINVAL);
        assert_int_equal(id.bytes[0], 42); /* untouched */
    }
    assert_int_equal(es_uuid_parse(NULL, &id), ES_EINVAL);
    assert_int_equal(es_uuid_parse("0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6b",
                                   NULL), ES_EINVAL);
    assert_int_equal(es_uuid_v7(NULL), ES_EINVAL);
}

static void test_uuid_v7_is_versioned_and_increasing(void **state)
{
    (void)state;
    es_uuid prev;
    assert_int_equal(es_uuid_v7(&prev), 0);
    for (int i = 0; i < 20000; i++) {
        es_uuid next;
        assert_int_equal(es_uuid_v7(&next), 0);
        assert_int_equal(next.bytes[6] >> 4, 7);       /* version 7 */
        assert_int_equal(next.bytes[8] & 0xc0, 0x80);  /* RFC variant */
        assert_true(es_uuid_compare(&prev, &next) < 0);
        assert_false(es_uuid_is_nil(&next));
        prev = next;
    }
    es_uuid nil = {{0}};
    assert_true(es_uuid_is_nil(&nil));
    assert_true(es_uuid_equal(&prev, &prev));
    assert_false(es_uuid_equal(&prev, &nil));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uuid_parse_format_round_trip),
        cmocka_unit_test(test_uuid_parse_rejects_bad_input),
        cmocka_unit_test(test_uuid_v7_is_versioned_and_increasing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
