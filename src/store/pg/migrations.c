/*
 * The migrations of the PostgreSQL store (see migrations.h).
 *
 * events: (aggregate id, version) is the primary key, so a version is
 * taken once; event_id was unique across aggregates until migration 8,
 * and is unique per aggregate since (idempotency key; see 8).  position
 * is an identity column that read models can follow later.
 * Constraint and index names are left to PostgreSQL, so that table names
 * of any valid length work.  keys holds each aggregate's data key, wrapped
 * by the master key key_id; NULL once destroyed (crypto-shredding).
 */
#include "store/pg/migrations.h"

const es__pg_migration es__pg_migrations[] = {
    {1, "events, snapshots and outbox",
     "CREATE TABLE @events@ (\n"
     "    position bigint GENERATED ALWAYS AS IDENTITY,\n"
     "    aggregate_type text NOT NULL,\n"
     "    aggregate_id uuid NOT NULL,\n"
     "    version bigint NOT NULL CHECK (version >= 0),\n"
     "    event_id uuid NOT NULL UNIQUE,\n"
     "    kind integer NOT NULL,\n"
     "    payload bytea NOT NULL,\n"
     "    metadata jsonb,\n"
     "    key_id text,\n"
     "    created_at timestamptz NOT NULL DEFAULT now(),\n"
     "    PRIMARY KEY (aggregate_id, version)\n"
     ");\n"
     "CREATE UNIQUE INDEX ON @events@ (position);\n"
     "CREATE TABLE @snapshots@ (\n"
     "    aggregate_id uuid NOT NULL,\n"
     "    snapshot_version bigint NOT NULL CHECK (snapshot_version >= 0),\n"
     "    version bigint NOT NULL CHECK (version >= 0),\n"
     "    payload bytea NOT NULL,\n"
     "    key_id text,\n"
     "    created_at timestamptz NOT NULL DEFAULT now(),\n"
     "    PRIMARY KEY (aggregate_id, snapshot_version)\n"
     ");\n"
     "CREATE TABLE @outbox@ (\n"
     "    id uuid PRIMARY KEY,\n"
     "    seq bigint GENERATED ALWAYS AS IDENTITY,\n"
     "    aggregate_id uuid NOT NULL,\n"
     "    event_id uuid NOT NULL,\n"
     "    aggregate_type text,\n"
     "    kind integer NOT NULL,\n"
     "    payload bytea NOT NULL,\n"
     "    key_id text,\n"
     "    status text NOT NULL DEFAULT 'pending'\n"
     "        CHECK (status IN ('pending', 'done', 'dead')),\n"
     "    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),\n"
     "    next_attempt_at timestamptz NOT NULL DEFAULT now(),\n"
     "    claimed_by text,\n"
     "    claimed_until timestamptz,\n"
     "    last_error text,\n"
     "    created_at timestamptz NOT NULL DEFAULT now()\n"
     ");\n"},
    {2, "outbox indexes",
     "CREATE INDEX ON @outbox@ (next_attempt_at) WHERE status = 'pending';\n"
     "CREATE INDEX ON @outbox@ (aggregate_id, seq);\n"},
    {3, "data keys for encryption at rest",
     "CREATE TABLE @keys@ (\n"
     "    aggregate_id uuid PRIMARY KEY,\n"
     "    key_id text NOT NULL,\n"
     "    wrapped bytea,\n"
     "    created_at timestamptz NOT NULL DEFAULT now(),\n"
     "    destroyed_at timestamptz,\n"
     "    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL))\n"
     ");\n"},
    {4, "outbox delivery: finish time, due at once",
     "ALTER TABLE @outbox@ ADD COLUMN finished_at timestamptz;\n"
     "ALTER TABLE @outbox@ ALTER COLUMN next_attempt_at\n"
     "    SET DEFAULT 'epoch';\n"
     "CREATE INDEX ON @outbox@ (finished_at) WHERE status = 'done';\n"},
    {5, "command ids of the host (idempotency across restarts)",
     "CREATE TABLE @commands@ (\n"
     "    command_id uuid PRIMARY KEY,\n"
     "    aggregate_id uuid NOT NULL,\n"
     "    kind integer NOT NULL,\n"
     "    digest bytea NOT NULL,\n"
     "    first_version bigint NOT NULL,\n"
     "    event_count bigint NOT NULL CHECK (event_count >= 0),\n"
     "    version bigint NOT NULL,\n"
     "    created_at timestamptz NOT NULL DEFAULT now()\n"
     ");\n"},
    /* Claims and expiries walk only pending messages of the claimed type:
     * their cost is the claim limit, not the backlog, and a backlog of
     * other types costs nothing (1.46 s per claim at 500,000 pending
     * before, a few ms after). */
    {6, "outbox: pending messages by type and seq, per aggregate, and by "
        "claim",
     "CREATE INDEX ON @outbox@ (aggregate_type, seq) WHERE status = "
     "'pending';\n"
     "CREATE INDEX ON @outbox@ (aggregate_id, seq) WHERE status = "
     "'pending';\n"
     "CREATE INDEX ON @outbox@ (claimed_until) WHERE status = 'pending' "
     "AND claimed_by IS NOT NULL;\n"},
    /* A rejection is an outcome too: NULL for a command that was
     * accepted, else its reason.  bytea, not text: the reason is user text
     * cut at a byte limit, so it need not be valid in the server's
     * encoding. */
    {7, "command ids of rejected commands (their reason)",
     "ALTER TABLE @commands@ ADD COLUMN rejection bytea;\n"},
    /* Citus requires every unique constraint of a distributed table to
     * include its distribution column; for the events table that is
     * aggregate_id.  So an event id becomes unique per aggregate (every
     * lookup of one names the aggregate), and position loses its unique
     * index: an identity column is unique by construction, and a plain
     * index still serves readers that follow it.  The old constraint and
     * index have names chosen by PostgreSQL (they depend on the table
     * name), so they are found in the catalog by their columns.  On a
     * large table, building the new index takes a while and blocks
     * writes: run this migration in a quiet moment.  (Command ids stay
     * unique across aggregates, on purpose: see docs/scaling.md.) */
    {8, "events: unique keys include aggregate_id (distributable by it)",
     "DO $migrate$\n"
     "DECLARE r record;\n"
     "BEGIN\n"
     "    FOR r IN SELECT c.conname FROM pg_constraint c\n"
     "        JOIN pg_attribute a ON a.attrelid = c.conrelid\n"
     "        AND a.attname = 'event_id'\n"
     "        WHERE c.conrelid = '@events@'::regclass AND c.contype = 'u'\n"
     "        AND c.conkey = ARRAY[a.attnum]\n"
     "    LOOP\n"
     "        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I',\n"
     "                       '@events@', r.conname);\n"
     "    END LOOP;\n"
     "    FOR r IN SELECT i.indexrelid::regclass AS idx FROM pg_index i\n"
     "        JOIN pg_attribute a ON a.attrelid = i.indrelid\n"
     "        AND a.attname = 'position'\n"
     "        WHERE i.indrelid = '@events@'::regclass AND i.indisunique\n"
     "        AND i.indnatts = 1 AND i.indkey[0] = a.attnum\n"
     "    LOOP\n"
     "        EXECUTE format('DROP INDEX %s', r.idx);\n"
     "    END LOOP;\n"
     "END\n"
     "$migrate$;\n"
     "ALTER TABLE @events@ ADD UNIQUE (aggregate_id, event_id);\n"
     "CREATE INDEX ON @events@ (position);\n"},
    /* With encryption at rest, a rejection's reason (user text that may
     * carry personal data) is sealed with the aggregate's data key like
     * its events: rejection_key is the id of the master key that wrapped
     * that data key, NULL for a reason stored in clear (no encryption, or
     * written before this migration). */
    {9, "command ids: rejection reasons sealed (their master key id)",
     "ALTER TABLE @commands@ ADD COLUMN rejection_key text;\n"},
    /* Forgetting an aggregate empties the reasons of its rejections kept
     * in clear: found by aggregate, not by command id, so without this
     * every forget read the whole commands table.  Partial: only the
     * rejected commands, a small part of the table. */
    {10, "command ids: rejections by aggregate (forget)",
     "CREATE INDEX ON @commands@ (aggregate_id) WHERE rejection IS NOT "
     "NULL;\n"},
    /* Retention deletes old command ids in small batches by created_at.
     * Rows go in in time order, so a BRIN index finds them: a few pages
     * for the whole table, and almost nothing to maintain per command. */
    {11, "command ids: by age (retention)",
     "CREATE INDEX ON @commands@ USING brin (created_at);\n"},
    /* The global order of events (docs/read-side.md): each row keeps the
     * id of the transaction that wrote it, and readers follow (txid,
     * position) below pg_snapshot_xmin.  Rows already stored get txid 1
     * (a constant default: no table rewrite), before everything later;
     * they had all committed, since ALTER TABLE waits for every writer.
     * The index on position alone (migration 8) served nothing of the
     * library's and is replaced by (txid, position), so an event still
     * costs one index entry for its place in the order.  Building the
     * index on a large table blocks writes: run it in a quiet moment.
     * projections holds each projection's checkpoint. */
    {12, "events: global order by writing transaction; checkpoints",
     "ALTER TABLE @events@ ADD COLUMN txid xid8 NOT NULL DEFAULT '1';\n"
     "ALTER TABLE @events@ ALTER COLUMN txid SET DEFAULT "
     "pg_current_xact_id();\n"
     "CREATE INDEX ON @events@ (txid, position);\n"
     "DO $migrate$\n"
     "DECLARE r record;\n"
     "BEGIN\n"
     "    FOR r IN SELECT i.indexrelid::regclass AS idx FROM pg_index i\n"
     "        JOIN pg_attribute a ON a.attrelid = i.indrelid\n"
     "        AND a.attname = 'position'\n"
     "        WHERE i.indrelid = '@events@'::regclass\n"
     "        AND i.indnatts = 1 AND i.indkey[0] = a.attnum\n"
     "    LOOP\n"
     "        EXECUTE format('DROP INDEX %s', r.idx);\n"
     "    END LOOP;\n"
     "END\n"
     "$migrate$;\n"
     "CREATE TABLE @projections@ (\n"
     "    name text PRIMARY KEY,\n"
     "    commit_pos bigint NOT NULL,\n"
     "    seq bigint NOT NULL,\n"
     "    updated_at timestamptz NOT NULL DEFAULT now()\n"
     ");\n"},
};

const size_t es__pg_migration_count =
    sizeof es__pg_migrations / sizeof es__pg_migrations[0];
