/*
 * A model-based test of the host on the in-memory store.
 *
 * Several threads send random commands to accounts and counters (the
 * fixtures' types): asynchronous sends and blocking calls, a command id
 * sent again with the same content, with other content and to another
 * key, while aggregates are passivated all the time, the host is stopped
 * (sometimes in the middle of the traffic) and opened again on the same
 * store, and in some rounds commits fail or lose their answer on purpose
 * (fixtures/faults.h).  Then every command the host could not settle is
 * sent once more to a host without faults.
 *
 * The check: per command id, at most one decision (accepted or rejected)
 * and every other answer for the id the same one, or ES_EIDEMPOTENCY for
 * other content or another key; a failure reported other than
 * ES_EUNKNOWN never committed.  Per key, the decisions in the order the
 * key accepted them (by the versions the host reported) must equal what a
 * sequential reference model answers to the same commands in that order:
 * status, version, events, reason.  The store holds exactly the events of
 * those decisions, with the event ids reported, and loading a key (with
 * its snapshots) gives the model's state.
 *
 * Seeded: the seed is printed; HOST_MODEL_SEED=<n> runs the same commands
 * again (the threads interleave differently).  HOST_MODEL_ROUNDS and
 * HOST_MODEL_STEPS (per thread and round) size the run.  A failure prints
 * the seed, the key and the step where host and model part.  Worker
 * threads never assert: they record, the test joins, then checks.
 */
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/counter.h"
#include "fixtures/faults.h"
#include "fixtures/helpers.h"

#define KEYS 16 /* even: accounts, odd: counters */
#define THREADS 3
#define MAX_EVENTS 2 /* a command emits at most two events */

enum { ACC_DEPOSIT = 1, ACC_WITHDRAW = 2, CTR_ADD = 3, CTR_MUL = 4 };

static es_uuid g_keys[KEYS];

static bool is_account(int key) { return key % 2 == 0; }

static const es_aggregate_type *type_of(int key)
{
    return is_account(key) ? &account_type : &counter_type;
}

static int32_t payload_value(const es_command *cmd)
{
    const uint8_t *p = cmd->payload;
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                     (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
}

/* ---- the handlers under test ---- */

static int account_decide(void *user, const void *state,
                          const es_command *cmd, es_emitter *em)
{
    (void)user;
    if (cmd->len != 4) return es_emit_reject(em, "bad payload");
    int32_t v = payload_value(cmd);
    const account *s = state;
    if (cmd->kind == ACC_WITHDRAW) {
        if (s == NULL) return es_emit_reject(em, "no account");
        if (s->balance < v)
            return es_emit_reject(em, "insufficient: %" PRId64 " < %d",
                                  s->balance, (int)v);
        account_event e = account_remove(v);
        return es_emit(em, &e);
    }
    if (s == NULL) {
        account_event open;
        int rc = account_open(&open, es_emit_aggregate_id(em),
                              ACCOUNT_DEFAULT_EMAIL, 0);
        if (rc == 0) rc = es_emit(em, &open);
        account_event_free(&open);
        if (rc != 0) return rc;
    }
    account_event e = account_add(v);
    return es_emit(em, &e);
}

static int counter_decide(void *user, const void *state,
                          const es_command *cmd, es_emitter *em)
{
    if (cmd->kind == CTR_ADD)
        return counter_decide_add(user, state, cmd, em);
    if (cmd->len != 4) return es_emit_reject(em, "bad payload");
    if (state == NULL) return es_emit_reject(em, "no counter");
    counter_event e = counter_multiply(payload_value(cmd)); /* 0 fails */
    return es_emit(em, &e);
}

/* ---- what was sent and what came back ---- */

typedef struct ev_view {
    int32_t kind;
    int64_t value; /* Open: starting balance; Reset: 0 */
    uint64_t version;
    es_uuid id;
    bool ok; /* decoded, and its aggregate id is the key's */
} ev_view;

typedef struct send_rec {
    /* the command: set by its thread before sending, then read only */
    int key, round, thread, step;
    char what; /* n: new, d: same again, o: other content, k: other key,
                  s: settled at the end */
    bool blocking;
    es_uuid id;
    int32_t kind, value;
    uint8_t payload[4];
    bool accepted; /* es_host_send or es_host_call took it */
    int send_rc;
    /* the outcome: written once, before done */
    atomic_int done;
    int status;
    bool dup;
    uint64_t version;
    size_t n_events;
    ev_view ev[MAX_EVENTS];
    char reason[96];
} send_rec;

static bool same_content(const send_rec *a, const send_rec *b)
{
    return a->kind == b->kind && a->value == b->value;
}

static es_command command_of(const send_rec *r)
{
    es_command c = {r->id, r->kind, r->payload, sizeof r->payload};
    return c;
}

static void set_payload(send_rec *r)
{
    for (int i = 0; i < 4; i++)
        r->payload[i] = (uint8_t)((uint32_t)r->value >> (8 * i));
}

static ev_view view_of(int key, const es_event *e)
{
    ev_view v;
    memset(&v, 0, sizeof v);
    v.kind = e->kind;
    v.version = e->version;
    v.id = e->id;
    const es_aggregate_type *t = type_of(key);
    if (is_account(key)) {
        account_event ae;
        memset(&ae, 0, sizeof ae);
        if (t->event_decode(e->kind, e->data, e->len, &ae, NULL) != 0)
            return v;
        v.value = ae.kind == ACCOUNT_OPEN ? ae.starting_balance : ae.amount;
        v.ok = ae.kind != ACCOUNT_OPEN ||
               (es_uuid_equal(&ae.account_id, &g_keys[key]) &&
                strcmp(ae.email, ACCOUNT_DEFAULT_EMAIL) == 0);
        account_event_free(&ae);
    } else {
        counter_event ce;
        memset(&ce, 0, sizeof ce);
        if (t->event_decode(e->kind, e->data, e->len, &ce, NULL) != 0)
            return v;
        v.value = ce.kind == COUNTER_RESET ? 0 : ce.value;
        v.ok = ce.kind != COUNTER_RESET ||
               es_uuid_equal(&ce.counter_id, &g_keys[key]);
    }
    return v;
}

static void record(send_rec *r, int status, bool dup, uint64_t version,
                   const es_event *events, size_t n, const char *reason)
{
    r->status = status;
    r->dup = dup;
    r->version = version;
    r->n_events = n;
    for (size_t i = 0; i < n && i < MAX_EVENTS; i++)
        r->ev[i] = view_of(r->key, &events[i]);
    snprintf(r->reason, sizeof r->reason, "%s", reason ? reason : "");
    atomic_fetch_add(&r->done, 1);
}

static void on_done(void *ud, const es_host_result *res)
{
    record(ud, res->status, res->duplicate, res->version, res->events,
           res->n_events, res->reason);
}

/* Send r (async or blocking as it says); EBUSY is tried again a while.
 * Returns what es_host_send or es_host_call returned. */
static int send_one(es_host *host, send_rec *r)
{
    es_command c = command_of(r);
    const es_aggregate_type *t = type_of(r->key);
    int rc;
    for (int tries = 0;; tries++) {
        if (r->blocking) {
            es_host_reply *reply = NULL;
            rc = es_host_call(host, t, &g_keys[r->key], &c, &reply, NULL);
            if (reply) {
                r->accepted = true;
                record(r, reply->status, reply->duplicate, reply->version,
                       reply->events, reply->n_events, reply->reason);
                es_host_reply_free(reply);
                return rc;
            }
        } else {
            rc = es_host_send(host, t, &g_keys[r->key], &c, on_done, r,
                              NULL);
            if (rc == 0) {
                r->accepted = true;
                return 0;
            }
        }
        if (rc != ES_EBUSY || tries == 2000) break;
        sched_yield();
    }
    r->send_rc = rc;
    return rc;
}

/* ---- the run ---- */

typedef struct run {
    uint64_t seed;
    int rounds, steps;
    send_rec *recs; /* [round][thread][step] */
    send_rec *settle;
    size_t n_settle;
    es_store *store;
    es_host *host; /* the round's */
    int round;
    uint64_t passivations, loads, conflicts; /* over the rounds */
} run;

static send_rec *rec_at(run *w, int round, int thread, int step)
{
    return &w->recs[((size_t)round * THREADS + (size_t)thread) *
                        (size_t)w->steps +
                    (size_t)step];
}

static uint64_t next_rand(uint64_t *s) /* splitmix64 */
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static int pick(uint64_t *s, int n)
{
    return (int)(next_rand(s) % (uint64_t)n);
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* A new command for a random key. */
static void new_command(send_rec *r, uint64_t *rng)
{
    r->key = pick(rng, KEYS);
    if (is_account(r->key)) {
        r->kind = pick(rng, 10) < 6 ? ACC_DEPOSIT : ACC_WITHDRAW;
        r->value = r->kind == ACC_DEPOSIT ? 1 + pick(rng, 50)
                                          : 1 + pick(rng, 80);
    } else {
        static const int32_t factors[] = {-1, 0, 2, 3, -2};
        r->kind = pick(rng, 10) < 6 ? CTR_ADD : CTR_MUL;
        r->value = r->kind == CTR_ADD ? pick(rng, 41) - 20
                                      : factors[pick(rng, 5)];
    }
    r->what = 'n';
    es_uuid_v7(&r->id);
}

/* An earlier command of this thread (this round or before) or of any
 * thread in an earlier round (those threads were joined). */
static const send_rec *earlier(run *w, int thread, int step, uint64_t *rng)
{
    int round = pick(rng, w->round + 1);
    int t = round == w->round ? thread : pick(rng, THREADS);
    int limit = round == w->round ? step : w->steps;
    if (limit == 0) return NULL;
    const send_rec *o = rec_at(w, round, t, pick(rng, limit));
    return o->what == 0 ? NULL : o;
}

typedef struct producer {
    run *w;
    int thread;
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    run *w = p->w;
    uint64_t rng = w->seed ^ (0x1000193u * (uint64_t)(w->round * THREADS +
                                                     p->thread + 1));
    for (int i = 0; i < w->steps; i++) {
        send_rec *r = rec_at(w, w->round, p->thread, i);
        r->round = w->round;
        r->thread = p->thread;
        r->step = i;
        int op = pick(&rng, 100);
        const send_rec *o = op >= 60 && op < 90 ? earlier(w, p->thread, i,
                                                          &rng)
                                                : NULL;
        if (op >= 90) { /* idle: let actors passivate */
            sleep_us(500 + pick(&rng, 2500));
            r->what = 0;
            continue;
        }
        if (o == NULL) {
            new_command(r, &rng);
            r->blocking = op >= 40 && op < 60;
        } else {
            r->key = o->key;
            r->id = o->id;
            r->kind = o->kind;
            r->value = o->value;
            r->blocking = pick(&rng, 2) == 0;
            r->what = 'd';
            if (op >= 75 && op < 83) { /* other content */
                r->what = 'o';
                r->value = o->value + 1 + pick(&rng, 3);
            } else if (op >= 83) { /* the same to another key */
                r->what = 'k';
                r->key = (o->key + 2 * (1 + pick(&rng, KEYS / 2 - 1))) %
                         KEYS;
            }
        }
        set_payload(r);
        if (send_one(w->host, r) == ES_ECLOSED) break; /* stopped */
    }
    return NULL;
}

static void open_round_host(run *w, uint64_t *rng)
{
    es_host_config *cfg = NULL;
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    es_host_config_set_workers(cfg, 1 + (unsigned)pick(rng, 3));
    es_host_config_set_lanes(cfg, 1 + (unsigned)pick(rng, 2));
    es_host_config_set_idle_ms(cfg, 1 + (uint64_t)pick(rng, 3));
    es_host_config_set_resident_bound(cfg, 64);
    es_host_config_set_snapshots(cfg, 2 + (uint64_t)pick(rng, 3), true);
    es_host_config_set_batch_rows(cfg, 8 + (size_t)pick(rng, 32));
    es_host_config_set_mailbox_bound(cfg, 16);
    assert_int_equal(es_host_config_add_type(cfg, &account_type,
                                             account_decide, NULL, NULL),
                     0);
    assert_int_equal(es_host_config_add_type(cfg, &counter_type,
                                             counter_decide, NULL, NULL),
                     0);
    assert_int_equal(es_host_open(cfg, w->store, &w->host, NULL), 0);
    es_host_config_free(cfg);
}

/* One round: a host on the store (faults or not), the producers, a stop
 * in the middle of the traffic or at its end, then a shutdown or an
 * immediate close. */
static void run_round(run *w, uint64_t *rng)
{
    bool faults = w->round % 2 == 1 || pick(rng, 4) == 0;
    fixture_faults_wrap(w->store, true, faults);
    atomic_store(&fixture_fault_commit_no, (long)pick(rng, 13));
    open_round_host(w, rng);
    atomic_store(&fixture_fault_chaos, faults);
    pthread_t th[THREADS];
    producer p[THREADS];
    for (int t = 0; t < THREADS; t++) {
        p[t] = (producer){w, t};
        assert_int_equal(pthread_create(&th[t], NULL, produce, &p[t]), 0);
    }
    if (pick(rng, 3) == 0) { /* restart in the middle of the traffic */
        sleep_us(2000 + pick(rng, 20000));
        es_host_stop(w->host);
    }
    for (int t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    es_host_metrics m;
    assert_int_equal(es_host_metrics_get(w->host, &m), 0);
    w->passivations += m.passivations;
    w->loads += m.loads;
    w->conflicts += m.conflicts;
    if (pick(rng, 3) == 0) {
        assert_int_equal(es_host_close(w->host), 0);
    } else {
        /* a snapshot written at the end may meet an injected failure:
         * reported, and harmless (a cache) */
        int rc = es_host_shutdown(w->host, NULL);
        assert_true(rc == 0 || (faults && (rc == ES_EDB ||
                                           rc == ES_EUNKNOWN)));
    }
    w->host = NULL;
    atomic_store(&fixture_fault_chaos, false);
    fixture_faults_unwrap(w->store);
}

/* ---- the check ---- */

static bool decided(const send_rec *r)
{
    return r->accepted &&
           (r->status == 0 || r->status == ES_EREJECTED);
}

static const char *what_name(char what)
{
    switch (what) {
    case 'n': return "new";
    case 'd': return "again";
    case 'o': return "other content";
    case 'k': return "other key";
    case 's': return "settled";
    default: return "?";
    }
}

static void print_send(const char *label, const send_rec *r)
{
    char id[ES_UUID_STRLEN + 1];
    es_uuid_format(&r->id, id);
    print_message("  %s: round %d thread %d step %d (%s, %s) key %d "
                  "command %s kind %d value %d: status %s%s version %lld "
                  "events %zu reason \"%s\"\n",
                  label, r->round, r->thread, r->step, what_name(r->what),
                  r->blocking ? "call" : "send", r->key, id, (int)r->kind,
                  (int)r->value, es_status_name(r->status),
                  r->dup ? " (duplicate)" : "",
                  r->version == ES_HOST_NO_VERSION ? -1LL
                                                   : (long long)r->version,
                  r->n_events, r->reason);
}

typedef struct checker {
    run *w;
    send_rec **all;
    size_t n;
    int failures;
} checker;

/* The sends to r's key by r's thread in r's round, from a few steps
 * before first to a few after r: what the key met around a divergence. */
static void print_around(const checker *c, const send_rec *first,
                         const send_rec *r)
{
    const run *w = c->w;
    if (r->what == 's') return;
    for (int i = 0; i < w->steps; i++) {
        const send_rec *q = &w->recs[((size_t)r->round * THREADS +
                                      (size_t)r->thread) *
                                         (size_t)w->steps +
                                     (size_t)i];
        bool near = i >= r->step - 3 && i <= r->step + 3;
        if (first->round == r->round && first->thread == r->thread)
            near = near || (i >= first->step - 3 && i <= r->step + 3);
        if (q->what != 0 && q->key == r->key && near && q != r)
            print_send("near", q);
    }
}

static void fail_at(checker *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void fail_at(checker *c, const char *fmt, ...)
{
    if (c->failures++ == 0)
        print_message("host model: FAILED, seed %" PRIu64
                      " (HOST_MODEL_SEED=%" PRIu64 " runs it again)\n",
                      c->w->seed, c->w->seed);
    if (c->failures > 20) return;
    va_list ap;
    va_start(ap, fmt);
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    print_message("%s\n", line);
}

static int by_id(const void *a, const void *b)
{
    const send_rec *x = *(send_rec *const *)a, *y = *(send_rec *const *)b;
    int d = memcmp(x->id.bytes, y->id.bytes, 16);
    if (d != 0) return d;
    return x < y ? -1 : x > y;
}

static bool same_outcome(const send_rec *a, const send_rec *b)
{
    if (a->status != b->status || a->version != b->version ||
        a->n_events != b->n_events)
        return false;
    if (a->status == ES_EREJECTED) return strcmp(a->reason, b->reason) == 0;
    for (size_t i = 0; i < a->n_events && i < MAX_EVENTS; i++)
        if (!es_uuid_equal(&a->ev[i].id, &b->ev[i].id) ||
            a->ev[i].version != b->ev[i].version)
            return false;
    return true;
}

/* The sends of one command id: [from, to) of c->all.  Returns its
 * decision (NULL: none): the send that decided it, or, when that one's
 * answer was lost (ES_EUNKNOWN), an answer from its record. */
static send_rec *truth_of(checker *c, size_t from, size_t to)
{
    send_rec *truth = NULL;
    for (size_t i = from; i < to; i++) {
        send_rec *r = c->all[i];
        if (!decided(r) || r->dup) continue;
        if (truth == NULL) {
            truth = r;
            continue;
        }
        fail_at(c, "command decided twice:");
        print_send("first", truth);
        print_send("again", r);
        print_around(c, truth, r);
    }
    for (size_t i = from; truth == NULL && i < to; i++)
        if (decided(c->all[i])) truth = c->all[i];
    for (size_t i = from; i < to; i++) {
        send_rec *r = c->all[i];
        if (r->accepted && atomic_load(&r->done) != 1) {
            fail_at(c, "accepted command completed %d times:",
                    atomic_load(&r->done));
            print_send("send", r);
            continue;
        }
        if (!r->accepted || r == truth) continue;
        if (decided(r) && (truth->key != r->key ||
                           !same_content(truth, r) ||
                           !same_outcome(truth, r) || !r->dup)) {
            fail_at(c, "an answer differs from the command's decision:");
            print_send("decision", truth);
            print_send("answer", r);
            print_around(c, truth, r);
        }
        if (r->status == ES_EIDEMPOTENCY) {
            bool other = false;
            for (size_t j = from; j < to && !other; j++)
                other = c->all[j]->key != r->key ||
                        !same_content(c->all[j], r);
            if (!other) {
                fail_at(c, "ES_EIDEMPOTENCY, but the id was only ever "
                        "sent with this content to this key:");
                print_send("send", r);
            }
        }
        if (r->status == ES_EAPPLY &&
            (r->kind != CTR_MUL || r->value != 0)) {
            fail_at(c, "ES_EAPPLY for a command whose events apply:");
            print_send("send", r);
        }
    }
    return truth;
}

/* The reference model of one key, fed one decision at a time. */
typedef struct model {
    int64_t version; /* -1: no event yet */
    int64_t balance; /* accounts */
    uint32_t result; /* counters, wrapping like the fixture */
} model;

typedef struct expect {
    int status;
    uint64_t version;
    size_t n;
    int32_t kind[MAX_EVENTS];
    int64_t value[MAX_EVENTS];
    char reason[96];
} expect;

static expect model_step(model *m, int key, const send_rec *r)
{
    expect e;
    memset(&e, 0, sizeof e);
    bool fresh = m->version < 0;
    e.status = 0;
    if (is_account(key)) {
        if (r->kind == ACC_WITHDRAW) {
            if (fresh)
                snprintf(e.reason, sizeof e.reason, "no account");
            else if (m->balance < r->value)
                snprintf(e.reason, sizeof e.reason,
                         "insufficient: %" PRId64 " < %d", m->balance,
                         (int)r->value);
            else {
                e.kind[e.n] = ACCOUNT_REMOVE;
                e.value[e.n++] = r->value;
                m->balance -= r->value;
            }
        } else {
            if (fresh) {
                e.kind[e.n] = ACCOUNT_OPEN;
                e.value[e.n++] = 0;
                m->balance = 0;
            }
            e.kind[e.n] = ACCOUNT_ADD;
            e.value[e.n++] = r->value;
            m->balance += r->value;
        }
    } else {
        if (r->kind == CTR_MUL) {
            if (fresh)
                snprintf(e.reason, sizeof e.reason, "no counter");
            else if (r->value == 0)
                e.status = ES_EAPPLY;
            else {
                e.kind[e.n] = COUNTER_MULTIPLY;
                e.value[e.n++] = r->value;
                m->result *= (uint32_t)r->value;
            }
        } else {
            if (fresh) {
                e.kind[e.n] = COUNTER_RESET;
                e.value[e.n++] = 0;
                m->result = 0;
            }
            e.kind[e.n] = COUNTER_ADD;
            e.value[e.n++] = r->value;
            m->result += (uint32_t)r->value;
        }
    }
    if (e.reason[0]) e.status = ES_EREJECTED;
    m->version += (int64_t)e.n;
    e.version = m->version < 0 ? ES_HOST_NO_VERSION : (uint64_t)m->version;
    return e;
}

/* Where a decision sits in its key's order: after the events it reported
 * (a rejection: the version it saw); rejections after the command that
 * made that version. */
static int by_version(const void *a, const void *b)
{
    const send_rec *x = *(send_rec *const *)a, *y = *(send_rec *const *)b;
    uint64_t vx = x->version + 1, vy = y->version + 1; /* none: 0 */
    if (vx != vy) return vx < vy ? -1 : 1;
    int cx = x->status != 0, cy = y->status != 0;
    if (cx != cy) return cx - cy;
    return x < y ? -1 : x > y;
}

static void check_key(checker *c, int key, send_rec **seq, size_t n)
{
    qsort(seq, n, sizeof *seq, by_version);
    model m = {-1, 0, 0};
    /* every event the key's decisions reported, in order */
    ev_view *stream = calloc(n * MAX_EVENTS + 1, sizeof *stream);
    assert_non_null(stream);
    size_t n_stream = 0;
    char kid[ES_UUID_STRLEN + 1];
    es_uuid_format(&g_keys[key], kid);
    for (size_t i = 0; i < n; i++) {
        const send_rec *r = seq[i];
        expect e = model_step(&m, key, r);
        bool same = e.status == r->status && e.version == r->version &&
                    e.n == r->n_events &&
                    (e.status != ES_EREJECTED ||
                     strcmp(e.reason, r->reason) == 0);
        for (size_t j = 0; same && j < e.n; j++)
            same = r->ev[j].ok && r->ev[j].kind == e.kind[j] &&
                   r->ev[j].value == e.value[j] &&
                   r->ev[j].version == (uint64_t)(m.version + 1 -
                                                  (int64_t)e.n) +
                                           j;
        if (!same) {
            fail_at(c, "key %d (%s) parts from the model at its step %zu "
                    "of %zu: the model answers %s, version %lld, %zu "
                    "events, reason \"%s\"",
                    key, kid, i, n, es_status_name(e.status),
                    e.version == ES_HOST_NO_VERSION ? -1LL
                                                    : (long long)e.version,
                    e.n, e.reason);
            print_send("host", r);
            if (i > 0) print_send("step before", seq[i - 1]);
            print_around(c, r, r);
            free(stream); /* the rest would compare with a model behind */
            return;
        }
        for (size_t j = 0; j < e.n; j++) stream[n_stream++] = r->ev[j];
    }
    /* the store: exactly those events, and the model's state */
    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(c->w->store, &g_keys[key],
                                               &s, NULL),
                     0);
    bool same = s.count == n_stream && fixture_stream_gap_free(&s);
    for (size_t i = 0; same && i < s.count; i++) {
        ev_view v = view_of(key, &s.events[i]);
        same = v.ok && v.kind == stream[i].kind &&
               v.value == stream[i].value &&
               es_uuid_equal(&v.id, &stream[i].id);
    }
    if (!same && c->failures == 0)
        fail_at(c, "key %d (%s): the store holds %zu events, the "
                "decisions reported %zu (or others)",
                key, kid, s.count, n_stream);
    fixture_stream_free(&s);
    free(stream);
    if (m.version < 0) return;
    int64_t value = 0;
    uint64_t version = 0;
    int rc;
    if (is_account(key)) {
        account_context *ctx = NULL;
        rc = account_store_load(c->w->store, &g_keys[key], &ctx, NULL);
        if (rc == 0) {
            value = account_state(ctx)->balance;
            version = account_version(ctx);
        }
        account_context_free(ctx);
    } else {
        counter_context *ctx = NULL;
        rc = counter_store_load(c->w->store, &g_keys[key], &ctx, NULL);
        if (rc == 0) {
            value = counter_state(ctx)->result;
            version = counter_version(ctx);
        }
        counter_context_free(ctx);
    }
    int64_t want = is_account(key) ? m.balance : (int32_t)m.result;
    if (rc != 0 || value != want || version != (uint64_t)m.version)
        fail_at(c, "key %d (%s): loaded %s, value %" PRId64 " at version "
                "%" PRIu64 "; the model has %" PRId64 " at %" PRId64,
                key, kid, es_status_name(rc), value, version, want,
                m.version);
}

/* Every send, grouped by command id. */
static void collect(checker *c)
{
    run *w = c->w;
    size_t cap = (size_t)w->rounds * THREADS * (size_t)w->steps +
                 w->n_settle;
    c->all = calloc(cap + 1, sizeof *c->all);
    assert_non_null(c->all);
    c->n = 0;
    for (size_t i = 0; i < (size_t)w->rounds * THREADS * (size_t)w->steps;
         i++)
        if (w->recs[i].what != 0) c->all[c->n++] = &w->recs[i];
    for (size_t i = 0; i < w->n_settle; i++) c->all[c->n++] = &w->settle[i];
    qsort(c->all, c->n, sizeof *c->all, by_id);
}

/* Commands with no decision yet (their sends failed, were cut off or
 * lost their answer): sent once more, to a host without faults.  One
 * reported failed (not ES_EUNKNOWN) must not turn out to have
 * committed. */
static void settle(run *w)
{
    checker c = {w, NULL, 0, 0};
    collect(&c);
    w->settle = calloc(c.n + 1, sizeof *w->settle);
    assert_non_null(w->settle);
    uint64_t rng = w->seed;
    open_round_host(w, &rng);
    for (size_t from = 0, to; from < c.n; from = to) {
        for (to = from + 1;
             to < c.n && es_uuid_equal(&c.all[to]->id, &c.all[from]->id);
             to++)
            ;
        const send_rec *first = NULL;
        bool has_decision = false;
        for (size_t i = from; i < to; i++) {
            has_decision = has_decision || decided(c.all[i]);
            if (first == NULL && c.all[i]->accepted) first = c.all[i];
        }
        if (has_decision || first == NULL) continue;
        send_rec *r = &w->settle[w->n_settle++];
        r->key = first->key;
        r->id = first->id;
        r->kind = first->kind;
        r->value = first->value;
        r->round = w->rounds;
        r->step = (int)(w->n_settle - 1);
        r->what = 's';
        r->blocking = true;
        set_payload(r);
        send_one(w->host, r);
    }
    assert_int_equal(es_host_shutdown(w->host, NULL), 0);
    w->host = NULL;
    free(c.all);
}

static int check(run *w)
{
    checker c = {w, NULL, 0, 0};
    collect(&c);
    send_rec **by_key[KEYS];
    size_t n_key[KEYS] = {0};
    for (int k = 0; k < KEYS; k++) {
        by_key[k] = calloc(c.n + 1, sizeof *by_key[k]);
        assert_non_null(by_key[k]);
    }
    size_t ids = 0, decisions = 0, failures = 0, dups = 0;
    for (size_t from = 0, to; from < c.n; from = to) {
        for (to = from + 1;
             to < c.n && es_uuid_equal(&c.all[to]->id, &c.all[from]->id);
             to++)
            ;
        ids++;
        send_rec *truth = truth_of(&c, from, to);
        bool unknown = false;
        for (size_t i = from; i < to; i++)
            unknown = unknown || (c.all[i]->accepted &&
                                  c.all[i]->what != 's' &&
                                  c.all[i]->status == ES_EUNKNOWN);
        for (size_t i = from; i < to; i++) {
            const send_rec *r = c.all[i];
            if (r->accepted && !decided(r) && r->status != ES_EAPPLY &&
                r->status != ES_EIDEMPOTENCY)
                failures++;
            dups += decided(r) && r->dup;
            if (r->what == 's' && r->status != 0 &&
                r->status != ES_EREJECTED && r->status != ES_EAPPLY) {
                fail_at(&c, "a command sent again to a host without "
                        "faults did not settle:");
                print_send("send", r);
            }
            if (r->what == 's' && decided(r) && r->dup && !unknown) {
                fail_at(&c, "a command reported failed had committed:");
                for (size_t j = from; j < to; j++)
                    print_send("send", c.all[j]);
            }
        }
        if (truth == NULL) continue;
        decisions++;
        by_key[truth->key][n_key[truth->key]++] = truth;
    }
    for (int k = 0; k < KEYS; k++) {
        check_key(&c, k, by_key[k], n_key[k]);
        free(by_key[k]);
    }
    print_message("host model: seed %" PRIu64 ", %d rounds: %zu commands, "
                  "%zu sends, %zu decisions, %zu duplicate answers, %zu "
                  "failures, %zu settled at the end; %" PRIu64
                  " passivations, %" PRIu64 " loads, %" PRIu64
                  " conflicts\n",
                  w->seed, w->rounds, ids, c.n, decisions, dups, failures,
                  w->n_settle, w->passivations, w->loads, w->conflicts);
    free(c.all);
    return c.failures;
}

static int env_int(const char *name, int fallback, int lo, int hi)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') return fallback;
    long n = strtol(v, NULL, 10);
    return n < lo ? lo : n > hi ? hi : (int)n;
}

static void test_host_model_matches_reference(void **state)
{
    (void)state;
    run w;
    memset(&w, 0, sizeof w);
    const char *s = getenv("HOST_MODEL_SEED");
    if (s && *s) {
        w.seed = strtoull(s, NULL, 10);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        w.seed = (uint64_t)ts.tv_sec * 1000003u + (uint64_t)ts.tv_nsec;
    }
    w.rounds = env_int("HOST_MODEL_ROUNDS", 6, 1, 1000);
    w.steps = env_int("HOST_MODEL_STEPS", 150, 1, 100000);
    print_message("host model: seed %" PRIu64 " (HOST_MODEL_SEED=%" PRIu64
                  " runs it again)\n",
                  w.seed, w.seed);
    for (int k = 0; k < KEYS; k++) es_uuid_v7(&g_keys[k]);
    w.recs = calloc((size_t)w.rounds * THREADS * (size_t)w.steps,
                    sizeof *w.recs);
    assert_non_null(w.recs);
    assert_int_equal(es_memory_store_open(&w.store, NULL), 0);
    uint64_t rng = w.seed;
    for (w.round = 0; w.round < w.rounds; w.round++) run_round(&w, &rng);
    settle(&w);
    int failures = check(&w);
    assert_int_equal(es_store_close(w.store), 0);
    free(w.recs);
    free(w.settle);
    assert_int_equal(failures, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_host_model_matches_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
