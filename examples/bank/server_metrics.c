/* bank-server: /metrics, in the Prometheus text format. */
#include <stdatomic.h>
#include <string.h>

#include "server.h"

static void metric(struct evbuffer *b, const char *name, const char *type,
                   const char *help, double v)
{
    evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name,
                        help, name, type, name, v);
}

static void latency(struct evbuffer *b, const char *stage,
                    const es_host_latency *l)
{
    evbuffer_add_printf(b,
                        "eventastic_host_latency_seconds{stage=\"%s\","
                        "quantile=\"0.5\"} %g\n"
                        "eventastic_host_latency_seconds{stage=\"%s\","
                        "quantile=\"0.99\"} %g\n"
                        "eventastic_host_latency_seconds{stage=\"%s\","
                        "quantile=\"0.999\"} %g\n"
                        "eventastic_host_latency_seconds_count{stage=\"%s\"}"
                        " %llu\n",
                        stage, l->p50_us / 1e6, stage, l->p99_us / 1e6, stage,
                        l->p999_us / 1e6, stage,
                        (unsigned long long)l->count);
}

void srv_run_metrics(job *j)
{
    server *srv = j->srv;
    struct evbuffer *b = j->body;
    es_host_metrics m;
    memset(&m, 0, sizeof m);
    if (es_host_metrics_get(srv->host, &m) == 0) {
#define C(f, help)                                                           \
    metric(b, "eventastic_host_" #f "_total", "counter", help, (double)m.f)
#define G(f, help) metric(b, "eventastic_host_" #f, "gauge", help, (double)m.f)
        C(accepted, "Commands accepted by es_host_send.");
        C(completed, "Command completions called.");
        C(rejected, "Commands rejected by decide or apply.");
        C(duplicate, "Commands answered from an earlier command id.");
        C(conflicts, "Command commits that conflicted.");
        C(busy, "Sends answered ES_EBUSY.");
        G(resident, "Aggregates in memory.");
        C(loads, "Aggregates loaded from the store.");
        C(passivations, "Aggregates passivated.");
        G(mailbox_depth, "Commands accepted, not yet decided.");
        C(batches, "Commit transactions.");
        C(snapshots, "Snapshots written.");
        C(queries, "Queries accepted by es_host_query.");
        C(batch_items, "Commands written in commit batches.");
        C(round_trips, "Database round trips of the commit batches.");
        G(lanes_busy, "Commit lanes writing a batch now.");
#undef C
#undef G
        evbuffer_add_printf(b, "# HELP eventastic_host_latency_seconds "
                               "Host latency by stage.\n"
                               "# TYPE eventastic_host_latency_seconds "
                               "summary\n");
        latency(b, "queue_wait", &m.queue_wait);
        latency(b, "load", &m.load);
        latency(b, "decide", &m.decide);
        latency(b, "commit_wait", &m.commit_wait);
        latency(b, "lane_wait", &m.lane_wait);
        latency(b, "batch_write", &m.batch_write);
        latency(b, "batch_commit", &m.batch_commit);
        latency(b, "hand_back", &m.hand_back);
        latency(b, "total", &m.total);
        latency(b, "query", &m.query);
    }
    es_outbox_metrics om;
    memset(&om, 0, sizeof om);
    es_outbox_metrics_get(srv->outbox, &om);
    metric(b, "eventastic_outbox_deliveries_total", "counter",
           "Outbox handler calls.", (double)om.deliveries);
    metric(b, "eventastic_outbox_done_total", "counter",
           "Outbox deliveries that succeeded.", (double)om.done);
    metric(b, "eventastic_outbox_retries_total", "counter",
           "Outbox deliveries to retry.", (double)om.retries);
    metric(b, "eventastic_outbox_dead_letters_total", "counter",
           "Messages this dispatcher made dead letters.",
           (double)om.dead_letters);
    metric(b, "eventastic_outbox_rounds_total", "counter",
           "Outbox claim rounds.", (double)om.rounds);
    es_outbox_stats st;
    memset(&st, 0, sizeof st);
    es_error err = {0};
    int up = es_outbox_stats_get(srv->store, 0, &st, &err) == 0;
    metric(b, "eventastic_store_up", "gauge",
           "1 when the store answered the outbox statistics.", up);
    if (up) {
        metric(b, "eventastic_outbox_pending", "gauge",
               "Outbox messages waiting.", (double)st.pending);
        metric(b, "eventastic_outbox_dead", "gauge", "Dead letters.",
               (double)st.dead);
        metric(b, "eventastic_outbox_done", "gauge",
               "Delivered messages not purged.", (double)st.done);
        metric(b, "eventastic_outbox_oldest_pending_seconds", "gauge",
               "Age of the oldest pending message.",
               (double)st.oldest_pending_age_ms / 1e3);
    }
    srv_views_metrics(srv->views, b);
    evbuffer_add_printf(b, "# HELP bank_http_responses_total HTTP answers "
                           "by status code.\n"
                           "# TYPE bank_http_responses_total counter\n");
    for (int i = 0; i < N_CODES; i++) {
        unsigned long long n = atomic_load(&srv->responses[i]);
        if (srv_counted_codes[i] != 0)
            evbuffer_add_printf(b, "bank_http_responses_total{code=\"%d\"} "
                                   "%llu\n", srv_counted_codes[i], n);
        else
            evbuffer_add_printf(b, "bank_http_responses_total{code="
                                   "\"other\"} %llu\n", n);
    }
    j->code = 200;
    j->content_type = "text/plain; version=0.0.4; charset=utf-8";
}

