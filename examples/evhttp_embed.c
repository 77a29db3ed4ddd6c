/*
 * Embedding the aggregate host in an application's own libevent HTTP
 * server (docs/embedding.md walks through it).
 *
 * The application owns the event_base and the evhttp server, and hands
 * the base to the host (es_host_config_set_event_base): the host's timers
 * (idle passivation, snapshot flush) run on this loop, so the host starts
 * no I/O thread of its own.  A request handler (loop thread) sends a
 * command with es_host_send and returns at once; the completion callback
 * runs on a worker thread of the host, so it touches no libevent object
 * but one: it fills the request's record and calls event_active on the
 * request's event, which is safe from any thread because
 * evthread_use_pthreads() ran before the base was made.  The loop thread
 * then answers the request.  Nothing on the loop thread waits for the
 * host.
 *
 * Counters: POST /counters/<uuid>/add?n=<1..1000>.  Each time a counter
 * passes a multiple of 50, its event makes a side effect ("milestone"),
 * delivered by an outbox dispatcher.
 *
 * To run as a test it serves itself: it binds 127.0.0.1 on a free port,
 * sends requests to itself over HTTP from the same loop, checks the
 * answers, shuts down in order (HTTP intake, outbox, host, loop, store)
 * and exits 0.  A 20 s timer ends it with exit 1 if anything hangs.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>

#include "eventastic.h"

/* ---- the aggregate: a counter ---- */

typedef struct counter {
    int64_t total;
} counter;

typedef struct counter_event { /* one kind: added */
    es_uuid id;
    int64_t amount;
} counter_event;

typedef struct milestone { /* side effect: the total passed n * 50 */
    es_uuid id;
    int64_t total;
} milestone;

enum { ADDED = 1, MILESTONE = 1, ADD = 1 };

static es_uuid ev_id(const void *e) { return ((const counter_event *)e)->id; }
static int32_t ev_kind(const void *e)
{
    (void)e;
    return ADDED;
}

static int apply(void *state, const void *event, es_error *err)
{
    (void)err;
    ((counter *)state)->total += ((const counter_event *)event)->amount;
    return 0;
}

/* Called with the state after the event. */
static int side_effects(const void *state, const void *event,
                        es_side_effect_sink *sink, es_error *err)
{
    (void)err;
    const counter_event *e = event;
    int64_t after = ((const counter *)state)->total;
    if (after / 50 == (after - e->amount) / 50) return 0;
    milestone m = {e->id, after};
    m.id.bytes[15] ^= 0x5a; /* stable: derived from the event id */
    return es_side_effect_emit(sink, &m);
}

static void put_i64(uint8_t *p, int64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)v >> (8 * i));
}

static int64_t get_i64(const uint8_t *p)
{
    uint64_t u = 0;
    for (int i = 0; i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
    return (int64_t)u;
}

/* State, events and side effects all encode as an id and a number. */
static int encode_pair(const es_uuid *id, int64_t n, es_buf *out)
{
    uint8_t b[24] = {0};
    if (id) memcpy(b, id->bytes, 16);
    put_i64(b + 16, n);
    return es_buf_append(out, b, sizeof b);
}

static int decode_pair(const uint8_t *p, size_t len, es_uuid *id, int64_t *n)
{
    if (len != 24) return ES_EDECODE;
    if (id) memcpy(id->bytes, p, 16);
    *n = get_i64(p + 16);
    return 0;
}

static int st_enc(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    return encode_pair(NULL, ((const counter *)s)->total, out);
}
static int st_dec(const uint8_t *p, size_t len, void *s, es_error *err)
{
    (void)err;
    return decode_pair(p, len, NULL, &((counter *)s)->total);
}
static int ev_enc(const void *e, es_buf *out, es_error *err)
{
    (void)err;
    const counter_event *ev = e;
    return encode_pair(&ev->id, ev->amount, out);
}
static int ev_dec(int32_t kind, const uint8_t *p, size_t len, void *e,
                  es_error *err)
{
    (void)err;
    counter_event *ev = e;
    return kind == ADDED ? decode_pair(p, len, &ev->id, &ev->amount)
                         : ES_EDECODE;
}
static es_uuid fx_id(const void *f) { return ((const milestone *)f)->id; }
static int32_t fx_kind(const void *f)
{
    (void)f;
    return MILESTONE;
}
static int fx_enc(const void *f, es_buf *out, es_error *err)
{
    (void)err;
    const milestone *m = f;
    return encode_pair(&m->id, m->total, out);
}
static int fx_dec(int32_t kind, const uint8_t *p, size_t len, void *f,
                  es_error *err)
{
    (void)err;
    milestone *m = f;
    return kind == MILESTONE ? decode_pair(p, len, &m->id, &m->total)
                             : ES_EDECODE;
}

static const es_aggregate_type counter_type = {
    .name = "counter",
    .snapshot_version = 1,
    .state_size = sizeof(counter),
    .event_size = sizeof(counter_event),
    .side_effect_size = sizeof(milestone),
    .event_id = ev_id,
    .event_kind = ev_kind,
    .apply_new = apply,
    .apply = apply,
    .side_effects = side_effects,
    .state_encode = st_enc,
    .state_decode = st_dec,
    .event_encode = ev_enc,
    .event_decode = ev_dec,
    .side_effect_id = fx_id,
    .side_effect_kind = fx_kind,
    .side_effect_encode = fx_enc,
    .side_effect_decode = fx_dec,
};

/* decide runs on a worker thread; state is NULL before the first event. */
static int decide(void *user, const void *state, const es_command *cmd,
                  es_emitter *em)
{
    (void)user;
    (void)state;
    if (cmd->kind != ADD || cmd->len != 8)
        return es_emit_reject(em, "unknown command");
    int64_t n = get_i64(cmd->payload);
    if (n < 1 || n > 1000) return es_emit_reject(em, "n must be 1 to 1000");
    counter_event e = {{{0}}, n};
    es_uuid_v7(&e.id);
    return es_emit(em, &e);
}

/* ---- the application: the server side ---- */

typedef struct app {
    struct event_base *base;
    struct evhttp *http;
    es_host *host;
    _Atomic int milestones; /* counted by the outbox handler */
} app;

/* One request in flight: made on the loop thread, filled by a worker,
 * answered and freed on the loop thread. */
typedef struct pending {
    struct evhttp_request *req;
    struct event *done_ev; /* activated by the completion callback */
    es_uuid key;
    int status;
    uint64_t version;
    char reason[256];
} pending;

static void reply(struct evhttp_request *req, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void reply(struct evhttp_request *req, int code, const char *fmt, ...)
{
    struct evbuffer *b = evbuffer_new();
    if (b != NULL) {
        va_list ap;
        va_start(ap, fmt);
        evbuffer_add_vprintf(b, fmt, ap);
        va_end(ap);
    }
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "application/json");
    evhttp_send_reply(req, code, NULL, b);
    if (b) evbuffer_free(b);
}

/* Loop thread: the command completed; answer the request. */
static void on_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pending *p = arg;
    char key[ES_UUID_STRLEN + 1];
    es_uuid_format(&p->key, key);
    if (p->status == 0)
        reply(p->req, 200, "{\"counter\":\"%s\",\"version\":%llu}\n", key,
              (unsigned long long)p->version);
    else
        reply(p->req,
              p->status == ES_EREJECTED ? 422
              : p->status == ES_EBUSY || p->status == ES_ECLOSED ? 503
                                                                 : 500,
              "{\"error\":\"%s\",\"reason\":\"%s\"}\n",
              es_status_name(p->status), p->reason);
    event_free(p->done_ev);
    free(p);
}

/* Worker thread: copy what the loop needs, then wake the loop.  The
 * result is borrowed until we return; the pending record is not touched
 * again on this thread after event_active. */
static void completed(void *ud, const es_host_result *r)
{
    pending *p = ud;
    p->status = r->status;
    p->version = r->version;
    snprintf(p->reason, sizeof p->reason, "%s", r->reason);
    event_active(p->done_ev, 0, 0);
}

/* Loop thread: POST /counters/<uuid>/add?n=K. */
static void handle(struct evhttp_request *req, void *arg)
{
    app *a = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = evhttp_uri_get_path(uri);
    const char *query = evhttp_uri_get_query(uri);
    char text[ES_UUID_STRLEN + 1];
    es_uuid key;
    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST || path == NULL ||
        sscanf(path, "/counters/%36[0-9a-f-]/add", text) != 1 ||
        strlen(path) != strlen("/counters//add") + ES_UUID_STRLEN ||
        es_uuid_parse(text, &key) != 0) {
        reply(req, 404, "{\"error\":\"no such route\"}\n");
        return;
    }
    struct evkeyvalq q;
    int64_t n = 0;
    if (query != NULL && evhttp_parse_query_str(query, &q) == 0) {
        const char *v = evhttp_find_header(&q, "n");
        if (v != NULL) n = strtoll(v, NULL, 10);
        evhttp_clear_headers(&q);
    }
    pending *p = calloc(1, sizeof *p);
    if (p == NULL ||
        (p->done_ev = event_new(a->base, -1, 0, on_done, p)) == NULL) {
        free(p);
        reply(req, 500, "{\"error\":\"out of memory\"}\n");
        return;
    }
    p->req = req;
    p->key = key;
    uint8_t amount[8];
    put_i64(amount, n);
    es_command cmd = {{{0}}, ADD, amount, sizeof amount};
    es_uuid_v7(&cmd.id); /* a real client would send its own, for retries */
    es_error err = {0};
    int rc = es_host_send(a->host, &counter_type, &key, &cmd, completed, p,
                          &err);
    if (rc != 0) { /* completed() will never run: answer now */
        p->status = rc;
        snprintf(p->reason, sizeof p->reason, "%s", err.message);
        event_active(p->done_ev, 0, 0);
    }
}

/* Outbox worker thread: deliver a milestone (here: count it). */
static es_outbox_verdict on_milestone(void *ud, const es_outbox_entry *e,
                                      const void *value, es_error *reason)
{
    (void)e;
    (void)reason;
    app *a = ud;
    const milestone *m = value;
    (void)m; /* a real handler would use e->side_effect.id as its
                idempotency key, e.g. a message id */
    atomic_fetch_add(&a->milestones, 1);
    return ES_OUTBOX_VERDICT_DONE;
}

/* ---- the self-test client (same loop) ---- */

#define COUNTERS 3
#define ADDS 10

typedef struct client {
    struct event_base *base;
    int outstanding;
    int ok, rejected, not_found, other;
    uint64_t max_version[COUNTERS];
} client;

typedef struct call {
    client *c;
    int counter; /* index, or -1 */
} call;

static void on_response(struct evhttp_request *req, void *arg)
{
    call *k = arg;
    client *c = k->c;
    int code = req ? evhttp_request_get_response_code(req) : 0;
    if (code == 200) {
        c->ok++;
        char body[256] = {0};
        struct evbuffer *in = evhttp_request_get_input_buffer(req);
        evbuffer_copyout(in, body, sizeof body - 1);
        const char *v = strstr(body, "\"version\":");
        uint64_t version = v ? strtoull(v + 10, NULL, 10) : 0;
        if (k->counter >= 0 && version > c->max_version[k->counter])
            c->max_version[k->counter] = version;
    } else if (code == 422) {
        c->rejected++;
    } else if (code == 404) {
        c->not_found++;
    } else {
        c->other++;
    }
    free(k);
    if (--c->outstanding == 0) event_base_loopbreak(c->base);
}

static void request(client *c, struct evhttp_connection *conn, int index,
                    const char *uri)
{
    call *k = malloc(sizeof *k);
    struct evhttp_request *req =
        k ? evhttp_request_new(on_response, k) : NULL;
    if (req == NULL) {
        free(k);
        c->other++;
        return;
    }
    k->c = c;
    k->counter = index;
    evhttp_add_header(evhttp_request_get_output_headers(req), "Host",
                      "127.0.0.1");
    if (evhttp_make_request(conn, req, EVHTTP_REQ_POST, uri) != 0) {
        c->other++; /* the request was freed by libevent */
        free(k);
        return;
    }
    c->outstanding++;
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    fprintf(stderr, "evhttp_embed: timed out\n");
    exit(1);
}

int main(void)
{
    /* Before any event_base: make libevent's locks real, so that
     * event_active may be called from the host's threads. */
    if (evthread_use_pthreads() != 0) return 1;
    app a = {0};
    a.base = event_base_new();
    if (a.base == NULL) return 1;
    es_error err = {0};
    es_store *store = NULL;
    es_host_config *hcfg = NULL;
    es_outbox_config *ocfg = NULL;
    es_outbox *outbox = NULL;
    int rc;
    if ((rc = es_memory_store_open(&store, &err)) != 0 ||
        (rc = es_host_config_new(&hcfg, &err)) != 0 ||
        (rc = es_host_config_set_workers(hcfg, 2)) != 0 ||
        /* our loop carries the host's timers */
        (rc = es_host_config_set_event_base(hcfg, a.base)) != 0 ||
        (rc = es_host_config_add_type(hcfg, &counter_type, decide, NULL,
                                      &err)) != 0 ||
        (rc = es_host_open(hcfg, store, &a.host, &err)) != 0 ||
        (rc = es_outbox_config_new(store, &ocfg, &err)) != 0 ||
        (rc = es_outbox_config_add_handler(ocfg, &counter_type,
                                           ES_OUTBOX_ANY_KIND, on_milestone,
                                           &a, &err)) != 0 ||
        (rc = es_outbox_open(ocfg, true, &outbox, &err)) != 0) {
        fprintf(stderr, "setup: %s: %s\n", es_status_name(rc), err.message);
        return 1;
    }
    es_host_config_free(hcfg);
    es_outbox_config_free(ocfg);

    a.http = evhttp_new(a.base);
    struct evhttp_bound_socket *sock =
        a.http ? evhttp_bind_socket_with_handle(a.http, "127.0.0.1", 0)
               : NULL;
    if (sock == NULL) {
        fprintf(stderr, "evhttp_embed: cannot listen on 127.0.0.1\n");
        return 1;
    }
    evhttp_set_gencb(a.http, handle, &a);
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    getsockname(evhttp_bound_socket_get_fd(sock), (struct sockaddr *)&addr,
                &alen);
    uint16_t port = ntohs(addr.sin_port);

    /* The client side: one connection per counter, all in flight. */
    client c = {.base = a.base};
    struct evhttp_connection *conns[COUNTERS + 1];
    es_uuid keys[COUNTERS];
    char uri[128], key[ES_UUID_STRLEN + 1];
    for (int i = 0; i <= COUNTERS; i++) {
        conns[i] = evhttp_connection_base_new(a.base, NULL, "127.0.0.1",
                                              port);
        if (conns[i] == NULL) return 1;
    }
    for (int i = 0; i < COUNTERS; i++) {
        es_uuid_v7(&keys[i]);
        es_uuid_format(&keys[i], key);
        snprintf(uri, sizeof uri, "/counters/%s/add?n=7", key);
        for (int j = 0; j < ADDS; j++) request(&c, conns[i], i, uri);
    }
    es_uuid_format(&keys[0], key);
    snprintf(uri, sizeof uri, "/counters/%s/add?n=0", key);
    request(&c, conns[COUNTERS], -1, uri);               /* rejected */
    request(&c, conns[COUNTERS], -1, "/counters/x/add"); /* not found */

    struct event *timeout = evtimer_new(a.base, on_timeout, NULL);
    struct timeval twenty = {20, 0};
    evtimer_add(timeout, &twenty);
    event_base_dispatch(a.base); /* until every answer came back */

    /* Shutdown, in order.  1: no new HTTP requests. */
    evhttp_del_accept_socket(a.http, sock);
    /* 2: the outbox, before the host: its handlers may send commands to
     * the host (not here, but the bank's do).  Give it a moment to deliver
     * what the commits made; what it leaves stays pending in the store. */
    for (int i = 0; i < 500 && atomic_load(&a.milestones) < COUNTERS; i++) {
        struct timeval ms = {0, 10000};
        event_base_loopexit(a.base, &ms);
        event_base_dispatch(a.base);
    }
    es_outbox_close(outbox);
    /* 3: the host: decides what is queued, waits for the commits; the
     * completions still activate their events on our base, so the base
     * outlives the host.  It also deletes its timers from our base. */
    if ((rc = es_host_shutdown(a.host, &err)) != 0)
        fprintf(stderr, "shutdown: %s\n", err.message);
    /* 4: run what the completions activated, then free the loop's side. */
    event_base_loop(a.base, EVLOOP_NONBLOCK);
    for (int i = 0; i <= COUNTERS; i++) evhttp_connection_free(conns[i]);
    evhttp_free(a.http);
    event_free(timeout);
    event_base_free(a.base);
    /* 5: the store, last. */
    es_store_close(store);

    printf("%d ok, %d rejected, %d not found, %d other; versions",
           c.ok, c.rejected, c.not_found, c.other);
    bool good = c.ok == COUNTERS * ADDS && c.rejected == 1 &&
                c.not_found == 1 && c.other == 0;
    for (int i = 0; i < COUNTERS; i++) {
        printf(" %llu", (unsigned long long)c.max_version[i]);
        good = good && c.max_version[i] == ADDS - 1;
    }
    printf("; %d milestones delivered\n", atomic_load(&a.milestones));
    good = good && atomic_load(&a.milestones) == COUNTERS;
    return good ? 0 : 1;
}
