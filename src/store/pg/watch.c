/*
 * The outbox watch of the PostgreSQL store: a thread that LISTENs on a
 * connection of its own and wakes the dispatchers on a NOTIFY.
 */
#include "store/pg/pg_int.h"

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

int64_t es__pg_mono_ms(void)
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
        es__pg_scrub(msg, sizeof msg, PQerrorMessage(c), w->s->password);
        rc = es__error_set(&err, ES_EDB, "could not connect: %s", msg);
    } else {
        PQsetNoticeProcessor(c, es__pg_quiet_notices, NULL);
        char sql[64];
        snprintf(sql, sizeof sql, "LISTEN \"%s\"", w->s->channel);
        rc = es__pg_run_simple(c, "outbox: listen", sql, &err);
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
        if (c == NULL && es__pg_mono_ms() >= next) {
            c = watch_connect(w, &warned);
            if (c != NULL) {
                delay = 100;
                w->fn(w->ud, false); /* we may have missed some */
            } else {
                next = es__pg_mono_ms() + delay;
                delay = delay * 2 > w->retry_max_ms ? w->retry_max_ms
                                                    : delay * 2;
            }
        }
        struct pollfd f[2] = {{w->stop[0], POLLIN, 0},
                              {c ? PQsocket(c) : -1, POLLIN, 0}};
        int64_t wait = c ? -1 : next - es__pg_mono_ms();
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
            next = es__pg_mono_ms() + delay;
        }
    }
    if (c != NULL) PQfinish(c);
    return NULL;
}

int es__pg_outbox_watch(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                        void *ud, es__outbox_watch **out, es_error *err)
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
