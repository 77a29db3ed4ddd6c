/*
 * The aggregate host on the PostgreSQL store (DATABASE_URL): batched
 * commits with a savepoint per command, per-key order under concurrent
 * producers, and a commit that conflicts with another writer decided
 * again; rejected commands answered the same after a restart, their
 * reasons sealed when the store has keys and gone once the aggregate is
 * forgotten.  Queries (es_host_query): read-your-writes under concurrent
 * producers, never an uncommitted event, loads, unknown keys, wrong types
 * and forgotten aggregates.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "fixtures/pg.h"

static es_store *g_store;  /* no keys */
static es_store *g_sealed; /* the same schema, with a master key */
static PGconn *g_sql;
static char g_schema[64];
static const char g_key_id[] = "host-k1";

enum { CMD_ADD = 1, CMD_TAKE = 2, CMD_ODD = 3 };

/* CMD_ADD: add the 4-byte little-endian value; the first one resets.
 * CMD_TAKE: subtract it, rejected when the result would go below zero.
 * CMD_ODD: always rejected, with a reason that is not valid UTF-8. */
static int decide(void *user, const void *state, const es_command *cmd,
                  es_emitter *em)
{
    (void)user;
    if (cmd->len != 4) return es_emit_reject(em, "bad payload");
    const uint8_t *p = cmd->payload;
    int32_t v = (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                          (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
    if (cmd->kind == CMD_ODD) return es_emit_reject(em, "odd \xff\xc3");
    if (cmd->kind == CMD_TAKE) {
        int32_t have = state ? ((const counter *)state)->result : 0;
        if (have < v)
            return es_emit_reject(em, "short: %d < %d", (int)have, (int)v);
        v = -v;
    }
    if (state == NULL) {
        counter_event reset = counter_reset(es_emit_aggregate_id(em));
        int rc = es_emit(em, &reset);
        if (rc != 0) return rc;
    }
    counter_event add = counter_add(v);
    return es_emit(em, &add);
}

static es_command command(uint8_t value[4], int32_t v)
{
    for (int i = 0; i < 4; i++) value[i] = (uint8_t)((uint32_t)v >> (8 * i));
    es_command c = {{{0}}, 1, value, 4};
    es_uuid_v7(&c.id);
    return c;
}

static es_host *open_host_on(es_store *store)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    if (es_host_config_new(&cfg, NULL) != 0 ||
        es_host_config_add_type(cfg, &counter_type, decide, NULL, NULL) ||
        es_host_open(cfg, store, &host, NULL) != 0)
        host = NULL;
    es_host_config_free(cfg);
    return host;
}

static es_host *open_host(void)
{
    return open_host_on(g_store);
}

/* The stored rejection of command id: whether its row has one, its
 * rejection_key (NULL: in clear; copied into key), and whether the reason's
 * bytes appear anywhere in the stored rejection. */
typedef struct stored_rejection {
    bool found, rejected, key_null, clear;
    char key[64];
} stored_rejection;

static stored_rejection stored(const es_uuid *id, const char *reason)
{
    stored_rejection out;
    memset(&out, 0, sizeof out);
    char q[256], ids[ES_UUID_STRLEN + 1];
    snprintf(q, sizeof q, "SELECT rejection IS NOT NULL, rejection_key, "
             "coalesce(position($2::bytea in rejection) > 0, false) "
             "FROM \"%s\".commands WHERE command_id = $1::uuid", g_schema);
    es_uuid_format(id, ids);
    const char *values[2] = {ids, reason};
    const int lens[2] = {0, (int)strlen(reason)};
    const int formats[2] = {0, 1}; /* the reason as raw bytes */
    PGresult *r = PQexecParams(g_sql, q, 2, NULL, values, lens, formats, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("helper SQL failed: %s", PQresultErrorMessage(r));
    if (PQntuples(r) == 1) {
        out.found = true;
        out.rejected = PQgetvalue(r, 0, 0)[0] == 't';
        out.key_null = PQgetisnull(r, 0, 1);
        snprintf(out.key, sizeof out.key, "%s", PQgetvalue(r, 0, 1));
        out.clear = PQgetvalue(r, 0, 2)[0] == 't';
    }
    PQclear(r);
    return out;
}

#define KEYS 4
#define PRODUCERS 4
#define SENDS 60

typedef struct shared {
    es_host *host;
    es_uuid keys[KEYS];
    atomic_int ok, failed;
    atomic_long sum[KEYS];
} shared;

typedef struct producer {
    shared *s;
    int id;
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    for (int i = 0; i < SENDS; i++) {
        int k = (i + p->id) % KEYS;
        uint8_t value[4];
        int32_t v = p->id * 1000 + i;
        es_command c = command(value, v);
        int rc = es_host_call(p->s->host, &counter_type, &p->s->keys[k], &c,
                              NULL, NULL);
        if (rc == 0) {
            atomic_fetch_add(&p->s->ok, 1);
            atomic_fetch_add(&p->s->sum[k], v);
        } else {
            atomic_fetch_add(&p->s->failed, 1);
        }
    }
    return NULL;
}

static void test_pg_host_concurrent_producers(void **state)
{
    (void)state;
    static shared s;
    memset(&s, 0, sizeof s);
    for (int k = 0; k < KEYS; k++) es_uuid_v7(&s.keys[k]);
    s.host = open_host();
    assert_non_null(s.host);
    pthread_t th[PRODUCERS];
    producer ps[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        ps[i] = (producer){&s, i};
        assert_int_equal(pthread_create(&th[i], NULL, produce, &ps[i]), 0);
    }
    for (int i = 0; i < PRODUCERS; i++) pthread_join(th[i], NULL);
    es_host_metrics m;
    es_host_metrics_get(s.host, &m);
    assert_int_equal(es_host_shutdown(s.host, NULL), 0);
    assert_int_equal(atomic_load(&s.failed), 0);
    assert_int_equal(atomic_load(&s.ok), PRODUCERS * SENDS);
    assert_true(m.batches > 0);
    for (int k = 0; k < KEYS; k++) {
        counter_context *ctx = NULL;
        assert_int_equal(counter_store_load(g_store, &s.keys[k], &ctx, NULL),
                         0);
        assert_int_equal(counter_state(ctx)->result,
                         (int32_t)atomic_load(&s.sum[k]));
        /* a reset and one add per command, versions without a gap */
        assert_int_equal(counter_version(ctx), PRODUCERS * SENDS / KEYS);
        counter_context_free(ctx);
    }
}

static void test_pg_host_conflict_decided_again(void **state)
{
    (void)state;
    es_host *host = open_host();
    assert_non_null(host);
    es_uuid key;
    es_uuid_v7(&key);
    uint8_t value[4];
    es_command c = command(value, 1);
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, NULL, NULL),
                     0); /* resident at version 1 */

    /* another writer appends version 2 */
    counter_context *ctx = NULL;
    es_txn *txn = NULL;
    counter_event add = counter_add(100);
    assert_int_equal(counter_store_load(g_store, &key, &ctx, NULL), 0);
    assert_int_equal(counter_record(ctx, &add, NULL), 0);
    assert_int_equal(es_store_begin(g_store, &txn, NULL), 0);
    assert_int_equal(counter_save(txn, ctx, NULL), 0);
    assert_int_equal(es_txn_commit(txn, NULL), 0);
    counter_context_free(ctx);

    es_host_reply *r = NULL;
    c = command(value, 10);
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, &r, NULL),
                     0);
    assert_int_equal(r->version, 3);
    es_host_reply_free(r);
    es_host_metrics m;
    es_host_metrics_get(host, &m);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_true(m.conflicts >= 1);
    assert_int_equal(counter_store_load(g_store, &key, &ctx, NULL), 0);
    assert_int_equal(counter_state(ctx)->result, 111);
    counter_context_free(ctx);
}

static void expect_rejection(es_host *host, const es_uuid *key,
                             const es_command *c, const char *reason,
                             bool duplicate)
{
    es_host_reply *r = NULL;
    assert_int_equal(es_host_call(host, &counter_type, key, c, &r, NULL),
                     ES_EREJECTED);
    assert_non_null(r);
    assert_string_equal(r->reason, reason);
    assert_int_equal(r->duplicate, duplicate);
    es_host_reply_free(r);
}

/* A rejection is recorded with its reason: after a restart, a replay is
 * answered with it even though deciding again would now accept (and
 * nothing of that second decision is stored); other content is
 * ES_EIDEMPOTENCY. */
static void test_pg_host_rejection_replayed(void **state)
{
    (void)state;
    es_host *host = open_host();
    assert_non_null(host);
    es_uuid key;
    es_uuid_v7(&key);
    uint8_t v5[4], v10[4], v6[4], vo[4];
    es_command take = command(v5, 5);
    take.kind = CMD_TAKE;
    es_command other = command(v6, 6);
    other.kind = CMD_TAKE;
    other.id = take.id;
    es_command odd = command(vo, 1);
    odd.kind = CMD_ODD;
    expect_rejection(host, &key, &take, "short: 0 < 5", false);
    expect_rejection(host, &key, &odd, "odd \xff\xc3", false);
    /* no keys: the reason is stored in clear, no key id beside it */
    stored_rejection st = stored(&take.id, "short: 0 < 5");
    assert_true(st.found && st.rejected && st.key_null && st.clear);
    st = stored(&odd.id, "odd \xff\xc3");
    assert_true(st.found && st.rejected && st.key_null && st.clear);
    es_command add = command(v10, 10);
    assert_int_equal(es_host_call(host, &counter_type, &key, &add, NULL,
                                  NULL), 0);
    expect_rejection(host, &key, &take, "short: 0 < 5", true);
    es_host_reply *r = NULL;
    assert_int_equal(es_host_call(host, &counter_type, &key, &other, &r,
                                  NULL), ES_EIDEMPOTENCY);
    es_host_reply_free(r);
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    /* Restarted: nothing resident, the record answers. */
    host = open_host();
    assert_non_null(host);
    expect_rejection(host, &key, &take, "short: 0 < 5", true);
    expect_rejection(host, &key, &odd, "odd \xff\xc3", true);
    assert_int_equal(es_host_call(host, &counter_type, &key, &other, &r,
                                  NULL), ES_EIDEMPOTENCY);
    es_host_reply_free(r);
    /* a new take of 5 is accepted: the state is right after all that */
    es_command take2 = command(v5, 5);
    take2.kind = CMD_TAKE;
    assert_int_equal(es_host_call(host, &counter_type, &key, &take2, &r,
                                  NULL), 0);
    assert_false(r->duplicate);
    es_host_reply_free(r);
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    counter_context *ctx = NULL;
    assert_int_equal(counter_store_load(g_store, &key, &ctx, NULL), 0);
    assert_int_equal(counter_state(ctx)->result, 5);
    assert_int_equal(counter_version(ctx), 2); /* reset, add, take2 */
    counter_context_free(ctx);
}

static void expect_status(es_host *host, const es_uuid *key,
                          const es_command *c, int status,
                          const char *absent)
{
    es_host_reply *r = NULL;
    es_error err = {0};
    assert_int_equal(es_host_call(host, &counter_type, key, c, &r, &err),
                     status);
    if (r) assert_null(strstr(r->reason, absent));
    assert_null(strstr(err.message, absent));
    es_host_reply_free(r);
}

static void forget(const es_uuid *key)
{
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_sealed, &txn, NULL), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, key, NULL), 0);
    assert_int_equal(es_txn_commit(txn, NULL), 0);
}

/* With keys, a rejection's reason (it may carry personal data) is sealed
 * with the aggregate's data key, on the host's batch path: nothing of it
 * in clear, the same answer on a replay after a restart.  Once the
 * aggregate is forgotten, a replay gets ES_EFORGOTTEN and never the
 * reason; other content under the id is still ES_EIDEMPOTENCY. */
static void test_pg_host_rejection_sealed(void **state)
{
    (void)state;
    es_host *host = open_host_on(g_sealed);
    assert_non_null(host);
    es_uuid key, quiet; /* quiet: rejections only, never an event */
    es_uuid_v7(&key);
    es_uuid_v7(&quiet);
    uint8_t v5[4], v6[4], v10[4], vo[4], vq[4];
    es_command take = command(v5, 5);
    take.kind = CMD_TAKE;
    es_command odd = command(vo, 1);
    odd.kind = CMD_ODD;
    es_command qtake = command(vq, 7);
    qtake.kind = CMD_TAKE;
    es_command other = command(v6, 6); /* qtake's id, other content */
    other.kind = CMD_TAKE;
    other.id = qtake.id;
    expect_rejection(host, &key, &take, "short: 0 < 5", false);
    expect_rejection(host, &key, &odd, "odd \xff\xc3", false);
    expect_rejection(host, &quiet, &qtake, "short: 0 < 7", false);
    es_command add = command(v10, 10);
    assert_int_equal(es_host_call(host, &counter_type, &key, &add, NULL,
                                  NULL), 0);
    expect_rejection(host, &key, &take, "short: 0 < 5", true);

    /* at rest: sealed, the master key's id beside it, the text nowhere */
    const struct {
        const es_uuid *id;
        const char *reason;
    } rows[3] = {{&take.id, "short: 0 < 5"},
                 {&odd.id, "odd \xff\xc3"},
                 {&qtake.id, "short: 0 < 7"}};
    for (int i = 0; i < 3; i++) {
        stored_rejection st = stored(rows[i].id, rows[i].reason);
        assert_true(st.found && st.rejected);
        assert_false(st.key_null);
        assert_string_equal(st.key, g_key_id);
        assert_false(st.clear);
        /* and not readable a shorter way either: "short" alone */
        if (i != 1) assert_false(stored(rows[i].id, "short").clear);
    }
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    /* Restarted: the records answer, opened with the data keys. */
    host = open_host_on(g_sealed);
    assert_non_null(host);
    expect_rejection(host, &key, &take, "short: 0 < 5", true);
    expect_rejection(host, &key, &odd, "odd \xff\xc3", true);
    expect_rejection(host, &quiet, &qtake, "short: 0 < 7", true);
    expect_status(host, &quiet, &other, ES_EIDEMPOTENCY, "short");
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    /* A store without the key does not open them (and says so). */
    host = open_host_on(g_store);
    assert_non_null(host);
    expect_status(host, &quiet, &qtake, ES_EDECRYPT, "short");
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    /* Crypto-shredding: the reasons go with the data keys. */
    forget(&key);
    forget(&quiet);
    host = open_host_on(g_sealed);
    assert_non_null(host);
    expect_status(host, &key, &take, ES_EFORGOTTEN, "short");
    expect_status(host, &key, &odd, ES_EFORGOTTEN, "odd");
    /* quiet has no event to load: its record answers, not a new decide
     * (which would reject with the same text) */
    expect_status(host, &quiet, &qtake, ES_EFORGOTTEN, "short");
    expect_status(host, &quiet, &other, ES_EIDEMPOTENCY, "short");
    assert_int_equal(es_host_shutdown(host, NULL), 0);
}

/* An accepted command replayed once its aggregate is forgotten: its
 * record says it committed, but its events cannot be read back (their data
 * key is destroyed).  The answer is ES_EFORGOTTEN, never ES_EUNKNOWN (which
 * would say it may not have committed): resident, where the replay is
 * decided on today's state, rejected, and the record answers; and after a
 * restart, where the load meets the forgotten aggregate first. */
static void test_pg_host_accepted_replay_forgotten(void **state)
{
    (void)state;
    es_host *host = open_host_on(g_sealed);
    assert_non_null(host);
    es_uuid key;
    es_uuid_v7(&key);
    uint8_t v10[4], v10b[4];
    es_command add = command(v10, 10);
    es_command take = command(v10b, 10);
    take.kind = CMD_TAKE;
    assert_int_equal(es_host_call(host, &counter_type, &key, &add, NULL,
                                  NULL), 0);
    assert_int_equal(es_host_call(host, &counter_type, &key, &take, NULL,
                                  NULL), 0);
    /* resident, before: the record answers with the events */
    es_host_reply *r = NULL;
    assert_int_equal(es_host_call(host, &counter_type, &key, &take, &r,
                                  NULL), 0);
    assert_true(r->duplicate);
    assert_int_equal(r->n_events, 1);
    es_host_reply_free(r);
    forget(&key);
    /* today's state has 0: deciding again rejects, the record answers */
    expect_status(host, &key, &take, ES_EFORGOTTEN, "short");
    /* the snapshot on passivation cannot be sealed either: reported */
    int rc = es_host_shutdown(host, NULL);
    assert_true(rc == 0 || rc == ES_EFORGOTTEN);

    host = open_host_on(g_sealed);
    assert_non_null(host);
    expect_status(host, &key, &take, ES_EFORGOTTEN, "short");
    expect_status(host, &key, &add, ES_EFORGOTTEN, "short");
    assert_int_equal(es_host_shutdown(host, NULL), 0);
}

/* ---- queries ---- */

/* The same shape as counter_type under another name. */
static es_aggregate_type other_type;

static es_host *open_host_two_types(es_store *store)
{
    other_type = counter_type;
    other_type.name = "other_counter";
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    if (es_host_config_new(&cfg, NULL) != 0 ||
        es_host_config_add_type(cfg, &counter_type, decide, NULL, NULL) ||
        es_host_config_add_type(cfg, &other_type, decide, NULL, NULL) ||
        es_host_open(cfg, store, &host, NULL) != 0)
        host = NULL;
    es_host_config_free(cfg);
    return host;
}

/* What a query saw, and what PostgreSQL had committed meanwhile. */
typedef struct probe {
    es_uuid key;
    bool check_store;
    int32_t result;
    uint64_t version;
    uint64_t stored; /* read inside the query function */
    int calls;
} probe;

static int q_probe(void *ud, const void *state, uint64_t version)
{
    probe *p = ud;
    p->result = ((const counter *)state)->result;
    p->version = version;
    p->calls++;
    if (p->check_store) {
        counter_context *ctx = NULL;
        p->stored = counter_store_load(g_store, &p->key, &ctx, NULL) == 0
                        ? counter_version(ctx)
                        : ES_HOST_NO_VERSION;
        counter_context_free(ctx);
    }
    return 0;
}

typedef struct ryw {
    es_host *host;
    const es_uuid *keys;
    int id;
    int errors, stale, torn;
} ryw;

/* Each acknowledged command is seen by the query sent after it, and no
 * query sees a version PostgreSQL has not committed. */
static void *ryw_main(void *arg)
{
    ryw *r = arg;
    for (int i = 0; i < SENDS; i++) {
        const es_uuid *key = &r->keys[(i + r->id) % KEYS];
        uint8_t value[4];
        es_command c = command(value, 1);
        es_host_reply *reply = NULL;
        int rc = es_host_call(r->host, &counter_type, key, &c, &reply, NULL);
        uint64_t acked = reply ? reply->version : 0;
        es_host_reply_free(reply);
        if (rc != 0) {
            r->errors++;
            continue;
        }
        probe p;
        memset(&p, 0, sizeof p);
        p.key = *key;
        p.check_store = true;
        if (es_host_query_call(r->host, &counter_type, key, q_probe, &p,
                               NULL) != 0) {
            r->errors++;
            continue;
        }
        if (p.version < acked) r->stale++;
        /* a reset, then one add of 1 per command */
        if (p.stored == ES_HOST_NO_VERSION || p.stored < p.version ||
            p.result != (int32_t)p.version)
            r->torn++;
    }
    return NULL;
}

static void test_pg_host_query_read_your_writes(void **state)
{
    (void)state;
    es_uuid keys[KEYS];
    for (int k = 0; k < KEYS; k++) es_uuid_v7(&keys[k]);
    es_host *host = open_host();
    assert_non_null(host);
    pthread_t th[PRODUCERS];
    ryw rs[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        rs[i] = (ryw){host, keys, i, 0, 0, 0};
        assert_int_equal(pthread_create(&th[i], NULL, ryw_main, &rs[i]), 0);
    }
    for (int i = 0; i < PRODUCERS; i++) pthread_join(th[i], NULL);
    es_host_metrics m;
    es_host_metrics_get(host, &m);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    for (int i = 0; i < PRODUCERS; i++) {
        assert_int_equal(rs[i].errors, 0);
        assert_int_equal(rs[i].stale, 0);
        assert_int_equal(rs[i].torn, 0);
    }
    assert_int_equal(m.queries, PRODUCERS * SENDS);
}

/* Commands sent without waiting, then a query: it waits for their
 * commits, sees every one of them and nothing uncommitted. */
static void test_pg_host_query_waits_for_commits(void **state)
{
    (void)state;
    es_host *host = open_host();
    assert_non_null(host);
    es_uuid key;
    es_uuid_v7(&key);
    enum { N = 200 };
    for (int i = 0; i < N; i++) {
        uint8_t value[4];
        es_command c = command(value, 1);
        assert_int_equal(es_host_send(host, &counter_type, &key, &c, NULL,
                                      NULL, NULL),
                         0);
    }
    probe p;
    memset(&p, 0, sizeof p);
    p.key = key;
    p.check_store = true;
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_probe, &p, NULL), 0);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(p.version, N); /* the reset, then N adds */
    assert_int_equal(p.result, N);
    assert_true(p.stored >= p.version && p.stored != ES_HOST_NO_VERSION);
}

static uint64_t resident(es_host *host, uint64_t want)
{
    es_host_metrics m;
    for (int i = 0; i < 2000; i++) {
        es_host_metrics_get(host, &m);
        if (m.resident == want) break;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return m.resident;
}

/* Not resident: loaded from PostgreSQL, then kept; an unknown key is
 * ES_ENOTFOUND and not kept; the other type is ES_EWRONGTYPE; a
 * forgotten aggregate ES_EFORGOTTEN. */
static void test_pg_host_query_loads_and_errors(void **state)
{
    (void)state;
    es_host *host = open_host_two_types(g_sealed);
    assert_non_null(host);
    es_uuid key, unknown, doomed;
    es_uuid_v7(&key);
    es_uuid_v7(&unknown);
    es_uuid_v7(&doomed);
    uint8_t value[4];
    es_command c = command(value, 5);
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, NULL, NULL),
                     0);
    c = command(value, 6);
    assert_int_equal(
        es_host_call(host, &counter_type, &doomed, &c, NULL, NULL), 0);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    forget(&doomed);

    host = open_host_two_types(g_sealed);
    assert_non_null(host);
    probe p;
    memset(&p, 0, sizeof p);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_probe, &p, NULL), 0);
    assert_int_equal(p.result, 5);
    assert_int_equal(p.version, 1);
    assert_int_equal(resident(host, 1), 1);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_probe, &p, NULL), 0);
    es_host_metrics m;
    es_host_metrics_get(host, &m);
    assert_int_equal(m.loads, 1); /* the second query: from memory */

    es_error err = {0};
    assert_int_equal(es_host_query_call(host, &counter_type, &unknown,
                                        q_probe, &p, &err),
                     ES_ENOTFOUND);
    assert_int_equal(resident(host, 1), 1);
    assert_int_equal(
        es_host_query_call(host, &other_type, &key, q_probe, &p, &err),
        ES_EWRONGTYPE);
    assert_int_equal(resident(host, 1), 1);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &doomed, q_probe, &p, &err),
        ES_EFORGOTTEN);
    assert_int_equal(resident(host, 1), 1);
    assert_int_equal(p.calls, 2);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
}

static es_host *open_fresh_host(void)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    if (es_host_config_new(&cfg, NULL) != 0 ||
        es_host_config_add_type(cfg, &counter_type, decide, NULL, NULL) ||
        es_host_config_set_query_fresh(cfg, true) != 0 ||
        es_host_open(cfg, g_store, &host, NULL) != 0)
        host = NULL;
    es_host_config_free(cfg);
    return host;
}

/* Sessions of this schema's database that sit in an open transaction. */
static long long idle_in_transaction(void)
{
    PGresult *r = PQexec(g_sql, "SELECT count(*) FROM pg_stat_activity "
                                "WHERE state LIKE 'idle in transaction%' "
                                "AND pid <> pg_backend_pid()");
    long long n = PQresultStatus(r) == PGRES_TUPLES_OK
                      ? atoll(PQgetvalue(r, 0, 0))
                      : -1;
    PQclear(r);
    return n;
}

/* A fresh query folds in what another host committed since its resident
 * version: a few events (one read, no transaction left open) and more
 * than a stream page (1,000 events: the rest through a cursor, which
 * needs a transaction). */
static void test_pg_host_query_fresh_other_host(void **state)
{
    (void)state;
    es_host *fresh = open_fresh_host();
    es_host *other = open_host();
    assert_non_null(fresh);
    assert_non_null(other);
    es_uuid key;
    es_uuid_v7(&key);
    uint8_t value[4];
    es_command c = command(value, 1);
    assert_int_equal(es_host_call(fresh, &counter_type, &key, &c, NULL, NULL),
                     0);
    probe p;
    memset(&p, 0, sizeof p);
    assert_int_equal(
        es_host_query_call(fresh, &counter_type, &key, q_probe, &p, NULL), 0);
    assert_int_equal(p.version, 1); /* reset and add */
    for (int round = 0; round < 2; round++) {
        int n = round == 0 ? 3 : 1100;
        for (int i = 0; i < n; i++) {
            c = command(value, 1);
            assert_int_equal(
                es_host_call(other, &counter_type, &key, &c, NULL, NULL), 0);
        }
        uint64_t loads = 0;
        es_host_metrics m;
        es_host_metrics_get(fresh, &m);
        loads = m.loads;
        assert_int_equal(es_host_query_call(fresh, &counter_type, &key,
                                            q_probe, &p, NULL),
                         0);
        int total = round == 0 ? 1 + 3 : 1 + 3 + 1100;
        assert_int_equal(p.result, total);
        assert_int_equal(p.version, (uint64_t)total);
        es_host_metrics_get(fresh, &m);
        assert_int_equal(m.loads, loads); /* caught up, not loaded again */
        assert_int_equal(idle_in_transaction(), 0);
    }
    assert_int_equal(es_host_shutdown(fresh, NULL), 0);
    assert_int_equal(es_host_shutdown(other, NULL), 0);
}

static int group_setup(void **state)
{
    (void)state;
    fixture_pg_random_name(g_schema, sizeof g_schema, "host_");
    if (fixture_pg_open(g_schema, &g_store) != 0) return -1;
    es_pg_config *cfg = NULL;
    uint8_t k[ES_PG_KEY_BYTES];
    for (size_t i = 0; i < sizeof k; i++) k[i] = (uint8_t)(i * 11 + 3);
    int rc = es_pg_config_new(&cfg, NULL);
    if (rc == 0) rc = es_pg_config_set_schema(cfg, g_schema, NULL);
    if (rc == 0) rc = es_pg_config_add_key(cfg, g_key_id, k, NULL);
    if (rc == 0) rc = es_pg_store_open(cfg, &g_sealed, NULL);
    es_pg_config_free(cfg);
    g_sql = fixture_pg_connect();
    return rc == 0 && g_sql ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    es_store_close(g_sealed);
    PQfinish(g_sql);
    es_store_close(g_store);
    fixture_pg_drop_schema(g_schema);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_host_concurrent_producers),
        cmocka_unit_test(test_pg_host_conflict_decided_again),
        cmocka_unit_test(test_pg_host_rejection_replayed),
        cmocka_unit_test(test_pg_host_rejection_sealed),
        cmocka_unit_test(test_pg_host_accepted_replay_forgotten),
        cmocka_unit_test(test_pg_host_query_read_your_writes),
        cmocka_unit_test(test_pg_host_query_waits_for_commits),
        cmocka_unit_test(test_pg_host_query_loads_and_errors),
        cmocka_unit_test(test_pg_host_query_fresh_other_host),
    };
    return FIXTURE_PG_RUN_GROUP("test_pg_host", tests, group_setup,
                                group_teardown);
}
