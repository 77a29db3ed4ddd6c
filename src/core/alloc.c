/* The allocator hook: every allocation of the library goes through here. */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

static void *(*malloc_fn)(size_t) = malloc;
static void *(*realloc_fn)(void *, size_t) = realloc;
static void (*free_fn)(void *) = free;

int es_set_allocator(void *(*m)(size_t), void *(*r)(void *, size_t),
                     void (*f)(void *))
{
    if (m == NULL || r == NULL || f == NULL) return ES_EINVAL;
    malloc_fn = m;
    realloc_fn = r;
    free_fn = f;
    return 0;
}

const char *es_version(void) { return ES_VERSION_STRING; }

void *es__malloc(size_t n) { return malloc_fn(n ? n : 1); }

void *es__calloc(size_t count, size_t size)
{
    if (size != 0 && count > SIZE_MAX / size) return NULL;
    size_t n = count * size;
    void *p = malloc_fn(n ? n : 1);
    if (p != NULL) memset(p, 0, n);
    return p;
}

void *es__realloc(void *p, size_t n) { return realloc_fn(p, n ? n : 1); }

void es__free(void *p)
{
    if (p != NULL) free_fn(p);
}

void es_free(void *p) { es__free(p); }

char *es__strdup(const char *s)
{
    return es__memdup(s, strlen(s) + 1);
}

void *es__memdup(const void *p, size_t n)
{
    void *q = es__malloc(n);
    if (q != NULL && n > 0) memcpy(q, p, n);
    return q;
}

int es__grow(void **items, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t ncap = *cap ? *cap : 8;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2 / elem) return ES_ENOMEM;
        ncap *= 2;
    }
    void *p = es__realloc(*items, ncap * elem);
    if (p == NULL) return ES_ENOMEM;
    *items = p;
    *cap = ncap;
    return 0;
}
