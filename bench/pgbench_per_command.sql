-- The per-command reference (bench/pgbench_ref.py): what per_command_pg
-- does for one deposit, written by hand with pgbench's prepared
-- statements, on the same tables (schema pgbench_ref, made by the
-- library's migrations): read the snapshot and the stream, then under a
-- savepoint the event (both unique indexes) and the snapshot upsert.
\set a random(1, 10000)
BEGIN;
SELECT s.version, s.payload FROM pgbench_ref.snapshots s WHERE s.aggregate_id = ('00000000-0000-4000-8000-' || lpad(:a::text, 12, '0'))::uuid AND s.snapshot_version = 1;
SELECT coalesce(max(version) + 1, 0) AS v FROM pgbench_ref.events WHERE aggregate_id = ('00000000-0000-4000-8000-' || lpad(:a::text, 12, '0'))::uuid \gset
SAVEPOINT s;
INSERT INTO pgbench_ref.events (aggregate_type, aggregate_id, version, event_id, kind, payload) VALUES ('account', ('00000000-0000-4000-8000-' || lpad(:a::text, 12, '0'))::uuid, :v, gen_random_uuid(), 2, '\x0100000000000000') ON CONFLICT DO NOTHING;
INSERT INTO pgbench_ref.snapshots (aggregate_id, snapshot_version, version, payload) VALUES (('00000000-0000-4000-8000-' || lpad(:a::text, 12, '0'))::uuid, 1, :v, '\x0100000000000000') ON CONFLICT (aggregate_id, snapshot_version) DO UPDATE SET version = excluded.version, payload = excluded.payload;
RELEASE SAVEPOINT s;
COMMIT;
