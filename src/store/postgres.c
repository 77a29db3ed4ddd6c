/*
 * The PostgreSQL store (libpq).
 *
 * Every value goes as a binary parameter and every result comes back in
 * binary, so payloads are bytes end to end (no escaping).  Names of the
 * schema and tables are validated when they are set and quoted in every
 * statement; the statements are built once, when the store opens.
 *
 * Events of one save go in one statement (arrays + unnest), skipping rows
 * whose (aggregate, event id) or (aggregate, version) exists (ON CONFLICT
 * DO NOTHING);
 * RETURNING says which went in, and the core decides what a skipped row
 * means.  Streams are read `chunk` rows at a time, so memory is bounded
 * by one page whatever the stream's length: the first page with one query
 * (one round trip for most streams), the rest, if any, through a cursor
 * (DECLARE + FETCH), planned and scanned once.
 *
 * Lock rule: `lock` guards the pool (idle, n_idle, n_open).  Connections
 * are made and closed outside it.  A connection belongs to one
 * transaction at a time; it goes back to the pool only when it is healthy
 * and idle (no transaction open), otherwise it is closed.
 */
#include <errno.h>
#include <fcntl.h>
#include <event2/event.h>
#include <libpq-events.h>
#include <libpq-fe.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "eventastic/postgres.h"
#include "store/pg_conninfo.h"
#include "store/pg_migrations.h"
#include "store/pg_statements.h"
#include "store/store_impl.h"

/* Type oids of the built-in types we send (pg_type.h is server-side). */
#define OID_INT8 20
#define OID_INT4 23
#define OID_TEXT 25
#define OID_UUID 2950
#define OID_INT8_ARRAY 1016
#define OID_INT4_ARRAY 1007
#define OID_BYTEA_ARRAY 1001
#define OID_UUID_ARRAY 2951
#define OID_TEXT_ARRAY 1009
#define OID_BYTEA 17

#define N_TABLES 6
#define NAME_BUF (ES_PG_NAME_MAX + 1)
#define MAX_PAYLOAD 0x3fffffffu /* PostgreSQL's field limit, 1 GiB - 1 */
#define LOST_SQLSTATE "08006"

/* A master key: wraps the data keys of aggregates. */
typedef struct pg_key {
    char id[ES_PG_KEY_ID_MAX + 1];
    uint8_t key[ES_PG_KEY_BYTES];
} pg_key;

struct es_pg_config {
    char *conninfo; /* NULL: DATABASE_URL */
    pg_key *keys;   /* oldest first; the last is the newest */
    size_t n_keys;
    es_pg_key_provider provider; /* wrap == NULL: none */
    char schema[NAME_BUF];
    char tables[N_TABLES][NAME_BUF];
    size_t pool_size;
    size_t chunk;
    int64_t statement_timeout_ms; /* 0: the server's setting */
    bool no_notify; /* es_pg_config_set_outbox_notify(false) */
};

static const char *const default_tables[N_TABLES] = {
    "events", "snapshots", "outbox", "es_migrations", "data_keys",
    "commands"};

enum {
    SQL_INSERT_EVENTS,
    SQL_STREAM,
    SQL_STREAM_REST,
    SQL_TYPE_OF,
    SQL_GET_EVENT,
    SQL_INSERT_SIDE_EFFECTS,
    SQL_LIST_SIDE_EFFECTS,
    SQL_GET_SNAPSHOT,
    SQL_STORE_SNAPSHOT,
    SQL_DELETE_SNAPSHOTS,
    SQL_GET_KEY,
    SQL_LOCK_KEY,
    SQL_PUT_KEY,
    SQL_FORGET_KEY,
    SQL_FORGET_SIDE_EFFECTS,
    SQL_FORGET_REASONS,
    SQL_OB_EXPIRE,
    SQL_OB_CLAIM,
    SQL_OB_DEAD,
    SQL_OB_FINISH,
    SQL_OB_FINISH_MANY,
    SQL_OB_EXISTS,
    SQL_OB_LIST,
    SQL_OB_GET,
    SQL_OB_REQUEUE_ID,
    SQL_OB_REQUEUE_TYPE,
    SQL_OB_PURGE,
    SQL_OB_STATS,
    SQL_INSERT_COMMANDS,
    SQL_GET_COMMAND,
    SQL_PURGE_COMMANDS,
    SQL_STATUS_VERSION,
    SQL_STATUS_COUNTS,
    SQL_BATCH_EVENTS,
    SQL_BATCH_SIDE_EFFECTS,
    SQL_COUNT
};

/* Names for messages and the plan test; admin: run only by an operator's
 * tool (es_pg_status_get, outbox listings and purges), so a scan there
 * costs no command anything. */
static const struct {
    const char *name;
    bool admin;
} sql_info[SQL_COUNT] = {
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
};

typedef struct pg_store {
    struct es_store base;
    char *conninfo;
    char *password; /* to scrub from messages; NULL when none given */
    size_t chunk;
    int64_t statement_timeout_ms;
    bool notify; /* commits of side effects send NOTIFY */
    pg_key *keys; /* a copy of the config's (the built-in provider) */
    size_t n_keys;
    bool encrypt;                /* keys or a provider were given */
    es_pg_key_provider provider; /* wraps the data keys */
    char *sql[SQL_COUNT];
    char migrations[2 * NAME_BUF + 8]; /* quoted, for es_pg_status_get */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    PGconn **idle; /* capacity max */
    size_t n_idle, n_open, max;
    /* NOTIFY channel of the outbox table: "es_outbox_" and a hash of its
     * qualified name (any name fits in 63 bytes, and holds no quote). */
    char channel[32];
    atomic_size_t claim_turn; /* which type an outbox claim starts with */
    /* Backends of bounded transactions dropped in their COMMIT (the
     * fallback writer's): one that lives may still commit, so every
     * lane's read back asks them to end and waits until they have (see
     * lane_resolve_ask).  pid 0: a free slot.  Under lock. */
    struct {
        int pid;
        char start[64];
    } cut_commits[8];
} pg_store;

/* Data keys a transaction has opened, so that each is read once.  Cleared
 * when a savepoint rolls back (a key made after it is gone) and wiped
 * when the transaction ends. */
#define DEK_CACHE 8

typedef struct dek_entry {
    es_uuid agg;
    uint8_t dek[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
    char kek[ES_PG_KEY_ID_MAX + 1]; /* the master key that wraps it */
    bool locked; /* read FOR SHARE: a concurrent forget waits for us */
} dek_entry;

typedef struct pg_txn {
    struct es_txn base;
    PGconn *conn;
    dek_entry dek[DEK_CACHE];
    size_t n_dek, next_dek;
    unsigned depth;   /* savepoints open */
    unsigned cursors; /* stream cursors made, for unique names */
    bool wrote_side_effects; /* wake dispatchers after commit */
    PGconn **own; /* begin_background: the caller's slot, not the pool */
    int pid;        /* begin_bounded: its backend, */
    char start[64]; /* and that backend's backend_start */
} pg_txn;

/* Every parameter is binary; as many entries as the most parameters of a
 * statement (the commands' 9). */
#define MAX_PARAMS 9
static const int binary_formats[MAX_PARAMS] = {1, 1, 1, 1, 1, 1, 1, 1, 1};

/* ---- names ---- */

static bool name_valid(const char *s)
{
    if (s == NULL) return false;
    size_t n = strlen(s);
    if (n == 0 || n > ES_PG_NAME_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                     c == '_';
        bool digit = c >= '0' && c <= '9';
        if (!(alpha || (digit && i > 0))) return false;
    }
    return true;
}

/* "schema"."table": the names are valid, so they hold no quote. */
static void qualify(char *out, size_t cap, const char *schema,
                    const char *table)
{
    snprintf(out, cap, "\"%s\".\"%s\"", schema, table);
}

__attribute__((format(printf, 1, 2))) static char *sqlf(const char *fmt, ...)
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

/* ---- configuration ---- */

int es_pg_config_new(es_pg_config **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    es_pg_config *cfg = es__calloc(1, sizeof *cfg);
    if (cfg == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    strcpy(cfg->schema, "public");
    for (int i = 0; i < N_TABLES; i++)
        strcpy(cfg->tables[i], default_tables[i]);
    cfg->pool_size = 8;
    cfg->chunk = 1000;
    *out = cfg;
    return 0;
}

void es_pg_config_free(es_pg_config *cfg)
{
    if (cfg == NULL) return;
    es__free(cfg->conninfo);
    if (cfg->keys) sodium_memzero(cfg->keys, cfg->n_keys * sizeof *cfg->keys);
    es__free(cfg->keys);
    es__free(cfg);
}

static bool key_id_valid(const char *id)
{
    if (id == NULL) return false;
    size_t n = strlen(id);
    if (n == 0 || n > ES_PG_KEY_ID_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        char c = id[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '.' || c == ':' ||
              c == '-'))
            return false;
    }
    return true;
}

int es_pg_config_add_key(es_pg_config *cfg, const char *key_id,
                         const uint8_t key[ES_PG_KEY_BYTES], es_error *err)
{
    if (cfg == NULL || key == NULL)
        return es__error_set(err, ES_EINVAL, "config and key are required");
    if (!key_id_valid(key_id))
        return es__error_set(err, ES_EINVAL, "key id must be 1 to 63 "
                             "characters of [A-Za-z0-9_.:-]");
    for (size_t i = 0; i < cfg->n_keys; i++)
        if (strcmp(cfg->keys[i].id, key_id) == 0)
            return es__error_set(err, ES_EINVAL, "key id '%s' was already "
                                 "added", key_id);
    /* A fresh array rather than realloc: the old one is wiped, not left
     * behind in freed memory. */
    pg_key *keys = es__calloc(cfg->n_keys + 1, sizeof *keys);
    if (keys == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    if (cfg->n_keys > 0) {
        memcpy(keys, cfg->keys, cfg->n_keys * sizeof *keys);
        sodium_memzero(cfg->keys, cfg->n_keys * sizeof *keys);
    }
    es__free(cfg->keys);
    strcpy(keys[cfg->n_keys].id, key_id);
    memcpy(keys[cfg->n_keys].key, key, ES_PG_KEY_BYTES);
    cfg->keys = keys;
    cfg->n_keys++;
    return 0;
}

/* Parse a connection string; on success *password is a copy of its
 * password (NULL when it has none).  libpq's parse message is not passed
 * on: it may quote a piece of the string, and so of the password. */
static int conninfo_check(const char *conninfo, char **password,
                          es_error *err)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    if (opts == NULL) {
        if (msg != NULL) PQfreemem(msg);
        return es__error_set(err, ES_EINVAL,
                             "connection string could not be parsed (expected "
                             "key=value pairs or a postgresql:// URI)");
    }
    int rc = 0;
    if (password != NULL) {
        *password = NULL;
        for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
            if (strcmp(o->keyword, "password") != 0 || o->val == NULL ||
                o->val[0] == '\0')
                continue;
            *password = es__strdup(o->val);
            if (*password == NULL)
                rc = es__error_set(err, ES_ENOMEM, "out of memory");
        }
    }
    PQconninfoFree(opts);
    return rc;
}

int es_pg_config_set_key_provider(es_pg_config *cfg,
                                  const es_pg_key_provider *provider,
                                  es_error *err)
{
    if (cfg == NULL)
        return es__error_set(err, ES_EINVAL, "config is NULL");
    if (provider == NULL) {
        memset(&cfg->provider, 0, sizeof cfg->provider);
        return 0;
    }
    if (provider->current == NULL || provider->wrap == NULL ||
        provider->unwrap == NULL)
        return es__error_set(err, ES_EINVAL, "a key provider needs current, "
                             "wrap and unwrap");
    cfg->provider = *provider;
    return 0;
}

int es_pg_config_set_conninfo(es_pg_config *cfg, const char *conninfo,
                              es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    char *copy = NULL;
    if (conninfo != NULL) {
        int rc = conninfo_check(conninfo, NULL, err);
        if (rc != 0) return rc;
        if ((copy = es__strdup(conninfo)) == NULL)
            return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    es__free(cfg->conninfo);
    cfg->conninfo = copy;
    return 0;
}

static int name_error(es_error *err, const char *what)
{
    return es__error_set(err, ES_EINVAL,
                         "%s name must match [A-Za-z_][A-Za-z0-9_]{0,62}",
                         what);
}

int es_pg_config_set_schema(es_pg_config *cfg, const char *schema,
                            es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    if (!name_valid(schema)) return name_error(err, "schema");
    strcpy(cfg->schema, schema);
    return 0;
}

int es_pg_config_set_table(es_pg_config *cfg, es_pg_table table,
                           const char *name, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    int i = (int)table;
    if (i < 0 || i >= N_TABLES)
        return es__error_set(err, ES_EINVAL, "unknown table %d", i);
    if (!name_valid(name)) return name_error(err, "table");
    for (int j = 0; j < N_TABLES; j++)
        if (j != i && strcmp(cfg->tables[j], name) == 0)
            return es__error_set(err, ES_EINVAL,
                                 "table name '%s' is already used for "
                                 "another table", name);
    strcpy(cfg->tables[i], name);
    return 0;
}

int es_pg_config_set_pool_size(es_pg_config *cfg, size_t size, es_error *err)
{
    if (cfg == NULL || size < 1 || size > 1024)
        return es__error_set(err, ES_EINVAL, "pool size must be 1 to 1024");
    cfg->pool_size = size;
    return 0;
}

int es_pg_config_set_statement_timeout(es_pg_config *cfg, int64_t ms,
                                       es_error *err)
{
    if (cfg == NULL || ms < 0 || ms > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "statement timeout must be 0 "
                             "to 2147483647 ms");
    cfg->statement_timeout_ms = ms;
    return 0;
}

int es_pg_config_set_outbox_notify(es_pg_config *cfg, bool on,
                                   es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    cfg->no_notify = !on;
    return 0;
}

int es_pg_config_set_chunk_size(es_pg_config *cfg, size_t events,
                                es_error *err)
{
    if (cfg == NULL || events < 1 || events > 1000000)
        return es__error_set(err, ES_EINVAL,
                             "chunk size must be 1 to 1000000 events");
    cfg->chunk = events;
    return 0;
}

/* The configured connection string, or DATABASE_URL. */
static int resolve_conninfo(const es_pg_config *cfg, const char **out,
                            es_error *err)
{
    const char *ci = cfg->conninfo ? cfg->conninfo : getenv("DATABASE_URL");
    if (ci == NULL || ci[0] == '\0')
        return es__error_set(err, ES_EINVAL, "no connection string: set one "
                             "in the config or DATABASE_URL");
    *out = ci;
    return 0;
}

/* ---- errors ---- */

/* Copy msg into out with every occurrence of secret replaced, and the
 * trailing newline libpq adds dropped. */
static void scrub(char *out, size_t cap, const char *msg, const char *secret)
{
    size_t k = 0, slen = secret ? strlen(secret) : 0;
    for (const char *p = msg; *p != '\0' && k + 1 < cap;) {
        if (slen > 0 && strncmp(p, secret, slen) == 0) {
            for (const char *r = "***"; *r != '\0' && k + 1 < cap; r++)
                out[k++] = *r;
            p += slen;
            continue;
        }
        out[k++] = (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p;
        p++;
    }
    while (k > 0 && out[k - 1] == ' ') k--;
    out[k] = '\0';
}

static int status_for_sqlstate(const char *st)
{
    if (strcmp(st, "23505") == 0 || strcmp(st, "40001") == 0 ||
        strcmp(st, "40P01") == 0)
        return ES_ECONFLICT;
    if (strcmp(st, "57014") == 0) return ES_ETIMEDOUT;
    if (strncmp(st, "22", 2) == 0) return ES_EINVAL;
    if (strncmp(st, "08", 2) == 0) return ES_EDB;
    return ES_EDB;
}

/* The connection is gone: no result, a broken connection, or an error
 * libpq made itself (no SQLSTATE: "server closed the connection
 * unexpectedly"), which in pipeline mode comes before the status turns
 * CONNECTION_BAD.  Errors from the server always carry a SQLSTATE. */
static bool conn_lost(PGconn *c, const PGresult *r)
{
    return r == NULL || PQstatus(c) == CONNECTION_BAD ||
           (PQresultStatus(r) == PGRES_FATAL_ERROR &&
            PQresultErrorField(r, PG_DIAG_SQLSTATE) == NULL);
}

/* An es_error for a failed statement (r may be NULL). */
static int db_error(PGconn *c, const PGresult *r, es_error *err,
                    const char *what)
{
    char msg[200];
    if (conn_lost(c, r)) {
        scrub(msg, sizeof msg, PQerrorMessage(c), NULL);
        es__error_set(err, ES_EDB, "%s: connection to the database lost: %s",
                      what, msg);
        if (err) memcpy(err->sqlstate, LOST_SQLSTATE, 6);
        return ES_EDB;
    }
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    if (primary == NULL) primary = PQresultErrorMessage(r);
    scrub(msg, sizeof msg, primary ? primary : "unknown error", NULL);
    if (st == NULL || strlen(st) != 5) st = "XX000";
    int code = status_for_sqlstate(st);
    es__error_set(err, code, "%s: %s (SQLSTATE %s)", what, msg, st);
    if (err) memcpy(err->sqlstate, st, 6);
    return code;
}

/* ---- round trips that must not wait for ever ----
 *
 * A transaction of begin_bounded (the host's fallback writer, which runs
 * on its commit loop) marks its pooled connection: each statement on it
 * is sent without blocking and waited for with poll, up to the store's
 * silence limit (silence_ms, as the commit lanes).  Past it the
 * connection is dropped (its socket shut down), so the statement fails as
 * a lost connection (COMMIT: an unknown outcome, read back by a lane once
 * the backend that had it has ended: pg_store.cut_commits).  No TCP
 * option notices a server that stopped answering on a live socket (a
 * stopped process, a stuck backend); this does. */

static int64_t mono_ms(void);
static int64_t silence_ms(const pg_store *s);

/* The mark: instance data of this proc, the store whose limit applies. */
static int bound_evproc(PGEventId id, void *info, void *pass)
{
    (void)id;
    (void)info;
    (void)pass;
    return 1;
}

/* c's silence limit in ms; 0: none (c blocks as libpq does). */
static int64_t bound_of(PGconn *c)
{
    const pg_store *s = PQinstanceData(c, bound_evproc);
    return s != NULL ? silence_ms(s) : 0;
}

static bool bound_mark(PGconn *c, const pg_store *s)
{
    if (PQsetInstanceData(c, bound_evproc, (void *)s)) return true;
    return PQregisterEventProc(c, bound_evproc, "eventastic bound", NULL) &&
           PQsetInstanceData(c, bound_evproc, (void *)s);
}

/* sql on c (n < 0: simple protocol, else binary parameters and results)
 * within ms of silence.  Returns what PQexec or PQexecParams would (the
 * last result); NULL when the connection was lost, with *silent set when
 * it was dropped for its silence. */
static PGresult *exec_bounded(PGconn *c, int64_t ms, const char *sql, int n,
                              const Oid *types, const char *const *values,
                              const int *lens, bool *silent)
{
    *silent = false;
    if (PQsetnonblocking(c, 1) != 0) return NULL;
    int sent = n < 0 ? PQsendQuery(c, sql)
                     : PQsendQueryParams(c, sql, n, types, values, lens,
                                         n > 0 ? binary_formats : NULL, 1);
    PGresult *res = NULL;
    bool ok = sent == 1;
    int64_t end = mono_ms() + ms;
    while (ok) {
        int flush = PQflush(c);
        if (flush < 0) {
            ok = false;
            break;
        }
        if (flush == 0 && !PQisBusy(c)) {
            PGresult *r = PQgetResult(c);
            if (r == NULL) break;
            PQclear(res);
            res = r;
            continue;
        }
        int64_t left = end - mono_ms();
        if (left <= 0) {
            *silent = true;
            ok = false;
            shutdown(PQsocket(c), SHUT_RDWR);
            PQconsumeInput(c); /* libpq sees it closed */
            break;
        }
        struct pollfd p = {PQsocket(c), POLLIN, 0};
        if (flush == 1) p.events |= POLLOUT;
        int k = poll(&p, 1, left > INT_MAX ? INT_MAX : (int)left);
        if (k < 0 && errno != EINTR) ok = false;
        if (k > 0 && !PQconsumeInput(c)) ok = false;
    }
    if (PQstatus(c) == CONNECTION_OK) PQsetnonblocking(c, 0);
    if (!ok) {
        PQclear(res);
        res = NULL;
    }
    return res;
}

static int silence_error(es_error *err, const char *what, int64_t ms)
{
    es__error_set(err, ES_EDB, "%s: no answer from the database within "
                  "%lld ms; connection dropped", what, (long long)ms);
    if (err) memcpy(err->sqlstate, LOST_SQLSTATE, 6);
    return ES_EDB;
}

/* PQexec, bounded on a marked connection. */
static PGresult *exec_text(PGconn *c, const char *sql)
{
    int64_t ms = bound_of(c);
    bool silent = false;
    return ms > 0 ? exec_bounded(c, ms, sql, -1, NULL, NULL, NULL, &silent)
                  : PQexec(c, sql);
}

/* Run a statement with binary parameters and binary results.  On success
 * *out (if given) is the result (PQclear), else it is cleared. */
static int run(PGconn *c, const char *what, const char *sql, int n,
               const Oid *types, const char *const *values, const int *lens,
               PGresult **out, es_error *err)
{
    int64_t ms = bound_of(c);
    bool silent = false;
    PGresult *r = ms > 0 ? exec_bounded(c, ms, sql, n, types, values, lens,
                                        &silent)
                         : PQexecParams(c, sql, n, types, values, lens,
                                        n > 0 ? binary_formats : NULL, 1);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (out)
            *out = r;
        else
            PQclear(r);
        return 0;
    }
    int rc = silent ? silence_error(err, what, ms) : db_error(c, r, err, what);
    PQclear(r);
    return rc;
}

/* A statement without parameters, in text (simple protocol: several
 * statements may follow each other). */
static int run_simple(PGconn *c, const char *what, const char *sql,
                      es_error *err)
{
    int64_t ms = bound_of(c);
    bool silent = false;
    PGresult *r = ms > 0 ? exec_bounded(c, ms, sql, -1, NULL, NULL, NULL,
                                        &silent)
                         : PQexec(c, sql);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        PQclear(r);
        return 0;
    }
    int rc = silent ? silence_error(err, what, ms) : db_error(c, r, err, what);
    PQclear(r);
    return rc;
}

/* ---- binary values ---- */

static void be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void be64(uint8_t *p, uint64_t v)
{
    be32(p, (uint32_t)(v >> 32));
    be32(p + 4, (uint32_t)v);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           (uint32_t)p[3];
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}

static int put32(es_buf *b, uint32_t v)
{
    uint8_t x[4];
    be32(x, v);
    return es_buf_append(b, x, 4);
}

/* Binary array header: one dimension of n items, no nulls. */
static int array_begin(es_buf *b, Oid elem, size_t n)
{
    int rc = put32(b, 1);
    if (rc == 0) rc = put32(b, 0);
    if (rc == 0) rc = put32(b, elem);
    if (rc == 0) rc = put32(b, (uint32_t)n);
    if (rc == 0) rc = put32(b, 1);
    return rc;
}

static int array_item(es_buf *b, const void *data, size_t len)
{
    int rc = put32(b, (uint32_t)len);
    return rc == 0 ? es_buf_append(b, data, len) : rc;
}

static int array_i64(es_buf *b, int64_t v)
{
    uint8_t x[8];
    be64(x, (uint64_t)v);
    return array_item(b, x, 8);
}

static int array_i32(es_buf *b, int32_t v)
{
    uint8_t x[4];
    be32(x, (uint32_t)v);
    return array_item(b, x, 4);
}

/* Column readers; false when the value is NULL or of another type. */
static bool col_uuid(const PGresult *r, int row, int col, es_uuid *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 16)
        return false;
    memcpy(out->bytes, PQgetvalue(r, row, col), 16);
    return true;
}

static bool col_u64(const PGresult *r, int row, int col, uint64_t *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
        return false;
    uint64_t v = get64((const uint8_t *)PQgetvalue(r, row, col));
    if (v > INT64_MAX) return false; /* negative */
    *out = v;
    return true;
}

static bool col_i32(const PGresult *r, int row, int col, int32_t *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 4)
        return false;
    *out = (int32_t)get32((const uint8_t *)PQgetvalue(r, row, col));
    return true;
}

static bool col_bytes(const PGresult *r, int row, int col,
                      const uint8_t **data, size_t *len)
{
    if (PQgetisnull(r, row, col)) return false;
    *data = (const uint8_t *)PQgetvalue(r, row, col);
    *len = (size_t)PQgetlength(r, row, col);
    return true;
}

static int bad_row(es_error *err, const char *what)
{
    return es__error_set(err, ES_EDB, "%s: a row has an unexpected NULL, "
                         "negative number or column type", what);
}

/* ---- connections and the pool ---- */

static void quiet_notices(void *arg, const char *message)
{
    (void)arg;
    (void)message; /* a library does not print (NOTICEs of DDL) */
}

static int pg_connect(const char *conninfo, const char *password,
                      PGconn **out, es_error *err)
{
    PGconn *c = PQconnectdb(conninfo);
    if (c == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    if (PQstatus(c) != CONNECTION_OK) {
        char msg[200];
        scrub(msg, sizeof msg, PQerrorMessage(c), password);
        PQfinish(c);
        es__error_set(err, ES_EDB, "could not connect to the database: %s",
                      msg);
        if (err) memcpy(err->sqlstate, "08001", 6);
        return ES_EDB;
    }
    PQsetNoticeProcessor(c, quiet_notices, NULL);
    *out = c;
    return 0;
}

/* A new connection of the store: connected, then set up. */
static int store_connect(pg_store *s, PGconn **out, es_error *err)
{
    int rc = pg_connect(s->conninfo, s->password, out, err);
    if (rc != 0) return rc;
    char sql[128];
    snprintf(sql, sizeof sql, "%s; SET statement_timeout = %lld",
             ES__PG_SESSION, (long long)s->statement_timeout_ms);
    if (s->statement_timeout_ms == 0) /* the server's setting */
        snprintf(sql, sizeof sql, "%s", ES__PG_SESSION);
    if ((rc = run_simple(*out, "connect: session settings", sql, err))) {
        PQfinish(*out);
        *out = NULL;
    }
    return rc;
}

/* A connection of the pool; bounded: waiting for one to come free ends
 * after the silence limit (ES_EDB, SQLSTATE 08000). */
static int pool_get(pg_store *s, PGconn **out, bool bounded, es_error *err)
{
    struct timespec until = {0, 0};
    if (bounded) {
        int64_t ms = silence_ms(s);
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)(ms / 1000);
        until.tv_nsec += (long)(ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&s->lock);
    for (;;) {
        if (s->n_idle > 0) {
            *out = s->idle[--s->n_idle];
            pthread_mutex_unlock(&s->lock);
            return 0;
        }
        if (s->n_open < s->max) {
            s->n_open++;
            pthread_mutex_unlock(&s->lock);
            int rc = store_connect(s, out, err);
            if (rc != 0) {
                pthread_mutex_lock(&s->lock);
                s->n_open--;
                pthread_cond_signal(&s->cond);
                pthread_mutex_unlock(&s->lock);
            }
            return rc;
        }
        if (!bounded) {
            pthread_cond_wait(&s->cond, &s->lock);
        } else if (pthread_cond_timedwait(&s->cond, &s->lock, &until) ==
                   ETIMEDOUT) {
            pthread_mutex_unlock(&s->lock);
            es__error_set(err, ES_EDB, "no connection of the pool came free "
                          "within %lld ms", (long long)silence_ms(s));
            if (err) memcpy(err->sqlstate, "08000", 6);
            return ES_EDB;
        }
    }
}

/* Give a connection back; a broken one, one still in a transaction or
 * one left in pipeline mode (a batch that failed half way) is closed
 * instead. */
static void pool_put(pg_store *s, PGconn *c)
{
    PQsetInstanceData(c, bound_evproc, NULL); /* unbounded again */
    bool healthy = PQstatus(c) == CONNECTION_OK &&
                   PQtransactionStatus(c) == PQTRANS_IDLE &&
                   PQpipelineStatus(c) == PQ_PIPELINE_OFF;
    if (!healthy) PQfinish(c);
    pthread_mutex_lock(&s->lock);
    if (healthy)
        s->idle[s->n_idle++] = c;
    else
        s->n_open--;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* ---- transactions ---- */

static void dek_cache_clear(pg_txn *t)
{
    sodium_memzero(t->dek, sizeof t->dek);
    t->n_dek = t->next_dek = 0;
}

static void txn_end(pg_txn *t)
{
    pg_store *s = (pg_store *)t->base.store;
    sodium_memzero(t->dek, sizeof t->dek);
    if (t->own == NULL) {
        pool_put(s, t->conn);
    } else if (PQstatus(t->conn) != CONNECTION_OK ||
               PQtransactionStatus(t->conn) != PQTRANS_IDLE ||
               PQpipelineStatus(t->conn) != PQ_PIPELINE_OFF) {
        PQfinish(t->conn); /* a new one next time */
        *t->own = NULL;
    }
    es__free(t);
    es__store_txn_ended(&s->base);
}

/* The backend of a bounded transaction, told from a later one with its
 * pid: should its COMMIT be cut off, a read back waits for it to end. */
static int backend_start_of(pg_txn *t, es_error *err)
{
    PGresult *r = NULL;
    int rc = run(t->conn, "begin: backend", "SELECT backend_start::text "
                 "FROM pg_stat_activity WHERE pid = pg_backend_pid()", 0,
                 NULL, NULL, NULL, &r, err);
    t->pid = PQbackendPID(t->conn);
    t->start[0] = '\0';
    if (rc == 0 && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) &&
        strlen(PQgetvalue(r, 0, 0)) < sizeof t->start)
        strcpy(t->start, PQgetvalue(r, 0, 0));
    PQclear(r);
    return rc;
}

/* bounded: for begin_bounded (see above). */
static int begin_pooled(es_store *store, bool bounded, es_txn **out,
                        es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn *t = es__calloc(1, sizeof *t);
    if (t == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    t->base.store = store;
    int rc = 0;
    /* A pooled connection may have died while idle (server restart):
     * BEGIN finds out, and nothing was done yet, so try the next one
     * (each dead one is closed), until a fresh one. */
    for (size_t attempt = 0; attempt <= s->max; attempt++) {
        if ((rc = pool_get(s, &t->conn, bounded, err)) != 0) break;
        if (bounded && !bound_mark(t->conn, s)) {
            pool_put(s, t->conn);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        es_error e = {0};
        rc = run_simple(t->conn, "begin",
                        "BEGIN ISOLATION LEVEL READ COMMITTED", &e);
        if (rc == 0 && bounded) rc = backend_start_of(t, &e);
        if (rc == 0) break;
        if (err) *err = e;
        /* the socket's close may not have turned the status bad yet */
        bool lost = PQstatus(t->conn) == CONNECTION_BAD ||
                    strcmp(e.sqlstate, LOST_SQLSTATE) == 0;
        pool_put(s, t->conn);
        t->conn = NULL;
        if (!lost) break;
    }
    if (rc != 0) {
        es__free(t);
        return rc;
    }
    es__store_txn_started(store);
    *out = &t->base;
    return 0;
}

static int pg_begin(es_store *store, es_txn **out, es_error *err)
{
    return begin_pooled(store, false, out, err);
}

static int pg_begin_bounded(es_store *store, es_txn **out, es_error *err)
{
    return begin_pooled(store, true, out, err);
}

/* COMMIT answered by the server ending the session (shutdown, crash of
 * another backend, pg_terminate_backend: 57P0x) or a connection error
 * (08xxx) before libpq saw the socket close: the commit record may have
 * been written, so the outcome is unknown, not a failure. */
static bool commit_cut(const PGresult *r)
{
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    return st != NULL &&
           (strncmp(st, "57P0", 4) == 0 || strncmp(st, "08", 2) == 0);
}

/* A transaction on the caller's own connection (see begin_background in
 * store_impl.h): a pooled connection is never taken, so a background
 * writer never makes the commit lanes or loads wait for the pool, and
 * its commits do not wait for the WAL flush (synchronous_commit off: a
 * crash may lose the last ones, which only a cache may). */
static int pg_begin_background(es_store *store, void **slot, es_txn **out,
                               es_error *err)
{
    pg_store *s = (pg_store *)store;
    PGconn **own = (PGconn **)slot;
    pg_txn *t = es__calloc(1, sizeof *t);
    if (t == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    t->base.store = store;
    t->own = own;
    int rc = 0;
    /* A kept connection may have died meanwhile: one more try. */
    for (int attempt = 0; attempt < 2; attempt++) {
        bool fresh = *own == NULL;
        if (fresh) {
            rc = store_connect(s, own, err);
            if (rc == 0)
                rc = run_simple(*own, "background: synchronous_commit",
                                "SET synchronous_commit = off", err);
            if (rc != 0 && *own != NULL) {
                PQfinish(*own);
                *own = NULL;
            }
            if (rc != 0) break;
        }
        rc = run_simple(*own, "begin", "BEGIN ISOLATION LEVEL READ COMMITTED",
                        err);
        if (rc == 0) break;
        PQfinish(*own);
        *own = NULL;
        if (fresh) break;
    }
    if (rc != 0) {
        es__free(t);
        return rc;
    }
    t->conn = *own;
    es__store_txn_started(store);
    *out = &t->base;
    return 0;
}

static void pg_background_close(es_store *store, void *conn)
{
    (void)store;
    PQfinish(conn);
}

static void cut_commit_add(pg_store *s, const pg_txn *t)
{
    pthread_mutex_lock(&s->lock);
    size_t n = sizeof s->cut_commits / sizeof *s->cut_commits, i = 0;
    while (i + 1 < n && s->cut_commits[i].pid != 0) i++;
    s->cut_commits[i].pid = t->pid; /* full: the last slot is reused */
    memcpy(s->cut_commits[i].start, t->start, sizeof t->start);
    pthread_mutex_unlock(&s->lock);
}

static int pg_commit(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    if (PQstatus(t->conn) == CONNECTION_BAD) {
        /* Lost before: COMMIT never reaches the server, so nothing of
         * the transaction can have committed. */
        int rc = es__error_set(err, ES_EDB, "commit: the connection was "
                               "lost earlier; nothing was committed");
        if (err) memcpy(err->sqlstate, LOST_SQLSTATE, 6);
        txn_end(t);
        return rc;
    }
    PGresult *r = exec_text(t->conn, "COMMIT");
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    int rc = 0;
    if (st == PGRES_COMMAND_OK) {
        /* COMMIT of a failed transaction answers ROLLBACK. */
        if (strcmp(PQcmdStatus(r), "COMMIT") != 0) {
            rc = es__error_set(err, ES_EDB, "commit: the transaction had "
                               "failed earlier and was rolled back");
            if (err) memcpy(err->sqlstate, "25P02", 6);
        }
    } else if (conn_lost(t->conn, r) || commit_cut(r)) {
        rc = es__error_set(err, ES_EUNKNOWN, "commit: connection lost "
                           "during COMMIT; the transaction may or may not "
                           "have committed");
        if (err) memcpy(err->sqlstate, LOST_SQLSTATE, 6);
        if (t->pid != 0 && t->start[0])
            cut_commit_add((pg_store *)t->base.store, t);
    } else {
        rc = db_error(t->conn, r, err, "commit");
    }
    PQclear(r);
    es_store *store = t->base.store;
    bool notify = rc == 0 && t->wrote_side_effects;
    txn_end(t);
    if (notify) es__store_notify(store);
    return rc;
}

static void pg_rollback(es_txn *txn)
{
    pg_txn *t = (pg_txn *)txn;
    PQclear(exec_text(t->conn, "ROLLBACK"));
    txn_end(t);
}

static int pg_savepoint(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    char sql[48];
    snprintf(sql, sizeof sql, "SAVEPOINT es_sp_%u", t->depth + 1);
    int rc = run_simple(t->conn, "savepoint", sql, err);
    if (rc == 0) t->depth++;
    return rc;
}

static int pg_rollback_to(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    if (t->depth == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint to roll back to");
    char sql[96];
    snprintf(sql, sizeof sql,
             "ROLLBACK TO SAVEPOINT es_sp_%u; RELEASE SAVEPOINT es_sp_%u",
             t->depth, t->depth);
    t->depth--;
    dek_cache_clear(t); /* a data key made since may be gone */
    return run_simple(t->conn, "rollback to savepoint", sql, err);
}

static int pg_release(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    if (t->depth == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint to release");
    char sql[48];
    snprintf(sql, sizeof sql, "RELEASE SAVEPOINT es_sp_%u", t->depth);
    t->depth--;
    return run_simple(t->conn, "release savepoint", sql, err);
}

/* ---- encryption at rest ---- */

#define NONCE_BYTES crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
#define TAG_BYTES crypto_aead_xchacha20poly1305_ietf_ABYTES
#define SEAL_OVERHEAD (NONCE_BYTES + TAG_BYTES)
#define DEK_BYTES crypto_aead_xchacha20poly1305_ietf_KEYBYTES

/* Associated data: what a ciphertext belongs to.  A tag byte keeps the
 * kinds of rows apart. */
typedef struct ad_buf {
    uint8_t b[1 + 3 * 16 + ES_PG_KEY_ID_MAX];
    size_t n;
} ad_buf;

static void ad_put(ad_buf *ad, const void *p, size_t n)
{
    memcpy(ad->b + ad->n, p, n);
    ad->n += n;
}

static void ad_u64(ad_buf *ad, uint64_t v)
{
    be64(ad->b + ad->n, v);
    ad->n += 8;
}

static void ad_event(ad_buf *ad, const es_uuid *agg, uint64_t version)
{
    ad->n = 0;
    ad_put(ad, "E", 1);
    ad_put(ad, agg->bytes, 16);
    ad_u64(ad, version);
}

static void ad_snapshot(ad_buf *ad, const es_uuid *agg, uint64_t sv,
                        uint64_t version)
{
    ad->n = 0;
    ad_put(ad, "S", 1);
    ad_put(ad, agg->bytes, 16);
    ad_u64(ad, sv);
    ad_u64(ad, version);
}

static void ad_side_effect(ad_buf *ad, const es_side_effect *se)
{
    ad->n = 0;
    ad_put(ad, "O", 1);
    ad_put(ad, se->id.bytes, 16);
    ad_put(ad, se->aggregate_id.bytes, 16);
    ad_put(ad, se->event_id.bytes, 16);
}

/* A rejection's reason: its command id and aggregate. */
static void ad_rejection(ad_buf *ad, const es_uuid *command_id,
                         const es_uuid *agg)
{
    ad->n = 0;
    ad_put(ad, "R", 1);
    ad_put(ad, command_id->bytes, 16);
    ad_put(ad, agg->bytes, 16);
}

static void ad_data_key(ad_buf *ad, const es_uuid *agg, const char *kek)
{
    ad->n = 0;
    ad_put(ad, "K", 1);
    ad_put(ad, agg->bytes, 16);
    ad_put(ad, kek, strlen(kek));
}

/* Append nonce + ciphertext + tag of pt to b. */
static int seal_append(es_buf *b, const uint8_t *key, const ad_buf *ad,
                       const uint8_t *pt, size_t len)
{
    void *items = b->data;
    if (es__grow(&items, &b->cap, b->len + len + SEAL_OVERHEAD, 1) != 0)
        return ES_ENOMEM;
    b->data = items;
    uint8_t *out = b->data + b->len;
    randombytes_buf(out, NONCE_BYTES);
    crypto_aead_xchacha20poly1305_ietf_encrypt(out + NONCE_BYTES, NULL, pt,
                                               len, ad->b, ad->n, NULL, out,
                                               key);
    b->len += len + SEAL_OVERHEAD;
    return 0;
}

/* The same as one item of a binary array. */
static int array_sealed(es_buf *b, const uint8_t *key, const ad_buf *ad,
                        const uint8_t *pt, size_t len)
{
    int rc = put32(b, (uint32_t)(len + SEAL_OVERHEAD));
    return rc == 0 ? seal_append(b, key, ad, pt, len) : rc;
}

/* Open nonce + ciphertext + tag into out (replaced).  Returns 0, ES_ENOMEM
 * or NOT_OPEN (positive: not a status) when it does not open. */
#define NOT_OPEN 1
static int open_sealed(es_buf *out, const uint8_t *key, const ad_buf *ad,
                       const uint8_t *ct, size_t len)
{
    if (len < SEAL_OVERHEAD) return NOT_OPEN;
    size_t plen = len - SEAL_OVERHEAD;
    out->len = 0;
    void *items = out->data;
    if (es__grow(&items, &out->cap, plen ? plen : 1, 1) != 0)
        return ES_ENOMEM;
    out->data = items;
    if (crypto_aead_xchacha20poly1305_ietf_decrypt(
            out->data, NULL, NULL, ct + NONCE_BYTES, len - NONCE_BYTES, ad->b,
            ad->n, ct, key) != 0)
        return NOT_OPEN;
    out->len = plen;
    return 0;
}

static const pg_key *find_kek(const pg_store *s, const char *id)
{
    for (size_t i = 0; i < s->n_keys; i++)
        if (strcmp(s->keys[i].id, id) == 0) return &s->keys[i];
    return NULL;
}

/* The built-in provider: the config's master keys (es_pg_config_add_key),
 * wrapping with XChaCha20-Poly1305, the aggregate id and key id as
 * associated data.  ud is the pg_store. */
static int keyring_current(void *ud, char key_id[ES_PG_KEY_ID_MAX + 1],
                           es_error *err)
{
    (void)err;
    const pg_store *s = ud;
    strcpy(key_id, s->keys[s->n_keys - 1].id);
    return 0;
}

static int keyring_wrap(void *ud, const char *key_id,
                        const es_uuid *aggregate_id,
                        const uint8_t dek[ES_PG_KEY_BYTES],
                        uint8_t out[ES_PG_WRAPPED_MAX], size_t *len,
                        es_error *err)
{
    const pg_key *kek = find_kek(ud, key_id);
    if (kek == NULL)
        return es__error_set(err, ES_EINVAL, "no master key '%s'", key_id);
    ad_buf ad;
    ad_data_key(&ad, aggregate_id, key_id);
    randombytes_buf(out, NONCE_BYTES);
    crypto_aead_xchacha20poly1305_ietf_encrypt(out + NONCE_BYTES, NULL, dek,
                                               DEK_BYTES, ad.b, ad.n, NULL,
                                               out, kek->key);
    *len = DEK_BYTES + SEAL_OVERHEAD;
    return 0;
}

static int keyring_unwrap(void *ud, const char *key_id,
                          const es_uuid *aggregate_id, const uint8_t *wrapped,
                          size_t len, uint8_t dek[ES_PG_KEY_BYTES],
                          es_error *err)
{
    const pg_key *kek = find_kek(ud, key_id);
    if (kek == NULL)
        return es__error_set(err, ES_EDECRYPT, "wrapped by master key '%s', "
                             "which this store does not have", key_id);
    ad_buf ad;
    ad_data_key(&ad, aggregate_id, key_id);
    if (len != DEK_BYTES + SEAL_OVERHEAD ||
        crypto_aead_xchacha20poly1305_ietf_decrypt(
            dek, NULL, NULL, wrapped + NONCE_BYTES, len - NONCE_BYTES, ad.b,
            ad.n, wrapped, kek->key) != 0)
        return es__error_set(err, ES_EDECRYPT, "does not open with master "
                             "key '%s' (wrong key bytes?)", key_id);
    return 0;
}


static const dek_entry *dek_cache_put(pg_txn *t, const dek_entry *e)
{
    size_t i = t->n_dek < DEK_CACHE ? t->n_dek++ : t->next_dek;
    t->next_dek = (i + 1) % DEK_CACHE;
    t->dek[i] = *e;
    return &t->dek[i];
}

static int forgotten(es_error *err, const es_uuid *agg)
{
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_EFORGOTTEN, "aggregate %s was forgotten: its data "
                  "key is destroyed", es_uuid_format(agg, id));
    if (err) err->aggregate_id = *agg;
    return ES_EFORGOTTEN;
}

static int undecryptable(es_error *err, const es_uuid *agg, const char *what)
{
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_EDECRYPT, "aggregate %s: %s", es_uuid_format(agg, id),
                  what);
    if (err) err->aggregate_id = *agg;
    return ES_EDECRYPT;
}

/* The data key in row `row` of a key query's result (key_id, wrapped),
 * unwrapped into *e (locked: read FOR SHARE).  A NULL wrapped key is a
 * forgotten aggregate. */
static int dek_from_row(pg_store *s, const es_uuid *agg, const PGresult *r,
                        int row, bool locked, dek_entry *e, es_error *err)
{
    memset(e, 0, sizeof *e);
    e->agg = *agg;
    e->locked = locked;
    if (PQgetisnull(r, row, 1)) return forgotten(err, agg);
    snprintf(e->kek, sizeof e->kek, "%s", PQgetvalue(r, row, 0));
    const uint8_t *w = (const uint8_t *)PQgetvalue(r, row, 1);
    size_t wlen = (size_t)PQgetlength(r, row, 1);
    es_error inner = {0};
    int rc = s->provider.unwrap(s->provider.ud, e->kek, agg, w, wlen, e->dek,
                                &inner);
    if (rc == 0) return 0;
    sodium_memzero(e, sizeof *e);
    char id[ES_UUID_STRLEN + 1];
    es__error_wrap(err, rc < 0 ? rc : ES_EDECRYPT, &inner,
                   "aggregate %s: its data key", es_uuid_format(agg, id));
    if (err) err->aggregate_id = *agg;
    return rc < 0 ? rc : ES_EDECRYPT;
}

/* A new data key for agg in *e, wrapped by the newest master key into
 * wrapped (*wlen bytes), to be stored with SQL_PUT_KEY. */
static int dek_new(pg_store *s, const es_uuid *agg, dek_entry *e,
                   uint8_t wrapped[ES_PG_WRAPPED_MAX], size_t *wlen,
                   es_error *err)
{
    memset(e, 0, sizeof *e);
    e->agg = *agg;
    e->locked = true; /* our own uncommitted row */
    crypto_aead_xchacha20poly1305_ietf_keygen(e->dek);
    *wlen = 0;
    es_error inner = {0};
    int rc = s->provider.current(s->provider.ud, e->kek, &inner);
    if (rc == 0 && !key_id_valid(e->kek))
        rc = es__error_set(&inner, ES_EINVAL, "the key provider named "
                           "an invalid master key id");
    if (rc == 0)
        rc = s->provider.wrap(s->provider.ud, e->kek, agg, e->dek, wrapped,
                              wlen, &inner);
    if (rc == 0 && (*wlen == 0 || *wlen > ES_PG_WRAPPED_MAX))
        rc = es__error_set(&inner, ES_EINVAL, "the key provider wrapped "
                           "a data key into %zu bytes", *wlen);
    if (rc == 0) return 0;
    sodium_memzero(e, sizeof *e);
    return es__error_wrap(err, rc < 0 ? rc : ES_EIO, &inner,
                          "wrapping a data key");
}

/* The data key of an aggregate: from the transaction's cache, from the
 * keys table, or (create) a new one wrapped by the newest master key.
 * ES_ENOTFOUND when there is none and create is false.  *out is valid
 * until the next call.  Writers (create) read the key row FOR SHARE, so
 * that a concurrent es_pg_forget_aggregate either waits for them or, if it
 * came first, makes them fail with ES_EFORGOTTEN: nothing is sealed with
 * a key being destroyed. */
static int get_dek(pg_txn *t, const es_uuid *agg, bool create,
                   const dek_entry **out, es_error *err)
{
    pg_store *s = (pg_store *)t->base.store;
    for (size_t i = 0; i < t->n_dek; i++)
        if (es_uuid_equal(&t->dek[i].agg, agg)) {
            if (create && !t->dek[i].locked) {
                /* read for reading only: read it again, locked */
                t->dek[i] = t->dek[--t->n_dek];
                sodium_memzero(&t->dek[t->n_dek], sizeof t->dek[0]);
                t->next_dek = t->n_dek % DEK_CACHE;
                break;
            }
            *out = &t->dek[i];
            return 0;
        }
    const Oid types[3] = {OID_UUID, OID_TEXT, OID_BYTEA};
    for (int attempt = 0; attempt < 2; attempt++) {
        const char *values[1] = {(const char *)agg->bytes};
        const int lens[1] = {16};
        PGresult *r = NULL;
        int rc = run(t->conn, "read data key",
                     s->sql[create ? SQL_LOCK_KEY : SQL_GET_KEY], 1, types,
                     values, lens, &r, err);
        if (rc != 0) return rc;
        dek_entry e;
        if (PQntuples(r) == 1) {
            rc = dek_from_row(s, agg, r, 0, create, &e, err);
            PQclear(r);
            if (rc == 0) *out = dek_cache_put(t, &e);
            sodium_memzero(&e, sizeof e);
            return rc;
        }
        PQclear(r);
        if (!create) return ES_ENOTFOUND;

        uint8_t wrapped[ES_PG_WRAPPED_MAX];
        size_t wlen = 0;
        if ((rc = dek_new(s, agg, &e, wrapped, &wlen, err)) != 0) return rc;
        const char *ivalues[3] = {(const char *)agg->bytes, e.kek,
                                  (const char *)wrapped};
        const int ilens[3] = {16, (int)strlen(e.kek), (int)wlen};
        rc = run(t->conn, "store data key", s->sql[SQL_PUT_KEY], 3, types,
                 ivalues, ilens, &r, err);
        bool mine = rc == 0 && strcmp(PQcmdTuples(r), "1") == 0;
        if (rc == 0) PQclear(r);
        if (mine) *out = dek_cache_put(t, &e);
        sodium_memzero(&e, sizeof e);
        if (rc != 0 || mine) return rc;
        /* Another transaction made one first: read that one. */
    }
    return es__error_set(err, ES_EDB, "data key could not be created");
}

/* A payload read from a row: as it is when the row's key_id is NULL, else
 * opened into buf (*data and *len then point there). */
static int open_row(pg_txn *t, const es_uuid *agg, const PGresult *r,
                    int row, int key_col, const ad_buf *ad, es_buf *buf,
                    const uint8_t **data, size_t *len, es_error *err)
{
    if (PQgetisnull(r, row, key_col)) return 0;
    pg_store *s = (pg_store *)t->base.store;
    char why[160];
    if (!s->encrypt) {
        snprintf(why, sizeof why, "data sealed with master key '%.63s', "
                 "but the store has no keys", PQgetvalue(r, row, key_col));
        return undecryptable(err, agg, why);
    }
    const dek_entry *d = NULL;
    int rc = get_dek(t, agg, false, &d, err);
    if (rc == ES_ENOTFOUND) return forgotten(err, agg);
    if (rc != 0) return rc;
    rc = open_sealed(buf, d->dek, ad, *data, *len);
    if (rc == ES_ENOMEM) return es__error_set(err, rc, "out of memory");
    if (rc != 0)
        return undecryptable(err, agg, "a sealed value does not open "
                             "(tampered, truncated or moved)");
    *data = buf->data;
    *len = buf->len;
    return 0;
}

/* ---- reads ---- */

/* ES_EWRONGTYPE when type_name is given and the aggregate's type (a row's
 * aggregate_type, column col) is another. */
static int row_type(const PGresult *r, int row, int col, const es_uuid *agg,
                    const char *type_name, es_error *err)
{
    if (type_name == NULL || PQgetisnull(r, row, col)) return 0;
    const char *stored = PQgetvalue(r, row, col);
    if (strcmp(stored, type_name) == 0) return 0;
    return es__wrong_type(err, agg, stored, type_name);
}

/* Hand the rows of one page to fn (opened when sealed, after their type
 * is checked); *next is one past the last version handed over. */
static int stream_rows(pg_txn *t, const char *type_name, const es_uuid *agg,
                       const PGresult *r, uint64_t *next, es_buf *plain,
                       int (*fn)(void *ud, const es_event *event), void *ud,
                       es_error *err)
{
    int n = PQntuples(r);
    if (n > 0 && PQfformat(r, 0) != 1) return bad_row(err, "stream");
    for (int i = 0; i < n; i++) {
        int wrong = row_type(r, i, 5, agg, type_name, err);
        if (wrong != 0) return wrong;
        es_event ev;
        if (!col_u64(r, i, 0, &ev.version) || !col_uuid(r, i, 1, &ev.id) ||
            !col_i32(r, i, 2, &ev.kind) ||
            !col_bytes(r, i, 3, &ev.data, &ev.len))
            return bad_row(err, "stream");
        ad_buf ad;
        ad_event(&ad, agg, ev.version);
        int rc = open_row(t, agg, r, i, 4, &ad, plain, &ev.data, &ev.len,
                          err);
        if (rc != 0) {
            if (err) err->version = ev.version;
            return rc;
        }
        *next = ev.version + 1;
        rc = fn(ud, &ev);
        if (rc != 0) return rc;
    }
    return 0;
}

/* For a typed read that found no row to check: ES_EWRONGTYPE when the
 * aggregate's creation event has another type; 0 when it has this one or
 * there is none.  One primary-key probe. */
static int type_of(pg_txn *t, const char *type_name, const es_uuid *agg,
                   es_error *err)
{
    pg_store *s = (pg_store *)t->base.store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)agg->bytes};
    const int lens[1] = {16};
    PGresult *r = NULL;
    int rc = run(t->conn, "type of", s->sql[SQL_TYPE_OF], 1, types, values,
                 lens, &r, err);
    if (rc != 0) return rc;
    if (PQntuples(r) == 1) rc = row_type(r, 0, 0, agg, type_name, err);
    PQclear(r);
    return rc;
}

static int pg_stream(es_txn *txn, const char *type_name, const es_uuid *agg,
                     uint64_t from,
                     int (*fn)(void *ud, const es_event *event), void *ud,
                     es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (from > INT64_MAX) /* no version is that high */
        return type_name ? type_of(t, type_name, agg, err) : 0;
    uint8_t next_b[8], limit_b[8];
    be64(next_b, from);
    be64(limit_b, (uint64_t)s->chunk);
    const Oid types[3] = {OID_UUID, OID_INT8, OID_INT8};
    const char *values[3] = {(const char *)agg->bytes, (const char *)next_b,
                             (const char *)limit_b};
    const int lens[3] = {16, 8, 8};

    /* The first page with one query: most streams end there. */
    PGresult *r = NULL;
    int rc = run(t->conn, "stream", s->sql[SQL_STREAM], 3, types, values,
                 lens, &r, err);
    if (rc != 0) return rc;
    uint64_t next = from;
    size_t n = (size_t)PQntuples(r);
    es_buf plain = {0};
    rc = stream_rows(t, type_name, agg, r, &next, &plain, fn, ud, err);
    PQclear(r);
    if (rc == 0 && n == 0 && from > 0 && type_name != NULL)
        rc = type_of(t, type_name, agg, err);
    if (rc != 0 || n < s->chunk) {
        es_buf_free(&plain);
        return rc;
    }

    /* A long stream: the rest through one cursor, so the server plans
     * and scans once, whatever its statistics say (keyset pages planned
     * on stale statistics can each become a full scan). */
    char name[32], sql[96];
    snprintf(name, sizeof name, "es_stream_%u", ++t->cursors);
    be64(next_b, next);
    char *declare = sqlf("DECLARE %s NO SCROLL CURSOR FOR %s", name,
                         s->sql[SQL_STREAM_REST]);
    if (declare == NULL) {
        es_buf_free(&plain);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    rc = run(t->conn, "stream: declare", declare, 2, types, values, lens,
             NULL, err);
    es__free(declare);
    if (rc != 0) {
        es_buf_free(&plain);
        return rc;
    }
    snprintf(sql, sizeof sql, "FETCH FORWARD %zu FROM %s", s->chunk, name);
    for (;;) {
        rc = run(t->conn, "stream: fetch", sql, 0, NULL, NULL, NULL, &r, err);
        if (rc != 0) break;
        n = (size_t)PQntuples(r);
        rc = stream_rows(t, type_name, agg, r, &next, &plain, fn, ud, err);
        PQclear(r);
        if (rc != 0 || n < s->chunk) break;
    }
    es_buf_free(&plain);
    snprintf(sql, sizeof sql, "CLOSE %s", name);
    es_error ignored = {0};
    int closed = run_simple(t->conn, "stream: close", sql, &ignored);
    if (rc == 0 && closed != 0) {
        if (err) *err = ignored;
        rc = closed;
    }
    return rc;
}

static int pg_get_event(es_txn *txn, const es_uuid *agg,
                        const es_uuid *event_id, es_event **out,
                        es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[2] = {OID_UUID, OID_UUID};
    const char *values[2] = {(const char *)event_id->bytes,
                             (const char *)agg->bytes};
    const int lens[2] = {16, 16};
    PGresult *r = NULL;
    int rc = run(t->conn, "get event", s->sql[SQL_GET_EVENT], 2, types,
                 values, lens, &r, err);
    if (rc != 0) return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return es__error_set(err, ES_ENOTFOUND, "event not found");
    }
    es_uuid who;
    es_event ev;
    ev.id = *event_id;
    if (!col_uuid(r, 0, 0, &who) || !col_u64(r, 0, 1, &ev.version) ||
        !col_i32(r, 0, 2, &ev.kind) || !col_bytes(r, 0, 3, &ev.data, &ev.len)) {
        PQclear(r);
        return bad_row(err, "get event");
    }
    ad_buf ad;
    ad_event(&ad, &who, ev.version);
    es_buf plain = {0};
    rc = open_row(t, &who, r, 0, 4, &ad, &plain, &ev.data, &ev.len, err);
    if (rc != 0) {
        PQclear(r);
        es_buf_free(&plain);
        return rc;
    }
    *out = es__event_dup(&ev);
    PQclear(r);
    es_buf_free(&plain);
    if (*out == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    return 0;
}

/* Command-id records (the host's idempotency).  The content is kept as a
 * digest: commands may carry personal data, and the digest is all a
 * comparison needs.  UINT64_MAX ("no version") is stored as -1. */
static bool col_i64(const PGresult *r, int row, int col, int64_t *out);

static int64_t version_col(uint64_t v)
{
    return v == UINT64_MAX ? -1 : (int64_t)v;
}

/* The columns of the commands table, as arrays (one element a record). */
#define COMMAND_COLS 9
_Static_assert(COMMAND_COLS <= MAX_PARAMS, "binary_formats is too short");
static const Oid command_elems[COMMAND_COLS] = {
    OID_UUID, OID_UUID, OID_INT4, OID_BYTEA, OID_INT8,
    OID_INT8, OID_INT8, OID_BYTEA, OID_TEXT};
static const Oid command_types[COMMAND_COLS] = {
    OID_UUID_ARRAY, OID_UUID_ARRAY, OID_INT4_ARRAY,
    OID_BYTEA_ARRAY, OID_INT8_ARRAY, OID_INT8_ARRAY,
    OID_INT8_ARRAY, OID_BYTEA_ARRAY, OID_TEXT_ARRAY};

/* Append one record to the column arrays: the last two are the rejection
 * reason (NULL for an accepted command) and the id of the master key of
 * the data key it is sealed with (NULL: in clear).  key: the aggregate's
 * data key when the store encrypts, else NULL; only a rejected record
 * uses it.  Returns 0 or ES_ENOMEM. */
static int command_row(es_buf b[COMMAND_COLS], const es__command_record *c,
                       const dek_entry *key)
{
    uint8_t d[ES__COMMAND_DIGEST];
    if (c->hashed && c->len == ES__COMMAND_DIGEST)
        memcpy(d, c->payload, sizeof d);
    else
        es__command_digest(c->kind, c->payload, c->len, d);
    int rc = array_item(&b[0], c->command_id.bytes, 16);
    if (rc == 0) rc = array_item(&b[1], c->aggregate_id.bytes, 16);
    if (rc == 0) rc = array_i32(&b[2], c->kind);
    if (rc == 0) rc = array_item(&b[3], d, sizeof d);
    if (rc == 0) rc = array_i64(&b[4], version_col(c->first_version));
    if (rc == 0)
        rc = array_i64(&b[5], c->event_count > INT64_MAX
                                  ? INT64_MAX
                                  : (int64_t)c->event_count);
    if (rc == 0) rc = array_i64(&b[6], version_col(c->version));
    if (rc != 0) return rc;
    const char *why = c->reason ? c->reason : "";
    if (c->rejected && key) {
        ad_buf ad;
        ad_rejection(&ad, &c->command_id, &c->aggregate_id);
        rc = array_sealed(&b[7], key->dek, &ad, (const uint8_t *)why,
                          strlen(why));
        if (rc == 0) rc = array_item(&b[8], key->kek, strlen(key->kek));
        return rc;
    }
    if (c->rejected) rc = array_item(&b[7], why, strlen(why));
    else rc = put32(&b[7], UINT32_MAX); /* length -1: NULL */
    if (rc == 0) rc = put32(&b[8], UINT32_MAX);
    return rc;
}

static int pg_insert_commands(es_txn *txn, const es__command_record *recs,
                              size_t n, bool *inserted, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many command records");
    es_buf b[COMMAND_COLS];
    memset(b, 0, sizeof b);
    int rc = 0;
    for (int k = 0; rc == 0 && k < COMMAND_COLS; k++)
        rc = array_begin(&b[k], command_elems[k], n);
    for (size_t i = 0; i < n; i++) inserted[i] = false;
    dek_entry key;
    memset(&key, 0, sizeof key);
    bool have_key = false;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        /* A rejection's reason is sealed with its aggregate's data key
         * (made now if it has none), like an event. */
        bool seal = s->encrypt && recs[i].rejected;
        if (seal && !(have_key &&
                      es_uuid_equal(&key.agg, &recs[i].aggregate_id))) {
            const dek_entry *d = NULL;
            if ((rc = get_dek(t, &recs[i].aggregate_id, true, &d, err)) != 0)
                break;
            key = *d;
            have_key = true;
        }
        rc = command_row(b, &recs[i], seal ? &key : NULL);
    }
    sodium_memzero(&key, sizeof key);
    PGresult *r = NULL;
    if (rc == ES_ENOMEM) es__error_set(err, rc, "out of memory");
    if (rc == 0) {
        const char *values[COMMAND_COLS];
        int lens[COMMAND_COLS];
        for (int k = 0; k < COMMAND_COLS; k++) {
            values[k] = (const char *)b[k].data;
            lens[k] = (int)b[k].len;
        }
        rc = run(t->conn, "insert command ids", s->sql[SQL_INSERT_COMMANDS],
                 COMMAND_COLS, command_types, values, lens, &r, err);
    }
    for (int row = 0; rc == 0 && row < PQntuples(r); row++) {
        es_uuid id;
        if (!col_uuid(r, row, 0, &id)) {
            rc = bad_row(err, "insert command ids");
            break;
        }
        for (size_t i = 0; i < n; i++)
            if (es_uuid_equal(&id, &recs[i].command_id)) inserted[i] = true;
    }
    if (r) PQclear(r);
    for (int k = 0; k < COMMAND_COLS; k++) es_buf_free(&b[k]);
    return rc;
}

static int pg_get_command(es_txn *txn, const es_uuid *command_id,
                          es__command_record **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)command_id->bytes};
    const int lens[1] = {16};
    PGresult *r = NULL;
    int rc = run(t->conn, "get command id", s->sql[SQL_GET_COMMAND], 1, types,
                 values, lens, &r, err);
    if (rc != 0) return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return es__error_set(err, ES_ENOTFOUND, "command id not found");
    }
    es__command_record rec;
    memset(&rec, 0, sizeof rec);
    rec.command_id = *command_id;
    rec.hashed = true;
    int64_t first = 0, count = 0, version = 0;
    if (!col_uuid(r, 0, 0, &rec.aggregate_id) || !col_i32(r, 0, 1, &rec.kind) ||
        !col_bytes(r, 0, 2, &rec.payload, &rec.len) ||
        !col_i64(r, 0, 3, &first) || !col_i64(r, 0, 4, &count) ||
        !col_i64(r, 0, 5, &version) || count < 0) {
        PQclear(r);
        return bad_row(err, "get command id");
    }
    rec.first_version = first < 0 ? UINT64_MAX : (uint64_t)first;
    rec.event_count = (uint64_t)count;
    rec.version = version < 0 ? UINT64_MAX : (uint64_t)version;
    /* libpq ends every value with a NUL, binary ones too; a reason with
     * a NUL inside is cut there. */
    rec.rejected = !PQgetisnull(r, 0, 6);
    if (rec.rejected) rec.reason = PQgetvalue(r, 0, 6);
    es_buf plain = {0};
    if (rec.rejected && !PQgetisnull(r, 0, 7)) {
        /* Sealed: opened with the aggregate's data key.  Once that is
         * destroyed the record stays (its id is still taken, its digest
         * still compared), without its reason. */
        const uint8_t *data = (const uint8_t *)rec.reason;
        size_t len = (size_t)PQgetlength(r, 0, 6);
        ad_buf ad;
        ad_rejection(&ad, command_id, &rec.aggregate_id);
        es_error inner = {0};
        rc = open_row(t, &rec.aggregate_id, r, 0, 7, &ad, &plain, &data,
                      &len, &inner);
        if (rc == ES_EFORGOTTEN) {
            rec.forgotten = true;
            rec.reason = NULL;
            rc = 0;
        } else if (rc != 0) {
            es_buf_free(&plain);
            PQclear(r);
            if (err) *err = inner;
            return rc;
        } else if (es_buf_append(&plain, "", 1) != 0) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
        } else {
            rec.reason = (const char *)plain.data;
        }
    }
    *out = rc == 0 ? es__command_record_dup(&rec) : NULL;
    PQclear(r);
    if (plain.data) sodium_memzero(plain.data, plain.cap);
    es_buf_free(&plain);
    if (rc != 0) return rc;
    if (*out == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    return 0;
}

static int pg_get_snapshot(es_txn *txn, const char *type_name,
                           const es_uuid *agg, uint64_t sv,
                           es_snapshot **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (sv > INT64_MAX) {
        int rc = type_name ? type_of(t, type_name, agg, err) : 0;
        return rc ? rc : es__error_set(err, ES_ENOTFOUND, "no snapshot");
    }
    uint8_t svb[8];
    be64(svb, sv);
    const Oid types[2] = {OID_UUID, OID_INT8};
    const char *values[2] = {(const char *)agg->bytes, (const char *)svb};
    const int lens[2] = {16, 8};
    PGresult *r = NULL;
    int rc = run(t->conn, "get snapshot", s->sql[SQL_GET_SNAPSHOT], 2, types,
                 values, lens, &r, err);
    if (rc != 0) return rc;
    /* One row: the creation event's type, then the snapshot's columns
     * (NULL when there is none). */
    if (PQntuples(r) != 1) {
        PQclear(r);
        return bad_row(err, "get snapshot");
    }
    if ((rc = row_type(r, 0, 0, agg, type_name, err)) != 0) {
        PQclear(r);
        return rc;
    }
    if (PQgetisnull(r, 0, 1)) {
        PQclear(r);
        return es__error_set(err, ES_ENOTFOUND, "no snapshot");
    }
    es_snapshot snap = {*agg, 0, sv, NULL, 0};
    if (!col_u64(r, 0, 1, &snap.version) ||
        !col_bytes(r, 0, 2, &snap.data, &snap.len)) {
        PQclear(r);
        return bad_row(err, "get snapshot");
    }
    ad_buf ad;
    ad_snapshot(&ad, agg, sv, snap.version);
    es_buf plain = {0};
    rc = open_row(t, agg, r, 0, 3, &ad, &plain, &snap.data, &snap.len, err);
    if (rc != 0) {
        PQclear(r);
        es_buf_free(&plain);
        return rc;
    }
    *out = es__snapshot_dup(&snap);
    PQclear(r);
    es_buf_free(&plain);
    return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
}

static int pg_list_side_effects(es_txn *txn, const es_uuid *agg,
                                es_side_effect_list **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {agg ? (const char *)agg->bytes : NULL};
    const int lens[1] = {16};
    PGresult *r = NULL;
    int rc = run(t->conn, "list side effects", s->sql[SQL_LIST_SIDE_EFFECTS],
                 1, types, values, lens, &r, err);
    if (rc != 0) return rc;
    es_side_effect_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    es_buf plain = {0};
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        es_side_effect se;
        ad_buf ad;
        if (!col_uuid(r, i, 0, &se.id) ||
            !col_uuid(r, i, 1, &se.aggregate_id) ||
            !col_uuid(r, i, 2, &se.event_id) || !col_i32(r, i, 3, &se.kind) ||
            !col_bytes(r, i, 4, &se.data, &se.len)) {
            rc = bad_row(err, "list side effects");
            break;
        }
        ad_side_effect(&ad, &se);
        rc = open_row(t, &se.aggregate_id, r, i, 5, &ad, &plain, &se.data,
                      &se.len, err);
        if (rc == 0 && es__side_effect_list_push(list, &cap, &se) != 0)
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
    }
    es_buf_free(&plain);
    PQclear(r);
    if (rc != 0) {
        es_side_effect_list_free(list);
        return rc;
    }
    *out = list;
    return 0;
}

/* ---- writes ---- */

static int too_large(es_error *err, size_t len)
{
    return es__error_set(err, ES_EINVAL, "payload of %zu bytes is larger "
                         "than PostgreSQL's 1 GiB field limit", len);
}

static int pg_insert_events(es_txn *txn, const char *type_name,
                            const es_uuid *agg, const es_event *events,
                            size_t n, bool *inserted, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    for (size_t i = 0; i < n; i++) inserted[i] = false;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many events in one save");
    /* The data key first: it may be made now, in this savepoint. */
    dek_entry key;
    memset(&key, 0, sizeof key);
    if (s->encrypt) {
        const dek_entry *d = NULL;
        int rc = get_dek(t, agg, true, &d, err);
        if (rc != 0) return rc;
        key = *d;
    }
    es_buf ver = {0}, ids = {0}, kinds = {0}, data = {0};
    int rc = array_begin(&ver, OID_INT8, n);
    if (rc == 0) rc = array_begin(&ids, OID_UUID, n);
    if (rc == 0) rc = array_begin(&kinds, OID_INT4, n);
    if (rc == 0) rc = array_begin(&data, OID_BYTEA, n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const es_event *e = &events[i];
        if (e->version > INT64_MAX) {
            rc = ES_EINVAL;
            es__error_set(err, rc, "version %llu does not fit a bigint",
                          (unsigned long long)e->version);
            break;
        }
        if (e->len > MAX_PAYLOAD) {
            rc = too_large(err, e->len);
            break;
        }
        rc = array_i64(&ver, (int64_t)e->version);
        if (rc == 0) rc = array_item(&ids, e->id.bytes, 16);
        if (rc == 0) rc = array_i32(&kinds, e->kind);
        if (rc == 0 && s->encrypt) {
            ad_buf ad;
            ad_event(&ad, agg, e->version);
            rc = array_sealed(&data, key.dek, &ad, e->data, e->len);
        } else if (rc == 0) {
            rc = array_item(&data, e->data, e->len);
        }
    }
    sodium_memzero(key.dek, sizeof key.dek);
    if (rc == ES_ENOMEM) es__error_set(err, rc, "out of memory");
    PGresult *r = NULL;
    if (rc == 0 && (ver.len > INT32_MAX || data.len > INT32_MAX))
        rc = es__error_set(err, ES_EINVAL, "one save of %zu bytes is too "
                           "large for one statement", data.len);
    if (rc == 0) {
        const Oid types[7] = {OID_TEXT, OID_UUID, OID_INT8_ARRAY,
                              OID_UUID_ARRAY, OID_INT4_ARRAY,
                              OID_BYTEA_ARRAY, OID_TEXT};
        const char *values[7] = {type_name, (const char *)agg->bytes,
                                 (const char *)ver.data,
                                 (const char *)ids.data,
                                 (const char *)kinds.data,
                                 (const char *)data.data,
                                 s->encrypt ? key.kek : NULL};
        const int lens[7] = {(int)strlen(type_name), 16, (int)ver.len,
                             (int)ids.len, (int)kinds.len, (int)data.len,
                             (int)strlen(key.kek)};
        rc = run(t->conn, "insert events", s->sql[SQL_INSERT_EVENTS], 7,
                 types, values, lens, &r, err);
    }
    es_buf_free(&ver);
    es_buf_free(&ids);
    es_buf_free(&kinds);
    es_buf_free(&data);
    if (rc != 0) return rc;
    int rows = PQntuples(r);
    for (int i = 0; rc == 0 && i < rows; i++) {
        if (!PQgetisnull(r, i, 2)) {
            rc = es__wrong_type(err, agg, PQgetvalue(r, i, 2), type_name);
            break;
        }
        uint64_t v;
        es_uuid id;
        if (!col_u64(r, i, 0, &v) || !col_uuid(r, i, 1, &id)) {
            rc = bad_row(err, "insert events");
            break;
        }
        /* The events of a save have consecutive versions: look there
         * first, so 150,000 rows take linear time. */
        size_t k = (size_t)(v - events[0].version);
        if (v >= events[0].version && k < n && !inserted[k] &&
            es_uuid_equal(&events[k].id, &id)) {
            inserted[k] = true;
            continue;
        }
        for (k = 0; k < n; k++)
            if (!inserted[k] && events[k].version == v &&
                es_uuid_equal(&events[k].id, &id)) {
                inserted[k] = true;
                break;
            }
    }
    PQclear(r);
    if (rc != 0)
        for (size_t i = 0; i < n; i++) inserted[i] = false;
    return rc;
}

static int pg_insert_side_effects(es_txn *txn, const char *type_name,
                                  const es_side_effect *items, size_t n,
                                  es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many side effects");
    es_buf ids = {0}, aggs = {0}, evs = {0}, kinds = {0}, data = {0};
    es_buf keys = {0};
    int rc = array_begin(&ids, OID_UUID, n);
    if (rc == 0) rc = array_begin(&aggs, OID_UUID, n);
    if (rc == 0) rc = array_begin(&evs, OID_UUID, n);
    if (rc == 0) rc = array_begin(&kinds, OID_INT4, n);
    if (rc == 0) rc = array_begin(&data, OID_BYTEA, n);
    if (rc == 0) rc = array_begin(&keys, OID_TEXT, n);
    if (rc == 0 && !s->encrypt) keys.data[7] = 1; /* has NULLs */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const es_side_effect *e = &items[i];
        if (e->len > MAX_PAYLOAD) {
            rc = too_large(err, e->len);
            break;
        }
        rc = array_item(&ids, e->id.bytes, 16);
        if (rc == 0) rc = array_item(&aggs, e->aggregate_id.bytes, 16);
        if (rc == 0) rc = array_item(&evs, e->event_id.bytes, 16);
        if (rc == 0) rc = array_i32(&kinds, e->kind);
        if (rc != 0) break;
        if (!s->encrypt) {
            rc = array_item(&data, e->data, e->len);
            if (rc == 0) rc = put32(&keys, 0xffffffffu); /* NULL */
            continue;
        }
        const dek_entry *d = NULL;
        if ((rc = get_dek(t, &e->aggregate_id, true, &d, err)) != 0) break;
        ad_buf ad;
        ad_side_effect(&ad, e);
        rc = array_sealed(&data, d->dek, &ad, e->data, e->len);
        if (rc == 0) rc = array_item(&keys, d->kek, strlen(d->kek));
    }
    if (rc == ES_ENOMEM) es__error_set(err, rc, "out of memory");
    if (rc == 0 && data.len > INT32_MAX)
        rc = es__error_set(err, ES_EINVAL, "side effects too large for one "
                                           "statement");
    if (rc == 0) {
        const Oid types[8] = {OID_UUID_ARRAY, OID_UUID_ARRAY, OID_UUID_ARRAY,
                              OID_INT4_ARRAY, OID_BYTEA_ARRAY,
                              OID_TEXT_ARRAY, OID_TEXT, OID_TEXT};
        const char *values[8] = {(const char *)ids.data,
                                 (const char *)aggs.data,
                                 (const char *)evs.data,
                                 (const char *)kinds.data,
                                 (const char *)data.data,
                                 (const char *)keys.data, type_name,
                                 s->channel};
        const int lens[8] = {(int)ids.len, (int)aggs.len, (int)evs.len,
                             (int)kinds.len, (int)data.len, (int)keys.len,
                             (int)strlen(type_name), (int)strlen(s->channel)};
        PGresult *r = NULL;
        rc = run(t->conn, "insert side effects",
                 s->sql[SQL_INSERT_SIDE_EFFECTS], 8, types, values, lens, &r,
                 err);
        if (rc == 0 && strcmp(PQcmdTuples(r), "0") != 0)
            t->wrote_side_effects = true;
        if (rc == 0) PQclear(r);
    }
    es_buf_free(&keys);
    es_buf_free(&ids);
    es_buf_free(&aggs);
    es_buf_free(&evs);
    es_buf_free(&kinds);
    es_buf_free(&data);
    return rc;
}

static int pg_store_snapshot(es_txn *txn, const es_snapshot *snap,
                             es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (snap->version > INT64_MAX || snap->snapshot_version > INT64_MAX)
        return es__error_set(err, ES_EINVAL, "snapshot version or version "
                                             "does not fit a bigint");
    if (snap->len > MAX_PAYLOAD) return too_large(err, snap->len);
    uint8_t sv[8], v[8];
    be64(sv, snap->snapshot_version);
    be64(v, snap->version);
    static const uint8_t empty[1] = {0};
    const uint8_t *payload = snap->data ? snap->data : empty;
    size_t len = snap->len;
    es_buf sealed = {0};
    char kek[ES_PG_KEY_ID_MAX + 1] = "";
    if (s->encrypt) {
        const dek_entry *d = NULL;
        int rc = get_dek(t, &snap->aggregate_id, true, &d, err);
        if (rc != 0) return rc;
        ad_buf ad;
        ad_snapshot(&ad, &snap->aggregate_id, snap->snapshot_version,
                    snap->version);
        if (seal_append(&sealed, d->dek, &ad, payload, len) != 0)
            return es__error_set(err, ES_ENOMEM, "out of memory");
        strcpy(kek, d->kek);
        payload = sealed.data;
        len = sealed.len;
    }
    const Oid types[5] = {OID_UUID, OID_INT8, OID_INT8, OID_BYTEA, OID_TEXT};
    const char *values[5] = {(const char *)snap->aggregate_id.bytes,
                             (const char *)sv, (const char *)v,
                             (const char *)payload,
                             s->encrypt ? kek : NULL};
    const int lens[5] = {16, 8, 8, (int)len, (int)strlen(kek)};
    int rc = run(t->conn, "store snapshot", s->sql[SQL_STORE_SNAPSHOT], 5,
                 types, values, lens, NULL, err);
    es_buf_free(&sealed);
    return rc;
}

static int pg_delete_snapshots(es_txn *txn, const es_uuid *agg, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)agg->bytes};
    const int lens[1] = {16};
    return run(t->conn, "delete snapshots", s->sql[SQL_DELETE_SNAPSHOTS], 1,
               types, values, lens, NULL, err);
}

/* ---- the store ---- */

static void pg_close(es_store *store)
{
    pg_store *s = (pg_store *)store;
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

/* ---- the outbox (see eventastic/outbox.h) ---- */

static const char *status_text(es_outbox_status st)
{
    switch (st) {
    case ES_OUTBOX_PENDING:
        return "pending";
    case ES_OUTBOX_DONE:
        return "done";
    case ES_OUTBOX_DEAD:
        return "dead";
    }
    return "pending";
}

static bool status_parse(const char *text, es_outbox_status *out)
{
    if (strcmp(text, "pending") == 0)
        *out = ES_OUTBOX_PENDING;
    else if (strcmp(text, "done") == 0)
        *out = ES_OUTBOX_DONE;
    else if (strcmp(text, "dead") == 0)
        *out = ES_OUTBOX_DEAD;
    else
        return false;
    return true;
}

/* A time in Unix ms, inside what timestamptz holds (4713 BC to 294276
 * AD), so that "before the end of time" (INT64_MAX) works as meant. */
static void be64_ms(uint8_t *p, int64_t ms)
{
    const int64_t lo = -200000000000000, hi = 9000000000000000;
    be64(p, (uint64_t)(ms < lo ? lo : ms > hi ? hi : ms));
}

static bool col_i64(const PGresult *r, int row, int col, int64_t *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
        return false;
    *out = (int64_t)get64((const uint8_t *)PQgetvalue(r, row, col));
    return true;
}

/* The outbox operations run outside the caller's transactions: each takes
 * a pooled connection (statements commit one by one) and a data key cache
 * of its own, in a pg_txn that never BEGINs. */
static int ob_begin(pg_store *s, pg_txn *t, es_error *err)
{
    memset(t, 0, sizeof *t);
    t->base.store = &s->base;
    return pool_get(s, &t->conn, false, err);
}

static void ob_end(pg_store *s, pg_txn *t)
{
    sodium_memzero(t->dek, sizeof t->dek);
    pool_put(s, t->conn);
}

/* One row of OB_COLS into e; the payload (opened when sealed) stays in r
 * or plain.  On an error of the payload alone (ES_EDECRYPT,
 * ES_EFORGOTTEN) the rest of e is filled and the payload is empty. */
static int entry_read(pg_txn *t, const PGresult *r, int row,
                      es_outbox_entry *e, es_buf *plain, es_error *err)
{
    memset(e, 0, sizeof *e);
    es_side_effect *se = &e->side_effect;
    int32_t attempts;
    if (!col_uuid(r, row, 0, &se->id) ||
        !col_uuid(r, row, 1, &se->aggregate_id) ||
        !col_uuid(r, row, 2, &se->event_id) ||
        !col_i32(r, row, 3, &se->kind) ||
        !col_bytes(r, row, 4, &se->data, &se->len) ||
        !col_i32(r, row, 8, &attempts) || attempts < 0 ||
        !col_i64(r, row, 9, &e->created_ms) ||
        !col_i64(r, row, 10, &e->next_attempt_ms) ||
        !status_parse(PQgetvalue(r, row, 7), &e->status))
        return bad_row(err, "outbox");
    e->attempts = (uint32_t)attempts;
    snprintf(e->aggregate_type, sizeof e->aggregate_type, "%s",
             PQgetvalue(r, row, 6));
    snprintf(e->last_error, sizeof e->last_error, "%s",
             PQgetvalue(r, row, 11));
    ad_buf ad;
    ad_side_effect(&ad, se);
    int rc = open_row(t, &se->aggregate_id, r, row, 5, &ad, plain, &se->data,
                      &se->len, err);
    if (rc != 0) {
        se->data = NULL;
        se->len = 0;
    }
    return rc;
}

static int entry_push_copy(es_outbox_entry_list *list, size_t *cap,
                           const es_outbox_entry *e)
{
    void *items = list->items;
    if (es__grow(&items, cap, list->count + 1, sizeof *list->items) != 0)
        return ES_ENOMEM;
    list->items = items;
    uint8_t *data = es__memdup(e->side_effect.data, e->side_effect.len);
    if (data == NULL) return ES_ENOMEM;
    list->items[list->count] = *e;
    list->items[list->count++].side_effect.data = data;
    return 0;
}

static int filter_arrays(const es__outbox_filter *f, size_t n, es_buf *types,
                         es_buf *kinds)
{
    int rc = array_begin(types, OID_TEXT, n);
    if (rc == 0) rc = array_begin(kinds, OID_INT4, n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = array_item(types, f[i].type_name, strlen(f[i].type_name));
        if (rc == 0) rc = array_i32(kinds, f[i].kind);
    }
    return rc;
}

static int pg_outbox_claim(es_store *store, const char *owner, int64_t now,
                           int64_t lease_ms, uint32_t max_attempts,
                           const es__outbox_filter *filters, size_t nf,
                           size_t max, es_outbox_entry_list **out,
                           es_error *err)
{
    pg_store *s = (pg_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    es_buf ftypes = {0}, fkinds = {0};
    if (list == NULL || filter_arrays(filters, nf, &ftypes, &fkinds) != 0) {
        es__free(list);
        es_buf_free(&ftypes);
        es_buf_free(&fkinds);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    uint8_t now_b[8], lease_b[8], max_b[8], att_b[4];
    be64_ms(now_b, now);
    be64(lease_b, (uint64_t)lease_ms);
    be64(max_b, (uint64_t)(max > INT64_MAX ? INT64_MAX : max));
    be32(att_b, max_attempts > INT32_MAX ? INT32_MAX : max_attempts);
    if (rc == 0) {
        const Oid types[4] = {OID_INT8, OID_INT4, OID_TEXT_ARRAY,
                              OID_INT4_ARRAY};
        const char *values[4] = {(const char *)now_b, (const char *)att_b,
                                 (const char *)ftypes.data,
                                 (const char *)fkinds.data};
        const int lens[4] = {8, 4, (int)ftypes.len, (int)fkinds.len};
        rc = run(t.conn, "outbox: expire claims", s->sql[SQL_OB_EXPIRE], 4,
                 types, values, lens, NULL, err);
    }
    /* One claim per aggregate type the filters name: each walks the
     * pending messages of its type in seq order (index on aggregate_type,
     * seq), so a backlog of other types costs nothing.  All messages of
     * an aggregate have its type, so per-aggregate order is whole within
     * one claim.  The first type claimed rotates, so that one type's
     * backlog cannot starve the others. */
    size_t cap = 0, start = nf ? atomic_fetch_add(&s->claim_turn, 1) % nf : 0;
    es_buf plain = {0};
    for (size_t k = 0; rc == 0 && k < nf && list->count < max; k++) {
        const char *type = filters[(start + k) % nf].type_name;
        bool seen = false; /* claimed already under another filter */
        for (size_t j = 0; j < k && !seen; j++)
            seen = strcmp(filters[(start + j) % nf].type_name, type) == 0;
        if (seen) continue;
        uint8_t left_b[8];
        be64(left_b, (uint64_t)(max - list->count > INT64_MAX
                                    ? INT64_MAX
                                    : max - list->count));
        const Oid types[7] = {OID_INT8, OID_INT8, OID_TEXT_ARRAY,
                              OID_INT4_ARRAY, OID_INT8, OID_TEXT, OID_TEXT};
        const char *values[7] = {(const char *)now_b, (const char *)lease_b,
                                 (const char *)ftypes.data,
                                 (const char *)fkinds.data,
                                 (const char *)left_b, owner, type};
        const int lens[7] = {8, 8, (int)ftypes.len, (int)fkinds.len, 8,
                             (int)strlen(owner), (int)strlen(type)};
        PGresult *r = NULL;
        rc = run(t.conn, "outbox: claim", s->sql[SQL_OB_CLAIM], 7, types,
                 values, lens, &r, err);
        for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
            es_outbox_entry e;
            es_error why = {0};
            int orc = entry_read(&t, r, i, &e, &plain, &why);
            if (orc == ES_EDECRYPT || orc == ES_EFORGOTTEN) {
                /* It can never be delivered: a dead letter, with the
                 * reason; the others go on. */
                const Oid dtypes[3] = {OID_UUID, OID_TEXT, OID_TEXT};
                const char *dvalues[3] = {
                    (const char *)e.side_effect.id.bytes, owner,
                    why.message};
                const int dlens[3] = {16, (int)strlen(owner),
                                      (int)strlen(why.message)};
                rc = run(t.conn, "outbox: dead letter", s->sql[SQL_OB_DEAD],
                         3, dtypes, dvalues, dlens, NULL, err);
                continue;
            }
            if (orc != 0) {
                rc = orc;
                if (err) *err = why;
                break;
            }
            if (entry_push_copy(list, &cap, &e) != 0)
                rc = es__error_set(err, ES_ENOMEM, "out of memory");
        }
        PQclear(r);
    }
    es_buf_free(&ftypes);
    es_buf_free(&fkinds);
    es_buf_free(&plain);
    if (t.conn != NULL) ob_end(s, &t);
    if (rc != 0) {
        /* The claims already taken simply expire. */
        es_outbox_entry_list_free(list);
        return rc;
    }
    *out = list;
    return 0;
}

static int pg_outbox_finish(es_store *store, const es_uuid *id,
                            const char *owner, es_outbox_status status,
                            int64_t now, int64_t next_ms, const char *error,
                            es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    char reason[256];
    if (error != NULL) snprintf(reason, sizeof reason, "%s", error);
    const char *st = status_text(status);
    uint8_t now_b[8], next_b[8];
    be64_ms(now_b, now);
    be64_ms(next_b, next_ms);
    const Oid types[6] = {OID_UUID, OID_TEXT, OID_TEXT, OID_INT8, OID_INT8,
                          OID_TEXT};
    const char *values[6] = {(const char *)id->bytes, owner, st,
                             (const char *)now_b, (const char *)next_b,
                             error ? reason : NULL};
    const int lens[6] = {16, (int)strlen(owner), (int)strlen(st), 8, 8,
                         error ? (int)strlen(reason) : 0};
    PGresult *r = NULL;
    rc = run(t.conn, "outbox: finish", s->sql[SQL_OB_FINISH], 6, types,
             values, lens, &r, err);
    bool changed = rc == 0 && strcmp(PQcmdTuples(r), "1") == 0;
    if (rc == 0) PQclear(r);
    if (rc == 0 && !changed) {
        rc = run(t.conn, "outbox: finish", s->sql[SQL_OB_EXISTS], 1, types,
                 values, lens, &r, err);
        if (rc == 0) {
            bool exists = PQntuples(r) > 0;
            PQclear(r);
            rc = exists ? es__error_set(err, ES_ECONFLICT, "claim on the "
                                        "outbox message was lost (lease "
                                        "expired and taken by another)")
                        : es__error_set(err, ES_ENOTFOUND, "outbox message "
                                        "not found");
        }
    }
    ob_end(s, &t);
    return rc;
}

static int pg_outbox_finish_many(es_store *store, const char *owner,
                                 int64_t now, const es__outbox_verdict *v,
                                 size_t n, size_t *lost, es_error *err)
{
    pg_store *s = (pg_store *)store;
    *lost = 0;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many verdicts");
    es_buf ids = {0}, sts = {0}, nexts = {0}, errs = {0};
    int rc = array_begin(&ids, OID_UUID, n);
    if (rc == 0) rc = array_begin(&sts, OID_TEXT, n);
    if (rc == 0) rc = array_begin(&nexts, OID_INT8, n);
    if (rc == 0) rc = array_begin(&errs, OID_TEXT, n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const char *st = status_text(v[i].status);
        rc = array_item(&ids, v[i].id.bytes, 16);
        if (rc == 0) rc = array_item(&sts, st, strlen(st));
        uint8_t next_b[8];
        be64_ms(next_b, v[i].next_attempt_ms);
        if (rc == 0) rc = array_item(&nexts, next_b, 8);
        if (rc == 0)
            rc = array_item(&errs, v[i].error,
                            strnlen(v[i].error, sizeof v[i].error));
    }
    pg_txn t = {0};
    if (rc != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    else
        rc = ob_begin(s, &t, err);
    if (rc == 0) {
        uint8_t now_b[8];
        be64_ms(now_b, now);
        const Oid types[6] = {OID_TEXT, OID_INT8, OID_UUID_ARRAY,
                              OID_TEXT_ARRAY, OID_INT8_ARRAY,
                              OID_TEXT_ARRAY};
        const char *values[6] = {owner, (const char *)now_b,
                                 (const char *)ids.data,
                                 (const char *)sts.data,
                                 (const char *)nexts.data,
                                 (const char *)errs.data};
        const int lens[6] = {(int)strlen(owner), 8, (int)ids.len,
                             (int)sts.len, (int)nexts.len, (int)errs.len};
        PGresult *r = NULL;
        rc = run(t.conn, "outbox: finish", s->sql[SQL_OB_FINISH_MANY], 6,
                 types, values, lens, &r, err);
        if (rc == 0) {
            unsigned long done = strtoul(PQcmdTuples(r), NULL, 10);
            *lost = done < n ? n - (size_t)done : 0;
            PQclear(r);
        }
        ob_end(s, &t);
    }
    es_buf_free(&ids);
    es_buf_free(&sts);
    es_buf_free(&nexts);
    es_buf_free(&errs);
    return rc;
}

static int pg_outbox_list(es_store *store, es_outbox_status status,
                          size_t limit, es_outbox_entry_list **out,
                          es_error *err)
{
    pg_store *s = (pg_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) {
        es__free(list);
        return rc;
    }
    const char *st = status_text(status);
    uint8_t limit_b[8];
    be64(limit_b, (uint64_t)(limit > INT64_MAX ? INT64_MAX : limit));
    const Oid types[2] = {OID_TEXT, OID_INT8};
    const char *values[2] = {st, (const char *)limit_b};
    const int lens[2] = {(int)strlen(st), 8};
    PGresult *r = NULL;
    rc = run(t.conn, "outbox: list", s->sql[SQL_OB_LIST], 2, types, values,
             lens, &r, err);
    size_t cap = 0;
    es_buf plain = {0};
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        es_outbox_entry e;
        es_error why = {0};
        int orc = entry_read(&t, r, i, &e, &plain, &why);
        if (orc == ES_EDECRYPT || orc == ES_EFORGOTTEN) {
            /* Listed without its payload, and the reason shown. */
            snprintf(e.last_error, sizeof e.last_error, "%s", why.message);
        } else if (orc != 0) {
            rc = orc;
            if (err) *err = why;
            break;
        }
        if (entry_push_copy(list, &cap, &e) != 0)
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
    }
    es_buf_free(&plain);
    PQclear(r);
    ob_end(s, &t);
    if (rc != 0) {
        es_outbox_entry_list_free(list);
        return rc;
    }
    *out = list;
    return 0;
}

static int pg_outbox_get(es_store *store, const es_uuid *id,
                         es_outbox_entry **out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)id->bytes};
    const int lens[1] = {16};
    PGresult *r = NULL;
    rc = run(t.conn, "outbox: get", s->sql[SQL_OB_GET], 1, types, values,
             lens, &r, err);
    if (rc == 0 && PQntuples(r) == 0)
        rc = es__error_set(err, ES_ENOTFOUND, "outbox message not found");
    es_buf plain = {0};
    es_outbox_entry e;
    if (rc == 0) rc = entry_read(&t, r, 0, &e, &plain, err);
    if (rc == 0) {
        es_outbox_entry *copy = es__malloc(sizeof *copy + e.side_effect.len);
        if (copy == NULL) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
        } else {
            *copy = e;
            uint8_t *data = (uint8_t *)(copy + 1);
            if (e.side_effect.len > 0)
                memcpy(data, e.side_effect.data, e.side_effect.len);
            copy->side_effect.data = data;
            *out = copy;
        }
    }
    es_buf_free(&plain);
    PQclear(r);
    ob_end(s, &t);
    return rc;
}

/* NOTIFY the outbox channel (delivered when the statement's transaction
 * commits: at once outside a transaction). */
static int notify_channel(pg_store *s, PGconn *c, es_error *err)
{
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {s->channel};
    const int lens[1] = {(int)strlen(s->channel)};
    return run(c, "outbox: notify", "SELECT pg_notify($1, '')", 1, types,
               values, lens, NULL, err);
}

static int pg_outbox_requeue(es_store *store, const es_uuid *id,
                             const char *type_name, int32_t kind, int64_t now,
                             size_t *count, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    uint8_t now_b[8], kind_b[4];
    be64_ms(now_b, now);
    be32(kind_b, (uint32_t)kind);
    PGresult *r = NULL;
    if (id != NULL) {
        const Oid types[2] = {OID_UUID, OID_INT8};
        const char *values[2] = {(const char *)id->bytes, (const char *)now_b};
        const int lens[2] = {16, 8};
        rc = run(t.conn, "outbox: requeue", s->sql[SQL_OB_REQUEUE_ID], 2,
                 types, values, lens, &r, err);
    } else {
        const char *name = type_name ? type_name : "";
        const Oid types[3] = {OID_TEXT, OID_INT8, OID_INT4};
        const char *values[3] = {name, (const char *)now_b,
                                 (const char *)kind_b};
        const int lens[3] = {(int)strlen(name), 8, 4};
        rc = run(t.conn, "outbox: requeue", s->sql[SQL_OB_REQUEUE_TYPE], 3,
                 types, values, lens, &r, err);
    }
    size_t n = 0;
    if (rc == 0) {
        n = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
        PQclear(r);
    }
    if (rc == 0 && n > 0 && s->notify) /* wake other processes' too */
        rc = notify_channel(s, t.conn, err);
    ob_end(s, &t);
    if (rc != 0) return rc;
    if (count) *count = n;
    if (id != NULL && n == 0)
        return es__error_set(err, ES_ENOTFOUND, "no dead letter with that id");
    if (n > 0) es__store_notify(store);
    return 0;
}

/* One bounded DELETE of retention (SQL_OB_PURGE, SQL_PURGE_COMMANDS):
 * $1 a time in Unix ms, $2 the limit; *count the rows it deleted. */
static int purge_batch(pg_store *s, int which, int64_t before_ms,
                       size_t limit, size_t *count, es_error *err)
{
    if (count) *count = 0;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    uint8_t before_b[8], limit_b[8];
    be64_ms(before_b, before_ms);
    be64(limit_b, limit > INT64_MAX ? INT64_MAX : (uint64_t)limit);
    const Oid types[2] = {OID_INT8, OID_INT8};
    const char *values[2] = {(const char *)before_b, (const char *)limit_b};
    const int lens[2] = {8, 8};
    PGresult *r = NULL;
    rc = run(t.conn, sql_info[which].name, s->sql[which], 2, types, values,
             lens, &r, err);
    if (rc == 0) {
        if (count) *count = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
        PQclear(r);
    }
    ob_end(s, &t);
    return rc;
}

static int pg_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                           size_t *count, es_error *err)
{
    return purge_batch((pg_store *)store, SQL_OB_PURGE, before_ms, limit,
                       count, err);
}

static int pg_purge_commands(es_store *store, int64_t before_ms,
                             size_t limit, size_t *count, es_error *err)
{
    return purge_batch((pg_store *)store, SQL_PURGE_COMMANDS, before_ms,
                       limit, count, err);
}

static int pg_outbox_stats(es_store *store, int64_t now, es_outbox_stats *out,
                           es_error *err)
{
    pg_store *s = (pg_store *)store;
    memset(out, 0, sizeof *out);
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    PGresult *r = NULL;
    rc = run(t.conn, "outbox: stats", s->sql[SQL_OB_STATS], 0, NULL, NULL,
             NULL, &r, err);
    int64_t pending = 0, dead = 0, done = 0, oldest = 0;
    if (rc == 0 && (PQntuples(r) != 1 || !col_i64(r, 0, 0, &pending) ||
                    !col_i64(r, 0, 1, &dead) || !col_i64(r, 0, 2, &done) ||
                    !col_i64(r, 0, 3, &oldest)))
        rc = bad_row(err, "outbox: stats");
    PQclear(r);
    ob_end(s, &t);
    if (rc != 0) return rc;
    out->pending = (uint64_t)pending;
    out->dead = (uint64_t)dead;
    out->done = (uint64_t)done;
    if (pending > 0 && now > oldest) out->oldest_pending_age_ms = now - oldest;
    return 0;
}

/* ---- the outbox watch: LISTEN on a connection of its own ---- */

/*
 * A thread in poll() on two descriptors: the connection's socket (a
 * notification arrived, or the connection broke) and a pipe whose byte
 * says stop.  It never runs a statement but LISTEN, so it holds no lock
 * of the store and needs none: the store's pool never sees the
 * connection.  While disconnected it retries after 100 ms, doubling up to
 * retry_max_ms; the dispatcher keeps polling meanwhile, and is woken after
 * each (re)connection in case a notification was missed.
 */
struct es__outbox_watch {
    pg_store *s; /* borrowed: outlives the watch */
    es__watch_fn fn;
    void *ud;
    int64_t retry_max_ms;
    int stop[2]; /* a pipe: readable when the thread must end */
    pthread_t thread;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Connect without blocking the stop pipe, then LISTEN.  NULL when it
 * failed (said once in the log until a connection succeeds) or when the
 * watch is stopping. */
static PGconn *watch_connect(es__outbox_watch *w, bool *warned)
{
    PGconn *c = PQconnectStart(w->s->conninfo);
    if (c == NULL) return NULL;
    PostgresPollingStatusType ps = PQstatus(c) == CONNECTION_BAD
                                       ? PGRES_POLLING_FAILED
                                       : PGRES_POLLING_WRITING;
    while (ps != PGRES_POLLING_OK && ps != PGRES_POLLING_FAILED) {
        struct pollfd f[2] = {
            {w->stop[0], POLLIN, 0},
            {PQsocket(c), ps == PGRES_POLLING_READING ? POLLIN : POLLOUT, 0}};
        if (poll(f, 2, -1) < 0) {
            if (errno == EINTR) continue;
            ps = PGRES_POLLING_FAILED;
            break;
        }
        if (f[0].revents != 0) {
            PQfinish(c);
            return NULL;
        }
        if (f[1].revents != 0) ps = PQconnectPoll(c);
    }
    es_error err = {0};
    int rc = 0;
    if (ps == PGRES_POLLING_FAILED) {
        char msg[200];
        scrub(msg, sizeof msg, PQerrorMessage(c), w->s->password);
        rc = es__error_set(&err, ES_EDB, "could not connect: %s", msg);
    } else {
        PQsetNoticeProcessor(c, quiet_notices, NULL);
        char sql[64];
        snprintf(sql, sizeof sql, "LISTEN \"%s\"", w->s->channel);
        rc = run_simple(c, "outbox: listen", sql, &err);
        if (rc == 0 && PQsetnonblocking(c, 1) != 0)
            rc = es__error_set(&err, ES_EDB, "listen: cannot make the "
                                             "connection non-blocking");
    }
    if (rc != 0) {
        PQfinish(c);
        if (!*warned)
            es__log(ES_LOG_WARN, "outbox: no notifications, polling "
                    "meanwhile: %s", err.message);
        *warned = true;
        return NULL;
    }
    if (*warned)
        es__log(ES_LOG_INFO, "outbox: notifications are back (LISTEN %s)",
                w->s->channel);
    *warned = false;
    return c;
}

static void *watch_main(void *arg)
{
    es__outbox_watch *w = arg;
    PGconn *c = NULL;
    int64_t delay = 100, next = 0; /* when to connect (monotonic ms) */
    bool warned = false;
    for (;;) {
        if (c == NULL && mono_ms() >= next) {
            c = watch_connect(w, &warned);
            if (c != NULL) {
                delay = 100;
                w->fn(w->ud, false); /* we may have missed some */
            } else {
                next = mono_ms() + delay;
                delay = delay * 2 > w->retry_max_ms ? w->retry_max_ms
                                                    : delay * 2;
            }
        }
        struct pollfd f[2] = {{w->stop[0], POLLIN, 0},
                              {c ? PQsocket(c) : -1, POLLIN, 0}};
        int64_t wait = c ? -1 : next - mono_ms();
        if (poll(f, 2, c ? -1 : wait < 0 ? 0 : (int)wait) < 0 &&
            errno != EINTR)
            usleep(1000);
        if (f[0].revents != 0) break;
        if (c == NULL || f[1].revents == 0) continue;
        bool ok = PQconsumeInput(c) == 1, heard = false;
        PGnotify *note;
        while ((note = PQnotifies(c)) != NULL) {
            heard = true;
            PQfreemem(note);
        }
        if (heard) w->fn(w->ud, true);
        if (!ok || PQstatus(c) == CONNECTION_BAD) {
            es__log(ES_LOG_WARN, "outbox: the LISTEN connection was lost; "
                    "polling until it is back");
            warned = true;
            PQfinish(c);
            c = NULL;
            next = mono_ms() + delay;
        }
    }
    if (c != NULL) PQfinish(c);
    return NULL;
}

static int pg_outbox_watch(es_store *store, int64_t retry_max_ms,
                           es__watch_fn fn, void *ud, es__outbox_watch **out,
                           es_error *err)
{
    es__outbox_watch *w = es__calloc(1, sizeof *w);
    if (w == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    w->s = (pg_store *)store;
    w->fn = fn;
    w->ud = ud;
    w->retry_max_ms = retry_max_ms < 100 ? 100 : retry_max_ms;
    if (pipe2(w->stop, O_CLOEXEC) != 0) {
        es__free(w);
        return es__error_set(err, ES_EIO, "outbox: no pipe for the watch");
    }
    if (pthread_create(&w->thread, NULL, watch_main, w) != 0) {
        close(w->stop[0]);
        close(w->stop[1]);
        es__free(w);
        return es__error_set(err, ES_EIO, "outbox: cannot start the "
                                          "watch thread");
    }
    *out = w;
    return 0;
}

static void pg_outbox_unwatch(es__outbox_watch *w)
{
    if (w == NULL) return;
    ssize_t n;
    do n = write(w->stop[1], "x", 1);
    while (n < 0 && errno == EINTR);
    pthread_join(w->thread, NULL);
    close(w->stop[0]);
    close(w->stop[1]);
    es__free(w);
}

/* ---- the batch writer (the host's group commit) ----
 *
 * Many aggregates' items in one transaction with a constant number of
 * statements: all events in one INSERT (rows skipped on conflict come back
 * missing from RETURNING), all command ids in one, all side effects in
 * one, then COMMIT.  Items whose rows were skipped are marked (version
 * taken: ES_ECONFLICT; command id taken: ES_EIDEMPOTENCY; aggregate of
 * another type: ES_EWRONGTYPE) with their group's later items, the writes are
 * rolled back to a savepoint taken before them, and written again without
 * those items, so the innocent ones commit.  A connection lost before
 * COMMIT leaves the items ES__COMMIT_RETRY; one lost during COMMIT is
 * resolved by reading one command id of the batch back before any item
 * gets a status, or leaves them ES__COMMIT_UNKNOWN when the read-back
 * fails too.  Waiting for the database is the caller's (the commit
 * lanes, which can see the host closing). */

typedef struct rowref {
    es_uuid id;
    uint64_t version;
    size_t item;
} rowref;

static int rowref_cmp(const void *a, const void *b)
{
    const rowref *x = a, *y = b;
    int c = memcmp(x->id.bytes, y->id.bytes, 16);
    if (c != 0) return c;
    return x->version < y->version ? -1 : x->version > y->version;
}

static rowref *rowref_find(rowref *refs, size_t n, const es_uuid *id,
                           uint64_t version)
{
    rowref key = {*id, version, 0};
    return bsearch(&key, refs, n, sizeof *refs, rowref_cmp);
}

static void batch_fail_group(es__commit_item **items, size_t n, size_t from,
                             int status)
{
    const void *group = items[from]->group;
    items[from]->status = status;
    for (size_t j = from + 1; j < n; j++)
        if (items[j]->group == group &&
            items[j]->status == ES__COMMIT_PENDING)
            items[j]->status = ES_ECONFLICT;
}

/* The connection broke, or the server is ending it (shutdown, a
 * terminated backend): worth a try on a new connection. */
static bool lost_state(const es_error *err)
{
    return strncmp(err->sqlstate, "08", 2) == 0 ||
           strncmp(err->sqlstate, "57P0", 4) == 0;
}

/* The data keys of the batch's aggregates, read (or made) once per
 * transaction, before the savepoint: a rollback to it keeps them. */
typedef struct batch_keys {
    dek_entry *e; /* sorted by aggregate id */
    size_t n;
} batch_keys;

static int dek_cmp(const void *a, const void *b)
{
    return memcmp(((const dek_entry *)a)->agg.bytes,
                  ((const dek_entry *)b)->agg.bytes, 16);
}

static const dek_entry *batch_key(const batch_keys *k, const es_uuid *agg)
{
    dek_entry key;
    key.agg = *agg;
    return bsearch(&key, k->e, k->n, sizeof *k->e, dek_cmp);
}

static void batch_keys_free(batch_keys *k)
{
    if (k->e) sodium_memzero(k->e, k->n * sizeof *k->e);
    es__free(k->e);
    k->e = NULL;
    k->n = 0;
}

/* The batch's statements are prepared once per lane connection and then
 * only bound and executed: parsing and planning them for every batch
 * took about 42% of PostgreSQL's CPU time (perf, bench_pg).  Their
 * parameter types are fixed here, as they are built below. */
enum { BATCH_EVENTS, BATCH_COMMANDS, BATCH_SIDE_EFFECTS, BATCH_STMTS };
#define BATCH_PARAMS COMMAND_COLS /* the most a batch statement has */
_Static_assert(BATCH_PARAMS <= MAX_PARAMS, "binary_formats is too short");
static const struct {
    const char *name;
    int sql;
    int n;
    Oid types[BATCH_PARAMS];
} batch_stmts[BATCH_STMTS] = {
    [BATCH_EVENTS] = {"es_batch_events", SQL_BATCH_EVENTS, 7,
                      {OID_TEXT_ARRAY, OID_UUID_ARRAY, OID_INT8_ARRAY,
                       OID_UUID_ARRAY, OID_INT4_ARRAY, OID_BYTEA_ARRAY,
                       OID_TEXT_ARRAY}},
    [BATCH_COMMANDS] = {"es_batch_commands", SQL_INSERT_COMMANDS,
                        COMMAND_COLS,
                        {OID_UUID_ARRAY, OID_UUID_ARRAY, OID_INT4_ARRAY,
                         OID_BYTEA_ARRAY, OID_INT8_ARRAY, OID_INT8_ARRAY,
                         OID_INT8_ARRAY, OID_BYTEA_ARRAY, OID_TEXT_ARRAY}},
    [BATCH_SIDE_EFFECTS] = {"es_batch_side_effects", SQL_BATCH_SIDE_EFFECTS,
                            8,
                            {OID_UUID_ARRAY, OID_UUID_ARRAY, OID_UUID_ARRAY,
                             OID_INT4_ARRAY, OID_BYTEA_ARRAY, OID_TEXT_ARRAY,
                             OID_TEXT_ARRAY, OID_TEXT}},
};

/* Marks a connection whose batch statements are prepared: its instance
 * data is the store they were prepared for.  The mark lives and dies
 * with the PGconn (a new connection after a loss has none, so it is
 * prepared again); a reset connection loses its prepared statements, and
 * the mark with them. */
static int batch_evproc(PGEventId id, void *info, void *pass)
{
    (void)pass;
    if (id == PGEVT_CONNRESET)
        PQsetInstanceData(((PGEventConnReset *)info)->conn, batch_evproc,
                          NULL);
    return 1;
}

/* One statement of a batch's pipeline: its array parameters and, for the
 * events and the command ids, which item each row is of. */
typedef struct pstmt {
    const char *what, *name; /* name: prepared (batch_stmts) */
    int n;
    Oid types[BATCH_PARAMS];
    es_buf buf[BATCH_PARAMS]; /* arrays; the side effects' 8th is plain */
    rowref *refs; /* sorted by (id, version) once built */
    size_t rows;
    bool sent;
} pstmt;

static void pstmt_free(pstmt *p)
{
    for (int i = 0; i < BATCH_PARAMS; i++) es_buf_free(&p->buf[i]);
    es__free(p->refs);
    memset(p, 0, sizeof *p);
}

static int pstmt_init(pstmt *p, const char *what, int stmt,
                      const Oid *elems, size_t rows, es_error *err)
{
    p->what = what;
    p->name = batch_stmts[stmt].name;
    p->n = batch_stmts[stmt].n;
    const Oid *types = batch_stmts[stmt].types;
    p->rows = rows;
    int rc = 0;
    for (int i = 0; rc == 0 && i < p->n; i++) {
        p->types[i] = types[i];
        if (elems[i] != 0) rc = array_begin(&p->buf[i], elems[i], rows);
    }
    return rc == 0 ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
}

static int pstmt_send(PGconn *c, pstmt *p, es_error *err)
{
    const char *values[BATCH_PARAMS];
    int lens[BATCH_PARAMS];
    for (int i = 0; i < p->n; i++) {
        if (p->buf[i].len > INT32_MAX)
            return es__error_set(err, ES_EINVAL, "%s: a batch of %zu bytes "
                                 "is too large for one statement", p->what,
                                 p->buf[i].len);
        values[i] = (const char *)p->buf[i].data;
        lens[i] = (int)p->buf[i].len;
    }
    if (!PQsendQueryPrepared(c, p->name, p->n, values, lens, binary_formats,
                             1))
        return db_error(c, NULL, err, p->what);
    p->sent = true;
    return 0;
}

/* The events of the pending items; an item with a version or payload
 * PostgreSQL cannot take fails with its group at once. */
static int build_events(pg_store *s, const batch_keys *keys,
                        es__commit_item **items, size_t n, pstmt *p,
                        es_error *err)
{
    size_t rows = 0;
    for (size_t i = 0; i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        for (size_t j = 0; j < it->n_events; j++)
            if (it->events[j].version > INT64_MAX ||
                it->events[j].len > MAX_PAYLOAD) {
                batch_fail_group(items, n, i, ES_EINVAL);
                break;
            }
        if (it->status == ES__COMMIT_PENDING) rows += it->n_events;
    }
    if (rows == 0) return 0;
    if (rows > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many events in a batch");
    static const Oid elems[7] = {OID_TEXT, OID_UUID, OID_INT8, OID_UUID,
                                 OID_INT4, OID_BYTEA, OID_TEXT};
    int rc = pstmt_init(p, "batch: insert events", BATCH_EVENTS, elems, rows,
                        err);
    if (rc != 0) return rc;
    p->refs = es__calloc(rows, sizeof *p->refs);
    if (p->refs == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    es_buf *ty = &p->buf[0], *ag = &p->buf[1], *ver = &p->buf[2];
    es_buf *ids = &p->buf[3], *kinds = &p->buf[4], *data = &p->buf[5];
    es_buf *kk = &p->buf[6];
    if (!s->encrypt) kk->data[7] = 1; /* has NULLs */
    size_t r = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        const dek_entry *d = NULL;
        if (s->encrypt && it->n_events > 0 &&
            (d = batch_key(keys, &it->aggregate_id)) == NULL)
            return es__error_set(err, ES_EINVAL, "batch: no data key");
        size_t tlen = strlen(it->type_name);
        for (size_t j = 0; rc == 0 && j < it->n_events; j++, r++) {
            const es_event *e = &it->events[j];
            p->refs[r] = (rowref){it->aggregate_id, e->version, i};
            rc = array_item(ty, it->type_name, tlen);
            if (rc == 0) rc = array_item(ag, it->aggregate_id.bytes, 16);
            if (rc == 0) rc = array_i64(ver, (int64_t)e->version);
            if (rc == 0) rc = array_item(ids, e->id.bytes, 16);
            if (rc == 0) rc = array_i32(kinds, e->kind);
            if (rc == 0 && d) {
                ad_buf ad;
                ad_event(&ad, &it->aggregate_id, e->version);
                rc = array_sealed(data, d->dek, &ad, e->data, e->len);
                if (rc == 0) rc = array_item(kk, d->kek, strlen(d->kek));
            } else if (rc == 0) {
                rc = array_item(data, e->data, e->len);
                if (rc == 0) rc = put32(kk, 0xffffffffu); /* NULL */
            }
        }
    }
    if (rc != 0) return es__error_set(err, ES_ENOMEM, "out of memory");
    qsort(p->refs, rows, sizeof *p->refs, rowref_cmp);
    return 0;
}

/* The rows of p that the statement did not return (in[row] false) were
 * not inserted: their items' groups fail with status. */
static void fail_unreturned(es__commit_item **items, size_t n,
                            const pstmt *p, const bool *in, int status,
                            bool *failed)
{
    for (size_t j = 0; j < p->rows; j++)
        if (!in[j] && items[p->refs[j].item]->status == ES__COMMIT_PENDING) {
            batch_fail_group(items, n, p->refs[j].item, status);
            *failed = true;
        }
}

/* Items whose events did not all go in fail: a version was taken
 * (ES_ECONFLICT) or the aggregate is of another type (ES_EWRONGTYPE). */
static int apply_events(es__commit_item **items, size_t n, const pstmt *p,
                        const PGresult *res, bool *failed, es_error *err)
{
    bool *in = es__calloc(p->rows, sizeof *in);
    if (in == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        es_uuid agg;
        uint64_t v = 0;
        if (!col_uuid(res, i, 0, &agg)) {
            rc = bad_row(err, "batch: insert events");
            break;
        }
        if (PQgetisnull(res, i, 1)) { /* an aggregate of another type */
            for (size_t j = 0; j < n; j++)
                if (items[j]->status == ES__COMMIT_PENDING &&
                    es_uuid_equal(&items[j]->aggregate_id, &agg)) {
                    batch_fail_group(items, n, j, ES_EWRONGTYPE);
                    *failed = true;
                }
            continue;
        }
        if (!col_u64(res, i, 1, &v)) {
            rc = bad_row(err, "batch: insert events");
            break;
        }
        rowref *f = rowref_find(p->refs, p->rows, &agg, v);
        if (f) in[f - p->refs] = true;
    }
    if (rc == 0) fail_unreturned(items, n, p, in, ES_ECONFLICT, failed);
    es__free(in);
    return rc;
}

/* The command-id records of the pending items (a rejection's reason
 * sealed with its aggregate's data key when the store encrypts). */
static int build_commands(pg_store *s, const batch_keys *keys,
                          es__commit_item **items, size_t n, pstmt *p,
                          es_error *err)
{
    size_t rows = 0;
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING) rows++;
    if (rows == 0) return 0;
    int rc = pstmt_init(p, "batch: insert command ids", BATCH_COMMANDS,
                        command_elems, rows, err);
    if (rc != 0) return rc;
    p->refs = es__calloc(rows, sizeof *p->refs);
    if (p->refs == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t r = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (items[i]->status != ES__COMMIT_PENDING) continue;
        const es__command_record *c = &items[i]->record;
        p->refs[r++] = (rowref){c->command_id, 0, i};
        const dek_entry *d = NULL;
        if (s->encrypt && c->rejected &&
            (d = batch_key(keys, &items[i]->aggregate_id)) == NULL)
            return es__error_set(err, ES_EINVAL, "batch: no data key");
        rc = command_row(p->buf, c, d);
    }
    if (rc != 0) return es__error_set(err, ES_ENOMEM, "out of memory");
    qsort(p->refs, rows, sizeof *p->refs, rowref_cmp);
    return 0;
}

/* Items whose command id did not go in fail with ES_EIDEMPOTENCY. */
static int apply_commands(es__commit_item **items, size_t n, const pstmt *p,
                          const PGresult *res, bool *failed, es_error *err)
{
    bool *in = es__calloc(p->rows, sizeof *in);
    if (in == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        es_uuid id;
        if (!col_uuid(res, i, 0, &id)) {
            rc = bad_row(err, "batch: insert command ids");
            break;
        }
        rowref *f = rowref_find(p->refs, p->rows, &id, 0);
        if (f) in[f - p->refs] = true;
    }
    if (rc == 0) fail_unreturned(items, n, p, in, ES_EIDEMPOTENCY, failed);
    es__free(in);
    return rc;
}

/* The side effects of the pending items. */
static int build_side_effects(pg_store *s, const batch_keys *keys,
                              es__commit_item **items, size_t n, pstmt *p,
                              es_error *err)
{
    size_t rows = 0;
    for (size_t i = 0; i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        for (size_t j = 0; j < it->n_side_effects; j++)
            if (it->side_effects[j].len > MAX_PAYLOAD) {
                batch_fail_group(items, n, i, ES_EINVAL);
                break;
            }
        if (it->status == ES__COMMIT_PENDING) rows += it->n_side_effects;
    }
    if (rows == 0) return 0;
    if (rows > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many side effects");
    /* the 8th parameter is not an array: the NOTIFY channel */
    static const Oid elems[8] = {OID_UUID, OID_UUID, OID_UUID, OID_INT4,
                                 OID_BYTEA, OID_TEXT, OID_TEXT, 0};
    int rc = pstmt_init(p, "batch: insert side effects", BATCH_SIDE_EFFECTS,
                        elems, rows, err);
    if (rc != 0) return rc;
    /* The NOTIFY channel, a parameter like every value ($8). */
    if (es_buf_append_str(&p->buf[7], s->channel) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    es_buf *kk = &p->buf[5];
    if (!s->encrypt) kk->data[7] = 1; /* has NULLs */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        for (size_t j = 0; rc == 0 && j < it->n_side_effects; j++) {
            const es_side_effect *e = &it->side_effects[j];
            rc = array_item(&p->buf[0], e->id.bytes, 16);
            if (rc == 0) rc = array_item(&p->buf[1], e->aggregate_id.bytes, 16);
            if (rc == 0) rc = array_item(&p->buf[2], e->event_id.bytes, 16);
            if (rc == 0) rc = array_i32(&p->buf[3], e->kind);
            if (rc == 0)
                rc = array_item(&p->buf[6], it->type_name,
                                strlen(it->type_name));
            if (rc != 0) break;
            if (!s->encrypt) {
                rc = array_item(&p->buf[4], e->data, e->len);
                if (rc == 0) rc = put32(kk, 0xffffffffu); /* NULL */
                continue;
            }
            const dek_entry *d = batch_key(keys, &e->aggregate_id);
            if (d == NULL)
                return es__error_set(err, ES_EINVAL, "batch: no data key");
            ad_buf ad;
            ad_side_effect(&ad, e);
            rc = array_sealed(&p->buf[4], d->dek, &ad, e->data, e->len);
            if (rc == 0) rc = array_item(kk, d->kek, strlen(d->kek));
        }
    }
    return rc == 0 ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
}

/* ---- the batch writer: commit lanes on a libevent loop ----
 *
 * A lane writes a batch in a few round trips on a connection of its own,
 * each a libpq pipeline ended by a sync, sent and read without blocking
 * (PQsetnonblocking): the loop's event on the socket drives it, so one
 * loop thread serves every lane.  The steps:
 *   - connect (PQconnectStart and PQconnectPoll) and prepare the batch
 *     statements, once per connection;
 *   - items ES__COMMIT_UNKNOWN on entry: read back by the command id of
 *     one of them, before anything is written;
 *   - with encryption: BEGIN and the data keys of the batch, read FOR
 *     SHARE in one round trip (the missing ones are made and stored in a
 *     second);
 *   - the writes: [BEGIN,] SAVEPOINT, the events, the command ids and the
 *     side effects; when rows did not go in, their groups fail and the
 *     rest is written again after ROLLBACK TO SAVEPOINT;
 *   - COMMIT; an answer that was lost is read back.
 * pg_write_batch runs the same steps on a loop of its own, to the end. */

typedef struct pg_lane pg_lane;
typedef void (*lane_step)(pg_lane *l, bool ok);

/* A connection attempt that makes no progress for this long fails (libpq
 * leaves connect_timeout to the caller of PQconnectPoll). */
#define LANE_CONNECT_TIMEOUT_S 10
/* A round trip whose socket stays silent for this long (a half-open
 * connection: the server or the network gone without a word) counts as
 * a lost connection: the statement timeout, when set, plus this margin;
 * else LANE_SILENCE_S.  A COMMIT cut off this way is read back. */
#define LANE_SILENCE_MARGIN_MS 5000
#define LANE_SILENCE_S 60

struct pg_lane {
    pg_store *s;
    struct event_base *base;
    struct event *ev; /* the connection's socket */
    PGconn *conn;
    bool connecting;
    lane_step on_rt;  /* the round trip under way ends here */
    lane_step on_conn; /* connected and prepared, or not */
    PGresult **res;   /* the round trip's results, in order, no sync */
    size_t n_res, cap_res;
    bool res_oom;
    /* the batch */
    es__commit_item **items;
    size_t n;
    es__batch_done done;
    void *ud;
    size_t committed;
    int lost; /* transactions lost with their connection, this batch */
    bool begun, first, side_effects;
    bool setup;    /* a new connection: SET its session settings */
    bool new_conn; /* lane_ensure made a new connection */
    int n_head;        /* statements before the batch's in a round trip */
    int key_attempt;
    batch_keys keys;
    size_t keys_cap;
    es_uuid *need; /* the aggregates whose keys a round trip asks for */
    size_t n_need;
    dek_entry *made; /* keys made for need[], stored by the round trip */
    pstmt st[3];
    const es__command_record *probe;
    void (*after_resolve)(pg_lane *l, int outcome);
    /* The connection's backend as pg_stat_activity names it (pid and
     * backend_start, which tells it from a later backend with the same
     * pid); "" when it could not be read.  The orphan: the backend of a
     * connection dropped in a transaction (lane_drop).  While it lives
     * (a half-open connection, a stopped server process) it holds the
     * rows it wrote, and if its COMMIT was sent it may still commit: a
     * read back that does not find the batch proves nothing, and the
     * batch written again waits on those rows.  So the read back asks it
     * to end (lane_orphan_send) and waits, with the host's backoff,
     * until it has; the next writes ask it to end and go on (no COMMIT
     * reached it, or it was read back: it cannot commit). */
    char conn_start[64];
    int orphan_pid;
    char orphan_start[64];
    bool asked_orphan;
    /* A COMMIT of the fallback writer cut off (cut_commits) that this
     * read back asked about: it counts as an orphan. */
    int cut_pid;
    char cut_start[64];
    es_error err;
};

static void lane_io(evutil_socket_t fd, short what, void *arg);

static void lane_results_clear(pg_lane *l)
{
    for (size_t i = 0; i < l->n_res; i++) PQclear(l->res[i]);
    l->n_res = 0;
    l->res_oom = false;
}

/* Close the connection (a broken one, or one in an unknown state); its
 * backend becomes the orphan if it may hold a transaction of ours.  One
 * orphan at a time: while one is kept, a read back writes nothing, and
 * the writes after it have asked it to end. */
static void lane_drop(pg_lane *l)
{
    event_del(l->ev);
    if (l->conn && l->orphan_pid == 0 && l->conn_start[0] &&
        PQtransactionStatus(l->conn) != PQTRANS_IDLE) {
        l->orphan_pid = PQbackendPID(l->conn);
        memcpy(l->orphan_start, l->conn_start, sizeof l->orphan_start);
    }
    if (l->conn) PQfinish(l->conn);
    l->conn = NULL;
    l->connecting = false;
}

/* Wait on the socket for what (and at most tv). */
static bool lane_wait(pg_lane *l, short what, const struct timeval *tv)
{
    event_del(l->ev);
    int fd = PQsocket(l->conn);
    return fd >= 0 &&
           event_assign(l->ev, l->base, fd, what, lane_io, l) == 0 &&
           event_add(l->ev, tv) == 0;
}

/* The connection failed: l->err says how (as lost unless set). */
static void lane_lost(pg_lane *l, const char *what)
{
    if (l->err.code == 0) {
        if (l->conn) db_error(l->conn, NULL, &l->err, what);
        else {
            es__error_set(&l->err, ES_EDB, "%s: connection to the database "
                          "lost", what);
            memcpy(l->err.sqlstate, LOST_SQLSTATE, 6);
        }
    }
    lane_drop(l);
}

/* The end of a round trip: its step runs with its results. */
static void lane_rt_end(pg_lane *l, bool ok)
{
    event_del(l->ev);
    lane_step step = l->on_rt;
    l->on_rt = NULL;
    if (ok && l->res_oom) {
        es__error_set(&l->err, ES_ENOMEM, "out of memory");
        ok = false;
    }
    step(l, ok);
}

/* How long a round trip may wait for its socket. */
static int64_t silence_ms(const pg_store *s)
{
    return s->statement_timeout_ms > 0
               ? s->statement_timeout_ms + LANE_SILENCE_MARGIN_MS
               : (int64_t)LANE_SILENCE_S * 1000;
}

static struct timeval lane_silence(const pg_lane *l)
{
    int64_t ms = silence_ms(l->s);
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000 * 1000)};
    return tv;
}

/* Results as they arrive, up to the sync that ends the round trip. */
static void lane_rt_io(pg_lane *l, short what)
{
    if (what & EV_TIMEOUT) {
        struct timeval tv = lane_silence(l);
        es__error_set(&l->err, ES_EDB, "connection to the database lost: "
                      "no answer within %lld ms", (long long)tv.tv_sec * 1000 +
                      (long long)tv.tv_usec / 1000);
        memcpy(l->err.sqlstate, LOST_SQLSTATE, 6);
        lane_rt_end(l, false);
        return;
    }
    if ((what & EV_READ) && !PQconsumeInput(l->conn)) {
        lane_rt_end(l, false);
        return;
    }
    int f = PQflush(l->conn);
    if (f < 0) {
        lane_rt_end(l, false);
        return;
    }
    int nulls = 0;
    while (!PQisBusy(l->conn)) {
        PGresult *r = PQgetResult(l->conn);
        if (r == NULL) { /* between two statements' results */
            if (PQstatus(l->conn) == CONNECTION_BAD || ++nulls > 1) break;
            continue;
        }
        nulls = 0;
        if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            lane_rt_end(l, PQexitPipelineMode(l->conn) == 1);
            return;
        }
        if (l->n_res == l->cap_res) {
            size_t cap = l->cap_res ? l->cap_res * 2 : 8;
            PGresult **p = es__realloc(l->res, cap * sizeof *p);
            if (p == NULL) {
                l->res_oom = true;
                PQclear(r);
                continue;
            }
            l->res = p;
            l->cap_res = cap;
        }
        l->res[l->n_res++] = r;
    }
    struct timeval tv = lane_silence(l);
    if (PQstatus(l->conn) == CONNECTION_BAD ||
        !lane_wait(l, EV_READ | (f == 1 ? EV_WRITE : 0), &tv))
        lane_rt_end(l, false);
}

/* A round trip: enter pipeline mode, then the caller sends its statements
 * and calls lane_rt_go. */
static bool lane_rt_begin(pg_lane *l)
{
    lane_results_clear(l);
    return PQenterPipelineMode(l->conn) == 1;
}

/* Send what was queued with a sync; step runs when its results are in.
 * sent false: queueing failed (the connection, unless l->err says). */
static void lane_rt_go(pg_lane *l, bool sent, lane_step step)
{
    l->on_rt = step;
    int f = -1;
    if (sent && PQpipelineSync(l->conn) == 1) f = PQflush(l->conn);
    struct timeval tv = lane_silence(l);
    if (f < 0 || !lane_wait(l, EV_READ | (f == 1 ? EV_WRITE : 0), &tv))
        lane_rt_end(l, false);
}

static bool res_ok(const PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
}

/* Result i of the round trip, NULL when it did not come. */
static const PGresult *lane_res(const pg_lane *l, size_t i)
{
    return i < l->n_res ? l->res[i] : NULL;
}

/* ---- connecting ---- */

static void lane_prepared(pg_lane *l, bool ok)
{
    bool good = ok;
    /* the session settings, the statement timeout (setup), DEALLOCATE
     * ALL, the statements; then the backend's start */
    int n = 2 + BATCH_STMTS + (l->setup ? 1 : 0);
    for (int i = 0; good && i < n; i++) {
        const PGresult *r = lane_res(l, (size_t)i);
        if (r == NULL || !res_ok(r)) {
            db_error(l->conn, r, &l->err, "batch: prepare");
            good = false;
        }
    }
    if (!good) {
        lane_lost(l, "batch: prepare");
        l->on_conn(l, false);
        return;
    }
    const PGresult *r = lane_res(l, (size_t)n);
    l->conn_start[0] = 0;
    if (r != NULL && PQresultStatus(r) == PGRES_TUPLES_OK &&
        PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) &&
        strlen(PQgetvalue(r, 0, 0)) < sizeof l->conn_start)
        strcpy(l->conn_start, PQgetvalue(r, 0, 0));
    if (!PQsetInstanceData(l->conn, batch_evproc, l->s) &&
        PQregisterEventProc(l->conn, batch_evproc, "eventastic batch", NULL))
        PQsetInstanceData(l->conn, batch_evproc, l->s);
    l->on_conn(l, true);
}

/* The batch statements, prepared once per connection in one round trip
 * (with the session's settings on a new one).  DEALLOCATE ALL first, so
 * that an earlier try that failed half way cannot make a name clash. */
static void lane_prepare(pg_lane *l)
{
    if (PQinstanceData(l->conn, batch_evproc) == l->s) {
        l->on_conn(l, true);
        return;
    }
    bool sent = lane_rt_begin(l);
    if (sent)
        sent = PQsendQueryParams(l->conn, ES__PG_SESSION, 0, NULL, NULL,
                                 NULL, NULL, 0) == 1;
    if (sent && l->setup) {
        char sql[64];
        snprintf(sql, sizeof sql, "SET statement_timeout = %lld",
                 (long long)l->s->statement_timeout_ms);
        sent = PQsendQueryParams(l->conn, sql, 0, NULL, NULL, NULL, NULL,
                                 0) == 1;
    }
    if (sent)
        sent = PQsendQueryParams(l->conn, "DEALLOCATE ALL", 0, NULL, NULL,
                                 NULL, NULL, 0) == 1;
    for (int i = 0; sent && i < BATCH_STMTS; i++)
        sent = PQsendPrepare(l->conn, batch_stmts[i].name,
                             l->s->sql[batch_stmts[i].sql], batch_stmts[i].n,
                             batch_stmts[i].types) == 1;
    /* the backend's start, for telling it apart later (lane_orphan) */
    if (sent)
        sent = PQsendQueryParams(l->conn, "SELECT backend_start::text FROM "
                                 "pg_stat_activity WHERE pid = "
                                 "pg_backend_pid()", 0, NULL, NULL, NULL,
                                 NULL, 0) == 1;
    lane_rt_go(l, sent, lane_prepared);
}

static void lane_connect_failed(pg_lane *l)
{
    char msg[200];
    scrub(msg, sizeof msg,
          l->conn ? PQerrorMessage(l->conn) : "out of memory", l->s->password);
    es__error_set(&l->err, ES_EDB, "could not connect to the database: %s",
                  msg);
    memcpy(l->err.sqlstate, "08001", 6);
    lane_drop(l);
    l->on_conn(l, false);
}

static void lane_connect_poll(pg_lane *l, short what)
{
    static const struct timeval tv = {LANE_CONNECT_TIMEOUT_S, 0};
    if (what & EV_TIMEOUT) {
        es__error_set(&l->err, ES_EDB, "could not connect to the database: "
                      "no answer within %d s", LANE_CONNECT_TIMEOUT_S);
        memcpy(l->err.sqlstate, "08001", 6);
        lane_drop(l);
        l->on_conn(l, false);
        return;
    }
    switch (PQconnectPoll(l->conn)) {
    case PGRES_POLLING_READING:
        if (!lane_wait(l, EV_READ, &tv)) lane_connect_failed(l);
        return;
    case PGRES_POLLING_WRITING:
        if (!lane_wait(l, EV_WRITE, &tv)) lane_connect_failed(l);
        return;
    case PGRES_POLLING_OK:
        l->connecting = false;
        event_del(l->ev);
        PQsetNoticeProcessor(l->conn, quiet_notices, NULL);
        if (PQsetnonblocking(l->conn, 1) != 0) {
            lane_connect_failed(l);
            return;
        }
        l->setup = l->s->statement_timeout_ms != 0;
        lane_prepare(l);
        return;
    case PGRES_POLLING_FAILED:
    case PGRES_POLLING_ACTIVE: /* not used since PostgreSQL 8 */
        break;
    }
    lane_connect_failed(l);
}

static void lane_io(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    pg_lane *l = arg;
    if (l->connecting) lane_connect_poll(l, what);
    else if (l->on_rt) lane_rt_io(l, what);
}

/* A connection ready for the batch statements, then then(l, ok); not ok:
 * l->err says why. */
static void lane_ensure(pg_lane *l, lane_step then)
{
    l->on_conn = then;
    l->setup = l->new_conn = false;
    if (l->conn && PQstatus(l->conn) == CONNECTION_OK &&
        PQtransactionStatus(l->conn) == PQTRANS_IDLE) {
        if (PQisnonblocking(l->conn) || PQsetnonblocking(l->conn, 1) == 0) {
            lane_prepare(l);
            return;
        }
    }
    lane_drop(l);
    l->conn_start[0] = 0;
    l->conn = PQconnectStart(l->s->conninfo);
    if (l->conn == NULL || PQstatus(l->conn) == CONNECTION_BAD) {
        lane_connect_failed(l);
        return;
    }
    l->connecting = l->new_conn = true;
    lane_connect_poll(l, 0);
}

/* ---- the orphan ---- */

/* Queue the question for the orphan: if it still runs, it is asked to
 * end (this role may end its own backends), and a row says it was still
 * there; no row, it is gone.  The pid alone could name a later
 * backend: backend_start tells them apart. */
static bool lane_end_send(pg_lane *l, int backend, const char *start)
{
    static const Oid types[2] = {OID_INT4, OID_TEXT};
    char pid[16];
    snprintf(pid, sizeof pid, "%d", backend);
    const char *values[2] = {pid, start};
    return PQsendQueryParams(l->conn, "SELECT pg_terminate_backend(pid) "
                             "FROM pg_stat_activity WHERE pid = $1 AND "
                             "backend_start::text = $2", 2, types, values,
                             NULL, NULL, 0) == 1;
}

static bool lane_orphan_send(pg_lane *l)
{
    return lane_end_send(l, l->orphan_pid, l->orphan_start);
}

/* The first COMMIT cut off on the fallback writer's connection that is
 * not known to be over (0: none), into pid and start. */
static int cut_commit_first(pg_store *s, char start[64])
{
    pthread_mutex_lock(&s->lock);
    int pid = 0;
    for (size_t i = 0; pid == 0 && i < sizeof s->cut_commits /
                                               sizeof *s->cut_commits;
         i++)
        if (s->cut_commits[i].pid != 0) {
            pid = s->cut_commits[i].pid;
            memcpy(start, s->cut_commits[i].start, 64);
        }
    pthread_mutex_unlock(&s->lock);
    return pid;
}

/* Its backend is gone: its transaction is over. */
static void cut_commit_over(pg_store *s, int pid, const char *start)
{
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < sizeof s->cut_commits / sizeof *s->cut_commits;
         i++)
        if (s->cut_commits[i].pid == pid &&
            strcmp(s->cut_commits[i].start, start) == 0)
            s->cut_commits[i].pid = 0;
    pthread_mutex_unlock(&s->lock);
}

/* ---- reading a COMMIT back ---- */

static void lane_resolve_ask(pg_lane *l, bool ok);

static void lane_resolved(pg_lane *l, bool ok)
{
    size_t k = 0;
    if (l->asked_orphan) {
        const PGresult *o = lane_res(l, k++);
        if (ok && o != NULL && PQresultStatus(o) == PGRES_TUPLES_OK) {
            if (PQntuples(o) > 0) { /* asked to end; it may still commit */
                l->after_resolve(l, -1);
                return;
            }
            l->orphan_pid = 0; /* gone: its transaction is over */
        }
    }
    if (l->cut_pid != 0) {
        const PGresult *o = lane_res(l, k++);
        if (ok && o != NULL && PQresultStatus(o) == PGRES_TUPLES_OK) {
            if (PQntuples(o) > 0) { /* the same for the fallback's */
                l->after_resolve(l, -1);
                return;
            }
            cut_commit_over(l->s, l->cut_pid, l->cut_start);
        }
    }
    const PGresult *r = lane_res(l, k);
    if (!ok || r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
        if (!ok) lane_lost(l, "read back");
        else lane_drop(l);
        if (!l->new_conn) { /* a kept connection: once more on a new one */
            lane_ensure(l, lane_resolve_ask);
            return;
        }
        l->after_resolve(l, -1);
        return;
    }
    if (PQntuples(r) == 0) {
        l->after_resolve(l, 0);
        return;
    }
    es_uuid agg;
    int64_t version = 0;
    bool ours = col_uuid(r, 0, 0, &agg) && col_i64(r, 0, 5, &version) &&
                es_uuid_equal(&agg, &l->probe->aggregate_id) &&
                (uint64_t)version == l->probe->version;
    l->after_resolve(l, ours ? 1 : -1);
}

static void lane_resolve_ask(pg_lane *l, bool ok)
{
    if (!ok) {
        l->after_resolve(l, -1);
        return;
    }
    static const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)l->probe->command_id.bytes};
    static const int lens[1] = {16};
    bool sent = lane_rt_begin(l);
    l->asked_orphan = l->orphan_pid != 0;
    if (sent && l->asked_orphan) sent = lane_orphan_send(l);
    l->cut_pid = cut_commit_first(l->s, l->cut_start);
    if (sent && l->cut_pid != 0)
        sent = lane_end_send(l, l->cut_pid, l->cut_start);
    if (sent)
        sent = PQsendQueryParams(l->conn, l->s->sql[SQL_GET_COMMAND], 1,
                                 types, values, lens, binary_formats,
                                 1) == 1;
    lane_rt_go(l, sent, lane_resolved);
}

/* After a COMMIT whose answer was lost: did it commit?  The command id of
 * one written item answers for the whole transaction, once the backend
 * that had the COMMIT has ended (l->orphan_pid).  after(l, 1):
 * committed, 0: not, -1: could not find out, or that backend still runs
 * (the caller waits and asks again).  On the kept connection if there is
 * one, then once on a new one. */
static void lane_resolve(pg_lane *l, const es__command_record *probe,
                         void (*after)(pg_lane *l, int outcome))
{
    l->probe = probe;
    l->after_resolve = after;
    lane_ensure(l, lane_resolve_ask);
}

/* ---- a batch ---- */

static bool any_pending(es__commit_item **items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING) return true;
    return false;
}

/* Sets every item still status `from` to `to`, with `why`. */
static void batch_mark(es__commit_item **items, size_t n, int from, int to,
                       const char *why)
{
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == from) {
            items[i]->status = to;
            items[i]->why = why;
        }
}

static void lane_batch_free(pg_lane *l)
{
    batch_keys_free(&l->keys);
    l->keys_cap = 0;
    if (l->made) sodium_memzero(l->made, l->n_need * sizeof *l->made);
    es__free(l->made);
    l->made = NULL;
    es__free(l->need);
    l->need = NULL;
    l->n_need = 0;
    for (int i = 0; i < 3; i++) pstmt_free(&l->st[i]);
    lane_results_clear(l);
}

static void lane_finish(pg_lane *l)
{
    lane_batch_free(l);
    es__batch_done done = l->done;
    l->done = NULL;
    l->items = NULL;
    done(l->ud, l->committed);
}

static void txn_next(pg_lane *l);

/* Nothing of the transaction committed (l->err says why).  A connection
 * that died while idle is tried once more on a new one; a database that
 * cannot be reached is the caller's to wait for; any other failure is
 * left to the generic writer, which can pin it on one item. */
static void txn_failed(pg_lane *l)
{
    if (!lost_state(&l->err)) {
        lane_finish(l);
        return;
    }
    if (++l->lost < 2) {
        txn_next(l);
        return;
    }
    batch_mark(l->items, l->n, ES__COMMIT_PENDING, ES__COMMIT_RETRY,
               "commit: the database could not be reached (connection "
               "lost or refused); nothing was committed");
    lane_finish(l);
}

static void txn_rolled_back(pg_lane *l, bool ok)
{
    if (!ok) lane_drop(l);
    if (l->err.code != 0) txn_failed(l);
    else lane_finish(l);
}

/* End the open transaction with ROLLBACK, then txn_failed (l->err set) or
 * the end of the batch (nothing left to write). */
static void txn_rollback(pg_lane *l)
{
    if (l->conn == NULL || PQstatus(l->conn) != CONNECTION_OK ||
        PQtransactionStatus(l->conn) == PQTRANS_IDLE) {
        txn_rolled_back(l, l->conn != NULL &&
                               PQstatus(l->conn) == CONNECTION_OK);
        return;
    }
    bool sent = lane_rt_begin(l) &&
                PQsendQueryParams(l->conn, "ROLLBACK", 0, NULL, NULL, NULL,
                                  NULL, 0) == 1;
    lane_rt_go(l, sent, txn_rolled_back);
}

static void txn_commit_resolved(pg_lane *l, int outcome)
{
    if (outcome == 1) {
        batch_mark(l->items, l->n, ES__COMMIT_PENDING, 0, NULL);
        l->committed++;
        if (l->side_effects) es__store_notify(&l->s->base);
        lane_finish(l);
    } else if (outcome < 0) {
        batch_mark(l->items, l->n, ES__COMMIT_PENDING, ES__COMMIT_UNKNOWN,
                   "commit: connection lost during COMMIT and the outcome "
                   "could not be read back");
        lane_finish(l);
    } else { /* read back: not there, so nothing of it committed */
        memset(&l->err, 0, sizeof l->err);
        es__error_set(&l->err, ES_EDB, "commit: connection lost during "
                      "COMMIT; it did not commit");
        memcpy(l->err.sqlstate, LOST_SQLSTATE, 6);
        txn_failed(l);
    }
}

static void txn_committed(pg_lane *l, bool ok)
{
    const PGresult *r = lane_res(l, 0);
    if (ok && r != NULL && PQresultStatus(r) == PGRES_COMMAND_OK) {
        if (strcmp(PQcmdStatus((PGresult *)r), "COMMIT") == 0) {
            txn_commit_resolved(l, 1);
            return;
        }
        /* COMMIT of a failed transaction answers ROLLBACK */
        es__error_set(&l->err, ES_EDB, "commit: the transaction had failed "
                      "earlier and was rolled back");
        memcpy(l->err.sqlstate, "25P02", 6);
        txn_failed(l);
        return;
    }
    if (ok && r != NULL && !commit_cut(r) &&
        PQstatus(l->conn) == CONNECTION_OK) {
        db_error(l->conn, r, &l->err, "commit");
        txn_failed(l); /* the server answered: it did not commit */
        return;
    }
    /* The answer was lost: the truth first, once the backend that had
     * the COMMIT (the orphan lane_drop makes) has ended. */
    lane_drop(l);
    const es__command_record *probe = NULL;
    for (size_t i = 0; i < l->n && probe == NULL; i++)
        if (l->items[i]->status == ES__COMMIT_PENDING)
            probe = &l->items[i]->record;
    lane_resolve(l, probe, txn_commit_resolved);
}

static void txn_commit(pg_lane *l)
{
    bool sent = lane_rt_begin(l) &&
                PQsendQueryParams(l->conn, "COMMIT", 0, NULL, NULL, NULL,
                                  NULL, 0) == 1;
    lane_rt_go(l, sent, txn_committed);
}

static void txn_write(pg_lane *l);

static void txn_written(pg_lane *l, bool ok)
{
    if (!ok) {
        lane_lost(l, "batch: write");
        txn_failed(l);
        return;
    }
    if (l->asked_orphan) l->orphan_pid = 0; /* asked to end (once) */
    size_t k = 0;
    int rc = 0;
    bool failed = false;
    for (int i = 0; rc == 0 && i < l->n_head; i++, k++) {
        const PGresult *r = lane_res(l, k);
        if (r == NULL || !res_ok(r))
            rc = db_error(l->conn, r, &l->err, "batch: begin");
    }
    l->begun = true;
    for (int i = 0; rc == 0 && i < 3; i++) {
        if (!l->st[i].sent) continue;
        const PGresult *r = lane_res(l, k++);
        if (r == NULL || !res_ok(r))
            rc = db_error(l->conn, r, &l->err, l->st[i].what);
        else if (i == 0)
            rc = apply_events(l->items, l->n, &l->st[0], r, &failed, &l->err);
        else if (i == 1)
            rc = apply_commands(l->items, l->n, &l->st[1], r, &failed,
                                &l->err);
        else if (strcmp(PQcmdTuples((PGresult *)r), "0") != 0)
            l->side_effects = true;
    }
    if (rc != 0) {
        txn_rollback(l);
        return;
    }
    l->first = false;
    if (!any_pending(l->items, l->n)) {
        txn_rollback(l); /* nothing left to commit */
        return;
    }
    if (failed) txn_write(l); /* the rest again, from the savepoint */
    else txn_commit(l);
}

/* The writes of the pending items, in one round trip: BEGIN (unless
 * begun), a savepoint (or back to it), the events, the command ids and
 * the side effects. */
static void txn_write(pg_lane *l)
{
    for (int i = 0; i < 3; i++) pstmt_free(&l->st[i]);
    int rc = build_events(l->s, &l->keys, l->items, l->n, &l->st[0],
                          &l->err);
    if (rc == 0)
        rc = build_commands(l->s, &l->keys, l->items, l->n, &l->st[1],
                            &l->err);
    if (rc == 0)
        rc = build_side_effects(l->s, &l->keys, l->items, l->n, &l->st[2],
                                &l->err);
    if (rc != 0 || !any_pending(l->items, l->n)) {
        txn_rollback(l);
        return;
    }
    bool sent = lane_rt_begin(l);
    l->n_head = 0;
    if (sent && !l->begun) {
        sent = PQsendQueryParams(l->conn, "BEGIN ISOLATION LEVEL READ "
                                 "COMMITTED", 0, NULL, NULL, NULL, NULL,
                                 0) == 1;
        l->n_head++;
    }
    /* the orphan's rows would hold the writes up: it is asked to end */
    l->asked_orphan = l->first && l->orphan_pid != 0;
    if (sent && l->asked_orphan) {
        sent = lane_orphan_send(l);
        l->n_head++;
    }
    if (sent) {
        sent = PQsendQueryParams(l->conn, l->first
                                     ? "SAVEPOINT es_batch"
                                     : "ROLLBACK TO SAVEPOINT es_batch",
                                 0, NULL, NULL, NULL, NULL, 0) == 1;
        l->n_head++;
    }
    for (int i = 0; sent && i < 3; i++)
        if (l->st[i].rows > 0 && pstmt_send(l->conn, &l->st[i], &l->err) != 0)
            sent = false;
    if (!sent && l->err.code != 0 && !lost_state(&l->err) &&
        PQstatus(l->conn) == CONNECTION_OK) {
        /* a batch too large for one statement: nothing was sent yet */
        PQexitPipelineMode(l->conn);
        if (PQpipelineStatus(l->conn) != PQ_PIPELINE_OFF) lane_drop(l);
        txn_rollback(l);
        return;
    }
    lane_rt_go(l, sent, txn_written);
}

/* ---- the data keys (encryption at rest) ---- */

/* An item needs its aggregate's data key for its events, or for the
 * reason of its rejection (sealed like them). */
static bool item_needs_key(const es__commit_item *it)
{
    return it->n_events > 0 || it->record.rejected;
}

/* Fail the groups of the pending items that need agg's key. */
static void keys_fail(pg_lane *l, const es_uuid *agg, int status)
{
    for (size_t i = 0; i < l->n; i++) {
        es__commit_item *it = l->items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        bool uses = item_needs_key(it) &&
                    es_uuid_equal(&it->aggregate_id, agg);
        for (size_t j = 0; !uses && j < it->n_side_effects; j++)
            uses = es_uuid_equal(&it->side_effects[j].aggregate_id, agg);
        if (uses) batch_fail_group(l->items, l->n, i, status);
    }
}

static int keys_add(pg_lane *l, const dek_entry *d)
{
    batch_keys *k = &l->keys;
    if (k->n == l->keys_cap) {
        size_t nc = l->keys_cap ? l->keys_cap * 2 : 16;
        dek_entry *e = es__calloc(nc, sizeof *e);
        if (e == NULL) return ES_ENOMEM;
        if (k->n) memcpy(e, k->e, k->n * sizeof *e);
        size_t n = k->n;
        batch_keys_free(k);
        k->e = e;
        k->n = n;
        l->keys_cap = nc;
    }
    k->e[k->n++] = *d;
    return 0;
}

static int uuid_cmp(const void *a, const void *b)
{
    return memcmp(((const es_uuid *)a)->bytes, ((const es_uuid *)b)->bytes,
                  16);
}

static void keys_ask(pg_lane *l);

/* The keys are in (or their groups failed): sorted, then the writes. */
static void keys_done(pg_lane *l)
{
    if (l->keys.n > 1) qsort(l->keys.e, l->keys.n, sizeof *l->keys.e, dek_cmp);
    txn_write(l);
}

static void keys_stored(pg_lane *l, bool ok)
{
    if (!ok) {
        lane_lost(l, "store data key");
        txn_failed(l);
        return;
    }
    size_t m = 0, k = 0;
    for (size_t i = 0; i < l->n_need; i++) {
        if (es_uuid_is_nil(&l->made[i].agg)) continue; /* not made */
        const PGresult *r = lane_res(l, k++);
        if (r == NULL || !res_ok(r)) {
            db_error(l->conn, r, &l->err, "store data key");
            txn_rollback(l);
            return;
        }
        if (strcmp(PQcmdTuples((PGresult *)r), "1") != 0)
            l->need[m++] = l->need[i]; /* another made one first */
        else if (keys_add(l, &l->made[i]) != 0) {
            es__error_set(&l->err, ES_ENOMEM, "out of memory");
            txn_rollback(l);
            return;
        }
    }
    sodium_memzero(l->made, l->n_need * sizeof *l->made);
    es__free(l->made);
    l->made = NULL;
    l->n_need = m;
    if (m == 0) {
        keys_done(l);
        return;
    }
    l->key_attempt++;
    keys_ask(l); /* read the ones another transaction made */
}

/* Make the missing keys and store them, in one round trip. */
static void keys_make(pg_lane *l)
{
    l->made = es__calloc(l->n_need, sizeof *l->made);
    if (l->made == NULL) {
        es__error_set(&l->err, ES_ENOMEM, "out of memory");
        txn_rollback(l);
        return;
    }
    bool sent = lane_rt_begin(l);
    for (size_t i = 0; sent && i < l->n_need; i++) {
        uint8_t wrapped[ES_PG_WRAPPED_MAX];
        size_t wlen = 0;
        es_error kerr = {0};
        int rc = dek_new(l->s, &l->need[i], &l->made[i], wrapped, &wlen,
                         &kerr);
        if (rc != 0) {
            keys_fail(l, &l->need[i], rc);
            continue;
        }
        static const Oid types[3] = {OID_UUID, OID_TEXT, OID_BYTEA};
        const char *values[3] = {(const char *)l->need[i].bytes,
                                 l->made[i].kek, (const char *)wrapped};
        const int lens[3] = {16, (int)strlen(l->made[i].kek), (int)wlen};
        sent = PQsendQueryParams(l->conn, l->s->sql[SQL_PUT_KEY], 3, types,
                                 values, lens, binary_formats, 1) == 1;
        sodium_memzero(wrapped, sizeof wrapped);
    }
    lane_rt_go(l, sent, keys_stored);
}

static void keys_read(pg_lane *l, bool ok)
{
    if (!ok) {
        lane_lost(l, "read data key");
        txn_failed(l);
        return;
    }
    size_t k = 0;
    if (!l->begun) {
        const PGresult *r = lane_res(l, k++);
        if (r == NULL || !res_ok(r)) {
            db_error(l->conn, r, &l->err, "batch: begin");
            txn_rollback(l);
            return;
        }
        l->begun = true;
    }
    size_t m = 0;
    for (size_t i = 0; i < l->n_need; i++) {
        const PGresult *r = lane_res(l, k++);
        if (r == NULL || !res_ok(r)) {
            db_error(l->conn, r, &l->err, "read data key");
            txn_rollback(l);
            return;
        }
        if (PQntuples(r) != 1) {
            l->need[m++] = l->need[i];
            continue;
        }
        dek_entry e;
        es_error kerr = {0};
        int rc = dek_from_row(l->s, &l->need[i], r, 0, true, &e, &kerr);
        if (rc == 0 && keys_add(l, &e) != 0) rc = ES_ENOMEM;
        sodium_memzero(&e, sizeof e);
        if (rc != 0) keys_fail(l, &l->need[i], rc);
    }
    l->n_need = m;
    if (m == 0) {
        keys_done(l);
        return;
    }
    if (l->key_attempt > 0) { /* made by another, then gone: give up */
        for (size_t i = 0; i < m; i++) keys_fail(l, &l->need[i], ES_EDB);
        keys_done(l);
        return;
    }
    keys_make(l);
}

/* BEGIN (unless begun) and the keys in l->need, read FOR SHARE. */
static void keys_ask(pg_lane *l)
{
    bool sent = lane_rt_begin(l);
    if (sent && !l->begun)
        sent = PQsendQueryParams(l->conn, "BEGIN ISOLATION LEVEL READ "
                                 "COMMITTED", 0, NULL, NULL, NULL, NULL,
                                 0) == 1;
    static const Oid types[1] = {OID_UUID};
    static const int lens[1] = {16};
    for (size_t i = 0; sent && i < l->n_need; i++) {
        const char *values[1] = {(const char *)l->need[i].bytes};
        sent = PQsendQueryParams(l->conn, l->s->sql[SQL_LOCK_KEY], 1, types,
                                 values, lens, binary_formats, 1) == 1;
    }
    lane_rt_go(l, sent, keys_read);
}

/* The data keys of every aggregate the pending items write to (events,
 * side effects, a rejection's reason). */
static void keys_load(pg_lane *l)
{
    size_t cap = 0;
    for (size_t i = 0; i < l->n; i++)
        if (l->items[i]->status == ES__COMMIT_PENDING)
            cap += item_needs_key(l->items[i]) +
                   l->items[i]->n_side_effects;
    l->n_need = 0;
    if (cap > 0 && (l->need = es__calloc(cap, sizeof *l->need)) == NULL) {
        es__error_set(&l->err, ES_ENOMEM, "out of memory");
        txn_failed(l);
        return;
    }
    for (size_t i = 0; i < l->n; i++) {
        es__commit_item *it = l->items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        if (item_needs_key(it)) l->need[l->n_need++] = it->aggregate_id;
        for (size_t j = 0; j < it->n_side_effects; j++)
            l->need[l->n_need++] = it->side_effects[j].aggregate_id;
    }
    if (l->n_need > 1) qsort(l->need, l->n_need, sizeof *l->need, uuid_cmp);
    size_t m = 0;
    for (size_t i = 0; i < l->n_need; i++)
        if (m == 0 || !es_uuid_equal(&l->need[m - 1], &l->need[i]))
            l->need[m++] = l->need[i];
    l->n_need = m;
    if (m == 0) {
        keys_done(l);
        return;
    }
    keys_ask(l);
}

/* ---- the batch, transaction by transaction ---- */

static void txn_connected(pg_lane *l, bool ok)
{
    if (!ok) {
        txn_failed(l);
        return;
    }
    if (l->s->encrypt) keys_load(l);
    else txn_write(l);
}

/* One transaction over the pending items (none left: the batch ends). */
static void txn_next(pg_lane *l)
{
    if (!any_pending(l->items, l->n)) {
        lane_finish(l);
        return;
    }
    lane_batch_free(l);
    memset(&l->err, 0, sizeof l->err);
    l->begun = l->side_effects = false;
    l->first = true;
    l->key_attempt = 0;
    lane_ensure(l, txn_connected);
}

static void lane_entry_resolved(pg_lane *l, int outcome)
{
    if (outcome < 0) { /* still unknown: asked again later */
        lane_finish(l);
        return;
    }
    batch_mark(l->items, l->n, ES__COMMIT_UNKNOWN,
               outcome == 1 ? 0 : ES__COMMIT_PENDING, NULL);
    if (outcome == 1) l->committed++;
    batch_mark(l->items, l->n, ES__COMMIT_RETRY, ES__COMMIT_PENDING, NULL);
    l->lost = 0;
    txn_next(l);
}

static void pg_lane_write(es__batch_lane *lane, es__commit_item **items,
                          size_t n, es__batch_done done, void *ud)
{
    pg_lane *l = (pg_lane *)lane;
    l->items = items;
    l->n = n;
    l->done = done;
    l->ud = ud;
    l->committed = 0;
    memset(&l->err, 0, sizeof l->err);
    /* A batch whose COMMIT answer was lost: the truth first. */
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_UNKNOWN) {
            lane_resolve(l, &items[i]->record, lane_entry_resolved);
            return;
        }
    lane_entry_resolved(l, 0);
}

static int pg_lane_open(es_store *store, struct event_base *base,
                        es__batch_lane **out, es_error *err)
{
    pg_lane *l = es__calloc(1, sizeof *l);
    if (l == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    l->s = (pg_store *)store;
    l->base = base;
    l->ev = event_new(base, -1, 0, lane_io, l);
    if (l->ev == NULL) {
        es__free(l);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    *out = (es__batch_lane *)l;
    return 0;
}

static void pg_lane_close(es__batch_lane *lane)
{
    pg_lane *l = (pg_lane *)lane;
    if (l == NULL) return;
    lane_drop(l);
    lane_batch_free(l);
    event_free(l->ev);
    es__free(l->res);
    es__free(l);
}

/* write_batch: the lane's steps on a loop of its own, to the end, with
 * the caller's connection. */
typedef struct sync_batch {
    bool done;
    size_t committed;
} sync_batch;

static void sync_batch_done(void *ud, size_t committed)
{
    sync_batch *b = ud;
    b->done = true;
    b->committed = committed;
}

static size_t pg_write_batch(es_store *store, void **slot,
                             es__commit_item **items, size_t n)
{
    struct event_base *base = event_base_new();
    es__batch_lane *lane = NULL;
    if (base == NULL || pg_lane_open(store, base, &lane, NULL) != 0) {
        if (base) event_base_free(base);
        return 0; /* left pending: the generic writer */
    }
    pg_lane *l = (pg_lane *)lane;
    l->conn = *slot;
    sync_batch b = {false, 0};
    pg_lane_write(lane, items, n, sync_batch_done, &b);
    while (!b.done) event_base_loop(base, EVLOOP_ONCE);
    *slot = l->conn;
    l->conn = NULL;
    pg_lane_close(lane);
    event_base_free(base);
    return b.committed;
}

static const es_store_ops postgres_ops;

const char *es__pg_statement(const es_store *store, size_t i,
                             const char **name, bool *admin)
{
    if (store == NULL || store->ops != &postgres_ops || i >= SQL_COUNT)
        return NULL;
    *name = sql_info[i].name;
    *admin = sql_info[i].admin;
    return ((const pg_store *)store)->sql[i];
}

static const es_store_ops postgres_ops = {
    .name = "postgres",
    .begin = pg_begin,
    .begin_bounded = pg_begin_bounded,
    .commit = pg_commit,
    .rollback = pg_rollback,
    .savepoint = pg_savepoint,
    .rollback_to = pg_rollback_to,
    .release = pg_release,
    .stream = pg_stream,
    .get_event = pg_get_event,
    .insert_events = pg_insert_events,
    .insert_side_effects = pg_insert_side_effects,
    .get_snapshot = pg_get_snapshot,
    .store_snapshot = pg_store_snapshot,
    .delete_snapshots = pg_delete_snapshots,
    .list_side_effects = pg_list_side_effects,
    .outbox_claim = pg_outbox_claim,
    .outbox_finish = pg_outbox_finish,
    .outbox_finish_many = pg_outbox_finish_many,
    .outbox_list = pg_outbox_list,
    .outbox_get = pg_outbox_get,
    .outbox_requeue = pg_outbox_requeue,
    .outbox_purge = pg_outbox_purge,
    .outbox_stats = pg_outbox_stats,
    .outbox_watch = pg_outbox_watch,
    .outbox_unwatch = pg_outbox_unwatch,
    .insert_commands = pg_insert_commands,
    .get_command = pg_get_command,
    .purge_commands = pg_purge_commands,
    .write_batch = pg_write_batch,
    .lane_open = pg_lane_open,
    .lane_write = pg_lane_write,
    .lane_close = pg_lane_close,
    .begin_background = pg_begin_background,
    .background_close = pg_background_close,
    .close = pg_close,
};

static uint64_t fnv1a(const char *s);

static int build_sql(pg_store *s, const es_pg_config *cfg)
{
    char e[2 * NAME_BUF + 8], sn[2 * NAME_BUF + 8], o[2 * NAME_BUF + 8];
    char k[2 * NAME_BUF + 8], m[2 * NAME_BUF + 8], cm[2 * NAME_BUF + 8];
    qualify(cm, sizeof cm, cfg->schema, cfg->tables[ES_PG_TABLE_COMMANDS]);
    s->sql[SQL_INSERT_COMMANDS] = sqlf(
        "INSERT INTO %s (command_id, aggregate_id, kind, digest, "
        "first_version, event_count, version, rejection, rejection_key) "
        "SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::integer[], "
        "$4::bytea[], $5::bigint[], $6::bigint[], $7::bigint[], "
        "$8::bytea[], $9::text[]) "
        "ON CONFLICT (command_id) DO NOTHING RETURNING command_id", cm);
    /* Retention of command ids: a bounded batch through the BRIN index
     * on created_at (rows go in in time order; migration 11). */
    s->sql[SQL_PURGE_COMMANDS] = sqlf(
        "DELETE FROM %s WHERE command_id IN (SELECT command_id FROM %s "
        "WHERE created_at < to_timestamp($1::bigint / 1000.0) LIMIT $2)",
        cm, cm);
    s->sql[SQL_GET_COMMAND] = sqlf(
        "SELECT aggregate_id, kind, digest, first_version, event_count, "
        "version, rejection, rejection_key FROM %s WHERE command_id = $1",
        cm);
    qualify(k, sizeof k, cfg->schema, cfg->tables[ES_PG_TABLE_KEYS]);
    qualify(m, sizeof m, cfg->schema, cfg->tables[ES_PG_TABLE_MIGRATIONS]);
    qualify(e, sizeof e, cfg->schema, cfg->tables[ES_PG_TABLE_EVENTS]);
    qualify(sn, sizeof sn, cfg->schema, cfg->tables[ES_PG_TABLE_SNAPSHOTS]);
    qualify(o, sizeof o, cfg->schema, cfg->tables[ES_PG_TABLE_OUTBOX]);
    /* The migrations table is read only where it exists (to_regclass):
     * the name is a parameter there, and the version query runs only
     * when it was found. */
    s->sql[SQL_STATUS_VERSION] = sqlf(
        "SELECT coalesce(max(version), 0)::bigint FROM %s", m);
    s->sql[SQL_STATUS_COUNTS] = sqlf(
        "SELECT (SELECT count(*) FROM %s), (SELECT count(DISTINCT "
        "aggregate_id) FROM %s), (SELECT count(*) FROM %s), (SELECT count(*) "
        "FROM %s), (SELECT count(*) FROM %s WHERE wrapped IS NULL)",
        e, e, sn, k, k);
    snprintf(s->migrations, sizeof s->migrations, "%s", m);
    /* The creation event (version 0) holds the aggregate's type: a save
     * under another type is refused instead of mixing two streams. */
    s->sql[SQL_INSERT_EVENTS] = sqlf(
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
    /* The host's batches (pg_write_batch): many aggregates' events in
     * one statement; RETURNING names the rows that went in, and an
     * aggregate whose creation event has another type comes back with a
     * NULL version (none of its rows is inserted). */
    /* The type check is one primary-key probe per row (LATERAL with
     * LIMIT: never flattened into a join), so its plan cannot turn into a
     * hash join over the whole events table, whatever the estimates of
     * the unnest or the table's statistics say (a generic plan chosen
     * while the table was small did that: 4.5 ms a batch, growing). */
    s->sql[SQL_BATCH_EVENTS] = sqlf(
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
    s->sql[SQL_BATCH_SIDE_EFFECTS] = sqlf(
        "WITH ins AS (INSERT INTO %s (id, aggregate_id, event_id, kind, "
        "payload, key_id, aggregate_type) SELECT * FROM unnest($1::uuid[], "
        "$2::uuid[], $3::uuid[], $4::integer[], $5::bytea[], $6::text[], "
        "$7::text[]) ON CONFLICT (id) DO NOTHING RETURNING 1) SELECT %s FROM "
        "(SELECT 1 FROM ins LIMIT 1) AS one", o,
        s->notify ? "pg_notify($8, '')" : "$8::text");
    /* Every row carries its type, checked before its payload is opened
     * or handed over (a few bytes a row; the row is read anyway). */
    s->sql[SQL_STREAM] = sqlf(
        "SELECT version, event_id, kind, payload, key_id, aggregate_type "
        "FROM %s WHERE aggregate_id = $1 AND version >= $2 ORDER BY version "
        "LIMIT $3", e);
    s->sql[SQL_STREAM_REST] = sqlf(
        "SELECT version, event_id, kind, payload, key_id, aggregate_type "
        "FROM %s WHERE aggregate_id = $1 AND version >= $2 ORDER BY version",
        e);
    s->sql[SQL_TYPE_OF] = sqlf(
        "SELECT aggregate_type FROM %s WHERE aggregate_id = $1 AND "
        "version = 0", e);
    s->sql[SQL_GET_EVENT] = sqlf(
        "SELECT aggregate_id, version, kind, payload, key_id FROM %s WHERE "
        "aggregate_id = $2 AND event_id = $1", e);
    /* NOTIFY in the same statement (no extra round trip) when a row went
     * in: it is delivered only if the transaction commits, and one
     * transaction's notifications are folded into one.  The result has a
     * row exactly when something was inserted. */
    s->sql[SQL_INSERT_SIDE_EFFECTS] = sqlf(
        "WITH ins AS (INSERT INTO %s (id, aggregate_id, event_id, kind, "
        "payload, key_id, aggregate_type) SELECT u.*, $7 FROM "
        "unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::integer[], "
        "$5::bytea[], $6::text[]) AS u ON CONFLICT (id) DO NOTHING "
        "RETURNING 1) SELECT %s FROM (SELECT 1 FROM ins LIMIT 1) AS one", o,
        s->notify ? "pg_notify($8, '')" : "$8::text");
    snprintf(s->channel, sizeof s->channel, "es_outbox_%016llx",
             (unsigned long long)fnv1a(o));
    s->sql[SQL_LIST_SIDE_EFFECTS] = sqlf(
        "SELECT id, aggregate_id, event_id, kind, payload, key_id FROM %s "
        "WHERE status = 'pending' AND ($1::uuid IS NULL OR aggregate_id = "
        "$1) ORDER BY seq", o);
    /* A snapshot's type is its aggregate's: the creation event's.  Two
     * primary-key probes, one row whether or not either exists. */
    s->sql[SQL_GET_SNAPSHOT] = sqlf(
        "SELECT (SELECT aggregate_type FROM %s WHERE aggregate_id = $1 AND "
        "version = 0), s.version, s.payload, s.key_id FROM (SELECT 1) AS one "
        "LEFT JOIN %s s ON s.aggregate_id = $1 AND s.snapshot_version = $2",
        e, sn);
    s->sql[SQL_STORE_SNAPSHOT] = sqlf(
        "INSERT INTO %s AS stored (aggregate_id, snapshot_version, version, "
        "payload, key_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT "
        "(aggregate_id, "
        "snapshot_version) DO UPDATE SET version = excluded.version, payload "
        "= excluded.payload, key_id = excluded.key_id, created_at = now() "
        "WHERE stored.version <= excluded.version", sn);
    s->sql[SQL_DELETE_SNAPSHOTS] = sqlf(
        "DELETE FROM %s WHERE aggregate_id = $1", sn);
    s->sql[SQL_GET_KEY] = sqlf(
        "SELECT key_id, wrapped FROM %s WHERE aggregate_id = $1", k);
    s->sql[SQL_LOCK_KEY] = sqlf(
        "SELECT key_id, wrapped FROM %s WHERE aggregate_id = $1 FOR SHARE",
        k);
    s->sql[SQL_PUT_KEY] = sqlf(
        "INSERT INTO %s (aggregate_id, key_id, wrapped) VALUES ($1, $2, $3) "
        "ON CONFLICT (aggregate_id) DO NOTHING", k);
    s->sql[SQL_FORGET_KEY] = sqlf(
        "INSERT INTO %s AS k (aggregate_id, key_id, wrapped, destroyed_at) "
        "VALUES ($1, '', NULL, now()) ON CONFLICT (aggregate_id) DO UPDATE "
        "SET wrapped = NULL, destroyed_at = coalesce(k.destroyed_at, now())",
        k);
    /* Reasons of the aggregate's rejections kept in clear (recorded
     * before migration 9, or by a store without keys): emptied, and
     * marked sealed, so that they read as forgotten like the sealed
     * ones. */
    s->sql[SQL_FORGET_REASONS] = sqlf(
        "UPDATE %s SET rejection = '\\x'::bytea, rejection_key = '' WHERE "
        "aggregate_id = $1 AND rejection IS NOT NULL AND rejection_key IS "
        "NULL", cm);
    s->sql[SQL_FORGET_SIDE_EFFECTS] = sqlf(
        "UPDATE %s SET status = 'dead', last_error = 'aggregate forgotten "
        "(crypto-shredding)' WHERE aggregate_id = $1 AND status = "
        "'pending'", o);
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
    s->sql[SQL_OB_EXPIRE] = sqlf(
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
    s->sql[SQL_OB_CLAIM] = sqlf(
        "WITH pick AS (SELECT o.id FROM %s o WHERE o.status = 'pending' "
        "AND o.aggregate_type = $7 AND " OB_FILTER " AND (o.claimed_by IS NULL OR o.claimed_until <= "
        MS(1) ") AND o.next_attempt_at <= " MS(1) " AND NOT EXISTS (SELECT "
        "1 FROM %s p WHERE p.aggregate_id = o.aggregate_id AND p.status = "
        "'pending' AND p.seq < o.seq AND EXISTS (SELECT 1 FROM unnest("
        "$3::text[], $4::integer[]) AS f(t, k) WHERE f.t = p.aggregate_type "
        "AND (f.k = -2147483648 OR f.k = p.kind)) OFFSET 0) ORDER BY o.seq "
        "LIMIT $5 "
        "FOR UPDATE OF o SKIP LOCKED), "
        "upd AS (UPDATE %s o SET attempts = o.attempts + 1, claimed_by = $6, "
        "claimed_until = " MS(1) " + $2 * interval '1 millisecond' FROM pick "
        "WHERE o.id = pick.id RETURNING " OB_COLS ") "
        "SELECT * FROM upd ORDER BY seq",
        o, o, o);
    s->sql[SQL_OB_DEAD] = sqlf(
        "UPDATE %s SET status = 'dead', last_error = $3, claimed_by = NULL, "
        "claimed_until = NULL WHERE id = $1 AND claimed_by = $2", o);
    s->sql[SQL_OB_FINISH] = sqlf(
        "UPDATE %s SET status = $3, next_attempt_at = CASE WHEN $3 = "
        "'pending' THEN " MS(5) " ELSE next_attempt_at END, finished_at = "
        "CASE WHEN $3 = 'done' THEN " MS(4) " ELSE finished_at END, "
        "last_error = coalesce($6, last_error), claimed_by = NULL, "
        "claimed_until = NULL WHERE id = $1 AND status = 'pending' AND "
        "claimed_by = $2", o);
    /* Many verdicts at once: the arrays are ids, statuses, next attempt
     * times (Unix ms) and errors ('' for none). */
    s->sql[SQL_OB_FINISH_MANY] = sqlf(
        "UPDATE %s o SET status = v.st, next_attempt_at = CASE WHEN v.st = "
        "'pending' THEN 'epoch'::timestamptz + v.next * interval "
        "'1 millisecond' ELSE o.next_attempt_at END, finished_at = CASE "
        "WHEN v.st = 'done' THEN " MS(2) " ELSE o.finished_at END, "
        "last_error = coalesce(nullif(v.err, ''), o.last_error), "
        "claimed_by = NULL, claimed_until = NULL FROM unnest($3::uuid[], "
        "$4::text[], $5::bigint[], $6::text[]) AS v(id, st, next, err) "
        "WHERE o.id = v.id AND o.status = 'pending' AND o.claimed_by = $1",
        o);
    s->sql[SQL_OB_EXISTS] = sqlf("SELECT 1 FROM %s WHERE id = $1", o);
    s->sql[SQL_OB_LIST] = sqlf(
        "SELECT " OB_COLS " FROM %s o WHERE o.status = $1 ORDER BY o.seq "
        "LIMIT $2", o);
    s->sql[SQL_OB_GET] = sqlf("SELECT " OB_COLS " FROM %s o WHERE o.id = $1",
                              o);
    s->sql[SQL_OB_REQUEUE_ID] = sqlf(
        "UPDATE %s SET status = 'pending', attempts = 0, next_attempt_at = "
        MS(2) ", claimed_by = NULL, claimed_until = NULL WHERE id = $1 AND "
        "status = 'dead'", o);
    s->sql[SQL_OB_REQUEUE_TYPE] = sqlf(
        "UPDATE %s SET status = 'pending', attempts = 0, next_attempt_at = "
        MS(2) ", claimed_by = NULL, claimed_until = NULL WHERE status = "
        "'dead' AND aggregate_type = $1 AND ($3 = -2147483648 OR kind = $3)",
        o);
    /* Retention: a bounded batch, oldest first, through the index on
     * done messages' finish time; the dispatcher runs it while commands
     * are served. */
    s->sql[SQL_OB_PURGE] = sqlf(
        "DELETE FROM %s WHERE id IN (SELECT id FROM %s WHERE status = "
        "'done' AND finished_at < " MS(1) " ORDER BY finished_at LIMIT $2)",
        o, o);
    s->sql[SQL_OB_STATS] = sqlf(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER "
        "(WHERE status = 'dead'), count(*) FILTER (WHERE status = 'done'), "
        "coalesce((extract(epoch from min(created_at) FILTER (WHERE status "
        "= 'pending')) * 1000)::bigint, 0) FROM %s", o);
#undef MS
#undef OB_COLS
#undef OB_FILTER
    for (int i = 0; i < SQL_COUNT; i++)
        if (s->sql[i] == NULL) return ES_ENOMEM;
    return 0;
}

int es_pg_store_open(const es_pg_config *cfg, es_store **out, es_error *err)
{
    if (cfg == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "config and out are required");
    const char *ci = NULL;
    int rc = resolve_conninfo(cfg, &ci, err);
    if (rc != 0) return rc;
    pg_store *s = es__calloc(1, sizeof *s);
    if (s == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    es__store_init(&s->base, &postgres_ops);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->chunk = cfg->chunk;
    s->statement_timeout_ms = cfg->statement_timeout_ms;
    s->notify = !cfg->no_notify;
    s->max = cfg->pool_size;
    if ((rc = conninfo_check(ci, &s->password, err)) != 0) {
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
        s->provider = (es_pg_key_provider){keyring_current, keyring_wrap,
                                           keyring_unwrap, s};
        s->encrypt = true;
    } else if (cfg->provider.wrap != NULL) {
        s->provider = cfg->provider;
        s->encrypt = true;
    }
    if (es__pg_conninfo_with_defaults(ci, &s->conninfo) != 0)
        s->conninfo = NULL;
    s->idle = es__calloc(s->max, sizeof *s->idle);
    if (s->conninfo == NULL || s->idle == NULL ||
        (cfg->n_keys > 0 && s->keys == NULL) || build_sql(s, cfg) != 0) {
        pg_close(&s->base);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    PGconn *c = NULL;
    if ((rc = store_connect(s, &c, err)) != 0) {
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
    if (txn->store->ops != &postgres_ops)
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
    dek_cache_clear(t);
    int rc = run(t->conn, "forget: destroy data key", s->sql[SQL_FORGET_KEY],
                 1, types, values, lens, NULL, err);
    if (rc == 0)
        rc = run(t->conn, "forget: delete snapshots",
                 s->sql[SQL_DELETE_SNAPSHOTS], 1, types, values, lens, NULL,
                 err);
    if (rc == 0)
        rc = run(t->conn, "forget: side effects",
                 s->sql[SQL_FORGET_SIDE_EFFECTS], 1, types, values, lens,
                 NULL, err);
    if (rc == 0)
        rc = run(t->conn, "forget: rejection reasons in clear",
                 s->sql[SQL_FORGET_REASONS], 1, types, values, lens, NULL,
                 err);
    return rc;
}

int es_pg_status_get(es_store *store, es_pg_status *out, es_error *err)
{
    if (store == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "store and out are required");
    if (store->ops != &postgres_ops)
        return es__error_set(err, ES_EINVAL, "not a PostgreSQL store");
    pg_store *s = (pg_store *)store;
    memset(out, 0, sizeof *out);
    out->library_version = es_pg_schema_version();
    es_txn *txn = NULL;
    int rc = pg_begin(store, &txn, err);
    if (rc != 0) return rc;
    pg_txn *t = (pg_txn *)txn;
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {s->migrations};
    const int lens[1] = {(int)strlen(s->migrations)};
    PGresult *r = NULL;
    rc = run(t->conn, "status: find migrations table",
             "SELECT to_regclass($1) IS NOT NULL", 1, types, values, lens, &r,
             err);
    bool migrated = rc == 0 && PQntuples(r) == 1 &&
                    PQgetlength(r, 0, 0) == 1 && PQgetvalue(r, 0, 0)[0] == 1;
    if (rc == 0) PQclear(r);
    int64_t v[5] = {0, 0, 0, 0, 0};
    if (rc == 0 && migrated) {
        rc = run(t->conn, "status: schema version",
                 s->sql[SQL_STATUS_VERSION], 0, NULL, NULL, NULL, &r, err);
        if (rc == 0 && (PQntuples(r) != 1 || !col_i64(r, 0, 0, &v[0])))
            rc = bad_row(err, "status");
        if (r != NULL) PQclear(r);
        r = NULL;
        out->schema_version = rc == 0 ? (int)v[0] : 0;
    }
    /* The counts need every table, so only at the library's version. */
    if (rc == 0 && out->schema_version >= out->library_version) {
        rc = run(t->conn, "status: counts", s->sql[SQL_STATUS_COUNTS], 0,
                 NULL, NULL, NULL, &r, err);
        for (int i = 0; rc == 0 && i < 5; i++)
            if (PQntuples(r) != 1 || !col_i64(r, 0, i, &v[i]))
                rc = bad_row(err, "status");
        if (r != NULL) PQclear(r);
        if (rc == 0) {
            out->events = (uint64_t)v[0];
            out->aggregates = (uint64_t)v[1];
            out->snapshots = (uint64_t)v[2];
            out->data_keys = (uint64_t)v[3];
            out->forgotten = (uint64_t)v[4];
        }
    }
    pg_rollback(txn);
    return rc;
}

/* ---- migrations ---- */

/* FNV-1a, 64 bits: enough to see that a migration's text changed. */
static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325u;
    for (; *s != '\0'; s++) {
        h ^= (uint8_t)*s;
        h *= 0x100000001b3u;
    }
    return h;
}

static void checksum_of(const es__pg_migration *m, char out[32])
{
    snprintf(out, 32, "fnv1a64:%016llx", (unsigned long long)fnv1a(m->sql));
}

/* The migration's SQL with the quoted names put in. */
static char *expand(const char *tmpl, const es_pg_config *cfg)
{
    char names[6][2 * NAME_BUF + 8];
    snprintf(names[0], sizeof names[0], "\"%s\"", cfg->schema);
    qualify(names[1], sizeof names[1], cfg->schema,
            cfg->tables[ES_PG_TABLE_EVENTS]);
    qualify(names[2], sizeof names[2], cfg->schema,
            cfg->tables[ES_PG_TABLE_SNAPSHOTS]);
    qualify(names[3], sizeof names[3], cfg->schema,
            cfg->tables[ES_PG_TABLE_OUTBOX]);
    qualify(names[4], sizeof names[4], cfg->schema,
            cfg->tables[ES_PG_TABLE_KEYS]);
    qualify(names[5], sizeof names[5], cfg->schema,
            cfg->tables[ES_PG_TABLE_COMMANDS]);
    static const char *const keys[6] = {"@schema@",   "@events@", "@snapshots@",
                                        "@outbox@",   "@keys@",   "@commands@"};
    es_buf b = {0};
    int rc = 0;
    for (const char *p = tmpl; rc == 0 && *p != '\0';) {
        int hit = -1;
        for (int k = 0; k < 6 && *p == '@'; k++)
            if (strncmp(p, keys[k], strlen(keys[k])) == 0) hit = k;
        if (hit >= 0) {
            rc = es_buf_append_str(&b, names[hit]);
            p += strlen(keys[hit]);
        } else {
            rc = es_buf_append(&b, p, 1);
            p++;
        }
    }
    if (rc == 0) rc = es_buf_append(&b, "", 1);
    if (rc != 0) {
        es_buf_free(&b);
        return NULL;
    }
    return (char *)b.data;
}

int es_pg_schema_version(void)
{
    return es__pg_migrations[es__pg_migration_count - 1].version;
}

/* The body of es_pg_migrate, inside BEGIN on c. */
static int migrate_in(PGconn *c, const es_pg_config *cfg, int *newest,
                      es_error *err)
{
    char mig[2 * NAME_BUF + 8], qschema[NAME_BUF + 4], sql[512];
    qualify(mig, sizeof mig, cfg->schema,
            cfg->tables[ES_PG_TABLE_MIGRATIONS]);
    snprintf(qschema, sizeof qschema, "\"%s\"", cfg->schema);

    /* One migrator per schema and migrations table at a time; the lock
     * goes with the transaction. */
    char lock_name[3 * NAME_BUF];
    snprintf(lock_name, sizeof lock_name, "eventastic migrate %s.%s",
             cfg->schema, cfg->tables[ES_PG_TABLE_MIGRATIONS]);
    uint8_t key[8];
    be64(key, fnv1a(lock_name));
    const Oid lock_types[1] = {OID_INT8};
    const char *lock_values[1] = {(const char *)key};
    const int lock_lens[1] = {8};
    int rc = run(c, "migrate: advisory lock",
                 "SELECT pg_advisory_xact_lock($1)", 1, lock_types,
                 lock_values, lock_lens, NULL, err);
    if (rc != 0) return rc;

    /* CREATE SCHEMA needs a right on the database even when the schema
     * exists, so look first: a role that owns only its schema can
     * migrate. */
    const Oid name_types[1] = {OID_TEXT};
    const char *name_values[1] = {cfg->schema};
    const int name_lens[1] = {(int)strlen(cfg->schema)};
    PGresult *r = NULL;
    rc = run(c, "migrate: find schema",
             "SELECT 1 FROM pg_namespace WHERE nspname = $1", 1, name_types,
             name_values, name_lens, &r, err);
    if (rc != 0) return rc;
    bool have_schema = PQntuples(r) > 0;
    PQclear(r);
    if (!have_schema) {
        snprintf(sql, sizeof sql, "CREATE SCHEMA %s", qschema);
        if ((rc = run_simple(c, "migrate: create schema", sql, err)) != 0)
            return rc;
    }
    /* Likewise the migrations table: a role that may only read it can
     * still check that the schema is up to date. */
    const char *mig_values[1] = {mig};
    const int mig_lens[1] = {(int)strlen(mig)};
    rc = run(c, "migrate: find migrations table",
             "SELECT to_regclass($1) IS NOT NULL", 1, name_types, mig_values,
             mig_lens, &r, err);
    if (rc != 0) return rc;
    bool have_table = PQntuples(r) == 1 && PQgetlength(r, 0, 0) == 1 &&
                      PQgetvalue(r, 0, 0)[0] == 1;
    PQclear(r);
    if (!have_table) {
        snprintf(sql, sizeof sql,
                 "CREATE TABLE IF NOT EXISTS %s (version integer PRIMARY "
                 "KEY, name text NOT NULL, checksum text NOT NULL, "
                 "applied_at timestamptz NOT NULL DEFAULT now())", mig);
        rc = run_simple(c, "migrate: create migrations table", sql, err);
        if (rc != 0) return rc;
    }

    snprintf(sql, sizeof sql, "SELECT version, checksum FROM %s ORDER BY "
             "version", mig);
    r = PQexec(c, sql); /* text results: small and read once */
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
        rc = db_error(c, r, err, "migrate: read migrations table");
        PQclear(r);
        return rc;
    }
    size_t count = es__pg_migration_count;
    bool *applied = es__calloc(count, sizeof *applied);
    if (applied == NULL) {
        PQclear(r);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int high = 0;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        /* The table is outside input: strtol, not atoi (undefined when
         * the number does not fit). */
        const char *text = PQgetvalue(r, i, 0), *sum = PQgetvalue(r, i, 1);
        char *end = NULL;
        errno = 0;
        long lv = strtol(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0' || lv < 1 ||
            lv > INT_MAX) {
            rc = es__error_set(err, ES_EDB, "migrate: the migrations table "
                               "has a version that is not a positive "
                               "integer");
            break;
        }
        int v = (int)lv;
        size_t k = 0;
        while (k < count && es__pg_migrations[k].version != v) k++;
        if (k == count) {
            rc = es__error_set(err, ES_EDB, "migrate: the database has "
                               "migration %d, which this library (schema "
                               "version %d) does not know: the database is "
                               "newer than the library", v,
                               es_pg_schema_version());
            break;
        }
        char want[32];
        checksum_of(&es__pg_migrations[k], want);
        if (strcmp(want, sum) != 0) {
            rc = es__error_set(err, ES_EDB, "migrate: migration %d (%s) "
                               "differs from the one applied to the database "
                               "(checksum %.40s there, %s here); a migration "
                               "must never change once applied, refusing",
                               v, es__pg_migrations[k].name, sum, want);
            break;
        }
        applied[k] = true;
        if (v > high) high = v;
    }
    PQclear(r);

    for (size_t k = 0; rc == 0 && k < count; k++) {
        const es__pg_migration *m = &es__pg_migrations[k];
        if (applied[k]) continue;
        char *body = expand(m->sql, cfg);
        if (body == NULL) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        char what[96];
        snprintf(what, sizeof what, "migrate: migration %d (%.60s)",
                 m->version, m->name);
        rc = run_simple(c, what, body, err);
        es__free(body);
        if (rc != 0) break;
        char sum[32], ver[16];
        checksum_of(m, sum);
        snprintf(ver, sizeof ver, "%d", m->version);
        snprintf(sql, sizeof sql, "INSERT INTO %s (version, name, checksum) "
                 "VALUES ($1::integer, $2, $3)", mig);
        const char *vals[3] = {ver, m->name, sum};
        PGresult *ins = PQexecParams(c, sql, 3, NULL, vals, NULL, NULL, 0);
        if (ins == NULL || PQresultStatus(ins) != PGRES_COMMAND_OK)
            rc = db_error(c, ins, err, "migrate: record migration");
        PQclear(ins);
        if (m->version > high) high = m->version;
    }
    es__free(applied);
    if (rc == 0) *newest = high;
    return rc;
}

int es_pg_migrate(const es_pg_config *cfg, int *schema_version, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    const char *ci = NULL;
    int rc = resolve_conninfo(cfg, &ci, err);
    if (rc != 0) return rc;
    char *password = NULL;
    if ((rc = conninfo_check(ci, &password, err)) != 0)
        return rc == ES_EINVAL ? es__error_set(err, ES_EDB, "connection "
                                               "string could not be parsed")
                               : rc;
    PGconn *c = NULL;
    char *full = NULL;
    if (es__pg_conninfo_with_defaults(ci, &full) != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    else
        rc = pg_connect(full, password, &c, err);
    es__free(full);
    if (password) {
        memset(password, 0, strlen(password));
        es__free(password);
    }
    if (rc != 0) return rc;
    int newest = 0;
    rc = run_simple(c, "migrate: begin", "BEGIN", err);
    if (rc == 0) rc = migrate_in(c, cfg, &newest, err);
    if (rc == 0) {
        PGresult *r = PQexec(c, "COMMIT");
        if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = db_error(c, r, err, "migrate: commit");
        else if (strcmp(PQcmdStatus(r), "COMMIT") != 0)
            rc = es__error_set(err, ES_EDB, "migrate: rolled back");
        PQclear(r);
    } else {
        PQclear(PQexec(c, "ROLLBACK"));
    }
    PQfinish(c);
    if (rc == 0 && schema_version) *schema_version = newest;
    return rc;
}
