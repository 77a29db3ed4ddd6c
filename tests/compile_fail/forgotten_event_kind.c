// expect: enumeration value .ACCOUNT_DEPOSITED. not handled in switch
/* An apply function that forgets an event kind does not compile
 * (-Wswitch-enum with -Werror), even with a default label. */
#include "compile_fail/two_aggregates.h"

int apply(account *s, const account_event *e);
int apply(account *s, const account_event *e)
{
    switch (e->kind) {
    case ACCOUNT_OPENED:
        s->balance = e->amount;
        return 0;
    default:
        return -1;
    }
}
