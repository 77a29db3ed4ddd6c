/*
 * The private header of the PostgreSQL store (libpq): what its files
 * share.  Never installed.
 *
 * Every value goes as a binary parameter and every result comes back in
 * binary, so payloads are bytes end to end (no escaping).  Names of the
 * schema and tables are validated when they are set and quoted in every
 * statement; the statements are built once, when the store opens
 * (sql.c).
 *
 * The files, one concern each:
 *   config.c    the configuration: names, keys, connection strings
 *   conninfo.c  the connection options every connection gets
 *   sql.c       the text of every statement
 *   wire.c      SQLSTATEs and errors, binary values and columns
 *   conn.c      round trips that must not wait for ever, the pool,
 *               transactions
 *   crypto.c    encryption at rest: sealing, the keyring, data keys
 *   read.c      streams, events, snapshots, command ids, side effects
 *   write.c     a save's events, side effects, snapshots, command ids
 *   outbox.c    the outbox's statements (eventastic/outbox.h)
 *   watch.c     the outbox watch: LISTEN on a connection of its own
 *   batch.c     the batch writer's statements and RETURNING bookkeeping
 *   lane_rt.c   a commit lane's round trips (pipelines on the loop)
 *   lane.c      the commit lane's state machine
 *   lane_keys.c the data keys of a lane's batch
 *   migrate.c   es_pg_migrate, es_pg_schema_version
 *   migrations.c the migrations' SQL
 *   store.c     open, forget, status; the backend's function table
 *
 * Lock rule: `lock` guards the pool (idle, n_idle, n_open).  Connections
 * are made and closed outside it.  A connection belongs to one
 * transaction at a time; it goes back to the pool only when it is healthy
 * and idle (no transaction open), otherwise it is closed.
 */
#ifndef ES_PG_INT_H
#define ES_PG_INT_H

#include <errno.h>
#include <fcntl.h>
#include <event2/event.h>
#include <libpq-events.h>
#include <libpq-fe.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "eventastic/postgres.h"
#include "store/pg/conninfo.h"
#include "store/pg/migrations.h"
#include "store/pg/statements.h"
#include "store/batch_ops.h"
#include "store/read_ops.h"
#include "store/store_impl.h"

/* Type oids of the built-in types we send (pg_type.h is server-side). */
#define OID_INT8 20
#define OID_INT4 23
#define OID_TEXT 25
#define OID_UUID 2950
#define OID_INT8_ARRAY 1016
#define OID_INT4_ARRAY 1007
#define OID_BYTEA_ARRAY 1001
#define OID_UUID_ARRAY 2951
#define OID_TEXT_ARRAY 1009
#define OID_BYTEA 17

#define N_TABLES 7
#define NAME_BUF (ES_PG_NAME_MAX + 1)
#define MAX_PAYLOAD 0x3fffffffu /* PostgreSQL's field limit, 1 GiB - 1 */
#define LOST_SQLSTATE "08006"

/* A master key: wraps the data keys of aggregates. */
typedef struct pg_key {
    char id[ES_PG_KEY_ID_MAX + 1];
    uint8_t key[ES_PG_KEY_BYTES];
} pg_key;

struct es_pg_config {
    char *conninfo; /* NULL: DATABASE_URL */
    pg_key *keys;   /* oldest first; the last is the newest */
    size_t n_keys;
    es_pg_key_provider provider; /* wrap == NULL: none */
    char schema[NAME_BUF];
    char tables[N_TABLES][NAME_BUF];
    size_t pool_size;
    size_t chunk;
    int64_t statement_timeout_ms; /* 0: the server's setting */
    bool no_notify; /* es_pg_config_set_outbox_notify(false) */
};

enum {
    SQL_INSERT_EVENTS,
    SQL_STREAM,
    SQL_STREAM_REST,
    SQL_TYPE_OF,
    SQL_GET_EVENT,
    SQL_INSERT_SIDE_EFFECTS,
    SQL_LIST_SIDE_EFFECTS,
    SQL_GET_SNAPSHOT,
    SQL_STORE_SNAPSHOT,
    SQL_DELETE_SNAPSHOTS,
    SQL_GET_KEY,
    SQL_LOCK_KEY,
    SQL_PUT_KEY,
    SQL_FORGET_KEY,
    SQL_FORGET_SIDE_EFFECTS,
    SQL_FORGET_REASONS,
    SQL_OB_EXPIRE,
    SQL_OB_CLAIM,
    SQL_OB_DEAD,
    SQL_OB_FINISH,
    SQL_OB_FINISH_MANY,
    SQL_OB_EXISTS,
    SQL_OB_LIST,
    SQL_OB_GET,
    SQL_OB_REQUEUE_ID,
    SQL_OB_REQUEUE_TYPE,
    SQL_OB_PURGE,
    SQL_OB_STATS,
    SQL_INSERT_COMMANDS,
    SQL_GET_COMMAND,
    SQL_PURGE_COMMANDS,
    SQL_STATUS_VERSION,
    SQL_STATUS_COUNTS,
    SQL_BATCH_EVENTS,
    SQL_BATCH_SIDE_EFFECTS,
    SQL_READ_ALL,
    SQL_HEAD,
    SQL_LAG,
    SQL_CP_GET,
    SQL_CP_PUT,
    SQL_CP_DELETE,
    SQL_CP_LIST,
    SQL_COUNT
};

typedef struct pg_store {
    struct es_store base;
    char *conninfo;
    char *password; /* to scrub from messages; NULL when none given */
    size_t chunk;
    int64_t statement_timeout_ms;
    bool notify; /* commits of side effects send NOTIFY */
    pg_key *keys; /* a copy of the config's (the built-in provider) */
    size_t n_keys;
    bool encrypt;                /* keys or a provider were given */
    es_pg_key_provider provider; /* wraps the data keys */
    char *sql[SQL_COUNT];
    char migrations[2 * NAME_BUF + 8]; /* quoted, for es_pg_status_get */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    PGconn **idle; /* capacity max */
    size_t n_idle, n_open, max;
    /* NOTIFY channel of the outbox table: "es_outbox_" and a hash of its
     * qualified name (any name fits in 63 bytes, and holds no quote). */
    char channel[32];
    /* NOTIFY channel of the events table ("es_events_" and a hash), and
     * the announcer that notifies it after commits (announce.c). */
    char events_channel[32];
    struct {
        pthread_mutex_t lock; /* guards started, pending, stop */
        pthread_cond_t cond;
        bool started, pending, stop;
        pthread_t thread;
        PGconn *conn; /* the announcer thread's */
    } ann;
    atomic_size_t claim_turn; /* which type an outbox claim starts with */
    /* Backends of bounded transactions dropped in their COMMIT (the
     * fallback writer's): one that lives may still commit, so every
     * lane's read back asks them to end and waits until they have (see
     * lane_resolve_ask).  pid 0: a free slot.  Under lock. */
    struct {
        int pid;
        char start[64];
    } cut_commits[8];
} pg_store;

/* Data keys a transaction has opened, so that each is read once.  Cleared
 * when a savepoint rolls back (a key made after it is gone) and wiped
 * when the transaction ends. */
#define DEK_CACHE 8

typedef struct dek_entry {
    es_uuid agg;
    uint8_t dek[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
    char kek[ES_PG_KEY_ID_MAX + 1]; /* the master key that wraps it */
    bool locked; /* read FOR SHARE: a concurrent forget waits for us */
} dek_entry;

typedef struct pg_txn {
    struct es_txn base;
    PGconn *conn;
    dek_entry dek[DEK_CACHE];
    size_t n_dek, next_dek;
    unsigned depth;   /* savepoints open */
    unsigned cursors; /* stream cursors made, for unique names */
    bool wrote_side_effects; /* wake dispatchers after commit */
    bool wrote_events;       /* wake readers after commit */
    bool lazy; /* read-only: BEGIN only when a read needs it */
    PGconn **own; /* begin_background: the caller's slot, not the pool */
    int pid;        /* begin_bounded: its backend, */
    char start[64]; /* and that backend's backend_start */
} pg_txn;

/* Every parameter is binary; as many entries as the most parameters of a
 * statement (the commands' 9). */
#define MAX_PARAMS 9

/* Associated data: what a ciphertext belongs to.  A tag byte keeps the
 * kinds of rows apart. */
typedef struct ad_buf {
    uint8_t b[1 + 3 * 16 + ES_PG_KEY_ID_MAX];
    size_t n;
} ad_buf;

/* The columns of the commands table, as arrays (one element a record). */
#define COMMAND_COLS 9

typedef struct rowref {
    es_uuid id;
    uint64_t version;
    size_t item;
} rowref;

/* The data keys of the batch's aggregates, read (or made) once per
 * transaction, before the savepoint: a rollback to it keeps them. */
typedef struct batch_keys {
    dek_entry *e; /* sorted by aggregate id */
    size_t n;
} batch_keys;

/* The batch's statements are prepared once per lane connection and then
 * only bound and executed: parsing and planning them for every batch
 * took about 42% of PostgreSQL's CPU time (perf, bench_pg).  Their
 * parameter types are fixed here, as they are built below. */
enum { BATCH_EVENTS, BATCH_COMMANDS, BATCH_SIDE_EFFECTS, BATCH_STMTS };
#define BATCH_PARAMS COMMAND_COLS /* the most a batch statement has */

/* One statement of a batch's pipeline: its array parameters and, for the
 * events and the command ids, which item each row is of. */
typedef struct pstmt {
    const char *what, *name; /* name: prepared (es__pg_batch_stmts) */
    int n;
    Oid types[BATCH_PARAMS];
    es_buf buf[BATCH_PARAMS]; /* arrays; the side effects' 8th is plain */
    rowref *refs; /* sorted by (id, version) once built */
    size_t rows;
    bool sent;
} pstmt;

typedef struct pg_lane pg_lane;

/* Where a commit lane is (the diagram is in lane.c): connecting, or the
 * round trip under way, whose results the state's step reads. */
typedef enum lane_state {
    LANE_IDLE,         /* nothing under way */
    LANE_CONNECTING,   /* PQconnectPoll until the connection is made */
    LANE_PREPARING,    /* the session settings and the batch statements */
    LANE_RESOLVING,    /* reading a COMMIT back by a command id */
    LANE_KEYS_READING, /* BEGIN and the batch's data keys, FOR SHARE */
    LANE_KEYS_STORING, /* the data keys that were missing, made */
    LANE_WRITING,      /* [BEGIN,] SAVEPOINT, events, commands, effects */
    LANE_COMMITTING,   /* COMMIT */
    LANE_ROLLING_BACK  /* ROLLBACK */
} lane_state;

/* What a lane does once its connection is ready (or could not be had). */
typedef enum lane_then {
    LANE_THEN_RESOLVE, /* read a COMMIT back */
    LANE_THEN_WRITE    /* the next transaction of the batch */
} lane_then;

/* Who asked for a COMMIT to be read back, and so gets its outcome. */
typedef enum lane_resolve_for {
    LANE_FOR_ENTRY, /* a batch that came with items ES__COMMIT_UNKNOWN */
    LANE_FOR_COMMIT /* this lane's own COMMIT, whose answer was lost */
} lane_resolve_for;

struct pg_lane {
    pg_store *s;
    struct event_base *base;
    struct event *ev; /* the connection's socket */
    PGconn *conn;
    lane_state state; /* what it waits for (lane.c) */
    lane_then then; /* once connected and prepared, or not */
    PGresult **res;   /* the round trip's results, in order, no sync */
    size_t n_res, cap_res;
    bool res_oom;
    /* the batch */
    es__commit_item **items;
    size_t n;
    es__batch_done done;
    void *ud;
    size_t committed;
    es__batch_timing timing; /* this batch's, for the host's metrics */
    uint64_t t_commit;       /* when COMMIT was sent (ns), 0: not */
    int lost; /* transactions lost with their connection, this batch */
    bool begun, first, side_effects;
    bool setup;    /* a new connection: SET its session settings */
    bool new_conn; /* lane_ensure made a new connection */
    int n_head;        /* statements before the batch's in a round trip */
    int key_attempt;
    batch_keys keys;
    size_t keys_cap;
    es_uuid *need; /* the aggregates whose keys a round trip asks for */
    size_t n_need;
    dek_entry *made; /* keys made for need[], stored by the round trip */
    pstmt st[3];
    const es__command_record *probe;
    lane_resolve_for resolve_for;
    /* The connection's backend as pg_stat_activity names it (pid and
     * backend_start, which tells it from a later backend with the same
     * pid); "" when it could not be read.  The orphan: the backend of a
     * connection dropped in a transaction (es__pg_lane_drop).  While it lives
     * (a half-open connection, a stopped server process) it holds the
     * rows it wrote, and if its COMMIT was sent it may still commit: a
     * read back that does not find the batch proves nothing, and the
     * batch written again waits on those rows.  So the read back asks it
     * to end (lane_orphan_send) and waits, with the host's backoff,
     * until it has; the next writes ask it to end and go on (no COMMIT
     * reached it, or it was read back: it cannot commit). */
    char conn_start[64];
    int orphan_pid;
    char orphan_start[64];
    bool asked_orphan;
    /* A COMMIT of the fallback writer cut off (cut_commits) that this
     * read back asked about: it counts as an orphan. */
    int cut_pid;
    char cut_start[64];
    es_error err;
};

/* sql.c */
typedef struct sql_entry {
    const char *name;
    bool admin;
} sql_entry;
extern const sql_entry es__pg_sql_info[SQL_COUNT];
__attribute__((format(printf, 1, 2))) char *es__pg_sqlf(const char *fmt, ...);
int es__pg_build_sql(pg_store *s, const es_pg_config *cfg);
/* The read side's statements (subscribe.c); e: the quoted events table. */
void es__pg_build_read_sql(pg_store *s, const es_pg_config *cfg,
                           const char *e);

/* wire.c */
extern const int es__pg_binary_formats[MAX_PARAMS];
void es__pg_scrub(char *out, size_t cap, const char *msg, const char *secret);
bool es__pg_conn_lost(PGconn *c, const PGresult *r);
int es__pg_db_error(PGconn *c, const PGresult *r, es_error *err,
                    const char *what);
void es__pg_be32(uint8_t *p, uint32_t v);
void es__pg_be64(uint8_t *p, uint64_t v);
uint64_t es__pg_get64(const uint8_t *p);
int es__pg_put32(es_buf *b, uint32_t v);
int es__pg_array_begin(es_buf *b, Oid elem, size_t n);
int es__pg_array_item(es_buf *b, const void *data, size_t len);
int es__pg_array_i64(es_buf *b, int64_t v);
int es__pg_array_i32(es_buf *b, int32_t v);
bool es__pg_col_uuid(const PGresult *r, int row, int col, es_uuid *out);
bool es__pg_col_u64(const PGresult *r, int row, int col, uint64_t *out);
bool es__pg_col_i32(const PGresult *r, int row, int col, int32_t *out);
bool es__pg_col_bytes(const PGresult *r, int row, int col, const uint8_t **data,
                      size_t *len);
int es__pg_bad_row(es_error *err, const char *what);

/* config.c */
void es__pg_qualify(char *out, size_t cap, const char *schema,
                    const char *table);
bool es__pg_key_id_valid(const char *id);
int es__pg_conninfo_check(const char *conninfo, char **password, es_error *err);
int es__pg_resolve_conninfo(const es_pg_config *cfg, const char **out,
                            es_error *err);

/* conn.c */
int es__pg_run(PGconn *c, const char *what, const char *sql, int n,
               const Oid *types, const char *const *values, const int *lens,
               PGresult **out, es_error *err);
int es__pg_run_simple(PGconn *c, const char *what, const char *sql,
                      es_error *err);
void es__pg_quiet_notices(void *arg, const char *message);
int es__pg_connect(const char *conninfo, const char *password, PGconn **out,
                   es_error *err);
int es__pg_store_connect(pg_store *s, PGconn **out, es_error *err);
int es__pg_pool_get(pg_store *s, PGconn **out, bool bounded, es_error *err);
void es__pg_pool_put(pg_store *s, PGconn *c);
void es__pg_dek_cache_clear(pg_txn *t);
int es__pg_begin(es_store *store, es_txn **out, es_error *err);
int es__pg_begin_bounded(es_store *store, es_txn **out, es_error *err);
int es__pg_begin_read(es_store *store, es_txn **out, es_error *err);
/* In a read-only transaction (lazy), BEGIN if none is open yet. */
int es__pg_txn_open(pg_txn *t, es_error *err);
bool es__pg_commit_cut(const PGresult *r);
int es__pg_begin_background(es_store *store, void **slot, es_txn **out,
                            es_error *err);
void es__pg_background_close(es_store *store, void *conn);
int es__pg_commit(es_txn *txn, es_error *err);
void es__pg_rollback(es_txn *txn);
int es__pg_savepoint(es_txn *txn, es_error *err);
int es__pg_rollback_to(es_txn *txn, es_error *err);
int es__pg_release(es_txn *txn, es_error *err);

/* crypto.c */
void es__pg_ad_event(ad_buf *ad, const es_uuid *agg, uint64_t version);
void es__pg_ad_snapshot(ad_buf *ad, const es_uuid *agg, uint64_t sv,
                        uint64_t version);
void es__pg_ad_side_effect(ad_buf *ad, const es_side_effect *se);
void es__pg_ad_rejection(ad_buf *ad, const es_uuid *command_id,
                         const es_uuid *agg);
int es__pg_seal_append(es_buf *b, const uint8_t *key, const ad_buf *ad,
                       const uint8_t *pt, size_t len);
int es__pg_array_sealed(es_buf *b, const uint8_t *key, const ad_buf *ad,
                        const uint8_t *pt, size_t len);
int es__pg_keyring_current(void *ud, char key_id[ES_PG_KEY_ID_MAX + 1],
                           es_error *err);
int es__pg_keyring_wrap(void *ud, const char *key_id,
                        const es_uuid *aggregate_id,
                        const uint8_t dek[ES_PG_KEY_BYTES],
                        uint8_t out[ES_PG_WRAPPED_MAX], size_t *len,
                        es_error *err);
int es__pg_keyring_unwrap(void *ud, const char *key_id,
                          const es_uuid *aggregate_id, const uint8_t *wrapped,
                          size_t len, uint8_t dek[ES_PG_KEY_BYTES],
                          es_error *err);
int es__pg_forgotten(es_error *err, const es_uuid *agg);
int es__pg_dek_from_row(pg_store *s, const es_uuid *agg, const PGresult *r,
                        int row, bool locked, dek_entry *e, es_error *err);
int es__pg_dek_new(pg_store *s, const es_uuid *agg, dek_entry *e,
                   uint8_t wrapped[ES_PG_WRAPPED_MAX], size_t *wlen,
                   es_error *err);
int es__pg_get_dek(pg_txn *t, const es_uuid *agg, bool create,
                   const dek_entry **out, es_error *err);
int es__pg_open_row(pg_txn *t, const es_uuid *agg, const PGresult *r, int row,
                    int key_col, const ad_buf *ad, es_buf *buf,
                    const uint8_t **data, size_t *len, es_error *err);

/* read.c */
int es__pg_stream(es_txn *txn, const char *type_name, const es_uuid *agg,
                  uint64_t from, int (*fn)(void *ud, const es_event *event),
                  void *ud, es_error *err);
int es__pg_get_event(es_txn *txn, const es_uuid *agg, const es_uuid *event_id,
                     es_event **out, es_error *err);
extern const Oid es__pg_command_elems[COMMAND_COLS];
int es__pg_command_row(es_buf b[COMMAND_COLS], const es__command_record *c,
                       const dek_entry *key);
int es__pg_insert_commands(es_txn *txn, const es__command_record *recs,
                           size_t n, bool *inserted, es_error *err);
int es__pg_get_command(es_txn *txn, const es_uuid *command_id,
                       es__command_record **out, es_error *err);
int es__pg_get_snapshot(es_txn *txn, const char *type_name, const es_uuid *agg,
                        uint64_t sv, es_snapshot **out, es_error *err);
int es__pg_list_side_effects(es_txn *txn, const es_uuid *agg,
                             es_side_effect_list **out, es_error *err);

/* write.c */
int es__pg_insert_events(es_txn *txn, const char *type_name, const es_uuid *agg,
                         const es_event *events, size_t n, bool *inserted,
                         es_error *err);
int es__pg_insert_side_effects(es_txn *txn, const char *type_name,
                               const es_side_effect *items, size_t n,
                               es_error *err);
int es__pg_store_snapshot(es_txn *txn, const es_snapshot *snap, es_error *err);
int es__pg_delete_snapshots(es_txn *txn, const es_uuid *agg, es_error *err);

/* outbox.c */
bool es__pg_col_i64(const PGresult *r, int row, int col, int64_t *out);
int es__pg_entry_read(pg_txn *t, const PGresult *r, int row, es_outbox_entry *e,
                      es_buf *plain, es_error *err);
int es__pg_outbox_claim(es_store *store, const char *owner, int64_t now,
                        int64_t lease_ms, uint32_t max_attempts,
                        const es__outbox_filter *filters, size_t nf, size_t max,
                        es_outbox_entry_list **out, es_error *err);
int es__pg_outbox_finish(es_store *store, const es_uuid *id, const char *owner,
                         es_outbox_status status, int64_t now, int64_t next_ms,
                         const char *error, es_error *err);
int es__pg_outbox_finish_many(es_store *store, const char *owner, int64_t now,
                              const es__outbox_outcome *v, size_t n,
                              size_t *lost, es_error *err);
int es__pg_outbox_list(es_store *store, es_outbox_status status, size_t limit,
                       es_outbox_entry_list **out, es_error *err);
int es__pg_outbox_get(es_store *store, const es_uuid *id, es_outbox_entry **out,
                      es_error *err);
int es__pg_outbox_requeue(es_store *store, const es_uuid *id,
                          const char *type_name, int32_t kind, int64_t now,
                          size_t *count, es_error *err);
int es__pg_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                        size_t *count, es_error *err);
int es__pg_purge_commands(es_store *store, int64_t before_ms, size_t limit,
                          size_t *count, es_error *err);
int es__pg_outbox_stats(es_store *store, int64_t now, es_outbox_stats *out,
                        es_error *err);

/* watch.c */
int es__pg_outbox_watch(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                        void *ud, es__outbox_watch **out, es_error *err);
void es__pg_outbox_unwatch(es__outbox_watch *w);

/* batch.c */
int es__pg_dek_cmp(const void *a, const void *b);
void es__pg_batch_keys_free(batch_keys *k);
typedef struct batch_stmt {
    const char *name;
    int sql;
    int n;
    Oid types[BATCH_PARAMS];
} batch_stmt;
extern const batch_stmt es__pg_batch_stmts[BATCH_STMTS];
int es__pg_batch_evproc(PGEventId id, void *info, void *pass);
void es__pg_pstmt_free(pstmt *p);
int es__pg_pstmt_send(PGconn *c, pstmt *p, es_error *err);
int es__pg_build_events(pg_store *s, const batch_keys *keys,
                        es__commit_item **items, size_t n, pstmt *p,
                        es_error *err);
int es__pg_apply_events(es__commit_item **items, size_t n, const pstmt *p,
                        const PGresult *res, bool *failed, es_error *err);
int es__pg_build_commands(pg_store *s, const batch_keys *keys,
                          es__commit_item **items, size_t n, pstmt *p,
                          es_error *err);
int es__pg_apply_commands(es__commit_item **items, size_t n, const pstmt *p,
                          const PGresult *res, bool *failed, es_error *err);
int es__pg_build_side_effects(pg_store *s, const batch_keys *keys,
                              es__commit_item **items, size_t n, pstmt *p,
                              es_error *err);

/* lane_rt.c */
void es__pg_lane_results_clear(pg_lane *l);
void es__pg_lane_drop(pg_lane *l);
bool es__pg_lane_wait(pg_lane *l, short what, const struct timeval *tv);
void es__pg_lane_lost(pg_lane *l, const char *what);
int64_t es__pg_silence_ms(const pg_store *s);
bool es__pg_lane_rt_begin(pg_lane *l);
void es__pg_lane_rt_go(pg_lane *l, bool sent, lane_state state);
bool es__pg_res_ok(const PGresult *r);
const PGresult *es__pg_lane_res(const pg_lane *l, size_t i);
void es__pg_lane_io(evutil_socket_t fd, short what, void *arg);

/* lane.c */
void es__pg_lane_step(pg_lane *l, lane_state state, bool ok);
void es__pg_lane_connect_poll(pg_lane *l, short what);
void es__pg_txn_failed(pg_lane *l);
void es__pg_txn_rollback(pg_lane *l);
void es__pg_txn_write(pg_lane *l);
void es__pg_lane_write(es__batch_lane *lane, es__commit_item **items, size_t n,
                       es__batch_done done, void *ud);
int es__pg_lane_open(es_store *store, struct event_base *base,
                     es__batch_lane **out, es_error *err);
void es__pg_lane_close(es__batch_lane *lane);
size_t es__pg_write_batch(es_store *store, void **slot, es__commit_item **items,
                          size_t n);

/* lane_keys.c */
void es__pg_keys_stored(pg_lane *l, bool ok);
void es__pg_keys_read(pg_lane *l, bool ok);
void es__pg_keys_load(pg_lane *l);

/* store.c */
extern const es_store_ops es__pg_ops;

/* migrate.c */
uint64_t es__pg_fnv1a(const char *s);
int es__pg_migrate_in(PGconn *c, const es_pg_config *cfg, int *newest,
                      es_error *err);

/* ---- subscribe.c: the read side (store/read_ops.h) ---- */
extern const es__read_ops es__pg_read_ops;

/* ---- announce.c: NOTIFY the events channel after commits ---- */
void es__pg_announcer_init(pg_store *s);
/* A commit of this process stored events (any thread). */
void es__pg_announce(pg_store *s);
/* At close: the thread ends, its connection is closed. */
void es__pg_announcer_stop(pg_store *s);
/* A watch of the events channel (watch.c), for the read side. */
int es__pg_events_watch(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                        void *ud, es__outbox_watch **out, es_error *err);

#endif
