/* bank-server: commands, sent to the host and answered on the loop thread. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"

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
        srv_reply_failure(srv, p->req, p->route, p->status, p->reason,
                          p->wrong_type);
        pending_free(p);
        return;
    }
    json_t *o;
    switch (p->route) {
    case R_TRANSFER:
        o = json_pack("{s:o,s:s}", "transfer_id", srv_uuid_json(&p->key),
                      "status", "pending");
        srv_reply_json(srv, p->req, 202, o);
        break;
    case R_OPEN:
    case R_DEPOSIT:
    case R_WITHDRAW:
        o = json_pack("{s:o,s:I,s:I}", "account_id", srv_uuid_json(&p->key),
                      "balance", (json_int_t)p->balance, "version",
                      (json_int_t)p->version);
        srv_reply_json(srv, p->req, p->route == R_OPEN ? 201 : 200, o);
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
        srv_reply_failure(srv, p->req, p->route, rc, err.message,
                          p->wrong_type);
        pending_free(p);
    }
}

/* POST routes.  account is the path's account id for R_DEPOSIT and
 * R_WITHDRAW. */
void srv_handle_post(server *srv, struct evhttp_request *req, route r,
                        const es_uuid *account)
{
    char detail[160];
    json_t *body = srv_read_body(req, detail, sizeof detail);
    if (body == NULL) return srv_bad_request(srv, req, detail);
    bank_command c;
    memset(&c, 0, sizeof c);
    es_uuid cid, key, from, to;
    bool ok = false;
    switch (r) {
    case R_OPEN:
        c.kind = BANK_CMD_OPEN;
        ok = srv_get_uuid_field(body, "command_id", &cid, detail,
                                sizeof detail) &&
             srv_get_text(body, "owner", c.owner, detail, sizeof detail) &&
             srv_get_text(body, "email", c.email, detail, sizeof detail) &&
             srv_get_amount(body, "initial_balance", &c.amount, true, detail,
                            sizeof detail);
        if (ok && json_object_get(body, "account_id") != NULL)
            ok = srv_get_uuid_field(body, "account_id", &key, detail,
                                    sizeof detail);
        else if (ok)
            key = bank_derive_id(&cid, "account");
        break;
    case R_DEPOSIT:
    case R_WITHDRAW:
        c.kind = r == R_DEPOSIT ? BANK_CMD_DEPOSIT : BANK_CMD_WITHDRAW;
        key = *account;
        ok = srv_get_uuid_field(body, "command_id", &cid, detail,
                                sizeof detail) &&
             srv_get_amount(body, "amount", &c.amount, false, detail,
                            sizeof detail);
        break;
    case R_TRANSFER:
        c.kind = BANK_CMD_DEBIT;
        ok = srv_get_uuid_field(body, "transfer_id", &key, detail,
                                sizeof detail) &&
             srv_get_uuid_field(body, "from", &from, detail, sizeof detail) &&
             srv_get_uuid_field(body, "to", &to, detail, sizeof detail) &&
             srv_get_amount(body, "amount", &c.amount, false, detail,
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
    if (!ok) return srv_bad_request(srv, req, detail);
    pending *p = pending_new(srv, req, r);
    if (p == NULL) return srv_overloaded(srv, req);
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

