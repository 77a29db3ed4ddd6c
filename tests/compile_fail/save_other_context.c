// expect: passing argument 2 of .account_save. from incompatible pointer type
/* Saving an order's context through the account facade does not compile. */
#include "compile_fail/two_aggregates.h"

int use(es_txn *txn, order_context *ctx);
int use(es_txn *txn, order_context *ctx)
{
    return account_save(txn, ctx, NULL);
}
