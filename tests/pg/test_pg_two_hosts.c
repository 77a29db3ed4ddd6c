/*
 * Two hosts in two processes on one database, hammering the same 100
 * keys.  Each process (this binary run as `child`) holds its own copy of
 * every aggregate; when the other process took a version first, the
 * commit conflicts and the host reloads the aggregate and decides again.
 * Checked afterwards, in the database: versions run 0..n-1 without gaps
 * for every key; every acknowledged command is stored exactly once, no
 * failed one is stored (ES_EUNKNOWN may be), every event belongs to
 * exactly one command; each key's state, loaded the host's way (the
 * snapshots the hosts wrote, then the events after them), equals a replay
 * of all its events from the first.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"

extern char **environ;

#define KEYS 100
#define THREADS 8    /* client threads per process */
#define PER_THREAD 150

static es_store *g_store;
static char g_schema[64];


/* ---- the child: one host, THREADS clients ---- */

typedef struct outcome {
    int key;
    es_uuid id;
    int status;
} outcome;

typedef struct client {
    es_host *host;
    const es_uuid *keys;
    unsigned seed;
    outcome out[PER_THREAD];
} client;

static void *client_main(void *arg)
{
    client *c = arg;
    for (int i = 0; i < PER_THREAD; i++) {
        c->seed = c->seed * 1103515245u + 12345u;
        int k = (int)((c->seed >> 16) % KEYS);
        uint8_t value[4] = {1, 0, 0, 0};
        es_command cmd = {{{0}}, 1, value, 4};
        es_uuid_v7(&cmd.id);
        int rc = es_host_call(c->host, &counter_type, &c->keys[k], &cmd,
                              NULL, NULL);
        c->out[i] = (outcome){k, cmd.id, rc};
    }
    return NULL;
}

/* child SCHEMA BASE-UUID SEED OUT: writes "key command-id status" lines. */
static int child_main(char **argv)
{
    es_uuid base, keys[KEYS];
    if (es_uuid_parse(argv[3], &base) != 0) return 2;
    for (int k = 0; k < KEYS; k++)
        keys[k] = fixture_derive_id(&base, (uint32_t)k);
    unsigned seed = (unsigned)strtoul(argv[4], NULL, 10);
    es_store *store = NULL;
    if (fixture_pg_open(argv[2], &store) != 0) return 2;
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    /* a snapshot every 10 events: the check compares them with replays */
    if (es_host_config_new(&cfg, NULL) != 0 ||
        es_host_config_set_workers(cfg, 2) != 0 ||
        es_host_config_set_snapshots(cfg, 10, true) != 0 ||
        es_host_config_add_type(cfg, &counter_type, counter_decide_add, NULL,
                                NULL) ||
        es_host_open(cfg, store, &host, NULL) != 0) {
        es_host_config_free(cfg);
        es_store_close(store);
        return 2;
    }
    es_host_config_free(cfg);
    static client clients[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        clients[i] = (client){host, keys, seed * 31u + (unsigned)i, {{0}}};
        pthread_create(&th[i], NULL, client_main, &clients[i]);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    es_host_metrics m;
    es_host_metrics_get(host, &m);
    int rc = es_host_shutdown(host, NULL);
    es_store_close(store);
    FILE *f = fopen(argv[5], "w");
    if (f == NULL) return 2;
    fprintf(f, "conflicts %llu\n", (unsigned long long)m.conflicts);
    for (int i = 0; i < THREADS; i++)
        for (int j = 0; j < PER_THREAD; j++) {
            char id[ES_UUID_STRLEN + 1];
            es_uuid_format(&clients[i].out[j].id, id);
            fprintf(f, "%d %s %d\n", clients[i].out[j].key, id,
                    clients[i].out[j].status);
        }
    return fclose(f) == 0 && rc == 0 ? 0 : 2;
}

/* ---- the parent ---- */

static pid_t spawn_child(const char *base, unsigned seed, const char *out)
{
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return -1;
    exe[n] = '\0';
    char seed_s[16];
    snprintf(seed_s, sizeof seed_s, "%u", seed);
    char *argv[] = {exe,    "child",      g_schema, (char *)base,
                    seed_s, (char *)out, NULL};
    pid_t pid;
    return posix_spawn(&pid, exe, NULL, NULL, argv, environ) == 0 ? pid
                                                                   : -1;
}

static int wait_child(pid_t pid)
{
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* One statement with text parameters; the first column of the first row
 * as a number, or -1 on error (printed). */
static long long query_num(PGconn *c, const char *sql, int n,
                           const char *const *params)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
    long long v = -1;
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
        v = atoll(PQgetvalue(r, 0, 0));
    else
        fprintf(stderr, "query: %s", PQerrorMessage(c));
    PQclear(r);
    return v;
}

/* Append an id to a '{a,b,...}' array literal. */
static void array_add(char **arr, size_t *len, const char *id)
{
    size_t need = *len + ES_UUID_STRLEN + 3;
    *arr = realloc(*arr, need);
    assert_non_null(*arr);
    if (*len == 0) (*arr)[(*len)++] = '{';
    else (*arr)[*len - 1] = ','; /* over the closing brace */
    memcpy(*arr + *len, id, ES_UUID_STRLEN);
    *len += ES_UUID_STRLEN;
    (*arr)[(*len)++] = '}';
    (*arr)[*len] = '\0';
}

static void test_pg_two_hosts_same_keys(void **state)
{
    (void)state;
    es_uuid base;
    es_uuid_v7(&base);
    char base_s[ES_UUID_STRLEN + 1];
    es_uuid_format(&base, base_s);
    char out[2][256];
    pid_t pid[2];
    for (int i = 0; i < 2; i++) {
        snprintf(out[i], sizeof out[i], "/tmp/es_two_hosts_%ld_%d.txt",
                 (long)getpid(), i);
        pid[i] = spawn_child(base_s, 1000u + (unsigned)i, out[i]);
        assert_true(pid[i] > 0);
    }
    int exit_code[2];
    for (int i = 0; i < 2; i++) exit_code[i] = wait_child(pid[i]);
    assert_int_equal(exit_code[0], 0);
    assert_int_equal(exit_code[1], 0);

    char *acked = NULL, *failed = NULL;
    size_t acked_len = 0, failed_len = 0;
    long long n_acked = 0, n_failed = 0, n_unknown = 0, conflicts = 0;
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(out[i], "r");
        assert_non_null(f);
        unsigned long long cf = 0;
        assert_int_equal(fscanf(f, "conflicts %llu\n", &cf), 1);
        conflicts += (long long)cf;
        int key, st;
        char id[64];
        while (fscanf(f, "%d %63s %d\n", &key, id, &st) == 3) {
            if (st == 0) {
                array_add(&acked, &acked_len, id);
                n_acked++;
            } else if (st == ES_EUNKNOWN) {
                n_unknown++;
            } else {
                array_add(&failed, &failed_len, id);
                n_failed++;
            }
        }
        fclose(f);
        unlink(out[i]);
    }
    printf("two hosts: %lld acknowledged, %lld failed, %lld unknown, "
           "%lld commits conflicted\n",
           n_acked, n_failed, n_unknown, conflicts);
    assert_int_equal(n_acked + n_failed + n_unknown,
                     2 * THREADS * PER_THREAD);
    assert_true(n_acked > 0);
    assert_true(conflicts > 0); /* the hosts did race */

    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    char q[1024];
    /* acknowledged, stored: each id once (command_id is the key) */
    snprintf(q, sizeof q,
             "SELECT count(*) FROM unnest($1::uuid[]) a(id) WHERE NOT "
             "EXISTS (SELECT 1 FROM \"%s\".commands c WHERE c.command_id = "
             "a.id)",
             g_schema);
    const char *p1[1] = {acked};
    assert_int_equal(query_num(c, q, 1, p1), 0);
    /* failed (not unknown): not stored */
    if (failed) {
        snprintf(q, sizeof q,
                 "SELECT count(*) FROM \"%s\".commands WHERE command_id = "
                 "ANY($1::uuid[])",
                 g_schema);
        const char *p2[1] = {failed};
        assert_int_equal(query_num(c, q, 1, p2), 0);
    }
    /* nothing else stored: the commands are the acknowledged ones and
     * perhaps some unknown ones */
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".commands", g_schema);
    long long stored = query_num(c, q, 0, NULL);
    assert_true(stored >= n_acked && stored <= n_acked + n_unknown);
    /* versions gap-free per key (and (aggregate, version) is the key) */
    snprintf(q, sizeof q,
             "SELECT count(*) FROM (SELECT aggregate_id FROM \"%s\".events "
             "GROUP BY aggregate_id HAVING min(version) <> 0 OR "
             "max(version) + 1 <> count(*)) g",
             g_schema);
    assert_int_equal(query_num(c, q, 0, NULL), 0);
    /* every event belongs to exactly one command record */
    snprintf(q, sizeof q,
             "SELECT count(*) FROM \"%s\".events e WHERE (SELECT count(*) "
             "FROM \"%s\".commands c WHERE c.aggregate_id = e.aggregate_id "
             "AND e.version >= c.first_version AND e.version < "
             "c.first_version + c.event_count) <> 1",
             g_schema, g_schema);
    assert_int_equal(query_num(c, q, 0, NULL), 0);
    snprintf(q, sizeof q,
             "SELECT (SELECT count(*) FROM \"%s\".events) - (SELECT "
             "coalesce(sum(event_count), 0) FROM \"%s\".commands)",
             g_schema, g_schema);
    assert_int_equal(query_num(c, q, 0, NULL), 0);
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".snapshots", g_schema);
    long long snaps = query_num(c, q, 0, NULL);
    PQfinish(c);
    free(acked);
    free(failed);

    /* each key: the host's way (snapshot + events) equals a full replay,
     * and the state counts the stored commands (one add each) */
    long long total = 0;
    for (int k = 0; k < KEYS; k++) {
        es_uuid key = fixture_derive_id(&base, (uint32_t)k);
        counter_context *fast = NULL;
        int rc = counter_store_load(g_store, &key, &fast, NULL);
        if (rc == ES_ENOTFOUND) continue;
        assert_int_equal(rc, 0);
        es_txn *txn = NULL;
        counter_context *full = NULL;
        assert_int_equal(es_store_begin(g_store, &txn, NULL), 0);
        assert_int_equal(es_txn_delete_snapshots(txn, &key, NULL), 0);
        assert_int_equal(counter_load(txn, &key, &full, NULL), 0);
        es_txn_rollback(txn); /* the snapshots stay */
        assert_int_equal(counter_version(fast), counter_version(full));
        assert_int_equal(counter_state(fast)->result,
                         counter_state(full)->result);
        assert_int_equal(counter_state(fast)->operations_count,
                         counter_state(full)->operations_count);
        assert_int_equal(counter_state(full)->result,
                         (int32_t)counter_version(full));
        total += counter_state(full)->result;
        counter_context_free(fast);
        counter_context_free(full);
    }
    assert_int_equal(total, stored);
    printf("two hosts: %lld commands stored, %lld snapshots checked "
           "against replays\n",
           stored, snaps);
    assert_true(snaps > 0);
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "child") == 0) return child_main(argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_two_hosts_same_keys),
    };
    static const fixture_pg_group group = {
        .store = &g_store, .prefix = "two_hosts_", .schema = g_schema,
        .cap = sizeof g_schema};
    return FIXTURE_PG_RUN("test_pg_two_hosts", tests, &group);
}
