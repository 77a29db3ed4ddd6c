/**
 * @file log.h
 * @brief Where the library's log messages go.
 *
 * The library writes nothing to stdout or stderr except through this: by
 * default, messages at warning level and above go to stderr; an embedding
 * application sets its own callback.  Messages never hold secrets.
 */
#ifndef EVENTASTIC_LOG_H
#define EVENTASTIC_LOG_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Severity of a log message; lower is more severe. */
typedef enum es_log_level {
    ES_LOG_ERROR = 0, /**< something failed that the caller cannot see */
    ES_LOG_WARN = 1,  /**< something went wrong and was handled */
    ES_LOG_INFO = 2,  /**< rare events worth knowing (reconnects, start) */
    ES_LOG_DEBUG = 3  /**< details for developers */
} es_log_level;

/**
 * A log callback.  @p message is borrowed until the callback returns.
 * It may run on any of the library's threads, concurrently; it must not
 * call back into the library.
 */
typedef void (*es_log_fn)(void *ud, es_log_level level, const char *message);

/**
 * Send log messages at @p max_level and more severe to @p fn (NULL: to
 * stderr, the default).  Returns 0, or ES_EINVAL for a level out of range
 * (nothing changed).
 * Thread: setup only, before the library starts threads.
 */
ES_EXPORT ES_SETUP_ONLY int es_log_set(es_log_fn fn, void *ud,
                                       es_log_level max_level);

#ifdef __cplusplus
}
#endif
#endif
