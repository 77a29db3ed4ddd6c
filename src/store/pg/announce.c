/*
 * The announcer of the PostgreSQL store: after a commit of this process
 * stored events, it NOTIFYs the events channel (pg_store.events_channel)
 * from a connection of its own, so that projections in other processes
 * (their watch LISTENs there) read at once instead of at their next poll.
 *
 * Not inside the writing transactions: a NOTIFY takes a cluster-wide lock
 * from its transaction's commit to its end, which would serialise the
 * commit lanes.  Not one per commit either: at most one NOTIFY every
 * ANNOUNCE_GAP_MS; a burst of commits is one notification, and a reader
 * woken reads everything after its checkpoint anyway.  A NOTIFY that
 * fails is dropped (readers poll meanwhile) and its connection made anew
 * for the next.
 *
 * Threads: es__pg_announce from any thread (the committing one), which
 * only sets a flag under ann.lock; the announcer's own thread, started on
 * the first announce, does the round trips; es__pg_announcer_stop from
 * the store's close.
 */
#include "store/pg/pg_int.h"

#define ANNOUNCE_GAP_MS 2

static void announce_once(pg_store *s)
{
    es_error err = {0};
    if (s->ann.conn == NULL &&
        es__pg_store_connect(s, &s->ann.conn, &err) != 0)
        return;
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {s->events_channel};
    const int lens[1] = {(int)strlen(s->events_channel)};
    if (es__pg_run(s->ann.conn, "announce", "SELECT pg_notify($1, '')", 1,
                   types, values, lens, NULL, &err) != 0) {
        PQfinish(s->ann.conn);
        s->ann.conn = NULL;
    }
}

static void *announcer_main(void *arg)
{
    pg_store *s = arg;
    pthread_mutex_lock(&s->ann.lock);
    for (;;) {
        while (!s->ann.pending && !s->ann.stop)
            pthread_cond_wait(&s->ann.cond, &s->ann.lock);
        if (s->ann.stop) break;
        s->ann.pending = false;
        pthread_mutex_unlock(&s->ann.lock);
        announce_once(s);
        struct timespec gap = {0, ANNOUNCE_GAP_MS * 1000000L};
        nanosleep(&gap, NULL);
        pthread_mutex_lock(&s->ann.lock);
    }
    pthread_mutex_unlock(&s->ann.lock);
    return NULL;
}

void es__pg_announcer_init(pg_store *s)
{
    pthread_mutex_init(&s->ann.lock, NULL);
    pthread_cond_init(&s->ann.cond, NULL);
}

void es__pg_announce(pg_store *s)
{
    pthread_mutex_lock(&s->ann.lock);
    if (!s->ann.started && !s->ann.stop)
        s->ann.started =
            pthread_create(&s->ann.thread, NULL, announcer_main, s) == 0;
    s->ann.pending = true;
    pthread_cond_signal(&s->ann.cond);
    pthread_mutex_unlock(&s->ann.lock);
}

void es__pg_announcer_stop(pg_store *s)
{
    pthread_mutex_lock(&s->ann.lock);
    s->ann.stop = true;
    pthread_cond_signal(&s->ann.cond);
    bool started = s->ann.started;
    pthread_mutex_unlock(&s->ann.lock);
    if (started) pthread_join(s->ann.thread, NULL);
    if (s->ann.conn) PQfinish(s->ann.conn);
    s->ann.conn = NULL;
    pthread_cond_destroy(&s->ann.cond);
    pthread_mutex_destroy(&s->ann.lock);
}
