/*
 * The emitter: where decide puts its events (es_emit) or its rejection
 * (es_emit_reject), and applying what it emitted to the actor's context.
 * Thread: the worker running the actor's decide, only during the call;
 * no lock.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "host/host_int.h"

int es_emit(es_emitter *em, const void *event)
{
    if (em == NULL || event == NULL || !em->active) return ES_EINVAL;
    const es_aggregate_type *t = em->type;
    int rc = 0;
    es_uuid id = t->event_id(event);
    if (es_uuid_is_nil(&id)) rc = ES_EINVAL;
    if (em->ev == NULL) { /* a malloc per command saved */
        em->ev = em->one;
        em->cap = sizeof em->one / sizeof em->one[0];
    }
    if (rc == 0 && em->n == em->cap) {
        size_t cap = em->cap * 2;
        struct enc_event *more =
            em->cap > SIZE_MAX / 2 / sizeof *more
                ? NULL
                : es__malloc(cap * sizeof *more);
        if (more == NULL) {
            rc = ES_ENOMEM;
        } else {
            memcpy(more, em->ev, em->n * sizeof *more);
            if (em->ev != em->one) es__free(em->ev);
            em->ev = more;
            em->cap = cap;
        }
    }
    if (rc == 0) {
        struct enc_event *e = &em->ev[em->n];
        memset(e, 0, sizeof *e);
        e->id = id;
        e->kind = t->event_kind(event);
        es_error inner = {0};
        rc = t->event_encode(event, &e->buf, &inner);
        if (rc != 0) {
            es_buf_free(&e->buf);
            rc = rc < 0 ? rc : ES_EINVAL;
        } else {
            em->n++;
        }
    }
    if (rc != 0 && em->failed == 0) em->failed = rc;
    return rc;
}

int es_emit_reject(es_emitter *em, const char *fmt, ...)
{
    if (em == NULL || !em->active) return ES_EREJECTED;
    em->rejected = true;
    if (fmt != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(em->reason, sizeof em->reason, fmt, ap);
        va_end(ap);
    }
    return ES_EREJECTED;
}

const es_uuid *es_emit_aggregate_id(const es_emitter *em)
{
    return em ? em->aggregate_id : NULL;
}

void es__host_emitter_free(es_emitter *em)
{
    for (size_t i = 0; i < em->n; i++) es_buf_free(&em->ev[i].buf);
    if (em->ev != em->one) es__free(em->ev);
}

/* Apply what decide emitted to the actor's context; all or nothing. */
int es__host_apply_emitted(actor *a, es_emitter *em, es_error *err)
{
    if (em->n == 0) return 0;
    const es_aggregate_type *t = a->ht->type;
    int rc = es__host_actor_expand(a);
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    bool had = a->ctx != NULL;
    es_context *backup = NULL;
    if (em->n > 1 && had && (rc = es_context_clone(a->ctx, &backup, err)))
        return rc;
    /* small event values on the stack: a malloc per command saved */
    _Alignas(max_align_t) unsigned char small[256];
    void *value = t->event_size <= sizeof small
                      ? memset(small, 0, t->event_size)
                      : es__calloc(1, t->event_size);
    if (value == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < em->n; i++) {
        const struct enc_event *e = &em->ev[i];
        es_event view = {e->id, 0, e->kind, e->buf.data, e->buf.len};
        rc = es_event_decode(t, &view, value, err);
        if (rc != 0) break;
        if (a->ctx == NULL)
            rc = es_context_record_new(t, &a->id, value, &a->ctx, err);
        else
            rc = es_context_record(a->ctx, value, err);
        es_event_value_free(t, value);
        memset(value, 0, t->event_size);
    }
    if (value != small) es__free(value);
    if (rc != 0 && (em->n > 1 || !had)) {
        es_context_free(a->ctx);
        a->ctx = backup;
        backup = NULL;
    }
    es_context_free(backup);
    return rc;
}
