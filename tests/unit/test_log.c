/* Logging: the callback gets messages at its level and above, stderr is
 * the default, and bad levels are refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "eventastic.h"

typedef struct seen {
    int count;
    es_log_level last_level;
    char last[128];
} seen;

static void collect(void *ud, es_log_level level, const char *message)
{
    seen *s = ud;
    s->count++;
    s->last_level = level;
    snprintf(s->last, sizeof s->last, "%s", message);
}

static void test_log_callback_filters_by_level(void **state)
{
    (void)state;
    seen s = {0};
    assert_int_equal(es_log_set(collect, &s, ES_LOG_WARN), 0);
    es__log(ES_LOG_INFO, "not shown %d", 1);
    assert_int_equal(s.count, 0);
    es__log(ES_LOG_WARN, "shown %d", 2);
    assert_int_equal(s.count, 1);
    assert_int_equal(s.last_level, ES_LOG_WARN);
    assert_string_equal(s.last, "shown 2");
    es__log(ES_LOG_ERROR, "worse");
    assert_int_equal(s.count, 2);
    assert_true(es__log_enabled(ES_LOG_ERROR));
    assert_false(es__log_enabled(ES_LOG_DEBUG));
    assert_int_equal(es_log_set(NULL, NULL, ES_LOG_WARN), 0);
}

static void test_log_rejects_bad_level(void **state)
{
    (void)state;
    seen s = {0};
    assert_int_equal(es_log_set(collect, &s, (es_log_level)7), ES_EINVAL);
    es__log(ES_LOG_ERROR, "to stderr, not to the callback");
    assert_int_equal(s.count, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_log_callback_filters_by_level),
        cmocka_unit_test(test_log_rejects_bad_level),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
