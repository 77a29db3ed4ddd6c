#!/usr/bin/env python3
"""ninja demo: the bank under load.

Starts a throwaway PostgreSQL under build/ (or uses DATABASE_URL), starts
bank-server on it (--migrate), runs bank-load against it for 30 s (a
progress line each second, then the summary and the invariant check),
then stops the server with SIGTERM (it drains and exits 0) and the
database.  Everything it started is stopped also on Ctrl-C or failure.
With --memory the server runs on the in-memory store instead.
run(db_url, args) is also tests/run.py's bank_check.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TOP = os.path.dirname(TESTS)
BIN = os.path.join(TOP, "build", "release", "bin")
sys.path.insert(0, TESTS)
from run import Cluster  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(port, proc, seconds=30):
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def run(db_url, args):
    port = free_port()
    cmd = [os.path.join(BIN, "bank-server"), "--listen",
           "127.0.0.1:%d" % port, "--workers", str(args.workers)]
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    if db_url:
        cmd += ["--db", db_url, "--migrate"]
    print("demo: %s" % " ".join(cmd))
    sys.stdout.flush()
    server = subprocess.Popen(cmd, env=env)
    try:
        if not wait_listening(port, server):
            print("demo: bank-server did not start")
            return 1
        load = [os.path.join(BIN, "bank-load"), "--url",
                "http://127.0.0.1:%d" % port, "--clients", str(args.clients),
                "--duration", str(args.seconds), "--accounts",
                str(args.accounts), "--retry-ratio", "0.1", "--seed",
                str(args.seed), "--json",
                os.path.join(TOP, "build", "demo.json")]
        sys.stdout.flush()
        rc = subprocess.call(load)
    finally:
        server.terminate()
        try:
            src = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            src = -9
    print("demo: bank-server exited with %d after SIGTERM" % src)
    return rc or (1 if src != 0 else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    args = ap.parse_args()
    try:
        if args.memory:
            sys.exit(run(None, args))
        with Cluster() as db:
            sys.exit(run(db.url, args))
    except KeyboardInterrupt:
        print("demo: interrupted; everything it started is stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
