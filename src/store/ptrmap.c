/* Open addressing with linear probing; see ptrmap.h. */
#include "store/ptrmap.h"

#include "core/internal.h"

static char tombstone;
#define TOMB ((void *)&tombstone)

void *es__ptrmap_find(const es__ptrmap *m, uint64_t hash,
                      es__ptrmap_match_fn match, const void *key)
{
    if (m->cap == 0) return NULL;
    size_t mask = m->cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        void *p = m->slot[i];
        if (p == NULL) return NULL;
        if (p != TOMB && match(p, key)) return p;
    }
}

/* Rebuild into cap slots (dropping the tombstones). */
static int rehash(es__ptrmap *m, size_t cap, es__ptrmap_hash_fn hash)
{
    void **slot = es__calloc(cap, sizeof *slot);
    if (slot == NULL) return ES_ENOMEM;
    size_t mask = cap - 1;
    for (size_t j = 0; j < m->cap; j++) {
        void *p = m->slot[j];
        if (p == NULL || p == TOMB) continue;
        size_t i = hash(p) & mask;
        while (slot[i] != NULL) i = (i + 1) & mask;
        slot[i] = p;
    }
    es__free(m->slot);
    m->slot = slot;
    m->cap = cap;
    m->used = m->n;
    return 0;
}

/* At most half full: a miss (every insert looks first) probes about 2.5
 * slots, against 8.5 at 3/4. */
int es__ptrmap_reserve(es__ptrmap *m, size_t extra, es__ptrmap_hash_fn hash)
{
    if ((m->used + extra) * 2 <= m->cap) return 0;
    size_t cap = m->cap ? m->cap : 16;
    while ((m->n + extra) * 2 > cap) {
        if (cap > SIZE_MAX / 4) return ES_ENOMEM;
        cap *= 2;
    }
    return rehash(m, cap, hash);
}

int es__ptrmap_insert(es__ptrmap *m, void *item, es__ptrmap_hash_fn hash)
{
    int rc = es__ptrmap_reserve(m, 1, hash);
    if (rc != 0) return rc;
    size_t mask = m->cap - 1;
    size_t i = hash(item) & mask;
    while (m->slot[i] != NULL && m->slot[i] != TOMB) i = (i + 1) & mask;
    if (m->slot[i] == NULL) m->used++;
    m->slot[i] = item;
    m->n++;
    return 0;
}

bool es__ptrmap_remove(es__ptrmap *m, const void *item,
                       es__ptrmap_hash_fn hash)
{
    if (m->cap == 0) return false;
    size_t mask = m->cap - 1;
    for (size_t i = hash(item) & mask;; i = (i + 1) & mask) {
        void *p = m->slot[i];
        if (p == NULL) return false;
        if (p == item) {
            /* the end of a probe chain needs no tombstone */
            if (m->slot[(i + 1) & mask] == NULL) {
                m->slot[i] = NULL;
                m->used--;
            } else {
                m->slot[i] = TOMB;
            }
            m->n--;
            return true;
        }
    }
}

void es__ptrmap_clear(es__ptrmap *m, void (*fn)(void *item))
{
    for (size_t i = 0; fn && i < m->cap; i++)
        if (m->slot[i] != NULL && m->slot[i] != TOMB) fn(m->slot[i]);
    es__free(m->slot);
    memset(m, 0, sizeof *m);
}
