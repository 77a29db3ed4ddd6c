/*
 * es_pg_migrate and es_pg_schema_version: the migrations (migrations.c)
 * applied in order under a lock, each checked against the checksum of
 * the ones already applied.
 */
#include "store/pg/pg_int.h"

/* ---- migrations ---- */

/* FNV-1a, 64 bits: enough to see that a migration's text changed. */
uint64_t es__pg_fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325u;
    for (; *s != '\0'; s++) {
        h ^= (uint8_t)*s;
        h *= 0x100000001b3u;
    }
    return h;
}

static void checksum_of(const es__pg_migration *m, char out[32])
{
    snprintf(out, 32, "fnv1a64:%016llx",
             (unsigned long long)es__pg_fnv1a(m->sql));
}

/* The migration's SQL with the quoted names put in. */
static char *expand(const char *tmpl, const es_pg_config *cfg)
{
    char names[7][2 * NAME_BUF + 8];
    snprintf(names[0], sizeof names[0], "\"%s\"", cfg->schema);
    es__pg_qualify(names[1], sizeof names[1], cfg->schema,
                   cfg->tables[ES_PG_TABLE_EVENTS]);
    es__pg_qualify(names[2], sizeof names[2], cfg->schema,
                   cfg->tables[ES_PG_TABLE_SNAPSHOTS]);
    es__pg_qualify(names[3], sizeof names[3], cfg->schema,
                   cfg->tables[ES_PG_TABLE_OUTBOX]);
    es__pg_qualify(names[4], sizeof names[4], cfg->schema,
                   cfg->tables[ES_PG_TABLE_KEYS]);
    es__pg_qualify(names[5], sizeof names[5], cfg->schema,
                   cfg->tables[ES_PG_TABLE_COMMANDS]);
    es__pg_qualify(names[6], sizeof names[6], cfg->schema,
                   cfg->tables[ES_PG_TABLE_PROJECTIONS]);
    static const char *const keys[7] = {
        "@schema@", "@events@", "@snapshots@",  "@outbox@",
        "@keys@",   "@commands@", "@projections@"};
    es_buf b = {0};
    int rc = 0;
    for (const char *p = tmpl; rc == 0 && *p != '\0';) {
        int hit = -1;
        for (int k = 0; k < 7 && *p == '@'; k++)
            if (strncmp(p, keys[k], strlen(keys[k])) == 0) hit = k;
        if (hit >= 0) {
            rc = es_buf_append_str(&b, names[hit]);
            p += strlen(keys[hit]);
        } else {
            rc = es_buf_append(&b, p, 1);
            p++;
        }
    }
    if (rc == 0) rc = es_buf_append(&b, "", 1);
    if (rc != 0) {
        es_buf_free(&b);
        return NULL;
    }
    return (char *)b.data;
}

int es_pg_schema_version(void)
{
    return es__pg_migrations[es__pg_migration_count - 1].version;
}

/* The body of es_pg_migrate, inside BEGIN on c. */
int es__pg_migrate_in(PGconn *c, const es_pg_config *cfg, int *newest,
                      es_error *err)
{
    char mig[2 * NAME_BUF + 8], qschema[NAME_BUF + 4], sql[512];
    es__pg_qualify(mig, sizeof mig, cfg->schema,
                   cfg->tables[ES_PG_TABLE_MIGRATIONS]);
    snprintf(qschema, sizeof qschema, "\"%s\"", cfg->schema);

    /* One migrator per schema and migrations table at a time; the lock
     * goes with the transaction. */
    char lock_name[3 * NAME_BUF];
    snprintf(lock_name, sizeof lock_name, "eventastic migrate %s.%s",
             cfg->schema, cfg->tables[ES_PG_TABLE_MIGRATIONS]);
    uint8_t key[8];
    es__pg_be64(key, es__pg_fnv1a(lock_name));
    const Oid lock_types[1] = {OID_INT8};
    const char *lock_values[1] = {(const char *)key};
    const int lock_lens[1] = {8};
    int rc = es__pg_run(c, "migrate: advisory lock",
                        "SELECT pg_advisory_xact_lock($1)", 1, lock_types,
                        lock_values, lock_lens, NULL, err);
    if (rc != 0) return rc;

    /* CREATE SCHEMA needs a right on the database even when the schema
     * exists, so look first: a role that owns only its schema can
     * migrate. */
    const Oid name_types[1] = {OID_TEXT};
    const char *name_values[1] = {cfg->schema};
    const int name_lens[1] = {(int)strlen(cfg->schema)};
    PGresult *r = NULL;
    rc = es__pg_run(c, "migrate: find schema",
                    "SELECT 1 FROM pg_namespace WHERE nspname = $1", 1,
                    name_types, name_values, name_lens, &r, err);
    if (rc != 0) return rc;
    bool have_schema = PQntuples(r) > 0;
    PQclear(r);
    if (!have_schema) {
        snprintf(sql, sizeof sql, "CREATE SCHEMA %s", qschema);
        if ((rc = es__pg_run_simple(c, "migrate: create schema", sql, err)) !=
            0)
            return rc;
    }
    /* Likewise the migrations table: a role that may only read it can
     * still check that the schema is up to date. */
    const char *mig_values[1] = {mig};
    const int mig_lens[1] = {(int)strlen(mig)};
    rc = es__pg_run(c, "migrate: find migrations table",
                    "SELECT to_regclass($1) IS NOT NULL", 1, name_types,
                    mig_values, mig_lens, &r, err);
    if (rc != 0) return rc;
    bool have_table = PQntuples(r) == 1 && PQgetlength(r, 0, 0) == 1 &&
                      PQgetvalue(r, 0, 0)[0] == 1;
    PQclear(r);
    if (!have_table) {
        snprintf(sql, sizeof sql,
                 "CREATE TABLE IF NOT EXISTS %s (version integer PRIMARY "
                 "KEY, name text NOT NULL, checksum text NOT NULL, "
                 "applied_at timestamptz NOT NULL DEFAULT now())", mig);
        rc = es__pg_run_simple(c, "migrate: create migrations table", sql, err);
        if (rc != 0) return rc;
    }

    snprintf(sql, sizeof sql, "SELECT version, checksum FROM %s ORDER BY "
             "version", mig);
    r = PQexec(c, sql); /* text results: small and read once */
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
        rc = es__pg_db_error(c, r, err, "migrate: read migrations table");
        PQclear(r);
        return rc;
    }
    size_t count = es__pg_migration_count;
    bool *applied = es__calloc(count, sizeof *applied);
    if (applied == NULL) {
        PQclear(r);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int high = 0;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        /* The table is outside input: strtol, not atoi (undefined when
         * the number does not fit). */
        const char *text = PQgetvalue(r, i, 0), *sum = PQgetvalue(r, i, 1);
        char *end = NULL;
        errno = 0;
        long lv = strtol(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0' || lv < 1 ||
            lv > INT_MAX) {
            rc = es__error_set(err, ES_EDB, "migrate: the migrations table "
                               "has a version that is not a positive "
                               "integer");
            break;
        }
        int v = (int)lv;
        size_t k = 0;
        while (k < count && es__pg_migrations[k].version != v) k++;
        if (k == count) {
            rc = es__error_set(err, ES_EDB, "migrate: the database has "
                               "migration %d, which this library (schema "
                               "version %d) does not know: the database is "
                               "newer than the library", v,
                               es_pg_schema_version());
            break;
        }
        char want[32];
        checksum_of(&es__pg_migrations[k], want);
        if (strcmp(want, sum) != 0) {
            rc = es__error_set(err, ES_EDB, "migrate: migration %d (%s) "
                               "differs from the one applied to the database "
                               "(checksum %.40s there, %s here); a migration "
                               "must never change once applied, refusing",
                               v, es__pg_migrations[k].name, sum, want);
            break;
        }
        applied[k] = true;
        if (v > high) high = v;
    }
    PQclear(r);

    for (size_t k = 0; rc == 0 && k < count; k++) {
        const es__pg_migration *m = &es__pg_migrations[k];
        if (applied[k]) continue;
        char *body = expand(m->sql, cfg);
        if (body == NULL) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        char what[96];
        snprintf(what, sizeof what, "migrate: migration %d (%.60s)",
                 m->version, m->name);
        rc = es__pg_run_simple(c, what, body, err);
        es__free(body);
        if (rc != 0) break;
        char sum[32], ver[16];
        checksum_of(m, sum);
        snprintf(ver, sizeof ver, "%d", m->version);
        snprintf(sql, sizeof sql, "INSERT INTO %s (version, name, checksum) "
                 "VALUES ($1::integer, $2, $3)", mig);
        const char *vals[3] = {ver, m->name, sum};
        PGresult *ins = PQexecParams(c, sql, 3, NULL, vals, NULL, NULL, 0);
        if (ins == NULL || PQresultStatus(ins) != PGRES_COMMAND_OK)
            rc = es__pg_db_error(c, ins, err, "migrate: record migration");
        PQclear(ins);
        if (m->version > high) high = m->version;
    }
    es__free(applied);
    if (rc == 0) *newest = high;
    return rc;
}

int es_pg_migrate(const es_pg_config *cfg, int *schema_version, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    const char *ci = NULL;
    int rc = es__pg_resolve_conninfo(cfg, &ci, err);
    if (rc != 0) return rc;
    char *password = NULL;
    if ((rc = es__pg_conninfo_check(ci, &password, err)) != 0)
        return rc == ES_EINVAL ? es__error_set(err, ES_EDB, "connection "
                                               "string could not be parsed")
                               : rc;
    PGconn *c = NULL;
    char *full = NULL;
    if (es__pg_conninfo_with_defaults(ci, &full) != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    else
        rc = es__pg_connect(full, password, &c, err);
    es__free(full);
    if (password) {
        memset(password, 0, strlen(password));
        es__free(password);
    }
    if (rc != 0) return rc;
    int newest = 0;
    rc = es__pg_run_simple(c, "migrate: begin", "BEGIN", err);
    if (rc == 0) rc = es__pg_migrate_in(c, cfg, &newest, err);
    if (rc == 0) {
        PGresult *r = PQexec(c, "COMMIT");
        if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = es__pg_db_error(c, r, err, "migrate: commit");
        else if (strcmp(PQcmdStatus(r), "COMMIT") != 0)
            rc = es__error_set(err, ES_EDB, "migrate: rolled back");
        PQclear(r);
    } else {
        PQclear(PQexec(c, "ROLLBACK"));
    }
    PQfinish(c);
    if (rc == 0 && schema_version) *schema_version = newest;
    return rc;
}
