/*
 * bank-server's private header: what its files share.
 *
 * server.c: arguments, start and shutdown; server_routes.c: the routing
 * of requests; server_reply.c: HTTP answers and the mapping of statuses
 * to them; server_request.c: the body and its fields; server_commands.c:
 * commands to the host; server_reads.c: the reader pool and its reads;
 * server_metrics.c: /metrics; server_views.c: the read model ("bank.views",
 * a projection) behind /stats and the statements, kept in memory or, in
 * server_views_pg.c, in PostgreSQL.
 *
 * The routes (examples/bank/README.md has the bodies):
 *   POST /accounts                      open            server_commands.c
 *   POST /accounts/{id}/deposits        deposit         server_commands.c
 *   POST /accounts/{id}/withdrawals     withdraw        server_commands.c
 *   POST /transfers                     start transfer  server_commands.c
 *   GET  /accounts/{id}                 balance         server_reads.c
 *   GET  /accounts/{id}/statement?limit=N  movements    server_views.c
 *   GET  /transfers/{id}                status          server_reads.c
 *   GET  /stats                         totals          server_views.c
 *   GET  /healthz                       store reachable server_reads.c
 *   GET  /metrics                       Prometheus text server_metrics.c
 */
#ifndef BANK_SERVER_H
#define BANK_SERVER_H

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "bank.h"

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
/* GET /accounts/{id}/statement: movements per page, by default and at
 * most (the memory store keeps this many per account). */
#define STATEMENT_DEFAULT 20
#define STATEMENT_MAX 100

typedef struct server server;
typedef struct views views;

typedef enum job_kind {
    J_ACCOUNT,
    J_TRANSFER,
    J_HEALTH,
    J_METRICS,
    J_STATS,
    J_STATEMENT,
} job_kind;

typedef struct job {
    struct job *next;
    server *srv;
    struct evhttp_request *req;
    struct event *done_ev;
    job_kind kind;
    es_uuid id;
    int limit;                 /* J_STATEMENT */
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

struct server {
    struct event_base *base;
    es_host *host;
    es_store *store;
    es_outbox *outbox;
    bool postgres;
    views *views;              /* the read model (server_views.c) */
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

/* ---- server_reply.c: answers, on the loop thread ---- */

/* The codes counted by bank_http_responses_total; the last, 0, counts
 * the others. */
extern const int srv_counted_codes[N_CODES];

void srv_reply_buf(server *srv, struct evhttp_request *req, int code,
                   struct evbuffer *buf, const char *content_type);
void srv_reply_json(server *srv, struct evhttp_request *req, int code,
                    json_t *body);
void srv_reply_error(server *srv, struct evhttp_request *req, int code,
                     const char *error, const char *detail);
void srv_bad_request(server *srv, struct evhttp_request *req,
                     const char *detail);
void srv_not_found(server *srv, struct evhttp_request *req);
void srv_overloaded(server *srv, struct evhttp_request *req);
/* The HTTP answer for a failed command of route r; wrong is the detail
 * for ES_EWRONGTYPE (NULL: none). */
void srv_reply_failure(server *srv, struct evhttp_request *req, route r,
                       int status, const char *reason, const char *wrong);
/* A failure that may pass (busy, closing, the database away, the outcome
 * unknown): 503, and the client sends the same request again. */
bool srv_transient(int status);
json_t *srv_uuid_json(const es_uuid *id);

/* ---- server_request.c: the body and its fields ---- */

/* The body as a JSON object, or NULL with detail filled. */
json_t *srv_read_body(struct evhttp_request *req, char *detail, size_t cap);
/* Field readers: true, or false with detail saying what is wrong. */
bool srv_get_uuid_field(json_t *o, const char *name, es_uuid *out,
                        char *detail, size_t cap);
bool srv_get_amount(json_t *o, const char *name, int64_t *out, bool zero,
                    char *detail, size_t cap);
bool srv_get_text(json_t *o, const char *name, char out[BANK_NAME_MAX],
                  char *detail, size_t cap);

/* ---- server_commands.c ---- */

/* POST routes.  account is the path's account id for R_DEPOSIT and
 * R_WITHDRAW. */
void srv_handle_post(server *srv, struct evhttp_request *req, route r,
                     const es_uuid *account);

/* ---- server_reads.c: the reader pool ---- */

int srv_readers_start(readers *rd);
/* Every queued read runs; then the threads end. */
void srv_readers_stop(readers *rd);
/* limit: J_STATEMENT's page size, else ignored. */
void srv_read_submit(server *srv, struct evhttp_request *req, job_kind kind,
                     const es_uuid *id, int limit);
/* Reader thread: the answer of j, JSON (o is consumed; NULL: no body). */
void srv_job_json(job *j, int code, json_t *o);
void srv_job_error(job *j, int code, const char *error, const char *detail);
/* Reader thread: the account's aggregate read like GET /accounts/{id};
 * true when it exists, else j holds the answer (404, 503, ...). */
bool srv_account_exists(job *j);

/* ---- server_metrics.c ---- */

/* Reader thread: fills j with the /metrics answer. */
void srv_run_metrics(job *j);

/* ---- server_views.c: the read model ---- */

/* Create the tables (PostgreSQL) and start the projection "bank.views"
 * on srv->store: exactly-once on PostgreSQL, at-least-once in memory.
 * Sets srv->views.  Returns 0 or a negative es_status with err filled;
 * nothing is left running on error.  Call after the host opened. */
int srv_views_start(server *srv, es_error *err);
/* Stop the projection and free the model.  NULL is a no-op.  After the
 * readers stopped, before the host closes. */
void srv_views_stop(views *v);
/* Reader thread: GET /stats, GET /accounts/{id}/statement. */
void srv_run_stats(job *j);
void srv_run_statement(job *j);
/* Reader thread: the projection's lines of /metrics. */
void srv_views_metrics(views *v, struct evbuffer *b);

/* ---- server_routes.c ---- */

/* Loop thread: evhttp's callback for every request; arg is the server. */
void srv_handle(struct evhttp_request *req, void *arg);

#endif
