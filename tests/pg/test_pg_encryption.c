/*
 * Encryption at rest on the PostgreSQL store (DATABASE_URL): the
 * reference's encryption.rs cases, then rotation, crypto-shredding,
 * wrong and missing keys, tampered rows, and plaintext rows from before
 * encryption was turned on; the reasons of rejected commands (the host's
 * command-id records), and migration 9 that made room for their key id.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <sodium.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <unistd.h>

#include "core/internal.h"
#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/helpers.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"
#include "store/store_impl.h"

static PGconn *g_sql;
static es_store *g_plain; /* no keys */
static es_store *g_k1;    /* key k1 */

static uint8_t key_a[ES_PG_KEY_BYTES], key_b[ES_PG_KEY_BYTES];
static char id_k1[32], id_k2[32];

/* ---- helpers ---- */

static long long sql_int(const char *query, int n, const char *const *vals)
{
    PGresult *r = PQexecParams(g_sql, query, n, NULL, vals, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK &&
        PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("helper SQL failed: %s", PQresultErrorMessage(r));
    long long v = -1;
    if (PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* A store with the given keys (id NULL ends the list). */
static es_store *open_store(const char *id1, const uint8_t *k1,
                            const char *id2, const uint8_t *k2)
{
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    if (id1) assert_int_equal(es_pg_config_add_key(cfg, id1, k1, &err), 0);
    if (id2) assert_int_equal(es_pg_config_add_key(cfg, id2, k2, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    es_pg_config_free(cfg);
    return store;
}

static account_context *saved(es_store *store, account_builder *b)
{
    account_context *ctx = NULL;
    es_error err = {0};
    int rc = account_builder_save(b, store, &ctx, &err);
    if (rc != 0) fail_msg("save: %s %s", es_status_name(rc), err.message);
    return ctx;
}

static int load(es_store *store, const es_uuid *id, int64_t *balance,
                es_error *err)
{
    account_context *ctx = NULL;
    int rc = account_store_load(store, id, &ctx, err);
    if (rc == 0) {
        *balance = account_state(ctx)->balance;
        account_context_free(ctx);
    }
    return rc;
}

typedef struct idtext {
    char s[ES_UUID_STRLEN + 1];
} idtext;

static idtext txt(const es_uuid *id)
{
    idtext t;
    es_uuid_format(id, t.s);
    return t;
}

/* ==== encryption.rs ==== */

static void test_pg_encryption_aggregate_saved_and_loaded(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_context *ctx = saved(g_k1, &b);
    int64_t balance = 0;
    es_error err = {0};
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 100);
    /* At rest: sealed, with the key id beside it; the email is nowhere. */
    idtext a = txt(&b.account_id);
    const char *v[2] = {a.s, id_k1};
    assert_int_equal(sql_int("SELECT count(*) FROM events WHERE aggregate_id "
                             "= $1 AND key_id = $2 AND position('user@"
                             "example.com'::bytea in payload) = 0",
                             2, v),
                     2);
    assert_int_equal(sql_int("SELECT count(*) FROM snapshots WHERE "
                             "aggregate_id = $1 AND key_id = $2 AND "
                             "position('user@example.com'::bytea in "
                             "payload) = 0",
                             2, v),
                     1);
    assert_int_equal(sql_int("SELECT count(*) FROM outbox WHERE aggregate_id "
                             "= $1 AND key_id = $2 AND position('user@"
                             "example.com'::bytea in payload) = 0",
                             2, v),
                     2);
    assert_int_equal(sql_int("SELECT count(*) FROM data_keys WHERE "
                             "aggregate_id = $1 AND key_id = $2 AND "
                             "length(wrapped) = 72",
                             2, v),
                     1);
    account_context_free(ctx);
}

static void test_pg_encryption_event_loaded_by_id(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(account_builder_build(&b, &ctx, &err), 0);
    es_event open = *es_context_uncommitted(account_context_raw(ctx), 0);
    uint8_t *copy = malloc(open.len);
    memcpy(copy, open.data, open.len);
    open.data = copy;
    assert_int_equal(fixture_save_commit(g_k1, account_context_raw(ctx),
                                         &err),
                     0);
    es_txn *txn = NULL;
    es_event *got = NULL;
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_txn_get_event(txn, &b.account_id, &open.id, &got,
                                      &err),
                     0);
    es_txn_rollback(txn);
    assert_int_equal(got->len, open.len);
    assert_memory_equal(got->data, open.data, open.len);
    es_free(got);

    /* Without keys: never garbage, ES_EDECRYPT. */
    assert_int_equal(es_store_begin(g_plain, &txn, &err), 0);
    assert_int_equal(es_txn_get_event(txn, &b.account_id, &open.id, &got,
                                      &err),
                     ES_EDECRYPT);
    assert_non_null(strstr(err.message, "no keys"));
    es_txn_rollback(txn);
    free(copy);
    account_context_free(ctx);
}

static int count_event(void *ud, const es_event *ev)
{
    (void)ev;
    (*(size_t *)ud)++;
    return 0;
}

static void test_pg_encryption_stream(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 1);
    account_builder_with_add(&b, 2);
    account_context *ctx = saved(g_k1, &b);
    es_txn *txn = NULL;
    es_error err = {0};
    size_t n = 0;
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_txn_stream(txn, &b.account_id, 0, count_event, &n,
                                   &err),
                     0);
    es_txn_rollback(txn);
    assert_int_equal(n, 3);
    n = 0;
    assert_int_equal(es_store_begin(g_plain, &txn, &err), 0);
    assert_int_equal(es_txn_stream(txn, &b.account_id, 0, count_event, &n,
                                   &err),
                     ES_EDECRYPT);
    es_txn_rollback(txn);
    assert_int_equal(n, 0);
    int64_t balance;
    assert_int_equal(load(g_plain, &b.account_id, &balance, &err),
                     ES_EDECRYPT);
    account_context_free(ctx);
}

static void test_pg_encryption_side_effects(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 70);
    account_context *ctx = saved(g_k1, &b);
    es_txn *txn = NULL;
    es_error err = {0};
    es_side_effect_list *list = NULL;
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_txn_list_side_effects(txn, &b.account_id, &list,
                                              &err),
                     0);
    es_txn_rollback(txn);
    assert_int_equal(list->count, 2);
    account_side_effect se;
    assert_int_equal(account_side_effect_decode(&list->items[0], &se, &err),
                     0);
    assert_string_equal(se.address, ACCOUNT_DEFAULT_EMAIL);
    account_side_effect_free(&se);
    assert_int_equal(account_side_effect_decode(&list->items[1], &se, &err),
                     0);
    assert_string_equal(se.message, "70");
    account_side_effect_free(&se);
    es_side_effect_list_free(list);
    account_context_free(ctx);
}

/* ==== beyond the reference ==== */

static void test_pg_encryption_idempotent_resave(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved(g_k1, &b);
    account_event add = account_add(10);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(fixture_save_commit(g_k1, account_context_raw(ctx),
                                         &err),
                     0);
    /* Same id, same content: fresh nonces, but compared in plaintext. */
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(fixture_save_commit(g_k1, account_context_raw(ctx),
                                         &err),
                     0);
    account_event other = add;
    other.amount = 11;
    assert_int_equal(account_record(ctx, &other, &err), 0);
    assert_int_equal(fixture_save_commit(g_k1, account_context_raw(ctx),
                                         &err),
                     ES_EIDEMPOTENCY);
    int64_t balance;
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 10);
    account_context_free(ctx);
}

static void test_pg_encryption_wrong_key(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved(g_k1, &b);
    es_store *wrong = open_store(id_k1, key_b, NULL, NULL);
    int64_t balance;
    es_error err = {0};
    assert_int_equal(load(wrong, &b.account_id, &balance, &err), ES_EDECRYPT);
    assert_non_null(strstr(err.message, "does not open"));
    assert_int_equal(es_store_close(wrong), 0);
    account_context_free(ctx);
}

static void test_pg_encryption_key_rotation(void **state)
{
    (void)state;
    account_builder old_b, new_b;
    account_builder_init(&old_b);
    account_builder_init(&new_b);
    account_builder_with_add(&old_b, 1);
    account_builder_with_add(&new_b, 2);
    account_context *old_ctx = saved(g_k1, &old_b);
    es_store *rotated = open_store(id_k1, key_a, id_k2, key_b);
    account_context *new_ctx = saved(rotated, &new_b);
    idtext a = txt(&new_b.account_id);
    const char *v[2] = {a.s, id_k2};
    assert_int_equal(sql_int("SELECT count(*) FROM events WHERE aggregate_id "
                             "= $1 AND key_id = $2",
                             2, v),
                     2);
    int64_t balance;
    es_error err = {0};
    assert_int_equal(load(rotated, &old_b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 1);
    assert_int_equal(load(rotated, &new_b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 2);
    /* Old aggregates go on with their own data key after the rotation. */
    account_event add = account_add(5);
    assert_int_equal(account_record(old_ctx, &add, &err), 0);
    assert_int_equal(fixture_save_commit(rotated,
                                         account_context_raw(old_ctx), &err),
                     0);
    assert_int_equal(load(g_k1, &old_b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 6);
    /* Once the old key is retired, what it wrapped no longer opens. */
    es_store *only_new = open_store(id_k2, key_b, NULL, NULL);
    assert_int_equal(load(only_new, &new_b.account_id, &balance, &err), 0);
    assert_int_equal(load(only_new, &old_b.account_id, &balance, &err),
                     ES_EDECRYPT);
    assert_non_null(strstr(err.message, id_k1));
    assert_int_equal(es_store_close(only_new), 0);
    assert_int_equal(es_store_close(rotated), 0);
    account_context_free(old_ctx);
    account_context_free(new_ctx);
}

static void test_pg_encryption_crypto_shredding(void **state)
{
    (void)state;
    account_builder gone, kept;
    account_builder_init(&gone);
    account_builder_init(&kept);
    account_builder_with_add(&gone, 10);
    account_builder_with_add(&kept, 20);
    account_context *gone_ctx = saved(g_k1, &gone);
    account_context *kept_ctx = saved(g_k1, &kept);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, &gone.account_id, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);

    int64_t balance;
    assert_int_equal(load(g_k1, &gone.account_id, &balance, &err),
                     ES_EFORGOTTEN);
    assert_true(es_uuid_equal(&err.aggregate_id, &gone.account_id));
    assert_int_equal(load(g_k1, &kept.account_id, &balance, &err), 0);
    assert_int_equal(balance, 20);
    size_t n = 0;
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_txn_stream(txn, &gone.account_id, 0, count_event, &n,
                                   &err),
                     ES_EFORGOTTEN);
    es_txn_rollback(txn);
    /* Its side effects are dead letters, the others still pending. */
    assert_int_equal(fixture_side_effect_count(g_k1, &gone.account_id), 0);
    assert_int_equal(fixture_side_effect_count(g_k1, &kept.account_id), 2);
    /* It can never be written again. */
    account_event add = account_add(1);
    assert_int_equal(account_record(gone_ctx, &add, &err), 0);
    assert_int_equal(fixture_save_commit(g_k1, account_context_raw(gone_ctx),
                                         &err),
                     ES_EFORGOTTEN);
    /* Forgetting twice is fine; a store without keys cannot forget. */
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, &gone.account_id, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(es_store_begin(g_plain, &txn, &err), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, &kept.account_id, &err),
                     ES_EINVAL);
    es_txn_rollback(txn);
    es_store *mem = NULL;
    assert_int_equal(es_memory_store_open(&mem, &err), 0);
    assert_int_equal(es_store_begin(mem, &txn, &err), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, &kept.account_id, &err),
                     ES_EINVAL);
    es_txn_rollback(txn);
    es_store_close(mem);
    account_context_free(gone_ctx);
    account_context_free(kept_ctx);
}

typedef struct late_writer {
    pthread_t thread;
    account_context *ctx;
    int rc;
} late_writer;

static void *late_writer_main(void *arg)
{
    late_writer *w = arg;
    es_error err = {0};
    w->rc = fixture_save_commit(g_k1, account_context_raw(w->ctx), &err);
    return NULL;
}

/* A save racing a forget of the same aggregate waits for it and then
 * fails: nothing is sealed with a key being destroyed. */
static void test_pg_encryption_forget_races_writer(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved(g_k1, &b);
    account_event add = account_add(1);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, &b.account_id, &err), 0);
    late_writer w = {0, ctx, 1};
    assert_int_equal(pthread_create(&w.thread, NULL, late_writer_main, &w),
                     0);
    /* The race is only exercised if the writer arrives before the commit:
     * wait until it waits on a lock in its statement on the key row. */
    bool blocked = false;
    for (int i = 0; i < 1000 && !blocked; i++) {
        blocked = sql_int("SELECT count(*) FROM pg_stat_activity WHERE "
                          "datname = current_database() AND "
                          "wait_event_type = 'Lock' AND "
                          "query ILIKE '%data_keys%FOR SHARE%'",
                          0, NULL) == 1;
        if (!blocked) usleep(10 * 1000);
    }
    /* commit and join before asserting, so a failure leaves no thread */
    assert_int_equal(es_txn_commit(txn, &err), 0);
    pthread_join(w.thread, NULL);
    if (!blocked) fail_msg("the writer never waited on the key row (10 s)");
    assert_int_equal(w.rc, ES_EFORGOTTEN);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    assert_int_equal(sql_int("SELECT count(*) FROM events WHERE aggregate_id "
                             "= $1", 1, v),
                     1);
    account_context_free(ctx);
}

static void test_pg_encryption_tampered_rows(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_add(&b, 1);
    account_context *ctx = saved(g_k1, &b);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    int64_t balance;
    es_error err = {0};
    /* A snapshot that does not open is a cache miss: replay. */
    sql_int("UPDATE snapshots SET payload = substring(payload from 1 for 30) "
            "WHERE aggregate_id = $1", 1, v);
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 101);
    /* Events swapped between versions do not open (versions are bound). */
    sql_int("UPDATE events e SET payload = o.payload FROM events o WHERE "
            "e.aggregate_id = $1 AND o.aggregate_id = $1 AND "
            "o.version = 3 - e.version AND e.version IN (1, 2)", 1, v);
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), ES_EDECRYPT);
    assert_non_null(strstr(err.message, "does not open"));
    /* Truncated: the same. */
    sql_int("UPDATE events SET payload = substring(payload from 1 for 20) "
            "WHERE aggregate_id = $1 AND version = 0", 1, v);
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), ES_EDECRYPT);
    /* A data key row deleted: the data is gone, not garbage. */
    sql_int("DELETE FROM data_keys WHERE aggregate_id = $1", 1, v);
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err),
                     ES_EFORGOTTEN);
    account_context_free(ctx);
}

static void test_pg_encryption_reads_plaintext_rows(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 3);
    account_context *ctx = saved(g_plain, &b);
    int64_t balance;
    es_error err = {0};
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 3);
    /* New events of that aggregate are sealed; both kinds read back. */
    account_event add = account_add(4);
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(fixture_save_commit(g_k1, account_context_raw(ctx),
                                         &err),
                     0);
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 7);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    assert_int_equal(sql_int("SELECT count(*) FROM events WHERE aggregate_id "
                             "= $1 AND key_id IS NULL",
                             1, v),
                     2);
    account_context_free(ctx);
}

static void test_pg_encryption_bad_keys_rejected(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_add_key(cfg, "", key_a, &err), ES_EINVAL);
    assert_int_equal(es_pg_config_add_key(cfg, "a b", key_a, &err),
                     ES_EINVAL);
    assert_int_equal(es_pg_config_add_key(cfg, "x'; --", key_a, &err),
                     ES_EINVAL);
    assert_int_equal(es_pg_config_add_key(cfg, NULL, key_a, &err), ES_EINVAL);
    assert_int_equal(es_pg_config_add_key(cfg, "k", NULL, &err), ES_EINVAL);
    assert_int_equal(es_pg_config_add_key(cfg, "k:2026-11.a", key_a, &err),
                     0);
    assert_int_equal(es_pg_config_add_key(cfg, "k:2026-11.a", key_b, &err),
                     ES_EINVAL);
    es_pg_config_free(cfg);
}

/* A master-key provider standing in for a KMS: its own key, counters, and
 * an outage switch. */
typedef struct fake_kms {
    pthread_mutex_t lock;
    uint8_t key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
    int wraps, unwraps;
    bool down;
} fake_kms;

static bool kms_enter(fake_kms *k, int *counter, es_error *err)
{
    pthread_mutex_lock(&k->lock);
    (*counter)++;
    bool down = k->down;
    pthread_mutex_unlock(&k->lock);
    if (down) snprintf(err->message, sizeof err->message, "kms unreachable");
    return !down;
}

static int kms_current(void *ud, char key_id[ES_PG_KEY_ID_MAX + 1],
                       es_error *err)
{
    (void)ud;
    (void)err;
    strcpy(key_id, "kms:v1");
    return 0;
}

static int kms_wrap(void *ud, const char *key_id, const es_uuid *agg,
                    const uint8_t dek[ES_PG_KEY_BYTES],
                    uint8_t out[ES_PG_WRAPPED_MAX], size_t *len,
                    es_error *err)
{
    fake_kms *k = ud;
    (void)key_id;
    if (!kms_enter(k, &k->wraps, err)) return ES_EIO;
    randombytes_buf(out, 24);
    crypto_aead_xchacha20poly1305_ietf_encrypt(out + 24, NULL, dek,
                                               ES_PG_KEY_BYTES, agg->bytes,
                                               16, NULL, out, k->key);
    *len = 24 + ES_PG_KEY_BYTES + 16;
    return 0;
}

static int kms_unwrap(void *ud, const char *key_id, const es_uuid *agg,
                      const uint8_t *wrapped, size_t len,
                      uint8_t dek[ES_PG_KEY_BYTES], es_error *err)
{
    fake_kms *k = ud;
    (void)key_id;
    if (!kms_enter(k, &k->unwraps, err)) return ES_EIO;
    if (len != 24 + ES_PG_KEY_BYTES + 16 ||
        crypto_aead_xchacha20poly1305_ietf_decrypt(
            dek, NULL, NULL, wrapped + 24, len - 24, agg->bytes, 16, wrapped,
            k->key) != 0) {
        snprintf(err->message, sizeof err->message, "kms: does not open");
        return ES_EDECRYPT;
    }
    return 0;
}

static void test_pg_encryption_key_provider(void **state)
{
    (void)state;
    fake_kms kms;
    memset(&kms, 0, sizeof kms);
    pthread_mutex_init(&kms.lock, NULL);
    crypto_aead_xchacha20poly1305_ietf_keygen(kms.key);
    es_pg_key_provider provider = {kms_current, kms_wrap, kms_unwrap, &kms};
    es_pg_key_provider half = {kms_current, NULL, kms_unwrap, &kms};
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_key_provider(cfg, &half, &err),
                     ES_EINVAL);
    assert_int_equal(es_pg_config_set_key_provider(cfg, &provider, &err), 0);
    /* keys and a provider at once: refused */
    assert_int_equal(es_pg_config_add_key(cfg, "k", key_a, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), ES_EINVAL);
    es_pg_config_free(cfg);
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_key_provider(cfg, &provider, &err), 0);
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    es_pg_config_free(cfg);

    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 12);
    account_context *ctx = saved(store, &b);
    assert_int_equal(kms.wraps, 1); /* one data key for the aggregate */
    assert_int_equal(kms.unwraps, 0);
    int64_t balance;
    assert_int_equal(load(store, &b.account_id, &balance, &err), 0);
    assert_int_equal(balance, 12);
    assert_int_equal(kms.unwraps, 1); /* once per transaction, not per row */
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    assert_int_equal(sql_int("SELECT count(*) FROM events WHERE aggregate_id "
                             "= $1 AND key_id = 'kms:v1'",
                             1, v),
                     2);
    /* Without the provider the data does not open... */
    assert_int_equal(load(g_k1, &b.account_id, &balance, &err), ES_EDECRYPT);
    /* ...and an outage is an outage (retry later), not a bad key. */
    kms.down = true;
    assert_int_equal(load(store, &b.account_id, &balance, &err), ES_EIO);
    assert_non_null(strstr(err.message, "kms unreachable"));
    kms.down = false;
    assert_int_equal(load(store, &b.account_id, &balance, &err), 0);
    assert_int_equal(es_store_close(store), 0);
    pthread_mutex_destroy(&kms.lock);
    account_context_free(ctx);
}

/* ==== rejected commands ==== */

/* A rejected command's record, as the host makes it. */
static es__command_record rejection(const es_uuid *cmd, const es_uuid *agg,
                                    const char *reason)
{
    es__command_record r;
    memset(&r, 0, sizeof r);
    r.command_id = *cmd;
    r.aggregate_id = *agg;
    r.kind = 2;
    r.payload = (const uint8_t *)"take 50";
    r.len = 7;
    r.first_version = r.version = UINT64_MAX;
    r.rejected = true;
    r.reason = reason;
    return r;
}

static int put_record(es_store *store, const es__command_record *rec,
                      es_error *err)
{
    es_txn *txn = NULL;
    bool ins = false;
    int rc = es_store_begin(store, &txn, err);
    if (rc != 0) return rc;
    rc = es__txn_insert_commands(txn, rec, 1, &ins, err);
    if (rc == 0 && !ins) rc = ES_EIDEMPOTENCY;
    if (rc == 0) return es_txn_commit(txn, err);
    es_txn_rollback(txn);
    return rc;
}

/* The record of cmd read from store; *out NULL unless 0 is returned. */
static int get_record(es_store *store, const es_uuid *cmd,
                      es__command_record **out, es_error *err)
{
    es_txn *txn = NULL;
    int rc = es_store_begin(store, &txn, err);
    if (rc != 0) return rc;
    rc = es__txn_get_command(txn, cmd, out, err);
    es_txn_rollback(txn);
    return rc;
}

/* Rows of the commands table of cmd with that key id (NULL: none) whose
 * stored rejection holds the text `in` (as bytes). */
static long long rejection_rows(const char *table, const es_uuid *cmd,
                                const char *key_id, const char *in)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT count(*) FROM %s WHERE command_id = $1 "
             "AND rejection IS NOT NULL AND rejection_key IS NOT DISTINCT "
             "FROM $2 AND position($3::bytea in rejection) > 0", table);
    idtext c = txt(cmd);
    const char *v[3] = {c.s, key_id, in};
    return sql_int(q, 3, v);
}

/* The generic write path (insert_commands): with keys a rejection's
 * reason is sealed with the aggregate's data key, bound to its command
 * id; without, it stays in clear and reads back with keys; once the
 * aggregate is forgotten, its record reads without the reason. */
static void test_pg_encryption_rejection_reason(void **state)
{
    (void)state;
    const char *why = "insufficient funds for user@example.com: "
                      "balance 12, asked 50";
    es_uuid agg, c1, c2, c3, plain_agg;
    es_uuid_v7(&agg);
    es_uuid_v7(&c1);
    es_uuid_v7(&c2);
    es_uuid_v7(&c3);
    es_uuid_v7(&plain_agg);
    es_error err = {0};
    es__command_record r1 = rejection(&c1, &agg, why);
    es__command_record r2 = rejection(&c2, &agg, "other reason");
    assert_int_equal(put_record(g_k1, &r1, &err), 0);
    assert_int_equal(put_record(g_k1, &r2, &err), 0);
    /* at rest: sealed, the master key id beside it; no clear text */
    assert_int_equal(rejection_rows("commands", &c1, id_k1, ""), 1);
    assert_int_equal(rejection_rows("commands", &c1, id_k1, "user@"), 0);
    assert_int_equal(rejection_rows("commands", &c1, id_k1, "balance"), 0);

    es__command_record *got = NULL;
    assert_int_equal(get_record(g_k1, &c1, &got, &err), 0);
    assert_true(got->rejected);
    assert_false(got->forgotten);
    assert_string_equal(got->reason, why);
    es__free(got);
    /* a store without the key does not open it */
    assert_int_equal(get_record(g_plain, &c1, &got, &err), ES_EDECRYPT);
    assert_null(got);
    assert_null(strstr(err.message, "user@"));
    /* a sealed reason moved to another command's row does not open */
    idtext s1 = txt(&c1), s2 = txt(&c2);
    const char *mv[2] = {s2.s, s1.s};
    assert_int_equal(sql_int("UPDATE commands SET rejection = (SELECT "
                             "rejection FROM commands WHERE command_id = "
                             "$2) WHERE command_id = $1",
                             2, mv),
                     -1);
    assert_int_equal(get_record(g_k1, &c2, &got, &err), ES_EDECRYPT);
    assert_true(es_uuid_equal(&err.aggregate_id, &agg));

    /* without keys: in clear, no key id; a store with keys reads it */
    es__command_record r3 = rejection(&c3, &plain_agg, why);
    assert_int_equal(put_record(g_plain, &r3, &err), 0);
    assert_int_equal(rejection_rows("commands", &c3, NULL, "user@"), 1);
    assert_int_equal(get_record(g_k1, &c3, &got, &err), 0);
    assert_string_equal(got->reason, why);
    es__free(got);

    /* a reason of agg kept in clear (as before migration 9) */
    es_uuid c5;
    es_uuid_v7(&c5);
    es__command_record r5 = rejection(&c5, &agg, why);
    assert_int_equal(put_record(g_plain, &r5, &err), 0);
    assert_int_equal(rejection_rows("commands", &c5, NULL, "user@"), 1);

    /* crypto-shredding: the record stays (its id is taken), the reason
     * is gone, the one in clear too; the aggregate takes no new
     * rejection */
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_k1, &txn, &err), 0);
    assert_int_equal(es_pg_forget_aggregate(txn, &agg, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(get_record(g_k1, &c1, &got, &err), 0);
    assert_true(got->rejected);
    assert_true(got->forgotten);
    assert_null(got->reason);
    assert_true(es_uuid_equal(&got->aggregate_id, &agg));
    es__free(got);
    assert_int_equal(rejection_rows("commands", &c5, NULL, ""), 0);
    assert_int_equal(rejection_rows("commands", &c5, "", "user@"), 0);
    assert_int_equal(rejection_rows("commands", &c5, "", ""), 1);
    assert_int_equal(get_record(g_k1, &c5, &got, &err), 0);
    assert_true(got->rejected);
    assert_true(got->forgotten);
    assert_null(got->reason);
    es__free(got);
    es_uuid c4;
    es_uuid_v7(&c4);
    es__command_record r4 = rejection(&c4, &agg, why);
    assert_int_equal(put_record(g_k1, &r4, &err), ES_EFORGOTTEN);
    /* the plain one is untouched by it */
    assert_int_equal(get_record(g_k1, &c3, &got, &err), 0);
    assert_string_equal(got->reason, why);
    es__free(got);
}

/* Migration 9 on a schema at 8 with a rejection stored then (in clear,
 * no key column): it adds rejection_key, the old row still reads, and
 * new ones are sealed. */
static void test_pg_encryption_migration_9(void **state)
{
    (void)state;
    char schema[64], q[512];
    fixture_pg_random_name(schema, sizeof schema, "mig9_");
    es_store *st = NULL;
    assert_int_equal(fixture_pg_open(schema, &st), 0);
    es_store_close(st);
    /* back to 8: what a database migrated by the previous release has */
    snprintf(q, sizeof q, "ALTER TABLE \"%s\".commands DROP COLUMN "
             "rejection_key; DELETE FROM \"%s\".es_migrations WHERE "
             "version = 9", schema, schema);
    PQclear(PQexec(g_sql, q));
    snprintf(q, sizeof q, "SELECT count(*) FROM information_schema.columns "
             "WHERE table_schema = $1 AND table_name = 'commands' AND "
             "column_name = 'rejection_key'");
    const char *sv[1] = {schema};
    assert_int_equal(sql_int(q, 1, sv), 0);
    es_uuid old_cmd, agg;
    es_uuid_v7(&old_cmd);
    es_uuid_v7(&agg);
    idtext oc = txt(&old_cmd), ag = txt(&agg);
    char ins[512];
    snprintf(ins, sizeof ins, "INSERT INTO \"%s\".commands (command_id, "
             "aggregate_id, kind, digest, first_version, event_count, "
             "version, rejection) VALUES ($1, $2, 2, '\\x00', -1, 0, -1, "
             "'short: 0 < 5'::bytea)", schema);
    const char *iv[2] = {oc.s, ag.s};
    assert_int_equal(sql_int(ins, 2, iv), -1);

    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_schema(cfg, schema, &err), 0);
    assert_int_equal(es_pg_config_add_key(cfg, id_k1, key_a, &err), 0);
    int version = 0;
    assert_int_equal(es_pg_migrate(cfg, &version, &err), 0);
    assert_int_equal(version, es_pg_schema_version());
    assert_int_equal(version, 12);
    assert_int_equal(sql_int(q, 1, sv), 1);
    assert_int_equal(es_pg_store_open(cfg, &st, &err), 0);
    es_pg_config_free(cfg);

    es__command_record *got = NULL;
    assert_int_equal(get_record(st, &old_cmd, &got, &err), 0);
    assert_true(got->rejected);
    assert_string_equal(got->reason, "short: 0 < 5");
    es__free(got);
    es_uuid new_cmd;
    es_uuid_v7(&new_cmd);
    es__command_record r = rejection(&new_cmd, &agg, "short: 0 < 6");
    assert_int_equal(put_record(st, &r, &err), 0);
    char table[128];
    snprintf(table, sizeof table, "\"%s\".commands", schema);
    assert_int_equal(rejection_rows(table, &new_cmd, id_k1, ""), 1);
    assert_int_equal(rejection_rows(table, &new_cmd, id_k1, "short"), 0);
    assert_int_equal(get_record(st, &new_cmd, &got, &err), 0);
    assert_string_equal(got->reason, "short: 0 < 6");
    es__free(got);
    es_store_close(st);
    fixture_pg_drop_schema(schema);
}

/* ---- setup ---- */

static int group_setup(void **state)
{
    (void)state;
    for (size_t i = 0; i < ES_PG_KEY_BYTES; i++) {
        key_a[i] = (uint8_t)(i * 7 + 1);
        key_b[i] = (uint8_t)(i * 13 + 5);
    }
    /* Fresh key ids per run: rows of earlier runs are no concern. */
    es_uuid r = fixture_new_id();
    snprintf(id_k1, sizeof id_k1, "k1-%02x%02x%02x", r.bytes[13], r.bytes[14],
             r.bytes[15]);
    snprintf(id_k2, sizeof id_k2, "k2-%02x%02x%02x", r.bytes[13], r.bytes[14],
             r.bytes[15]);
    if (fixture_pg_open(NULL, &g_plain) != 0) return -1;
    g_k1 = open_store(id_k1, key_a, NULL, NULL);
    g_sql = fixture_pg_connect();
    return g_sql ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    es_store_close(g_plain);
    es_store_close(g_k1);
    PQfinish(g_sql);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_encryption_aggregate_saved_and_loaded),
        cmocka_unit_test(test_pg_encryption_event_loaded_by_id),
        cmocka_unit_test(test_pg_encryption_stream),
        cmocka_unit_test(test_pg_encryption_side_effects),
        cmocka_unit_test(test_pg_encryption_idempotent_resave),
        cmocka_unit_test(test_pg_encryption_wrong_key),
        cmocka_unit_test(test_pg_encryption_key_rotation),
        cmocka_unit_test(test_pg_encryption_crypto_shredding),
        cmocka_unit_test(test_pg_encryption_forget_races_writer),
        cmocka_unit_test(test_pg_encryption_tampered_rows),
        cmocka_unit_test(test_pg_encryption_reads_plaintext_rows),
        cmocka_unit_test(test_pg_encryption_bad_keys_rejected),
        cmocka_unit_test(test_pg_encryption_key_provider),
        cmocka_unit_test(test_pg_encryption_rejection_reason),
        cmocka_unit_test(test_pg_encryption_migration_9),
    };
    return FIXTURE_PG_RUN_GROUP("test_pg_encryption", tests, group_setup,
                                group_teardown);
}
