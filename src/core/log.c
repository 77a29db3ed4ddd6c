/* Log messages: to the application's callback, or to stderr. */
#include <stdio.h>

#include "core/internal.h"
#include "eventastic/log.h"

static es_log_fn log_fn;
static void *log_ud;
static es_log_level log_max = ES_LOG_WARN;

int es_log_set(es_log_fn fn, void *ud, es_log_level max_level)
{
    if ((int)max_level < (int)ES_LOG_ERROR || max_level > ES_LOG_DEBUG)
        return ES_EINVAL;
    log_fn = fn;
    log_ud = ud;
    log_max = max_level;
    return 0;
}

bool es__log_enabled(es_log_level level) { return level <= log_max; }

void es__log(es_log_level level, const char *fmt, ...)
{
    if (level > log_max) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (log_fn != NULL) {
        log_fn(log_ud, level, msg);
        return;
    }
    static const char *names[] = {"error", "warning", "info", "debug"};
    fprintf(stderr, "eventastic %s: %s\n", names[level], msg);
}
