/* bank-server: HTTP answers, and the failures of commands mapped to them. */
#include <stdlib.h>
#include <string.h>

#include "server.h"

const int srv_counted_codes[N_CODES] = {200, 201, 202, 400, 404, 405,
                                        409, 413, 422, 500, 503, 0};

static void count_response(server *srv, int code)
{
    int i = 0;
    while (i < N_CODES - 1 && srv_counted_codes[i] != code) i++;
    atomic_fetch_add(&srv->responses[i], 1);
}

void srv_reply_buf(server *srv, struct evhttp_request *req, int code,
                      struct evbuffer *buf, const char *content_type)
{
    if (buf != NULL && content_type != NULL)
        evhttp_add_header(evhttp_request_get_output_headers(req),
                          "Content-Type", content_type);
    count_response(srv, code);
    evhttp_send_reply(req, code, NULL, buf);
}

void srv_reply_json(server *srv, struct evhttp_request *req, int code,
                       json_t *body)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    struct evbuffer *buf = evbuffer_new();
    if (text != NULL && buf != NULL) evbuffer_add(buf, text, strlen(text));
    srv_reply_buf(srv, req, code, buf, "application/json; charset=utf-8");
    if (buf) evbuffer_free(buf);
    free(text);
    json_decref(body);
}

void srv_reply_error(server *srv, struct evhttp_request *req, int code,
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
    srv_reply_json(srv, req, code, o);
}

void srv_bad_request(server *srv, struct evhttp_request *req,
                        const char *detail)
{
    srv_reply_error(srv, req, 400, "bad_request", detail);
}

void srv_not_found(server *srv, struct evhttp_request *req)
{
    srv_reply_error(srv, req, 404, "not_found", NULL);
}

/* An id that names an aggregate of the other type: the account (or the
 * transfer) does not exist as such.  Permanent, so never a 503. */
static void wrong_type(server *srv, struct evhttp_request *req, route r,
                       const char *detail)
{
    if (r == R_OPEN) /* the id is taken, by a transfer */
        return srv_reply_error(srv, req, 409, "already_exists", detail);
    srv_reply_error(srv, req, 404, "not_found", detail);
}

void srv_overloaded(server *srv, struct evhttp_request *req)
{
    srv_reply_error(srv, req, 503, "overloaded", NULL);
}

json_t *srv_uuid_json(const es_uuid *id)
{
    char text[ES_UUID_STRLEN + 1];
    return json_string(es_uuid_format(id, text));
}

/* A failure that may pass (busy, closing, the database away, the outcome
 * unknown): 503, and the client sends the same request again. */
bool srv_transient(int status)
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

void srv_reply_failure(server *srv, struct evhttp_request *req, route r,
                          int status, const char *reason, const char *wrong)
{
    if (status == ES_EREJECTED) {
        if (strcmp(reason, BANK_REJECT_NOT_FOUND) == 0)
            return srv_not_found(srv, req);
        if (strcmp(reason, BANK_REJECT_INSUFFICIENT) == 0)
            return srv_reply_error(srv, req, 422, "insufficient_funds", NULL);
        if (strcmp(reason, BANK_REJECT_OVERFLOW) == 0)
            return srv_reply_error(srv, req, 422, "overflow",
                                   "the balance would overflow");
        if (strcmp(reason, BANK_REJECT_EXISTS) == 0)
            return srv_reply_error(srv, req, 409, "already_exists", NULL);
        return srv_bad_request(srv, req, reason);
    }
    switch (status) {
    case ES_EIDEMPOTENCY:
        return srv_reply_error(srv, req, 409, "idempotency_conflict", NULL);
    case ES_EINVAL:
        return srv_bad_request(srv, req, reason);
    case ES_EWRONGTYPE:
        return wrong_type(srv, req, r, wrong);
    case ES_ENOTFOUND:
        return srv_not_found(srv, req);
    default:
        if (srv_transient(status)) return srv_overloaded(srv, req);
        /* Not the client's mistake: the server's. */
        return srv_reply_error(srv, req, 500, "internal",
                               es_status_name(status));
    }
}
