/* The outbox dispatcher on the in-memory store: the tests of
 * suites/outbox.c (delivery, retries with backoff, dead letters,
 * requeue, poison messages, order per aggregate, several dispatchers,
 * expired claims, wake-up and polling). */
#include <stddef.h>

#include "eventastic.h"
#include "suites/outbox.h"

static int memory_open(es_store **out)
{
    return es_memory_store_open(out, NULL);
}

int main(void)
{
    return outbox_suite_run(memory_open, es_store_close);
}
