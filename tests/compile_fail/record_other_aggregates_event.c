// expect: passing argument 2 of .account_record. from incompatible pointer type
/* Recording an order's event on an account does not compile. */
#include "compile_fail/two_aggregates.h"

int use(account_context *ctx, const order_event *oe);
int use(account_context *ctx, const order_event *oe)
{
    return account_record(ctx, oe, NULL);
}
