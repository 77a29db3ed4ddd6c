/*
 * Snapshots: jobs (an encoded state to store) queued by workers and the
 * I/O loop, and the snapshot writer thread, which writes the latest of
 * each aggregate's jobs in one transaction on a connection of its own and
 * purges old command ids.  host->sw.lock guards the queue and the
 * writer's flags; the writer's connection is its thread's.  The loop's
 * flush timer (flush_ev) wakes the writer; it is added outside sw.lock.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "host/host_int.h"

#define MAX_SNAP_JOBS 65536
/* The snapshot writer's pace: the loop's flush timer fires this long
 * after the first snapshot was queued, so that several snapshots of one
 * aggregate coalesce into one write. */
#define FLUSH_MS 100

static snap_job *snap_job_new(const es_uuid *id, uint64_t version,
                              uint64_t snapshot_version, const uint8_t *data,
                              size_t len)
{
    snap_job *j = es__malloc(sizeof *j + len);
    if (j == NULL) return NULL;
    uint8_t *copy = (uint8_t *)(j + 1);
    if (len > 0) memcpy(copy, data, len);
    j->next = NULL;
    j->snap = (es_snapshot){*id, version, snapshot_version, copy, len};
    return j;
}

/* Queue a list of jobs for the snapshot writer.  It is not woken: the
 * first job arms the loop's flush timer, which wakes it FLUSH_MS later,
 * so that several snapshots of one aggregate coalesce and a worker
 * completing a command never waits on it.  event_add is thread-safe on a
 * base with libevent's pthread locks. */
void es__host_snap_enqueue(es_host *host, snap_job *j)
{
    bool arm = false;
    while (j) {
        snap_job *next = j->next;
        j->next = NULL;
        pthread_mutex_lock(&host->sw.lock);
        bool full = host->sw.n >= MAX_SNAP_JOBS;
        if (!full) {
            if (host->sw.tail) host->sw.tail->next = j;
            else host->sw.head = j;
            host->sw.tail = j;
            host->sw.n++;
            if (!host->sw.flush_armed) arm = host->sw.flush_armed = true;
        }
        pthread_mutex_unlock(&host->sw.lock);
        if (full) es__free(j); /* a cache: drop rather than grow */
        j = next;
    }
    if (arm && host->io.flush_ev != NULL) {
        struct timeval tv = {FLUSH_MS / 1000, FLUSH_MS % 1000 * 1000};
        event_add(host->io.flush_ev, &tv);
    }
}

typedef struct snap_ref {
    snap_job *j;
    size_t seq; /* queue order */
} snap_ref;

static int snap_ref_cmp(const void *pa, const void *pb)
{
    const snap_ref *a = pa, *b = pb;
    int c = memcmp(a->j->snap.aggregate_id.bytes, b->j->snap.aggregate_id.bytes,
                   16);
    if (c != 0) return c;
    if (a->j->snap.version != b->j->snap.version)
        return a->j->snap.version < b->j->snap.version ? -1 : 1;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/* Keep only the latest snapshot of each aggregate (highest version, then
 * the last queued), in aggregate id order: one row write per aggregate,
 * and hosts sharing a database update the rows in the same order.  Out
 * of memory: the list as it is. */
static snap_job *snap_coalesce(snap_job *list)
{
    size_t n = 0;
    for (snap_job *j = list; j; j = j->next) n++;
    if (n < 2) return list;
    snap_ref *refs = es__calloc(n, sizeof *refs);
    if (refs == NULL) return list;
    n = 0;
    for (snap_job *j = list; j; j = j->next, n++) refs[n] = (snap_ref){j, n};
    qsort(refs, n, sizeof *refs, snap_ref_cmp);
    snap_job *head = NULL, **tail = &head;
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n && es_uuid_equal(&refs[i].j->snap.aggregate_id,
                                       &refs[i + 1].j->snap.aggregate_id)) {
            es__free(refs[i].j); /* a later one follows */
            continue;
        }
        *tail = refs[i].j;
        tail = &refs[i].j->next;
    }
    *tail = NULL;
    es__free(refs);
    return head;
}

/* Encode the actor's state; NULL when it cannot. */
snap_job *es__host_snap_of(const actor *a)
{
    const es_aggregate_type *t = a->ht->type;
    es_buf buf = {0};
    es_error inner = {0};
    if (t->state_encode(es__host_actor_state(a), &buf, &inner) != 0) {
        es_buf_free(&buf);
        return NULL;
    }
    snap_job *j = snap_job_new(&a->id, es__host_actor_version(a),
                               t->snapshot_version, buf.data, buf.len);
    es_buf_free(&buf);
    return j;
}

/* Write and free a list of snapshots in one transaction.  Returns 0 or
 * the store's error. */
int es__host_snap_write(es_host *host, snap_job *list, es_error *err)
{
    if (list == NULL) return 0;
    int rc = 0;
    uint64_t n = 0;
    list = snap_coalesce(list);
    /* The connection may have died meanwhile (the store then drops it):
     * one more try on a fresh one before giving up. */
    for (int attempt = 0; attempt < 2; attempt++) {
        es_txn *txn = NULL;
        n = 0;
        rc = es__store_begin_background(host->store, &host->sw.conn, &txn, err);
        for (snap_job *j = list; rc == 0 && j; j = j->next, n++)
            rc = es_txn_store_snapshot(txn, &j->snap, err);
        if (txn) {
            if (rc == 0) rc = es_txn_commit(txn, err);
            else es_txn_rollback(txn);
        }
        if (rc != ES_EDB) break;
    }
    if (rc == 0) metric_add(&host->snapshots, n);
    while (list) {
        snap_job *next = list->next;
        es__free(list);
        list = next;
    }
    return rc;
}

void es__host_snap_free(snap_job *jobs)
{
    while (jobs) {
        snap_job *next = jobs->next;
        es__free(jobs);
        jobs = next;
    }
}

/* Retention of command ids, on the snapshot writer (off the loop and the
 * workers): one batch a second, more while batches come back full. */
static void purge_commands_due(es_host *host, int64_t *next_ms)
{
    int64_t keep = host->cfg.command_retention_ms;
    if (keep == 0) return;
    int64_t now = es_clock_now_ms();
    if (now < *next_ms) return;
    size_t n = 0;
    es_error err = {0};
    int rc = es__store_purge_commands(host->store, now - keep,
                                      ES__PURGE_BATCH, &n, &err);
    if (rc != 0)
        es__log(ES_LOG_WARN, "host: purge of command ids failed: %s: %s",
                es_status_name(rc), err.message);
    *next_ms = rc == 0 && n == ES__PURGE_BATCH ? now : now + 1000;
}

/* The snapshot writer: when the loop's flush timer asks (FLUSH_MS after
 * the first job was queued, so that several snapshots of one aggregate
 * coalesce), what was queued, coalesced, in one transaction on its own
 * connection.  It waits on a condition, never polls.  At the stop it
 * writes what is left (nothing when closing now). */
void *es__host_snap_writer_main(void *arg)
{
    es_host *host = arg;
    es__host_tls = host;
    int64_t next_purge = 0;
    for (;;) {
        pthread_mutex_lock(&host->sw.lock);
        while (!host->sw.flush && !host->sw.stop) {
            if (host->cfg.command_retention_ms == 0) {
                pthread_cond_wait(&host->sw.cond, &host->sw.lock);
                continue;
            }
            struct timespec until;
            deadline_in(&until, 1000000000u); /* the next purge */
            if (pthread_cond_timedwait(&host->sw.cond, &host->sw.lock,
                                       &until) == ETIMEDOUT)
                break;
        }
        snap_job *jobs = host->sw.head;
        host->sw.head = host->sw.tail = NULL;
        host->sw.n = 0;
        host->sw.flush = false;
        bool stop = host->sw.stop;
        pthread_mutex_unlock(&host->sw.lock);
        if (atomic_load(&host->closing_now)) {
            es__host_snap_free(jobs);
        } else {
            es_error err = {0};
            /* a cache: errors only cost */
            es__host_snap_write(host, jobs, &err);
        }
        if (stop) break;
        purge_commands_due(host, &next_purge);
    }
    return NULL;
}
