/*
 * Measuring for the PostgreSQL benchmarks (bench_pg, bench_growth):
 * client-side latencies of commands, and the CPU used by this process and
 * by the PostgreSQL server (DATABASE_URL) between two readings.
 */
#ifndef BENCH_MEASURE_H
#define BENCH_MEASURE_H

/* Latencies: room for 4M samples (bench_lat_init once, before any
 * record); bench_lat_record(t0) records now - t0 (bench_now_s seconds)
 * from any thread; bench_lat_percentiles sorts what was recorded since
 * bench_lat_reset and gives p50 and p99 in microseconds. */
void bench_lat_init(void);
void bench_lat_reset(void);
void bench_lat_record(double t0);
void bench_lat_percentiles(double *p50, double *p99);

/* Find the server's postmaster (through its checkpointer), once. */
void bench_find_postmaster(void);

typedef struct cpu_sample {
    double t;    /* the middle of the reading, bench_now_s() */
    double span; /* how long the reading took */
    double host; /* CPU seconds of this process */
    double pg;   /* pg_cpu_s() */
} cpu_sample;

/* One reading of this process's and the server's CPU (see measure.c for
 * how a reading is kept short), and the CPU between two readings in % of
 * one core. */
cpu_sample bench_cpu_sample(void);
void bench_cpu_pct(const cpu_sample *a, const cpu_sample *b, double *host,
                   double *pg);

#endif
