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
        void *p = m->slot[i].p;
        if (p == NULL) return NULL;
        if (p != TOMB && m->slot[i].h == hash && match(p, key)) return p;
    }
}

/* Rebuild into cap slots (dropping the tombstones). */
static int rehash(es__ptrmap *m, size_t cap)
{
    es__ptrmap_slot *slot = es__calloc(cap, sizeof *slot);
    if (slot == NULL) return ES_ENOMEM;
    size_t mask = cap - 1;
    for (size_t j = 0; j < m->cap; j++) {
        void *p = m->slot[j].p;
        if (p == NULL || p == TOMB) continue;
        size_t i = m->slot[j].h & mask;
        while (slot[i].p != NULL) i = (i + 1) & mask;
        slot[i] = m->slot[j];
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
    (void)hash; /* the slots keep the hashes */
    if ((m->used + extra) * 2 <= m->cap) return 0;
    size_t cap = m->cap ? m->cap : 16;
    while ((m->n + extra) * 2 > cap) {
        if (cap > SIZE_MAX / 2 / sizeof(es__ptrmap_slot)) return ES_ENOMEM;
        cap *= 2;
    }
    return rehash(m, cap);
}

int es__ptrmap_insert(es__ptrmap *m, void *item, es__ptrmap_hash_fn hash)
{
    int rc = es__ptrmap_reserve(m, 1, hash);
    if (rc != 0) return rc;
    uint64_t h = hash(item);
    size_t mask = m->cap - 1;
    size_t i = h & mask;
    while (m->slot[i].p != NULL && m->slot[i].p != TOMB) i = (i + 1) & mask;
    if (m->slot[i].p == NULL) m->used++;
    m->slot[i] = (es__ptrmap_slot){item, h};
    m->n++;
    return 0;
}

bool es__ptrmap_remove(es__ptrmap *m, const void *item,
                       es__ptrmap_hash_fn hash)
{
    if (m->cap == 0) return false;
    size_t mask = m->cap - 1;
    for (size_t i = hash(item) & mask;; i = (i + 1) & mask) {
        void *p = m->slot[i].p;
        if (p == NULL) return false;
        if (p == item) {
            /* the end of a probe chain needs no tombstone */
            if (m->slot[(i + 1) & mask].p == NULL) {
                m->slot[i].p = NULL;
                m->used--;
            } else {
                m->slot[i].p = TOMB;
            }
            m->n--;
            return true;
        }
    }
}

void es__ptrmap_clear(es__ptrmap *m, void (*fn)(void *item))
{
    for (size_t i = 0; fn && i < m->cap; i++)
        if (m->slot[i].p != NULL && m->slot[i].p != TOMB) fn(m->slot[i].p);
    es__free(m->slot);
    memset(m, 0, sizeof *m);
}
