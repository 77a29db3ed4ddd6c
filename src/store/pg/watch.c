/*
 * Watches of the PostgreSQL store: a thread that LISTENs on a channel on
 * a connection of its own and calls back on a NOTIFY (the outbox's
 * dispatchers; the read side's projections, on the events channel that
 * the announcer of every writing process notifies).
 */
#include "core/backoff.h"
#include "store/pg/pg_int.h"

/* The first wait after a failed connection, in ms. */
#define WATCH_RETRY_MIN_MS 100

/*
 * A thread in poll() on two descriptors: the connection's socket (a
 * notification arrived, or the connection broke) and a pipe whose byte
 * says stop.  It never runs a statement but LISTEN, so it holds no lock
 * of the store and needs none: the store's pool never sees the
 * connection.  While disconnected it retries after 100 ms, doubling up to
 * retry_max_ms, each wait jittered (core/backoff.h) so that the watches
 * of many processes cut off together do not come back together; the
 * dispatcher keeps polling meanwhile, and is woken after each
 * (re)connection in case a notification was missed.
 */
struct es__outbox_watch {
    pg_store *s; /* borrowed: outlives the watch */
    const char *channel; /* s's: the outbox's or the events' */
    const char *what;    /* for the log: "outbox", "projections" */
    es__watch_fn fn;
    void *ud;
    unsigned retry_max_ms;
    int stop[2]; /* a pipe: readable when the thread must end */
    pthread_t thread;
};


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
        es__pg_scrub(msg, sizeof msg, PQerrorMessage(c), w->s->password);
        rc = es__error_set(&err, ES_EDB, "could not connect: %s", msg);
    } else {
        PQsetNoticeProcessor(c, es__pg_quiet_notices, NULL);
        char sql[64];
        snprintf(sql, sizeof sql, "LISTEN \"%s\"", w->channel);
        rc = es__pg_run_simple(c, "listen", sql, &err);
        if (rc == 0 && PQsetnonblocking(c, 1) != 0)
            rc = es__error_set(&err, ES_EDB, "listen: cannot make the "
                                             "connection non-blocking");
    }
    if (rc != 0) {
        PQfinish(c);
        if (!*warned)
            es__log(ES_LOG_WARN, "%s: no notifications, polling "
                    "meanwhile: %s", w->what, err.message);
        *warned = true;
        return NULL;
    }
    if (*warned)
        es__log(ES_LOG_INFO, "%s: notifications are back (LISTEN %s)",
                w->what, w->channel);
    *warned = false;
    return c;
}

static void *watch_main(void *arg)
{
    es__outbox_watch *w = arg;
    PGconn *c = NULL;
    unsigned delay = WATCH_RETRY_MIN_MS;
    int64_t next = 0; /* when to connect (monotonic ms) */
    uint64_t rng = ((uint64_t)es__mono_ms() ^ (uint64_t)(uintptr_t)w) | 1u;
    bool warned = false;
    for (;;) {
        if (c == NULL && es__mono_ms() >= next) {
            c = watch_connect(w, &warned);
            if (c != NULL) {
                delay = WATCH_RETRY_MIN_MS;
                w->fn(w->ud, false); /* we may have missed some */
            } else {
                next = es__mono_ms() + es__backoff_jitter(&rng, delay);
                delay = es__backoff_grow(delay, WATCH_RETRY_MIN_MS,
                                         w->retry_max_ms);
            }
        }
        struct pollfd f[2] = {{w->stop[0], POLLIN, 0},
                              {c ? PQsocket(c) : -1, POLLIN, 0}};
        int64_t wait = c ? -1 : next - es__mono_ms();
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
            es__log(ES_LOG_WARN, "%s: the LISTEN connection was lost; "
                    "polling until it is back", w->what);
            warned = true;
            PQfinish(c);
            c = NULL;
            next = es__mono_ms() + es__backoff_jitter(&rng, delay);
        }
    }
    if (c != NULL) PQfinish(c);
    return NULL;
}

static int watch_start(pg_store *s, const char *channel, const char *what,
                       int64_t retry_max_ms, es__watch_fn fn, void *ud,
                       es__outbox_watch **out, es_error *err)
{
    es__outbox_watch *w = es__calloc(1, sizeof *w);
    if (w == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    w->s = s;
    w->channel = channel;
    w->what = what;
    w->fn = fn;
    w->ud = ud;
    w->retry_max_ms = retry_max_ms < WATCH_RETRY_MIN_MS ? WATCH_RETRY_MIN_MS
                      : retry_max_ms > UINT_MAX    ? UINT_MAX
                                                   : (unsigned)retry_max_ms;
    if (pipe2(w->stop, O_CLOEXEC) != 0) {
        es__free(w);
        return es__error_set(err, ES_EIO, "%s: no pipe for the watch",
                             what);
    }
    if (pthread_create(&w->thread, NULL, watch_main, w) != 0) {
        close(w->stop[0]);
        close(w->stop[1]);
        es__free(w);
        return es__error_set(err, ES_EIO, "%s: cannot start the watch "
                             "thread", what);
    }
    *out = w;
    return 0;
}

int es__pg_outbox_watch(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                        void *ud, es__outbox_watch **out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    return watch_start(s, s->channel, "outbox", retry_max_ms, fn, ud, out,
                       err);
}

int es__pg_events_watch(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                        void *ud, es__outbox_watch **out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    return watch_start(s, s->events_channel, "projections", retry_max_ms, fn,
                       ud, out, err);
}

void es__pg_outbox_unwatch(es__outbox_watch *w)
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
