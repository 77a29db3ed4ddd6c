/*
 * The PostgreSQL store itself: es_pg_store_open (and its close),
 * es_pg_forget_aggregate, es_pg_status_get, and the function table
 * through which store.c calls the backend.
 */
#include "store/pg/pg_int.h"

/* ---- the store ---- */

static void pg_close(es_store *store)
{
    pg_store *s = (pg_store *)store;
    es__pg_announcer_stop(s);
    for (size_t i = 0; i < s->n_idle; i++) PQfinish(s->idle[i]);
    for (int i = 0; i < SQL_COUNT; i++) es__free(s->sql[i]);
    es__free(s->idle);
    if (s->keys) sodium_memzero(s->keys, s->n_keys * sizeof *s->keys);
    es__free(s->keys);
    if (s->password) {
        memset(s->password, 0, strlen(s->password));
        es__free(s->password);
    }
    es__free(s->conninfo);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    es__store_destroy(&s->base);
    es__free(s);
}

static const es__txn_ops pg_txn_ops = {
    .begin = es__pg_begin,
    .begin_bounded = es__pg_begin_bounded,
    .begin_read = es__pg_begin_read,
    .commit = es__pg_commit,
    .rollback = es__pg_rollback,
    .savepoint = es__pg_savepoint,
    .rollback_to = es__pg_rollback_to,
    .release = es__pg_release,
    .begin_background = es__pg_begin_background,
    .background_close = es__pg_background_close,
};

static const es__core_ops pg_core_ops = {
    .stream = es__pg_stream,
    .get_event = es__pg_get_event,
    .insert_events = es__pg_insert_events,
    .insert_side_effects = es__pg_insert_side_effects,
    .get_snapshot = es__pg_get_snapshot,
    .store_snapshot = es__pg_store_snapshot,
    .delete_snapshots = es__pg_delete_snapshots,
    .list_side_effects = es__pg_list_side_effects,
};

static const es__command_ops pg_command_ops = {
    .insert = es__pg_insert_commands,
    .get = es__pg_get_command,
    .purge = es__pg_purge_commands,
};

/* lanes 0: the host's default for a database. */
static const es__batch_ops pg_batch_ops = {
    .write = es__pg_write_batch,
    .lane_open = es__pg_lane_open,
    .lane_write = es__pg_lane_write,
    .lane_close = es__pg_lane_close,
};

static const es__outbox_ops pg_outbox_ops = {
    .claim = es__pg_outbox_claim,
    .finish = es__pg_outbox_finish,
    .finish_many = es__pg_outbox_finish_many,
    .list = es__pg_outbox_list,
    .get = es__pg_outbox_get,
    .requeue = es__pg_outbox_requeue,
    .purge = es__pg_outbox_purge,
    .stats = es__pg_outbox_stats,
    .watch = es__pg_outbox_watch,
    .unwatch = es__pg_outbox_unwatch,
};

const es_store_ops es__pg_ops = {
    .name = "postgres",
    .version = ES__STORE_OPS_VERSION,
    .txn = &pg_txn_ops,
    .core = &pg_core_ops,
    .commands = &pg_command_ops,
    .batch = &pg_batch_ops,
    .outbox = &pg_outbox_ops,
    .read = &es__pg_read_ops,
    .close = pg_close,
};

int es_pg_store_open(const es_pg_config *cfg, es_store **out, es_error *err)
{
    if (cfg == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "config and out are required");
    const char *ci = NULL;
    int rc = es__pg_resolve_conninfo(cfg, &ci, err);
    if (rc != 0) return rc;
    pg_store *s = es__calloc(1, sizeof *s);
    if (s == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    es__store_init(&s->base, &es__pg_ops);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    es__pg_announcer_init(s);
    s->chunk = cfg->chunk;
    s->statement_timeout_ms = cfg->statement_timeout_ms;
    s->notify = !cfg->no_notify;
    s->max = cfg->pool_size;
    if ((rc = es__pg_conninfo_check(ci, &s->password, err)) != 0) {
        pg_close(&s->base);
        return rc == ES_EINVAL ? es__error_set(err, ES_EDB, "connection "
                                               "string could not be parsed")
                               : rc;
    }
    if (sodium_init() < 0) {
        pg_close(&s->base);
        return es__error_set(err, ES_EIO, "libsodium could not start");
    }
    if (cfg->n_keys > 0 && cfg->provider.wrap != NULL) {
        pg_close(&s->base);
        return es__error_set(err, ES_EINVAL, "give master keys or a key "
                             "provider, not both");
    }
    if (cfg->n_keys > 0) {
        s->keys = es__memdup(cfg->keys, cfg->n_keys * sizeof *cfg->keys);
        s->n_keys = s->keys ? cfg->n_keys : 0;
        s->provider =
            (es_pg_key_provider){es__pg_keyring_current, es__pg_keyring_wrap,
                                 es__pg_keyring_unwrap, s};
        s->encrypt = true;
    } else if (cfg->provider.wrap != NULL) {
        s->provider = cfg->provider;
        s->encrypt = true;
    }
    if (es__pg_conninfo_with_defaults(ci, &s->conninfo) != 0)
        s->conninfo = NULL;
    s->idle = es__calloc(s->max, sizeof *s->idle);
    if (s->conninfo == NULL || s->idle == NULL ||
        (cfg->n_keys > 0 && s->keys == NULL) || es__pg_build_sql(s, cfg) != 0) {
        pg_close(&s->base);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    PGconn *c = NULL;
    if ((rc = es__pg_store_connect(s, &c, err)) != 0) {
        pg_close(&s->base);
        return rc;
    }
    s->idle[s->n_idle++] = c;
    s->n_open = 1;
    *out = &s->base;
    return 0;
}

int es_pg_forget_aggregate(es_txn *txn, const es_uuid *aggregate_id,
                           es_error *err)
{
    if (txn == NULL || aggregate_id == NULL)
        return es__error_set(err, ES_EINVAL, "transaction and aggregate id "
                                             "are required");
    if (txn->store->ops != &es__pg_ops)
        return es__error_set(err, ES_EINVAL, "not a transaction of a "
                                             "PostgreSQL store");
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (!s->encrypt)
        return es__error_set(err, ES_EINVAL, "the store has no keys: "
                             "nothing of it is encrypted, so nothing can be "
                             "forgotten by destroying a key");
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)aggregate_id->bytes};
    const int lens[1] = {16};
    es__pg_dek_cache_clear(t);
    int rc =
        es__pg_run(t->conn, "forget: destroy data key", s->sql[SQL_FORGET_KEY],
                   1, types, values, lens, NULL, err);
    if (rc == 0)
        rc = es__pg_run(t->conn, "forget: delete snapshots",
                        s->sql[SQL_DELETE_SNAPSHOTS], 1, types, values, lens,
                        NULL, err);
    if (rc == 0)
        rc = es__pg_run(t->conn, "forget: side effects",
                        s->sql[SQL_FORGET_SIDE_EFFECTS], 1, types, values, lens,
                        NULL, err);
    if (rc == 0)
        rc = es__pg_run(t->conn, "forget: rejection reasons in clear",
                        s->sql[SQL_FORGET_REASONS], 1, types, values, lens,
                        NULL, err);
    return rc;
}

int es_pg_status_get(es_store *store, es_pg_status *out, es_error *err)
{
    if (store == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "store and out are required");
    if (store->ops != &es__pg_ops)
        return es__error_set(err, ES_EINVAL, "not a PostgreSQL store");
    pg_store *s = (pg_store *)store;
    memset(out, 0, sizeof *out);
    out->library_version = es_pg_schema_version();
    es_txn *txn = NULL;
    int rc = es__pg_begin(store, &txn, err);
    if (rc != 0) return rc;
    pg_txn *t = (pg_txn *)txn;
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {s->migrations};
    const int lens[1] = {(int)strlen(s->migrations)};
    PGresult *r = NULL;
    rc = es__pg_run(t->conn, "status: find migrations table",
                    "SELECT to_regclass($1) IS NOT NULL", 1, types, values,
                    lens, &r, err);
    bool migrated = rc == 0 && PQntuples(r) == 1 &&
                    PQgetlength(r, 0, 0) == 1 && PQgetvalue(r, 0, 0)[0] == 1;
    if (rc == 0) PQclear(r);
    int64_t v[5] = {0, 0, 0, 0, 0};
    if (rc == 0 && migrated) {
        rc = es__pg_run(t->conn, "status: schema version",
                        s->sql[SQL_STATUS_VERSION], 0, NULL, NULL, NULL, &r,
                        err);
        if (rc == 0 && (PQntuples(r) != 1 || !es__pg_col_i64(r, 0, 0, &v[0])))
            rc = es__pg_bad_row(err, "status");
        if (r != NULL) PQclear(r);
        r = NULL;
        out->schema_version = rc == 0 ? (int)v[0] : 0;
    }
    /* The counts need every table, so only at the library's version. */
    if (rc == 0 && out->schema_version >= out->library_version) {
        rc = es__pg_run(t->conn, "status: counts", s->sql[SQL_STATUS_COUNTS], 0,
                        NULL, NULL, NULL, &r, err);
        for (int i = 0; rc == 0 && i < 5; i++)
            if (PQntuples(r) != 1 || !es__pg_col_i64(r, 0, i, &v[i]))
                rc = es__pg_bad_row(err, "status");
        if (r != NULL) PQclear(r);
        if (rc == 0) {
            out->events = (uint64_t)v[0];
            out->aggregates = (uint64_t)v[1];
            out->snapshots = (uint64_t)v[2];
            out->data_keys = (uint64_t)v[3];
            out->forgotten = (uint64_t)v[4];
        }
    }
    es__pg_rollback(txn);
    return rc;
}
