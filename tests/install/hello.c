/* Built outside the tree against the installed library through pkg-config
 * (tests/run.py --install-test). */
#include <eventastic.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
    es_store *store = NULL;
    es_uuid id;
    char text[ES_UUID_STRLEN + 1];
    if (es_memory_store_open(&store, NULL) != 0 || es_uuid_v7(&id) != 0)
        return 1;
    printf("eventastic %s (header %s), id %s\n", es_version(),
           ES_VERSION_STRING, es_uuid_format(&id, text));
    es_store_close(store);
    return strcmp(es_version(), ES_VERSION_STRING) == 0 ? 0 : 1;
}
