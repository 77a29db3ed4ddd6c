/* The control case: correct use of both facades compiles cleanly, so the
 * failures of the other sources come from the mistake each one makes. */
#include "compile_fail/two_aggregates.h"

int use(es_txn *txn, const account_event *ae, const order_event *oe);
int use(es_txn *txn, const account_event *ae, const order_event *oe)
{
    es_uuid id = {{1}};
    account_context *a = NULL;
    order_context *o = NULL;
    int rc = account_record_new(&id, ae, &a, NULL);
    if (rc == 0) rc = account_record(a, ae, NULL);
    if (rc == 0) rc = order_record_new(&id, oe, &o, NULL);
    if (rc == 0) rc = account_save(txn, a, NULL);
    if (rc == 0) rc = order_save(txn, o, NULL);
    const account *s = account_state(a);
    const order *t = order_state(o);
    long n = s->balance + t->status;
    switch (ae->kind) {
    case ACCOUNT_OPENED:
    case ACCOUNT_DEPOSITED:
        n++;
        break;
    }
    account_context_free(a);
    order_context_free(o);
    return rc + (int)(n & 0);
}
