/**
 * @file eventastic.h
 * @brief Everything public, in one include.
 */
#ifndef EVENTASTIC_H
#define EVENTASTIC_H

#include "eventastic/aggregate.h"
#include "eventastic/common.h"
#include "eventastic/context.h"
#include "eventastic/host.h"
#include "eventastic/log.h"
#include "eventastic/memory.h"
#include "eventastic/outbox.h"
#include "eventastic/postgres.h"
#include "eventastic/status.h"
#include "eventastic/store.h"
#include "eventastic/subscription.h"
#include "eventastic/typed.h"
#include "eventastic/uuid.h"

#endif
