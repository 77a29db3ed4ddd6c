/*
 * libFuzzer target: UUID text, the ids every request and stored row
 * carries.  A parse succeeds or fails cleanly; what parses formats back
 * to a string that parses to the same id.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "eventastic.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char text[128];
    if (size >= sizeof text) size = sizeof text - 1;
    memcpy(text, data, size);
    text[size] = '\0';
    es_uuid id, again;
    if (es_uuid_parse(text, &id) != 0) return 0;
    char out[ES_UUID_STRLEN + 1];
    es_uuid_format(&id, out);
    if (strlen(out) != ES_UUID_STRLEN) abort();
    if (es_uuid_parse(out, &again) != 0 || !es_uuid_equal(&id, &again))
        abort();
    return 0;
}
