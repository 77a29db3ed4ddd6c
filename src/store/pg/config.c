/*
 * The PostgreSQL store's configuration (es_pg_config_*): the names of the
 * schema and tables, checked when they are set; the master keys or a key
 * provider; the connection string, checked when it is set and resolved
 * (DATABASE_URL) when the store opens.
 */
#include "store/pg/pg_int.h"

static const char *const default_tables[N_TABLES] = {
    "events", "snapshots", "outbox", "es_migrations", "data_keys",
    "commands", "projections"};

/* ---- names ---- */

static bool name_valid(const char *s)
{
    if (s == NULL) return false;
    size_t n = strlen(s);
    if (n == 0 || n > ES_PG_NAME_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                     c == '_';
        bool digit = c >= '0' && c <= '9';
        if (!(alpha || (digit && i > 0))) return false;
    }
    return true;
}

/* "schema"."table": the names are valid, so they hold no quote. */
void es__pg_qualify(char *out, size_t cap, const char *schema,
                    const char *table)
{
    snprintf(out, cap, "\"%s\".\"%s\"", schema, table);
}

/* ---- configuration ---- */

int es_pg_config_new(es_pg_config **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    es_pg_config *cfg = es__calloc(1, sizeof *cfg);
    if (cfg == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    strcpy(cfg->schema, "public");
    for (int i = 0; i < N_TABLES; i++)
        strcpy(cfg->tables[i], default_tables[i]);
    cfg->pool_size = 8;
    cfg->chunk = 1000;
    *out = cfg;
    return 0;
}

void es_pg_config_free(es_pg_config *cfg)
{
    if (cfg == NULL) return;
    es__free(cfg->conninfo);
    if (cfg->keys) sodium_memzero(cfg->keys, cfg->n_keys * sizeof *cfg->keys);
    es__free(cfg->keys);
    es__free(cfg);
}

bool es__pg_key_id_valid(const char *id)
{
    if (id == NULL) return false;
    size_t n = strlen(id);
    if (n == 0 || n > ES_PG_KEY_ID_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        char c = id[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '.' || c == ':' ||
              c == '-'))
            return false;
    }
    return true;
}

int es_pg_config_add_key(es_pg_config *cfg, const char *key_id,
                         const uint8_t key[ES_PG_KEY_BYTES], es_error *err)
{
    if (cfg == NULL || key == NULL)
        return es__error_set(err, ES_EINVAL, "config and key are required");
    if (!es__pg_key_id_valid(key_id))
        return es__error_set(err, ES_EINVAL, "key id must be 1 to 63 "
                             "characters of [A-Za-z0-9_.:-]");
    for (size_t i = 0; i < cfg->n_keys; i++)
        if (strcmp(cfg->keys[i].id, key_id) == 0)
            return es__error_set(err, ES_EINVAL, "key id '%s' was already "
                                 "added", key_id);
    /* A fresh array rather than realloc: the old one is wiped, not left
     * behind in freed memory. */
    pg_key *keys = es__calloc(cfg->n_keys + 1, sizeof *keys);
    if (keys == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    if (cfg->n_keys > 0) {
        memcpy(keys, cfg->keys, cfg->n_keys * sizeof *keys);
        sodium_memzero(cfg->keys, cfg->n_keys * sizeof *keys);
    }
    es__free(cfg->keys);
    strcpy(keys[cfg->n_keys].id, key_id);
    memcpy(keys[cfg->n_keys].key, key, ES_PG_KEY_BYTES);
    cfg->keys = keys;
    cfg->n_keys++;
    return 0;
}

/* Parse a connection string; on success *password is a copy of its
 * password (NULL when it has none).  libpq's parse message is not passed
 * on: it may quote a piece of the string, and so of the password. */
int es__pg_conninfo_check(const char *conninfo, char **password, es_error *err)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    if (opts == NULL) {
        if (msg != NULL) PQfreemem(msg);
        return es__error_set(err, ES_EINVAL,
                             "connection string could not be parsed (expected "
                             "key=value pairs or a postgresql:// URI)");
    }
    int rc = 0;
    if (password != NULL) {
        *password = NULL;
        for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
            if (strcmp(o->keyword, "password") != 0 || o->val == NULL ||
                o->val[0] == '\0')
                continue;
            *password = es__strdup(o->val);
            if (*password == NULL)
                rc = es__error_set(err, ES_ENOMEM, "out of memory");
        }
    }
    PQconninfoFree(opts);
    return rc;
}

int es_pg_config_set_key_provider(es_pg_config *cfg,
                                  const es_pg_key_provider *provider,
                                  es_error *err)
{
    if (cfg == NULL)
        return es__error_set(err, ES_EINVAL, "config is NULL");
    if (provider == NULL) {
        memset(&cfg->provider, 0, sizeof cfg->provider);
        return 0;
    }
    if (provider->current == NULL || provider->wrap == NULL ||
        provider->unwrap == NULL)
        return es__error_set(err, ES_EINVAL, "a key provider needs current, "
                             "wrap and unwrap");
    cfg->provider = *provider;
    return 0;
}

int es_pg_config_set_conninfo(es_pg_config *cfg, const char *conninfo,
                              es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    char *copy = NULL;
    if (conninfo != NULL) {
        int rc = es__pg_conninfo_check(conninfo, NULL, err);
        if (rc != 0) return rc;
        if ((copy = es__strdup(conninfo)) == NULL)
            return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    es__free(cfg->conninfo);
    cfg->conninfo = copy;
    return 0;
}

static int name_error(es_error *err, const char *what)
{
    return es__error_set(err, ES_EINVAL,
                         "%s name must match [A-Za-z_][A-Za-z0-9_]{0,62}",
                         what);
}

int es_pg_config_set_schema(es_pg_config *cfg, const char *schema,
                            es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    if (!name_valid(schema)) return name_error(err, "schema");
    strcpy(cfg->schema, schema);
    return 0;
}

int es_pg_config_set_table(es_pg_config *cfg, es_pg_table table,
                           const char *name, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    int i = (int)table;
    if (i < 0 || i >= N_TABLES)
        return es__error_set(err, ES_EINVAL, "unknown table %d", i);
    if (!name_valid(name)) return name_error(err, "table");
    for (int j = 0; j < N_TABLES; j++)
        if (j != i && strcmp(cfg->tables[j], name) == 0)
            return es__error_set(err, ES_EINVAL,
                                 "table name '%s' is already used for "
                                 "another table", name);
    strcpy(cfg->tables[i], name);
    return 0;
}

int es_pg_config_set_pool_size(es_pg_config *cfg, size_t size, es_error *err)
{
    if (cfg == NULL || size < 1 || size > 1024)
        return es__error_set(err, ES_EINVAL, "pool size must be 1 to 1024");
    cfg->pool_size = size;
    return 0;
}

int es_pg_config_set_statement_timeout(es_pg_config *cfg, int64_t ms,
                                       es_error *err)
{
    if (cfg == NULL || ms < 0 || ms > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "statement timeout must be 0 "
                             "to 2147483647 ms");
    cfg->statement_timeout_ms = ms;
    return 0;
}

int es_pg_config_set_outbox_notify(es_pg_config *cfg, bool on,
                                   es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    cfg->no_notify = !on;
    return 0;
}

int es_pg_config_set_chunk_size(es_pg_config *cfg, size_t events,
                                es_error *err)
{
    if (cfg == NULL || events < 1 || events > 1000000)
        return es__error_set(err, ES_EINVAL,
                             "chunk size must be 1 to 1000000 events");
    cfg->chunk = events;
    return 0;
}

/* The configured connection string, or DATABASE_URL. */
int es__pg_resolve_conninfo(const es_pg_config *cfg, const char **out,
                            es_error *err)
{
    const char *ci = cfg->conninfo ? cfg->conninfo : getenv("DATABASE_URL");
    if (ci == NULL || ci[0] == '\0')
        return es__error_set(err, ES_EINVAL, "no connection string: set one "
                             "in the config or DATABASE_URL");
    *out = ci;
    return 0;
}
