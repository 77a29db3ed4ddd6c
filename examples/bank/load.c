/*
 * bank-load: a load generator and invariant checker for bank-server.
 *
 * Opens accounts, then runs --clients keep-alive connections on libevent's
 * HTTP client, all on one event_base: each connection has one request in
 * flight and sends the next as soon as the answer arrives, for --duration
 * seconds, with deposits, withdrawals, transfers and reads (GET of an
 * account) in the --mix shares,
 * re-sending a --retry-ratio share of them with the same ids (one transfer
 * in 50 goes to an unknown account, to be refunded).  A progress
 * line each second; at the end a summary table and a JSON summary.  Then
 * it waits for the transfers to settle and checks, through the API, that
 * money was neither created nor lost nor moved twice:
 *   sum of balances == opened + deposited - withdrawn (acknowledged),
 *   no negative balance, every acknowledged transfer completed or
 *   refunded, every re-sent request answered like the original.
 * It exits 1 if a check fails.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "eventastic/uuid.h"

#define INITIAL_BALANCE 100000
#define HIST_BUCKETS 100000 /* 10 us each: up to 1 s, then the last */
#define N_STATUS 600        /* index 0: no answer (connection failed) */

typedef struct options {
    char host[128];
    int port;
    int clients;
    double seconds;
    int accounts;
    int mix_deposit, mix_withdraw, mix_transfer, mix_read;
    double retry;
    unsigned seed;
    const char *json_out;
} options;

static options opt = {"127.0.0.1", 8080, 32, 10.0, 1000, 60, 20, 20, 0, 0.1, 1,
                      NULL};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- latency histogram ---- */

typedef struct hist {
    uint64_t b[HIST_BUCKETS];
    uint64_t n;
    double max_ms;
} hist;

static void hist_add(hist *h, double seconds)
{
    double us = seconds * 1e6;
    size_t i = us < 0 ? 0 : (size_t)(us / 10);
    if (i >= HIST_BUCKETS) i = HIST_BUCKETS - 1;
    h->b[i]++;
    h->n++;
    if (seconds * 1e3 > h->max_ms) h->max_ms = seconds * 1e3;
}

/* The q-quantile in ms (the bucket's upper edge). */
static double hist_q(const hist *h, double q)
{
    if (h->n == 0) return 0;
    uint64_t want = (uint64_t)(q * (double)h->n);
    if (want >= h->n) want = h->n - 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen > want)
            return i == HIST_BUCKETS - 1 ? h->max_ms : (double)(i + 1) / 100;
    }
    return h->max_ms;
}

/* ---- blocking HTTP for the set-up and the checks ---- */

typedef struct conn {
    int fd;
    char buf[65536];
    size_t have;
} conn;

static int conn_open(conn *c)
{
    c->have = 0;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) return -1;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &sa.sin_addr) != 1 ||
        connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {30, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return 0;
}

static void conn_close(conn *c)
{
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->have = 0;
}

/* One request; returns the HTTP status, or -1 when the connection failed
 * (the outcome is then unknown).  *body gets the parsed JSON (or NULL). */
static int request(conn *c, const char *method, const char *path,
                   const char *json, json_t **body)
{
    *body = NULL;
    if (c->fd < 0 && conn_open(c) != 0) return -1;
    char head[512];
    size_t blen = json ? strlen(json) : 0;
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: bank\r\n"
                     "Content-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     method, path, blen);
    if (send(c->fd, head, (size_t)n, MSG_NOSIGNAL) != n ||
        (blen && send(c->fd, json, blen, MSG_NOSIGNAL) != (ssize_t)blen)) {
        conn_close(c);
        return -1;
    }
    for (;;) {
        char *end = c->have ? memmem(c->buf, c->have, "\r\n\r\n", 4) : NULL;
        if (end != NULL) {
            size_t hlen = (size_t)(end - c->buf) + 4;
            int status = 0;
            if (sscanf(c->buf, "HTTP/1.%*d %d", &status) != 1) break;
            size_t clen = 0;
            char *cl = strcasestr(c->buf, "Content-Length:");
            if (cl != NULL && cl < end)
                clen = (size_t)strtoul(cl + 15, NULL, 10);
            if (hlen + clen > sizeof c->buf) break;
            while (c->have < hlen + clen) {
                ssize_t got = recv(c->fd, c->buf + c->have,
                                   sizeof c->buf - c->have, 0);
                if (got <= 0) goto fail;
                c->have += (size_t)got;
            }
            json_error_t jerr;
            *body = clen ? json_loadb(c->buf + hlen, clen, 0, &jerr) : NULL;
            memmove(c->buf, c->buf + hlen + clen, c->have - hlen - clen);
            c->have -= hlen + clen;
            return status;
        }
        if (c->have == sizeof c->buf) break;
        ssize_t got = recv(c->fd, c->buf + c->have, sizeof c->buf - c->have,
                           0);
        if (got <= 0) break;
        c->have += (size_t)got;
    }
fail:
    conn_close(c);
    return -1;
}

/* ---- the load, on libevent's HTTP client ---- */

static char (*account_ids)[ES_UUID_STRLEN + 1];

typedef enum op { OP_DEPOSIT, OP_WITHDRAW, OP_TRANSFER, OP_READ } op;

/* What the clients saw. */
typedef struct totals {
    uint64_t ok, rejected, failed, unknown, resent, resend_mismatch;
    int64_t deposited, withdrawn, unknown_money;
    uint64_t by_status[N_STATUS];
} totals;

typedef struct client {
    struct evhttp_connection *evcon;
    unsigned seed;
    /* the request in flight */
    op op;
    bool resend;
    long amount;
    char id[ES_UUID_STRLEN + 1];
    char path[128], body[512];
    double t0;
    /* the last new request, for re-sending */
    op prev_op;
    char prev_path[128], prev_body[512];
    int prev_status;
    json_t *prev_answer;
} client;

typedef struct load {
    struct event_base *base;
    client *clients;
    double until;
    int in_flight;
    totals t;
    hist h;
    /* for the progress line */
    double started, last_tick;
    uint64_t last_n;
    struct event *tick;
    /* acknowledged transfers */
    char (*transfers)[ES_UUID_STRLEN + 1];
    size_t n_transfers, cap_transfers;
} load;

static load L;

static void new_id(char out[ES_UUID_STRLEN + 1])
{
    es_uuid id;
    es_uuid_v7(&id);
    es_uuid_format(&id, out);
}

static void send_next(client *cl);

static void remember_transfer(const char *id)
{
    if (L.n_transfers == L.cap_transfers) {
        size_t cap = L.cap_transfers ? 2 * L.cap_transfers : 4096;
        void *p = realloc(L.transfers, cap * sizeof *L.transfers);
        if (p == NULL) {
            fprintf(stderr, "bank-load: out of memory\n");
            exit(1);
        }
        L.transfers = p;
        L.cap_transfers = cap;
    }
    snprintf(L.transfers[L.n_transfers++], ES_UUID_STRLEN + 1, "%s", id);
}

/* Loop thread: an answer (or a failure: req NULL or code 0). */
static void on_answer(struct evhttp_request *req, void *arg)
{
    client *cl = arg;
    totals *t = &L.t;
    L.in_flight--;
    hist_add(&L.h, now_s() - cl->t0);
    int status = req ? evhttp_request_get_response_code(req) : 0;
    if (status < 0 || status >= N_STATUS) status = 0;
    t->by_status[status]++;
    json_t *answer = NULL;
    if (status > 0) {
        struct evbuffer *in = evhttp_request_get_input_buffer(req);
        size_t len = evbuffer_get_length(in);
        if (len > 0) {
            json_error_t jerr;
            answer = json_loadb((const char *)evbuffer_pullup(in, -1), len,
                                0, &jerr);
        }
    }
    if (cl->resend) {
        t->resent++;
        /* The same request must get the same answer (version and
         * balance), unless an outcome was unknown or "try again".  A
         * rejection is decided again, so it is not compared. */
        bool same = status == cl->prev_status &&
                    (answer == NULL || cl->prev_answer == NULL ||
                     json_equal(answer, cl->prev_answer));
        bool comparable = status >= 200 && status < 300 &&
                          cl->prev_status >= 200 && cl->prev_status < 300;
        if (comparable && !same) t->resend_mismatch++;
        json_decref(answer);
    } else {
        bool transfer = cl->op == OP_TRANSFER;
        bool moves = cl->op == OP_DEPOSIT || cl->op == OP_WITHDRAW;
        if (status >= 200 && status < 300) {
            t->ok++;
            if (transfer) remember_transfer(cl->id);
            else if (cl->op == OP_DEPOSIT) t->deposited += cl->amount;
            else if (cl->op == OP_WITHDRAW) t->withdrawn += cl->amount;
        } else if (status == 0 || status >= 500) {
            if (status == 0) t->unknown++;
            else t->failed++;
            if (moves) t->unknown_money += cl->amount;
        } else {
            t->rejected++;
        }
        json_decref(cl->prev_answer);
        cl->prev_answer = answer;
        cl->prev_status = status;
        cl->prev_op = cl->op;
        snprintf(cl->prev_path, sizeof cl->prev_path, "%s", cl->path);
        snprintf(cl->prev_body, sizeof cl->prev_body, "%s", cl->body);
    }
    if (now_s() < L.until) send_next(cl);
    else if (L.in_flight == 0) event_base_loopbreak(L.base);
}

static void send_next(client *cl)
{
    cl->resend = cl->prev_op != OP_READ && cl->prev_body[0] != '\0' &&
                 (double)rand_r(&cl->seed) / RAND_MAX < opt.retry;
    if (cl->resend) {
        cl->op = cl->prev_op;
        snprintf(cl->path, sizeof cl->path, "%s", cl->prev_path);
        snprintf(cl->body, sizeof cl->body, "%s", cl->prev_body);
    } else {
        int total = opt.mix_deposit + opt.mix_withdraw + opt.mix_transfer +
                    opt.mix_read;
        int r = rand_r(&cl->seed) % total;
        int dw = opt.mix_deposit + opt.mix_withdraw;
        cl->op = r < opt.mix_deposit                 ? OP_DEPOSIT
                 : r < dw                            ? OP_WITHDRAW
                 : r < dw + opt.mix_transfer         ? OP_TRANSFER
                                                     : OP_READ;
        int a = rand_r(&cl->seed) % opt.accounts;
        int b = (a + 1 + rand_r(&cl->seed) % (opt.accounts - 1)) %
                opt.accounts;
        cl->amount = 1 + rand_r(&cl->seed) % 1000;
        new_id(cl->id);
        if (cl->op == OP_READ) {
            snprintf(cl->path, sizeof cl->path, "/accounts/%s",
                     account_ids[a]);
            cl->body[0] = '\0';
        } else if (cl->op == OP_TRANSFER) {
            /* One transfer in 50 goes to an account that does not exist:
             * the saga must refund it. */
            char ghost[ES_UUID_STRLEN + 1];
            bool to_ghost = rand_r(&cl->seed) % 50 == 0;
            if (to_ghost) new_id(ghost);
            snprintf(cl->path, sizeof cl->path, "/transfers");
            snprintf(cl->body, sizeof cl->body,
                     "{\"transfer_id\":\"%s\",\"from\":\"%s\",\"to\":\"%s\","
                     "\"amount\":%ld}", cl->id, account_ids[a],
                     to_ghost ? ghost : account_ids[b], cl->amount);
        } else {
            snprintf(cl->path, sizeof cl->path, "/accounts/%s/%s",
                     account_ids[a],
                     cl->op == OP_DEPOSIT ? "deposits" : "withdrawals");
            snprintf(cl->body, sizeof cl->body,
                     "{\"command_id\":\"%s\",\"amount\":%ld}", cl->id,
                     cl->amount);
        }
    }
    struct evhttp_request *req = evhttp_request_new(on_answer, cl);
    if (req == NULL) {
        fprintf(stderr, "bank-load: out of memory\n");
        exit(1);
    }
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Host", opt.host);
    bool read = cl->op == OP_READ;
    if (!read) {
        evhttp_add_header(h, "Content-Type", "application/json");
        evbuffer_add(evhttp_request_get_output_buffer(req), cl->body,
                     strlen(cl->body));
    }
    cl->t0 = now_s();
    L.in_flight++;
    if (evhttp_make_request(cl->evcon, req,
                            read ? EVHTTP_REQ_GET : EVHTTP_REQ_POST,
                            cl->path) != 0) {
        /* libevent freed the request; count it as a failed one. */
        L.in_flight--;
        L.t.by_status[0]++;
        L.t.unknown++;
        if ((cl->op == OP_DEPOSIT || cl->op == OP_WITHDRAW) && !cl->resend)
            L.t.unknown_money += cl->amount;
    }
}

static void print_errors(FILE *f, const uint64_t *by)
{
    bool any = false;
    for (int s = 0; s < N_STATUS; s++) {
        if (by[s] == 0 || (s >= 200 && s < 300)) continue;
        if (s == 0) fprintf(f, " no-answer=%llu", (unsigned long long)by[s]);
        else fprintf(f, " %d=%llu", s, (unsigned long long)by[s]);
        any = true;
    }
    if (!any) fprintf(f, " none");
}

/* Loop thread, each second: the progress line. */
static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    double now = now_s();
    uint64_t n = L.h.n;
    printf("[%5.1fs] %7.0f req/s  total %8llu  p99 %7.2f ms  errors:",
           now - L.started, (double)(n - L.last_n) / (now - L.last_tick),
           (unsigned long long)n, hist_q(&L.h, 0.99));
    print_errors(stdout, L.t.by_status);
    printf("\n");
    fflush(stdout);
    L.last_n = n;
    L.last_tick = now;
}

static int run_load(void)
{
    L.base = event_base_new();
    if (L.base == NULL) return -1;
    L.clients = calloc((size_t)opt.clients, sizeof *L.clients);
    if (L.clients == NULL) return -1;
    for (int i = 0; i < opt.clients; i++) {
        client *cl = &L.clients[i];
        cl->seed = opt.seed * 7919u + (unsigned)i;
        cl->evcon = evhttp_connection_base_new(L.base, NULL, opt.host,
                                               (ev_uint16_t)opt.port);
        if (cl->evcon == NULL) return -1;
        evhttp_connection_set_timeout(cl->evcon, 30);
        evhttp_connection_set_retries(cl->evcon, 0);
    }
    L.tick = event_new(L.base, -1, EV_PERSIST, on_tick, NULL);
    struct timeval one = {1, 0};
    event_add(L.tick, &one);
    L.started = L.last_tick = now_s();
    L.until = L.started + opt.seconds;
    for (int i = 0; i < opt.clients; i++) send_next(&L.clients[i]);
    event_base_dispatch(L.base);
    event_free(L.tick);
    for (int i = 0; i < opt.clients; i++) {
        evhttp_connection_free(L.clients[i].evcon);
        json_decref(L.clients[i].prev_answer);
    }
    free(L.clients);
    event_base_free(L.base);
    return 0;
}

/* ---- options ---- */

static void usage(void)
{
    fprintf(stderr,
            "usage: bank-load [--url http://HOST:PORT] [--accounts N] "
            "[--clients N]\n"
            "                 [--duration S] "
            "[--mix deposit=60,withdraw=20,transfer=20,read=0]\n"
            "                 [--retry-ratio R] [--seed N] [--json FILE]\n");
}

static bool parse_url(const char *url)
{
    const char *p = url;
    if (strncmp(p, "http://", 7) == 0) p += 7;
    const char *colon = strrchr(p, ':');
    size_t hl = colon ? (size_t)(colon - p) : strcspn(p, "/");
    if (hl == 0 || hl >= sizeof opt.host) return false;
    memcpy(opt.host, p, hl);
    opt.host[hl] = '\0';
    if (strcmp(opt.host, "localhost") == 0)
        snprintf(opt.host, sizeof opt.host, "127.0.0.1");
    opt.port = colon ? atoi(colon + 1) : 80;
    return opt.port > 0 && opt.port < 65536;
}

static bool parse_mix(const char *s)
{
    int d = 0, w = 0, t = 0, rd = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        char *eq = strchr(tok, '=');
        if (eq == NULL) return false;
        *eq = '\0';
        int v = atoi(eq + 1);
        if (v < 0) return false;
        if (strcmp(tok, "deposit") == 0) d = v;
        else if (strcmp(tok, "withdraw") == 0) w = v;
        else if (strcmp(tok, "transfer") == 0) t = v;
        else if (strcmp(tok, "read") == 0) rd = v;
        else return false;
    }
    if (d + w + t + rd <= 0) return false;
    opt.mix_deposit = d;
    opt.mix_withdraw = w;
    opt.mix_transfer = t;
    opt.mix_read = rd;
    return true;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = v != NULL;
        if (!ok) {
            /* an option without its value */
        } else if (strcmp(a, "--url") == 0) ok = parse_url(v);
        else if (strcmp(a, "--clients") == 0) opt.clients = atoi(v);
        else if (strcmp(a, "--duration") == 0) opt.seconds = atof(v);
        else if (strcmp(a, "--accounts") == 0) opt.accounts = atoi(v);
        else if (strcmp(a, "--mix") == 0) ok = parse_mix(v);
        else if (strcmp(a, "--retry-ratio") == 0) opt.retry = atof(v);
        else if (strcmp(a, "--seed") == 0) opt.seed = (unsigned)atoi(v);
        else if (strcmp(a, "--json") == 0) opt.json_out = v;
        else ok = false;
        if (!ok) {
            usage();
            return 2;
        }
        i++;
    }
    if (opt.clients < 1 || opt.accounts < 2 || opt.seconds <= 0 ||
        opt.retry < 0 || opt.retry > 1) {
        usage();
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    printf("bank-load: http://%s:%d, seed %u, %d clients, %d accounts, "
           "%.1f s, mix deposit=%d,withdraw=%d,transfer=%d,read=%d, "
           "retry-ratio %.2f\n", opt.host, opt.port, opt.seed, opt.clients,
           opt.accounts, opt.seconds, opt.mix_deposit, opt.mix_withdraw,
           opt.mix_transfer, opt.mix_read, opt.retry);
    fflush(stdout);

    /* Open the accounts. */
    account_ids = calloc((size_t)opt.accounts, sizeof *account_ids);
    if (account_ids == NULL) return 1;
    conn c = {-1, {0}, 0};
    int64_t opened = 0;
    for (int i = 0; i < opt.accounts; i++) {
        char cid[ES_UUID_STRLEN + 1], body[256];
        new_id(cid);
        new_id(account_ids[i]);
        snprintf(body, sizeof body,
                 "{\"command_id\":\"%s\",\"account_id\":\"%s\","
                 "\"owner\":\"owner %d\",\"email\":\"o%d@example.com\","
                 "\"initial_balance\":%d}", cid, account_ids[i], i, i,
                 INITIAL_BALANCE);
        json_t *ans = NULL;
        int st = -1;
        for (int attempt = 0; attempt < 50 && st != 201; attempt++) {
            st = request(&c, "POST", "/accounts", body, &ans);
            json_decref(ans);
            if (st != 201) usleep(100000);
        }
        if (st != 201) {
            fprintf(stderr, "bank-load: cannot open accounts (HTTP %d)\n",
                    st);
            return 1;
        }
        opened += INITIAL_BALANCE;
    }
    printf("bank-load: %d accounts opened; load for %.1f s\n", opt.accounts,
           opt.seconds);
    fflush(stdout);

    /* The load. */
    double t0 = now_s();
    if (run_load() != 0) {
        fprintf(stderr, "bank-load: cannot start the clients\n");
        return 1;
    }
    double elapsed = now_s() - t0;
    totals *t = &L.t;
    uint64_t total_req = L.h.n;
    double p50 = hist_q(&L.h, 0.50), p99 = hist_q(&L.h, 0.99);
    double p999 = hist_q(&L.h, 0.999);

    /* Settle: every acknowledged transfer completes or is refunded; it
     * fails when none settles for 60 s. */
    uint64_t unsettled = 0, completed = 0, refunded = 0;
    double deadline = now_s() + 60;
    for (size_t j = 0; j < L.n_transfers; j++) {
        char path[128];
        snprintf(path, sizeof path, "/transfers/%s", L.transfers[j]);
        for (;;) {
            json_t *ans = NULL;
            int st = request(&c, "GET", path, NULL, &ans);
            const char *status =
                st == 200 ? json_string_value(json_object_get(ans, "status"))
                          : NULL;
            bool done = status && strcmp(status, "pending") != 0;
            if (done) {
                if (strcmp(status, "completed") == 0) completed++;
                else refunded++;
            }
            json_decref(ans);
            if (done) {
                /* Still settling: wait up to 60 s for the next one. */
                deadline = now_s() + 60;
                break;
            }
            if (now_s() > deadline) {
                unsettled++;
                break;
            }
            usleep(20000);
        }
    }

    /* Money: the balances against what was acknowledged. */
    int64_t sum = 0;
    uint64_t negative = 0, missing = 0;
    for (int i = 0; i < opt.accounts; i++) {
        char path[128];
        snprintf(path, sizeof path, "/accounts/%s", account_ids[i]);
        json_t *ans = NULL;
        int st = request(&c, "GET", path, NULL, &ans);
        if (st != 200) {
            missing++;
        } else {
            int64_t bal = (int64_t)json_integer_value(
                json_object_get(ans, "balance"));
            if (bal < 0) negative++;
            sum += bal;
        }
        json_decref(ans);
    }
    conn_close(&c);
    int64_t expected = opened + t->deposited - t->withdrawn;
    int64_t diff = sum - expected;
    /* Requests whose outcome is unknown may or may not have happened. */
    bool money_ok = diff >= -t->unknown_money && diff <= t->unknown_money;
    bool ok = money_ok && negative == 0 && missing == 0 && unsettled == 0 &&
              t->resend_mismatch == 0;

    printf("\n%-22s %llu in %.1f s\n", "requests",
           (unsigned long long)total_req, elapsed);
    printf("%-22s %.0f requests/s\n", "throughput", total_req / elapsed);
    printf("%-22s p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms\n",
           "latency", p50, p99, p999, L.h.max_ms);
    for (int s = 0; s < N_STATUS; s++) {
        if (t->by_status[s] == 0) continue;
        char label[32];
        if (s == 0) snprintf(label, sizeof label, "no answer");
        else snprintf(label, sizeof label, "HTTP %d", s);
        printf("  %-20s %llu\n", label, (unsigned long long)t->by_status[s]);
    }
    printf("%-22s %llu ok, %llu rejected, %llu unavailable, %llu unknown, "
           "%llu re-sent\n", "answers", (unsigned long long)t->ok,
           (unsigned long long)t->rejected, (unsigned long long)t->failed,
           (unsigned long long)t->unknown, (unsigned long long)t->resent);
    printf("%-22s %zu acknowledged, %llu completed, %llu refunded, %llu "
           "unsettled\n", "transfers", L.n_transfers,
           (unsigned long long)completed, (unsigned long long)refunded,
           (unsigned long long)unsettled);
    printf("%-22s balances %lld, expected %lld, diff %lld (unknown "
           "outcomes cover %lld)\n", "money", (long long)sum,
           (long long)expected, (long long)diff,
           (long long)t->unknown_money);
    printf("%-22s %llu negative, %llu missing, %llu re-sent answered "
           "differently\n", "accounts", (unsigned long long)negative,
           (unsigned long long)missing,
           (unsigned long long)t->resend_mismatch);
    printf("RESULT:                %s\n",
           ok ? "OK: no money created, lost or moved twice" : "FAILED");

    json_t *by = json_object();
    for (int s = 0; s < N_STATUS; s++) {
        if (t->by_status[s] == 0) continue;
        char key[16];
        snprintf(key, sizeof key, "%d", s);
        json_object_set_new(by, s == 0 ? "none" : key,
                            json_integer((json_int_t)t->by_status[s]));
    }
    json_t *j = json_pack(
        "{s:I,s:o,s:f,s:f,s:f,s:f,s:f,s:f,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,"
        "s:I,s:I,s:I,s:I,s:I,s:b}",
        "requests", (json_int_t)total_req, "by_status", by, "seconds",
        elapsed, "throughput", total_req / elapsed, "p50_ms", p50, "p99_ms",
        p99, "p999_ms", p999, "max_ms", L.h.max_ms, "seed",
        (json_int_t)opt.seed, "clients", (json_int_t)opt.clients, "ok",
        (json_int_t)t->ok, "rejected", (json_int_t)t->rejected,
        "unavailable", (json_int_t)t->failed, "unknown",
        (json_int_t)t->unknown, "resent", (json_int_t)t->resent,
        "transfers", (json_int_t)L.n_transfers, "refunded",
        (json_int_t)refunded, "unsettled", (json_int_t)unsettled,
        "money_diff", (json_int_t)diff, "negative", (json_int_t)negative,
        "resend_mismatch", (json_int_t)t->resend_mismatch, "ok_all", ok);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    printf("JSON %s\n", text ? text : "{}");
    if (opt.json_out && text) {
        FILE *f = fopen(opt.json_out, "w");
        if (f) {
            fprintf(f, "%s\n", text);
            fclose(f);
        }
    }
    free(text);
    json_decref(j);
    free(L.transfers);
    free(account_ids);
    return ok ? 0 : 1;
}
