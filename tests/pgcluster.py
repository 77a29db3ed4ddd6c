#!/usr/bin/env python3
"""A throwaway PostgreSQL cluster under build/ for tests and demos.

  pgcluster.py start DIR   create (if needed) and start; prints the conninfo
  pgcluster.py stop DIR    stop (fast, then immediate)
  pgcluster.py restart DIR [--down S]
                           immediate stop (a crash: no checkpoint, clients
                           cut off), S seconds down, then start again with
                           the options it ran with

The server listens on a unix socket inside DIR only (no TCP unless --tcp
PORT).  Run as root, the cluster belongs to the postgres user.
"""

import argparse
import glob
import os
import pwd
import shutil
import subprocess
import sys
import time


def bindir():
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    sys.exit("pgcluster: initdb not found (is postgresql installed?)")


def as_owner(cmd):
    """Run cmd as the postgres user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


def conninfo(d, port):
    return "host=%s port=%d user=postgres dbname=postgres" % (
        os.path.join(d, "sock"), port)


def start(d, port, tcp, max_connections=200):
    d = os.path.abspath(d)
    data = os.path.join(d, "data")
    sock = os.path.join(d, "sock")
    os.makedirs(sock, exist_ok=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (d, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    b = bindir()
    if not os.path.exists(os.path.join(data, "PG_VERSION")):
        if os.path.exists(data):
            shutil.rmtree(data)
        subprocess.check_call(as_owner(
            [os.path.join(b, "initdb"), "-D", data, "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]),
            stdout=subprocess.DEVNULL)
    opts = ("-k %s -p %d -c listen_addresses='%s' -c max_connections=%d" %
            (sock, port, "127.0.0.1" if tcp else "", max_connections))
    log = os.path.join(d, "server.log")
    if os.geteuid() == 0 and not os.path.exists(log):
        open(log, "a").close()
        pw = pwd.getpwnam("postgres")
        os.chown(log, pw.pw_uid, pw.pw_gid)
    # A server left running by an earlier, killed run is stopped first.
    subprocess.call(as_owner([os.path.join(b, "pg_ctl"), "-D", data, "-m",
                              "immediate", "stop"]),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for attempt in range(10):
        rc = subprocess.call(as_owner(
            [os.path.join(b, "pg_ctl"), "-D", data, "-l", log, "-o", opts,
             "-w", "-t", "60", "start"]), stdout=subprocess.DEVNULL)
        if rc == 0:
            break
        time.sleep(0.5 + attempt * 0.5)  # a stale lock file lingers briefly
    else:
        sys.stderr.write(open(log).read()[-4000:])
        sys.exit("pgcluster: server did not start")
    print(conninfo(d, port))


def stop(d):
    data = os.path.join(os.path.abspath(d), "data")
    if not os.path.exists(os.path.join(data, "postmaster.pid")):
        return
    b = bindir()
    rc = subprocess.call(as_owner([os.path.join(b, "pg_ctl"), "-D", data,
                                   "-m", "fast", "-w", "-t", "30", "stop"]),
                         stdout=subprocess.DEVNULL)
    if rc != 0:
        subprocess.call(as_owner([os.path.join(b, "pg_ctl"), "-D", data,
                                  "-m", "immediate", "stop"]),
                        stdout=subprocess.DEVNULL)


def restart(d, down):
    """Immediate stop, `down` seconds without a server, start again with
    the options of the last start (postmaster.opts: port, socket,
    max_connections)."""
    import shlex
    data = os.path.join(os.path.abspath(d), "data")
    with open(os.path.join(data, "postmaster.opts")) as f:
        argv = shlex.split(f.read())
    opts = []
    args = iter(argv[1:])
    for a in args:
        if a == "-D":
            next(args, None)  # pg_ctl passes the data directory itself
            continue
        opts.append(shlex.quote(a))
    b = bindir()
    subprocess.call(as_owner([os.path.join(b, "pg_ctl"), "-D", data, "-m",
                              "immediate", "-w", "stop"]),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(down)
    log = os.path.join(os.path.abspath(d), "server.log")
    for attempt in range(10):
        rc = subprocess.call(as_owner(
            [os.path.join(b, "pg_ctl"), "-D", data, "-l", log, "-o",
             " ".join(opts), "-w", "-t", "60", "start"]),
            stdout=subprocess.DEVNULL)
        if rc == 0:
            return
        time.sleep(0.5 + attempt * 0.5)
    sys.exit("pgcluster: server did not start again")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["start", "stop", "restart"])
    ap.add_argument("dir")
    ap.add_argument("--port", type=int, default=5432)
    ap.add_argument("--tcp", action="store_true")
    ap.add_argument("--max-connections", type=int, default=200)
    ap.add_argument("--down", type=float, default=0.0,
                    help="restart: seconds without a server")
    a = ap.parse_args()
    if a.action == "start":
        start(a.dir, a.port, a.tcp, a.max_connections)
    elif a.action == "restart":
        restart(a.dir, a.down)
    else:
        stop(a.dir)


if __name__ == "__main__":
    main()
