/*
 * Measuring for the PostgreSQL benchmarks (see measure.h): client-side
 * latencies, and the CPU of this process and of the PostgreSQL server.
 */
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bench.h"
#include "measure.h"

#define MAX_SAMPLES (1u << 22)
static uint32_t *g_lat; /* client-side latencies of one point, in us */
static atomic_uint g_n_lat;

void bench_lat_init(void)
{
    g_lat = calloc(MAX_SAMPLES, sizeof *g_lat);
    if (g_lat == NULL) abort();
}

void bench_lat_reset(void) { atomic_store(&g_n_lat, 0); }

void bench_lat_record(double t0)
{
    unsigned i = atomic_fetch_add_explicit(&g_n_lat, 1, memory_order_relaxed);
    if (i < MAX_SAMPLES) g_lat[i] = (uint32_t)((bench_now_s() - t0) * 1e6);
}

static int u32_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

void bench_lat_percentiles(double *p50, double *p99)
{
    unsigned n = atomic_load(&g_n_lat);
    if (n > MAX_SAMPLES) n = MAX_SAMPLES;
    *p50 = *p99 = 0;
    if (n == 0) return;
    qsort(g_lat, n, sizeof *g_lat, u32_cmp);
    *p50 = g_lat[n / 2];
    *p99 = g_lat[(size_t)n * 99 / 100];
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* CPU seconds of a process from /proc/PID/stat: utime + stime, plus, when
 * reaped is set, cutime + cstime (its children that exited and that it
 * waited for).  On success *ppid is its parent; false when it is gone. */
static bool proc_cpu(int pid, bool reaped, int *ppid, double *cpu)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return false;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return false;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (p == NULL) return false;
    unsigned long ut = 0, st = 0;
    long cut = 0, cst = 0;
    int pp = 0;
    /* fields after comm: state ppid pgrp session tty tpgid flags minflt
     * cminflt majflt cmajflt utime stime cutime cstime */
    if (sscanf(p + 2, "%*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu "
               "%ld %ld", &pp, &ut, &st, &cut, &cst) != 5)
        return false;
    *ppid = pp;
    double ticks = (double)(ut + st) + (reaped ? (double)(cut + cst) : 0);
    *cpu = ticks / (double)sysconf(_SC_CLK_TCK);
    return true;
}

static int g_postmaster;

/* The CPU seconds the PostgreSQL server has used since its start: the
 * postmaster's own, its live children's (backends, checkpointer,
 * walwriter, autovacuum and parallel workers...) and its reaped
 * children's (cutime + cstime).  The difference of two readings is then
 * the server's CPU between them and nothing else: a child alive at both
 * counts its part between them, one started between them all of its
 * life, one that exited between them the rest of its life (through
 * cutime once reaped; as a zombie it is still a live child); a pid
 * reused between them changes nothing.  The postmaster is read last, so
 * a child that exits after the listing and is reaped before the
 * postmaster is read still counts once; one reaped between its own read
 * and the postmaster's counts twice (one backend's CPU, in a reading that
 * lasts about a millisecond).  Returns 0 when the postmaster is unknown. */
static double pg_cpu_s(void)
{
    if (g_postmaster <= 0) return 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", g_postmaster,
             g_postmaster);
    double sum = 0;
    FILE *f = fopen(path, "r");
    if (f != NULL) {
        int pid, pp;
        double cpu;
        while (fscanf(f, "%d", &pid) == 1)
            if (proc_cpu(pid, false, &pp, &cpu) && pp == g_postmaster)
                sum += cpu;
        fclose(f);
    }
    int pp;
    double cpu;
    if (proc_cpu(g_postmaster, true, &pp, &cpu)) sum += cpu;
    return sum;
}

void bench_find_postmaster(void)
{
    /* the checkpointer's parent is the postmaster, and it lives as long */
    const char *url = getenv("DATABASE_URL");
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "psql -XAtq -d '%s' -c \"SELECT pid FROM "
             "pg_stat_activity WHERE backend_type = 'checkpointer'\" "
             "2>/dev/null", url ? url : "");
    FILE *p = popen(cmd, "r");
    if (p == NULL) return;
    int backend = 0;
    if (fscanf(p, "%d", &backend) != 1) backend = 0;
    pclose(p);
    int pp = 0;
    double cpu = 0;
    if (backend > 0 && proc_cpu(backend, false, &pp, &cpu)) g_postmaster = pp;
}

/* One reading of the CPU used so far by this process and by the server,
 * and when it was taken.  A reading of the server is a read of ~260
 * files, about a millisecond of CPU, but on a loaded machine the reader
 * is preempted in the middle: at 256 clients readings were seen to
 * spread over up to 2.4 s, and the processes read late were counted
 * over a longer time than the point's clock (which started after the
 * first reading and stopped before the second): how per_command_pg
 * came to report more than the machine's two cores.  So a reading is
 * repeated, for up to SAMPLE_BUDGET_S, until one takes at most
 * SAMPLE_SPAN_S, the shortest is kept, and rates are taken between the
 * middles of two readings. */
#define SAMPLE_SPAN_S 0.002
#define SAMPLE_BUDGET_S 1.0


cpu_sample bench_cpu_sample(void)
{
    cpu_sample best = {0, 1e9, 0, 0};
    double start = bench_now_s();
    while (best.span > SAMPLE_SPAN_S &&
           bench_now_s() - start < SAMPLE_BUDGET_S) {
        double t0 = bench_now_s();
        cpu_sample s = {0, 0, self_cpu_s(), pg_cpu_s()};
        double t1 = bench_now_s();
        s.t = (t0 + t1) / 2;
        s.span = t1 - t0;
        if (s.span < best.span) best = s;
    }
    return best;
}

/* The CPU of this process and of the server between two readings, in %
 * of one core.  Says so on stderr when the readings took long enough to
 * move the figures by more than 2%. */
void bench_cpu_pct(const cpu_sample *a, const cpu_sample *b, double *host,
                   double *pg)
{
    double dt = b->t - a->t;
    *host = dt > 0 ? 100 * (b->host - a->host) / dt : 0;
    *pg = dt > 0 ? 100 * (b->pg - a->pg) / dt : 0;
    if ((a->span + b->span) / 2 > 0.02 * dt)
        fprintf(stderr, "  (cpu readings took %.0f and %.0f ms of %.1f s: "
                "cpu figures uncertain by up to %.0f%%)\n", a->span * 1e3,
                b->span * 1e3, dt, 100 * (a->span + b->span) / 2 / dt);
}

