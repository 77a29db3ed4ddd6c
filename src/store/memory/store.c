/*
 * The in-memory store (eventastic/memory.h): open, close, the retention
 * of command-id records, and the table of operations.  mem_int.h says
 * how the store is built and which file holds what.
 */
#include <pthread.h>

#include "core/internal.h"
#include "eventastic/memory.h"
#include "store/memory/mem_int.h"

static void free_stream(void *p)
{
    mem_stream *st = p;
    for (size_t i = 0; i < st->n; i++) es__free(st->ev[i].data);
    es__free(st->ev);
    es__free(st);
}

static void free_snapset(void *p)
{
    mem_snapset *set = p;
    for (size_t i = 0; i < set->n; i++) es__free(set->s[i].data);
    es__free(set->s);
    es__free(set);
}

static void mem_close(es_store *store)
{
    mem_store *s = (mem_store *)store;
    es__ptrmap_clear(&s->streams, free_stream);
    es__ptrmap_clear(&s->ids, es__free);
    es__ptrmap_clear(&s->snaps, free_snapset);
    es__ptrmap_clear(&s->se_ids, es__mem_se_free);
    es__ptrmap_clear(&s->cmds, es__free);
    es__free(s->cmd_log);
    es__free(s->se);
    es__free(s->order);
    es__free(s->ckpt);
    pthread_mutex_destroy(&s->lock);
    es__store_destroy(&s->base);
    es__free(s);
}

static int mem_purge_commands(es_store *store, int64_t before_ms,
                              size_t limit, size_t *count, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    while (n < limit && s->log_n > 0 &&
           s->cmd_log[s->log_head].at_ms < before_ms) {
        mem_cmd *c = s->cmd_log[s->log_head++].cmd;
        s->log_n--;
        es__ptrmap_remove(&s->cmds, c, es__mem_hash_cmd);
        es__free(c);
        n++;
    }
    if (s->log_n == 0) s->log_head = 0;
    pthread_mutex_unlock(&s->lock);
    if (count) *count = n;
    return 0;
}

static const es__txn_ops memory_txn = {
    .begin = es__mem_begin,
    .commit = es__mem_commit,
    .rollback = es__mem_rollback,
    .savepoint = es__mem_savepoint,
    .rollback_to = es__mem_rollback_to,
    .release = es__mem_release,
};

static const es__core_ops memory_core = {
    .stream = es__mem_stream,
    .get_event = es__mem_get_event,
    .insert_events = es__mem_insert_events,
    .insert_side_effects = es__mem_insert_side_effects,
    .get_snapshot = es__mem_get_snapshot,
    .store_snapshot = es__mem_store_snapshot,
    .delete_snapshots = es__mem_delete_snapshots,
    .list_side_effects = es__mem_list_side_effects,
};

static const es__command_ops memory_commands = {
    .insert = es__mem_insert_commands,
    .get = es__mem_get_command,
    .purge = mem_purge_commands,
};

/* One lane: the store's writes hold one lock (see es__batch_ops.lanes);
 * no asynchronous lanes, the host runs write on its commit loop. */
static const es__batch_ops memory_batch = {
    .lanes = 1,
    .write = es__mem_write_batch,
};

static const es__outbox_ops memory_outbox = {
    .claim = es__mem_outbox_claim,
    .finish = es__mem_outbox_finish,
    .list = es__mem_outbox_list,
    .get = es__mem_outbox_get,
    .requeue = es__mem_outbox_requeue,
    .purge = es__mem_outbox_purge,
    .stats = es__mem_outbox_stats,
};

static const es_store_ops memory_ops = {
    .name = "memory",
    .version = ES__STORE_OPS_VERSION,
    .txn = &memory_txn,
    .core = &memory_core,
    .commands = &memory_commands,
    .batch = &memory_batch,
    .outbox = &memory_outbox,
    .read = &es__mem_read_ops,
    .close = mem_close,
};

int es_memory_store_open(es_store **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    mem_store *s = es__calloc(1, sizeof *s);
    if (s == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    es__store_init(&s->base, &memory_ops);
    pthread_mutex_init(&s->lock, NULL);
    *out = &s->base;
    return 0;
}

size_t es_memory_store_event_count(es_store *store)
{
    if (store == NULL || store->ops != &memory_ops) return 0;
    mem_store *s = (mem_store *)store;
    pthread_mutex_lock(&s->lock);
    size_t n = s->event_count;
    pthread_mutex_unlock(&s->lock);
    return n;
}
