/* Status codes, their names and messages, and the es_error setters. */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

const char *es_strerror(int status)
{
    switch (status) {
#define ES__STATUS_MSG(name, value, msg) \
    case value:                           \
        return msg;
        ES_STATUS_MAP(ES__STATUS_MSG)
#undef ES__STATUS_MSG
    default:
        return "unknown status";
    }
}

const char *es_status_name(int status)
{
    switch (status) {
#define ES__STATUS_NAME(name, value, msg) \
    case value:                            \
        return "ES_" #name;
        ES_STATUS_MAP(ES__STATUS_NAME)
#undef ES__STATUS_NAME
    default:
        return "ES_UNKNOWN_STATUS";
    }
}

void es_error_clear(es_error *err)
{
    if (err != NULL) memset(err, 0, sizeof *err);
}

int es__error_set(es_error *err, int code, const char *fmt, ...)
{
    if (err == NULL) return code;
    memset(err, 0, sizeof *err);
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return code;
}

int es__error_wrap(es_error *err, int code, const es_error *inner,
                   const char *fmt, ...)
{
    if (err == NULL) return code;
    char prefix[sizeof err->message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    es_error keep = *inner;
    memset(err, 0, sizeof *err);
    err->code = code;
    err->sys_errno = keep.sys_errno;
    memcpy(err->sqlstate, keep.sqlstate, sizeof err->sqlstate);
    if (keep.message[0] != '\0')
        snprintf(err->message, sizeof err->message, "%.120s: %.130s", prefix,
                 keep.message);
    else
        snprintf(err->message, sizeof err->message, "%s", prefix);
    return code;
}
