/*
 * bank-load: a load generator and invariant checker for bank-server.
 *
 * Opens accounts, then runs client threads that send transfers, deposits
 * and withdrawals over keep-alive HTTP/1.1 connections for a while, re-
 * sending a share of them with the same ids.  Then it waits for the
 * transfers to settle and checks, through the API, that money was neither
 * created nor lost nor moved twice:
 *   sum of balances == opened + deposited - withdrawn (acknowledged),
 *   no negative balance, every acknowledged transfer completed or
 *   refunded, every re-sent request answered like the original.
 * It prints a report and a JSON copy, and exits 1 if a check fails.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
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
#define MAX_LAT 2000000

typedef struct conn {
    int fd;
    char buf[65536];
    size_t have;
} conn;

typedef struct options {
    char host[128];
    int port;
    int clients;
    double seconds;
    int accounts;
    double resend;
    unsigned seed;
    const char *json_out;
} options;

static options opt = {"127.0.0.1", 8080, 16, 5.0, 200, 0.1, 1, NULL};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

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
            if (cl != NULL && cl < end) clen = (size_t)strtoul(cl + 15, NULL, 10);
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

static char (*account_ids)[ES_UUID_STRLEN + 1];

/* What the clients saw, summed over threads. */
typedef struct totals {
    uint64_t ok, rejected, failed, unknown, resent, resend_mismatch;
    int64_t deposited, withdrawn, unknown_money;
    uint64_t by_status[6]; /* 2xx 3xx 4xx 503 5xx other */
} totals;

typedef struct transfer_rec {
    char id[ES_UUID_STRLEN + 1];
} transfer_rec;

typedef struct client {
    int index;
    unsigned seed;
    double until;
    totals t;
    transfer_rec *transfers;
    size_t n_transfers, cap_transfers;
    uint32_t *lat_us;
    size_t n_lat, cap_lat;
} client;

static void new_id(char out[ES_UUID_STRLEN + 1])
{
    es_uuid id;
    es_uuid_v7(&id);
    es_uuid_format(&id, out);
}

static void count_status(totals *t, int status)
{
    int k = status < 0 ? 5 : status < 300 ? 0 : status < 400 ? 1
            : status < 500 ? 2 : status == 503 ? 3 : 4;
    t->by_status[k]++;
}

static void *client_main(void *arg)
{
    client *cl = arg;
    conn c = {-1, {0}, 0};
    char path[128], body[512], prev_path[128] = "", prev_body[512] = "";
    int prev_status = 0;
    json_t *prev_answer = NULL;
    while (now_s() < cl->until) {
        bool resend = prev_body[0] != '\0' &&
                      (double)rand_r(&cl->seed) / RAND_MAX < opt.resend;
        char id[ES_UUID_STRLEN + 1];
        int op = rand_r(&cl->seed) % 4;
        int a = rand_r(&cl->seed) % opt.accounts;
        int b = (a + 1 + rand_r(&cl->seed) % (opt.accounts - 1)) %
                opt.accounts;
        long amount = 1 + rand_r(&cl->seed) % 1000;
        if (resend) {
            snprintf(path, sizeof path, "%s", prev_path);
            snprintf(body, sizeof body, "%s", prev_body);
        } else if (op <= 1) {
            new_id(id);
            snprintf(path, sizeof path, "/transfers");
            snprintf(body, sizeof body,
                     "{\"transfer_id\":\"%s\",\"from\":\"%s\",\"to\":\"%s\","
                     "\"amount\":%ld}", id, account_ids[a], account_ids[b],
                     amount);
        } else {
            new_id(id);
            snprintf(path, sizeof path, "/accounts/%s/%s", account_ids[a],
                     op == 2 ? "deposits" : "withdrawals");
            snprintf(body, sizeof body, "{\"command_id\":\"%s\","
                     "\"amount\":%ld}", id, amount);
        }
        double t0 = now_s();
        json_t *answer = NULL;
        int status = request(&c, "POST", path, body, &answer);
        double dt = now_s() - t0;
        if (cl->n_lat < cl->cap_lat) cl->lat_us[cl->n_lat++] = (uint32_t)(dt * 1e6);
        count_status(&cl->t, status);
        if (resend) {
            cl->t.resent++;
            /* The same request must get the same answer (version and
             * balance), unless the first one's outcome was unknown. */
            bool same = status == prev_status &&
                        (answer == NULL || prev_answer == NULL ||
                         json_equal(answer, prev_answer));
            if (prev_status > 0 && status > 0 && status != 503 &&
                prev_status != 503 && !same)
                cl->t.resend_mismatch++;
            json_decref(answer);
            continue;
        }
        bool is_transfer = strcmp(path, "/transfers") == 0;
        if (status >= 200 && status < 300) {
            cl->t.ok++;
            if (is_transfer) {
                void *items = cl->transfers;
                if (cl->n_transfers == cl->cap_transfers) {
                    cl->cap_transfers = cl->cap_transfers ? 2 * cl->cap_transfers
                                                          : 1024;
                    items = realloc(cl->transfers, cl->cap_transfers *
                                                       sizeof(transfer_rec));
                    if (items == NULL) abort();
                    cl->transfers = items;
                }
                snprintf(cl->transfers[cl->n_transfers++].id,
                         ES_UUID_STRLEN + 1, "%s", id);
            } else if (op == 2) {
                cl->t.deposited += amount;
            } else {
                cl->t.withdrawn += amount;
            }
        } else if (status < 0 || status == 503) {
            if (status < 0) cl->t.unknown++;
            else cl->t.failed++;
            if (!is_transfer) cl->t.unknown_money += amount;
        } else {
            cl->t.rejected++;
        }
        json_decref(prev_answer);
        prev_answer = answer;
        prev_status = status;
        snprintf(prev_path, sizeof prev_path, "%s", path);
        snprintf(prev_body, sizeof prev_body, "%s", body);
    }
    json_decref(prev_answer);
    conn_close(&c);
    return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bank-load [--host IP] [--port N] [--clients N] "
            "[--seconds S] [--accounts N] [--resend FRACTION] [--seed N] "
            "[--json FILE]\n");
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v == NULL) {
            usage();
            return 2;
        }
        if (strcmp(a, "--host") == 0) snprintf(opt.host, sizeof opt.host, "%s", v);
        else if (strcmp(a, "--port") == 0) opt.port = atoi(v);
        else if (strcmp(a, "--clients") == 0) opt.clients = atoi(v);
        else if (strcmp(a, "--seconds") == 0) opt.seconds = atof(v);
        else if (strcmp(a, "--accounts") == 0) opt.accounts = atoi(v);
        else if (strcmp(a, "--resend") == 0) opt.resend = atof(v);
        else if (strcmp(a, "--seed") == 0) opt.seed = (unsigned)atoi(v);
        else if (strcmp(a, "--json") == 0) opt.json_out = v;
        else {
            usage();
            return 2;
        }
        i++;
    }
    if (opt.clients < 1 || opt.accounts < 2 || opt.seconds <= 0) {
        usage();
        return 2;
    }
    printf("bank-load: seed %u, %d clients, %d accounts, %.1f s, resend "
           "%.0f%%\n", opt.seed, opt.clients, opt.accounts, opt.seconds,
           opt.resend * 100);

    /* Open the accounts. */
    account_ids = calloc((size_t)opt.accounts, sizeof *account_ids);
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
            fprintf(stderr, "bank-load: cannot open accounts (HTTP %d)\n", st);
            return 1;
        }
        opened += INITIAL_BALANCE;
    }

    /* The load. */
    client *cls = calloc((size_t)opt.clients, sizeof *cls);
    pthread_t *th = calloc((size_t)opt.clients, sizeof *th);
    double t0 = now_s();
    for (int i = 0; i < opt.clients; i++) {
        cls[i].index = i;
        cls[i].seed = opt.seed * 7919u + (unsigned)i;
        cls[i].until = t0 + opt.seconds;
        cls[i].cap_lat = MAX_LAT / (size_t)opt.clients;
        cls[i].lat_us = malloc(cls[i].cap_lat * sizeof(uint32_t) + 4);
        pthread_create(&th[i], NULL, client_main, &cls[i]);
    }
    totals t = {0};
    size_t n_lat = 0, n_transfers = 0;
    for (int i = 0; i < opt.clients; i++) pthread_join(th[i], NULL);
    double elapsed = now_s() - t0;
    for (int i = 0; i < opt.clients; i++) {
        totals *x = &cls[i].t;
        t.ok += x->ok;
        t.rejected += x->rejected;
        t.failed += x->failed;
        t.unknown += x->unknown;
        t.resent += x->resent;
        t.resend_mismatch += x->resend_mismatch;
        t.deposited += x->deposited;
        t.withdrawn += x->withdrawn;
        t.unknown_money += x->unknown_money;
        for (int k = 0; k < 6; k++) t.by_status[k] += x->by_status[k];
        n_lat += cls[i].n_lat;
        n_transfers += cls[i].n_transfers;
    }
    uint32_t *lat = malloc(n_lat * sizeof *lat + 4);
    size_t k = 0;
    for (int i = 0; i < opt.clients; i++) {
        memcpy(lat + k, cls[i].lat_us, cls[i].n_lat * sizeof *lat);
        k += cls[i].n_lat;
    }
    qsort(lat, n_lat, sizeof *lat, cmp_u32);
    uint64_t total_req = n_lat;
    double p50 = n_lat ? lat[n_lat / 2] / 1000.0 : 0;
    double p99 = n_lat ? lat[n_lat * 99 / 100] / 1000.0 : 0;

    /* Settle: every acknowledged transfer completes or is refunded. */
    uint64_t settled = 0, unsettled = 0, completed = 0, refunded = 0;
    double deadline = now_s() + 60;
    for (int i = 0; i < opt.clients; i++) {
        for (size_t j = 0; j < cls[i].n_transfers; j++) {
            char path[128];
            snprintf(path, sizeof path, "/transfers/%s",
                     cls[i].transfers[j].id);
            const char *status = NULL;
            for (;;) {
                json_t *ans = NULL;
                int st = request(&c, "GET", path, NULL, &ans);
                status = st == 200 ? json_string_value(json_object_get(
                                         ans, "status"))
                                   : NULL;
                bool done = status && strcmp(status, "pending") != 0;
                if (done) {
                    if (strcmp(status, "completed") == 0) completed++;
                    else refunded++;
                }
                json_decref(ans);
                if (done) {
                    settled++;
                    break;
                }
                if (now_s() > deadline) {
                    unsettled++;
                    break;
                }
                usleep(20000);
            }
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
    int64_t expected = opened + t.deposited - t.withdrawn;
    int64_t diff = sum - expected;
    /* Requests whose outcome is unknown may or may not have happened. */
    bool money_ok = diff >= -t.unknown_money && diff <= t.unknown_money;
    bool ok = money_ok && negative == 0 && missing == 0 && unsettled == 0 &&
              t.resend_mismatch == 0;

    printf("load held:        %.0f requests/s over %.1f s (%llu requests, "
           "p50 %.2f ms, p99 %.2f ms)\n", total_req / elapsed, elapsed,
           (unsigned long long)total_req, p50, p99);
    printf("answers:          %llu ok, %llu rejected, %llu unavailable, "
           "%llu unknown, %llu re-sent\n", (unsigned long long)t.ok,
           (unsigned long long)t.rejected, (unsigned long long)t.failed,
           (unsigned long long)t.unknown, (unsigned long long)t.resent);
    printf("transfers:        %zu acknowledged, %llu completed, %llu "
           "refunded, %llu unsettled\n", n_transfers,
           (unsigned long long)completed, (unsigned long long)refunded,
           (unsigned long long)unsettled);
    printf("money:            balances %lld, expected %lld, diff %lld "
           "(unknown outcomes cover %lld)\n", (long long)sum,
           (long long)expected, (long long)diff, (long long)t.unknown_money);
    printf("negative:         %llu   missing accounts: %llu   re-sent "
           "answered differently: %llu\n", (unsigned long long)negative,
           (unsigned long long)missing,
           (unsigned long long)t.resend_mismatch);
    printf("RESULT:           %s\n", ok ? "OK: no money created, lost or "
                                          "moved twice" : "FAILED");
    json_t *j = json_pack(
        "{s:I,s:f,s:f,s:f,s:f,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,"
        "s:I,s:I,s:b}",
        "seed", (json_int_t)opt.seed, "seconds", elapsed, "requests_per_s",
        total_req / elapsed, "p50_ms", p50, "p99_ms", p99, "ok",
        (json_int_t)t.ok, "rejected", (json_int_t)t.rejected, "unavailable",
        (json_int_t)t.failed, "unknown", (json_int_t)t.unknown, "resent",
        (json_int_t)t.resent, "transfers", (json_int_t)n_transfers,
        "unsettled", (json_int_t)unsettled, "money_diff", (json_int_t)diff,
        "unknown_money", (json_int_t)t.unknown_money, "negative",
        (json_int_t)negative, "missing", (json_int_t)missing,
        "resend_mismatch", (json_int_t)t.resend_mismatch, "refunded",
        (json_int_t)refunded, "ok_all", ok);
    char *text = json_dumps(j, JSON_COMPACT);
    printf("JSON %s\n", text);
    if (opt.json_out) {
        FILE *f = fopen(opt.json_out, "w");
        if (f) {
            fprintf(f, "%s\n", text);
            fclose(f);
        }
    }
    free(text);
    json_decref(j);
    for (int i = 0; i < opt.clients; i++) {
        free(cls[i].lat_us);
        free(cls[i].transfers);
    }
    free(cls);
    free(th);
    free(lat);
    free(account_ids);
    return ok ? 0 : 1;
}
