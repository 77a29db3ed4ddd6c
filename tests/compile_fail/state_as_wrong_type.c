// expect: initialization of .const order \*. from incompatible pointer type
/* Reading an account's state as an order's does not compile. */
#include "compile_fail/two_aggregates.h"

int use(const account_context *ctx);
int use(const account_context *ctx)
{
    const order *o = account_state(ctx);
    return o->status;
}
