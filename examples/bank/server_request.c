/* bank-server: the request body and the fields it takes. */
#include <stdio.h>
#include <string.h>

#include "server.h"


/* The body as a JSON object, or NULL with detail filled. */
json_t *srv_read_body(struct evhttp_request *req, char *detail,
                         size_t cap)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len == 0) {
        snprintf(detail, cap, "the body must be a JSON object");
        return NULL;
    }
    if (len > MAX_BODY) { /* handle answers 413 before this */
        snprintf(detail, cap, "the body is over 64 KiB");
        return NULL;
    }
    const char *data = (const char *)evbuffer_pullup(in, (ssize_t)len);
    json_error_t jerr;
    json_t *o = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (o == NULL) {
        snprintf(detail, cap, "malformed JSON at line %d, column %d",
                 jerr.line, jerr.column);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        snprintf(detail, cap, "the body must be a JSON object");
        return NULL;
    }
    return o;
}

/* Field readers: true, or false with detail saying what is wrong. */
bool srv_get_uuid_field(json_t *o, const char *name, es_uuid *out,
                           char *detail, size_t cap)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL) {
        snprintf(detail, cap, "%s is missing", name);
        return false;
    }
    if (!json_is_string(v) || es_uuid_parse(json_string_value(v), out) != 0) {
        snprintf(detail, cap, "%s must be a UUID string", name);
        return false;
    }
    /* The nil id names no aggregate and no command: the library refuses
     * it, and a saga step keyed by it could never run. */
    if (es_uuid_is_nil(out)) {
        snprintf(detail, cap, "%s must not be the nil UUID", name);
        return false;
    }
    return true;
}

bool srv_get_amount(json_t *o, const char *name, int64_t *out, bool zero,
                       char *detail, size_t cap)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL) {
        snprintf(detail, cap, "%s is missing", name);
        return false;
    }
    if (!json_is_integer(v)) {
        snprintf(detail, cap, "%s must be an integer (cents)", name);
        return false;
    }
    json_int_t n = json_integer_value(v);
    if (n < 0 || (n == 0 && !zero)) {
        snprintf(detail, cap, "%s must be %s", name,
                 zero ? "zero or more" : "positive");
        return false;
    }
    if (n > MAX_AMOUNT) {
        snprintf(detail, cap, "%s is too large (at most %lld)", name,
                 (long long)MAX_AMOUNT);
        return false;
    }
    *out = (int64_t)n;
    return true;
}

bool srv_get_text(json_t *o, const char *name, char out[BANK_NAME_MAX],
                     char *detail, size_t cap)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL) {
        snprintf(detail, cap, "%s is missing", name);
        return false;
    }
    if (!json_is_string(v)) {
        snprintf(detail, cap, "%s must be a string", name);
        return false;
    }
    size_t n = json_string_length(v);
    if (n == 0 || n >= BANK_NAME_MAX || memchr(json_string_value(v), 0, n)) {
        snprintf(detail, cap, "%s must have 1 to %d bytes and no NUL", name,
                 BANK_NAME_MAX - 1);
        return false;
    }
    memcpy(out, json_string_value(v), n + 1);
    return true;
}

