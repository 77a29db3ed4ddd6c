/* Status codes: the one table gives names and messages for every code. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "eventastic.h"

static void test_error_every_code_has_name_and_message(void **state)
{
    (void)state;
    static const int codes[] = {
#define X(name, value, msg) value,
        ES_STATUS_MAP(X)
#undef X
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        assert_string_not_equal(es_strerror(codes[i]), "unknown status");
        assert_true(strncmp(es_status_name(codes[i]), "ES_", 3) == 0);
        assert_string_not_equal(es_status_name(codes[i]),
                                "ES_UNKNOWN_STATUS");
    }
    assert_string_equal(es_status_name(ES_ECONFLICT), "ES_ECONFLICT");
    assert_string_equal(es_status_name(ES_OK), "ES_OK");
    assert_true(ES_EIDEMPOTENCY < 0 && ES_EDB < 0);
}

static void test_error_unknown_code(void **state)
{
    (void)state;
    assert_string_equal(es_strerror(-9999), "unknown status");
    assert_string_equal(es_status_name(12345), "ES_UNKNOWN_STATUS");
}

static void test_error_clear_and_null(void **state)
{
    (void)state;
    es_error err;
    memset(&err, 0x5a, sizeof err);
    es_error_clear(&err);
    assert_int_equal(err.code, 0);
    assert_string_equal(err.message, "");
    es_error_clear(NULL); /* a no-op */
}

static void test_error_version(void **state)
{
    (void)state;
    assert_string_equal(es_version(), ES_VERSION_STRING);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_every_code_has_name_and_message),
        cmocka_unit_test(test_error_unknown_code),
        cmocka_unit_test(test_error_clear_and_null),
        cmocka_unit_test(test_error_version),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
