/* es_buf: the growable byte buffer codecs append to. */
#include <string.h>

#include "core/internal.h"

int es_buf_append(es_buf *buf, const void *data, size_t n)
{
    if (buf == NULL || (data == NULL && n > 0)) return ES_EINVAL;
    if (n > SIZE_MAX - buf->len) return ES_ENOMEM;
    void *items = buf->data;
    if (es__grow(&items, &buf->cap, buf->len + n, 1) != 0) return ES_ENOMEM;
    buf->data = items;
    if (n > 0) memcpy(buf->data + buf->len, data, n);
    buf->len += n;
    return 0;
}

int es_buf_append_str(es_buf *buf, const char *s)
{
    if (s == NULL) return ES_EINVAL;
    return es_buf_append(buf, s, strlen(s));
}

void es_buf_free(es_buf *buf)
{
    if (buf == NULL) return;
    es__free(buf->data);
    memset(buf, 0, sizeof *buf);
}
