/*
 * The library's clocks: the wall clock in ms (es_clock_now_ms, for times
 * that are stored or shown) and the monotonic clock (es__mono_ns,
 * es__mono_ms, for durations, deadlines and metrics).  Every part of the
 * library reads time here.
 */
#include <time.h>

#include "core/internal.h"
#include "eventastic/outbox.h"

int64_t es_clock_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t es__mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t es__mono_ms(void)
{
    return (int64_t)(es__mono_ns() / 1000000u);
}
