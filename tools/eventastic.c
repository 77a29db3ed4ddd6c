/*
 * eventastic - the command line tool of the PostgreSQL store.
 *
 *   eventastic [--db CONNINFO] [--schema NAME] migrate
 *   eventastic [--db CONNINFO] [--schema NAME] status
 *   eventastic [--db CONNINFO] [--schema NAME] stream AGGREGATE-ID
 *   eventastic [--db CONNINFO] [--schema NAME] outbox list [STATUS]
 *              [--limit N] | show ID | requeue ID | requeue --type NAME
 *              [--kind N] | purge --older-than AGE
 *   eventastic [--db CONNINFO] [--schema NAME] commands purge
 *              --older-than AGE
 *
 * --db, --schema and --help may also follow the command
 * ("eventastic migrate --db URL").
 * docs/eventastic.1 is the manual page.
 * The connection string comes from --db or DATABASE_URL; it is never
 * printed (the library's messages hold no password either).  Exit status:
 * 0 done, 1 failed (the reason on stderr), 2 wrong usage.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eventastic.h"

static const char usage[] =
    "usage: eventastic [--db CONNINFO] [--schema NAME] COMMAND\n"
    "\n"
    "options (before or after the command):\n"
    "  --db CONNINFO        the database (default: DATABASE_URL)\n"
    "  --schema NAME        the schema of the tables\n"
    "  --help               print this and exit\n"
    "\n"
    "commands:\n"
    "  migrate              create or upgrade the tables (safe to run "
    "again,\n"
    "                       and from several processes at once)\n"
    "  status               schema version, row counts, outbox figures\n"
    "  stream AGGREGATE-ID  print the events of one aggregate, in order\n"
    "  outbox list [pending|dead|done] [--limit N]\n"
    "                       list outbox messages, oldest first (default:\n"
    "                       pending, at most 100)\n"
    "  outbox show ID       one message: state, attempts, last error, "
    "payload\n"
    "  outbox requeue ID    make one dead letter pending again\n"
    "  outbox requeue --type NAME [--kind N]\n"
    "                       requeue every dead letter of an aggregate type\n"
    "                       (of one side-effect kind)\n"
    "  outbox purge --older-than AGE\n"
    "                       delete done messages finished more than AGE ago\n"
    "                       (AGE: a number with ms, s, m, h or d; e.g. 7d)\n"
    "  projections          list the projections' checkpoints: position,\n"
    "                       when saved, and how far behind the store's\n"
    "                       newest event each is\n"
    "  projections reset NAME\n"
    "                       delete one checkpoint: that projection starts\n"
    "                       from the first event when it starts again\n"
    "                       (stop it first; empty its read model)\n"
    "  commands purge --older-than AGE\n"
    "                       delete the host's command-id records written\n"
    "                       more than AGE ago: a command sent again after\n"
    "                       that is decided again, not answered as a replay\n"
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

/* ---- outbox ---- */

typedef enum outbox_op { OB_LIST, OB_SHOW, OB_REQUEUE, OB_PURGE } outbox_op;

typedef struct outbox_args {
    outbox_op op;
    es_outbox_status status;
    size_t limit;
    bool have_id;
    es_uuid id;
    const char *type; /* requeue --type */
    int32_t kind;     /* requeue --kind, or ES_OUTBOX_ANY_KIND */
    int64_t age_ms;   /* purge --older-than */
} outbox_args;

static bool parse_i64(const char *text, int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0') return false;
    *out = v;
    return true;
}

/* "90", "90s", "500ms", "15m", "12h", "7d" -> ms (>= 0). */
static bool parse_age(const char *text, int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || v < 0) return false;
    int64_t unit = 0;
    if (strcmp(end, "ms") == 0)
        unit = 1;
    else if (strcmp(end, "s") == 0 || *end == '\0')
        unit = 1000;
    else if (strcmp(end, "m") == 0)
        unit = 60000;
    else if (strcmp(end, "h") == 0)
        unit = 3600000;
    else if (strcmp(end, "d") == 0)
        unit = 86400000;
    else
        return false;
    if (v > INT64_MAX / unit) return false;
    *out = (int64_t)v * unit;
    return true;
}

/* Parse argv[0..argc) after "outbox".  False: wrong usage. */
static bool outbox_parse(int argc, char **argv, outbox_args *a)
{
    memset(a, 0, sizeof *a);
    a->limit = 100;
    a->kind = ES_OUTBOX_ANY_KIND;
    a->age_ms = -1;
    if (argc < 1) return false;
    const char *op = argv[0];
    int i = 1;
    if (strcmp(op, "list") == 0) {
        a->op = OB_LIST;
        a->status = ES_OUTBOX_PENDING;
        if (i < argc && strncmp(argv[i], "--", 2) != 0) {
            const char *st = argv[i++];
            if (strcmp(st, "pending") == 0)
                a->status = ES_OUTBOX_PENDING;
            else if (strcmp(st, "dead") == 0)
                a->status = ES_OUTBOX_DEAD;
            else if (strcmp(st, "done") == 0)
                a->status = ES_OUTBOX_DONE;
            else
                return false;
        }
        for (; i < argc; i++) {
            int64_t n = 0;
            if (strcmp(argv[i], "--limit") != 0 || i + 1 >= argc ||
                !parse_i64(argv[i + 1], &n) || n < 1 || n > 1000000)
                return false;
            a->limit = (size_t)n;
            i++;
        }
        return true;
    }
    if (strcmp(op, "show") == 0) {
        a->op = OB_SHOW;
        a->have_id = argc == 2 && es_uuid_parse(argv[1], &a->id) == 0;
        return a->have_id;
    }
    if (strcmp(op, "requeue") == 0) {
        a->op = OB_REQUEUE;
        if (argc == 2 && strncmp(argv[1], "--", 2) != 0) {
            a->have_id = es_uuid_parse(argv[1], &a->id) == 0;
            return a->have_id;
        }
        for (; i < argc; i++) {
            if (strcmp(argv[i], "--type") == 0 && i + 1 < argc) {
                a->type = argv[++i];
            } else if (strcmp(argv[i], "--kind") == 0 && i + 1 < argc) {
                int64_t k = 0;
                if (!parse_i64(argv[++i], &k) || k <= INT32_MIN ||
                    k > INT32_MAX)
                    return false;
                a->kind = (int32_t)k;
            } else {
                return false;
            }
        }
        return a->type != NULL && a->type[0] != '\0';
    }
    if (strcmp(op, "purge") == 0) {
        a->op = OB_PURGE;
        return argc == 3 && strcmp(argv[1], "--older-than") == 0 &&
               parse_age(argv[2], &a->age_ms);
    }
    return false;
}

static int cmd_commands_purge(es_store *store, int64_t age_ms)
{
    es_error err = {0};
    size_t n = 0;
    int rc = es_store_purge_commands(store, es_clock_now_ms() - age_ms, &n,
                                     &err);
    if (rc != 0) return fail("commands purge", rc, &err);
    printf("purged %zu command id%s\n", n, n == 1 ? "" : "s");
    return 0;
}

static const char *status_word(es_outbox_status st)
{
    switch (st) {
    case ES_OUTBOX_PENDING:
        return "pending";
    case ES_OUTBOX_DONE:
        return "done";
    case ES_OUTBOX_DEAD:
        return "dead";
    }
    return "?";
}

/* Unix ms -> "2026-11-27T11:40:02.123Z". */
static const char *iso_time(int64_t ms, char *out, size_t cap)
{
    time_t sec = (time_t)(ms / 1000);
    struct tm tm;
    if (gmtime_r(&sec, &tm) == NULL) {
        snprintf(out, cap, "%" PRId64 " ms", ms);
        return out;
    }
    char day[32];
    strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, cap, "%s.%03dZ", day, (int)(ms % 1000));
    return out;
}

/* Print a last error quoted, on one line. */
static void print_quoted(const char *text)
{
    putchar('"');
    for (const char *p = text; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        putchar(*p == '\n' ? ' ' : *p);
    }
    putchar('"');
}

/* Events after a checkpoint are counted up to this many. */
#define LAG_CAP 1000000

static int cmd_projections(es_store *store, const char *reset)
{
    es_error err = {0};
    if (reset != NULL) {
        int rc = es_checkpoint_reset(store, reset, &err);
        if (rc != 0) {
            fail("projections reset", rc, &err);
            return rc == ES_EINVAL ? 2 : 1;
        }
        printf("reset %s: it starts from the first event next time\n",
               reset);
        return 0;
    }
    es_checkpoint *cps = NULL;
    size_t n = 0;
    int rc = es_checkpoint_list(store, &cps, &n, &err);
    if (rc != 0) return fail("projections", rc, &err);
    int64_t now = es_clock_now_ms();
    if (n > 0)
        printf("%-24s %-24s %-24s %10s %10s\n", "NAME", "POSITION",
               "SAVED", "LAG", "LAG_S");
    for (size_t i = 0; i < n; i++) {
        uint64_t behind = 0;
        int64_t oldest = 0;
        rc = es_store_lag(store, &cps[i].position, LAG_CAP, &behind,
                          &oldest, &err);
        if (rc != 0) {
            es_free(cps);
            return fail("projections: lag", rc, &err);
        }
        char pos[48], saved[40];
        snprintf(pos, sizeof pos, "%" PRIu64 "/%" PRIu64,
                 cps[i].position.commit, cps[i].position.seq);
        printf("%-24s %-24s %-24s %9" PRIu64 "%s %10.1f\n", cps[i].name,
               pos, iso_time(cps[i].updated_ms, saved, sizeof saved), behind,
               behind >= LAG_CAP ? "+" : " ",
               oldest > 0 && now > oldest ? (double)(now - oldest) / 1000.0
                                          : 0.0);
    }
    if (n == 0) printf("no projection has a checkpoint\n");
    es_free(cps);
    return 0;
}

static int cmd_outbox(es_store *store, const outbox_args *a)
{
    es_error err = {0};
    char id[ES_UUID_STRLEN + 1], agg[ES_UUID_STRLEN + 1], when[48];
    int rc = 0;
    switch (a->op) {
    case OB_LIST: {
        es_outbox_entry_list *list = NULL;
        rc = es_outbox_list(store, a->status, a->limit, &list, &err);
        if (rc != 0) return fail("outbox list", rc, &err);
        for (size_t i = 0; i < list->count; i++) {
            const es_outbox_entry *e = &list->items[i];
            printf("%s type=%s kind=%d aggregate=%s attempts=%u created=%s",
                   es_uuid_format(&e->side_effect.id, id), e->aggregate_type,
                   (int)e->side_effect.kind,
                   es_uuid_format(&e->side_effect.aggregate_id, agg),
                   e->attempts, iso_time(e->created_ms, when, sizeof when));
            if (e->last_error[0]) {
                printf(" error=");
                print_quoted(e->last_error);
            }
            putchar('\n');
        }
        printf("%zu %s message%s%s\n", list->count, status_word(a->status),
               list->count == 1 ? "" : "s",
               list->count == a->limit ? " (limit reached)" : "");
        es_outbox_entry_list_free(list);
        return 0;
    }
    case OB_SHOW: {
        es_outbox_entry *e = NULL;
        rc = es_outbox_show(store, &a->id, &e, &err);
        if (rc != 0) return fail("outbox show", rc, &err);
        printf("id              %s\n", es_uuid_format(&e->side_effect.id, id));
        printf("status          %s\n", status_word(e->status));
        printf("aggregate type  %s\n", e->aggregate_type);
        printf("aggregate       %s\n",
               es_uuid_format(&e->side_effect.aggregate_id, agg));
        printf("event           %s\n",
               es_uuid_format(&e->side_effect.event_id, id));
        printf("kind            %d\n", (int)e->side_effect.kind);
        printf("attempts        %u\n", e->attempts);
        printf("created         %s\n", iso_time(e->created_ms, when,
                                                 sizeof when));
        if (e->status == ES_OUTBOX_PENDING)
            printf("next attempt    %s\n",
                   iso_time(e->next_attempt_ms, when, sizeof when));
        printf("last error      ");
        print_quoted(e->last_error);
        printf("\npayload         %zu bytes", e->side_effect.len);
        print_payload(e->side_effect.data, e->side_effect.len);
        es_free(e);
        return 0;
    }
    case OB_REQUEUE: {
        size_t n = 0;
        rc = es_outbox_requeue(store, a->have_id ? &a->id : NULL,
                               a->have_id ? NULL : a->type, a->kind, &n,
                               &err);
        if (rc != 0) return fail("outbox requeue", rc, &err);
        printf("requeued %zu dead letter%s\n", n, n == 1 ? "" : "s");
        return 0;
    }
    case OB_PURGE: {
        size_t n = 0;
        rc = es_outbox_purge_done(store, es_clock_now_ms() - a->age_ms, &n,
                                  &err);
        if (rc != 0) return fail("outbox purge", rc, &err);
        printf("purged %zu done message%s\n", n, n == 1 ? "" : "s");
        return 0;
    }
    }
    return 2;
}

/* The options of the commands themselves; any other word starting with
 * "--" after the command is an unknown option. */
static bool command_option(const char *arg)
{
    static const char *const names[] = {"--limit", "--type", "--kind",
                                        "--older-than"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(arg, names[i]) == 0) return true;
    return false;
}

typedef struct global_args {
    const char *db, *schema;
    bool help;
} global_args;

/* Take --db, --schema and --help out of argv[1..argc), wherever they
 * stand, keeping the rest (the command and its arguments) in order in
 * argv[1..): returns their count + 1, the new argc.  -1: wrong usage,
 * said on stderr.  Before the command only these options are known;
 * after it, also the command's own (command_option), whose values are
 * kept with them. */
static int take_global_options(int argc, char **argv, global_args *g)
{
    int kept = 1;
    bool before_command = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0) { /* the rest is not looked at */
            g->help = true;
            return kept;
        } else if (strcmp(a, "--db") == 0 || strcmp(a, "--schema") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "eventastic: %s needs a value\n", a);
                return -1;
            }
            *(a[2] == 'd' ? &g->db : &g->schema) = argv[++i];
        } else if (strncmp(a, "--", 2) == 0 &&
                   (before_command || !command_option(a))) {
            fprintf(stderr, "eventastic: unknown option '%s'\n", a);
            return -1;
        } else {
            before_command = false;
            argv[kept++] = argv[i];
            /* A command option's value is kept as it is. */
            if (command_option(a) && i + 1 < argc) argv[kept++] = argv[++i];
        }
    }
    return kept;
}

int main(int argc, char **argv)
{
    global_args g = {0};
    argc = take_global_options(argc, argv, &g);
    if (argc < 0) {
        fputs(usage, stderr);
        return 2;
    }
    if (g.help) {
        fputs(usage, stdout);
        return 0;
    }
    const char *db = g.db, *schema = g.schema;
    int i = 1;
    if (i >= argc) {
        fputs(usage, stderr);
        return 2;
    }
    const char *cmd = argv[i++];
    bool is_stream = strcmp(cmd, "stream") == 0;
    bool is_outbox = strcmp(cmd, "outbox") == 0;
    bool is_commands = strcmp(cmd, "commands") == 0;
    bool is_projections = strcmp(cmd, "projections") == 0;
    const char *reset = NULL;
    outbox_args ob;
    int64_t commands_age = -1;
    if (is_outbox) {
        if (!outbox_parse(argc - i, argv + i, &ob)) {
            fputs(usage, stderr);
            return 2;
        }
    } else if (is_commands) {
        if (argc - i != 3 || strcmp(argv[i], "purge") != 0 ||
            strcmp(argv[i + 1], "--older-than") != 0 ||
            !parse_age(argv[i + 2], &commands_age)) {
            fputs(usage, stderr);
            return 2;
        }
    } else if (is_projections) {
        bool list = argc - i == 0 ||
                    (argc - i == 1 && strcmp(argv[i], "list") == 0);
        if (argc - i == 2 && strcmp(argv[i], "reset") == 0)
            reset = argv[i + 1];
        else if (!list) {
            fputs(usage, stderr);
            return 2;
        }
    } else if ((strcmp(cmd, "migrate") != 0 && strcmp(cmd, "status") != 0 &&
                !is_stream) ||
               (is_stream && argc - i != 1) ||
               (!is_stream && argc - i != 0)) {
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
        else if (is_outbox)
            status = cmd_outbox(store, &ob);
        else if (is_commands)
            status = cmd_commands_purge(store, commands_age);
        else if (is_projections)
            status = cmd_projections(store, reset);
        else
            status = cmd_status(store);
        es_store_close(store);
    }
    es_pg_config_free(cfg);
    return status;
}
