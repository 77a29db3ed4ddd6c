/* UUIDs: v7 generation, parsing and formatting. */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "core/internal.h"
#include "eventastic/uuid.h"

static pthread_mutex_t v7_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t v7_last_ms;
static uint16_t v7_last_seq; /* the 12-bit rand_a field, used as counter */

static int random_bytes(void *out, size_t n)
{
    uint8_t *p = out;
    while (n > 0) {
        ssize_t got = getrandom(p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return ES_EIO;
        }
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

int es_uuid_v7(es_uuid *out)
{
    if (out == NULL) return ES_EINVAL;
    uint8_t rnd[10];
    if (random_bytes(rnd, sizeof rnd) != 0) return ES_EIO;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;

    /* Strictly increasing within the process: in the same (or an earlier)
     * millisecond, count up in rand_a; on overflow borrow the next ms. */
    pthread_mutex_lock(&v7_lock);
    uint16_t seq;
    if (ms > v7_last_ms) {
        seq = (uint16_t)((rnd[0] | (rnd[1] << 8)) & 0x7ff); /* leave room */
    } else {
        ms = v7_last_ms;
        seq = (uint16_t)(v7_last_seq + 1);
        if (seq > 0xfff) {
            ms++;
            seq = 0;
        }
    }
    v7_last_ms = ms;
    v7_last_seq = seq;
    pthread_mutex_unlock(&v7_lock);

    uint8_t *b = out->bytes;
    for (int i = 0; i < 6; i++) b[i] = (uint8_t)(ms >> (40 - 8 * i));
    b[6] = (uint8_t)(0x70 | ((seq >> 8) & 0x0f));
    b[7] = (uint8_t)(seq & 0xff);
    b[8] = (uint8_t)(0x80 | (rnd[2] & 0x3f));
    memcpy(b + 9, rnd + 3, 7);
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int es_uuid_parse(const char *text, es_uuid *out)
{
    if (text == NULL || out == NULL) return ES_EINVAL;
    es_uuid id;
    size_t j = 0;
    for (size_t i = 0; i < ES_UUID_STRLEN;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-') return ES_EINVAL;
            i++;
            continue;
        }
        int hi = hexval(text[i]);
        if (hi < 0) return ES_EINVAL;
        int lo = hexval(text[i + 1]);
        if (lo < 0) return ES_EINVAL;
        id.bytes[j++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    if (text[ES_UUID_STRLEN] != '\0') return ES_EINVAL;
    *out = id;
    return 0;
}

char *es_uuid_format(const es_uuid *id, char out[ES_UUID_STRLEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    size_t k = 0;
    for (size_t i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[k++] = '-';
        out[k++] = hex[id->bytes[i] >> 4];
        out[k++] = hex[id->bytes[i] & 15];
    }
    out[k] = '\0';
    return out;
}

bool es_uuid_equal(const es_uuid *a, const es_uuid *b)
{
    return memcmp(a->bytes, b->bytes, 16) == 0;
}

/* Two big-endian 64-bit compares instead of a call to memcmp: the
 * in-memory store's indexes compare ids on every step of a lookup (perf:
 * memcmp was a quarter of the host benchmark's samples). */
int es_uuid_compare(const es_uuid *a, const es_uuid *b)
{
    uint64_t x, y;
    memcpy(&x, a->bytes, 8);
    memcpy(&y, b->bytes, 8);
    if (x == y) {
        memcpy(&x, a->bytes + 8, 8);
        memcpy(&y, b->bytes + 8, 8);
    }
    x = __builtin_bswap64(x);
    y = __builtin_bswap64(y);
    return (x > y) - (x < y);
}

bool es_uuid_is_nil(const es_uuid *id)
{
    static const es_uuid nil;
    return memcmp(id->bytes, nil.bytes, 16) == 0;
}
