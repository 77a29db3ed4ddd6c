/*
 * The outbox dispatcher's tests, on any store (outbox.h): delivery,
 * retries with backoff, dead letters, requeue, poison messages, order per
 * aggregate, several dispatchers, expired claims, wake-up and polling.
 * test_outbox.c runs them on the in-memory store, test_pg_outbox.c on
 * PostgreSQL, so the same semantics are checked on both stores.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "eventastic.h"
#include "suites/outbox.h"
#include "store/store_impl.h"

/* The stores the tests run on (outbox_suite_run). */
static int (*suite_open)(es_store **out);
static int (*suite_close)(es_store *store);


static es_uuid ev_id(const void *e) { return ((const job_event *)e)->id; }
static int32_t ev_kind(const void *e) { return ((const job_event *)e)->kind; }
static int apply_new(void *s, const void *e, es_error *err)
{
    (void)err;
    ((job *)s)->count = 1;
    return ((const job_event *)e)->kind == JOB_CREATED ? 0 : ES_EAPPLY;
}
static int apply(void *s, const void *e, es_error *err)
{
    (void)err;
    ((job *)s)->count++;
    return ((const job_event *)e)->kind == JOB_STEP ? 0 : ES_EAPPLY;
}
static int effects(const void *s, const void *e, es_side_effect_sink *sink,
                   es_error *err)
{
    (void)s;
    (void)err;
    const job_event *ev = e;
    job_effect fx;
    fx.id = ev->id;
    fx.id.bytes[15] ^= 0xff;
    memcpy(fx.text, ev->text, sizeof fx.text);
    return es_side_effect_emit(sink, &fx);
}
static int st_enc(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    return es_buf_append(out, s, sizeof(job));
}
static int st_dec(const uint8_t *p, size_t n, void *s, es_error *err)
{
    (void)err;
    if (n != sizeof(job)) return ES_EDECODE;
    memcpy(s, p, n);
    return 0;
}
static int ev_enc(const void *e, es_buf *out, es_error *err)
{
    (void)err;
    return es_buf_append(out, e, sizeof(job_event));
}
static int ev_dec(int32_t k, const uint8_t *p, size_t n, void *e,
                  es_error *err)
{
    (void)k;
    (void)err;
    if (n != sizeof(job_event)) return ES_EDECODE;
    memcpy(e, p, n);
    return 0;
}
static es_uuid fx_id(const void *f) { return ((const job_effect *)f)->id; }
static int32_t fx_kind(const void *f)
{
    (void)f;
    return 7;
}
static int fx_enc(const void *f, es_buf *out, es_error *err)
{
    (void)err;
    return es_buf_append(out, f, sizeof(job_effect));
}
static int fx_dec(int32_t k, const uint8_t *p, size_t n, void *f,
                  es_error *err)
{
    (void)k;
    if (n != sizeof(job_effect)) return ES_EDECODE;
    memcpy(f, p, n);
    if (strcmp(((job_effect *)f)->text, "poison") == 0) {
        snprintf(err->message, sizeof err->message, "poison payload");
        return ES_EDECODE;
    }
    return 0;
}

const es_aggregate_type job_type = {
    .name = "job", .snapshot_version = 1,
    .state_size = sizeof(job), .event_size = sizeof(job_event),
    .side_effect_size = sizeof(job_effect),
    .event_id = ev_id, .event_kind = ev_kind,
    .apply_new = apply_new, .apply = apply, .side_effects = effects,
    .state_encode = st_enc, .state_decode = st_dec,
    .event_encode = ev_enc, .event_decode = ev_dec,
    .side_effect_id = fx_id, .side_effect_kind = fx_kind,
    .side_effect_encode = fx_enc, .side_effect_decode = fx_dec,
};

/* Another type, for which no handler is registered. */
static const es_aggregate_type other_type = {
    .name = "other", .snapshot_version = 1,
    .state_size = sizeof(job), .event_size = sizeof(job_event),
    .side_effect_size = sizeof(job_effect),
    .event_id = ev_id, .event_kind = ev_kind,
    .apply_new = apply_new, .apply = apply, .side_effects = effects,
    .state_encode = st_enc, .state_decode = st_dec,
    .event_encode = ev_enc, .event_decode = ev_dec,
    .side_effect_id = fx_id, .side_effect_kind = fx_kind,
    .side_effect_encode = fx_enc, .side_effect_decode = fx_dec,
};

/* Store an aggregate with n events (texts given), committed or not. */
void store_job(es_store *store, const es_aggregate_type *type,
                      const es_uuid *id, const char *const *texts, size_t n,
                      bool commit)
{
    es_context *ctx = NULL;
    for (size_t i = 0; i < n; i++) {
        job_event ev;
        memset(&ev, 0, sizeof ev);
        ev.kind = i == 0 ? JOB_CREATED : JOB_STEP;
        assert_int_equal(es_uuid_v7(&ev.id), 0);
        snprintf(ev.text, sizeof ev.text, "%s", texts[i]);
        if (i == 0)
            assert_int_equal(es_context_record_new(type, id, &ev, &ctx, NULL),
                             0);
        else
            assert_int_equal(es_context_record(ctx, &ev, NULL), 0);
    }
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    assert_int_equal(es_context_save(txn, ctx, NULL), 0);
    if (commit)
        assert_int_equal(es_txn_commit(txn, NULL), 0);
    else
        es_txn_rollback(txn);
    es_context_free(ctx);
}


void recorder_init(recorder *r)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->lock, NULL);
    r->verdict_override = -1;
}

static es_outbox_verdict record_as(recorder *r, int who,
                                   const es_outbox_entry *e,
                                   const void *value, es_error *reason)
{
    const job_effect *fx = value;
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n_busy; i++)
        if (es_uuid_equal(&r->busy[i], &e->side_effect.aggregate_id))
            r->max_in_flight_same_agg = 2;
    if (r->n_busy < 64) r->busy[r->n_busy++] = e->side_effect.aggregate_id;
    if (r->n < MAX_SEEN) {
        memcpy(r->text[r->n], fx->text, 32);
        r->agg[r->n] = e->side_effect.aggregate_id;
        r->attempts[r->n] = e->attempts;
        r->fx[r->n] = e->side_effect.id;
        r->who[r->n] = who;
        r->n++;
    }
    r->deliver_ms = es_clock_now_ms();
    if (r->ob != NULL) {
        /* The claimer waits for the whole batch before it claims again:
         * this is the number of the round that claimed e. */
        es_outbox_metrics m;
        es_outbox_metrics_get(r->ob, &m);
        r->deliver_round = m.rounds;
    }
    int override = r->verdict_override;
    bool retry = (int)e->attempts <= r->retry_first;
    pthread_mutex_unlock(&r->lock);
    usleep(200); /* widen the window in which an overlap would show */
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n_busy; i++)
        if (es_uuid_equal(&r->busy[i], &e->side_effect.aggregate_id)) {
            r->busy[i] = r->busy[--r->n_busy];
            break;
        }
    pthread_mutex_unlock(&r->lock);
    if (override >= 0) return (es_outbox_verdict)override;
    if (retry) {
        snprintf(reason->message, sizeof reason->message, "not yet (%u)",
                 e->attempts);
        return ES_OUTBOX_VERDICT_RETRY;
    }
    return ES_OUTBOX_VERDICT_DONE;
}

static es_outbox_verdict record_fx(void *ud, const es_outbox_entry *e,
                                   const void *value, es_error *reason)
{
    return record_as(ud, 0, e, value, reason);
}

/* A recorder shared by several dispatchers, with each one's number. */
typedef struct tagged {
    recorder *r;
    int who;
} tagged;

static es_outbox_verdict record_fx_tagged(void *ud, const es_outbox_entry *e,
                                          const void *value,
                                          es_error *reason)
{
    tagged *t = ud;
    return record_as(t->r, t->who, e, value, reason);
}

/* An injectable clock. */
typedef struct fake_clock { int64_t now; } fake_clock;
static int64_t fake_now(void *ud) { return ((fake_clock *)ud)->now; }

static es_outbox *manual_outbox(es_store *store, recorder *r, fake_clock *c,
                                uint32_t max_attempts)
{
    es_outbox_config *cfg = NULL;
    assert_int_equal(es_outbox_config_new(store, &cfg, NULL), 0);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type,
                                                  ES_OUTBOX_ANY_KIND,
                                                  record_fx, r, NULL), 0);
    assert_int_equal(es_outbox_config_set_clock(cfg, fake_now, c, NULL), 0);
    assert_int_equal(es_outbox_config_set_retry(cfg, max_attempts, 1000,
                                                60000, NULL), 0);
    es_outbox *ob = NULL;
    assert_int_equal(es_outbox_open(cfg, false, &ob, NULL), 0);
    es_outbox_config_free(cfg);
    return ob;
}

static void test_outbox_delivers_after_commit_not_after_rollback(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    fake_clock c = {es_clock_now_ms()};
    es_outbox *ob = manual_outbox(store, &r, &c, 5);
    es_uuid a, b;
    es_uuid_v7(&a);
    es_uuid_v7(&b);
    const char *one[] = {"committed"};
    const char *two[] = {"rolled back"};
    store_job(store, &job_type, &a, one, 1, true);
    store_job(store, &job_type, &b, two, 1, false);
    size_t n = 0;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 1);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.text[0], "committed");
    assert_int_equal(r.attempts[0], 1);
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 0); /* done messages are not delivered again */
    es_outbox_stats stats;
    assert_int_equal(es_outbox_stats_get(store, 0, &stats, NULL), 0);
    assert_int_equal(stats.pending, 0);
    assert_int_equal(stats.done, 1);
    es_outbox_metrics m;
    es_outbox_metrics_get(ob, &m);
    assert_int_equal(m.deliveries, 1);
    assert_int_equal(m.done, 1);
    es_outbox_close(ob);
    suite_close(store);
}

static void test_outbox_retry_backoff_then_dead_letter_then_requeue(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    r.retry_first = 100; /* always retry */
    fake_clock c = {1000000};
    es_outbox *ob = manual_outbox(store, &r, &c, 3);
    es_uuid a;
    es_uuid_v7(&a);
    const char *one[] = {"flaky"};
    store_job(store, &job_type, &a, one, 1, true);

    size_t n = 0;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 1);
    es_outbox_entry_list *list = NULL;
    assert_int_equal(es_outbox_list(store, ES_OUTBOX_PENDING, 0, &list, NULL),
                     0);
    assert_int_equal(list->count, 1);
    int64_t next = list->items[0].next_attempt_ms;
    /* First retry: full jitter within [now, now + base]. */
    assert_true(next >= c.now && next <= c.now + 1000);
    assert_int_equal(list->items[0].attempts, 1);
    assert_string_equal(list->items[0].last_error, "not yet (1)");
    es_uuid fx = list->items[0].side_effect.id;
    es_outbox_entry_list_free(list);

    /* Not due before its time. */
    c.now = next - 1;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    if (next > 1000000) assert_int_equal(n, 0);
    c.now = next;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 1);
    es_outbox_entry *e = NULL;
    assert_int_equal(es_outbox_show(store, &fx, &e, NULL), 0);
    /* Second retry: within [now, now + 2 * base]. */
    assert_true(e->next_attempt_ms >= c.now &&
                e->next_attempt_ms <= c.now + 2000);
    c.now = e->next_attempt_ms;
    es_free(e);
    /* Third attempt reaches the limit: a dead letter by itself. */
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 1);
    assert_int_equal(es_outbox_show(store, &fx, &e, NULL), 0);
    assert_int_equal(e->status, ES_OUTBOX_DEAD);
    assert_int_equal(e->attempts, 3);
    assert_non_null(strstr(e->last_error, "gave up after 3 attempts"));
    es_free(e);
    c.now += 10000000;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 0); /* dead letters are not delivered */

    /* Requeue by id: pending again, attempts reset, delivered. */
    r.retry_first = 0;
    size_t count = 0;
    assert_int_equal(es_outbox_requeue(store, &fx, NULL, 0, &count, NULL), 0);
    assert_int_equal(count, 1);
    c.now = es_clock_now_ms();
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 1);
    assert_int_equal(es_outbox_show(store, &fx, &e, NULL), 0);
    assert_int_equal(e->status, ES_OUTBOX_DONE);
    assert_int_equal(e->attempts, 1);
    es_free(e);
    assert_int_equal(r.n, 4);
    /* Requeueing what is not a dead letter is refused. */
    es_error err = {0};
    assert_int_equal(es_outbox_requeue(store, &fx, NULL, 0, &count, &err),
                     ES_ENOTFOUND);
    /* Purge removes done messages older than the given time. */
    assert_int_equal(es_outbox_purge_done(store, c.now - 1000000, &count,
                                          NULL), 0);
    assert_int_equal(count, 0);
    assert_int_equal(es_outbox_purge_done(store, INT64_MAX, &count, NULL), 0);
    assert_int_equal(count, 1);
    assert_int_equal(es_outbox_show(store, &fx, &e, NULL), ES_ENOTFOUND);
    es_outbox_close(ob);
    suite_close(store);
}

static void test_outbox_poison_message_never_blocks_others(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    fake_clock c = {es_clock_now_ms()};
    es_outbox *ob = manual_outbox(store, &r, &c, 5);
    es_uuid a, b, d;
    es_uuid_v7(&a);
    es_uuid_v7(&b);
    es_uuid_v7(&d);
    const char *good1[] = {"good 1"};
    const char *bad[] = {"poison", "after poison"};
    const char *good2[] = {"good 2"};
    store_job(store, &job_type, &a, good1, 1, true);
    store_job(store, &job_type, &b, bad, 2, true);
    store_job(store, &job_type, &d, good2, 1, true);
    size_t n = 0;
    for (int i = 0; i < 3; i++)
        assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(r.n, 3); /* good 1, good 2, after poison */
    es_outbox_entry_list *dead = NULL;
    assert_int_equal(es_outbox_list(store, ES_OUTBOX_DEAD, 0, &dead, NULL), 0);
    assert_int_equal(dead->count, 1);
    assert_non_null(strstr(dead->items[0].last_error, "poison payload"));
    es_outbox_entry_list_free(dead);
    bool after = false;
    for (size_t i = 0; i < r.n; i++)
        after = after || strcmp(r.text[i], "after poison") == 0;
    assert_true(after);
    es_outbox_close(ob);
    suite_close(store);
}

static void test_outbox_leaves_unhandled_types_alone(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    fake_clock c = {es_clock_now_ms()};
    es_outbox *ob = manual_outbox(store, &r, &c, 1);
    es_uuid a;
    es_uuid_v7(&a);
    const char *one[] = {"for nobody"};
    store_job(store, &other_type, &a, one, 1, true);
    size_t n = 9;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 0);
    es_outbox_stats stats;
    assert_int_equal(es_outbox_stats_get(store, 0, &stats, NULL), 0);
    assert_int_equal(stats.pending, 1); /* not failed, not dead */
    assert_int_equal(stats.dead, 0);
    es_outbox_close(ob);
    suite_close(store);
}

/* A dispatcher for two aggregate types (one named by two filters): each
 * round claims the head of every aggregate of both types, and each
 * aggregate's messages go in order. */
static void test_outbox_claims_every_handled_type_in_order(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    fake_clock c = {es_clock_now_ms()};
    es_outbox_config *cfg = NULL;
    assert_int_equal(es_outbox_config_new(store, &cfg, NULL), 0);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type, 7,
                                                  record_fx, &r, NULL), 0);
    assert_int_equal(es_outbox_config_add_handler(cfg, &other_type,
                                                  ES_OUTBOX_ANY_KIND,
                                                  record_fx, &r, NULL), 0);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type, 8,
                                                  record_fx, &r, NULL), 0);
    assert_int_equal(es_outbox_config_set_clock(cfg, fake_now, &c, NULL), 0);
    es_outbox *ob = NULL;
    assert_int_equal(es_outbox_open(cfg, false, &ob, NULL), 0);
    es_outbox_config_free(cfg);
    es_uuid a, b;
    es_uuid_v7(&a);
    es_uuid_v7(&b);
    const char *as[] = {"a1", "a2", "a3"};
    const char *bs[] = {"b1", "b2", "b3"};
    store_job(store, &job_type, &a, as, 3, true);
    store_job(store, &other_type, &b, bs, 3, true);
    for (int round = 0; round < 3; round++) {
        size_t n = 0;
        assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
        assert_int_equal(n, 2); /* one head of each aggregate */
    }
    size_t n = 9;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 0);
    assert_int_equal(r.n, 6);
    char seen_a[4] = "", seen_b[4] = "";
    for (size_t i = 0; i < r.n; i++) {
        char *seen = r.text[i][0] == 'a' ? seen_a : seen_b;
        size_t len = strlen(seen);
        seen[len] = r.text[i][1];
        seen[len + 1] = '\0';
    }
    assert_string_equal(seen_a, "123");
    assert_string_equal(seen_b, "123");
    es_outbox_stats stats;
    assert_int_equal(es_outbox_stats_get(store, 0, &stats, NULL), 0);
    assert_int_equal(stats.pending, 0);
    es_outbox_close(ob);
    suite_close(store);
}

static void test_outbox_expired_claim_is_taken_over(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    fake_clock c = {5000000};
    es_outbox *ob = manual_outbox(store, &r, &c, 2);
    es_uuid a, b;
    es_uuid_v7(&a);
    es_uuid_v7(&b);
    const char *one[] = {"orphan"};
    const char *two[] = {"twice orphaned"};
    store_job(store, &job_type, &a, one, 1, true);
    /* A dispatcher that claims and dies: the claim holds until it
     * expires. */
    es__outbox_filter f = {"job", ES_OUTBOX_ANY_KIND};
    es_outbox_entry_list *claimed = NULL;
    assert_int_equal(store->ops->outbox_claim(store, "dead-dispatcher",
                                              c.now, 30000, 2, &f, 1, 10,
                                              &claimed, NULL), 0);
    assert_int_equal(claimed->count, 1);
    es_outbox_entry_list_free(claimed);
    size_t n = 0;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 0); /* still claimed */
    c.now += 30001;
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 1);
    assert_int_equal(r.n, 1);
    assert_int_equal(r.attempts[0], 2); /* the lost attempt counted */
    /* The dead dispatcher's late verdict is refused. */
    es_outbox_entry_list *done = NULL;
    assert_int_equal(es_outbox_list(store, ES_OUTBOX_DONE, 0, &done, NULL), 0);
    assert_int_equal(done->count, 1);
    assert_int_equal(store->ops->outbox_finish(store,
                                               &done->items[0].side_effect.id,
                                               "dead-dispatcher",
                                               ES_OUTBOX_DONE, c.now, 0, NULL,
                                               NULL), ES_ECONFLICT);
    if (store->ops->outbox_finish_many != NULL) {
        /* Also when written with others: counted lost, nothing changed. */
        es__outbox_outcome v = {.id = done->items[0].side_effect.id,
                                .status = ES_OUTBOX_PENDING,
                                .next_attempt_ms = c.now,
                                .error = "late"};
        size_t lost = 0;
        assert_int_equal(store->ops->outbox_finish_many(
                             store, "dead-dispatcher", c.now, &v, 1, &lost,
                             NULL), 0);
        assert_int_equal(lost, 1);
        es_outbox_entry *again = NULL;
        assert_int_equal(es_outbox_show(store, &v.id, &again, NULL), 0);
        assert_int_equal(again->status, ES_OUTBOX_DONE);
        es_free(again);
    }
    es_outbox_entry_list_free(done);

    /* Abandoned on every attempt: a dead letter with the reason. */
    store_job(store, &job_type, &b, two, 1, true);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(store->ops->outbox_claim(store, "crashy", c.now,
                                                  100, 2, &f, 1, 10, &claimed,
                                                  NULL), 0);
        assert_int_equal(claimed->count, 1);
        es_outbox_entry_list_free(claimed);
        c.now += 101;
    }
    assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    assert_int_equal(n, 0);
    es_outbox_entry_list *dead = NULL;
    assert_int_equal(es_outbox_list(store, ES_OUTBOX_DEAD, 0, &dead, NULL), 0);
    assert_int_equal(dead->count, 1);
    assert_non_null(strstr(dead->items[0].last_error, "abandoned"));
    es_outbox_entry_list_free(dead);
    es_outbox_close(ob);
    suite_close(store);
}

/* batch 0: the default batch size */
static es_outbox *started_outbox_with(es_store *store, es_outbox_handler fn,
                                      void *ud, size_t workers, size_t batch,
                                      int64_t poll_ms, int64_t base_ms)
{
    es_outbox_config *cfg = NULL;
    assert_int_equal(es_outbox_config_new(store, &cfg, NULL), 0);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type,
                                                  ES_OUTBOX_ANY_KIND,
                                                  fn, ud, NULL), 0);
    assert_int_equal(es_outbox_config_set_concurrency(cfg, workers, NULL), 0);
    if (batch > 0)
        assert_int_equal(es_outbox_config_set_batch_size(cfg, batch, NULL),
                         0);
    assert_int_equal(es_outbox_config_set_poll_ms(cfg, poll_ms, NULL), 0);
    assert_int_equal(es_outbox_config_set_retry(cfg, 10, base_ms, base_ms * 4,
                                                NULL), 0);
    es_outbox *ob = NULL;
    assert_int_equal(es_outbox_open(cfg, true, &ob, NULL), 0);
    es_outbox_config_free(cfg);
    return ob;
}

es_outbox *started_outbox(es_store *store, recorder *r, size_t workers,
                                 int64_t poll_ms, int64_t base_ms)
{
    return started_outbox_with(store, record_fx, r, workers, 0, poll_ms,
                               base_ms);
}

size_t seen_count(recorder *r)
{
    pthread_mutex_lock(&r->lock);
    size_t n = r->n;
    pthread_mutex_unlock(&r->lock);
    return n;
}

bool wait_for(recorder *r, size_t n, int seconds)
{
    for (int i = 0; i < seconds * 1000; i++) {
        if (seen_count(r) >= n) return true;
        usleep(1000);
    }
    return false;
}

#define AGGS 40
#define STEPS 5

static void test_outbox_two_dispatchers_share_work_in_order(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    /* Small batches: one dispatcher cannot claim every aggregate's next
     * message in one round and leave the other nothing (as it did on the
     * memory store with the default batch). */
    tagged t1 = {&r, 1}, t2 = {&r, 2};
    es_outbox *one = started_outbox_with(store, record_fx_tagged, &t1, 3, 4,
                                         20, 10);
    es_outbox *two = started_outbox_with(store, record_fx_tagged, &t2, 3, 4,
                                         20, 10);
    es_uuid ids[AGGS];
    char texts[STEPS][32];
    const char *ptrs[STEPS];
    for (int s = 0; s < STEPS; s++) {
        snprintf(texts[s], sizeof texts[s], "step %d", s);
        ptrs[s] = texts[s];
    }
    for (int i = 0; i < AGGS; i++) {
        es_uuid_v7(&ids[i]);
        store_job(store, &job_type, &ids[i], ptrs, STEPS, true);
    }
    bool all = wait_for(&r, AGGS * STEPS, 20);
    es_outbox_close(one);
    es_outbox_close(two);
    assert_true(all);
    assert_int_equal(r.n, AGGS * STEPS); /* each exactly once */
    /* both worked, and no message went to both (nor twice to one) */
    size_t by[3] = {0, 0, 0};
    for (size_t k = 0; k < r.n; k++) {
        assert_true(r.who[k] == 1 || r.who[k] == 2);
        by[r.who[k]]++;
        for (size_t j = 0; j < k; j++)
            if (es_uuid_equal(&r.fx[j], &r.fx[k]))
                fail_msg("side effect %zu delivered by dispatcher %d and "
                         "again by %d", k, r.who[j], r.who[k]);
    }
    print_message("delivered by the first: %zu, by the second: %zu\n",
                  by[1], by[2]);
    assert_true(by[1] > 0);
    assert_true(by[2] > 0);
    assert_int_equal(r.max_in_flight_same_agg, 0);
    for (int i = 0; i < AGGS; i++) { /* in stored order per aggregate */
        int next = 0;
        for (size_t k = 0; k < r.n; k++) {
            if (!es_uuid_equal(&r.agg[k], &ids[i])) continue;
            assert_string_equal(r.text[k], texts[next]);
            next++;
        }
        assert_int_equal(next, STEPS);
    }
    es_outbox_stats stats;
    assert_int_equal(es_outbox_stats_get(store, 0, &stats, NULL), 0);
    assert_int_equal(stats.pending, 0);
    assert_int_equal(stats.done, AGGS * STEPS);
    suite_close(store);
}

static void test_outbox_wakes_on_commit_and_polls_for_retries(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    recorder r;
    recorder_init(&r);
    /* Poll once a minute: only a wake-up can deliver in the time this
     * takes.  A round that finds messages is followed at once by another
     * (more may be due), and the first round runs when the dispatcher
     * starts; a round that finds none sleeps until a wake-up or the poll
     * interval.  So a message claimed in round k > 1 when round k - 1
     * delivered nothing was claimed by a round that a wake-up started,
     * unless a poll interval has passed; when round k also began after
     * the commit began, that wake-up came after it.  If the message slips
     * into a round already under way (that race is what a sleep used to
     * hide), the attempt does not count and another message goes in. */
    es_outbox *ob = started_outbox(store, &r, 2, 60000, 10);
    pthread_mutex_lock(&r.lock);
    r.ob = ob;
    pthread_mutex_unlock(&r.lock);
    int64_t opened = es_clock_now_ms();
    uint64_t last = 0; /* the round of the last delivery */
    bool woke = false, delivered = true;
    int64_t latency = -1;
    size_t attempts = 0;
    while (!woke && delivered && attempts < 5) {
        /* the round after the last delivery has begun */
        es_outbox_metrics m = {0};
        for (int i = 0; i < 10000 && m.rounds < last + 1; i++) {
            es_outbox_metrics_get(ob, &m);
            if (m.rounds < last + 1) usleep(1000);
        }
        es_outbox_metrics_get(ob, &m); /* a round begun before the commit */
        uint64_t before = m.rounds;  /* did not start for it */
        es_uuid a;
        es_uuid_v7(&a);
        const char *one[] = {"wake up"};
        int64_t t0 = es_clock_now_ms();
        store_job(store, &job_type, &a, one, 1, true);
        attempts++;
        delivered = wait_for(&r, attempts, 10);
        pthread_mutex_lock(&r.lock);
        uint64_t k = r.deliver_round;
        latency = delivered ? r.deliver_ms - t0 : -1;
        pthread_mutex_unlock(&r.lock);
        woke = delivered && k >= last + 2 && k > before;
        last = k;
    }
    int64_t elapsed = es_clock_now_ms() - opened;
    es_outbox_metrics m;
    es_outbox_metrics_get(ob, &m);
    es_outbox_close(ob);
    print_message("wake-up latency: %lld ms (poll interval 60000 ms), "
                  "round %llu of %llu, attempt %zu, %llu notifications\n",
                  (long long)latency, (unsigned long long)last,
                  (unsigned long long)m.rounds, attempts,
                  (unsigned long long)m.notifications);
    assert_true(delivered);
    assert_true(woke);
    assert_true(elapsed < 60000); /* so no poll interval passed */
    assert_true(latency < 10000);

    /* A retry becomes due with no commit: only polling delivers it. */
    recorder r2;
    recorder_init(&r2);
    r2.retry_first = 1;
    es_outbox *polling = started_outbox(store, &r2, 2, 5, 20);
    es_uuid b;
    es_uuid_v7(&b);
    const char *two[] = {"retry me"};
    store_job(store, &job_type, &b, two, 1, true);
    bool again = wait_for(&r2, 2, 10);
    es_outbox_close(polling);
    assert_true(again);
    assert_int_equal(r2.attempts[0], 1);
    assert_int_equal(r2.attempts[1], 2);
    suite_close(store);
}

static void test_outbox_bad_input(void **st)
{
    (void)st;
    es_store *store = NULL;
    assert_int_equal(suite_open(&store), 0);
    es_outbox_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_outbox_config_new(NULL, &cfg, &err), ES_EINVAL);
    assert_int_equal(es_outbox_config_new(store, &cfg, &err), 0);
    es_outbox *ob = NULL;
    assert_int_equal(es_outbox_open(cfg, false, &ob, &err), ES_EINVAL);
    assert_non_null(strstr(err.message, "no handler"));
    recorder r;
    recorder_init(&r);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type, 7, NULL, &r,
                                                  &err), ES_EINVAL);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type, 7,
                                                  record_fx, &r, &err), 0);
    assert_int_equal(es_outbox_config_add_handler(cfg, &job_type, 7,
                                                  record_fx, &r, &err),
                     ES_EINVAL);
    assert_int_equal(es_outbox_config_set_concurrency(cfg, 0, &err),
                     ES_EINVAL);
    assert_int_equal(es_outbox_config_set_lease_ms(cfg, 1, &err), ES_EINVAL);
    assert_int_equal(es_outbox_config_set_retry(cfg, 0, 1, 1, &err),
                     ES_EINVAL);
    assert_int_equal(es_outbox_config_set_retry(cfg, 3, 100, 10, &err),
                     ES_EINVAL);
    assert_int_equal(es_outbox_config_set_owner(cfg, "", &err), ES_EINVAL);
    assert_int_equal(es_outbox_list(store, (es_outbox_status)9, 0, NULL,
                                    &err), ES_EINVAL);
    es_outbox_entry_list *list = NULL;
    assert_int_equal(es_outbox_list(store, (es_outbox_status)9, 0, &list,
                                    &err), ES_EINVAL);
    assert_int_equal(es_outbox_requeue(store, NULL, NULL, 0, NULL, &err),
                     ES_EINVAL);
    es_uuid nobody;
    es_uuid_v7(&nobody);
    es_outbox_entry *e = NULL;
    assert_int_equal(es_outbox_show(store, &nobody, &e, &err), ES_ENOTFOUND);
    es_outbox_close(NULL);
    es_outbox_config_free(cfg);
    suite_close(store);
}

int outbox_suite_run(int (*open)(es_store **out),
                     int (*close)(es_store *store))
{
    suite_open = open;
    suite_close = close;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_outbox_delivers_after_commit_not_after_rollback),
        cmocka_unit_test(
            test_outbox_retry_backoff_then_dead_letter_then_requeue),
        cmocka_unit_test(test_outbox_poison_message_never_blocks_others),
        cmocka_unit_test(test_outbox_leaves_unhandled_types_alone),
        cmocka_unit_test(test_outbox_claims_every_handled_type_in_order),
        cmocka_unit_test(test_outbox_expired_claim_is_taken_over),
        cmocka_unit_test(test_outbox_two_dispatchers_share_work_in_order),
        cmocka_unit_test(test_outbox_wakes_on_commit_and_polls_for_retries),
        cmocka_unit_test(test_outbox_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
