/* bank-server: the reader pool, blocking store reads off the loop thread. */
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

/* The answer to a load of j->id that failed with rc. */
static void load_failed(job *j, int rc, const es_error *err, bool account)
{
    switch (rc) {
    case ES_ENOTFOUND:
        return srv_job_error(j, 404, "not_found", NULL);
    case ES_EWRONGTYPE: /* the account (transfer) does not exist as such */
        return srv_job_error(j, 404, "not_found",
                             account
                                 ? "the id names a transfer, not an account"
                                 : "the id names an account, not a transfer");
    case ES_EINVAL:
        return srv_job_error(j, 400, "bad_request", err->message);
    default:
        if (srv_transient(rc))
            return srv_job_error(j, 503, "overloaded", NULL);
        /* stored data the server cannot read: retrying won't help */
        return srv_job_error(j, 500, "internal", es_status_name(rc));
    }
}

bool srv_account_exists(job *j)
{
    es_context *ctx = NULL;
    es_error err = {0};
    int rc = es_store_load(j->srv->store, &bank_account_type, &j->id, &ctx,
                           &err);
    es_context_free(ctx);
    if (rc == 0) return true;
    load_failed(j, rc, &err, true);
    return false;
}

static void run_load(job *j)
{
    es_context *ctx = NULL;
    es_error err = {0};
    bool account = j->kind == J_ACCOUNT;
    int rc = es_store_load(j->srv->store,
                           account ? &bank_account_type : &bank_transfer_type,
                           &j->id, &ctx, &err);
    if (rc != 0) return load_failed(j, rc, &err, account);
    json_t *o;
    if (account) {
        const bank_account *a = es_context_state(ctx);
        o = json_pack("{s:o,s:I,s:I}", "account_id",
                      srv_uuid_json(&j->id), "balance",
                      (json_int_t)a->balance, "version",
                      (json_int_t)es_context_version(ctx));
    } else {
        const bank_transfer *t = es_context_state(ctx);
        static const char *names[] = {"pending", "completed", "refunded"};
        o = json_pack("{s:o,s:o,s:o,s:I,s:s}", "transfer_id",
                      srv_uuid_json(&j->id), "from",
                      srv_uuid_json(&t->from), "to", srv_uuid_json(&t->to),
                      "amount", (json_int_t)t->amount, "status",
                      names[t->status]);
    }
    es_context_free(ctx);
    srv_job_json(j, 200, o);
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
        case J_TRANSFER:
            run_load(j);
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

