/*
 * The context: the reference's aggregate.rs, root.rs and event.rs cases on
 * the counter fixture, one test per defect of Eventastic 0.5 that
 * eventastic fixes (include/eventastic/context.h), and bad input.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "fixtures/account.h"
#include "fixtures/counter.h"
#include "fixtures/helpers.h"

/* Every test gets a fresh in-memory store. */
static int setup(void **state)
{
    es_store *store = NULL;
    if (es_memory_store_open(&store, NULL) != 0) return -1;
    *state = store;
    return 0;
}

static int teardown(void **state)
{
    return es_store_close(*state) == 0 ? 0 : -1;
}

static es_context *raw(counter_context *c) { return counter_context_raw(c); }

static counter_context *start(es_uuid *id)
{
    counter_context *c = NULL;
    es_error err = {0};
    assert_int_equal(counter_start(&c, id, &err), 0);
    return c;
}

static void record_ok(counter_context *c, counter_event e)
{
    es_error err = {0};
    int rc = counter_record(c, &e, &err);
    if (rc != 0) fail_msg("record: %s: %s", es_status_name(rc), err.message);
}

static void save_ok(es_store *store, counter_context *c)
{
    es_error err = {0};
    int rc = fixture_save_commit(store, raw(c), &err);
    if (rc != 0) fail_msg("save: %s: %s", es_status_name(rc), err.message);
}

static counter_context *load_ok(es_store *store, const es_uuid *id)
{
    counter_context *c = NULL;
    es_error err = {0};
    int rc = counter_store_load(store, id, &c, &err);
    if (rc != 0) fail_msg("load: %s: %s", es_status_name(rc), err.message);
    return c;
}

static void decode_side_effect(const es_side_effect *se,
                               counter_side_effect *out)
{
    es_error err = {0};
    assert_int_equal(counter_side_effect_decode(se, out, &err), 0);
}

/* ==== aggregate.rs: the type's callbacks on their own ==== */

static void test_context_aggregate_creation(void **state)
{
    (void)state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    counter s;
    memset(&s, 0, sizeof s);
    es_error err = {0};
    assert_int_equal(counter_type.apply_new(&s, &reset, &err), 0);
    assert_true(es_uuid_equal(&s.id, &id));
    assert_int_equal(s.result, 0);
    assert_int_equal(s.operations_count, 0);
}

static void test_context_aggregate_creation_with_invalid_event(void **state)
{
    (void)state;
    counter_event add = counter_add(5);
    counter s;
    memset(&s, 0, sizeof s);
    es_error err = {0};
    assert_int_equal(counter_type.apply_new(&s, &add, &err), ES_EAPPLY);
    assert_string_equal(err.message, "InvalidOperation");

    /* through the context: nothing is returned, the error names the
     * event */
    counter_context *c = NULL;
    es_uuid id = fixture_new_id();
    es_error_clear(&err);
    assert_int_equal(counter_record_new(&id, &add, &c, &err), ES_EAPPLY);
    assert_null(c);
    assert_true(es_uuid_equal(&err.event_id, &add.event_id));
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_non_null(strstr(err.message, "InvalidOperation"));
}

static void test_context_aggregate_apply_events(void **state)
{
    (void)state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    counter s;
    memset(&s, 0, sizeof s);
    es_error err = {0};
    assert_int_equal(counter_type.apply_new(&s, &reset, &err), 0);
    counter_event ops[] = {counter_add(15), counter_subtract(5),
                           counter_multiply(3)};
    const int32_t expect[] = {15, 10, 30};
    for (uint32_t i = 0; i < 3; i++) {
        assert_int_equal(counter_type.apply(&s, &ops[i], &err), 0);
        assert_int_equal(s.result, expect[i]);
        assert_int_equal(s.operations_count, i + 1);
    }
}

static void test_context_aggregate_apply_error(void **state)
{
    (void)state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    counter s;
    memset(&s, 0, sizeof s);
    es_error err = {0};
    assert_int_equal(counter_type.apply_new(&s, &reset, &err), 0);
    assert_int_equal(counter_type.apply(&s, &reset, &err), ES_EAPPLY);
    assert_string_equal(err.message, "InvalidOperation");
    counter_event mul = counter_multiply(0);
    assert_int_equal(counter_type.apply(&s, &mul, &err), ES_EAPPLY);
    assert_string_equal(err.message, "DivisionByZero");
    assert_int_equal(s.result, 0);
    assert_int_equal(s.operations_count, 0);
}

static void test_context_side_effects_generation(void **state)
{
    (void)state;
    es_uuid id;
    counter_context *c = start(&id);
    assert_int_equal(es_context_side_effect_count(raw(c)), 2);
    record_ok(c, counter_add(1));
    assert_int_equal(es_context_side_effect_count(raw(c)), 3);
    record_ok(c, counter_multiply(2));
    assert_int_equal(es_context_side_effect_count(raw(c)), 3); /* None */

    counter_side_effect se;
    decode_side_effect(es_context_side_effect(raw(c), 0), &se);
    assert_int_equal(se.kind, COUNTER_LOG_OPERATION);
    assert_string_equal(se.text, "Reset");
    decode_side_effect(es_context_side_effect(raw(c), 1), &se);
    assert_int_equal(se.kind, COUNTER_NOTIFY_USER);
    decode_side_effect(es_context_side_effect(raw(c), 2), &se);
    assert_string_equal(se.text, "Add 1");

    /* ids: stable (derived from the event), distinct, tied to the event */
    const es_side_effect *a = es_context_side_effect(raw(c), 0);
    const es_side_effect *b = es_context_side_effect(raw(c), 1);
    const es_event *reset = es_context_uncommitted(raw(c), 0);
    assert_false(es_uuid_equal(&a->id, &b->id));
    assert_false(es_uuid_equal(&a->id, &reset->id));
    es_uuid want = fixture_derive_id(&reset->id, COUNTER_TAG_LOG);
    assert_true(es_uuid_equal(&a->id, &want));
    assert_true(es_uuid_equal(&a->event_id, &reset->id));
    assert_true(es_uuid_equal(&a->aggregate_id, &id));
    counter_context_free(c);
}

static void test_context_aggregate_id(void **state)
{
    (void)state;
    es_uuid id;
    counter_context *c = start(&id);
    assert_true(es_uuid_equal(&counter_state(c)->id, &id));
    assert_true(es_uuid_equal(es_context_aggregate_id(raw(c)), &id));
    assert_ptr_equal(es_context_type(raw(c)), &counter_type);
    counter_context_free(c);
}

static void test_context_snapshot_version(void **state)
{
    (void)state;
    assert_int_equal(counter_type.snapshot_version, COUNTER_SNAPSHOT_VERSION);
    assert_int_equal(counter_type.snapshot_version, 1);
    counter_context *c = start(NULL);
    assert_int_equal(es_context_snapshot_version(raw(c)), 1);
    counter_context_free(c);
    assert_int_equal(es_aggregate_type_check(&counter_type, NULL), 0);
    assert_int_equal(es_aggregate_type_check(&account_type, NULL), 0);
    assert_int_equal(es_aggregate_type_check(&order_type, NULL), 0);
}

/* ==== root.rs: the context ==== */

static void test_context_record_new(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    assert_int_equal(counter_version(c), 0);
    assert_int_equal(es_context_snapshot_version(raw(c)), 1);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 1);
    assert_int_equal(es_context_uncommitted(raw(c), 0)->version, 0);
    counter_context_free(c);
}

static void test_context_record_that(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    record_ok(c, counter_add(15));
    assert_int_equal(counter_version(c), 1);
    assert_int_equal(counter_state(c)->result, 15);
    record_ok(c, counter_subtract(5));
    assert_int_equal(counter_version(c), 2);
    assert_int_equal(counter_state(c)->result, 10);
    counter_context_free(c);
}

static void test_context_record_that_error(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    record_ok(c, counter_add(7));
    const counter *before = counter_state(c);
    counter_event mul = counter_multiply(0);
    es_error err = {0};
    assert_int_equal(counter_record(c, &mul, &err), ES_EAPPLY);
    assert_non_null(strstr(err.message, "DivisionByZero"));
    assert_true(es_uuid_equal(&err.event_id, &mul.event_id));
    assert_ptr_equal(counter_state(c), before);
    assert_int_equal(counter_state(c)->result, 7);
    assert_int_equal(counter_state(c)->operations_count, 1);
    assert_int_equal(counter_version(c), 1);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 2);
    assert_int_equal(es_context_side_effect_count(raw(c)), 3);
    counter_context_free(c);
}

static void test_context_version_tracking(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    for (uint64_t v = 1; v <= 5; v++) {
        record_ok(c, counter_add(1));
        assert_int_equal(counter_version(c), v);
        assert_int_equal(es_context_uncommitted(raw(c), v)->version, v);
    }
    counter_context_free(c);
}

static void test_context_uncommitted_events(void **state)
{
    es_store *store = *state;
    counter_context *c = start(NULL);
    record_ok(c, counter_add(1));
    assert_int_equal(es_context_uncommitted_count(raw(c)), 2);
    save_ok(store, c);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 0);
    assert_null(es_context_uncommitted(raw(c), 0));
    counter_context_free(c);
}

static void test_context_side_effects(void **state)
{
    es_store *store = *state;
    counter_context *c = start(NULL);
    record_ok(c, counter_subtract(4));
    assert_int_equal(es_context_side_effect_count(raw(c)), 3);
    save_ok(store, c);
    assert_int_equal(es_context_side_effect_count(raw(c)), 0);
    assert_null(es_context_side_effect(raw(c), 0));
    counter_context_free(c);
}

static void test_context_state_access(void **state)
{
    (void)state;
    es_uuid id;
    counter_context *c = start(&id);
    record_ok(c, counter_add(42));
    const counter *s = counter_state(c);
    assert_non_null(s);
    assert_ptr_equal(s, es_context_state(raw(c)));
    assert_true(es_uuid_equal(&s->id, &id));
    assert_int_equal(s->result, 42);
    assert_int_equal(s->operations_count, 1);
    counter_context_free(c);
}

static void test_context_rehydrate_from(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    save_ok(store, c);
    counter_context_free(c);
    c = load_ok(store, &id);
    assert_int_equal(counter_version(c), 0);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 0);
    assert_int_equal(es_context_side_effect_count(raw(c)), 0);
    assert_true(es_uuid_equal(&counter_state(c)->id, &id));
    counter_context_free(c);
}

static void test_context_apply_rehydrated_event(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    record_ok(c, counter_add(9));
    save_ok(store, c);
    counter_context_free(c);
    c = load_ok(store, &id);
    assert_int_equal(counter_version(c), 1);
    assert_int_equal(counter_state(c)->result, 9);
    assert_int_equal(es_context_side_effect_count(raw(c)), 0);
    counter_context_free(c);
}

/* A counter type that accepts what counter_type refuses, to store events
 * that counter_type cannot apply. */
static int lenient_apply_new(void *state, const void *event, es_error *err)
{
    (void)err;
    const counter_event *e = event;
    ((counter *)state)->id = e->counter_id;
    return 0;
}

static int lenient_apply(void *state, const void *event, es_error *err)
{
    (void)state;
    (void)event;
    (void)err;
    return 0;
}

static es_aggregate_type lenient_type(void)
{
    es_aggregate_type t = counter_type;
    t.apply_new = lenient_apply_new;
    t.apply = lenient_apply;
    t.side_effects = NULL;
    return t;
}

/* Stored events, one that counter_type cannot apply: load names it. */
static void test_context_apply_rehydrated_event_error(void **state)
{
    es_store *store = *state;
    es_aggregate_type lenient = lenient_type();
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id), add = counter_add(1),
                  mul = counter_multiply(0);
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&lenient, &id, &reset, &c, &err),
                     0);
    assert_int_equal(es_context_record(c, &add, &err), 0);
    assert_int_equal(es_context_record(c, &mul, &err), 0);
    assert_int_equal(fixture_save_commit(store, c, &err), 0);
    es_context_free(c);

    /* delete the snapshot: it would hide the bad event */
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(es_txn_delete_snapshots(txn, &id, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);

    counter_context *loaded = NULL;
    assert_int_equal(counter_store_load(store, &id, &loaded, &err),
                     ES_EAPPLY);
    assert_null(loaded);
    assert_true(es_uuid_equal(&err.event_id, &mul.event_id));
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_non_null(strstr(err.message, "DivisionByZero"));
}

static void test_context_rehydrate_from_error(void **state)
{
    es_store *store = *state;
    es_aggregate_type lenient = lenient_type();
    es_uuid id = fixture_new_id();
    counter_event add = counter_add(3);
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&lenient, &id, &add, &c, &err), 0);
    assert_int_equal(fixture_save_commit(store, c, &err), 0);
    es_context_free(c);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(es_txn_delete_snapshots(txn, &id, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);

    counter_context *loaded = NULL;
    assert_int_equal(counter_store_load(store, &id, &loaded, &err),
                     ES_EAPPLY);
    assert_null(loaded);
    assert_non_null(strstr(err.message, "InvalidOperation"));
    assert_true(es_uuid_equal(&err.event_id, &add.event_id));
}

static void test_context_record_new_with_side_effects(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    assert_int_equal(es_context_side_effect_count(raw(c)), 2);
    counter_context_free(c);
}

static void test_context_record_new_no_side_effects(void **state)
{
    (void)state;
    es_aggregate_type quiet = counter_type;
    quiet.side_effects = NULL;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    es_context *c = NULL;
    assert_int_equal(es_context_record_new(&quiet, &id, &reset, &c, NULL), 0);
    assert_int_equal(es_context_side_effect_count(c), 0);
    assert_int_equal(es_context_uncommitted_count(c), 1);
    es_context_free(c);
}

/* ==== event.rs: events as the library keeps them ==== */

static void test_context_event_store_event_creation(void **state)
{
    (void)state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    counter_context *c = NULL;
    assert_int_equal(counter_record_new(&id, &reset, &c, NULL), 0);
    const es_event *ev = es_context_uncommitted(raw(c), 0);
    assert_non_null(ev);
    assert_true(es_uuid_equal(&ev->id, &reset.event_id));
    assert_int_equal(ev->version, 0);
    assert_int_equal(ev->kind, COUNTER_RESET);
    assert_non_null(ev->data);
    assert_int_equal(ev->len, 32);
    counter_context_free(c);
}

static void test_context_event_store_event_fields(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    counter_event add = counter_add(-12);
    record_ok(c, add);
    const es_event *ev = es_context_uncommitted(raw(c), 1);
    assert_true(es_uuid_equal(&ev->id, &add.event_id));
    assert_int_equal(ev->version, 1);
    assert_int_equal(ev->kind, COUNTER_ADD);
    counter_event back;
    assert_int_equal(counter_event_decode(ev, &back, NULL), 0);
    assert_int_equal(back.kind, COUNTER_ADD);
    assert_int_equal(back.value, -12);
    assert_true(es_uuid_equal(&back.event_id, &add.event_id));
    counter_context_free(c);
}

static void test_context_event_store_event_equality(void **state)
{
    (void)state;
    /* the same event recorded in two contexts: equal id, version, kind,
     * bytes (the codec is deterministic) */
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id), add = counter_add(5);
    counter_context *a = NULL, *b = NULL;
    assert_int_equal(counter_record_new(&id, &reset, &a, NULL), 0);
    assert_int_equal(counter_record_new(&id, &reset, &b, NULL), 0);
    record_ok(a, add);
    record_ok(b, add);
    const es_event *x = es_context_uncommitted(raw(a), 1);
    const es_event *y = es_context_uncommitted(raw(b), 1);
    assert_true(es_uuid_equal(&x->id, &y->id));
    assert_int_equal(x->version, y->version);
    assert_int_equal(x->kind, y->kind);
    assert_int_equal(x->len, y->len);
    assert_memory_equal(x->data, y->data, x->len);
    counter_context_free(a);
    counter_context_free(b);
}

static void test_context_event_store_event_accessor_methods(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    record_ok(c, counter_add(1));
    assert_int_equal(es_context_uncommitted_count(raw(c)), 2);
    assert_non_null(es_context_uncommitted(raw(c), 0));
    assert_non_null(es_context_uncommitted(raw(c), 1));
    assert_null(es_context_uncommitted(raw(c), 2));
    assert_null(es_context_uncommitted(raw(c), (size_t)-1));
    assert_null(es_context_side_effect(raw(c), 3));
    counter_context_free(c);
}

static void test_context_domain_event_id_access(void **state)
{
    (void)state;
    counter_event add = counter_add(1);
    es_uuid got = counter_type.event_id(&add);
    assert_true(es_uuid_equal(&got, &add.event_id));
    assert_int_equal(counter_type.event_kind(&add), COUNTER_ADD);
    assert_string_equal(counter_type.event_kind_name(COUNTER_MULTIPLY),
                        "Multiply");
    assert_null(counter_type.event_kind_name(99));
}

static void test_context_domain_event_equality(void **state)
{
    (void)state;
    /* the same id with another value is another event: its bytes differ */
    counter_event a = counter_add(1), b = a;
    b.value = 2;
    es_buf x = {0}, y = {0};
    assert_int_equal(counter_type.event_encode(&a, &x, NULL), 0);
    assert_int_equal(counter_type.event_encode(&b, &y, NULL), 0);
    assert_int_equal(x.len, y.len);
    assert_true(memcmp(x.data, y.data, x.len) != 0);
    es_buf z = {0};
    assert_int_equal(counter_type.event_encode(&a, &z, NULL), 0);
    assert_memory_equal(x.data, z.data, x.len);
    es_buf_free(&x);
    es_buf_free(&y);
    es_buf_free(&z);

    /* and recording it under the uncommitted id is a clash */
    counter_context *c = start(NULL);
    record_ok(c, a);
    es_error err = {0};
    assert_int_equal(counter_record(c, &b, &err), ES_EIDEMPOTENCY);
    counter_context_free(c);
}

static void test_context_domain_event_clone(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    record_ok(c, counter_add(3));
    counter_context *copy = NULL;
    es_error err = {0};
    assert_int_equal(counter_clone(c, &copy, &err), 0);
    assert_int_equal(counter_version(copy), 1);
    assert_int_equal(counter_state(copy)->result, 3);
    assert_ptr_not_equal(counter_state(copy), counter_state(c));
    assert_int_equal(es_context_uncommitted_count(raw(copy)), 2);
    assert_int_equal(es_context_side_effect_count(raw(copy)), 3);
    for (size_t i = 0; i < 2; i++) {
        const es_event *x = es_context_uncommitted(raw(c), i);
        const es_event *y = es_context_uncommitted(raw(copy), i);
        assert_ptr_not_equal(x->data, y->data);
        assert_int_equal(x->len, y->len);
        assert_memory_equal(x->data, y->data, x->len);
    }
    /* the copy lives on its own */
    record_ok(copy, counter_add(1));
    assert_int_equal(counter_version(c), 1);
    counter_context_free(c);
    assert_int_equal(counter_state(copy)->result, 4);
    counter_context_free(copy);
}

static void test_context_event_store_event_id_reference(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    counter_event add = counter_add(11);
    record_ok(c, add);
    save_ok(store, c);
    counter_context_free(c);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    es_event *ev = NULL;
    assert_int_equal(es_txn_get_event(txn, &id, &add.event_id, &ev, &err), 0);
    assert_true(es_uuid_equal(&ev->id, &add.event_id));
    assert_int_equal(ev->version, 1);
    counter_event back;
    assert_int_equal(counter_event_decode(ev, &back, &err), 0);
    assert_int_equal(back.value, 11);
    es_free(ev);
    /* under another aggregate it is not found */
    es_uuid other = fixture_new_id();
    ev = NULL;
    assert_int_equal(es_txn_get_event(txn, &other, &add.event_id, &ev, &err),
                     ES_ENOTFOUND);
    assert_null(ev);
    es_txn_rollback(txn);
}

/* ==== the defects of 0.5, fixed ==== */

/* (1) re-recording an uncommitted event with equal content is a no-op */
static void test_context_rerecord_same_uncommitted_is_noop(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    counter_event add = counter_add(10);
    record_ok(c, add);
    record_ok(c, add); /* the same event again */
    assert_int_equal(counter_version(c), 1);
    assert_int_equal(counter_state(c)->result, 10);
    assert_int_equal(counter_state(c)->operations_count, 1);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 2);
    assert_int_equal(es_context_side_effect_count(raw(c)), 3);
    /* the creation event too */
    counter_event reset = counter_reset(&id);
    reset.event_id = es_context_uncommitted(raw(c), 0)->id;
    record_ok(c, reset);
    assert_int_equal(counter_version(c), 1);

    record_ok(c, counter_add(5));
    assert_int_equal(counter_version(c), 2);
    save_ok(store, c);
    counter_context_free(c);

    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(store, &id, &s, NULL), 0);
    assert_int_equal(s.count, 3);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
    c = load_ok(store, &id);
    assert_int_equal(counter_state(c)->result, 15);
    assert_int_equal(counter_state(c)->operations_count, 2);
    counter_context_free(c);
    assert_int_equal(fixture_side_effect_count(store, &id), 4);
}

/* (1) re-recording an event that is already stored: save drops it and
 * rebuilds; no double apply, no gap, no side effect twice. */
static void test_context_rerecord_same_stored_is_noop(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    counter_event add = counter_add(10);
    record_ok(c, add);
    save_ok(store, c);
    assert_int_equal(fixture_side_effect_count(store, &id), 3);

    /* the same context (v1, nothing uncommitted) records it again: the
     * context applies it (it cannot know), save finds it stored */
    record_ok(c, add);
    counter_event more = counter_add(5);
    record_ok(c, more);
    save_ok(store, c);
    assert_int_equal(counter_version(c), 2);
    assert_int_equal(counter_state(c)->result, 15);
    assert_int_equal(counter_state(c)->operations_count, 2);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 0);
    assert_int_equal(es_context_side_effect_count(raw(c)), 0);

    /* a loaded context does the same */
    counter_context *l = load_ok(store, &id);
    assert_int_equal(counter_version(l), 2);
    record_ok(l, add);
    record_ok(l, more);
    counter_event last = counter_add(100);
    record_ok(l, last);
    save_ok(store, l);
    assert_int_equal(counter_version(l), 3);
    assert_int_equal(counter_state(l)->result, 115);
    counter_context_free(l);

    /* the context that saved before goes on from the right version */
    counter_context_free(c);
    c = load_ok(store, &id);
    assert_int_equal(counter_version(c), 3);
    assert_int_equal(counter_state(c)->result, 115);
    assert_int_equal(counter_state(c)->operations_count, 3);
    record_ok(c, counter_add(1));
    save_ok(store, c);
    counter_context_free(c);

    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(store, &id, &s, NULL), 0);
    assert_int_equal(s.count, 5);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);

    /* the snapshot agrees with a replay */
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot(txn, &id, 1, &snap, NULL), 0);
    assert_int_equal(snap->version, 4);
    counter from_snap;
    memset(&from_snap, 0, sizeof from_snap);
    assert_int_equal(counter_type.state_decode(snap->data, snap->len,
                                               &from_snap, NULL), 0);
    assert_int_equal(from_snap.result, 116);
    assert_int_equal(from_snap.operations_count, 4);
    es_free(snap);
    /* side effects: Reset 2, one per Add (4), none twice */
    es_side_effect_list *list = NULL;
    assert_int_equal(es_txn_list_side_effects(txn, &id, &list, NULL), 0);
    assert_int_equal(list->count, 6);
    assert_true(fixture_side_effect_ids_distinct(list));
    es_side_effect_list_free(list);
    es_txn_rollback(txn);
}

/* (2) same id, other content: ES_EIDEMPOTENCY with both events */
static void test_context_same_id_other_content_is_idempotency_error(
    void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    counter_event first = counter_add(10);
    record_ok(c, first);

    /* while uncommitted: at record */
    counter_event second = first;
    second.value = 20;
    es_error err = {0};
    assert_int_equal(counter_record(c, &second, &err), ES_EIDEMPOTENCY);
    assert_true(es_uuid_equal(&err.event_id, &first.event_id));
    const es_event *saved = NULL, *attempted = NULL;
    assert_int_equal(es_context_idempotency_clash(raw(c), &saved, &attempted),
                     0);
    counter_event x, y;
    assert_int_equal(counter_event_decode(saved, &x, NULL), 0);
    assert_int_equal(counter_event_decode(attempted, &y, NULL), 0);
    assert_int_equal(x.value, 10);
    assert_int_equal(y.value, 20);
    assert_int_equal(counter_version(c), 1);
    assert_int_equal(counter_state(c)->result, 10);

    save_ok(store, c);
    assert_int_equal(es_context_idempotency_clash(raw(c), NULL, NULL),
                     ES_ENOTFOUND);

    /* once stored: at save */
    record_ok(c, second);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    es_error_clear(&err);
    assert_int_equal(counter_save(txn, c, &err), ES_EIDEMPOTENCY);
    assert_true(es_uuid_equal(&err.event_id, &first.event_id));
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_int_equal(es_context_idempotency_clash(raw(c), &saved, &attempted),
                     0);
    assert_int_equal(counter_event_decode(saved, &x, NULL), 0);
    assert_int_equal(counter_event_decode(attempted, &y, NULL), 0);
    assert_int_equal(x.value, 10); /* the saved one first */
    assert_int_equal(y.value, 20);
    assert_int_equal(saved->version, 1);
    assert_int_equal(es_txn_commit(txn, NULL), 0);
    counter_context_free(c);

    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(store, &id, &s, NULL), 0);
    assert_int_equal(s.count, 2);
    fixture_stream_free(&s);
}

/* (3) a stale version: ES_ECONFLICT with the aggregate id and version */
static void test_context_stale_version_is_conflict(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    save_ok(store, c);
    counter_context *stale = NULL;
    assert_int_equal(counter_clone(c, &stale, NULL), 0);
    record_ok(c, counter_add(1));
    save_ok(store, c);

    record_ok(stale, counter_add(2));
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, raw(stale), &err),
                     ES_ECONFLICT);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_int_equal(err.version, 1);
    assert_int_equal(err.code, ES_ECONFLICT);
    counter_context_free(stale);
    counter_context_free(c);

    c = load_ok(store, &id);
    assert_int_equal(counter_state(c)->result, 1);
    counter_context_free(c);
}

/* A creation event for an aggregate that exists is a conflict at 0. */
static void test_context_second_creation_is_conflict(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    save_ok(store, c);
    counter_context_free(c);
    counter_event again = counter_reset(&id);
    assert_int_equal(counter_record_new(&id, &again, &c, NULL), 0);
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, raw(c), &err), ES_ECONFLICT);
    assert_int_equal(err.version, 0);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    counter_context_free(c);
}

/* (4) a failed save leaves the transaction as it was and the context
 * with its uncommitted events and side effects; a retry works. */
static void test_context_failed_save_leaves_txn_and_context(void **state)
{
    es_store *store = *state;
    es_uuid id, other_id;
    counter_context *c = start(&id);
    record_ok(c, counter_add(1));
    save_ok(store, c); /* v1 */
    counter_context *stale = NULL;
    assert_int_equal(counter_clone(c, &stale, NULL), 0);
    record_ok(c, counter_add(10));
    save_ok(store, c); /* v2 by someone else */
    size_t events_before = es_memory_store_event_count(store);
    size_t effects_before = fixture_side_effect_count(store, NULL);

    /* stale records v2 (taken) and v3 (free): v3 must not stay */
    counter_event a = counter_add(100), b = counter_subtract(7);
    record_ok(stale, a);
    record_ok(stale, b);

    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    counter_context *other = start(&other_id); /* saved in the same txn */
    assert_int_equal(counter_save(txn, other, &err), 0);
    assert_int_equal(counter_save(txn, stale, &err), ES_ECONFLICT);
    /* the context kept everything */
    assert_int_equal(es_context_uncommitted_count(raw(stale)), 2);
    assert_int_equal(es_context_side_effect_count(raw(stale)), 2);
    assert_int_equal(counter_version(stale), 3);
    assert_int_equal(counter_state(stale)->result, 94);
    /* the transaction: other's writes only */
    fixture_stream s;
    assert_int_equal(fixture_stream_read(txn, &id, &s, NULL), 0);
    assert_int_equal(s.count, 3);
    fixture_stream_free(&s);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot(txn, &id, 1, &snap, NULL), 0);
    assert_int_equal(snap->version, 2);
    es_free(snap);
    assert_int_equal(es_txn_commit(txn, &err), 0);

    assert_int_equal(es_memory_store_event_count(store), events_before + 1);
    assert_int_equal(fixture_side_effect_count(store, NULL),
                     effects_before + 2);
    assert_int_equal(fixture_side_effect_count(store, &id), 4);
    counter_context_free(other);
    counter_context_free(c);

    /* retry in a new transaction after reload: the same events on top */
    counter_context *fresh = load_ok(store, &id);
    for (size_t i = 0; i < es_context_uncommitted_count(raw(stale)); i++) {
        counter_event e;
        assert_int_equal(counter_event_decode(
                             es_context_uncommitted(raw(stale), i), &e, NULL),
                         0);
        record_ok(fresh, e);
    }
    counter_context_free(stale);
    save_ok(store, fresh);
    assert_int_equal(counter_version(fresh), 4);
    assert_int_equal(counter_state(fresh)->result, 11 + 100 - 7);
    counter_context_free(fresh);
    assert_int_equal(fixture_side_effect_count(store, &id), 6);
    assert_int_equal(fixture_stream_read_store(store, &id, &s, NULL), 0);
    assert_int_equal(s.count, 5);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
}

/* (4) a clash behind a new event: the new event does not stay either. */
static void test_context_failed_save_on_clash_leaves_nothing(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    counter_event stored = counter_add(1);
    record_ok(c, stored);
    save_ok(store, c);
    counter_event fresh = counter_add(2), clash = stored;
    clash.value = 99;
    record_ok(c, fresh);
    record_ok(c, clash);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(counter_save(txn, c, &err), ES_EIDEMPOTENCY);
    assert_int_equal(es_context_uncommitted_count(raw(c)), 2);
    assert_int_equal(es_context_side_effect_count(raw(c)), 2);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(store, &id, &s, NULL), 0);
    assert_int_equal(s.count, 2);
    fixture_stream_free(&s);
    assert_int_equal(fixture_side_effect_count(store, &id), 3);
    es_txn *r = NULL;
    assert_int_equal(es_store_begin(store, &r, NULL), 0);
    es_event *ev = NULL;
    assert_int_equal(es_txn_get_event(r, &id, &fresh.event_id, &ev, NULL),
                     ES_ENOTFOUND);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot(r, &id, 1, &snap, NULL), 0);
    assert_int_equal(snap->version, 1);
    es_free(snap);
    es_txn_rollback(r);
    counter_context_free(c);
}

/* (4) with a codec that fails after the events went in: nothing stays. */
static int failing_state_encode(const void *state, es_buf *out, es_error *err)
{
    (void)state;
    (void)out;
    snprintf(err->message, sizeof err->message, "snapshot codec broken");
    return ES_EINVAL;
}

static void test_context_failed_snapshot_encode_rolls_back_save(void **state)
{
    es_store *store = *state;
    es_aggregate_type broken = counter_type;
    broken.state_encode = failing_state_encode;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id), add = counter_add(4);
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&broken, &id, &reset, &c, &err),
                     0);
    assert_int_equal(es_context_record(c, &add, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(es_context_save(txn, c, &err), ES_EINVAL);
    assert_non_null(strstr(err.message, "snapshot codec broken"));
    assert_int_equal(es_context_uncommitted_count(c), 2);
    assert_int_equal(es_context_side_effect_count(c), 3);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(es_memory_store_event_count(store), 0);
    assert_int_equal(fixture_side_effect_count(store, NULL), 0);
    counter_context *l = NULL;
    assert_int_equal(counter_store_load(store, &id, &l, &err), ES_ENOTFOUND);

    /* the same events with a working codec go in */
    es_context *good = NULL;
    assert_int_equal(es_context_record_new(&counter_type, &id, &reset, &good,
                                           &err), 0);
    assert_int_equal(es_context_record(good, &add, &err), 0);
    assert_int_equal(fixture_save_commit(store, good, &err), 0);
    es_context_free(good);
    es_context_free(c);
    l = load_ok(store, &id);
    assert_int_equal(counter_state(l)->result, 4);
    counter_context_free(l);
}

/* (5) an apply that fails leaves the state as it was, even when the
 * callback changed the state before failing. */
static int scribbling_apply(void *state, const void *event, es_error *err)
{
    counter *s = state;
    const counter_event *e = event;
    s->result = -999;
    s->operations_count = 999;
    if (e->kind == COUNTER_MULTIPLY && e->value == 0) {
        snprintf(err->message, sizeof err->message, "DivisionByZero");
        return ES_EAPPLY;
    }
    return counter_type.apply(state, event, err);
}

static void test_context_failed_apply_leaves_state(void **state)
{
    (void)state;
    es_aggregate_type t = counter_type;
    t.apply = scribbling_apply;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id), mul = counter_multiply(0);
    es_context *c = NULL;
    assert_int_equal(es_context_record_new(&t, &id, &reset, &c, NULL), 0);
    const counter *s = es_context_state(c);
    assert_int_equal(s->result, 0);
    es_error err = {0};
    assert_int_equal(es_context_record(c, &mul, &err), ES_EAPPLY);
    s = es_context_state(c);
    assert_int_equal(s->result, 0);
    assert_int_equal(s->operations_count, 0);
    assert_int_equal(es_context_version(c), 0);
    assert_int_equal(es_context_uncommitted_count(c), 1);
    assert_int_equal(es_context_side_effect_count(c), 2);
    es_context_free(c);

    /* a state that owns memory (account): the copy is deep */
    es_uuid acc = fixture_new_id();
    account_event open;
    assert_int_equal(account_open(&open, &acc, "a@example.com", 5), 0);
    account_context *a = NULL;
    assert_int_equal(account_record_new(&acc, &open, &a, NULL), 0);
    const char *email = account_state(a)->email;
    account_event reopen;
    assert_int_equal(account_open(&reopen, &acc, "b@example.com", 7), 0);
    assert_int_equal(account_record(a, &reopen, &err), ES_EAPPLY);
    account_event_free(&reopen);
    assert_string_equal(account_state(a)->email, "a@example.com");
    assert_ptr_equal(account_state(a)->email, email);
    assert_int_equal(account_state(a)->balance, 5);
    account_event_free(&open);
    account_context_free(a);
}

/* (2) also when the clash shows up only while save rebuilds the context:
 * a hook in apply commits the clashing event from another transaction at
 * that moment.  The clash must still be shown through the caller's
 * context. */
static struct {
    es_store *store;
    es_uuid aggregate_id;
    counter_event event;
    bool armed;
    int rc;
} hook;

static int hooked_apply(void *state, const void *event, es_error *err)
{
    if (hook.armed) {
        hook.armed = false;
        counter_context *c = NULL;
        hook.rc = counter_store_load(hook.store, &hook.aggregate_id, &c,
                                     NULL);
        if (hook.rc == 0) hook.rc = counter_record(c, &hook.event, NULL);
        if (hook.rc == 0)
            hook.rc = fixture_save_commit(hook.store, raw(c), NULL);
        counter_context_free(c);
    }
    return counter_type.apply(state, event, err);
}

static void test_context_clash_found_while_rebuilding_is_reported(
    void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = start(&id);
    counter_event a = counter_add(1);
    record_ok(c, a);
    save_ok(store, c);
    counter_context_free(c);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    assert_int_equal(es_txn_delete_snapshots(txn, &id, NULL), 0);
    assert_int_equal(es_txn_commit(txn, NULL), 0);

    es_aggregate_type hooked = counter_type;
    hooked.apply = hooked_apply;
    es_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(es_store_load(store, &hooked, &id, &ctx, &err), 0);
    counter_event b = counter_add(2), other_b = b;
    other_b.value = 3;
    assert_int_equal(es_context_record(ctx, &a, &err), 0); /* stored: dup */
    assert_int_equal(es_context_record(ctx, &b, &err), 0);

    hook.store = store;
    hook.aggregate_id = id;
    hook.event = other_b;
    hook.armed = true;
    hook.rc = -1;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    assert_int_equal(es_context_save(txn, ctx, &err), ES_EIDEMPOTENCY);
    es_txn_rollback(txn);
    assert_int_equal(hook.rc, 0); /* the hook did commit other_b */
    const es_event *saved = NULL, *attempted = NULL;
    assert_int_equal(es_context_idempotency_clash(ctx, &saved, &attempted),
                     0);
    counter_event x, y;
    assert_int_equal(counter_event_decode(saved, &x, NULL), 0);
    assert_int_equal(counter_event_decode(attempted, &y, NULL), 0);
    assert_int_equal(x.value, 3);
    assert_int_equal(y.value, 2);
    assert_true(es_uuid_equal(&err.event_id, &b.event_id));
    /* the context kept its events */
    assert_int_equal(es_context_uncommitted_count(ctx), 2);
    es_context_free(ctx);
}

/* ==== bad input ==== */

static void test_context_bad_input_null_arguments(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id(), nil = {{0}};
    counter_event reset = counter_reset(&id);
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(NULL, &id, &reset, &c, &err),
                     ES_EINVAL);
    assert_int_equal(es_context_record_new(&counter_type, NULL, &reset, &c,
                                           &err), ES_EINVAL);
    assert_int_equal(es_context_record_new(&counter_type, &id, NULL, &c,
                                           &err), ES_EINVAL);
    assert_int_equal(es_context_record_new(&counter_type, &id, &reset, NULL,
                                           &err), ES_EINVAL);
    assert_int_equal(es_context_record_new(&counter_type, &nil, &reset, &c,
                                           &err), ES_EINVAL);
    assert_null(c);
    /* err NULL is fine */
    assert_int_equal(es_context_record_new(NULL, &id, &reset, &c, NULL),
                     ES_EINVAL);

    assert_int_equal(es_context_record(NULL, &reset, &err), ES_EINVAL);
    assert_int_equal(es_context_record_new(&counter_type, &id, &reset, &c,
                                           &err), 0);
    assert_int_equal(es_context_record(c, NULL, &err), ES_EINVAL);

    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(es_context_save(NULL, c, &err), ES_EINVAL);
    assert_int_equal(es_context_save(txn, NULL, &err), ES_EINVAL);
    es_context *l = NULL;
    assert_int_equal(es_context_load(NULL, &counter_type, &id, &l, &err),
                     ES_EINVAL);
    assert_int_equal(es_context_load(txn, NULL, &id, &l, &err), ES_EINVAL);
    assert_int_equal(es_context_load(txn, &counter_type, NULL, &l, &err),
                     ES_EINVAL);
    assert_int_equal(es_context_load(txn, &counter_type, &id, NULL, &err),
                     ES_EINVAL);
    int rc = es_context_load(txn, &counter_type, &nil, &l, &err);
    assert_true(rc == ES_ENOTFOUND || rc == ES_EINVAL);
    assert_null(l);
    es_side_effect_list *list = NULL;
    assert_int_equal(es_context_regenerate_side_effects(NULL, &counter_type,
                                                        &id, &id, &list,
                                                        &err), ES_EINVAL);
    assert_int_equal(es_context_regenerate_side_effects(txn, NULL, &id, &id,
                                                        &list, &err),
                     ES_EINVAL);
    assert_int_equal(es_context_regenerate_side_effects(txn, &counter_type,
                                                        NULL, &id, &list,
                                                        &err), ES_EINVAL);
    assert_int_equal(es_context_regenerate_side_effects(txn, &counter_type,
                                                        &id, NULL, &list,
                                                        &err), ES_EINVAL);
    assert_int_equal(es_context_regenerate_side_effects(txn, &counter_type,
                                                        &id, &id, NULL,
                                                        &err), ES_EINVAL);
    es_txn_rollback(txn);
    assert_int_equal(es_store_load(NULL, &counter_type, &id, &l, &err),
                     ES_EINVAL);

    es_context *copy = NULL;
    assert_int_equal(es_context_clone(NULL, &copy, &err), ES_EINVAL);
    assert_int_equal(es_context_clone(c, NULL, &err), ES_EINVAL);

    /* accessors accept NULL */
    assert_int_equal(es_context_version(NULL), 0);
    assert_null(es_context_state(NULL));
    assert_null(es_context_type(NULL));
    assert_null(es_context_aggregate_id(NULL));
    assert_int_equal(es_context_snapshot_version(NULL), 0);
    assert_int_equal(es_context_uncommitted_count(NULL), 0);
    assert_null(es_context_uncommitted(NULL, 0));
    assert_int_equal(es_context_side_effect_count(NULL), 0);
    assert_null(es_context_side_effect(NULL, 0));
    assert_int_equal(es_context_idempotency_clash(NULL, NULL, NULL),
                     ES_ENOTFOUND);
    assert_int_equal(es_context_idempotency_clash(c, NULL, NULL),
                     ES_ENOTFOUND);
    es_context_free(NULL);
    es_context_free(c);
}

static void test_context_bad_input_nil_event_id(void **state)
{
    (void)state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    reset.event_id = (es_uuid){{0}};
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&counter_type, &id, &reset, &c,
                                           &err), ES_EINVAL);
    assert_null(c);
    counter_context *cc = start(&id);
    counter_event add = counter_add(1);
    add.event_id = (es_uuid){{0}};
    assert_int_equal(counter_record(cc, &add, &err), ES_EINVAL);
    assert_int_equal(counter_version(cc), 0);
    counter_context_free(cc);
}

/* A side effect with a nil id is refused, and the record fails whole. */
static int nil_side_effects(const void *state, const void *event,
                            es_side_effect_sink *sink, es_error *err)
{
    (void)state;
    (void)event;
    (void)err;
    counter_side_effect se;
    memset(&se, 0, sizeof se);
    se.kind = COUNTER_LOG_OPERATION;
    return es_side_effect_emit(sink, &se);
}

static void test_context_bad_input_nil_side_effect_id(void **state)
{
    (void)state;
    es_aggregate_type t = counter_type;
    t.side_effects = nil_side_effects;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&t, &id, &reset, &c, &err),
                     ES_EINVAL);
    assert_null(c);
    assert_int_equal(es_side_effect_emit(NULL, &reset), ES_EINVAL);
}

static void test_context_bad_input_type_descriptions(void **state)
{
    (void)state;
    es_error err = {0};
    assert_int_equal(es_aggregate_type_check(NULL, &err), ES_EINVAL);
    es_aggregate_type t = counter_type;
    t.name = NULL;
    assert_int_equal(es_aggregate_type_check(&t, &err), ES_EINVAL);
    t.name = "";
    assert_int_equal(es_aggregate_type_check(&t, &err), ES_EINVAL);
    char long_name[80];
    memset(long_name, 'x', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    t.name = long_name;
    assert_int_equal(es_aggregate_type_check(&t, &err), ES_EINVAL);
    t = counter_type;
    t.apply = NULL;
    assert_int_equal(es_aggregate_type_check(&t, &err), ES_EINVAL);
    t = counter_type;
    t.event_size = 0;
    assert_int_equal(es_aggregate_type_check(&t, &err), ES_EINVAL);
    t = counter_type;
    t.side_effect_encode = NULL;
    assert_int_equal(es_aggregate_type_check(&t, &err), ES_EINVAL);
    assert_non_null(strstr(err.message, "side_effects"));

    /* a bad type is refused by every entry point, never called */
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    es_context *c = NULL;
    assert_int_equal(es_context_record_new(&t, &id, &reset, &c, &err),
                     ES_EINVAL);
    es_aggregate_type empty;
    memset(&empty, 0, sizeof empty);
    es_event ev = {reset.event_id, 0, COUNTER_RESET, NULL, 0};
    counter_event out;
    assert_int_equal(es_event_decode(&empty, &ev, &out, &err), ES_EINVAL);
    counter_side_effect se_out;
    es_side_effect se;
    memset(&se, 0, sizeof se);
    assert_int_equal(es_side_effect_decode(&empty, &se, &se_out, &err),
                     ES_EINVAL);
    es_event_value_free(&empty, &out);
    es_side_effect_value_free(&empty, &se_out);
    es_event_value_free(NULL, NULL);
    es_side_effect_value_free(NULL, NULL);
}

/* The codecs refuse bad bytes with ES_EDECODE and never read past them. */
static void test_context_bad_input_decode_rejects_bad_bytes(void **state)
{
    (void)state;
    counter_context *c = start(NULL);
    record_ok(c, counter_add(3));
    const es_event *good = es_context_uncommitted(raw(c), 1);
    counter_event out;
    es_error err = {0};

    es_event ev = *good;
    ev.kind = 99; /* unknown kind */
    assert_int_equal(counter_event_decode(&ev, &out, &err), ES_EDECODE);
    assert_non_null(strstr(err.message, "99"));
    ev.kind = -1;
    assert_int_equal(counter_event_decode(&ev, &out, &err), ES_EDECODE);
    for (size_t len = 0; len < good->len; len++) { /* every short length */
        ev = *good;
        ev.len = len;
        assert_int_equal(counter_event_decode(&ev, &out, &err), ES_EDECODE);
    }
    uint8_t longer[64] = {0};
    memcpy(longer, good->data, good->len);
    ev = *good;
    ev.data = longer;
    ev.len = good->len + 1;
    assert_int_equal(counter_event_decode(&ev, &out, &err), ES_EDECODE);
    ev.kind = COUNTER_RESET; /* an Add's bytes as a Reset */
    ev.len = good->len;
    assert_int_equal(counter_event_decode(&ev, &out, &err), ES_EDECODE);
    ev.data = NULL;
    ev.len = 0;
    assert_int_equal(counter_event_decode(&ev, &out, &err), ES_EDECODE);

    /* side effects and snapshots too */
    const es_side_effect *se = es_context_side_effect(raw(c), 0);
    counter_side_effect se_out;
    es_side_effect bad = *se;
    bad.kind = 42;
    assert_int_equal(counter_side_effect_decode(&bad, &se_out, &err),
                     ES_EDECODE);
    for (size_t len = 0; len < se->len; len++) {
        bad = *se;
        bad.len = len;
        assert_int_equal(counter_side_effect_decode(&bad, &se_out, &err),
                         ES_EDECODE);
    }
    counter st;
    uint8_t junk[5] = {1, 2, 3, 4, 5};
    assert_int_equal(counter_type.state_decode(junk, sizeof junk, &st, NULL),
                     ES_EDECODE);

    /* account: strings with lengths that lie */
    es_uuid acc = fixture_new_id();
    account_event open;
    assert_int_equal(account_open(&open, &acc, "x@example.com", 1), 0);
    account_context *a = NULL;
    assert_int_equal(account_record_new(&acc, &open, &a, NULL), 0);
    const es_event *aev = es_context_uncommitted(account_context_raw(a), 0);
    uint8_t copy[128];
    assert_true(aev->len <= sizeof copy);
    memcpy(copy, aev->data, aev->len);
    copy[32] = 0xff; /* the email length's low byte */
    es_event lie = *aev;
    lie.data = copy;
    account_event aout;
    assert_int_equal(account_event_decode(&lie, &aout, &err), ES_EDECODE);
    for (size_t len = 0; len < aev->len; len++) {
        lie = *aev;
        lie.len = len;
        assert_int_equal(account_event_decode(&lie, &aout, &err), ES_EDECODE);
    }
    lie = *aev;
    assert_int_equal(account_event_decode(&lie, &aout, &err), 0);
    assert_string_equal(aout.email, "x@example.com");
    account_event_free(&aout);
    account_event_free(&open);
    account_context_free(a);
    counter_context_free(c);
}

/* Random and mutated bytes through every decoder of the fixtures: a
 * status, never a crash or a leak (asan). */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void decode_everything(const es_aggregate_type *t, int32_t kind,
                              const uint8_t *data, size_t len)
{
    union {
        counter_event c;
        account_event a;
        order_event o;
        counter_side_effect cs;
        account_side_effect as;
        order_side_effect os;
        counter cst;
        account ast;
        order ost;
    } v;
    es_event ev = {{{1}}, 0, kind, data, len};
    int rc = es_event_decode(t, &ev, &v, NULL);
    assert_true(rc == 0 || rc == ES_EDECODE);
    if (rc == 0) es_event_value_free(t, &v);
    es_side_effect se;
    memset(&se, 0, sizeof se);
    se.kind = kind;
    se.data = data;
    se.len = len;
    rc = es_side_effect_decode(t, &se, &v, NULL);
    assert_true(rc == 0 || rc == ES_EDECODE);
    if (rc == 0) es_side_effect_value_free(t, &v);
    memset(&v, 0, sizeof v);
    rc = t->state_decode(data, len, &v, NULL);
    assert_true(rc == 0 || rc == ES_EDECODE);
    if (t->state_free) t->state_free(&v); /* also after a failure */
}

static void test_context_bad_input_random_bytes(void **state)
{
    (void)state;
    const es_aggregate_type *types[] = {&counter_type, &account_type,
                                        &order_type};
    uint8_t buf[128];
    for (int i = 0; i < 30000; i++) {
        size_t len = rng() % sizeof buf;
        for (size_t k = 0; k < len; k++) buf[k] = (uint8_t)rng();
        int32_t kind = (int32_t)(rng() % 9) - 2;
        decode_everything(types[i % 3], kind, buf, len);
    }

    /* valid encodings, truncated and with bytes flipped */
    es_uuid id = fixture_new_id();
    account_event open;
    assert_int_equal(account_open(&open, &id, "m@example.com", 3), 0);
    account_context *a = NULL;
    assert_int_equal(account_record_new(&id, &open, &a, NULL), 0);
    account_event_free(&open);
    account_event add = account_add(4);
    assert_int_equal(account_record(a, &add, NULL), 0);
    es_context *ctx = account_context_raw(a);
    for (int i = 0; i < 20000; i++) {
        const es_event *e = es_context_uncommitted(ctx, (size_t)i % 2);
        const es_side_effect *se = es_context_side_effect(ctx, (size_t)i % 2);
        const uint8_t *src = i % 4 < 2 ? e->data : se->data;
        size_t len = i % 4 < 2 ? e->len : se->len;
        int32_t kind = i % 4 < 2 ? e->kind : se->kind;
        memcpy(buf, src, len);
        size_t cut = len - rng() % (len + 1);
        for (int f = 0; f < 3; f++)
            if (cut > 0) buf[rng() % cut] ^= (uint8_t)(1u << (rng() % 8));
        decode_everything(&account_type, kind, buf, cut);
    }
    account_context_free(a);
}

/* An event codec that fails: an error, and the context is unchanged. */
static int failing_event_encode(const void *event, es_buf *out, es_error *err)
{
    const counter_event *e = event;
    if (e->kind == COUNTER_SUBTRACT) {
        es_buf_append(out, "partial", 7); /* the library must free this */
        snprintf(err->message, sizeof err->message, "codec broken");
        return ES_EIO;
    }
    return counter_type.event_encode(event, out, err);
}

static int failing_side_effects(const void *state, const void *event,
                                es_side_effect_sink *sink, es_error *err)
{
    const counter_event *e = event;
    int rc = counter_type.side_effects(state, event, sink, err);
    if (rc == 0 && e->kind == COUNTER_ADD && e->value == 13) {
        snprintf(err->message, sizeof err->message, "unlucky");
        return ES_EINVAL;
    }
    return rc;
}

static void test_context_bad_input_failing_codec(void **state)
{
    (void)state;
    es_aggregate_type t = counter_type;
    t.event_encode = failing_event_encode;
    t.side_effects = failing_side_effects;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id), add = counter_add(2),
                  sub = counter_subtract(1), unlucky = counter_add(13);
    es_context *c = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&t, &id, &reset, &c, &err), 0);
    assert_int_equal(es_context_record(c, &add, &err), 0);
    assert_int_equal(es_context_record(c, &sub, &err), ES_EIO);
    assert_non_null(strstr(err.message, "codec broken"));
    assert_int_equal(es_context_version(c), 1);
    assert_int_equal(((const counter *)es_context_state(c))->result, 2);
    assert_int_equal(es_context_uncommitted_count(c), 2);
    assert_int_equal(es_context_side_effect_count(c), 3);
    /* side_effects failing after emitting: nothing of it stays */
    assert_int_equal(es_context_record(c, &unlucky, &err), ES_EINVAL);
    assert_non_null(strstr(err.message, "unlucky"));
    assert_int_equal(es_context_version(c), 1);
    assert_int_equal(((const counter *)es_context_state(c))->result, 2);
    assert_int_equal(es_context_uncommitted_count(c), 2);
    assert_int_equal(es_context_side_effect_count(c), 3);
    /* an event kind the codec does not know */
    counter_event odd = counter_add(1);
    odd.kind = (counter_event_kind)77;
    assert_int_equal(es_context_record(c, &odd, &err), ES_EINVAL);
    assert_int_equal(es_context_version(c), 1);
    es_context_free(c);

    /* failing on the creation event: nothing is returned */
    counter_event first = counter_subtract(1);
    c = NULL;
    assert_int_equal(es_context_record_new(&t, &id, &first, &c, &err),
                     ES_EIO);
    assert_null(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(test_context_aggregate_creation),
        T(test_context_aggregate_creation_with_invalid_event),
        T(test_context_aggregate_apply_events),
        T(test_context_aggregate_apply_error),
        T(test_context_side_effects_generation),
        T(test_context_aggregate_id),
        T(test_context_snapshot_version),
        T(test_context_record_new),
        T(test_context_record_that),
        T(test_context_record_that_error),
        T(test_context_version_tracking),
        T(test_context_uncommitted_events),
        T(test_context_side_effects),
        T(test_context_state_access),
        T(test_context_rehydrate_from),
        T(test_context_apply_rehydrated_event),
        T(test_context_apply_rehydrated_event_error),
        T(test_context_rehydrate_from_error),
        T(test_context_record_new_with_side_effects),
        T(test_context_record_new_no_side_effects),
        T(test_context_event_store_event_creation),
        T(test_context_event_store_event_fields),
        T(test_context_event_store_event_equality),
        T(test_context_event_store_event_accessor_methods),
        T(test_context_domain_event_id_access),
        T(test_context_domain_event_equality),
        T(test_context_domain_event_clone),
        T(test_context_event_store_event_id_reference),
        T(test_context_rerecord_same_uncommitted_is_noop),
        T(test_context_rerecord_same_stored_is_noop),
        T(test_context_same_id_other_content_is_idempotency_error),
        T(test_context_clash_found_while_rebuilding_is_reported),
        T(test_context_stale_version_is_conflict),
        T(test_context_second_creation_is_conflict),
        T(test_context_failed_save_leaves_txn_and_context),
        T(test_context_failed_save_on_clash_leaves_nothing),
        T(test_context_failed_snapshot_encode_rolls_back_save),
        T(test_context_failed_apply_leaves_state),
        T(test_context_bad_input_null_arguments),
        T(test_context_bad_input_nil_event_id),
        T(test_context_bad_input_nil_side_effect_id),
        T(test_context_bad_input_type_descriptions),
        T(test_context_bad_input_decode_rejects_bad_bytes),
        T(test_context_bad_input_random_bytes),
        T(test_context_bad_input_failing_codec),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
