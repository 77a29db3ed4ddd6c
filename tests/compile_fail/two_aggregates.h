/* Two aggregate types with typed facades, for the compile-fail tests.
 * Only declarations: these sources are compiled, never linked. */
#ifndef TWO_AGGREGATES_H
#define TWO_AGGREGATES_H

#include "eventastic.h"

typedef struct account { long balance; } account;
typedef enum account_kind { ACCOUNT_OPENED, ACCOUNT_DEPOSITED } account_kind;
typedef struct account_event { account_kind kind; es_uuid id; long amount; }
    account_event;
typedef struct account_notice { es_uuid id; } account_notice;
extern const es_aggregate_type account_type;
ES_AGGREGATE_DECLARE(account, account_type, account, account_event,
                     account_notice);

typedef struct order { int status; } order;
typedef enum order_kind { ORDER_CREATED, ORDER_SHIPPED } order_kind;
typedef struct order_event { order_kind kind; es_uuid id; } order_event;
typedef struct order_email { es_uuid id; } order_email;
extern const es_aggregate_type order_type;
ES_AGGREGATE_DECLARE(order, order_type, order, order_event, order_email);

#endif
