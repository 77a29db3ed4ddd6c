/*
 * The memory store's outbox: the committed side effects, claimed,
 * finished, listed, requeued, purged and counted, each under the store's
 * lock.
 */
#include <search.h>
#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "store/memory/mem_int.h"

void es__mem_se_free(void *p)
{
    mem_se *se = p;
    es__free((void *)se->se.data);
    es__free(se);
}

static void noop_free(void *p) { (void)p; }

static int cmp_uuid_ptr(const void *a, const void *b)
{
    return es_uuid_compare(a, b);
}

static void entry_from(es_outbox_entry *e, const mem_se *m)
{
    memset(e, 0, sizeof *e);
    e->side_effect = m->se;
    memcpy(e->aggregate_type, m->type, sizeof e->aggregate_type);
    e->status = m->status;
    e->attempts = m->attempts;
    e->created_ms = m->created_ms;
    e->next_attempt_ms = m->next_ms;
    memcpy(e->last_error, m->last_error, sizeof e->last_error);
}

/* Append a copy of m (payload copied) to list. */
static int entry_push(es_outbox_entry_list *list, size_t *cap, const mem_se *m)
{
    void *items = list->items;
    if (es__grow(&items, cap, list->count + 1, sizeof(es_outbox_entry)))
        return ES_ENOMEM;
    list->items = items;
    uint8_t *data = es__memdup(m->se.data, m->se.len);
    if (data == NULL) return ES_ENOMEM;
    es_outbox_entry *e = &list->items[list->count++];
    entry_from(e, m);
    e->side_effect.data = data;
    return 0;
}

static void release_claim(mem_se *m)
{
    m->owner[0] = '\0';
    m->claimed_until = 0;
}

int es__mem_outbox_claim(es_store *store, const char *owner, int64_t now,
                         int64_t lease_ms, uint32_t max_attempts,
                         const es__outbox_filter *filters, size_t nf,
                         size_t max, es_outbox_entry_list **out,
                         es_error *err)
{
    mem_store *s = (mem_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    int rc = 0;
    void *heads = NULL; /* aggregates whose first pending message is seen */
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n_se && list->count < max; i++) {
        mem_se *m = s->se[i];
        if (m->status != ES_OUTBOX_PENDING) continue;
        if (!es__outbox_filter_match(filters, nf, m->type, m->se.kind))
            continue;
        if (tfind(&m->se.aggregate_id, &heads, cmp_uuid_ptr)) continue;
        if (tsearch(&m->se.aggregate_id, &heads, cmp_uuid_ptr) == NULL) {
            rc = ES_ENOMEM;
            break;
        }
        if (m->owner[0] != '\0' && m->claimed_until > now) continue;
        if (m->owner[0] != '\0' && m->attempts >= max_attempts) {
            /* Its dispatcher died (or stalled) on every attempt. */
            m->status = ES_OUTBOX_DEAD;
            snprintf(m->last_error, sizeof m->last_error,
                     "attempt %u abandoned: claim of '%.63s' expired",
                     m->attempts, m->owner);
            release_claim(m);
            tdelete(&m->se.aggregate_id, &heads, cmp_uuid_ptr);
            continue;
        }
        if (m->next_ms > now) continue;
        m->attempts++;
        snprintf(m->owner, sizeof m->owner, "%s", owner);
        m->claimed_until = now + lease_ms;
        if ((rc = entry_push(list, &cap, m)) != 0) {
            m->attempts--;
            release_claim(m);
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    tdestroy(heads, noop_free);
    if (rc != 0) {
        /* The claims already taken simply expire. */
        es_outbox_entry_list_free(list);
        return es__error_set(err, rc, "out of memory");
    }
    *out = list;
    return 0;
}

int es__mem_outbox_finish(es_store *store, const es_uuid *id,
                          const char *owner, es_outbox_status status,
                          int64_t now, int64_t next_ms, const char *error,
                          es_error *err)
{
    mem_store *s = (mem_store *)store;
    int rc = 0;
    pthread_mutex_lock(&s->lock);
    mem_se *m = es__mem_find_se(s, id);
    if (m == NULL)
        rc = ES_ENOTFOUND;
    else if (m->status != ES_OUTBOX_PENDING || strcmp(m->owner, owner) != 0)
        rc = ES_ECONFLICT;
    else {
        m->status = status;
        if (status == ES_OUTBOX_PENDING) m->next_ms = next_ms;
        if (status == ES_OUTBOX_DONE) m->finished_ms = now;
        if (error != NULL)
            snprintf(m->last_error, sizeof m->last_error, "%s", error);
        release_claim(m);
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND)
        return es__error_set(err, rc, "outbox message not found");
    if (rc == ES_ECONFLICT)
        return es__error_set(err, rc, "claim on the outbox message was lost "
                                      "(lease expired and taken by another)");
    return 0;
}

int es__mem_outbox_list(es_store *store, es_outbox_status status,
                        size_t limit, es_outbox_entry_list **out,
                        es_error *err)
{
    mem_store *s = (mem_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    int rc = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; rc == 0 && i < s->n_se && list->count < limit; i++)
        if (s->se[i]->status == status)
            rc = entry_push(list, &cap, s->se[i]);
    pthread_mutex_unlock(&s->lock);
    if (rc != 0) {
        es_outbox_entry_list_free(list);
        return es__error_set(err, rc, "out of memory");
    }
    *out = list;
    return 0;
}

int es__mem_outbox_get(es_store *store, const es_uuid *id,
                       es_outbox_entry **out, es_error *err)
{
    mem_store *s = (mem_store *)store;
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    mem_se *m = es__mem_find_se(s, id);
    if (m != NULL) {
        es_outbox_entry *e = es__malloc(sizeof *e + m->se.len);
        if (e == NULL) {
            rc = ES_ENOMEM;
        } else {
            entry_from(e, m);
            uint8_t *data = (uint8_t *)(e + 1);
            if (m->se.len > 0) memcpy(data, m->se.data, m->se.len);
            e->side_effect.data = data;
            *out = e;
            rc = 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND)
        return es__error_set(err, rc, "outbox message not found");
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    return 0;
}

static void requeue_one(mem_se *m, int64_t now)
{
    m->status = ES_OUTBOX_PENDING;
    m->attempts = 0;
    m->next_ms = now;
    release_claim(m);
}

int es__mem_outbox_requeue(es_store *store, const es_uuid *id,
                           const char *type_name, int32_t kind,
                           int64_t now, size_t *count, es_error *err)
{
    mem_store *s = (mem_store *)store;
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    if (id != NULL) {
        mem_se *m = es__mem_find_se(s, id);
        if (m != NULL && m->status == ES_OUTBOX_DEAD) {
            requeue_one(m, now);
            n = 1;
        }
    } else {
        es__outbox_filter f = {type_name, kind};
        for (size_t i = 0; i < s->n_se; i++)
            if (s->se[i]->status == ES_OUTBOX_DEAD &&
                es__outbox_filter_match(&f, 1, s->se[i]->type,
                                        s->se[i]->se.kind)) {
                requeue_one(s->se[i], now);
                n++;
            }
    }
    pthread_mutex_unlock(&s->lock);
    if (count) *count = n;
    if (id != NULL && n == 0)
        return es__error_set(err, ES_ENOTFOUND, "no dead letter with that id");
    if (n > 0) es__store_notify(store);
    return 0;
}

int es__mem_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                         size_t *count, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    size_t kept = 0, n = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n_se; i++) {
        mem_se *m = s->se[i];
        if (n < limit && m->status == ES_OUTBOX_DONE &&
            m->finished_ms < before_ms) {
            es__ptrmap_remove(&s->se_ids, m, es__mem_hash_se);
            es__mem_se_free(m);
            n++;
        } else {
            s->se[kept++] = m;
        }
    }
    s->n_se = kept;
    pthread_mutex_unlock(&s->lock);
    if (count) *count = n;
    return 0;
}

int es__mem_outbox_stats(es_store *store, int64_t now,
                         es_outbox_stats *out, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    memset(out, 0, sizeof *out);
    int64_t oldest = INT64_MAX;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n_se; i++) {
        const mem_se *m = s->se[i];
        switch (m->status) {
        case ES_OUTBOX_PENDING:
            out->pending++;
            if (m->created_ms < oldest) oldest = m->created_ms;
            break;
        case ES_OUTBOX_DONE:
            out->done++;
            break;
        case ES_OUTBOX_DEAD:
            out->dead++;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (out->pending > 0 && now > oldest)
        out->oldest_pending_age_ms = now - oldest;
    return 0;
}
