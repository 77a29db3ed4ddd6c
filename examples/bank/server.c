/*
 * bank-server: the bank as an HTTP service on libevent's evhttp.
 *
 * Requests are parsed on the loop thread.  Commands go to the host with
 * es_host_send; the completion (on a host worker) hands the outcome back
 * to the loop thread through an event made active across threads
 * (libevent with pthreads), where the reply is written.  Reads (GET of an
 * account or a transfer, /healthz, /metrics) block on the store, so they
 * run on a small pool of reader threads and come back the same way.  The
 * loop never waits for the host or the database.  A projection keeps the
 * read model of /stats and the statements (server_views.c).
 *
 * A 2xx answer is sent only after the command's transaction committed, so
 * a read that starts after it sees the change.
 */
#include <errno.h>
#include <event2/thread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eventastic/postgres.h"
#include "server.h"

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
    /* Several bank-servers may serve one database (docs/scaling.md): GETs
     * read what the others committed too. */
    if (rc == 0) rc = es_host_config_set_query_fresh(hcfg, true);
    if (rc == 0) rc = bank_register(hcfg, &err);
    if (rc == 0) rc = es_host_open(hcfg, srv.store, &srv.host, &err);
    es_host_config_free(hcfg);
    es_outbox_config *ocfg = NULL;
    es_outbox *outbox = NULL;
    if (rc == 0 && srv_readers_start(&srv.rd) != 0) {
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
    if (rc == 0) rc = srv_views_start(&srv, &err);
    if (rc != 0) {
        fprintf(stderr, "bank-server: %s: %s\n", es_status_name(rc),
                err.message);
        srv_readers_stop(&srv.rd);
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
        srv_readers_stop(&srv.rd);
        srv_views_stop(srv.views);
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
    evhttp_set_gencb(http, srv_handle, &srv);
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
    /* Reads use the host (metrics), the outbox, the read model and the
     * store: they finish first; then the projection stops, before the
     * host.  es_host_shutdown frees the host. */
    srv_readers_stop(&srv.rd);
    srv_views_stop(srv.views);
    srv.views = NULL;
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
