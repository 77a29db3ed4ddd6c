/*
 * The shards of the key space: each a chained hash table of its resident
 * actors and the LRU list of its idle ones, under the shard's lock
 * (shard->lock).  Every function here runs with that lock held, on any
 * thread (es_host_send, a worker, the commit loop, the I/O loop); none
 * takes another lock or runs user code.
 */
#include <string.h>

#include "host/host_int.h"

uint64_t es__host_key_hash(const es_uuid *id)
{
    uint64_t a, b;
    memcpy(&a, id->bytes, 8);
    memcpy(&b, id->bytes + 8, 8);
    uint64_t h = (a ^ (b * 0x9e3779b97f4a7c15u)) * 0xff51afd7ed558ccdu;
    return h ^ (h >> 29);
}

shard *es__host_shard_of(es_host *host, const es_uuid *id)
{
    return &host->shards[(es__host_key_hash(id) >> 40) % N_SHARDS];
}

/* Shard lock held.  An actor is found by key and type: a command of
 * another type never joins the mailbox of a resident actor (nor is it
 * refused because of one); its own actor's load answers ES_EWRONGTYPE
 * when the store holds the key under the first type. */
actor *es__host_shard_find(shard *sh, const es_uuid *id, const htype *ht)
{
    if (sh->n_buckets == 0) return NULL;
    actor *a = sh->buckets[es__host_key_hash(id) & (sh->n_buckets - 1)];
    while (a && (a->ht != ht || !es_uuid_equal(&a->id, id))) a = a->hnext;
    return a;
}

/* Shard lock held.  Grows the table to keep chains short; a failed
 * growth only makes chains longer. */
int es__host_shard_insert(shard *sh, actor *a)
{
    if (sh->resident + 1 > sh->n_buckets) {
        size_t n = sh->n_buckets ? sh->n_buckets * 2 : 16;
        actor **b = es__calloc(n, sizeof *b);
        if (b == NULL && sh->n_buckets == 0) return ES_ENOMEM;
        if (b != NULL) {
            for (size_t i = 0; i < sh->n_buckets; i++) {
                actor *x = sh->buckets[i];
                while (x) {
                    actor *next = x->hnext;
                    size_t j = es__host_key_hash(&x->id) & (n - 1);
                    x->hnext = b[j];
                    b[j] = x;
                    x = next;
                }
            }
            es__free(sh->buckets);
            sh->buckets = b;
            sh->n_buckets = n;
        }
    }
    size_t j = es__host_key_hash(&a->id) & (sh->n_buckets - 1);
    a->hnext = sh->buckets[j];
    sh->buckets[j] = a;
    return 0;
}

/* Shard lock held. */
static void shard_remove(shard *sh, actor *a)
{
    actor **p = &sh->buckets[es__host_key_hash(&a->id) & (sh->n_buckets - 1)];
    while (*p != a) p = &(*p)->hnext;
    *p = a->hnext;
    a->hnext = NULL;
}

static void lru_unlink(shard *sh, actor *a)
{
    if (!a->in_lru) return;
    if (a->prev) a->prev->next = a->next;
    else sh->lru_head = a->next;
    if (a->next) a->next->prev = a->prev;
    else sh->lru_tail = a->prev;
    a->prev = a->next = NULL;
    a->in_lru = false;
}

void es__host_lru_append(shard *sh, actor *a)
{
    a->prev = sh->lru_tail;
    a->next = NULL;
    if (sh->lru_tail) sh->lru_tail->next = a;
    else sh->lru_head = a;
    sh->lru_tail = a;
    a->in_lru = true;
}

/* Shard lock held.  True when the caller must push a to the run queue. */
bool es__host_schedule_locked(shard *sh, actor *a)
{
    if (a->scheduled) return false;
    a->scheduled = true;
    lru_unlink(sh, a);
    return true;
}

/* Shard lock held: take a resident, idle actor out of the shard. */
void es__host_unlink_actor(es_host *host, shard *sh, actor *a)
{
    lru_unlink(sh, a);
    shard_remove(sh, a);
    sh->resident--;
    metric_sub(&host->resident, 1);
}
