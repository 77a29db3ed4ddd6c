/*
 * The outbox dispatcher's tests, run on a store of the caller's choosing
 * (tests/suites/outbox.c), and the pieces of them that other
 * outbox tests use: the "job" aggregate, its recorder of deliveries, a
 * dispatcher started on it.
 */
#ifndef SUITES_OUTBOX_H
#define SUITES_OUTBOX_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eventastic.h"

/* A "job" aggregate: each event carries a text; each event makes one side
 * effect with that text.  The side-effect decoder refuses "poison". */
typedef struct job { int count; } job;
typedef enum job_kind { JOB_CREATED = 1, JOB_STEP = 2 } job_kind;
typedef struct job_event {
    job_kind kind;
    es_uuid id;
    char text[32];
} job_event;
typedef struct job_effect {
    es_uuid id;
    char text[32];
} job_effect;

/* What handlers saw.  Filled under a mutex from worker threads; asserted
 * only after the dispatchers stopped. */
#define MAX_SEEN 1024
typedef struct recorder {
    pthread_mutex_t lock;
    size_t n;
    char text[MAX_SEEN][32];
    es_uuid agg[MAX_SEEN];
    uint32_t attempts[MAX_SEEN];
    es_uuid fx[MAX_SEEN]; /* side-effect ids */
    int who[MAX_SEEN];    /* which dispatcher (record_fx_tagged), or 0 */
    int in_flight, max_in_flight_same_agg;
    es_uuid busy[64];
    size_t n_busy;
    int retry_first; /* answer RETRY to this many first attempts */
    int verdict_override;
    int64_t deliver_ms;
    es_outbox *ob;          /* when set: the dispatcher, for... */
    uint64_t deliver_round; /* ...its round count at the last delivery */
} recorder;

/* The job aggregate: its side-effect decoder refuses "poison". */
extern const es_aggregate_type job_type;

/* Store an aggregate with n events (texts given), committed or not. */
void store_job(es_store *store, const es_aggregate_type *type,
               const es_uuid *id, const char *const *texts, size_t n,
               bool commit);

void recorder_init(recorder *r);

/* A dispatcher on store with workers threads, polling every poll_ms,
 * retrying after base_ms, that records what it delivers in r. */
es_outbox *started_outbox(es_store *store, recorder *r, size_t workers,
                          int64_t poll_ms, int64_t base_ms);

/* How many deliveries r has seen. */
size_t seen_count(recorder *r);

/* Whether r has seen n deliveries within seconds. */
bool wait_for(recorder *r, size_t n, int seconds);

/* Runs every test of the suite with the stores open makes, each closed
 * with close; returns what cmocka_run_group_tests returns. */
int outbox_suite_run(int (*open)(es_store **out),
                     int (*close)(es_store *store));

#endif
