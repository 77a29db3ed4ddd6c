/*
 * The OUT.json every bench binary writes: a JSON array of flat records,
 * one a line, each starting with its name and store; tests/run.py --bench
 * merges the files.
 */
#ifndef BENCH_REPORT_H
#define BENCH_REPORT_H

#include <stddef.h>
#include <stdio.h>

typedef struct bench_json {
    FILE *f;
    size_t records; /* begun so far */
} bench_json;

/* Create path and start the array.  0, or -1 with errno set (nothing to
 * close). */
int bench_json_open(bench_json *j, const char *path);
/* Start a record: {"name": "<name>", "store": "<store>" */
void bench_json_begin(bench_json *j, const char *name, const char *store);
/* One more field: , "<key>": <the value, as fmt makes it> (a string
 * value brings its own quotes: "\"%s\""). */
void bench_json_field(bench_json *j, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* End the record begun last. */
void bench_json_end(bench_json *j);
/* End the array and close the file. */
void bench_json_close(bench_json *j);

#endif
