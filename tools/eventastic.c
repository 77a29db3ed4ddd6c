/*
 * eventastic - the command line tool of the PostgreSQL store.
 *
 *   eventastic [--db CONNINFO] [--schema NAME] migrate
 *   eventastic [--db CONNINFO] [--schema NAME] status
 *   eventastic [--db CONNINFO] [--schema NAME] stream AGGREGATE-ID
 *
 * The connection string comes from --db or DATABASE_URL; it is never
 * printed (the library's messages hold no password either).  Exit status:
 * 0 done, 1 failed (the reason on stderr), 2 wrong usage.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eventastic.h"

static const char usage[] =
    "usage: eventastic [--db CONNINFO] [--schema NAME] COMMAND\n"
    "\n"
    "commands:\n"
    "  migrate              create or upgrade the tables (safe to run "
    "again,\n"
    "                       and from several processes at once)\n"
    "  status               schema version, row counts, outbox figures\n"
    "  stream AGGREGATE-ID  print the events of one aggregate, in order\n"
    "\n"
    "The connection string is --db or DATABASE_URL (libpq key=value or a\n"
    "postgresql:// URI).  Exit status: 0 done, 1 failed, 2 usage.\n";

static int fail(const char *what, int rc, const es_error *err)
{
    fprintf(stderr, "eventastic: %s: %s: %s\n", what, es_status_name(rc),
            err->message[0] ? err->message : es_strerror(rc));
    if (err->sqlstate[0]) fprintf(stderr, "  SQLSTATE %s\n", err->sqlstate);
    return 1;
}

/* Print a payload: as text when it is printable, else as hex. */
static void print_payload(const uint8_t *data, size_t len)
{
    bool text = len > 0;
    for (size_t i = 0; i < len && text; i++)
        text = isprint(data[i]) || data[i] == '\n' || data[i] == '\t';
    if (text) {
        printf("  \"");
        for (size_t i = 0; i < len; i++) {
            if (data[i] == '"' || data[i] == '\\') putchar('\\');
            if (data[i] == '\n')
                fputs("\\n", stdout);
            else if (data[i] == '\t')
                fputs("\\t", stdout);
            else
                putchar(data[i]);
        }
        printf("\"\n");
        return;
    }
    for (size_t i = 0; i < len; i++)
        printf("%s%02x", i % 32 == 0 ? "\n  " : "", data[i]);
    printf("\n");
}

typedef struct printer {
    size_t count;
} printer;

static int print_event(void *ud, const es_event *ev)
{
    printer *p = ud;
    char id[ES_UUID_STRLEN + 1];
    printf("version %llu  kind %d  event %s  %zu bytes",
           (unsigned long long)ev->version, (int)ev->kind,
           es_uuid_format(&ev->id, id), ev->len);
    print_payload(ev->data, ev->len);
    p->count++;
    return 0;
}

static int cmd_status(es_store *store)
{
    es_error err = {0};
    es_pg_status st;
    int rc = es_pg_status_get(store, &st, &err);
    if (rc != 0) return fail("status", rc, &err);
    printf("schema version  %d (library %d)%s\n", st.schema_version,
           st.library_version,
           st.schema_version < st.library_version
               ? ": run 'eventastic migrate'"
               : st.schema_version > st.library_version
                     ? ": the database is newer than this tool"
                     : "");
    if (st.schema_version < st.library_version) return 0;
    printf("events          %llu\n", (unsigned long long)st.events);
    printf("aggregates      %llu\n", (unsigned long long)st.aggregates);
    printf("snapshots       %llu\n", (unsigned long long)st.snapshots);
    printf("data keys       %llu (%llu forgotten)\n",
           (unsigned long long)st.data_keys,
           (unsigned long long)st.forgotten);
    es_outbox_stats ob;
    rc = es_outbox_stats_get(store, 0, &ob, &err);
    if (rc != 0) return fail("outbox", rc, &err);
    printf("outbox          %llu pending, %llu dead, %llu done; oldest "
           "pending %lld ms old\n",
           (unsigned long long)ob.pending, (unsigned long long)ob.dead,
           (unsigned long long)ob.done, (long long)ob.oldest_pending_age_ms);
    return 0;
}

static int cmd_stream(es_store *store, const char *text)
{
    es_uuid id;
    if (es_uuid_parse(text, &id) != 0) {
        fprintf(stderr, "eventastic: stream: '%s' is not a UUID\n", text);
        return 2;
    }
    es_error err = {0};
    es_txn *txn = NULL;
    int rc = es_store_begin(store, &txn, &err);
    if (rc != 0) return fail("stream", rc, &err);
    printer p = {0};
    rc = es_txn_stream(txn, &id, 0, print_event, &p, &err);
    es_txn_rollback(txn);
    if (rc != 0) return fail("stream", rc, &err);
    if (p.count == 0) {
        fprintf(stderr, "eventastic: stream: aggregate %s has no events\n",
                text);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *db = NULL, *schema = NULL;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            fputs(usage, stdout);
            return 0;
        } else if (strcmp(argv[i], "--db") == 0 && i + 1 < argc) {
            db = argv[++i];
        } else if (strcmp(argv[i], "--schema") == 0 && i + 1 < argc) {
            schema = argv[++i];
        } else {
            fputs(usage, stderr);
            return 2;
        }
    }
    if (i >= argc) {
        fputs(usage, stderr);
        return 2;
    }
    const char *cmd = argv[i++];
    bool is_stream = strcmp(cmd, "stream") == 0;
    if ((strcmp(cmd, "migrate") != 0 && strcmp(cmd, "status") != 0 &&
         !is_stream) ||
        (is_stream && argc - i != 1) || (!is_stream && argc - i != 0)) {
        fputs(usage, stderr);
        return 2;
    }

    es_error err = {0};
    es_pg_config *cfg = NULL;
    int rc = es_pg_config_new(&cfg, &err);
    if (rc == 0 && db != NULL) rc = es_pg_config_set_conninfo(cfg, db, &err);
    if (rc == 0 && schema != NULL)
        rc = es_pg_config_set_schema(cfg, schema, &err);
    if (rc == 0 && db == NULL && getenv("DATABASE_URL") == NULL) {
        rc = ES_EINVAL;
        snprintf(err.message, sizeof err.message,
                 "no database: give --db or set DATABASE_URL");
    }
    if (rc != 0) {
        es_pg_config_free(cfg);
        return rc == ES_EINVAL ? (fail("arguments", rc, &err), 2)
                               : fail("arguments", rc, &err);
    }

    int status = 0;
    if (strcmp(cmd, "migrate") == 0) {
        int version = 0;
        rc = es_pg_migrate(cfg, &version, &err);
        if (rc != 0)
            status = fail("migrate", rc, &err);
        else
            printf("schema version %d\n", version);
    } else {
        es_store *store = NULL;
        rc = es_pg_store_open(cfg, &store, &err);
        if (rc != 0)
            status = fail("connect", rc, &err);
        else if (is_stream)
            status = cmd_stream(store, argv[i]);
        else
            status = cmd_status(store);
        es_store_close(store);
    }
    es_pg_config_free(cfg);
    return status;
}
