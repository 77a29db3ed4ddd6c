/*
 * The host's configuration: es_host_config_* and the registered aggregate
 * types.  A builder is its caller's (setup only, one thread); es_host_open
 * copies it, so the host's copy is read-only for the host's life and any
 * thread reads it (es__host_find_type) without a lock.
 */
#include <string.h>

#include "host/host_int.h"

int es_host_config_new(es_host_config **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    es_host_config *c = es__calloc(1, sizeof *c);
    if (c == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    c->workers = 2;
    c->mailbox_bound = 1024;
    c->host_bound = 1000000;
    c->resident_bound = 100000;
    c->batch_rows = 1024;
    c->idle_ms = 60000;
    c->snap_every = 100;
    c->snap_on_passivation = true;
    c->snap_slow_load_us = 10000;
    *out = c;
    return 0;
}

void es_host_config_free(es_host_config *cfg) { es__free(cfg); }

int es_host_config_set_workers(es_host_config *cfg, unsigned n)
{
    if (cfg == NULL || n < 1 || n > 256) return ES_EINVAL;
    cfg->workers = n;
    return 0;
}

int es_host_config_set_mailbox_bound(es_host_config *cfg, size_t n)
{
    if (cfg == NULL || n < 1) return ES_EINVAL;
    cfg->mailbox_bound = n;
    return 0;
}

int es_host_config_set_host_bound(es_host_config *cfg, size_t n)
{
    if (cfg == NULL || n < 1) return ES_EINVAL;
    cfg->host_bound = n;
    return 0;
}

int es_host_config_set_resident_bound(es_host_config *cfg, size_t n)
{
    if (cfg == NULL || n < 1) return ES_EINVAL;
    cfg->resident_bound = n;
    return 0;
}

int es_host_config_set_resident_bytes(es_host_config *cfg, uint64_t bytes)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->resident_bytes = bytes;
    return 0;
}

int es_host_config_set_idle_ms(es_host_config *cfg, uint64_t ms)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->idle_ms = ms;
    return 0;
}

int es_host_config_set_command_retention(es_host_config *cfg, int64_t ms)
{
    if (cfg == NULL || ms < 0 || ms > INT64_MAX / 2) return ES_EINVAL;
    cfg->command_retention_ms = ms;
    return 0;
}

int es_host_config_set_snapshots(es_host_config *cfg, uint64_t every_events,
                                 bool on_passivation)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->snap_every = every_events;
    cfg->snap_on_passivation = on_passivation;
    return 0;
}

int es_host_config_set_snapshot_slow_load(es_host_config *cfg,
                                          uint64_t micros)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->snap_slow_load_us = micros;
    return 0;
}

int es_host_config_set_query_fresh(es_host_config *cfg, bool fresh)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->query_fresh = fresh;
    return 0;
}

int es_host_config_set_lanes(es_host_config *cfg, unsigned n)
{
    if (cfg == NULL || n > 64) return ES_EINVAL;
    cfg->lanes = n;
    return 0;
}

int es_host_config_set_batch_rows(es_host_config *cfg, size_t rows)
{
    if (cfg == NULL || rows < 1) return ES_EINVAL;
    cfg->batch_rows = rows;
    return 0;
}

int es_host_config_set_event_base(es_host_config *cfg,
                                  struct event_base *base)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->base = base;
    return 0;
}

int es_host_config_add_type(es_host_config *cfg,
                            const es_aggregate_type *type,
                            es_decide_fn decide, void *user, es_error *err)
{
    if (cfg == NULL || decide == NULL)
        return es__error_set(err, ES_EINVAL, "config and decide are "
                                             "required");
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    for (size_t i = 0; i < cfg->n_types; i++)
        if (cfg->types[i].type == type ||
            strcmp(cfg->types[i].type->name, type->name) == 0)
            return es__error_set(err, ES_EINVAL, "type '%s' is already "
                                 "registered", type->name);
    if (cfg->n_types == MAX_TYPES)
        return es__error_set(err, ES_EINVAL, "at most %d types",
                             MAX_TYPES);
    cfg->types[cfg->n_types++] = (htype){type, decide, user};
    return 0;
}

const htype *es__host_find_type(const es_host *host,
                                const es_aggregate_type *type)
{
    for (size_t i = 0; i < host->cfg.n_types; i++)
        if (host->cfg.types[i].type == type) return &host->cfg.types[i];
    return NULL;
}
