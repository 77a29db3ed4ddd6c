/* The connection options every connection of the PostgreSQL store gets
 * (conninfo.h). */
#include "store/pg/conninfo.h"

#include <stdbool.h>
#include <string.h>

#include <libpq-fe.h>

#include "core/internal.h"

static const struct {
    const char *keyword, *value;
} defaults[] = {
#define X(k, v) {k, v},
    ES__PG_CONNINFO_DEFAULTS
#undef X
};

/* Append ` keyword='value'` to out (cap bytes, at *n) with \ and '
 * escaped; returns false when it does not fit. */
static bool put(char *out, size_t cap, size_t *n, const char *keyword,
                const char *value)
{
    size_t need = strlen(keyword) + 4 + 2 * strlen(value);
    if (*n + need >= cap) return false;
    if (*n > 0) out[(*n)++] = ' ';
    memcpy(out + *n, keyword, strlen(keyword));
    *n += strlen(keyword);
    out[(*n)++] = '=';
    out[(*n)++] = '\'';
    for (const char *p = value; *p != '\0'; p++) {
        if (*p == '\\' || *p == '\'') out[(*n)++] = '\\';
        out[(*n)++] = *p;
    }
    out[(*n)++] = '\'';
    out[*n] = '\0';
    return true;
}

int es__pg_conninfo_with_defaults(const char *conninfo, char **out)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    if (opts == NULL) {
        if (msg != NULL) PQfreemem(msg);
        return msg != NULL ? ES_EINVAL : ES_ENOMEM;
    }
    size_t cap = 1; /* the NUL */
    for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
        if (o->val != NULL)
            cap += strlen(o->keyword) + 4 + 2 * strlen(o->val);
    for (size_t i = 0; i < sizeof defaults / sizeof *defaults; i++)
        cap += strlen(defaults[i].keyword) + 4 + 2 * strlen(defaults[i].value);
    char *s = es__malloc(cap);
    if (s == NULL) {
        PQconninfoFree(opts);
        return ES_ENOMEM;
    }
    size_t n = 0;
    s[0] = '\0';
    bool ok = true;
    for (PQconninfoOption *o = opts; ok && o->keyword != NULL; o++)
        if (o->val != NULL) ok = put(s, cap, &n, o->keyword, o->val);
    for (size_t i = 0; ok && i < sizeof defaults / sizeof *defaults; i++) {
        bool set = false;
        for (PQconninfoOption *o = opts; !set && o->keyword != NULL; o++)
            set = o->val != NULL &&
                  strcmp(o->keyword, defaults[i].keyword) == 0;
        if (!set) ok = put(s, cap, &n, defaults[i].keyword, defaults[i].value);
    }
    PQconninfoFree(opts);
    if (!ok) { /* not reached: cap counts every byte */
        es__free(s);
        return ES_ENOMEM;
    }
    *out = s;
    return 0;
}
