/* bank-server: the routes, on the loop thread. */
#include <stdatomic.h>
#include <string.h>

#include "server.h"

static void method_not_allowed(server *srv, struct evhttp_request *req,
                               const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
                      allow);
    srv_reply_error(srv, req, 405, "method_not_allowed", NULL);
}

/* The query of GET /accounts/{id}/statement: nothing (limit 20), or
 * exactly one "limit=N", N decimal digits only, 1 to 100.  Anything else
 * (another parameter, limit twice, an empty, signed, fractional,
 * exponent or percent-encoded value) is a 400 that says what is wrong:
 * a client that asks for something the server would ignore learns so. */
static bool statement_limit(server *srv, struct evhttp_request *req,
                            const char *query, int *out)
{
    *out = STATEMENT_DEFAULT;
    if (query == NULL || query[0] == '\0') return true;
    bool seen = false;
    const char *p = query;
    for (;;) {
        const char *end = strchr(p, '&');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len < 6 || strncmp(p, "limit=", 6) != 0) {
            srv_bad_request(srv, req, "the only query parameter is limit");
            return false;
        }
        if (seen) {
            srv_bad_request(srv, req, "limit is given more than once");
            return false;
        }
        seen = true;
        long v = 0;
        size_t i = 6;
        for (; i < len && p[i] >= '0' && p[i] <= '9' && v <= STATEMENT_MAX;
             i++)
            v = v * 10 + (p[i] - '0');
        if (len == 6 || i < len || v < 1 || v > STATEMENT_MAX) {
            srv_bad_request(srv, req, "limit must be an integer from 1 to "
                                      "100");
            return false;
        }
        *out = (int)v;
        if (end == NULL) return true;
        p = end + 1;
    }
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
        srv_bad_request(srv, req,
                        "the id in the path must not be the nil UUID");
        return false;
    }
    return true;
bad:
    srv_bad_request(srv, req, "the id in the path must be a UUID");
    return false;
}

void srv_handle(struct evhttp_request *req, void *arg)
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
        srv_reply_error(srv, req, 413, "payload_too_large",
                        "the body is over 64 KiB");
    } else if (path == NULL) {
        srv_bad_request(srv, req, "bad request URI");
    } else if (atomic_load(&srv->closing)) {
        srv_overloaded(srv, req);
    } else if (strcmp(path, "/healthz") == 0) {
        if (get) srv_read_submit(srv, req, J_HEALTH, NULL, 0);
        else method_not_allowed(srv, req, "GET");
    } else if (strcmp(path, "/metrics") == 0) {
        if (get) srv_read_submit(srv, req, J_METRICS, NULL, 0);
        else method_not_allowed(srv, req, "GET");
    } else if (strcmp(path, "/stats") == 0) {
        if (get) srv_read_submit(srv, req, J_STATS, NULL, 0);
        else method_not_allowed(srv, req, "GET");
    } else if (strcmp(path, "/accounts") == 0) {
        if (post) srv_handle_post(srv, req, R_OPEN, NULL);
        else method_not_allowed(srv, req, "POST");
    } else if (strcmp(path, "/transfers") == 0) {
        if (post) srv_handle_post(srv, req, R_TRANSFER, NULL);
        else method_not_allowed(srv, req, "POST");
    } else if (strncmp(path, "/transfers/", 11) == 0 &&
               strchr(path + 11, '/') == NULL) {
        if (!get) method_not_allowed(srv, req, "GET");
        else if (path_id(srv, req, path + 11, strlen(path + 11), &id))
            srv_read_submit(srv, req, J_TRANSFER, &id, 0);
    } else if (strncmp(path, "/accounts/", 10) == 0) {
        const char *rest = path + 10;
        const char *slash = strchr(rest, '/');
        size_t idlen = slash ? (size_t)(slash - rest) : strlen(rest);
        const char *sub = slash ? slash + 1 : NULL;
        if (sub == NULL) {
            if (!get) method_not_allowed(srv, req, "GET");
            else if (path_id(srv, req, rest, idlen, &id))
                srv_read_submit(srv, req, J_ACCOUNT, &id, 0);
        } else if (strcmp(sub, "deposits") == 0 ||
                   strcmp(sub, "withdrawals") == 0) {
            if (!post) method_not_allowed(srv, req, "POST");
            else if (path_id(srv, req, rest, idlen, &id))
                srv_handle_post(srv, req,
                                sub[0] == 'd' ? R_DEPOSIT : R_WITHDRAW, &id);
        } else if (strcmp(sub, "statement") == 0) {
            int limit;
            if (!get) method_not_allowed(srv, req, "GET");
            else if (path_id(srv, req, rest, idlen, &id) &&
                     statement_limit(srv, req, evhttp_uri_get_query(parsed),
                                     &limit))
                srv_read_submit(srv, req, J_STATEMENT, &id, limit);
        } else {
            srv_not_found(srv, req);
        }
    } else {
        srv_not_found(srv, req);
    }
    if (parsed) evhttp_uri_free(parsed);
}

