/*
 * A set of pointers keyed by what they point at: open addressing with
 * linear probing, at most half full.  A slot keeps the item's hash next
 * to its pointer (16 bytes), so that a probe or a rehash never touches an
 * item whose hash differs (rehashing through the items was 6% of the
 * host benchmark, a cache miss per item).  The memory store's
 * indexes (streams, event ids, command ids, ...) used tsearch trees: a
 * 32-byte node allocated per entry and a log(n) walk of uuid compares per
 * lookup, which perf showed as a third of the host benchmark.  The caller
 * owns the items; the map holds the pointers only.  Not thread-safe: the
 * memory store calls it under its lock (committed indexes) or on the
 * transaction's thread (pending ones).  Never installed.
 */
#ifndef ES_STORE_PTRMAP_H
#define ES_STORE_PTRMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "eventastic/uuid.h"

typedef struct es__ptrmap_slot {
    void *p; /* NULL: never used; a tombstone: removed */
    uint64_t h;
} es__ptrmap_slot;

typedef struct es__ptrmap {
    es__ptrmap_slot *slot;
    size_t cap;   /* 0 or a power of two */
    size_t n;     /* items */
    size_t used;  /* items and tombstones */
} es__ptrmap;

/* The hash of an item's key (the same as of the key it is found by). */
typedef uint64_t (*es__ptrmap_hash_fn)(const void *item);
/* Whether item has the key. */
typedef bool (*es__ptrmap_match_fn)(const void *item, const void *key);

/* A uuid's hash: all 16 bytes mixed (v7 ids differ in their last bytes,
 * the benchmarks' in their first). */
static inline uint64_t es__uuid_hash(const es_uuid *id)
{
    uint64_t a, b;
    memcpy(&a, id->bytes, 8);
    memcpy(&b, id->bytes + 8, 8);
    uint64_t h = a ^ (b * 0x9e3779b97f4a7c15u) ^ (b >> 29);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdu;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53u;
    return h ^ (h >> 33);
}

/* The item with the key, or NULL. */
void *es__ptrmap_find(const es__ptrmap *m, uint64_t hash,
                      es__ptrmap_match_fn match, const void *key);

/* Room for `extra` more inserts without allocating.  Returns 0 or
 * ES_ENOMEM (the map unchanged). */
int es__ptrmap_reserve(es__ptrmap *m, size_t extra, es__ptrmap_hash_fn hash);

/* Add an item whose key is not in the map.  Returns 0 or ES_ENOMEM (the
 * map unchanged); never fails after es__ptrmap_reserve made room. */
int es__ptrmap_insert(es__ptrmap *m, void *item, es__ptrmap_hash_fn hash);

/* Take this very item (by address) out; never allocates.  Returns whether
 * it was there. */
bool es__ptrmap_remove(es__ptrmap *m, const void *item,
                       es__ptrmap_hash_fn hash);

/* Call fn for every item (fn may free it, not touch the map), then free
 * the slots: the map is empty and reusable.  fn may be NULL. */
void es__ptrmap_clear(es__ptrmap *m, void (*fn)(void *item));

#endif
