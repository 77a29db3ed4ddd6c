/*
 * The memory store's indexes: the hash and match function of each map,
 * and the lookups of committed data (lock held) and of a transaction's
 * pending writes (its thread).
 */
#include "core/internal.h"
#include "store/memory/mem_int.h"

#define KEYED_BY(name, type, field)                                        \
    uint64_t es__mem_hash_##name(const void *item)                         \
    {                                                                      \
        return es__uuid_hash(&((const type *)item)->field);                \
    }                                                                      \
    bool es__mem_match_##name(const void *item, const void *key)           \
    {                                                                      \
        return es__mem_same_uuid(&((const type *)item)->field, key);       \
    }

KEYED_BY(stream, mem_stream, agg)
KEYED_BY(snapset, mem_snapset, agg)
KEYED_BY(se, mem_se, se.id)
KEYED_BY(cmd, mem_cmd, rec.command_id)
KEYED_BY(pend_agg, pend_event, agg)

uint64_t es__mem_hash_id(const void *item)
{
    return es__uuid_hash(&((const mem_id *)item)->id);
}
bool es__mem_match_id(const void *item, const void *key)
{
    const mem_id *m = item;
    const es__mem_agg_key *k = key;
    return es__mem_same_uuid(&m->id, k->id) &&
           es__mem_same_uuid(&m->agg, k->agg);
}
uint64_t es__mem_hash_pend_id(const void *item)
{
    return es__uuid_hash(&((const pend_event *)item)->ev.id);
}
bool es__mem_match_pend_id(const void *item, const void *key)
{
    const pend_event *pe = item;
    const es__mem_agg_key *k = key;
    return es__mem_same_uuid(&pe->ev.id, k->id) &&
           es__mem_same_uuid(&pe->agg, k->agg);
}

uint64_t es__mem_hash_uuid(const void *item) { return es__uuid_hash(item); }
bool es__mem_match_uuid(const void *item, const void *key)
{
    return es__mem_same_uuid(item, key);
}

uint64_t es__mem_version_hash(const es_uuid *agg, uint64_t version)
{
    return es__uuid_hash(agg) ^ (version * 0x9e3779b97f4a7c15u);
}

uint64_t es__mem_hash_pend_version(const void *item)
{
    const pend_event *pe = item;
    return es__mem_version_hash(&pe->agg, pe->ev.version);
}

bool es__mem_match_pend_version(const void *item, const void *key)
{
    const pend_event *pe = item;
    const es__mem_version_key *k = key;
    return pe->ev.version == k->version && es__mem_same_uuid(&pe->agg, k->agg);
}

/* ---- committed lookups (lock held) ---- */

mem_stream *es__mem_find_stream(mem_store *s, const es_uuid *agg)
{
    return es__ptrmap_find(&s->streams, es__uuid_hash(agg),
                           es__mem_match_stream, agg);
}

mem_id *es__mem_find_id(mem_store *s, const es_uuid *agg, const es_uuid *id)
{
    es__mem_agg_key key = {agg, id};
    return es__ptrmap_find(&s->ids, es__uuid_hash(id), es__mem_match_id, &key);
}

mem_snapset *es__mem_find_snapset(mem_store *s, const es_uuid *agg)
{
    return es__ptrmap_find(&s->snaps, es__uuid_hash(agg), es__mem_match_snapset,
                           agg);
}

bool es__mem_committed_se_exists(mem_store *s, const es_uuid *id)
{
    return es__ptrmap_find(&s->se_ids, es__uuid_hash(id), es__mem_match_se,
                           id) != NULL;
}

mem_cmd *es__mem_find_cmd(const es__ptrmap *map, const es_uuid *id)
{
    return es__ptrmap_find(map, es__uuid_hash(id), es__mem_match_cmd, id);
}

/* Lock held.  Room for extra more records in the commit-order log. */
int es__mem_cmd_log_reserve(mem_store *s, size_t extra)
{
    if (s->log_head + s->log_n + extra <= s->log_cap) return 0;
    if (s->log_head > 0) { /* purged ones left room at the front */
        memmove(s->cmd_log, s->cmd_log + s->log_head,
                s->log_n * sizeof *s->cmd_log);
        s->log_head = 0;
    }
    void *items = s->cmd_log;
    if (es__grow(&items, &s->log_cap, s->log_n + extra, sizeof *s->cmd_log))
        return ES_ENOMEM;
    s->cmd_log = items;
    return 0;
}

/* Lock held, room reserved: a record committed now. */
void es__mem_cmd_log_push(mem_store *s, mem_cmd *c, int64_t now)
{
    s->cmd_log[s->log_head + s->log_n++] = (struct es__mem_cmd_entry){c, now};
}

mem_se *es__mem_find_se(mem_store *s, const es_uuid *id)
{
    return es__ptrmap_find(&s->se_ids, es__uuid_hash(id), es__mem_match_se, id);
}

/* ---- pending lookups (transaction's thread) ---- */

pend_event *es__mem_pend_find_id(mem_txn *t, const es_uuid *agg,
                                 const es_uuid *id)
{
    es__mem_agg_key key = {agg, id};
    return es__ptrmap_find(&t->ev_ids, es__uuid_hash(id), es__mem_match_pend_id,
                           &key);
}

pend_event *es__mem_pend_find_version(mem_txn *t, const es_uuid *agg,
                                      uint64_t v)
{
    es__mem_version_key key = {agg, v};
    return es__ptrmap_find(&t->ev_versions, es__mem_version_hash(agg, v),
                           es__mem_match_pend_version, &key);
}

/* The type of an aggregate that only this transaction has written. */
const char *es__mem_pend_stream_type(const mem_txn *t, const es_uuid *agg)
{
    const pend_event *pe = es__ptrmap_find(&t->ev_aggs, es__uuid_hash(agg),
                                           es__mem_match_pend_agg, agg);
    return pe ? pe->type : NULL;
}

/* ES_EWRONGTYPE when type_name is given and the aggregate (stored, or
 * written by this transaction) is of another type.  Store lock held. */
int es__mem_check_type(const mem_txn *t, const mem_stream *st,
                       const es_uuid *agg, const char *type_name,
                       es_error *err)
{
    if (type_name == NULL) return 0;
    const char *owner = st ? st->type : es__mem_pend_stream_type(t, agg);
    if (owner == NULL || strcmp(owner, type_name) == 0) return 0;
    return es__wrong_type(err, agg, owner, type_name);
}
