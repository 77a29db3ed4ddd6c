/*
 * bank-server: the bank as an HTTP service on libevent's evhttp.
 *
 * Requests are parsed on the loop thread and sent to the host with
 * es_host_send; the completion (on a host worker) hands the outcome back
 * to the loop thread through an event made active across threads
 * (libevent with pthreads), where the reply is written.  The loop never
 * waits for the host.
 */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bank.h"
#include "eventastic/postgres.h"

#define MAX_BODY (64 * 1024)

typedef struct server {
    struct event_base *base;
    es_host *host;
    es_store *store;
} server;

typedef enum route {
    R_OPEN,
    R_DEPOSIT,
    R_WITHDRAW,
    R_TRANSFER,
} route;

/* One request in flight: filled by host workers, replied on the loop. */
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
    bool duplicate;
    uint64_t version;
    int64_t balance;
    char reason[256];
} pending;

static void reply_json(struct evhttp_request *req, int code, json_t *body)
{
    char *text = json_dumps(body, JSON_COMPACT);
    struct evbuffer *buf = evbuffer_new();
    if (text != NULL && buf != NULL) {
        evbuffer_add(buf, text, strlen(text));
        evhttp_add_header(evhttp_request_get_output_headers(req),
                          "Content-Type", "application/json");
    }
    evhttp_send_reply(req, code, NULL, buf);
    if (buf) evbuffer_free(buf);
    free(text);
    json_decref(body);
}

static void reply_error(struct evhttp_request *req, int code,
                        const char *error, const char *detail)
{
    json_t *o = json_pack("{s:s}", "error", error);
    if (detail != NULL && detail[0] != '\0')
        json_object_set_new(o, "detail", json_string(detail));
    if (code == 503)
        evhttp_add_header(evhttp_request_get_output_headers(req),
                          "Retry-After", "1");
    reply_json(req, code, o);
}

static json_t *uuid_json(const es_uuid *id)
{
    char text[ES_UUID_STRLEN + 1];
    return json_string(es_uuid_format(id, text));
}

/* The HTTP answer for a failed command. */
static void reply_failure(struct evhttp_request *req, int status,
                          const char *reason)
{
    if (status == ES_EREJECTED) {
        if (strcmp(reason, BANK_REJECT_NOT_FOUND) == 0)
            return reply_error(req, 404, "not_found", NULL);
        if (strcmp(reason, BANK_REJECT_INSUFFICIENT) == 0)
            return reply_error(req, 422, "insufficient_funds", NULL);
        if (strcmp(reason, BANK_REJECT_OVERFLOW) == 0)
            return reply_error(req, 422, "overflow", NULL);
        if (strcmp(reason, BANK_REJECT_EXISTS) == 0)
            return reply_error(req, 409, "already_exists", NULL);
        return reply_error(req, 400, "invalid", reason);
    }
    switch (status) {
    case ES_EIDEMPOTENCY:
        return reply_error(req, 409, "idempotency_conflict",
                           "this id was used with other content");
    case ES_EBUSY:
    case ES_ECLOSED:
    case ES_ECONFLICT:
    case ES_ETIMEDOUT:
    case ES_EUNKNOWN:
    case ES_EDB:
        return reply_error(req, 503, "unavailable", es_status_name(status));
    default:
        return reply_error(req, 500, "internal", es_status_name(status));
    }
}

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
    if (p->status != 0) {
        reply_failure(p->req, p->status, p->reason);
        pending_free(p);
        return;
    }
    json_t *o;
    switch (p->route) {
    case R_TRANSFER:
        o = json_pack("{s:o,s:s}", "transfer_id", uuid_json(&p->key),
                      "status", "pending");
        reply_json(p->req, 202, o);
        break;
    case R_OPEN:
    case R_DEPOSIT:
    case R_WITHDRAW:
        o = json_pack("{s:o,s:I,s:I}", "account_id", uuid_json(&p->key),
                      "balance", (json_int_t)p->balance, "version",
                      (json_int_t)p->version);
        reply_json(p->req, p->route == R_OPEN ? 201 : 200, o);
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

/* Host worker: an account command finished. */
static void account_done(void *ud, const es_host_result *r)
{
    pending *p = ud;
    if (r->status == 0 && r->n_events > 0) {
        bank_account_event e;
        es_error err = {0};
        if (es_event_decode(&bank_account_type, &r->events[r->n_events - 1],
                            &e, &err) == 0)
            p->balance = e.balance;
    } else if (r->status == 0 && p->route != R_TRANSFER) {
        p->balance = 0; /* no event: cannot happen for these commands */
    }
    finish(p, r);
}

static void initiate_done(void *ud, const es_host_result *r)
{
    /* The debit committed: the transfer is pending even if recording its
     * status failed (the outbox handler records it again). */
    pending *p = ud;
    es_host_result ok = *r;
    ok.status = 0;
    finish(p, &ok);
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
    if (send_cmd(p->srv, &bank_transfer_type, &p->key, &cid, &c,
                 initiate_done, p, &err) != 0) {
        es_host_result ok = *r;
        finish(p, &ok); /* debit committed: 202 all the same */
    }
}

/* ---- request parsing ---- */

static json_t *read_body(struct evhttp_request *req)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len == 0 || len > MAX_BODY) return NULL;
    const char *data = (const char *)evbuffer_pullup(in, (ssize_t)len);
    json_error_t jerr;
    json_t *o = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (o != NULL && !json_is_object(o)) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static bool get_uuid_field(json_t *o, const char *name, es_uuid *out)
{
    json_t *v = json_object_get(o, name);
    return json_is_string(v) && es_uuid_parse(json_string_value(v), out) == 0;
}

static bool get_amount(json_t *o, const char *name, int64_t *out, bool zero)
{
    json_t *v = json_object_get(o, name);
    if (!json_is_integer(v)) return false;
    json_int_t n = json_integer_value(v);
    if (n < 0 || (n == 0 && !zero)) return false;
    *out = (int64_t)n;
    return true;
}

static bool get_text(json_t *o, const char *name, char out[BANK_NAME_MAX])
{
    json_t *v = json_object_get(o, name);
    if (!json_is_string(v)) return false;
    size_t n = json_string_length(v);
    if (n == 0 || n >= BANK_NAME_MAX || memchr(json_string_value(v), 0, n))
        return false;
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
                   const es_uuid *cid, const bank_command *c,
                   es_host_done_fn done)
{
    es_error err = {0};
    int rc = send_cmd(srv, type, &p->key, cid, c, done, p, &err);
    if (rc != 0) {
        reply_failure(p->req, rc, err.message);
        pending_free(p);
    }
}

static void handle_post(server *srv, struct evhttp_request *req,
                        const char *path)
{
    json_t *body = read_body(req);
    if (body == NULL)
        return reply_error(req, 400, "invalid", "body must be a JSON object");
    bank_command c;
    memset(&c, 0, sizeof c);
    es_uuid cid;
    pending *p = NULL;
    char id_text[ES_UUID_STRLEN + 1];
    char sub[32];

    if (strcmp(path, "/accounts") == 0) {
        c.kind = BANK_CMD_OPEN;
        if (!get_uuid_field(body, "command_id", &cid) ||
            !get_text(body, "owner", c.owner) ||
            !get_text(body, "email", c.email) ||
            !get_amount(body, "initial_balance", &c.amount, true))
            goto invalid;
        p = pending_new(srv, req, R_OPEN);
        if (p == NULL) goto oom;
        if (json_object_get(body, "account_id") != NULL) {
            if (!get_uuid_field(body, "account_id", &p->key)) goto invalid;
        } else {
            p->key = bank_derive_id(&cid, "account");
        }
        json_decref(body);
        return submit(srv, p, &bank_account_type, &cid, &c, account_done);
    }
    if (sscanf(path, "/accounts/%36[0-9a-fA-F-]/%31s", id_text, sub) == 2) {
        route r;
        if (strcmp(sub, "deposits") == 0) {
            r = R_DEPOSIT;
            c.kind = BANK_CMD_DEPOSIT;
        } else if (strcmp(sub, "withdrawals") == 0) {
            r = R_WITHDRAW;
            c.kind = BANK_CMD_WITHDRAW;
        } else {
            json_decref(body);
            return reply_error(req, 404, "not_found", "no such route");
        }
        es_uuid key;
        if (es_uuid_parse(id_text, &key) != 0 ||
            !get_uuid_field(body, "command_id", &cid) ||
            !get_amount(body, "amount", &c.amount, false))
            goto invalid;
        p = pending_new(srv, req, r);
        if (p == NULL) goto oom;
        p->key = key;
        json_decref(body);
        return submit(srv, p, &bank_account_type, &cid, &c, account_done);
    }
    if (strcmp(path, "/transfers") == 0) {
        es_uuid tid, from, to;
        c.kind = BANK_CMD_DEBIT;
        if (!get_uuid_field(body, "transfer_id", &tid) ||
            !get_uuid_field(body, "from", &from) ||
            !get_uuid_field(body, "to", &to) ||
            !get_amount(body, "amount", &c.amount, false) ||
            es_uuid_equal(&from, &to))
            goto invalid;
        p = pending_new(srv, req, R_TRANSFER);
        if (p == NULL) goto oom;
        p->key = tid;
        p->from = from;
        p->transfer_to = to;
        p->amount = c.amount;
        c.transfer_id = tid;
        c.other = to;
        cid = bank_derive_id(&tid, "debit");
        json_decref(body);
        es_error err = {0};
        int rc = send_cmd(srv, &bank_account_type, &from, &cid, &c,
                          debit_done, p, &err);
        if (rc != 0) {
            reply_failure(req, rc, err.message);
            pending_free(p);
        }
        return;
    }
    json_decref(body);
    return reply_error(req, 404, "not_found", "no such route");
invalid:
    pending_free(p);
    json_decref(body);
    return reply_error(req, 400, "invalid", "missing or malformed field");
oom:
    json_decref(body);
    return reply_error(req, 503, "unavailable", "out of memory");
}

static void handle_get(server *srv, struct evhttp_request *req,
                       const char *path)
{
    char id_text[ES_UUID_STRLEN + 2];
    es_uuid id;
    bool account = sscanf(path, "/accounts/%37s", id_text) == 1;
    bool transfer = !account && sscanf(path, "/transfers/%37s", id_text) == 1;
    if ((!account && !transfer) || es_uuid_parse(id_text, &id) != 0)
        return reply_error(req, 404, "not_found", NULL);
    es_context *ctx = NULL;
    es_error err = {0};
    int rc = es_store_load(srv->store,
                           account ? &bank_account_type : &bank_transfer_type,
                           &id, &ctx, &err);
    if (rc == ES_ENOTFOUND) return reply_error(req, 404, "not_found", NULL);
    if (rc != 0) return reply_failure(req, rc, err.message);
    json_t *o;
    if (account) {
        const bank_account *a = es_context_state(ctx);
        o = json_pack("{s:o,s:I,s:I,s:s}", "account_id", uuid_json(&id),
                      "balance", (json_int_t)a->balance, "version",
                      (json_int_t)es_context_version(ctx), "owner", a->owner);
    } else {
        const bank_transfer *t = es_context_state(ctx);
        static const char *names[] = {"pending", "completed", "refunded"};
        o = json_pack("{s:o,s:o,s:o,s:I,s:s}", "transfer_id", uuid_json(&id),
                      "from", uuid_json(&t->from), "to", uuid_json(&t->to),
                      "amount", (json_int_t)t->amount, "status",
                      names[t->status]);
    }
    es_context_free(ctx);
    reply_json(req, 200, o);
}

static void handle(struct evhttp_request *req, void *arg)
{
    server *srv = arg;
    const char *uri = evhttp_request_get_uri(req);
    struct evhttp_uri *parsed = evhttp_uri_parse(uri);
    const char *path = parsed ? evhttp_uri_get_path(parsed) : NULL;
    if (path == NULL) {
        reply_error(req, 400, "invalid", "bad request URI");
    } else if (evhttp_request_get_command(req) == EVHTTP_REQ_POST) {
        handle_post(srv, req, path);
    } else if (evhttp_request_get_command(req) == EVHTTP_REQ_GET) {
        if (strcmp(path, "/health") == 0)
            reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
        else
            handle_get(srv, req, path);
    } else {
        reply_error(req, 405, "method_not_allowed", NULL);
    }
    if (parsed) evhttp_uri_free(parsed);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    event_base_loopbreak(arg);
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
    unsigned workers = 2, lanes = 2;
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
    (void)lanes; /* group-commit lanes: with the PostgreSQL committer */
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
    if (rc == 0) rc = bank_register(hcfg, &err);
    if (rc == 0) rc = es_host_open(hcfg, srv.store, &srv.host, &err);
    es_host_config_free(hcfg);
    es_outbox_config *ocfg = NULL;
    es_outbox *outbox = NULL;
    if (rc == 0) rc = es_outbox_config_new(srv.store, &ocfg, &err);
    if (rc == 0)
        rc = es_outbox_config_add_handler(ocfg, &bank_account_type,
                                          ES_OUTBOX_ANY_KIND,
                                          bank_effect_handler, srv.host,
                                          &err);
    if (rc == 0) rc = es_outbox_open(ocfg, true, &outbox, &err);
    es_outbox_config_free(ocfg);
    if (rc != 0) {
        fprintf(stderr, "bank-server: %s: %s\n", es_status_name(rc),
                err.message);
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
        es_outbox_close(outbox);
        es_host_close(srv.host);
        es_store_close(srv.store);
        return 1;
    }
    evhttp_set_max_body_size(http, MAX_BODY);
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
                                         EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                         EVHTTP_REQ_PATCH | EVHTTP_REQ_HEAD);
    evhttp_set_gencb(http, handle, &srv);
    struct event *sigint = evsignal_new(srv.base, SIGINT, on_signal,
                                        srv.base);
    struct event *sigterm = evsignal_new(srv.base, SIGTERM, on_signal,
                                         srv.base);
    event_add(sigint, NULL);
    event_add(sigterm, NULL);
    fprintf(stderr, "bank-server: listening on %s\n", listen);
    fflush(stderr);
    event_base_dispatch(srv.base);

    /* Drain: no new connections; deliveries stop (their handlers use the
     * host); every accepted command completes and its reply is sent. */
    fprintf(stderr, "bank-server: shutting down\n");
    evhttp_del_accept_socket(http, sock);
    es_outbox_close(outbox);
    rc = es_host_shutdown(srv.host, &err);
    event_base_loop(srv.base, EVLOOP_NONBLOCK);
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
