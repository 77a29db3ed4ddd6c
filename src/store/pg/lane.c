/*
 * The commit lanes of the batch writer (the host's group commit).
 *
 * A lane writes a batch in a few round trips on a connection of its own,
 * each a libpq pipeline ended by a sync, sent and read without blocking
 * (PQsetnonblocking): the loop's event on the socket drives it, so one
 * loop thread serves every lane (the round trips: lane_rt.c).  The steps:
 *   - connect (PQconnectStart and PQconnectPoll) and prepare the batch
 *     statements, once per connection;
 *   - items ES__COMMIT_UNKNOWN on entry: read back by the command id of
 *     one of them, before anything is written;
 *   - with encryption: BEGIN and the data keys of the batch, read FOR
 *     SHARE in one round trip (the missing ones are made and stored in a
 *     second; lane_keys.c);
 *   - the writes: [BEGIN,] SAVEPOINT, the events, the command ids and the
 *     side effects; when rows did not go in, their groups fail and the
 *     rest is written again after ROLLBACK TO SAVEPOINT;
 *   - COMMIT; an answer that was lost is read back.
 * es__pg_write_batch runs the same steps on a loop of its own, to the end.
 *
 * The lane's state (lane_state, pg_int.h) is what it waits for: the
 * connection (CONNECTING) or the results of one round trip.  When they
 * are in, es__pg_lane_step switches over the state to its step, and the
 * step starts the next round trip or ends the batch (IDLE).  lane_ensure
 * leads to PREPARING, or straight to what it was asked for (l->then) on a
 * connection that is prepared already; a read back's outcome goes to
 * whoever asked (l->resolve_for).
 *
 *   lane_write --(an item ES__COMMIT_UNKNOWN)--> ensure(RESOLVE)
 *       |                                                 |
 *       | (none)                                          v
 *       |                     IDLE --> CONNECTING --> PREPARING --> then
 *       v                                |fails            |fails
 *   txn_next --> ensure(WRITE)           +--> then (not ok) <+
 *
 *   then RESOLVE:  RESOLVING --(kept connection lost)--> ensure(RESOLVE)
 *                  RESOLVING --> for ENTRY: txn_next, or IDLE (unknown)
 *                            --> for COMMIT: IDLE, or txn_failed (not
 *                                committed)
 *   then WRITE:    [KEYS_READING [--> KEYS_STORING --> KEYS_READING]]
 *                  --> WRITING
 *   WRITING    --(rows did not go in)--> WRITING (from the savepoint)
 *              --(written)--> COMMITTING
 *              --(an error, nothing left)--> ROLLING_BACK
 *   COMMITTING --(committed)--> IDLE
 *              --(refused)--> txn_failed
 *              --(answer lost)--> ensure(RESOLVE) for COMMIT
 *   ROLLING_BACK --> txn_failed, or IDLE
 *   txn_failed --(connection lost, first time)--> txn_next; else IDLE
 *   KEYS_*, WRITING --(connection lost)--> txn_failed
 *                   --(an error)--> ROLLING_BACK
 *
 * IDLE at the end of a batch means lane_finish: done() is called.
 */
#include "core/backoff.h"
#include "store/pg/pg_int.h"

/* A connection attempt that makes no progress for this long fails (libpq
 * leaves connect_timeout to the caller of PQconnectPoll). */
#define LANE_CONNECT_TIMEOUT_S 10

static void lane_prepared(pg_lane *l, bool ok);
static void lane_resolved(pg_lane *l, bool ok);
static void lane_resolve_ask(pg_lane *l, bool ok);
static void txn_connected(pg_lane *l, bool ok);
static void txn_written(pg_lane *l, bool ok);
static void txn_committed(pg_lane *l, bool ok);
static void txn_rolled_back(pg_lane *l, bool ok);
static void txn_commit_resolved(pg_lane *l, int outcome);
static void lane_entry_resolved(pg_lane *l, int outcome);

/* The step of the state a round trip ended in (lane_rt.c). */
void es__pg_lane_step(pg_lane *l, lane_state state, bool ok)
{
    switch (state) {
    case LANE_PREPARING:
        lane_prepared(l, ok);
        return;
    case LANE_RESOLVING:
        lane_resolved(l, ok);
        return;
    case LANE_KEYS_READING:
        es__pg_keys_read(l, ok);
        return;
    case LANE_KEYS_STORING:
        es__pg_keys_stored(l, ok);
        return;
    case LANE_WRITING:
        txn_written(l, ok);
        return;
    case LANE_COMMITTING:
        txn_committed(l, ok);
        return;
    case LANE_ROLLING_BACK:
        txn_rolled_back(l, ok);
        return;
    case LANE_IDLE:
    case LANE_CONNECTING: /* no round trip ends there */
        return;
    }
}

/* The connection is ready and prepared (ok), or could not be had (l->err
 * says why): on to what lane_ensure was asked for. */
static void connected(pg_lane *l, bool ok)
{
    switch (l->then) {
    case LANE_THEN_RESOLVE:
        lane_resolve_ask(l, ok);
        return;
    case LANE_THEN_WRITE:
        txn_connected(l, ok);
        return;
    }
}

/* A read back's outcome, to whoever asked for it (lane_resolve). */
static void resolved(pg_lane *l, int outcome)
{
    switch (l->resolve_for) {
    case LANE_FOR_ENTRY:
        lane_entry_resolved(l, outcome);
        return;
    case LANE_FOR_COMMIT:
        txn_commit_resolved(l, outcome);
        return;
    }
}

/* ---- connecting ---- */

static void lane_prepared(pg_lane *l, bool ok)
{
    bool good = ok;
    /* the session settings, the statement timeout (setup), DEALLOCATE
     * ALL, the statements; then the backend's start */
    int n = 2 + BATCH_STMTS + (l->setup ? 1 : 0);
    for (int i = 0; good && i < n; i++) {
        const PGresult *r = es__pg_lane_res(l, (size_t)i);
        if (r == NULL || !es__pg_res_ok(r)) {
            es__pg_db_error(l->conn, r, &l->err, "batch: prepare");
            good = false;
        }
    }
    if (!good) {
        es__pg_lane_lost(l, "batch: prepare");
        connected(l, false);
        return;
    }
    const PGresult *r = es__pg_lane_res(l, (size_t)n);
    l->conn_start[0] = 0;
    if (r != NULL && PQresultStatus(r) == PGRES_TUPLES_OK &&
        PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) &&
        strlen(PQgetvalue(r, 0, 0)) < sizeof l->conn_start)
        strcpy(l->conn_start, PQgetvalue(r, 0, 0));
    if (!PQsetInstanceData(l->conn, es__pg_batch_evproc, l->s) &&
        PQregisterEventProc(l->conn, es__pg_batch_evproc, "eventastic batch",
                            NULL))
        PQsetInstanceData(l->conn, es__pg_batch_evproc, l->s);
    connected(l, true);
}

/* The batch statements, prepared once per connection in one round trip
 * (with the session's settings on a new one).  DEALLOCATE ALL first, so
 * that an earlier try that failed half way cannot make a name clash. */
static void lane_prepare(pg_lane *l)
{
    if (PQinstanceData(l->conn, es__pg_batch_evproc) == l->s) {
        connected(l, true);
        return;
    }
    bool sent = es__pg_lane_rt_begin(l);
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
        sent = PQsendPrepare(l->conn, es__pg_batch_stmts[i].name,
                             l->s->sql[es__pg_batch_stmts[i].sql],
                             es__pg_batch_stmts[i].n,
                             es__pg_batch_stmts[i].types) == 1;
    /* the backend's start, for telling it apart later (lane_orphan) */
    if (sent)
        sent = PQsendQueryParams(l->conn, "SELECT backend_start::text FROM "
                                 "pg_stat_activity WHERE pid = "
                                 "pg_backend_pid()", 0, NULL, NULL, NULL,
                                 NULL, 0) == 1;
    es__pg_lane_rt_go(l, sent, LANE_PREPARING);
}

static void lane_connect_failed(pg_lane *l)
{
    char msg[200];
    es__pg_scrub(msg, sizeof msg,
                 l->conn ? PQerrorMessage(l->conn) : "out of memory",
                 l->s->password);
    es__error_set(&l->err, ES_EDB, "could not connect to the database: %s",
                  msg);
    memcpy(l->err.sqlstate, "08001", 6);
    es__pg_lane_drop(l);
    connected(l, false);
}

void es__pg_lane_connect_poll(pg_lane *l, short what)
{
    static const struct timeval tv = {LANE_CONNECT_TIMEOUT_S, 0};
    if (what & EV_TIMEOUT) {
        es__error_set(&l->err, ES_EDB, "could not connect to the database: "
                      "no answer within %d s", LANE_CONNECT_TIMEOUT_S);
        memcpy(l->err.sqlstate, "08001", 6);
        es__pg_lane_drop(l);
        connected(l, false);
        return;
    }
    switch (PQconnectPoll(l->conn)) {
    case PGRES_POLLING_READING:
        if (!es__pg_lane_wait(l, EV_READ, &tv)) lane_connect_failed(l);
        return;
    case PGRES_POLLING_WRITING:
        if (!es__pg_lane_wait(l, EV_WRITE, &tv)) lane_connect_failed(l);
        return;
    case PGRES_POLLING_OK:
        l->state = LANE_IDLE;
        event_del(l->ev);
        PQsetNoticeProcessor(l->conn, es__pg_quiet_notices, NULL);
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

/* A connection ready for the batch statements, then then(l, ok); not ok:
 * l->err says why. */
static void lane_ensure(pg_lane *l, lane_then then)
{
    l->then = then;
    l->setup = l->new_conn = false;
    if (l->conn && PQstatus(l->conn) == CONNECTION_OK &&
        PQtransactionStatus(l->conn) == PQTRANS_IDLE) {
        if (PQisnonblocking(l->conn) || PQsetnonblocking(l->conn, 1) == 0) {
            lane_prepare(l);
            return;
        }
    }
    es__pg_lane_drop(l);
    l->conn_start[0] = 0;
    l->conn = PQconnectStart(l->s->conninfo);
    if (l->conn == NULL || PQstatus(l->conn) == CONNECTION_BAD) {
        lane_connect_failed(l);
        return;
    }
    l->new_conn = true;
    l->state = LANE_CONNECTING;
    es__pg_lane_connect_poll(l, 0);
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

static void lane_resolved(pg_lane *l, bool ok)
{
    size_t k = 0;
    if (l->asked_orphan) {
        const PGresult *o = es__pg_lane_res(l, k++);
        if (ok && o != NULL && PQresultStatus(o) == PGRES_TUPLES_OK) {
            if (PQntuples(o) > 0) { /* asked to end; it may still commit */
                resolved(l, -1);
                return;
            }
            l->orphan_pid = 0; /* gone: its transaction is over */
        }
    }
    if (l->cut_pid != 0) {
        const PGresult *o = es__pg_lane_res(l, k++);
        if (ok && o != NULL && PQresultStatus(o) == PGRES_TUPLES_OK) {
            if (PQntuples(o) > 0) { /* the same for the fallback's */
                resolved(l, -1);
                return;
            }
            cut_commit_over(l->s, l->cut_pid, l->cut_start);
        }
    }
    const PGresult *r = es__pg_lane_res(l, k);
    if (!ok || r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
        if (!ok) es__pg_lane_lost(l, "read back");
        else es__pg_lane_drop(l);
        if (!l->new_conn) { /* a kept connection: once more on a new one */
            lane_ensure(l, LANE_THEN_RESOLVE);
            return;
        }
        resolved(l, -1);
        return;
    }
    if (PQntuples(r) == 0) {
        resolved(l, 0);
        return;
    }
    es_uuid agg;
    int64_t version = 0;
    bool ours = es__pg_col_uuid(r, 0, 0, &agg) &&
                es__pg_col_i64(r, 0, 5, &version) &&
                es_uuid_equal(&agg, &l->probe->aggregate_id) &&
                (uint64_t)version == l->probe->version;
    resolved(l, ours ? 1 : -1);
}

static void lane_resolve_ask(pg_lane *l, bool ok)
{
    if (!ok) {
        resolved(l, -1);
        return;
    }
    static const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)l->probe->command_id.bytes};
    static const int lens[1] = {16};
    bool sent = es__pg_lane_rt_begin(l);
    l->asked_orphan = l->orphan_pid != 0;
    if (sent && l->asked_orphan) sent = lane_orphan_send(l);
    l->cut_pid = cut_commit_first(l->s, l->cut_start);
    if (sent && l->cut_pid != 0)
        sent = lane_end_send(l, l->cut_pid, l->cut_start);
    if (sent)
        sent = PQsendQueryParams(l->conn, l->s->sql[SQL_GET_COMMAND], 1, types,
                                 values, lens, es__pg_binary_formats, 1) == 1;
    es__pg_lane_rt_go(l, sent, LANE_RESOLVING);
}

/* After a COMMIT whose answer was lost: did it commit?  The command id of
 * one written item answers for the whole transaction, once the backend
 * that had the COMMIT has ended (l->orphan_pid).  after(l, 1):
 * committed, 0: not, -1: could not find out, or that backend still runs
 * (the caller waits and asks again).  On the kept connection if there is
 * one, then once on a new one. */
static void lane_resolve(pg_lane *l, const es__command_record *probe,
                         lane_resolve_for resolve_for)
{
    l->probe = probe;
    l->resolve_for = resolve_for;
    lane_ensure(l, LANE_THEN_RESOLVE);
}

/* ---- a batch ---- */

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
    es__pg_batch_keys_free(&l->keys);
    l->keys_cap = 0;
    if (l->made) sodium_memzero(l->made, l->n_need * sizeof *l->made);
    es__free(l->made);
    l->made = NULL;
    es__free(l->need);
    l->need = NULL;
    l->n_need = 0;
    for (int i = 0; i < 3; i++) es__pg_pstmt_free(&l->st[i]);
    es__pg_lane_results_clear(l);
}

static void lane_finish(pg_lane *l)
{
    lane_batch_free(l);
    es__batch_done done = l->done;
    l->done = NULL;
    l->items = NULL;
    done(l->ud, l->committed, &l->timing);
}

static void txn_next(pg_lane *l);

/* Nothing of the transaction committed (l->err says why).  A connection
 * that died while idle is tried once more on a new one; a database that
 * cannot be reached is the caller's to wait for; any other failure is
 * left to the generic writer, which can pin it on one item. */
void es__pg_txn_failed(pg_lane *l)
{
    if (!es__unreachable(&l->err)) {
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
    if (!ok) es__pg_lane_drop(l);
    if (l->err.code != 0) es__pg_txn_failed(l);
    else lane_finish(l);
}

/* End the open transaction with ROLLBACK, then es__pg_txn_failed (l->err set)
 * or the end of the batch (nothing left to write). */
void es__pg_txn_rollback(pg_lane *l)
{
    if (l->conn == NULL || PQstatus(l->conn) != CONNECTION_OK ||
        PQtransactionStatus(l->conn) == PQTRANS_IDLE) {
        txn_rolled_back(l, l->conn != NULL &&
                               PQstatus(l->conn) == CONNECTION_OK);
        return;
    }
    bool sent = es__pg_lane_rt_begin(l) &&
                PQsendQueryParams(l->conn, "ROLLBACK", 0, NULL, NULL, NULL,
                                  NULL, 0) == 1;
    es__pg_lane_rt_go(l, sent, LANE_ROLLING_BACK);
}

static void txn_commit_resolved(pg_lane *l, int outcome)
{
    if (outcome == 1) {
        batch_mark(l->items, l->n, ES__COMMIT_PENDING, 0, NULL);
        l->committed++;
        if (l->side_effects) es__store_notify(&l->s->base);
        es__store_notify_events(&l->s->base);
        es__pg_announce(l->s);
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
        es__pg_txn_failed(l);
    }
}

static void txn_committed(pg_lane *l, bool ok)
{
    if (l->t_commit != 0) {
        l->timing.commit_ns += es__mono_ns() - l->t_commit;
        l->t_commit = 0;
    }
    const PGresult *r = es__pg_lane_res(l, 0);
    if (ok && r != NULL && PQresultStatus(r) == PGRES_COMMAND_OK) {
        if (strcmp(PQcmdStatus((PGresult *)r), "COMMIT") == 0) {
            txn_commit_resolved(l, 1);
            return;
        }
        /* COMMIT of a failed transaction answers ROLLBACK */
        es__error_set(&l->err, ES_EDB, "commit: the transaction had failed "
                      "earlier and was rolled back");
        memcpy(l->err.sqlstate, "25P02", 6);
        es__pg_txn_failed(l);
        return;
    }
    if (ok && r != NULL && !es__pg_commit_cut(r) &&
        PQstatus(l->conn) == CONNECTION_OK) {
        es__pg_db_error(l->conn, r, &l->err, "commit");
        es__pg_txn_failed(l); /* the server answered: it did not commit */
        return;
    }
    /* The answer was lost: the truth first, once the backend that had
     * the COMMIT (the orphan es__pg_lane_drop makes) has ended. */
    es__pg_lane_drop(l);
    const es__command_record *probe = NULL;
    for (size_t i = 0; i < l->n && probe == NULL; i++)
        if (l->items[i]->status == ES__COMMIT_PENDING)
            probe = &l->items[i]->record;
    lane_resolve(l, probe, LANE_FOR_COMMIT);
}

static void txn_commit(pg_lane *l)
{
    l->t_commit = es__mono_ns();
    bool sent =
        es__pg_lane_rt_begin(l) &&
        PQsendQueryParams(l->conn, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) == 1;
    es__pg_lane_rt_go(l, sent, LANE_COMMITTING);
}

static void txn_written(pg_lane *l, bool ok)
{
    if (!ok) {
        es__pg_lane_lost(l, "batch: write");
        es__pg_txn_failed(l);
        return;
    }
    if (l->asked_orphan) l->orphan_pid = 0; /* asked to end (once) */
    size_t k = 0;
    int rc = 0;
    bool failed = false;
    for (int i = 0; rc == 0 && i < l->n_head; i++, k++) {
        const PGresult *r = es__pg_lane_res(l, k);
        if (r == NULL || !es__pg_res_ok(r))
            rc = es__pg_db_error(l->conn, r, &l->err, "batch: begin");
    }
    l->begun = true;
    for (int i = 0; rc == 0 && i < 3; i++) {
        if (!l->st[i].sent) continue;
        const PGresult *r = es__pg_lane_res(l, k++);
        if (r == NULL || !es__pg_res_ok(r))
            rc = es__pg_db_error(l->conn, r, &l->err, l->st[i].what);
        else if (i == 0)
            rc = es__pg_apply_events(l->items, l->n, &l->st[0], r, &failed,
                                     &l->err);
        else if (i == 1)
            rc = es__pg_apply_commands(l->items, l->n, &l->st[1], r, &failed,
                                       &l->err);
        else if (strcmp(PQcmdTuples((PGresult *)r), "0") != 0)
            l->side_effects = true;
    }
    if (rc != 0) {
        es__pg_txn_rollback(l);
        return;
    }
    l->first = false;
    if (!es__commit_any_pending(l->items, l->n)) {
        es__pg_txn_rollback(l); /* nothing left to commit */
        return;
    }
    if (failed)
        es__pg_txn_write(l); /* the rest again, from the savepoint */
    else txn_commit(l);
}

/* The writes of the pending items, in one round trip: BEGIN (unless
 * begun), a savepoint (or back to it), the events, the command ids and
 * the side effects. */
void es__pg_txn_write(pg_lane *l)
{
    for (int i = 0; i < 3; i++) es__pg_pstmt_free(&l->st[i]);
    int rc =
        es__pg_build_events(l->s, &l->keys, l->items, l->n, &l->st[0], &l->err);
    if (rc == 0)
        rc = es__pg_build_commands(l->s, &l->keys, l->items, l->n, &l->st[1],
                                   &l->err);
    if (rc == 0)
        rc = es__pg_build_side_effects(l->s, &l->keys, l->items, l->n,
                                       &l->st[2], &l->err);
    if (rc != 0 || !es__commit_any_pending(l->items, l->n)) {
        es__pg_txn_rollback(l);
        return;
    }
    bool sent = es__pg_lane_rt_begin(l);
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
        if (l->st[i].rows > 0 &&
            es__pg_pstmt_send(l->conn, &l->st[i], &l->err) != 0)
            sent = false;
    if (!sent && l->err.code != 0 && !es__unreachable(&l->err) &&
        PQstatus(l->conn) == CONNECTION_OK) {
        /* a batch too large for one statement: nothing was sent yet */
        PQexitPipelineMode(l->conn);
        if (PQpipelineStatus(l->conn) != PQ_PIPELINE_OFF) es__pg_lane_drop(l);
        es__pg_txn_rollback(l);
        return;
    }
    es__pg_lane_rt_go(l, sent, LANE_WRITING);
}

/* ---- the batch, transaction by transaction ---- */

static void txn_connected(pg_lane *l, bool ok)
{
    if (!ok) {
        es__pg_txn_failed(l);
        return;
    }
    if (l->s->encrypt) es__pg_keys_load(l);
    else es__pg_txn_write(l);
}

/* One transaction over the pending items (none left: the batch ends). */
static void txn_next(pg_lane *l)
{
    if (!es__commit_any_pending(l->items, l->n)) {
        lane_finish(l);
        return;
    }
    lane_batch_free(l);
    memset(&l->err, 0, sizeof l->err);
    l->begun = l->side_effects = false;
    l->first = true;
    l->key_attempt = 0;
    lane_ensure(l, LANE_THEN_WRITE);
}

static void lane_entry_resolved(pg_lane *l, int outcome)
{
    if (outcome < 0) { /* still unknown: asked again later */
        lane_finish(l);
        return;
    }
    batch_mark(l->items, l->n, ES__COMMIT_UNKNOWN,
               outcome == 1 ? 0 : ES__COMMIT_PENDING, NULL);
    if (outcome == 1) {
        l->committed++;
        es__store_notify_events(&l->s->base);
        es__pg_announce(l->s);
    }
    batch_mark(l->items, l->n, ES__COMMIT_RETRY, ES__COMMIT_PENDING, NULL);
    l->lost = 0;
    txn_next(l);
}

void es__pg_lane_write(es__batch_lane *lane, es__commit_item **items, size_t n,
                       es__batch_done done, void *ud)
{
    pg_lane *l = (pg_lane *)lane;
    l->items = items;
    l->n = n;
    l->done = done;
    l->ud = ud;
    l->committed = 0;
    memset(&l->timing, 0, sizeof l->timing);
    l->t_commit = 0;
    memset(&l->err, 0, sizeof l->err);
    /* A batch whose COMMIT answer was lost: the truth first. */
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_UNKNOWN) {
            lane_resolve(l, &items[i]->record, LANE_FOR_ENTRY);
            return;
        }
    lane_entry_resolved(l, 0);
}

int es__pg_lane_open(es_store *store, struct event_base *base,
                     es__batch_lane **out, es_error *err)
{
    pg_lane *l = es__calloc(1, sizeof *l);
    if (l == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    l->s = (pg_store *)store;
    l->base = base;
    l->ev = event_new(base, -1, 0, es__pg_lane_io, l);
    if (l->ev == NULL) {
        es__free(l);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    *out = (es__batch_lane *)l;
    return 0;
}

void es__pg_lane_close(es__batch_lane *lane)
{
    pg_lane *l = (pg_lane *)lane;
    if (l == NULL) return;
    es__pg_lane_drop(l);
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

static void sync_batch_done(void *ud, size_t committed,
                            const es__batch_timing *timing)
{
    (void)timing;
    sync_batch *b = ud;
    b->done = true;
    b->committed = committed;
}

size_t es__pg_write_batch(es_store *store, void **slot, es__commit_item **items,
                          size_t n)
{
    struct event_base *base = event_base_new();
    es__batch_lane *lane = NULL;
    if (base == NULL || es__pg_lane_open(store, base, &lane, NULL) != 0) {
        if (base) event_base_free(base);
        return 0; /* left pending: the generic writer */
    }
    pg_lane *l = (pg_lane *)lane;
    l->conn = *slot;
    sync_batch b = {false, 0};
    es__pg_lane_write(lane, items, n, sync_batch_done, &b);
    while (!b.done) event_base_loop(base, EVLOOP_ONCE);
    *slot = l->conn;
    l->conn = NULL;
    es__pg_lane_close(lane);
    event_base_free(base);
    return b.committed;
}
