/*
 * The PostgreSQL store's connections: round trips bounded in time, the
 * pool, and transactions on them (plain, bounded, background; commit,
 * rollback, savepoints).
 *
 * Lock rule: `lock` guards the pool (idle, n_idle, n_open).  Connections
 * are made and closed outside it.  A connection belongs to one
 * transaction at a time; it goes back to the pool only when it is healthy
 * and idle (no transaction open), otherwise it is closed.
 */
#include "store/pg/pg_int.h"

/* ---- round trips that must not wait for ever ----
 *
 * A transaction of begin_bounded (the host's fallback writer, which runs
 * on its commit loop) marks its pooled connection: each statement on it
 * is sent without blocking and waited for with poll, up to the store's
 * silence limit (es__pg_silence_ms, as the commit lanes).  Past it the
 * connection is dropped (its socket shut down), so the statement fails as
 * a lost connection (COMMIT: an unknown outcome, read back by a lane once
 * the backend that had it has ended: pg_store.cut_commits).  No TCP
 * option notices a server that stopped answering on a live socket (a
 * stopped process, a stuck backend); this does. */

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
    return s != NULL ? es__pg_silence_ms(s) : 0;
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
    int sent = n < 0
                   ? PQsendQuery(c, sql)
                   : PQsendQueryParams(c, sql, n, types, values, lens,
                                       n > 0 ? es__pg_binary_formats : NULL, 1);
    PGresult *res = NULL;
    bool ok = sent == 1;
    int64_t end = es__mono_ms() + ms;
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
        int64_t left = end - es__mono_ms();
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

/* ---- prepared statements ----
 *
 * A connection of the store (the pool's, a background writer's) prepares
 * each statement of s->sql the first time it runs it, named es_<index>,
 * and runs it by name from then on: parsed and planned once a
 * connection, not on every call.  Every statement is plan-proof
 * (guarantee 10: test_pg_plans reads their generic plans), so a cached
 * generic plan costs no command anything.  Which statements a connection
 * holds is instance data of this proc (freed with the connection).  A
 * bounded round trip (the fallback writer) and a statement that cannot be
 * prepared (a failed transaction) go by text, as before. */

typedef struct prep_state {
    const pg_store *s;
    uint64_t done; /* bit i: es_<i> is prepared on this connection */
} prep_state;

_Static_assert(SQL_COUNT <= 64, "prep_state.done has a bit a statement");

static int prep_evproc(PGEventId id, void *info, void *pass)
{
    (void)pass;
    if (id == PGEVT_CONNDESTROY) {
        const PGEventConnDestroy *e = info;
        es__free(PQinstanceData(e->conn, prep_evproc));
    } else if (id == PGEVT_CONNRESET) { /* a new session: none left */
        const PGEventConnReset *e = info;
        prep_state *p = PQinstanceData(e->conn, prep_evproc);
        if (p) p->done = 0;
    }
    return 1;
}

/* Mark c as a connection of s that prepares s's statements. */
static void prep_mark(PGconn *c, const pg_store *s)
{
    prep_state *p = es__calloc(1, sizeof *p);
    if (p == NULL) return; /* then by text */
    p->s = s;
    if (!PQregisterEventProc(c, prep_evproc, "eventastic prepared", NULL) ||
        !PQsetInstanceData(c, prep_evproc, p))
        es__free(p);
}

/* sql run by name on c when it is one of the store's statements and can
 * be prepared (true, *r its result); false when it goes by text (nothing
 * of sql was run). */
static bool exec_prepared(PGconn *c, const char *sql, int n,
                          const Oid *types, const char *const *values,
                          const int *lens, PGresult **r)
{
    prep_state *p = PQinstanceData(c, prep_evproc);
    if (p == NULL || n < 0) return false;
    int i = 0;
    while (i < SQL_COUNT && p->s->sql[i] != sql) i++;
    if (i == SQL_COUNT) return false;
    char name[16];
    snprintf(name, sizeof name, "es_%d", i);
    uint64_t bit = (uint64_t)1 << i;
    if (!(p->done & bit)) {
        PGresult *pr = PQprepare(c, name, sql, n, types);
        bool ok = PQresultStatus(pr) == PGRES_COMMAND_OK;
        PQclear(pr);
        if (!ok) return false;
        p->done |= bit;
    }
    *r = PQexecPrepared(c, name, n, values, lens,
                        n > 0 ? es__pg_binary_formats : NULL, 1);
    return true;
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
int es__pg_run(PGconn *c, const char *what, const char *sql, int n,
               const Oid *types, const char *const *values, const int *lens,
               PGresult **out, es_error *err)
{
    int64_t ms = bound_of(c);
    bool silent = false;
    PGresult *r = NULL;
    if (ms > 0)
        r = exec_bounded(c, ms, sql, n, types, values, lens, &silent);
    else if (!exec_prepared(c, sql, n, types, values, lens, &r))
        r = PQexecParams(c, sql, n, types, values, lens,
                         n > 0 ? es__pg_binary_formats : NULL, 1);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (out)
            *out = r;
        else
            PQclear(r);
        return 0;
    }
    int rc = silent ? silence_error(err, what, ms)
                    : es__pg_db_error(c, r, err, what);
    PQclear(r);
    return rc;
}

/* A statement without parameters, in text (simple protocol: several
 * statements may follow each other). */
int es__pg_run_simple(PGconn *c, const char *what, const char *sql,
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
    int rc = silent ? silence_error(err, what, ms)
                    : es__pg_db_error(c, r, err, what);
    PQclear(r);
    return rc;
}

/* ---- connections and the pool ---- */

void es__pg_quiet_notices(void *arg, const char *message)
{
    (void)arg;
    (void)message; /* a library does not print (NOTICEs of DDL) */
}

int es__pg_connect(const char *conninfo, const char *password, PGconn **out,
                   es_error *err)
{
    PGconn *c = PQconnectdb(conninfo);
    if (c == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    if (PQstatus(c) != CONNECTION_OK) {
        char msg[200];
        es__pg_scrub(msg, sizeof msg, PQerrorMessage(c), password);
        PQfinish(c);
        es__error_set(err, ES_EDB, "could not connect to the database: %s",
                      msg);
        if (err) memcpy(err->sqlstate, "08001", 6);
        return ES_EDB;
    }
    PQsetNoticeProcessor(c, es__pg_quiet_notices, NULL);
    *out = c;
    return 0;
}

/* A new connection of the store: connected, then set up. */
int es__pg_store_connect(pg_store *s, PGconn **out, es_error *err)
{
    int rc = es__pg_connect(s->conninfo, s->password, out, err);
    if (rc != 0) return rc;
    char sql[256];
    snprintf(sql, sizeof sql, "%s; SET statement_timeout = %lld",
             ES__PG_SESSION, (long long)s->statement_timeout_ms);
    if (s->statement_timeout_ms == 0) /* the server's setting */
        snprintf(sql, sizeof sql, "%s", ES__PG_SESSION);
    if ((rc = es__pg_run_simple(*out, "connect: session settings", sql, err))) {
        PQfinish(*out);
        *out = NULL;
        return rc;
    }
    prep_mark(*out, s);
    return 0;
}

/* A connection of the pool; bounded: waiting for one to come free ends
 * after the silence limit (ES_EDB, SQLSTATE 08000). */
int es__pg_pool_get(pg_store *s, PGconn **out, bool bounded, es_error *err)
{
    struct timespec until = {0, 0};
    if (bounded) {
        int64_t ms = es__pg_silence_ms(s);
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
            int rc = es__pg_store_connect(s, out, err);
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
                          "within %lld ms", (long long)es__pg_silence_ms(s));
            if (err) memcpy(err->sqlstate, "08000", 6);
            return ES_EDB;
        }
    }
}

/* Give a connection back; a broken one, one still in a transaction or
 * one left in pipeline mode (a batch that failed half way) is closed
 * instead. */
void es__pg_pool_put(pg_store *s, PGconn *c)
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

void es__pg_dek_cache_clear(pg_txn *t)
{
    sodium_memzero(t->dek, sizeof t->dek);
    t->n_dek = t->next_dek = 0;
}

static void txn_end(pg_txn *t)
{
    pg_store *s = (pg_store *)t->base.store;
    sodium_memzero(t->dek, sizeof t->dek);
    if (t->own == NULL) {
        es__pg_pool_put(s, t->conn);
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
    int rc = es__pg_run(t->conn, "begin: backend",
                        "SELECT backend_start::text "
                        "FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                        0, NULL, NULL, NULL, &r, err);
    t->pid = PQbackendPID(t->conn);
    t->start[0] = '\0';
    if (rc == 0 && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) &&
        strlen(PQgetvalue(r, 0, 0)) < sizeof t->start)
        strcpy(t->start, PQgetvalue(r, 0, 0));
    PQclear(r);
    return rc;
}

/* bounded: for begin_bounded (see above). */
/* lazy: a read-only transaction, no BEGIN (es__pg_begin_read). */
static int begin_pooled(es_store *store, bool bounded, bool lazy,
                        es_txn **out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn *t = es__calloc(1, sizeof *t);
    if (t == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    t->base.store = store;
    t->lazy = lazy;
    int rc = 0;
    if (lazy) {
        /* A connection that died while idle fails the first read (and is
         * closed when it goes back): the caller tries again. */
        rc = es__pg_pool_get(s, &t->conn, false, err);
        if (rc != 0) {
            es__free(t);
            return rc;
        }
        es__store_txn_started(store);
        *out = &t->base;
        return 0;
    }
    /* A pooled connection may have died while idle (server restart):
     * BEGIN finds out, and nothing was done yet, so try the next one
     * (each dead one is closed), until a fresh one. */
    for (size_t attempt = 0; attempt <= s->max; attempt++) {
        if ((rc = es__pg_pool_get(s, &t->conn, bounded, err)) != 0) break;
        if (bounded && !bound_mark(t->conn, s)) {
            es__pg_pool_put(s, t->conn);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        es_error e = {0};
        rc = es__pg_run_simple(t->conn, "begin",
                               "BEGIN ISOLATION LEVEL READ COMMITTED", &e);
        if (rc == 0 && bounded) rc = backend_start_of(t, &e);
        if (rc == 0) break;
        if (err) *err = e;
        /* the socket's close may not have turned the status bad yet */
        bool lost = PQstatus(t->conn) == CONNECTION_BAD ||
                    strcmp(e.sqlstate, LOST_SQLSTATE) == 0;
        es__pg_pool_put(s, t->conn);
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

int es__pg_begin(es_store *store, es_txn **out, es_error *err)
{
    return begin_pooled(store, false, false, out, err);
}

int es__pg_begin_bounded(es_store *store, es_txn **out, es_error *err)
{
    return begin_pooled(store, true, false, out, err);
}

/* COMMIT answered by the server ending the session (shutdown, crash of
 * another backend, pg_terminate_backend: 57P0x) or a connection error
 * (08xxx) before libpq saw the socket close: the commit record may have
 * been written, so the outcome is unknown, not a failure. */
bool es__pg_commit_cut(const PGresult *r)
{
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    return st != NULL &&
           (strncmp(st, "57P0", 4) == 0 || strncmp(st, "08", 2) == 0);
}

/* A transaction on the caller's own connection (see begin_background in
 * store_impl.h's es__txn_ops): a pooled connection is never taken, so a
 * background writer never makes the commit lanes or loads wait for the
 * pool, and its commits do not wait for the WAL flush (synchronous_commit
 * off: a crash may lose the last ones, which only a cache may). */
int es__pg_begin_background(es_store *store, void **slot, es_txn **out,
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
            rc = es__pg_store_connect(s, own, err);
            if (rc == 0)
                rc = es__pg_run_simple(*own, "background: synchronous_commit",
                                       "SET synchronous_commit = off", err);
            if (rc != 0 && *own != NULL) {
                PQfinish(*own);
                *own = NULL;
            }
            if (rc != 0) break;
        }
        rc = es__pg_run_simple(*own, "begin",
                               "BEGIN ISOLATION LEVEL READ COMMITTED", err);
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

void es__pg_background_close(es_store *store, void *conn)
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

/* A read-only transaction that never needed BEGIN has nothing to end. */
static bool nothing_open(const pg_txn *t)
{
    return t->lazy && PQstatus(t->conn) == CONNECTION_OK &&
           PQtransactionStatus(t->conn) == PQTRANS_IDLE;
}

int es__pg_begin_read(es_store *store, es_txn **out, es_error *err)
{
    return begin_pooled(store, false, true, out, err);
}

/* A read that needs a transaction (a cursor) in a read-only one: BEGIN
 * now. */
int es__pg_txn_open(pg_txn *t, es_error *err)
{
    if (!t->lazy || PQtransactionStatus(t->conn) != PQTRANS_IDLE) return 0;
    return es__pg_run_simple(t->conn, "begin",
                             "BEGIN ISOLATION LEVEL READ COMMITTED", err);
}

int es__pg_commit(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    if (nothing_open(t)) {
        txn_end(t);
        return 0;
    }
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
    } else if (es__pg_conn_lost(t->conn, r) || es__pg_commit_cut(r)) {
        rc = es__error_set(err, ES_EUNKNOWN, "commit: connection lost "
                           "during COMMIT; the transaction may or may not "
                           "have committed");
        if (err) memcpy(err->sqlstate, LOST_SQLSTATE, 6);
        if (t->pid != 0 && t->start[0])
            cut_commit_add((pg_store *)t->base.store, t);
    } else {
        rc = es__pg_db_error(t->conn, r, err, "commit");
    }
    PQclear(r);
    es_store *store = t->base.store;
    bool notify = rc == 0 && t->wrote_side_effects;
    bool events = rc == 0 && t->wrote_events;
    txn_end(t);
    if (notify) es__store_notify(store);
    if (events) {
        es__store_notify_events(store);
        es__pg_announce((pg_store *)store);
    }
    return rc;
}

void es__pg_rollback(es_txn *txn)
{
    pg_txn *t = (pg_txn *)txn;
    if (!nothing_open(t)) PQclear(exec_text(t->conn, "ROLLBACK"));
    txn_end(t);
}

int es__pg_savepoint(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    char sql[48];
    snprintf(sql, sizeof sql, "SAVEPOINT es_sp_%u", t->depth + 1);
    int rc = es__pg_run_simple(t->conn, "savepoint", sql, err);
    if (rc == 0) t->depth++;
    return rc;
}

int es__pg_rollback_to(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    if (t->depth == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint to roll back to");
    char sql[96];
    snprintf(sql, sizeof sql,
             "ROLLBACK TO SAVEPOINT es_sp_%u; RELEASE SAVEPOINT es_sp_%u",
             t->depth, t->depth);
    t->depth--;
    es__pg_dek_cache_clear(t); /* a data key made since may be gone */
    return es__pg_run_simple(t->conn, "rollback to savepoint", sql, err);
}

int es__pg_release(es_txn *txn, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    if (t->depth == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint to release");
    char sql[48];
    snprintf(sql, sizeof sql, "RELEASE SAVEPOINT es_sp_%u", t->depth);
    t->depth--;
    return es__pg_run_simple(t->conn, "release savepoint", sql, err);
}
