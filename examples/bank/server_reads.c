/* bank-server: reads.  GET of an account or a transfer is a query to the
 * host; the reader pool runs the blocking ones (health, metrics, the read
 * model's) off the loop thread. */
#include <stdlib.h>
#include <string.h>

#include "server.h"

static void job_free(job *j)
{
    if (j == NULL) return;
    if (j->done_ev) event_free(j->done_ev);
    if (j->body) evbuffer_free(j->body);
    free(j);
}

/* Loop thread: a read is answered. */
static void on_job_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    job *j = arg;
    if (j->code == 503)
        evhttp_add_header(evhttp_request_get_output_headers(j->req),
                          "Retry-After", "1");
    srv_reply_buf(j->srv, j->req, j->code, j->body, j->content_type);
    job_free(j);
}

void srv_job_json(job *j, int code, json_t *o)
{
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    j->code = code;
    j->content_type = "application/json; charset=utf-8";
    if (text) evbuffer_add(j->body, text, strlen(text));
    free(text);
    json_decref(o);
}

void srv_job_error(job *j, int code, const char *error,
                   const char *detail)
{
    json_t *o = json_pack("{s:s}", "error", error);
    if (o != NULL && detail != NULL)
        json_object_set_new(o, "detail", json_string(detail));
    srv_job_json(j, code, o);
}

static bool store_reachable(int rc)
{
    return rc == 0 || rc == ES_ENOTFOUND || rc == ES_EWRONGTYPE;
}

/* GET of an account or a transfer: a query at the aggregate's mailbox
 * (es_host_query), so a read after a command's answer sees its effect
 * and a resident aggregate is answered without the store.  The query
 * copies the state on a host worker; its completion hands the answer
 * back to the loop thread with an event, as commands' completions do
 * (server_commands.c). */
typedef struct aggregate_read {
    server *srv;
    struct evhttp_request *req;
    struct event *done_ev;
    bool account;
    es_uuid id;
    int status;      /* the query's, set by its completion */
    uint64_t version;
    union {
        bank_account account;
        bank_transfer transfer;
    } state;         /* copied by the query function */
    char reason[256];
} aggregate_read;

/* Host worker: copy what the answer needs; state is borrowed. */
static int copy_state(void *ud, const void *state, uint64_t version)
{
    aggregate_read *r = ud;
    if (r->account) r->state.account = *(const bank_account *)state;
    else r->state.transfer = *(const bank_transfer *)state;
    r->version = version;
    return 0;
}

/* Loop thread: the answer of a read, as it was from es_store_load: 404
 * for an unknown id or one of the other type, 400 for a bad one, 503
 * (Retry-After) for a transient failure, else 500. */
static void reply_read(server *srv, struct evhttp_request *req, bool account,
                       int status, const char *reason)
{
    switch (status) {
    case ES_ENOTFOUND:
        return srv_reply_error(srv, req, 404, "not_found", NULL);
    case ES_EWRONGTYPE: /* the account (transfer) does not exist as such */
        return srv_reply_error(
            srv, req, 404, "not_found",
            account ? "the id names a transfer, not an account"
                    : "the id names an account, not a transfer");
    case ES_EINVAL:
        return srv_reply_error(srv, req, 400, "bad_request", reason);
    default:
        if (srv_transient(status))
            return srv_reply_error(srv, req, 503, "overloaded", NULL);
        /* stored data the server cannot read: retrying won't help */
        return srv_reply_error(srv, req, 500, "internal",
                               es_status_name(status));
    }
}

static void read_free(aggregate_read *r)
{
    if (r == NULL) return;
    if (r->done_ev) event_free(r->done_ev);
    free(r);
}

/* Loop thread: the query completed. */
static void on_read_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    aggregate_read *r = arg;
    if (r->status != 0) {
        reply_read(r->srv, r->req, r->account, r->status, r->reason);
        return read_free(r);
    }
    json_t *o;
    if (r->account) {
        o = json_pack("{s:o,s:I,s:I}", "account_id", srv_uuid_json(&r->id),
                      "balance", (json_int_t)r->state.account.balance,
                      "version", (json_int_t)r->version);
    } else {
        const bank_transfer *t = &r->state.transfer;
        static const char *names[] = {"pending", "completed", "refunded"};
        o = json_pack("{s:o,s:o,s:o,s:I,s:s}", "transfer_id",
                      srv_uuid_json(&r->id), "from", srv_uuid_json(&t->from),
                      "to", srv_uuid_json(&t->to), "amount",
                      (json_int_t)t->amount, "status", names[t->status]);
    }
    srv_reply_json(r->srv, r->req, 200, o);
    read_free(r);
}

/* Host worker (or the thread ending the host, ES_ECLOSED): to the loop. */
static void read_done(void *ud, const es_query_result *res)
{
    aggregate_read *r = ud;
    r->status = res->status;
    snprintf(r->reason, sizeof r->reason, "%s", res->reason);
    event_active(r->done_ev, 0, 0);
}

/* Loop thread. */
static void query_submit(server *srv, struct evhttp_request *req,
                         bool account, const es_uuid *id)
{
    aggregate_read *r = calloc(1, sizeof *r);
    if (r == NULL) return srv_overloaded(srv, req);
    r->srv = srv;
    r->req = req;
    r->account = account;
    r->id = *id;
    r->done_ev = event_new(srv->base, -1, 0, on_read_done, r);
    if (r->done_ev == NULL) {
        read_free(r);
        return srv_overloaded(srv, req);
    }
    es_error err = {0};
    int rc = es_host_query(srv->host,
                           account ? &bank_account_type : &bank_transfer_type,
                           id, copy_state, r, read_done, r, &err);
    if (rc != 0) { /* never completed: answer here */
        reply_read(srv, req, account, rc, err.message);
        read_free(r);
    }
}

/* Host worker: the account exists; nothing to copy. */
static int exists(void *ud, const void *state, uint64_t version)
{
    (void)ud;
    (void)state;
    (void)version;
    return 0;
}

/* Reader thread: the query GET /accounts/{id} makes, waited for. */
bool srv_account_exists(job *j)
{
    es_error err = {0};
    int rc = es_host_query_call(j->srv->host, &bank_account_type, &j->id,
                                exists, NULL, &err);
    switch (rc) {
    case 0:
        return true;
    case ES_ENOTFOUND:
        srv_job_error(j, 404, "not_found", NULL);
        return false;
    case ES_EWRONGTYPE: /* the id names a transfer */
        srv_job_error(j, 404, "not_found",
                      "the id names a transfer, not an account");
        return false;
    case ES_EINVAL:
        srv_job_error(j, 400, "bad_request", err.message);
        return false;
    default:
        if (srv_transient(rc))
            srv_job_error(j, 503, "overloaded", NULL);
        else /* stored data the server cannot read */
            srv_job_error(j, 500, "internal", es_status_name(rc));
        return false;
    }
}

/* Reachable when a read of an aggregate answers from the store.  The
 * probe id is fixed, not nil (the library refuses a nil id before any
 * store is asked); a client may have used it, for an account or for a
 * transfer: any definite answer shows the store reachable. */
static void run_health(job *j)
{
    static const es_uuid probe = {{0xe5, 0x7a, 0x57, 0x1c, 0x4e, 0x41, 0x4c,
                                   0x7f, 0x8b, 0x00, 0x5e, 0xa1, 0x74, 0x68,
                                   0x00, 0x01}};
    es_context *ctx = NULL;
    es_error err = {0};
    int rc = es_store_load(j->srv->store, &bank_account_type, &probe, &ctx,
                           &err);
    es_context_free(ctx);
    const char *store = j->srv->postgres ? "postgresql" : "memory";
    if (store_reachable(rc))
        return srv_job_json(j, 200, json_pack("{s:s,s:s}", "status", "ok",
                                          "store", store));
    srv_job_json(j, 503, json_pack("{s:s,s:s,s:s}", "status", "unavailable",
                               "store", store, "detail",
                               es_status_name(rc)));
}

static void *reader_main(void *arg)
{
    readers *rd = arg;
    for (;;) {
        pthread_mutex_lock(&rd->lock);
        while (rd->head == NULL && !rd->closing)
            pthread_cond_wait(&rd->cond, &rd->lock);
        job *j = rd->head;
        if (j == NULL) { /* closing and drained */
            pthread_mutex_unlock(&rd->lock);
            return NULL;
        }
        rd->head = j->next;
        if (rd->head == NULL) rd->tail = NULL;
        rd->n--;
        pthread_mutex_unlock(&rd->lock);
        switch (j->kind) {
        case J_ACCOUNT:
        case J_TRANSFER: /* queries: never queued (srv_read_submit) */
            break;
        case J_HEALTH:
            run_health(j);
            break;
        case J_METRICS:
            srv_run_metrics(j);
            break;
        case J_STATS:
            srv_run_stats(j);
            break;
        case J_STATEMENT:
            srv_run_statement(j);
            break;
        }
        event_active(j->done_ev, 0, 0);
    }
}

int srv_readers_start(readers *rd)
{
    memset(rd, 0, sizeof *rd);
    pthread_mutex_init(&rd->lock, NULL);
    pthread_cond_init(&rd->cond, NULL);
    for (; rd->started < READERS; rd->started++)
        if (pthread_create(&rd->threads[rd->started], NULL, reader_main,
                           rd) != 0)
            return -1;
    return 0;
}

/* Every queued read runs; then the threads end. */
void srv_readers_stop(readers *rd)
{
    pthread_mutex_lock(&rd->lock);
    rd->closing = true;
    pthread_cond_broadcast(&rd->cond);
    pthread_mutex_unlock(&rd->lock);
    for (int i = 0; i < rd->started; i++) pthread_join(rd->threads[i], NULL);
    pthread_mutex_destroy(&rd->lock);
    pthread_cond_destroy(&rd->cond);
}

void srv_read_submit(server *srv, struct evhttp_request *req,
                     job_kind kind, const es_uuid *id, int limit)
{
    if (kind == J_ACCOUNT || kind == J_TRANSFER)
        return query_submit(srv, req, kind == J_ACCOUNT, id);
    job *j = calloc(1, sizeof *j);
    if (j == NULL) return srv_overloaded(srv, req);
    j->srv = srv;
    j->req = req;
    j->kind = kind;
    if (id) j->id = *id;
    j->limit = limit;
    j->done_ev = event_new(srv->base, -1, 0, on_job_done, j);
    j->body = evbuffer_new();
    if (j->done_ev == NULL || j->body == NULL) {
        job_free(j);
        return srv_overloaded(srv, req);
    }
    readers *rd = &srv->rd;
    pthread_mutex_lock(&rd->lock);
    bool full = rd->n >= READ_QUEUE_BOUND || rd->closing;
    if (!full) {
        if (rd->tail) rd->tail->next = j;
        else rd->head = j;
        rd->tail = j;
        rd->n++;
        pthread_cond_signal(&rd->cond);
    }
    pthread_mutex_unlock(&rd->lock);
    if (full) {
        job_free(j);
        srv_overloaded(srv, req);
    }
}

