/* The bench binaries' OUT.json (see report.h). */
#include "report.h"

#include <stdarg.h>

int bench_json_open(bench_json *j, const char *path)
{
    j->records = 0;
    j->f = fopen(path, "w");
    if (j->f == NULL) return -1;
    fprintf(j->f, "[\n");
    return 0;
}

void bench_json_begin(bench_json *j, const char *name, const char *store)
{
    fprintf(j->f, "%s  {\"name\": \"%s\", \"store\": \"%s\"",
            j->records > 0 ? ",\n" : "", name, store);
    j->records++;
}

void bench_json_field(bench_json *j, const char *key, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(j->f, ", \"%s\": ", key);
    vfprintf(j->f, fmt, ap);
    va_end(ap);
}

void bench_json_end(bench_json *j)
{
    fputc('}', j->f);
}

void bench_json_close(bench_json *j)
{
    fprintf(j->f, "%s]\n", j->records > 0 ? "\n" : "");
    fclose(j->f);
}
