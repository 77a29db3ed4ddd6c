/*
 * eventastic/postgres.h - the PostgreSQL store.
 *
 * A store on a PostgreSQL server (libpq), used through eventastic/store.h
 * and eventastic/context.h like any other store.  A configuration says
 * where the server is (a libpq connection string, or DATABASE_URL), in
 * which schema the tables are and what they are called, how many
 * connections the store may keep, and how many events a stream reads per
 * round trip.
 *
 *   es_pg_config *cfg = NULL;
 *   es_pg_config_new(&cfg, &err);
 *   es_pg_config_set_conninfo(cfg, "host=/run/pg dbname=bank", &err);
 *   es_pg_migrate(cfg, NULL, &err);         // create or upgrade the tables
 *   es_pg_store_open(cfg, &store, &err);
 *   es_pg_config_free(cfg);                 // the store keeps a copy
 *
 * Transactions run at READ COMMITTED; each holds one pooled connection
 * from es_store_begin until commit or rollback.  A connection that broke
 * (lost, or left in an unknown transaction state) is closed, never handed
 * out again.
 *
 * Errors from the server carry their SQLSTATE in es_error.sqlstate.  A
 * unique violation (23505) and a serialization failure or deadlock (40001,
 * 40P01) give ES_ECONFLICT: retrying the whole transaction is safe.  A
 * statement timeout or cancel (57014) gives ES_ETIMEDOUT.  Bad data (class
 * 22, e.g. invalid UTF-8) gives ES_EINVAL.  A lost connection gives ES_EDB
 * with SQLSTATE 08006 (set by the library), and ES_EUNKNOWN when it was lost
 * during COMMIT: the transaction may or may not have committed.  Other
 * server errors give ES_EDB.  Messages never hold the password of the
 * connection string.
 *
 * The outbox (eventastic/outbox.h) works on this store: side effects are
 * rows of the outbox table, written in the save's transaction; a claim is
 * a lease on rows taken with FOR UPDATE SKIP LOCKED, so dispatchers in
 * several processes share the work, each aggregate's messages one at a
 * time and in order.  Times are the dispatcher's clock (Unix ms).  Each
 * outbox operation takes a pooled connection of its own for a moment: do
 * not run a dispatcher round on a thread that holds every connection of
 * the pool in open transactions.  A claim reads every pending message to
 * find each aggregate's first (its cost grows with the pending backlog).
 *
 * Names (schema, tables) must match [A-Za-z_][A-Za-z0-9_]{0,62}; they are
 * always quoted in SQL (so "Order" and "select" are fine and case is
 * kept).  Every value goes to the server as a parameter.
 *
 * Encryption at rest (optional): give the config one or more master keys
 * (es_pg_config_add_key), or a master-key provider such as a KMS
 * (es_pg_config_set_key_provider), and event payloads, snapshots,
 * side-effect payloads and the reasons of the host's rejected commands
 * (es_emit_reject: user text that may carry personal data) are sealed
 * with XChaCha20-Poly1305 (libsodium) before they leave the process; ids,
 * versions, kinds, times and command digests stay plain.  Each
 * aggregate has its own random data key, stored in the keys table wrapped
 * by the newest master key when the aggregate is first written; each row
 * records the id of that master key in its key_id column (for a
 * rejection: rejection_key, migration 9).  The associated data binds a
 * ciphertext to its aggregate, version (and snapshot version, side-effect
 * id or command id), so a row copied elsewhere does not open.
 * - Rotation: add a new master key last; aggregates written from then on
 *   use it, and the older keys still open what they wrapped.
 * - Crypto-shredding: es_pg_forget_aggregate destroys one aggregate's data
 *   key; its events, snapshots and side effects then read as ES_EFORGOTTEN,
 *   never as garbage, and other aggregates are untouched.  Its rejected
 *   commands keep their ids (still taken, still compared by content) but
 *   lose their reasons: the host answers a replay of one ES_EFORGOTTEN
 *   (other content under the id: ES_EIDEMPOTENCY), never the reason.
 * - A ciphertext that does not open (wrong master key, a master key the
 *   store lacks, tampered or truncated bytes) gives ES_EDECRYPT; an
 *   unreadable snapshot is ignored and the stream replayed.
 * - Rows written without encryption (key_id or rejection_key NULL, also
 *   every rejection written before migration 9) stay readable by a store
 *   with keys, so encryption can be turned on for an existing database;
 *   they are not sealed afterwards.  Forgetting an aggregate does not
 *   remove its events or snapshots written in clear, but it empties the
 *   reasons of its rejections kept in clear, which then read as
 *   forgotten like the sealed ones.  Key bytes never appear in messages,
 *   logs or SQL.
 * - es_txn_list_side_effects fails (ES_EDECRYPT) when one of the listed
 *   side effects does not open; list one aggregate's to get past it.  A
 *   claimed outbox message that does not open becomes a dead letter with
 *   the reason (never handed to a handler); es_outbox_list shows such
 *   messages without payload, with the reason as their last error.
 */
#ifndef EVENTASTIC_POSTGRES_H
#define EVENTASTIC_POSTGRES_H

#include <stdbool.h>

#include "common.h"
#include "status.h"
#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Configuration of a PostgreSQL store (opaque). */
typedef struct es_pg_config es_pg_config;

/** The tables whose names can be set. */
typedef enum es_pg_table {
    ES_PG_TABLE_EVENTS = 0,     /**< default "events" */
    ES_PG_TABLE_SNAPSHOTS = 1,  /**< default "snapshots" */
    ES_PG_TABLE_OUTBOX = 2,     /**< default "outbox" */
    ES_PG_TABLE_MIGRATIONS = 3, /**< default "es_migrations" */
    ES_PG_TABLE_KEYS = 4,       /**< default "data_keys" (encryption) */
    ES_PG_TABLE_COMMANDS = 5,   /**< default "commands" (host command ids) */
    ES_PG_TABLE_PROJECTIONS = 6 /**< default "projections" (checkpoints) */
} es_pg_table;

/** Longest schema or table name, in bytes (PostgreSQL's NAMEDATALEN-1). */
#define ES_PG_NAME_MAX 63

/**
 * Make a configuration with the defaults: connection string from
 * DATABASE_URL (read by es_pg_store_open and es_pg_migrate), schema
 * "public", the default table names, 8 connections, 1000 events per
 * stream chunk.  *out is the caller's (es_pg_config_free).
 * Errors: ES_EINVAL (out NULL), ES_ENOMEM.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_pg_config_new(es_pg_config **out,
                                             es_error *err);

/** Free a configuration.  NULL is a no-op.  Thread: the config's owner. */
ES_EXPORT ES_OWNER_THREAD void es_pg_config_free(es_pg_config *cfg);

/**
 * Set the libpq connection string ("host=... dbname=..." or a
 * postgresql:// URI); NULL goes back to DATABASE_URL.  The string is copied
 * and checked for syntax only (the server is not contacted).  Every
 * connection the store and es_pg_migrate open gets, unless the string sets
 * them: keepalives=1 keepalives_idle=30 keepalives_interval=10
 * keepalives_count=3 tcp_user_timeout=60000 connect_timeout=10, so a TCP
 * connection to a server or network gone without a word fails within
 * about a minute, and a connection attempt within 10 s.  Errors:
 * ES_EINVAL (cfg NULL, a string libpq cannot parse; the message does not
 * repeat the string), ES_ENOMEM.  On error nothing changes.
 * Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_conninfo(es_pg_config *cfg,
                                                        const char *conninfo,
                                                        es_error *err);

/**
 * Set the schema that holds the tables (created by es_pg_migrate when it
 * does not exist).  Errors: ES_EINVAL (cfg or name NULL, a name outside
 * [A-Za-z_][A-Za-z0-9_]{0,62}).  On error nothing changes.
 * Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_schema(es_pg_config *cfg,
                                                      const char *schema,
                                                      es_error *err);

/**
 * Set the name of one table.  Errors: ES_EINVAL (cfg or name NULL, unknown
 * table, a name outside [A-Za-z_][A-Za-z0-9_]{0,62}, or a name another
 * table of this config already has).  On error nothing changes.
 * Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_table(es_pg_config *cfg,
                                                     es_pg_table table,
                                                     const char *name,
                                                     es_error *err);

/**
 * Set the most connections the store keeps open (1 to 1024).  A
 * transaction holds one; es_store_begin waits while all are taken.
 * Errors: ES_EINVAL.  Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_pool_size(es_pg_config *cfg,
                                                         size_t size,
                                                         es_error *err);

/**
 * Set how many events a stream reads per round trip (1 to 1,000,000).
 * The memory a stream needs is bounded by this many events, whatever the
 * stream's length.  Errors: ES_EINVAL.  Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_chunk_size(es_pg_config *cfg,
                                                          size_t events,
                                                          es_error *err);

/**
 * Set the longest a statement of the store may run (PostgreSQL's
 * statement_timeout, set on each connection), in ms; 0 keeps the server's
 * setting (the default).  A statement stopped by it gives ES_ETIMEDOUT
 * (SQLSTATE 57014); after a failed save the transaction goes on.  The
 * host's commit lanes and its fallback writer give up on a round trip
 * that hears nothing for this long plus 5 s (60 s when 0): the
 * connection is dropped as lost.
 * Errors: ES_EINVAL (cfg NULL, ms outside 0 to 2147483647).
 * Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_statement_timeout(
    es_pg_config *cfg, int64_t ms, es_error *err);

/**
 * Whether a transaction that stores side effects sends NOTIFY on the
 * outbox table's channel (default: on), so that dispatchers of every
 * process wake at once (es_outbox_config_set_poll_ms).  PostgreSQL
 * serialises the commits of notifying transactions (one lock for the
 * whole database cluster, held until the commit is flushed); a store
 * committing side effects from many connections at a high rate may turn
 * it off, and its dispatchers then rely on polling (and on the commit
 * listeners of their own process).  Requeued dead letters notify under
 * the same setting.  Errors: ES_EINVAL (cfg NULL).
 * Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_outbox_notify(
    es_pg_config *cfg, bool on, es_error *err);

/**
 * Open a store on the configured server.  One connection is made at once,
 * so that a wrong address or password shows here; more are made when
 * transactions need them, up to the pool size.  The tables must exist
 * (es_pg_migrate).  The configuration is copied: free it when you like.
 * *out is the caller's; close it with es_store_close.
 * Errors: ES_EINVAL (NULL argument, no connection string and no
 * DATABASE_URL), ES_ENOMEM, ES_EDB (the server could not be reached or
 * refused the login; the message says why, without the password).
 * Thread: any; the store may then be used from many threads at once.
 */
ES_EXPORT ES_ANY_THREAD int es_pg_store_open(const es_pg_config *cfg,
                                             es_store **out, es_error *err);

/**
 * Create or upgrade the schema and tables: the migrations embedded in the
 * library that the migrations table does not list yet are applied in
 * order, in one transaction, under a transaction-level advisory lock, so
 * that several processes may migrate at once (one does the work, the
 * others then find nothing to do).  Running it again is a no-op.  On
 * success *schema_version (if not NULL) is the newest migration applied.
 * Errors: ES_EINVAL (cfg NULL, no connection string), ES_ENOMEM, ES_EDB:
 * a server error (nothing is applied), or a migration the database lists
 * that differs from the library's (its checksum changed) or that the
 * library does not know (the database is newer); nothing is then changed.
 * Uses a connection of its own.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_pg_migrate(const es_pg_config *cfg,
                                          int *schema_version, es_error *err);

/** Bytes of a master key (XChaCha20-Poly1305 key). */
#define ES_PG_KEY_BYTES 32
/** Longest master key id, in bytes. */
#define ES_PG_KEY_ID_MAX 63

/**
 * Add a master key for encryption at rest.  The key added last is the
 * newest: it wraps the data keys of aggregates first written from now on;
 * the others open what they wrapped before.  key_id (1 to 63 characters
 * of [A-Za-z0-9_.:-]) is stored with every row it protects, the key bytes
 * never are.  The key is copied (and wiped when the config is freed).
 * Make keys with a CSPRNG (e.g. libsodium's crypto_aead_xchacha20poly1305_
 * ietf_keygen) and keep them outside the database.
 * Errors: ES_EINVAL (NULL argument, bad id, an id already added),
 * ES_ENOMEM.  On error nothing changes.  Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_add_key(
    es_pg_config *cfg, const char *key_id,
    const uint8_t key[ES_PG_KEY_BYTES], es_error *err);

/** Most bytes a key provider may make of one wrapped data key. */
#define ES_PG_WRAPPED_MAX 512

/**
 * A master-key provider: wraps and unwraps the aggregates' data keys
 * (a KMS, an HSM, a vault), instead of the master keys of
 * es_pg_config_add_key.  The store seals and opens payloads with the data
 * keys itself; the provider is asked once per aggregate and transaction,
 * never for each payload, and never sees a payload.  The callbacks may be
 * called from every thread that uses the store, at once; each returns 0 or
 * a negative es_status (ES_EDECRYPT for a key that does not open, ES_EIO
 * for a provider that cannot be reached...) and may fill err.  ud is
 * borrowed: it must outlive every store made with it.
 */
typedef struct es_pg_key_provider {
    /** The id of the master key that wraps new data keys (1 to 63
     *  characters of [A-Za-z0-9_.:-]); stored with every row. */
    int (*current)(void *ud, char key_id[ES_PG_KEY_ID_MAX + 1],
                   es_error *err);
    /** Wrap the data key of an aggregate with master key key_id into out
     *  (1 to ES_PG_WRAPPED_MAX bytes; the length to *len). */
    int (*wrap)(void *ud, const char *key_id, const es_uuid *aggregate_id,
                const uint8_t dek[ES_PG_KEY_BYTES],
                uint8_t out[ES_PG_WRAPPED_MAX], size_t *len, es_error *err);
    /** Unwrap what wrap made for that aggregate and key id. */
    int (*unwrap)(void *ud, const char *key_id, const es_uuid *aggregate_id,
                  const uint8_t *wrapped, size_t len,
                  uint8_t dek[ES_PG_KEY_BYTES], es_error *err);
    void *ud; /**< handed to each callback */
} es_pg_key_provider;

/**
 * Use a master-key provider for encryption at rest (copied; NULL removes
 * it).  A config has master keys or a provider, not both
 * (es_pg_store_open refuses that with ES_EINVAL).  Errors: ES_EINVAL (cfg
 * NULL, a callback missing).  Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_config_set_key_provider(
    es_pg_config *cfg, const es_pg_key_provider *provider, es_error *err);

/**
 * The libpq connection of a transaction of a PostgreSQL store, for a
 * handler that writes its own tables in the same transaction (a
 * projection in ES_PROJECTION_EXACTLY_ONCE mode, eventastic/
 * subscription.h).  Borrowed: valid until the transaction ends; do not
 * close it, change its session or end its transaction (no COMMIT,
 * ROLLBACK or BEGIN); a statement that fails aborts the transaction, as
 * in any PostgreSQL transaction (wrap it in a SAVEPOINT to go on).
 * Returns NULL for NULL or a transaction of another store.  (The return
 * type is libpq's PGconn: struct pg_conn.)  Thread: the transaction's.
 */
ES_EXPORT ES_OWNER_THREAD struct pg_conn *es_pg_txn_conn(es_txn *txn);

/**
 * Crypto-shredding: destroy the data key of one aggregate in txn (a
 * transaction of a PostgreSQL store with keys).  Once committed, the
 * aggregate's encrypted events, snapshots and side effects read as
 * ES_EFORGOTTEN, and writing to it gives ES_EFORGOTTEN; its snapshots are
 * deleted and its pending side effects are marked dead (they cannot be
 * delivered); the reasons of its rejected commands are unreadable (the
 * sealed ones) or emptied (the ones kept in clear), and a host answers
 * their replay ES_EFORGOTTEN.  Events the aggregate had before
 * encryption was turned on are not encrypted and cannot be shredded this
 * way.  Forgetting an aggregate
 * twice, or one never written, is not an error (it can never be written
 * afterwards).  Errors: ES_EINVAL (NULL argument, not a PostgreSQL
 * transaction, a store without keys), ES_EDB.
 * Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_pg_forget_aggregate(
    es_txn *txn, const es_uuid *aggregate_id, es_error *err);

/** What es_pg_status_get reports. */
typedef struct es_pg_status {
    int schema_version;  /**< newest migration in the database (0: none) */
    int library_version; /**< newest migration of this library */
    uint64_t events;     /**< rows of the events table */
    uint64_t aggregates; /**< distinct aggregate ids among the events */
    uint64_t snapshots;  /**< rows of the snapshots table */
    uint64_t data_keys;  /**< aggregates with a data key (encryption) */
    uint64_t forgotten;  /**< of those, destroyed (crypto-shredding) */
} es_pg_status;

/**
 * Read the schema version of the database and count the rows of the
 * store's tables (in a transaction of its own; the counts scan the
 * tables).  A database never migrated gives schema_version 0 and zero
 * counts.  Errors: ES_EINVAL (NULL argument, not a PostgreSQL store),
 * ES_EDB.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_pg_status_get(es_store *store,
                                             es_pg_status *out,
                                             es_error *err);

/** The newest migration this library carries (its schema version).
 *  Thread: any. */
ES_EXPORT ES_ANY_THREAD int es_pg_schema_version(void);

#ifdef __cplusplus
}
#endif
#endif
