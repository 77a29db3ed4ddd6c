/*
 * bank-server: the read model behind GET /stats and GET
 * /accounts/{id}/statement, kept by the projection "bank.views".
 *
 * apply() decodes each event into a change (the deltas of the totals and,
 * for an account's event, a movement of its statement) and gathers them;
 * flush(), at the end of each batch, writes them all at once:
 *   - on PostgreSQL (server_views_pg.c), exactly once: in the batch's
 *     transaction, which also saves the checkpoint, as one INSERT ...
 *     SELECT FROM unnest(...) into bank_statement and one UPDATE of
 *     bank_stats;
 *   - on the memory store, at least once: into a model in memory (the
 *     totals, and per account its last STATEMENT_MAX movements).
 *
 * Both models also keep the position of the last event they counted
 * (bank_views_position; views.applied), and flush skips the changes at or
 * before it.  That makes a batch handed over again harmless: in memory
 * after an at-least-once checkpoint that failed to save, and on
 * PostgreSQL when two bank-servers run on one database, each with its
 * own "bank.views" (the row lock on bank_views_position orders their
 * flushes; the second skips what the first counted).
 *
 * Gathered changes belong to the batch in hand: flush drops them,
 * whatever it returns, and apply drops them when it sees an event that
 * is not after the last one gathered (the batch failed before its flush
 * and is being handed over again).
 *
 * Threads: apply, flush and reset run on the projection's thread; the
 * routes on reader threads.  v->lock guards the memory model; it is taken
 * alone, never while calling the store.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eventastic/subscription.h"
#include "server_views.h"

#define VIEWS_NAME "bank.views"

/* The memory model's account: its last movements, a ring that grows up
 * to STATEMENT_MAX (it moves its start only once full). */
typedef struct account {
    struct account *next;
    es_uuid id;
    movement *ring;
    unsigned cap, n, start;
} account;

struct views {
    server *srv;
    es_projection *proj;
    bool postgres;
    /* the projection thread's own: the batch's gathered changes */
    change *pending;
    size_t n_pending, cap_pending;
    /* the memory model; lock guards everything below it */
    pthread_mutex_t lock;
    account **buckets;
    size_t n_buckets, n_accounts;
    int64_t accounts, total_balance, events;
    es_position applied;
};

const char *const srv_mv_names[6] = {"opened",      "deposit",
                                     "withdrawal",  "transfer_out",
                                     "transfer_in", "refund"};

bool srv_mv_transfer(mv_kind kind)
{
    return kind == MV_TRANSFER_OUT || kind == MV_TRANSFER_IN ||
           kind == MV_REFUND;
}

int srv_views_fail(es_error *err, int code, const char *fmt, ...)
{
    if (err != NULL) {
        memset(err, 0, sizeof *err);
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* ---- apply: events into changes ---- */

static int gather(views *v, const change *c, es_error *err)
{
    if (v->n_pending == v->cap_pending) {
        size_t cap = v->cap_pending ? v->cap_pending * 2 : 512;
        change *p = realloc(v->pending, cap * sizeof *p);
        if (p == NULL) return srv_views_fail(err, ES_ENOMEM, "out of memory");
        v->pending = p;
        v->cap_pending = cap;
    }
    v->pending[v->n_pending++] = *c;
    return 0;
}

/* The movement and the balance's delta of an account's event. */
static void movement_of(const bank_account_event *e, movement *m,
                        int64_t *delta)
{
    m->amount = e->amount;
    m->balance = e->balance;
    switch (e->kind) {
    case BANK_OPENED:
        m->kind = MV_OPENED;
        *delta = e->amount;
        return;
    case BANK_DEPOSITED:
        m->kind = MV_DEPOSIT;
        *delta = e->amount;
        return;
    case BANK_WITHDRAWN:
        m->kind = MV_WITHDRAWAL;
        *delta = -e->amount;
        return;
    case BANK_TRANSFER_DEBITED:
        m->kind = MV_TRANSFER_OUT;
        *delta = -e->amount;
        break;
    case BANK_TRANSFER_CREDITED:
        m->kind = MV_TRANSFER_IN;
        *delta = e->amount;
        break;
    case BANK_TRANSFER_REFUNDED:
        m->kind = MV_REFUND;
        *delta = e->amount;
        break;
    }
    m->transfer_id = e->transfer_id;
    m->other = e->other;
}

static int views_apply(void *ud, es_txn *txn, const es_recorded_event *ev,
                       es_error *err)
{
    views *v = ud;
    (void)txn; /* written by flush */
    if (v->n_pending > 0 &&
        es_position_compare(&ev->position,
                            &v->pending[v->n_pending - 1].pos) <= 0)
        v->n_pending = 0; /* the batch is handed over again */
    change c;
    memset(&c, 0, sizeof c);
    c.pos = ev->position;
    if (strcmp(ev->type_name, bank_account_type.name) == 0) {
        c.account = ev->aggregate_id;
        /* A forgotten account still existed: it counts, its money is
         * unknown. */
        if (ev->event.kind == BANK_OPENED) c.accounts = 1;
        if (!ev->forgotten) {
            bank_account_event e;
            int rc = es_event_decode(&bank_account_type, &ev->event, &e, err);
            if (rc != 0) {
                if (err != NULL) err->code = rc;
                return rc;
            }
            movement_of(&e, &c.m, &c.balance);
            es_event_value_free(&bank_account_type, &e);
            c.m.version = ev->event.version;
            c.m.at_ms = ev->created_ms;
            c.row = true;
        }
    }
    return gather(v, &c, err);
}

/* ---- the memory model ---- */

static size_t uuid_hash(const es_uuid *id)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (int i = 0; i < 16; i++) {
        h ^= id->bytes[i];
        h *= 1099511628211ULL;
    }
    return (size_t)h;
}

/* Lock held.  The account of id, made when missing; NULL: no memory. */
static account *account_get(views *v, const es_uuid *id, bool make)
{
    if (v->n_buckets > 0) {
        account *a = v->buckets[uuid_hash(id) & (v->n_buckets - 1)];
        for (; a != NULL; a = a->next)
            if (memcmp(a->id.bytes, id->bytes, 16) == 0) return a;
    }
    if (!make) return NULL;
    if (v->n_accounts >= v->n_buckets) { /* load factor 1: double */
        size_t nb = v->n_buckets ? v->n_buckets * 2 : 256;
        account **b = calloc(nb, sizeof *b);
        if (b == NULL) return NULL;
        for (size_t i = 0; i < v->n_buckets; i++) {
            account *a = v->buckets[i];
            while (a != NULL) {
                account *next = a->next;
                size_t k = uuid_hash(&a->id) & (nb - 1);
                a->next = b[k];
                b[k] = a;
                a = next;
            }
        }
        free(v->buckets);
        v->buckets = b;
        v->n_buckets = nb;
    }
    account *a = calloc(1, sizeof *a);
    if (a == NULL) return NULL;
    a->id = *id;
    size_t k = uuid_hash(id) & (v->n_buckets - 1);
    a->next = v->buckets[k];
    v->buckets[k] = a;
    v->n_accounts++;
    return a;
}

/* Lock held.  Append a movement, dropping the oldest beyond
 * STATEMENT_MAX.  ES_ENOMEM, nothing changed. */
static int account_push(account *a, const movement *m)
{
    if (a->n == a->cap && a->cap < STATEMENT_MAX) {
        /* start is 0 until the ring is full at STATEMENT_MAX */
        unsigned cap = a->cap ? a->cap * 2 : 4;
        if (cap > STATEMENT_MAX) cap = STATEMENT_MAX;
        movement *r = realloc(a->ring, cap * sizeof *r);
        if (r == NULL) return ES_ENOMEM;
        a->ring = r;
        a->cap = cap;
    }
    if (a->n < a->cap) {
        a->ring[(a->start + a->n++) % a->cap] = *m;
    } else {
        a->ring[a->start] = *m;
        a->start = (a->start + 1) % a->cap;
    }
    return 0;
}

static void model_clear(views *v)
{
    for (size_t i = 0; i < v->n_buckets; i++) {
        account *a = v->buckets[i];
        while (a != NULL) {
            account *next = a->next;
            free(a->ring);
            free(a);
            a = next;
        }
    }
    free(v->buckets);
    v->buckets = NULL;
    v->n_buckets = v->n_accounts = 0;
    v->accounts = v->total_balance = v->events = 0;
    memset(&v->applied, 0, sizeof v->applied);
}

static int memory_flush(views *v, es_error *err)
{
    int rc = 0;
    pthread_mutex_lock(&v->lock);
    for (size_t i = 0; i < v->n_pending; i++) {
        const change *c = &v->pending[i];
        if (es_position_compare(&c->pos, &v->applied) <= 0) continue;
        if (c->row) {
            account *a = account_get(v, &c->account, true);
            if (a == NULL || account_push(a, &c->m) != 0) {
                /* what came before counts; the batch comes again */
                rc = srv_views_fail(err, ES_ENOMEM, "out of memory");
                break;
            }
        }
        v->accounts += c->accounts;
        v->total_balance += c->balance;
        v->events++;
        v->applied = c->pos;
    }
    pthread_mutex_unlock(&v->lock);
    return rc;
}

/* ---- the handler's flush and reset ---- */

static int views_flush(void *ud, es_txn *txn, es_error *err)
{
    views *v = ud;
    int rc = v->postgres
                 ? srv_pg_views_flush(txn, v->pending, v->n_pending, err)
                 : memory_flush(v, err);
    v->n_pending = 0; /* counted, or the batch comes again */
    return rc;
}

static int views_reset(void *ud, es_txn *txn, es_error *err)
{
    views *v = ud;
    v->n_pending = 0;
    if (!v->postgres) {
        pthread_mutex_lock(&v->lock);
        model_clear(v);
        pthread_mutex_unlock(&v->lock);
        return 0;
    }
    return srv_pg_views_reset(txn, err);
}

/* ---- start and stop ---- */

int srv_views_start(server *srv, es_error *err)
{
    views *v = calloc(1, sizeof *v);
    if (v == NULL) return srv_views_fail(err, ES_ENOMEM, "out of memory");
    v->srv = srv;
    v->postgres = srv->postgres;
    pthread_mutex_init(&v->lock, NULL);
    int rc = v->postgres ? srv_pg_views_create(srv->store, err) : 0;
    es_projection_config *cfg = NULL;
    if (rc == 0) rc = es_projection_config_new(&cfg, err);
    if (rc == 0) rc = es_projection_config_set_name(cfg, VIEWS_NAME, err);
    if (rc == 0)
        rc = es_projection_config_set_handler(cfg, views_apply, views_reset,
                                              v, err);
    if (rc == 0)
        rc = es_projection_config_set_flush(cfg, views_flush, err);
    if (rc == 0)
        rc = es_projection_config_set_mode(
            cfg,
            v->postgres ? ES_PROJECTION_EXACTLY_ONCE
                        : ES_PROJECTION_AT_LEAST_ONCE,
            err);
    /* Never give up: a database away for a while must not stop the
     * totals for good.  Failures show in /metrics. */
    if (rc == 0) rc = es_projection_config_set_retry(cfg, 100, 2000, 0, err);
    if (rc == 0) rc = es_projection_start(srv->store, cfg, &v->proj, err);
    es_projection_config_free(cfg);
    if (rc != 0) {
        pthread_mutex_destroy(&v->lock);
        free(v);
        return rc;
    }
    srv->views = v;
    return 0;
}

void srv_views_stop(views *v)
{
    if (v == NULL) return;
    es_projection_stop(v->proj);
    model_clear(v);
    free(v->pending);
    pthread_mutex_destroy(&v->lock);
    free(v);
}

/* ---- the routes, on reader threads ---- */

void srv_run_stats(job *j)
{
    views *v = j->srv->views;
    int64_t n[3];
    if (!v->postgres) {
        pthread_mutex_lock(&v->lock);
        n[0] = v->accounts;
        n[1] = v->total_balance;
        n[2] = v->events;
        pthread_mutex_unlock(&v->lock);
    } else if (srv_pg_stats(j, n) != 0) {
        return;
    }
    srv_job_json(j, 200, json_pack("{s:I,s:I,s:I}", "accounts",
                                   (json_int_t)n[0], "total_balance",
                                   (json_int_t)n[1], "events",
                                   (json_int_t)n[2]));
}

/* RFC 3339, UTC, milliseconds. */
static json_t *time_json(int64_t ms)
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    char text[40];
    if (gmtime_r(&s, &tm) == NULL) return json_null();
    size_t n = strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(text + n, sizeof text - n, ".%03dZ", (int)(ms % 1000));
    return json_string(text);
}

static json_t *movement_json(const movement *m)
{
    json_t *o = json_pack("{s:s,s:I,s:I,s:I,s:o}", "kind",
                          srv_mv_names[m->kind], "amount",
                          (json_int_t)m->amount, "balance",
                          (json_int_t)m->balance, "version",
                          (json_int_t)m->version, "at", time_json(m->at_ms));
    if (o != NULL && srv_mv_transfer(m->kind)) {
        json_object_set_new(o, "transfer_id", srv_uuid_json(&m->transfer_id));
        json_object_set_new(o, "other", srv_uuid_json(&m->other));
    }
    return o;
}

/* The movements of j->id, newest first, up to j->limit, into *out. */
static int memory_statement(job *j, movement *out, int *n)
{
    views *v = j->srv->views;
    *n = 0;
    pthread_mutex_lock(&v->lock);
    account *a = account_get(v, &j->id, false);
    for (unsigned i = 0; a != NULL && i < a->n && *n < j->limit; i++)
        out[(*n)++] = a->ring[(a->start + a->n - 1 - i) % a->cap];
    pthread_mutex_unlock(&v->lock);
    return 0;
}

void srv_run_statement(job *j)
{
    /* Existence from the account itself, not from the read model, which
     * may lag: a just-opened account has a statement (maybe empty). */
    if (!srv_account_exists(j)) return;
    movement ms[STATEMENT_MAX];
    int n = 0;
    if (j->limit < 1 || j->limit > STATEMENT_MAX) j->limit = STATEMENT_MAX;
    int rc = j->srv->views->postgres ? srv_pg_statement(j, ms, &n)
                                     : memory_statement(j, ms, &n);
    if (rc != 0) return;
    json_t *list = json_array();
    for (int i = 0; list != NULL && i < n; i++)
        json_array_append_new(list, movement_json(&ms[i]));
    srv_job_json(j, 200, json_pack("{s:o,s:o*}", "account_id",
                                   srv_uuid_json(&j->id), "movements",
                                   list));
}

/* ---- /metrics ---- */

static const char *const state_names[] = {"starting", "catching_up", "live",
                                          "retrying", "failed", "stopped"};

void srv_views_metrics(views *v, struct evbuffer *b)
{
    es_projection_stats st;
    memset(&st, 0, sizeof st);
    if (v == NULL || es_projection_stats_get(v->proj, &st) != 0) return;
    const char *l = "{projection=\"" VIEWS_NAME "\"}";
    evbuffer_add_printf(
        b,
        "# HELP eventastic_projection_lag_events Events readable after the "
        "projection's checkpoint.\n"
        "# TYPE eventastic_projection_lag_events gauge\n"
        "eventastic_projection_lag_events%s %llu\n"
        "# HELP eventastic_projection_lag_seconds Age of the oldest event "
        "not yet applied.\n"
        "# TYPE eventastic_projection_lag_seconds gauge\n"
        "eventastic_projection_lag_seconds%s %g\n"
        "# HELP eventastic_projection_applied_total Events applied since "
        "start.\n"
        "# TYPE eventastic_projection_applied_total counter\n"
        "eventastic_projection_applied_total%s %llu\n"
        "# HELP eventastic_projection_failures_total Failed batch attempts "
        "since start.\n"
        "# TYPE eventastic_projection_failures_total counter\n"
        "eventastic_projection_failures_total%s %llu\n"
        "# HELP eventastic_projection_state What the projection is doing "
        "(1: the current state).\n"
        "# TYPE eventastic_projection_state gauge\n",
        l, (unsigned long long)st.lag_events, l, (double)st.lag_ms / 1e3, l,
        (unsigned long long)st.applied, l, (unsigned long long)st.failures);
    for (size_t i = 0; i < sizeof state_names / sizeof state_names[0]; i++)
        evbuffer_add_printf(b,
                            "eventastic_projection_state{projection=\""
                            VIEWS_NAME "\",state=\"%s\"} %d\n",
                            state_names[i], (size_t)st.state == i);
}
