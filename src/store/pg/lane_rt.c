/*
 * A commit lane's round trips: a libpq pipeline ended by a sync, sent and
 * read without blocking on the lane's libevent loop, with a limit on how
 * long the socket may stay silent.  The lane's state machine (lane.c)
 * starts them and runs the step of its state when they end.
 */
#include "store/pg/pg_int.h"

/* A round trip whose socket stays silent for this long (a half-open
 * connection: the server or the network gone without a word) counts as
 * a lost connection: the statement timeout, when set, plus this margin;
 * else LANE_SILENCE_S.  A COMMIT cut off this way is read back. */
#define LANE_SILENCE_MARGIN_MS 5000
#define LANE_SILENCE_S 60

void es__pg_lane_results_clear(pg_lane *l)
{
    for (size_t i = 0; i < l->n_res; i++) PQclear(l->res[i]);
    l->n_res = 0;
    l->res_oom = false;
}

/* Close the connection (a broken one, or one in an unknown state); its
 * backend becomes the orphan if it may hold a transaction of ours.  One
 * orphan at a time: while one is kept, a read back writes nothing, and
 * the writes after it have asked it to end. */
void es__pg_lane_drop(pg_lane *l)
{
    event_del(l->ev);
    if (l->conn && l->orphan_pid == 0 && l->conn_start[0] &&
        PQtransactionStatus(l->conn) != PQTRANS_IDLE) {
        l->orphan_pid = PQbackendPID(l->conn);
        memcpy(l->orphan_start, l->conn_start, sizeof l->orphan_start);
    }
    if (l->conn) PQfinish(l->conn);
    l->conn = NULL;
    if (l->state == LANE_CONNECTING) l->state = LANE_IDLE;
}

/* Wait on the socket for what (and at most tv). */
bool es__pg_lane_wait(pg_lane *l, short what, const struct timeval *tv)
{
    event_del(l->ev);
    int fd = PQsocket(l->conn);
    return fd >= 0 &&
           event_assign(l->ev, l->base, fd, what, es__pg_lane_io, l) == 0 &&
           event_add(l->ev, tv) == 0;
}

/* The connection failed: l->err says how (as lost unless set). */
void es__pg_lane_lost(pg_lane *l, const char *what)
{
    if (l->err.code == 0) {
        if (l->conn) es__pg_db_error(l->conn, NULL, &l->err, what);
        else {
            es__error_set(&l->err, ES_EDB, "%s: connection to the database "
                          "lost", what);
            memcpy(l->err.sqlstate, LOST_SQLSTATE, 6);
        }
    }
    es__pg_lane_drop(l);
}

/* The end of a round trip: the step of its state runs with its results. */
static void lane_rt_end(pg_lane *l, bool ok)
{
    event_del(l->ev);
    lane_state state = l->state;
    l->state = LANE_IDLE;
    if (ok && l->res_oom) {
        es__error_set(&l->err, ES_ENOMEM, "out of memory");
        ok = false;
    }
    es__pg_lane_step(l, state, ok);
}

/* How long a round trip may wait for its socket. */
int64_t es__pg_silence_ms(const pg_store *s)
{
    return s->statement_timeout_ms > 0
               ? s->statement_timeout_ms + LANE_SILENCE_MARGIN_MS
               : (int64_t)LANE_SILENCE_S * 1000;
}

static struct timeval lane_silence(const pg_lane *l)
{
    int64_t ms = es__pg_silence_ms(l->s);
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
        !es__pg_lane_wait(l, EV_READ | (f == 1 ? EV_WRITE : 0), &tv))
        lane_rt_end(l, false);
}

/* A round trip: enter pipeline mode, then the caller sends its statements
 * and calls es__pg_lane_rt_go. */
bool es__pg_lane_rt_begin(pg_lane *l)
{
    es__pg_lane_results_clear(l);
    return PQenterPipelineMode(l->conn) == 1;
}

/* Send what was queued with a sync; the lane is in state until its
 * results are in, then state's step runs (es__pg_lane_step).
 * sent false: queueing failed (the connection, unless l->err says). */
void es__pg_lane_rt_go(pg_lane *l, bool sent, lane_state state)
{
    l->state = state;
    int f = -1;
    if (sent && PQpipelineSync(l->conn) == 1) f = PQflush(l->conn);
    struct timeval tv = lane_silence(l);
    if (f < 0 || !es__pg_lane_wait(l, EV_READ | (f == 1 ? EV_WRITE : 0), &tv))
        lane_rt_end(l, false);
}

bool es__pg_res_ok(const PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
}

/* Result i of the round trip, NULL when it did not come. */
const PGresult *es__pg_lane_res(const pg_lane *l, size_t i)
{
    return i < l->n_res ? l->res[i] : NULL;
}

void es__pg_lane_io(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    pg_lane *l = arg;
    switch (l->state) {
    case LANE_IDLE:
        return;
    case LANE_CONNECTING:
        es__pg_lane_connect_poll(l, what);
        return;
    case LANE_PREPARING:
    case LANE_RESOLVING:
    case LANE_KEYS_READING:
    case LANE_KEYS_STORING:
    case LANE_WRITING:
    case LANE_COMMITTING:
    case LANE_ROLLING_BACK:
        lane_rt_io(l, what);
        return;
    }
}
