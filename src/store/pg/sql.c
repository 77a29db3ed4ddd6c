/*
 * The text of every statement of the PostgreSQL store, built once when
 * the store opens (es__pg_build_sql), with the names of its statements
 * for messages and the plan test (es__pg_statement, statements.h).
 *
 * Events of one save go in one statement (arrays + unnest), skipping rows
 * whose (aggregate, event id) or (aggregate, version) exists (ON CONFLICT
 * DO NOTHING); RETURNING says which went in, and the core decides what a
 * skipped row means.
 */
#include "store/pg/pg_int.h"

/* Names for messages and the plan test; admin: run only by an operator's
 * tool (es_pg_status_get, outbox listings and purges), so a scan there
 * costs no command anything. */
const sql_entry es__pg_sql_info[SQL_COUNT] = {
    [SQL_INSERT_EVENTS] = {"insert events", false},
    [SQL_STREAM] = {"stream", false},
    [SQL_STREAM_REST] = {"stream: the rest", false},
    [SQL_TYPE_OF] = {"type of", false},
    [SQL_GET_EVENT] = {"get event", false},
    [SQL_INSERT_SIDE_EFFECTS] = {"insert side effects", false},
    [SQL_LIST_SIDE_EFFECTS] = {"list side effects", true},
    [SQL_GET_SNAPSHOT] = {"get snapshot", false},
    [SQL_STORE_SNAPSHOT] = {"store snapshot", false},
    [SQL_DELETE_SNAPSHOTS] = {"delete snapshots", false},
    [SQL_GET_KEY] = {"get key", false},
    [SQL_LOCK_KEY] = {"lock key", false},
    [SQL_PUT_KEY] = {"put key", false},
    [SQL_FORGET_KEY] = {"forget key", false},
    [SQL_FORGET_SIDE_EFFECTS] = {"forget side effects", false},
    [SQL_FORGET_REASONS] = {"forget reasons", false},
    [SQL_OB_EXPIRE] = {"outbox: expire", false},
    [SQL_OB_CLAIM] = {"outbox: claim", false},
    [SQL_OB_DEAD] = {"outbox: dead", false},
    [SQL_OB_FINISH] = {"outbox: finish", false},
    [SQL_OB_FINISH_MANY] = {"outbox: finish many", false},
    [SQL_OB_EXISTS] = {"outbox: exists", false},
    [SQL_OB_LIST] = {"outbox: list", true},
    [SQL_OB_GET] = {"outbox: get", false},
    [SQL_OB_REQUEUE_ID] = {"outbox: requeue one", false},
    [SQL_OB_REQUEUE_TYPE] = {"outbox: requeue a type", true},
    [SQL_OB_PURGE] = {"outbox: purge", false},
    [SQL_OB_STATS] = {"outbox: stats", true},
    [SQL_INSERT_COMMANDS] = {"insert commands", false},
    [SQL_GET_COMMAND] = {"get command", false},
    [SQL_PURGE_COMMANDS] = {"purge commands", false},
    [SQL_STATUS_VERSION] = {"status: version", true},
    [SQL_STATUS_COUNTS] = {"status: counts", true},
    [SQL_BATCH_EVENTS] = {"batch: insert events", false},
    [SQL_BATCH_SIDE_EFFECTS] = {"batch: insert side effects", false},
    [SQL_READ_ALL] = {"read all", false},
    [SQL_HEAD] = {"head", false},
    [SQL_LAG] = {"lag", false},
    [SQL_CP_GET] = {"checkpoint: get", false},
    [SQL_CP_PUT] = {"checkpoint: put", false},
    [SQL_CP_DELETE] = {"checkpoint: delete", false},
    [SQL_CP_LIST] = {"checkpoint: list", true},
};

__attribute__((format(printf, 1, 2))) char *es__pg_sqlf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return NULL;
    char *s = es__malloc((size_t)n + 1);
    if (s == NULL) return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

const char *es__pg_statement(const es_store *store, size_t i, const char **name,
                             bool *admin)
{
    if (store == NULL || store->ops != &es__pg_ops || i >= SQL_COUNT)
        return NULL;
    *name = es__pg_sql_info[i].name;
    *admin = es__pg_sql_info[i].admin;
    return ((const pg_store *)store)->sql[i];
}

int es__pg_build_sql(pg_store *s, const es_pg_config *cfg)
{
    char e[2 * NAME_BUF + 8], sn[2 * NAME_BUF + 8], o[2 * NAME_BUF + 8];
    char k[2 * NAME_BUF + 8], m[2 * NAME_BUF + 8], cm[2 * NAME_BUF + 8];
    es__pg_qualify(cm, sizeof cm, cfg->schema,
                   cfg->tables[ES_PG_TABLE_COMMANDS]);
    s->sql[SQL_INSERT_COMMANDS] = es__pg_sqlf(
        "INSERT INTO %s (command_id, aggregate_id, kind, digest, "
        "first_version, event_count, version, rejection, rejection_key) "
        "SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::integer[], "
        "$4::bytea[], $5::bigint[], $6::bigint[], $7::bigint[], "
        "$8::bytea[], $9::text[]) "
        "ON CONFLICT (command_id) DO NOTHING RETURNING command_id",
        cm);
    /* Retention of command ids: a bounded batch through the BRIN index
     * on created_at (rows go in in time order; migration 11). */
    s->sql[SQL_PURGE_COMMANDS] = es__pg_sqlf(
        "DELETE FROM %s WHERE command_id IN (SELECT command_id FROM %s "
        "WHERE created_at < to_timestamp($1::bigint / 1000.0) LIMIT $2)",
        cm, cm);
    s->sql[SQL_GET_COMMAND] = es__pg_sqlf(
        "SELECT aggregate_id, kind, digest, first_version, event_count, "
        "version, rejection, rejection_key FROM %s WHERE command_id = $1",
        cm);
    es__pg_qualify(k, sizeof k, cfg->schema, cfg->tables[ES_PG_TABLE_KEYS]);
    es__pg_qualify(m, sizeof m, cfg->schema,
                   cfg->tables[ES_PG_TABLE_MIGRATIONS]);
    es__pg_qualify(e, sizeof e, cfg->schema, cfg->tables[ES_PG_TABLE_EVENTS]);
    es__pg_qualify(sn, sizeof sn, cfg->schema,
                   cfg->tables[ES_PG_TABLE_SNAPSHOTS]);
    es__pg_qualify(o, sizeof o, cfg->schema, cfg->tables[ES_PG_TABLE_OUTBOX]);
    /* The migrations table is read only where it exists (to_regclass):
     * the name is a parameter there, and the version query runs only
     * when it was found. */
    s->sql[SQL_STATUS_VERSION] =
        es__pg_sqlf("SELECT coalesce(max(version), 0)::bigint FROM %s", m);
    s->sql[SQL_STATUS_COUNTS] = es__pg_sqlf(
        "SELECT (SELECT count(*) FROM %s), (SELECT count(DISTINCT "
        "aggregate_id) FROM %s), (SELECT count(*) FROM %s), (SELECT count(*) "
        "FROM %s), (SELECT count(*) FROM %s WHERE wrapped IS NULL)",
        e, e, sn, k, k);
    snprintf(s->migrations, sizeof s->migrations, "%s", m);
    es__pg_build_read_sql(s, cfg, e);
    /* The creation event (version 0) holds the aggregate's type: a save
     * under another type is refused instead of mixing two streams. */
    s->sql[SQL_INSERT_EVENTS] = es__pg_sqlf(
        "WITH other AS (SELECT aggregate_type FROM %s WHERE aggregate_id = $2 "
        "AND version = 0 AND aggregate_type <> $1), "
        "ins AS (INSERT INTO %s (aggregate_type, aggregate_id, version, "
        "event_id, kind, payload, key_id) SELECT $1, $2, u.v, u.id, u.k, "
        "u.p, $7 FROM "
        "unnest($3::bigint[], $4::uuid[], $5::integer[], $6::bytea[]) "
        "AS u(v, id, k, p) WHERE NOT EXISTS (SELECT 1 FROM other) "
        "ON CONFLICT DO NOTHING RETURNING version, event_id) "
        "SELECT version, event_id, NULL::text FROM ins UNION ALL "
        "SELECT NULL, NULL, aggregate_type FROM other",
        e, e);
    /* The host's batches (es__pg_write_batch): many aggregates' events in
     * one statement; RETURNING names the rows that went in, and an
     * aggregate whose creation event has another type comes back with a
     * NULL version (none of its rows is inserted).  Not one text with
     * SQL_INSERT_EVENTS: that one writes one aggregate (its type, id and
     * key id as scalars), returns (version, event id, other type) for
     * es__pg_insert_events, and its plan is checked on its own; this one
     * takes them per row and returns (aggregate, version). */
    /* The type check is one primary-key probe per row (LATERAL with
     * LIMIT: never flattened into a join), so its plan cannot turn into a
     * hash join over the whole events table, whatever the estimates of
     * the unnest or the table's statistics say (a generic plan chosen
     * while the table was small did that: 4.5 ms a batch, growing). */
    s->sql[SQL_BATCH_EVENTS] = es__pg_sqlf(
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::uuid[], "
        "$3::bigint[], $4::uuid[], $5::integer[], $6::bytea[], $7::text[]) "
        "AS u(t, a, v, id, k, p, kk)), "
        "other AS (SELECT DISTINCT u.a AS aggregate_id FROM u CROSS JOIN "
        "LATERAL (SELECT e.aggregate_type FROM %s e WHERE e.aggregate_id = "
        "u.a AND e.version = 0 LIMIT 1) AS c WHERE c.aggregate_type <> u.t), "
        "ins AS (INSERT INTO %s (aggregate_type, aggregate_id, version, "
        "event_id, kind, payload, key_id) SELECT u.t, u.a, u.v, u.id, u.k, "
        "u.p, u.kk FROM u WHERE NOT EXISTS (SELECT 1 FROM other o WHERE "
        "o.aggregate_id = u.a) ON CONFLICT DO NOTHING RETURNING aggregate_id, "
        "version) "
        "SELECT aggregate_id, version FROM ins UNION ALL "
        "SELECT aggregate_id, NULL::bigint FROM other",
        e, e);
    /* With NOTIFY in the same statement, like SQL_INSERT_SIDE_EFFECTS. */
    s->sql[SQL_BATCH_SIDE_EFFECTS] = es__pg_sqlf(
        "WITH ins AS (INSERT INTO %s (id, aggregate_id, event_id, kind, "
        "payload, key_id, aggregate_type) SELECT * FROM unnest($1::uuid[], "
        "$2::uuid[], $3::uuid[], $4::integer[], $5::bytea[], $6::text[], "
        "$7::text[]) ON CONFLICT (id) DO NOTHING RETURNING 1) SELECT %s FROM "
        "(SELECT 1 FROM ins LIMIT 1) AS one",
        o, s->notify ? "pg_notify($8, '')" : "$8::text");
    /* Every row carries its type, checked before its payload is opened
     * or handed over (a few bytes a row; the row is read anyway). */
    s->sql[SQL_STREAM] = es__pg_sqlf(
        "SELECT version, event_id, kind, payload, key_id, aggregate_type "
        "FROM %s WHERE aggregate_id = $1 AND version >= $2 ORDER BY version "
        "LIMIT $3",
        e);
    s->sql[SQL_STREAM_REST] = es__pg_sqlf(
        "SELECT version, event_id, kind, payload, key_id, aggregate_type "
        "FROM %s WHERE aggregate_id = $1 AND version >= $2 ORDER BY version",
        e);
    s->sql[SQL_TYPE_OF] =
        es__pg_sqlf("SELECT aggregate_type FROM %s WHERE aggregate_id = $1 AND "
                    "version = 0",
                    e);
    s->sql[SQL_GET_EVENT] = es__pg_sqlf(
        "SELECT aggregate_id, version, kind, payload, key_id FROM %s WHERE "
        "aggregate_id = $2 AND event_id = $1",
        e);
    /* NOTIFY in the same statement (no extra round trip) when a row went
     * in: it is delivered only if the transaction commits, and one
     * transaction's notifications are folded into one.  The result has a
     * row exactly when something was inserted. */
    s->sql[SQL_INSERT_SIDE_EFFECTS] = es__pg_sqlf(
        "WITH ins AS (INSERT INTO %s (id, aggregate_id, event_id, kind, "
        "payload, key_id, aggregate_type) SELECT u.*, $7 FROM "
        "unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::integer[], "
        "$5::bytea[], $6::text[]) AS u ON CONFLICT (id) DO NOTHING "
        "RETURNING 1) SELECT %s FROM (SELECT 1 FROM ins LIMIT 1) AS one",
        o, s->notify ? "pg_notify($8, '')" : "$8::text");
    snprintf(s->channel, sizeof s->channel, "es_outbox_%016llx",
             (unsigned long long)es__pg_fnv1a(o));
    snprintf(s->events_channel, sizeof s->events_channel, "es_events_%016llx",
             (unsigned long long)es__pg_fnv1a(e));
    s->sql[SQL_LIST_SIDE_EFFECTS] = es__pg_sqlf(
        "SELECT id, aggregate_id, event_id, kind, payload, key_id FROM %s "
        "WHERE status = 'pending' AND ($1::uuid IS NULL OR aggregate_id = "
        "$1) ORDER BY seq",
        o);
    /* A snapshot's type is its aggregate's: the creation event's.  Two
     * primary-key probes, one row whether or not either exists. */
    s->sql[SQL_GET_SNAPSHOT] = es__pg_sqlf(
        "SELECT (SELECT aggregate_type FROM %s WHERE aggregate_id = $1 AND "
        "version = 0), s.version, s.payload, s.key_id FROM (SELECT 1) AS one "
        "LEFT JOIN %s s ON s.aggregate_id = $1 AND s.snapshot_version = $2",
        e, sn);
    s->sql[SQL_STORE_SNAPSHOT] = es__pg_sqlf(
        "INSERT INTO %s AS stored (aggregate_id, snapshot_version, version, "
        "payload, key_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT "
        "(aggregate_id, "
        "snapshot_version) DO UPDATE SET version = excluded.version, payload "
        "= excluded.payload, key_id = excluded.key_id, created_at = now() "
        "WHERE stored.version <= excluded.version",
        sn);
    s->sql[SQL_DELETE_SNAPSHOTS] =
        es__pg_sqlf("DELETE FROM %s WHERE aggregate_id = $1", sn);
    s->sql[SQL_GET_KEY] = es__pg_sqlf(
        "SELECT key_id, wrapped FROM %s WHERE aggregate_id = $1", k);
    s->sql[SQL_LOCK_KEY] = es__pg_sqlf(
        "SELECT key_id, wrapped FROM %s WHERE aggregate_id = $1 FOR SHARE", k);
    s->sql[SQL_PUT_KEY] = es__pg_sqlf(
        "INSERT INTO %s (aggregate_id, key_id, wrapped) VALUES ($1, $2, $3) "
        "ON CONFLICT (aggregate_id) DO NOTHING",
        k);
    s->sql[SQL_FORGET_KEY] = es__pg_sqlf(
        "INSERT INTO %s AS k (aggregate_id, key_id, wrapped, destroyed_at) "
        "VALUES ($1, '', NULL, now()) ON CONFLICT (aggregate_id) DO UPDATE "
        "SET wrapped = NULL, destroyed_at = coalesce(k.destroyed_at, now())",
        k);
    /* Reasons of the aggregate's rejections kept in clear (recorded
     * before migration 9, or by a store without keys): emptied, and
     * marked sealed, so that they read as forgotten like the sealed
     * ones. */
    s->sql[SQL_FORGET_REASONS] = es__pg_sqlf(
        "UPDATE %s SET rejection = '\\x'::bytea, rejection_key = '' WHERE "
        "aggregate_id = $1 AND rejection IS NOT NULL AND rejection_key IS "
        "NULL",
        cm);
    s->sql[SQL_FORGET_SIDE_EFFECTS] = es__pg_sqlf(
        "UPDATE %s SET status = 'dead', last_error = 'aggregate forgotten "
        "(crypto-shredding)' WHERE aggregate_id = $1 AND status = "
        "'pending'",
        o);
    /* The outbox.  Times are Unix ms from the dispatcher's clock. */
#define MS(n) "('epoch'::timestamptz + $" #n " * interval '1 millisecond')"
#define OB_COLS                                                             \
    "o.id, o.aggregate_id, o.event_id, o.kind, o.payload, o.key_id, "      \
    "coalesce(o.aggregate_type, ''), o.status, o.attempts, "               \
    "(extract(epoch from o.created_at) * 1000)::bigint, "                  \
    "(extract(epoch from o.next_attempt_at) * 1000)::bigint, "             \
    "coalesce(o.last_error, ''), o.seq"
#define OB_FILTER                                                           \
    "EXISTS (SELECT 1 FROM unnest($3::text[], $4::integer[]) AS f(t, k) "  \
    "WHERE f.t = o.aggregate_type AND (f.k = -2147483648 OR f.k = "         \
    "o.kind))"
    /* A claim whose owner never finished it, with no attempt left. */
    s->sql[SQL_OB_EXPIRE] = es__pg_sqlf(
        "UPDATE %s o SET status = 'dead', last_error = 'attempt ' || "
        "o.attempts || ' abandoned: claim of ''' || left(o.claimed_by, 63) "
        "|| ''' expired', claimed_by = NULL, claimed_until = NULL WHERE "
        "o.status = 'pending' AND o.claimed_by IS NOT NULL AND "
        "o.claimed_until <= " MS(1) " AND o.attempts >= $2 AND " OB_FILTER,
        o);
    /* The first pending message of each aggregate (among those the
     * filters match) is its head: only heads are claimed, so the messages
     * of one aggregate go one at a time, in order.  The scan walks the
     * pending messages of one type ($7) in seq order (partial index,
     * migration 6) and stops
     * at the limit, probing each one's aggregate for an earlier pending
     * message: a claim costs about the limit, not the backlog.  OFFSET 0
     * keeps the probe a per-row index lookup: without it a table with no
     * statistics yet (fresh, before autovacuum's first ANALYZE) was planned
     * as a nested-loop anti join, quadratic in the backlog.  The
     * claimable checks are on the locked row itself, so a row another
     * dispatcher claimed or finished since the snapshot is passed over. */
    s->sql[SQL_OB_CLAIM] = es__pg_sqlf(
        "WITH pick AS (SELECT o.id FROM %s o WHERE o.status = 'pending' "
        "AND o.aggregate_type = $7 AND " OB_FILTER
        " AND (o.claimed_by IS NULL OR o.claimed_until <= " MS(
            1) ") AND o.next_attempt_at <= " MS(1) " AND NOT EXISTS (SELECT "
                                                   "1 FROM %s p WHERE "
                                                   "p.aggregate_id = "
                                                   "o.aggregate_id AND "
                                                   "p.status = "
                                                   "'pending' AND p.seq < "
                                                   "o.seq AND EXISTS (SELECT 1 "
                                                   "FROM unnest("
                                                   "$3::text[], $4::integer[]) "
                                                   "AS f(t, k) WHERE f.t = "
                                                   "p.aggregate_type "
                                                   "AND (f.k = -2147483648 OR "
                                                   "f.k = p.kind)) OFFSET 0) "
                                                   "ORDER BY o.seq "
                                                   "LIMIT $5 "
                                                   "FOR UPDATE OF o SKIP "
                                                   "LOCKED), "
                                                   "upd AS (UPDATE %s o SET "
                                                   "attempts = o.attempts + 1, "
                                                   "claimed_by = $6, "
                                                   "claimed_until = " MS(
                                                       1) " + $2 * interval '1 "
                                                          "millisecond' FROM "
                                                          "pick "
                                                          "WHERE o.id = "
                                                          "pick.id "
                                                          "RETURNING " OB_COLS
                                                          ") "
                                                          "SELECT * FROM upd "
                                                          "ORDER BY seq",
        o, o, o);
    s->sql[SQL_OB_DEAD] = es__pg_sqlf(
        "UPDATE %s SET status = 'dead', last_error = $3, claimed_by = NULL, "
        "claimed_until = NULL WHERE id = $1 AND claimed_by = $2",
        o);
    s->sql[SQL_OB_FINISH] = es__pg_sqlf(
        "UPDATE %s SET status = $3, next_attempt_at = CASE WHEN $3 = "
        "'pending' THEN " MS(5) " ELSE next_attempt_at END, finished_at = "
                                "CASE WHEN $3 = 'done' THEN " MS(
                                    4) " ELSE finished_at END, "
                                       "last_error = coalesce($6, last_error), "
                                       "claimed_by = NULL, "
                                       "claimed_until = NULL WHERE id = $1 AND "
                                       "status = 'pending' AND "
                                       "claimed_by = $2",
        o);
    /* Many verdicts at once: the arrays are ids, statuses, next attempt
     * times (Unix ms) and errors ('' for none). */
    s->sql[SQL_OB_FINISH_MANY] = es__pg_sqlf(
        "UPDATE %s o SET status = v.st, next_attempt_at = CASE WHEN v.st = "
        "'pending' THEN 'epoch'::timestamptz + v.next * interval "
        "'1 millisecond' ELSE o.next_attempt_at END, finished_at = CASE "
        "WHEN v.st = 'done' THEN " MS(
            2) " ELSE o.finished_at END, "
               "last_error = coalesce(nullif(v.err, ''), o.last_error), "
               "claimed_by = NULL, claimed_until = NULL FROM "
               "unnest($3::uuid[], "
               "$4::text[], $5::bigint[], $6::text[]) AS v(id, st, next, err) "
               "WHERE o.id = v.id AND o.status = 'pending' AND o.claimed_by = "
               "$1",
        o);
    s->sql[SQL_OB_EXISTS] = es__pg_sqlf("SELECT 1 FROM %s WHERE id = $1", o);
    s->sql[SQL_OB_LIST] = es__pg_sqlf(
        "SELECT " OB_COLS " FROM %s o WHERE o.status = $1 ORDER BY o.seq "
        "LIMIT $2",
        o);
    s->sql[SQL_OB_GET] =
        es__pg_sqlf("SELECT " OB_COLS " FROM %s o WHERE o.id = $1", o);
    s->sql[SQL_OB_REQUEUE_ID] = es__pg_sqlf(
        "UPDATE %s SET status = 'pending', attempts = 0, next_attempt_at = " MS(
            2) ", claimed_by = NULL, claimed_until = NULL WHERE id = $1 AND "
               "status = 'dead'",
        o);
    s->sql[SQL_OB_REQUEUE_TYPE] = es__pg_sqlf(
        "UPDATE %s SET status = 'pending', attempts = 0, next_attempt_at = " MS(
            2) ", claimed_by = NULL, claimed_until = NULL WHERE status = "
               "'dead' AND aggregate_type = $1 AND ($3 = -2147483648 OR kind = "
               "$3)",
        o);
    /* Retention: a bounded batch, oldest first, through the index on
     * done messages' finish time; the dispatcher runs it while commands
     * are served. */
    s->sql[SQL_OB_PURGE] = es__pg_sqlf(
        "DELETE FROM %s WHERE id IN (SELECT id FROM %s WHERE status = "
        "'done' AND finished_at < " MS(1) " ORDER BY finished_at LIMIT $2)",
        o, o);
    s->sql[SQL_OB_STATS] = es__pg_sqlf(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER "
        "(WHERE status = 'dead'), count(*) FILTER (WHERE status = 'done'), "
        "coalesce((extract(epoch from min(created_at) FILTER (WHERE status "
        "= 'pending')) * 1000)::bigint, 0) FROM %s",
        o);
#undef MS
#undef OB_COLS
#undef OB_FILTER
    for (int i = 0; i < SQL_COUNT; i++)
        if (s->sql[i] == NULL) return ES_ENOMEM;
    return 0;
}
