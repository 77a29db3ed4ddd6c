/*
 * The connection options every connection of the PostgreSQL store gets,
 * unless its connection string sets them.  Never installed.
 *
 * A connection whose server or network went away without a word (a
 * half-open TCP connection) would otherwise wait for the kernel's
 * keepalive, two hours by default: TCP keepalives after 30 s idle, every
 * 10 s, 3 unanswered probes drop it; data unacknowledged for 60 s
 * (tcp_user_timeout) drops it; a blocking connect gives up after 10 s
 * (connect_timeout).  They act on TCP connections only; a server that
 * stops answering on a live socket (a stopped process) is bounded by the
 * store's own silence limits (conn.c, lane_rt.c).
 */
#ifndef ES_PG_CONNINFO_H
#define ES_PG_CONNINFO_H

/* The keyword=value defaults, in the order they are added. */
#define ES__PG_CONNINFO_DEFAULTS                                             \
    X("keepalives", "1")                                                     \
    X("keepalives_idle", "30")                                               \
    X("keepalives_interval", "10")                                           \
    X("keepalives_count", "3")                                               \
    X("tcp_user_timeout", "60000")                                           \
    X("connect_timeout", "10")

/* conninfo (key=value pairs or a URI) as key=value pairs, with the
 * defaults above for the options it does not set.  *out is one
 * allocation (es__free).  Returns 0, ES_EINVAL (it could not be parsed)
 * or ES_ENOMEM; *out is untouched on failure. */
int es__pg_conninfo_with_defaults(const char *conninfo, char **out);

#endif
