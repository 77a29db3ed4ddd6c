/*
 * bank-server: the bank as an HTTP service on libevent's evhttp.
 *
 * Requests are parsed on the loop thread.  Commands go to the host with
 * es_host_send; the completion (on a host worker) hands the outcome back
 * to the loop thread through an event made active across threads
 * (libevent with pthreads), where the reply is written.  Reads (GET of an
 * account or a transfer, /healthz, /metrics) block on the store, so they
 * run on a small pool of reader threads and come back the same way.  The
 * loop never waits for the host or the database.
 *
 * A 2xx answer is sent only after the command's transaction committed, so
 * a read that starts after it sees the change.
 */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bank.h"
#include "eventastic/postgres.h"

#define MAX_BODY (64 * 1024)
/* What evhttp reads of a body at most.  Above MAX_BODY and up to this,
 * the handler answers 413 in JSON like every other error; libevent 2.1
 * has no hook for its own error pages, so beyond this it answers its own
 * 413 (HTML) before reading the body.  Bounds the memory of a request. */
#define MAX_BODY_READ (1024 * 1024)
#define MAX_HEADERS (16 * 1024)
/* The largest amount one request may move: 10^15 cents.  Larger values
 * are client mistakes (400); sums that would still overflow a balance are
 * rejected by the domain. */
#define MAX_AMOUNT 1000000000000000LL
#define READERS 4
#define READ_QUEUE_BOUND 4096

typedef struct server server;

/* ---- reader pool: blocking store reads off the loop thread ---- */

typedef enum job_kind {
    J_ACCOUNT,
    J_TRANSFER,
    J_HEALTH,
    J_METRICS,
} job_kind;

typedef struct job {
    struct job *next;
    server *srv;
    struct evhttp_request *req;
    struct event *done_ev;
    job_kind kind;
    es_uuid id;
    int code;                  /* HTTP status, set by the reader */
    struct evbuffer *body;     /* the answer, made by the reader */
    const char *content_type;
} job;

typedef struct readers {
    pthread_mutex_t lock; /* guards head, tail, n, closing */
    pthread_cond_t cond;
    job *head, *tail;
    size_t n;
    bool closing;
    pthread_t threads[READERS];
    int started;
} readers;

enum { N_CODES = 12 };
static const int counted_codes[N_CODES] = {200, 201, 202, 400, 404, 405,
                                           409, 413, 422, 500, 503, 0};

struct server {
    struct event_base *base;
    es_host *host;
    es_store *store;
    es_outbox *outbox;
    bool postgres;
    atomic_bool closing;
    readers rd;
    atomic_uint_fast64_t responses[N_CODES]; /* last: other codes */
};

typedef enum route {
    R_OPEN,
    R_DEPOSIT,
    R_WITHDRAW,
    R_TRANSFER,
} route;

/* One command in flight: filled by host workers, replied on the loop. */
typedef struct pending {
    server *srv;
    struct evhttp_request *req;
    struct event *done_ev;
    route route;
    es_uuid key;         /* the account, or the transfer */
    es_uuid transfer_to; /* transfers: the destination */
    es_uuid from;
    int64_t amount;
    int status;          /* of the last step */
    /* The answer's detail when a step meets an id stored as the other
     * aggregate type (ES_EWRONGTYPE), or NULL. */
    const char *wrong_type;
    bool duplicate;
    uint64_t version;
    int64_t balance;
    char reason[256];
} pending;

static void count_response(server *srv, int code)
{
    int i = 0;
    while (i < N_CODES - 1 && counted_codes[i] != code) i++;
    atomic_fetch_add(&srv->responses[i], 1);
}

static void reply_buf(server *srv, struct evhttp_request *req, int code,
                      struct evbuffer *buf, const char *content_type)
{
    if (buf != NULL && content_type != NULL)
        evhttp_add_header(evhttp_request_get_output_headers(req),
                          "Content-Type", content_type);
    count_response(srv, code);
    evhttp_send_reply(req, code, NULL, buf);
}

static void reply_json(server *srv, struct evhttp_request *req, int code,
                       json_t *body)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    struct evbuffer *buf = evbuffer_new();
    if (text != NULL && buf != NULL) evbuffer_add(buf, text, strlen(text));
    reply_buf(srv, req, code, buf, "application/json; charset=utf-8");
    if (buf) evbuffer_free(buf);
    free(text);
    json_decref(body);
}

static void reply_error(server *srv, struct evhttp_request *req, int code,
                        const char *error, const char *detail)
{
    json_t *o = json_pack("{s:s}", "error", error);
    if (o != NULL && detail != NULL && detail[0] != '\0') {
        json_t *d = json_string(detail);
        /* A detail that is not UTF-8 (it may quote the input) is left
         * out rather than sent broken. */
        if (d != NULL) json_object_set_new(o, "detail", d);
    }
    if (code == 503)
        evhttp_add_header(evhttp_request_get_output_headers(req),
                          "Retry-After", "1");
    reply_json(srv, req, code, o);
}

static void bad_request(server *srv, struct evhttp_request *req,
                        const char *detail)
{
    reply_error(srv, req, 400, "bad_request", detail);
}

static void not_found(server *srv, struct evhttp_request *req)
{
    reply_error(srv, req, 404, "not_found", NULL);
}

/* An id that names an aggregate of the other type: the account (or the
 * transfer) does not exist as such.  Permanent, so never a 503. */
static void wrong_type(server *srv, struct evhttp_request *req, route r,
                       const char *detail)
{
    if (r == R_OPEN) /* the id is taken, by a transfer */
        return reply_error(srv, req, 409, "already_exists", detail);
    reply_error(srv, req, 404, "not_found", detail);
}

static void overloaded(server *srv, struct evhttp_request *req)
{
    reply_error(srv, req, 503, "overloaded", NULL);
}

static json_t *uuid_json(const es_uuid *id)
{
    char text[ES_UUID_STRLEN + 1];
    return json_string(es_uuid_format(id, text));
}

/* The HTTP answer for a failed command of route r; wrong is the detail
 * for ES_EWRONGTYPE (NULL: none). */
/* A failure that may pass (busy, closing, the database away, the outcome
 * unknown): 503, and the client sends the same request again. */
static bool transient(int status)
{
    switch (status) {
    case ES_EBUSY:
    case ES_ECLOSED:
    case ES_ECONFLICT:
    case ES_ETIMEDOUT:
    case ES_EUNKNOWN:
    case ES_EDB:
    case ES_EIO:
    case ES_ENOMEM:
        return true;
    default:
        return false;
    }
}

static void reply_failure(server *srv, struct evhttp_request *req, route r,
                          int status, const char *reason, const char *wrong)
{
    if (status == ES_EREJECTED) {
        if (strcmp(reason, BANK_REJECT_NOT_FOUND) == 0)
            return not_found(srv, req);
        if (strcmp(reason, BANK_REJECT_INSUFFICIENT) == 0)
            return reply_error(srv, req, 422, "insufficient_funds", NULL);
        if (strcmp(reason, BANK_REJECT_OVERFLOW) == 0)
            return reply_error(srv, req, 422, "overflow",
                               "the balance would overflow");
        if (strcmp(reason, BANK_REJECT_EXISTS) == 0)
            return reply_error(srv, req, 409, "already_exists", NULL);
        return bad_request(srv, req, reason);
    }
    switch (status) {
    case ES_EIDEMPOTENCY:
        return reply_error(srv, req, 409, "idempotency_conflict", NULL);
    case ES_EINVAL:
        return bad_request(srv, req, reason);
    case ES_EWRONGTYPE:
        return wrong_type(srv, req, r, wrong);
    case ES_ENOTFOUND:
        return not_found(srv, req);
    default:
        if (transient(status)) return overloaded(srv, req);
        /* Not the client's mistake: the server's. */
        return reply_error(srv, req, 500, "internal", es_status_name(status));
    }
}

/* ---- commands ---- */

static void pending_free(pending *p)
{
    if (p == NULL) return;
    if (p->done_ev) event_free(p->done_ev);
    free(p);
}

/* Loop thread: the outcome is known. */
static void on_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pending *p = arg;
    server *srv = p->srv;
    if (p->status != 0) {
        reply_failure(srv, p->req, p->route, p->status, p->reason,
                      p->wrong_type);
        pending_free(p);
        return;
    }
    json_t *o;
    switch (p->route) {
    case R_TRANSFER:
        o = json_pack("{s:o,s:s}", "transfer_id", uuid_json(&p->key),
                      "status", "pending");
        reply_json(srv, p->req, 202, o);
        break;
    case R_OPEN:
    case R_DEPOSIT:
    case R_WITHDRAW:
        o = json_pack("{s:o,s:I,s:I}", "account_id", uuid_json(&p->key),
                      "balance", (json_int_t)p->balance, "version",
                      (json_int_t)p->version);
        reply_json(srv, p->req, p->route == R_OPEN ? 201 : 200, o);
        break;
    }
    pending_free(p);
}

static void finish(pending *p, const es_host_result *r)
{
    p->status = r->status;
    p->duplicate = r->duplicate;
    p->version = r->version;
    snprintf(p->reason, sizeof p->reason, "%s", r->reason);
    event_active(p->done_ev, 0, 0);
}

static int send_cmd(server *srv, const es_aggregate_type *type,
                    const es_uuid *key, const es_uuid *command_id,
                    const bank_command *cmd, es_host_done_fn done, void *ud,
                    es_error *err)
{
    es_buf buf = {0};
    if (bank_command_encode(cmd, &buf) != 0) {
        es_buf_free(&buf);
        return ES_ENOMEM;
    }
    es_command c = {*command_id, (int32_t)cmd->kind, buf.data, buf.len};
    int rc = es_host_send(srv->host, type, key, &c, done, ud, err);
    es_buf_free(&buf);
    return rc;
}

/* Host worker: an account command finished.  A replay carries the
 * original events, so it answers with the original balance. */
static void account_done(void *ud, const es_host_result *r)
{
    pending *p = ud;
    if (r->status == 0 && r->n_events > 0) {
        bank_account_event e;
        es_error err = {0};
        if (es_event_decode(&bank_account_type, &r->events[r->n_events - 1],
                            &e, &err) == 0)
            p->balance = e.balance;
    }
    finish(p, r);
}

static const char transfer_id_is_account[] =
    "transfer_id names an account, not a transfer; the debit is refunded";

/* Host worker: recording the transfer finished.  The debit committed
 * before, and its side effect settles the transfer whatever is answered
 * here: it records the transfer (again), credits, or refunds.  So a
 * client told 404 gets its money back, and one told 503 may resend the
 * same request and gets the answer of the recorded transfer. */
static void initiate_done(void *ud, const es_host_result *r)
{
    pending *p = ud;
    if (r->status == ES_EWRONGTYPE) /* the transfer_id names an account */
        p->wrong_type = transfer_id_is_account;
    finish(p, r);
}

/* Host worker: the debit of a transfer finished; record the transfer. */
static void debit_done(void *ud, const es_host_result *r)
{
    pending *p = ud;
    if (r->status != 0) {
        finish(p, r);
        return;
    }
    bank_command c;
    memset(&c, 0, sizeof c);
    c.kind = BANK_CMD_INITIATE;
    c.other = p->from;
    c.transfer_id = p->transfer_to;
    c.amount = p->amount;
    es_uuid cid = bank_derive_id(&p->key, "initiate");
    es_error err = {0};
    int rc = send_cmd(p->srv, &bank_transfer_type, &p->key, &cid, &c,
                      initiate_done, p, &err);
    if (rc != 0) {
        /* Not recorded, so not 202: the transfer could not be read.  The
         * debit's side effect settles it all the same (see
         * initiate_done). */
        es_host_result failed = *r;
        failed.status = rc;
        failed.reason = err.message;
        if (rc == ES_EWRONGTYPE) p->wrong_type = transfer_id_is_account;
        finish(p, &failed);
    }
}

/* ---- request parsing ---- */

/* The body as a JSON object, or NULL with detail filled. */
static json_t *read_body(struct evhttp_request *req, char *detail,
                         size_t cap)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len == 0) {
        snprintf(detail, cap, "the body must be a JSON object");
        return NULL;
    }
    if (len > MAX_BODY) { /* handle answers 413 before this */
        snprintf(detail, cap, "the body is over 64 KiB");
        return NULL;
    }
    const char *data = (const char *)evbuffer_pullup(in, (ssize_t)len);
    json_error_t jerr;
    json_t *o = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (o == NULL) {
        snprintf(detail, cap, "malformed JSON at line %d, column %d",
                 jerr.line, jerr.column);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        snprintf(detail, cap, "the body must be a JSON object");
        return NULL;
    }
    return o;
}

/* Field readers: true, or false with detail saying what is wrong. */
static bool get_uuid_field(json_t *o, const char *name, es_uuid *out,
                           char *detail, size_t cap)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL) {
        snprintf(detail, cap, "%s is missing", name);
        return false;
    }
    if (!json_is_string(v) || es_uuid_parse(json_string_value(v), out) != 0) {
        snprintf(detail, cap, "%s must be a UUID string", name);
        return false;
    }
    /* The nil id names no aggregate and no command: the library refuses
     * it, and a saga step keyed by it could never run. */
    if (es_uuid_is_nil(out)) {
        snprintf(detail, cap, "%s must not be the nil UUID", name);
        return false;
    }
    return true;
}

static bool get_amount(json_t *o, const char *name, int64_t *out, bool zero,
                       char *detail, size_t cap)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL) {
        snprintf(detail, cap, "%s is missing", name);
        return false;
    }
    if (!json_is_integer(v)) {
        snprintf(detail, cap, "%s must be an integer (cents)", name);
        return false;
    }
    json_int_t n = json_integer_value(v);
    if (n < 0 || (n == 0 && !zero)) {
        snprintf(detail, cap, "%s must be %s", name,
                 zero ? "zero or more" : "positive");
        return false;
    }
    if (n > MAX_AMOUNT) {
        snprintf(detail, cap, "%s is too large (at most %lld)", name,
                 (long long)MAX_AMOUNT);
        return false;
    }
    *out = (int64_t)n;
    return true;
}

static bool get_text(json_t *o, const char *name, char out[BANK_NAME_MAX],
                     char *detail, size_t cap)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL) {
        snprintf(detail, cap, "%s is missing", name);
        return false;
    }
    if (!json_is_string(v)) {
        snprintf(detail, cap, "%s must be a string", name);
        return false;
    }
    size_t n = json_string_length(v);
    if (n == 0 || n >= BANK_NAME_MAX || memchr(json_string_value(v), 0, n)) {
        snprintf(detail, cap, "%s must have 1 to %d bytes and no NUL", name,
                 BANK_NAME_MAX - 1);
        return false;
    }
    memcpy(out, json_string_value(v), n + 1);
    return true;
}

static pending *pending_new(server *srv, struct evhttp_request *req, route r)
{
    pending *p = calloc(1, sizeof *p);
    if (p == NULL) return NULL;
    p->srv = srv;
    p->req = req;
    p->route = r;
    p->done_ev = event_new(srv->base, -1, 0, on_done, p);
    if (p->done_ev == NULL) {
        free(p);
        return NULL;
    }
    return p;
}

static void submit(server *srv, pending *p, const es_aggregate_type *type,
                   const es_uuid *key, const es_uuid *cid,
                   const bank_command *c, es_host_done_fn done)
{
    es_error err = {0};
    int rc = send_cmd(srv, type, key, cid, c, done, p, &err);
    if (rc != 0) {
        reply_failure(srv, p->req, p->route, rc, err.message, p->wrong_type);
        pending_free(p);
    }
}

/* POST routes.  account is the path's account id for R_DEPOSIT and
 * R_WITHDRAW. */
static void handle_post(server *srv, struct evhttp_request *req, route r,
                        const es_uuid *account)
{
    char detail[160];
    json_t *body = read_body(req, detail, sizeof detail);
    if (body == NULL) return bad_request(srv, req, detail);
    bank_command c;
    memset(&c, 0, sizeof c);
    es_uuid cid, key, from, to;
    bool ok = false;
    switch (r) {
    case R_OPEN:
        c.kind = BANK_CMD_OPEN;
        ok = get_uuid_field(body, "command_id", &cid, detail, sizeof detail) &&
             get_text(body, "owner", c.owner, detail, sizeof detail) &&
             get_text(body, "email", c.email, detail, sizeof detail) &&
             get_amount(body, "initial_balance", &c.amount, true, detail,
                        sizeof detail);
        if (ok && json_object_get(body, "account_id") != NULL)
            ok = get_uuid_field(body, "account_id", &key, detail,
                                sizeof detail);
        else if (ok)
            key = bank_derive_id(&cid, "account");
        break;
    case R_DEPOSIT:
    case R_WITHDRAW:
        c.kind = r == R_DEPOSIT ? BANK_CMD_DEPOSIT : BANK_CMD_WITHDRAW;
        key = *account;
        ok = get_uuid_field(body, "command_id", &cid, detail, sizeof detail) &&
             get_amount(body, "amount", &c.amount, false, detail,
                        sizeof detail);
        break;
    case R_TRANSFER:
        c.kind = BANK_CMD_DEBIT;
        ok = get_uuid_field(body, "transfer_id", &key, detail,
                            sizeof detail) &&
             get_uuid_field(body, "from", &from, detail, sizeof detail) &&
             get_uuid_field(body, "to", &to, detail, sizeof detail) &&
             get_amount(body, "amount", &c.amount, false, detail,
                        sizeof detail);
        if (ok && es_uuid_equal(&from, &to)) {
            snprintf(detail, sizeof detail, "from and to must differ");
            ok = false;
        }
        /* One id cannot name an account and the transfer at once. */
        if (ok && (es_uuid_equal(&key, &from) || es_uuid_equal(&key, &to))) {
            snprintf(detail, sizeof detail,
                     "transfer_id must differ from from and to");
            ok = false;
        }
        break;
    }
    json_decref(body);
    if (!ok) return bad_request(srv, req, detail);
    pending *p = pending_new(srv, req, r);
    if (p == NULL) return overloaded(srv, req);
    p->key = key;
    /* A command to an account that is a transfer is answered as one to
     * an account that does not exist: the same command may have been
     * answered so before the id became a transfer, and a resent command
     * answers what it answered the first time. */
    p->wrong_type = r == R_OPEN ? "account_id names a transfer" : NULL;
    if (r != R_TRANSFER)
        return submit(srv, p, &bank_account_type, &key, &cid, &c,
                      account_done);
    /* The debit's content names the destination and the amount, and its
     * command id is derived from the transfer id: the same transfer id
     * with another body is an idempotency conflict. */
    p->from = from;
    p->transfer_to = to;
    p->amount = c.amount;
    c.transfer_id = key;
    c.other = to;
    cid = bank_derive_id(&key, "debit");
    submit(srv, p, &bank_account_type, &from, &cid, &c, debit_done);
}

/* ---- reads, on the reader pool ---- */

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
    reply_buf(j->srv, j->req, j->code, j->body, j->content_type);
    job_free(j);
}

static void job_json(job *j, int code, json_t *o)
{
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    j->code = code;
    j->content_type = "application/json; charset=utf-8";
    if (text) evbuffer_add(j->body, text, strlen(text));
    free(text);
    json_decref(o);
}

static void job_error(job *j, int code, const char *error,
                      const char *detail)
{
    json_t *o = json_pack("{s:s}", "error", error);
    if (o != NULL && detail != NULL)
        json_object_set_new(o, "detail", json_string(detail));
    job_json(j, code, o);
}

static bool store_reachable(int rc)
{
    return rc == 0 || rc == ES_ENOTFOUND || rc == ES_EWRONGTYPE;
}

static void run_load(job *j)
{
    es_context *ctx = NULL;
    es_error err = {0};
    bool account = j->kind == J_ACCOUNT;
    int rc = es_store_load(j->srv->store,
                           account ? &bank_account_type : &bank_transfer_type,
                           &j->id, &ctx, &err);
    switch (rc) {
    case 0:
        break;
    case ES_ENOTFOUND:
        return job_error(j, 404, "not_found", NULL);
    case ES_EWRONGTYPE: /* the account (transfer) does not exist as such */
        return job_error(j, 404, "not_found",
                         account ? "the id names a transfer, not an account"
                                 : "the id names an account, not a transfer");
    case ES_EINVAL:
        return job_error(j, 400, "bad_request", err.message);
    default:
        if (transient(rc)) return job_error(j, 503, "overloaded", NULL);
        /* stored data the server cannot read: retrying won't help */
        return job_error(j, 500, "internal", es_status_name(rc));
    }
    json_t *o;
    if (account) {
        const bank_account *a = es_context_state(ctx);
        o = json_pack("{s:o,s:I,s:I}", "account_id", uuid_json(&j->id),
                      "balance", (json_int_t)a->balance, "version",
                      (json_int_t)es_context_version(ctx));
    } else {
        const bank_transfer *t = es_context_state(ctx);
        static const char *names[] = {"pending", "completed", "refunded"};
        o = json_pack("{s:o,s:o,s:o,s:I,s:s}", "transfer_id",
                      uuid_json(&j->id), "from", uuid_json(&t->from), "to",
                      uuid_json(&t->to), "amount", (json_int_t)t->amount,
                      "status", names[t->status]);
    }
    es_context_free(ctx);
    job_json(j, 200, o);
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
        return job_json(j, 200, json_pack("{s:s,s:s}", "status", "ok",
                                          "store", store));
    job_json(j, 503, json_pack("{s:s,s:s,s:s}", "status", "unavailable",
                               "store", store, "detail",
                               es_status_name(rc)));
}

static void metric(struct evbuffer *b, const char *name, const char *type,
                   const char *help, double v)
{
    evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name,
                        help, name, type, name, v);
}

static void latency(struct evbuffer *b, const char *stage,
                    const es_host_latency *l)
{
    evbuffer_add_printf(b,
                        "eventastic_host_latency_seconds{stage=\"%s\","
                        "quantile=\"0.5\"} %g\n"
                        "eventastic_host_latency_seconds{stage=\"%s\","
                        "quantile=\"0.99\"} %g\n"
                        "eventastic_host_latency_seconds{stage=\"%s\","
                        "quantile=\"0.999\"} %g\n"
                        "eventastic_host_latency_seconds_count{stage=\"%s\"}"
                        " %llu\n",
                        stage, l->p50_us / 1e6, stage, l->p99_us / 1e6, stage,
                        l->p999_us / 1e6, stage,
                        (unsigned long long)l->count);
}

static void run_metrics(job *j)
{
    server *srv = j->srv;
    struct evbuffer *b = j->body;
    es_host_metrics m;
    memset(&m, 0, sizeof m);
    if (es_host_metrics_get(srv->host, &m) == 0) {
#define C(f, help)                                                           \
    metric(b, "eventastic_host_" #f "_total", "counter", help, (double)m.f)
#define G(f, help) metric(b, "eventastic_host_" #f, "gauge", help, (double)m.f)
        C(accepted, "Commands accepted by es_host_send.");
        C(completed, "Command completions called.");
        C(rejected, "Commands rejected by decide or apply.");
        C(duplicate, "Commands answered from an earlier command id.");
        C(conflicts, "Command commits that conflicted.");
        C(busy, "Sends answered ES_EBUSY.");
        G(resident, "Aggregates in memory.");
        C(loads, "Aggregates loaded from the store.");
        C(passivations, "Aggregates passivated.");
        G(mailbox_depth, "Commands accepted, not yet decided.");
        C(batches, "Commit transactions.");
        C(snapshots, "Snapshots written.");
#undef C
#undef G
        evbuffer_add_printf(b, "# HELP eventastic_host_latency_seconds "
                               "Host latency by stage.\n"
                               "# TYPE eventastic_host_latency_seconds "
                               "summary\n");
        latency(b, "queue_wait", &m.queue_wait);
        latency(b, "load", &m.load);
        latency(b, "decide", &m.decide);
        latency(b, "commit_wait", &m.commit_wait);
        latency(b, "total", &m.total);
    }
    es_outbox_metrics om;
    memset(&om, 0, sizeof om);
    es_outbox_metrics_get(srv->outbox, &om);
    metric(b, "eventastic_outbox_deliveries_total", "counter",
           "Outbox handler calls.", (double)om.deliveries);
    metric(b, "eventastic_outbox_done_total", "counter",
           "Outbox deliveries that succeeded.", (double)om.done);
    metric(b, "eventastic_outbox_retries_total", "counter",
           "Outbox deliveries to retry.", (double)om.retries);
    metric(b, "eventastic_outbox_dead_letters_total", "counter",
           "Messages this dispatcher made dead letters.",
           (double)om.dead_letters);
    metric(b, "eventastic_outbox_rounds_total", "counter",
           "Outbox claim rounds.", (double)om.rounds);
    es_outbox_stats st;
    memset(&st, 0, sizeof st);
    es_error err = {0};
    int up = es_outbox_stats_get(srv->store, 0, &st, &err) == 0;
    metric(b, "eventastic_store_up", "gauge",
           "1 when the store answered the outbox statistics.", up);
    if (up) {
        metric(b, "eventastic_outbox_pending", "gauge",
               "Outbox messages waiting.", (double)st.pending);
        metric(b, "eventastic_outbox_dead", "gauge", "Dead letters.",
               (double)st.dead);
        metric(b, "eventastic_outbox_done", "gauge",
               "Delivered messages not purged.", (double)st.done);
        metric(b, "eventastic_outbox_oldest_pending_seconds", "gauge",
               "Age of the oldest pending message.",
               (double)st.oldest_pending_age_ms / 1e3);
    }
    evbuffer_add_printf(b, "# HELP bank_http_responses_total HTTP answers "
                           "by status code.\n"
                           "# TYPE bank_http_responses_total counter\n");
    for (int i = 0; i < N_CODES; i++) {
        unsigned long long n = atomic_load(&srv->responses[i]);
        if (counted_codes[i] != 0)
            evbuffer_add_printf(b, "bank_http_responses_total{code=\"%d\"} "
                                   "%llu\n", counted_codes[i], n);
        else
            evbuffer_add_printf(b, "bank_http_responses_total{code="
                                   "\"other\"} %llu\n", n);
    }
    j->code = 200;
    j->content_type = "text/plain; version=0.0.4; charset=utf-8";
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
            run_metrics(j);
            break;
        }
        event_active(j->done_ev, 0, 0);
    }
}

static int readers_start(readers *rd)
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
static void readers_stop(readers *rd)
{
    pthread_mutex_lock(&rd->lock);
    rd->closing = true;
    pthread_cond_broadcast(&rd->cond);
    pthread_mutex_unlock(&rd->lock);
    for (int i = 0; i < rd->started; i++) pthread_join(rd->threads[i], NULL);
    pthread_mutex_destroy(&rd->lock);
    pthread_cond_destroy(&rd->cond);
}

static void read_submit(server *srv, struct evhttp_request *req,
                        job_kind kind, const es_uuid *id)
{
    job *j = calloc(1, sizeof *j);
    if (j == NULL) return overloaded(srv, req);
    j->srv = srv;
    j->req = req;
    j->kind = kind;
    if (id) j->id = *id;
    j->done_ev = event_new(srv->base, -1, 0, on_job_done, j);
    j->body = evbuffer_new();
    if (j->done_ev == NULL || j->body == NULL) {
        job_free(j);
        return overloaded(srv, req);
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
        overloaded(srv, req);
    }
}

/* ---- routing ---- */

static void method_not_allowed(server *srv, struct evhttp_request *req,
                               const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
                      allow);
    reply_error(srv, req, 405, "method_not_allowed", NULL);
}

/* The path's id segment: a UUID, or a 400. */
static bool path_id(server *srv, struct evhttp_request *req,
                    const char *text, size_t len, es_uuid *out)
{
    char buf[ES_UUID_STRLEN + 1];
    if (len != ES_UUID_STRLEN) goto bad;
    memcpy(buf, text, len);
    buf[len] = '\0';
    if (es_uuid_parse(buf, out) != 0) goto bad;
    if (es_uuid_is_nil(out)) {
        bad_request(srv, req, "the id in the path must not be the nil UUID");
        return false;
    }
    return true;
bad:
    bad_request(srv, req, "the id in the path must be a UUID");
    return false;
}

static void handle(struct evhttp_request *req, void *arg)
{
    server *srv = arg;
    const char *uri = evhttp_request_get_uri(req);
    struct evhttp_uri *parsed = evhttp_uri_parse(uri);
    const char *path = parsed ? evhttp_uri_get_path(parsed) : NULL;
    enum evhttp_cmd_type m = evhttp_request_get_command(req);
    bool get = m == EVHTTP_REQ_GET, post = m == EVHTTP_REQ_POST;
    es_uuid id;
    if (evbuffer_get_length(evhttp_request_get_input_buffer(req)) >
        MAX_BODY) {
        reply_error(srv, req, 413, "payload_too_large",
                    "the body is over 64 KiB");
    } else if (path == NULL) {
        bad_request(srv, req, "bad request URI");
    } else if (atomic_load(&srv->closing)) {
        overloaded(srv, req);
    } else if (strcmp(path, "/healthz") == 0) {
        if (get) read_submit(srv, req, J_HEALTH, NULL);
        else method_not_allowed(srv, req, "GET");
    } else if (strcmp(path, "/metrics") == 0) {
        if (get) read_submit(srv, req, J_METRICS, NULL);
        else method_not_allowed(srv, req, "GET");
    } else if (strcmp(path, "/accounts") == 0) {
        if (post) handle_post(srv, req, R_OPEN, NULL);
        else method_not_allowed(srv, req, "POST");
    } else if (strcmp(path, "/transfers") == 0) {
        if (post) handle_post(srv, req, R_TRANSFER, NULL);
        else method_not_allowed(srv, req, "POST");
    } else if (strncmp(path, "/transfers/", 11) == 0 &&
               strchr(path + 11, '/') == NULL) {
        if (!get) method_not_allowed(srv, req, "GET");
        else if (path_id(srv, req, path + 11, strlen(path + 11), &id))
            read_submit(srv, req, J_TRANSFER, &id);
    } else if (strncmp(path, "/accounts/", 10) == 0) {
        const char *rest = path + 10;
        const char *slash = strchr(rest, '/');
        size_t idlen = slash ? (size_t)(slash - rest) : strlen(rest);
        const char *sub = slash ? slash + 1 : NULL;
        if (sub == NULL) {
            if (!get) method_not_allowed(srv, req, "GET");
            else if (path_id(srv, req, rest, idlen, &id))
                read_submit(srv, req, J_ACCOUNT, &id);
        } else if (strcmp(sub, "deposits") == 0 ||
                   strcmp(sub, "withdrawals") == 0) {
            if (!post) method_not_allowed(srv, req, "POST");
            else if (path_id(srv, req, rest, idlen, &id))
                handle_post(srv, req,
                            sub[0] == 'd' ? R_DEPOSIT : R_WITHDRAW, &id);
        } else {
            not_found(srv, req);
        }
    } else {
        not_found(srv, req);
    }
    if (parsed) evhttp_uri_free(parsed);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    server *srv = arg;
    atomic_store(&srv->closing, true);
    event_base_loopbreak(srv->base);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bank-server [--listen HOST:PORT] [--db CONNINFO] "
            "[--workers N] [--lanes N] [--migrate]\n");
}

int main(int argc, char **argv)
{
    const char *listen = "127.0.0.1:8080";
    const char *db = getenv("DATABASE_URL");
    unsigned workers = 2, lanes = 0; /* 0: the host's default */
    bool migrate = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--listen") == 0 && v) listen = argv[++i];
        else if (strcmp(a, "--db") == 0 && v) db = argv[++i];
        else if (strcmp(a, "--workers") == 0 && v) workers = (unsigned)atoi(argv[++i]);
        else if (strcmp(a, "--lanes") == 0 && v) lanes = (unsigned)atoi(argv[++i]);
        else if (strcmp(a, "--migrate") == 0) migrate = true;
        else {
            usage();
            return 2;
        }
    }
    if (lanes > 64) {
        fprintf(stderr, "bank-server: --lanes takes 0 (the host's default) "
                        "to 64\n");
        return 2;
    }
    char host_part[256];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || (size_t)(colon - listen) >= sizeof host_part ||
        workers == 0) {
        usage();
        return 2;
    }
    memcpy(host_part, listen, (size_t)(colon - listen));
    host_part[colon - listen] = '\0';
    int port = atoi(colon + 1);

    signal(SIGPIPE, SIG_IGN);
    evthread_use_pthreads();
    es_error err = {0};
    server srv = {0};
    int rc;
    if (db != NULL && db[0] != '\0') {
        es_pg_config *pcfg = NULL;
        rc = es_pg_config_new(&pcfg, &err);
        if (rc == 0) rc = es_pg_config_set_conninfo(pcfg, db, &err);
        if (rc == 0 && migrate) rc = es_pg_migrate(pcfg, NULL, &err);
        if (rc == 0) rc = es_pg_store_open(pcfg, &srv.store, &err);
        es_pg_config_free(pcfg);
        if (rc == 0) fprintf(stderr, "bank-server: PostgreSQL store\n");
        srv.postgres = true;
    } else {
        rc = es_memory_store_open(&srv.store, &err);
        if (rc == 0)
            fprintf(stderr, "bank-server: no --db and no DATABASE_URL: "
                            "using the in-memory store (nothing is kept)\n");
    }
    if (rc != 0) {
        fprintf(stderr, "bank-server: store: %s: %s\n", es_status_name(rc),
                err.message);
        return 1;
    }
    es_host_config *hcfg = NULL;
    rc = es_host_config_new(&hcfg, &err);
    if (rc == 0) rc = es_host_config_set_workers(hcfg, workers);
    if (rc == 0) rc = es_host_config_set_lanes(hcfg, lanes);
    if (rc == 0) rc = bank_register(hcfg, &err);
    if (rc == 0) rc = es_host_open(hcfg, srv.store, &srv.host, &err);
    es_host_config_free(hcfg);
    es_outbox_config *ocfg = NULL;
    es_outbox *outbox = NULL;
    if (rc == 0 && readers_start(&srv.rd) != 0) {
        rc = ES_ENOMEM;
        snprintf(err.message, sizeof err.message, "cannot start readers");
    }
    if (rc == 0) rc = es_outbox_config_new(srv.store, &ocfg, &err);
    /* Transfers settle through the outbox: each credit is a few host
     * calls waiting for commits, so deliver many at once, and poll often
     * (a claim round that finds nothing is one cheap query). */
    if (rc == 0) rc = es_outbox_config_set_concurrency(ocfg, 8, &err);
    if (rc == 0) rc = es_outbox_config_set_batch_size(ocfg, 256, &err);
    if (rc == 0) rc = es_outbox_config_set_poll_ms(ocfg, 100, &err);
    if (rc == 0)
        rc = es_outbox_config_add_handler(ocfg, &bank_account_type,
                                          ES_OUTBOX_ANY_KIND,
                                          bank_effect_handler, srv.host,
                                          &err);
    if (rc == 0) rc = es_outbox_open(ocfg, true, &outbox, &err);
    es_outbox_config_free(ocfg);
    srv.outbox = outbox;
    if (rc != 0) {
        fprintf(stderr, "bank-server: %s: %s\n", es_status_name(rc),
                err.message);
        readers_stop(&srv.rd);
        es_outbox_close(outbox);
        es_host_close(srv.host);
        es_store_close(srv.store);
        return 1;
    }

    srv.base = event_base_new();
    struct evhttp *http = srv.base ? evhttp_new(srv.base) : NULL;
    struct evhttp_bound_socket *sock =
        http ? evhttp_bind_socket_with_handle(http, host_part,
                                              (ev_uint16_t)port)
             : NULL;
    if (sock == NULL) {
        fprintf(stderr, "bank-server: cannot listen on %s: %s\n", listen,
                strerror(errno));
        readers_stop(&srv.rd);
        es_outbox_close(outbox);
        es_host_close(srv.host);
        es_store_close(srv.store);
        return 1;
    }
    evhttp_set_max_body_size(http, MAX_BODY_READ);
    /* Bounded (promise 7): headers beyond this are refused, not read. */
    evhttp_set_max_headers_size(http, MAX_HEADERS);
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
                                         EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                         EVHTTP_REQ_PATCH | EVHTTP_REQ_HEAD |
                                         EVHTTP_REQ_OPTIONS |
                                         EVHTTP_REQ_TRACE |
                                         EVHTTP_REQ_CONNECT);
    evhttp_set_gencb(http, handle, &srv);
    struct event *sigint = evsignal_new(srv.base, SIGINT, on_signal,
                                        &srv);
    struct event *sigterm = evsignal_new(srv.base, SIGTERM, on_signal,
                                         &srv);
    event_add(sigint, NULL);
    event_add(sigterm, NULL);
    fprintf(stderr, "bank-server: listening on %s\n", listen);
    fflush(stderr);
    event_base_dispatch(srv.base);

    /* Drain: no new connections, new requests on open ones get 503;
     * deliveries stop (their handlers use the host); every accepted
     * command and read completes, and its reply is written out. */
    fprintf(stderr, "bank-server: shutting down\n");
    atomic_store(&srv.closing, true);
    evhttp_del_accept_socket(http, sock);
    /* Reads use the host (metrics), the outbox and the store: they finish
     * first.  es_host_shutdown frees the host. */
    readers_stop(&srv.rd);
    es_outbox_close(outbox);
    rc = es_host_shutdown(srv.host, &err);
    srv.host = NULL;
    struct timeval flush = {0, 300000};
    event_base_loopexit(srv.base, &flush);
    event_base_dispatch(srv.base);
    event_free(sigint);
    event_free(sigterm);
    evhttp_free(http);
    event_base_free(srv.base);
    es_store_close(srv.store);
    if (rc != 0) {
        fprintf(stderr, "bank-server: shutdown: %s: %s\n",
                es_status_name(rc), err.message);
        return 1;
    }
    return 0;
}
