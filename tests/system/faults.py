#!/usr/bin/env python3
"""The bank under faults: a Jepsen-style bank test (issue 8).

Starts a throwaway PostgreSQL (build/pg-faults) and bank-server on it, runs
client threads of its own (deposits, withdrawals, transfers; a share re-sent
with the same ids) and meanwhile injects faults at seeded random times:

  kill9      kill -9 of bank-server, restart on the same database
  pgstop     PostgreSQL immediate stop, restart
  pgkill9    kill -9 of the postmaster, restart with a bounded retry
  cut        pg_terminate_backend of the server's connections
  pause      SIGSTOP of bank-server for longer than the client timeout
  second     a second bank-server on the same database, same accounts
  pgpause    SIGSTOP of the postmaster and all its backends (a database
             that hangs without closing connections), then SIGCONT
  netdrop    the TCP proxy between the servers and PostgreSQL drops every
             connection at once, mid-flight (reset or FIN, at random)
  nethang    the proxy stops forwarding without closing anything (a
             half-open network) for longer than the client timeout, then
             resumes or drops the connections

The bank-servers reach PostgreSQL only through that proxy (a small TCP
relay of this script's own, threads of the standard library); the checks
go to PostgreSQL directly.

Every request is recorded with its outcome: ok, failed (a definite answer
that nothing was done) or unknown (the connection died, a timeout, 5xx).
Afterwards, with every fault healed and the outbox drained, it checks by
API and SQL that every acknowledged command is stored exactly once, no
command is applied twice, versions are gap-free, money is conserved, no
balance is negative, every transfer settled, the outbox is empty, no dead
letter holds money and each snapshot's whole state equals the replay of
its stream.  It prints one report block and a JSON copy
(build/faults.json) and exits 1 if a loss or duplicate figure is not 0,
and also when a bank-server exited by itself or not with 0 on SIGTERM,
fewer commands than a floor were acknowledged, a fault did not take
effect or was not recovered from, an enabled kind of fault was never
injected (the load lasts until each was), or a query of the checks
failed.

  faults.py                 the long form (ninja check-faults)
  faults.py --short         the short form run by ninja check
  faults.py --seed N        replay a schedule
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TOP = os.path.dirname(TESTS)
BIN = os.path.join(TOP, "build", "release", "bin")
ALL_FAULTS = ["kill9", "pgstop", "pgkill9", "cut", "pause", "second",
              "pgpause", "netdrop", "nethang"]
# The faults the short form in ninja check uses: those that pass today.
SHORT_FAULTS = ALL_FAULTS
INITIAL = 100000
CLIENT_TIMEOUT = 4.0
# A run in which (nearly) every request got a definite 503 or 4xx loses
# nothing: at least this many commands, and this share of them, must be
# acknowledged (a quiet machine acknowledges over 90%, 150 a second).
ACKED_FLOOR = 500
ACKED_SHARE = 0.5
# How much longer than asked the load may last so that every kind of fault
# is injected once.
EXTRA_SECONDS = 180


def log(msg):
    sys.stdout.write("faults: %s\n" % msg)
    sys.stdout.flush()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def derive_id(base, label):
    """bank_derive_id: BLAKE2b-128 of the id's bytes and the label, marked
    as a version 8 UUID."""
    b = bytearray(hashlib.blake2b(base.bytes + label.encode(),
                                  digest_size=16).digest())
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(b))


def proc_state(pid):
    """The state letter of a process (R, S, T, Z, ...), None when gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def wait_state(pid, state, seconds=2.0):
    """True once the process is in `state` (T: stopped by a signal)."""
    end = time.time() + seconds
    while time.time() < end:
        now = proc_state(pid)
        if now == state:
            return True
        if now in (None, "Z"):
            return False
        time.sleep(0.01)
    return False


def wait_gone(pid, seconds=10.0):
    """True once the process has exited (gone, or a zombie)."""
    end = time.time() + seconds
    while time.time() < end:
        if proc_state(pid) in (None, "Z"):
            return True
        time.sleep(0.02)
    return False


# ---- the database ----

class Postgres:
    def __init__(self, cluster_dir):
        self.dir = cluster_dir
        self.port = free_port()
        self.url = None
        self.data = os.path.join(cluster_dir, "data")

    def start(self, tries=20):
        for attempt in range(tries):
            proc = subprocess.run(
                [sys.executable, os.path.join(TESTS, "pgcluster.py"), "start",
                 self.dir, "--port", str(self.port)],
                capture_output=True, text=True)
            if proc.returncode == 0:
                self.url = proc.stdout.strip().splitlines()[-1]
                return True
            time.sleep(0.5 + 0.25 * attempt)
        log("PostgreSQL did not start: %s" % proc.stderr[-2000:])
        return False

    def stop(self):
        subprocess.call([sys.executable, os.path.join(TESTS, "pgcluster.py"),
                         "stop", self.dir], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)

    def pg_ctl(self, *args):
        b = sorted(d for d in os.listdir("/usr/lib/postgresql"))[-1]
        cmd = [os.path.join("/usr/lib/postgresql", b, "bin", "pg_ctl"),
               "-D", self.data] + list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.call(cmd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def processes(self):
        """The postmaster and its children."""
        pm = self.postmaster_pid()
        if pm is None:
            return []
        pids = [pm]
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open("/proc/%s/stat" % d) as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pm:
                            pids.append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        return pids

    def psql(self, sql, timeout=30):
        """Rows of a query as lists of strings, or None when it failed."""
        try:
            proc = subprocess.run(
                ["psql", self.url, "-X", "-q", "-A", "-t", "-F", "\t",
                 "-v", "ON_ERROR_STOP=1", "-c", sql],
                capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        return [l.split("\t") for l in proc.stdout.splitlines() if l]


# ---- the network between the servers and the database ----

class Proxy:
    """A TCP relay from 127.0.0.1:port to PostgreSQL's Unix socket, two
    threads per connection.  drop() closes every connection at once;
    hang() stops forwarding (nothing is closed, new connections are
    accepted and held) until resume()."""

    def __init__(self, pg):
        self.pg = pg
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs = set()
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.accepted = 0
        self.dropped = 0
        self.held = 0  # connections and sends that met a hung network
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def url(self):
        return "host=127.0.0.1 port=%d user=postgres dbname=postgres" % \
            self.port

    def upstream(self):
        return os.path.join(self.pg.dir, "sock", ".s.PGSQL.%d" % self.pg.port)

    def accept_loop(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self.open_pair, args=(c,),
                             daemon=True).start()

    def open_pair(self, c):
        self.wait_flowing()  # a hung network does not connect either
        u = socket.socket(socket.AF_UNIX)
        try:
            u.connect(self.upstream())
        except OSError:
            c.close()
            u.close()
            return
        pair = (c, u)
        with self.lock:
            if self.closed:
                c.close()
                u.close()
                return
            self.pairs.add(pair)
            self.accepted += 1
        for a, b in ((c, u), (u, c)):
            threading.Thread(target=self.pump, args=(a, b, pair),
                             daemon=True).start()

    def pump(self, src, dst, pair):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.wait_flowing()
                dst.sendall(data)
        except OSError:
            pass
        self.close_pair(pair)

    def close_pair(self, pair, reset=False):
        with self.lock:
            if pair not in self.pairs:
                return
            self.pairs.discard(pair)
        c, u = pair
        if reset:
            # RST instead of FIN: the server sees ECONNRESET.
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                         struct.pack("ii", 1, 0))
        for s_ in (c, u):
            try:
                s_.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s_.close()

    def drop(self, reset):
        with self.lock:
            pairs = list(self.pairs)
        for pair in pairs:
            self.close_pair(pair, reset)
        self.dropped += len(pairs)
        return len(pairs)

    def wait_flowing(self):
        if not self.flowing.is_set():
            with self.lock:
                self.held += 1
            self.flowing.wait()

    def hang(self):
        self.flowing.clear()

    def resume(self):
        self.flowing.set()

    def close(self):
        self.closed = True
        self.flowing.set()
        self.lsock.close()
        self.drop(False)


# ---- the servers ----

class Server:
    def __init__(self, name, pg, db_url=None, workers=2):
        self.name = name
        self.pg = pg
        # faults.py goes through its proxy; badinput.py and security.py
        # straight to the database (pg.url, set before the server is made).
        self.db_url = db_url if db_url is not None else pg.url
        self.port = free_port()
        self.proc = None
        self.workers = workers
        self.logf = open(os.path.join(TOP, "build", "faults-%s.log" % name),
                         "a")
        self.paused = False
        self.busy = False  # a fault is being done to it: hands off

    def start(self, migrate=False, tries=30):
        for attempt in range(tries):
            cmd = [os.path.join(BIN, "bank-server"), "--listen",
                   "127.0.0.1:%d" % self.port, "--db", self.db_url,
                   "--workers", str(self.workers)]
            if migrate:
                cmd.append("--migrate")
            env = dict(os.environ)
            env.pop("DATABASE_URL", None)
            self.proc = subprocess.Popen(cmd, env=env, stdout=self.logf,
                                         stderr=self.logf)
            end = time.time() + 15
            while time.time() < end:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port),
                                             0.2).close()
                    return True
                except OSError:
                    time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            time.sleep(0.3 + 0.2 * attempt)
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def term(self, timeout=60):
        if not self.alive():
            return None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


# ---- the clients ----

class Op:
    """One logical command; attempts share its ids."""
    __slots__ = ("kind", "id", "account", "to", "amount", "outcomes",
                 "statuses")

    def __init__(self, kind, id_, account, to, amount):
        self.kind = kind
        self.id = id_
        self.account = account
        self.to = to
        self.amount = amount
        self.outcomes = []
        self.statuses = []

    def request(self):
        if self.kind == "transfer":
            return "/transfers", {"transfer_id": str(self.id),
                                  "from": str(self.account),
                                  "to": str(self.to), "amount": self.amount}
        sub = "deposits" if self.kind == "deposit" else "withdrawals"
        return "/accounts/%s/%s" % (self.account, sub), {
            "command_id": str(self.id), "amount": self.amount}

    def outcome(self):
        if "ok" in self.outcomes:
            return "ok"
        if "unknown" in self.outcomes:
            return "unknown"
        return "failed"

    def command_id(self):
        """The command id the host records for this op."""
        if self.kind == "transfer":
            return derive_id(self.id, "debit")
        return self.id


DEFINITE_503 = ("EBUSY", "ECLOSED", "ECONFLICT")


def detail_of(body):
    try:
        return json.loads(body).get("detail", "")
    except (ValueError, AttributeError):
        return ""


def classify(status, body):
    if status == 0:
        return "failed"
    if status in (200, 201, 202):
        return "ok"
    if status in (400, 404, 409, 413, 422):
        return "failed"
    if status == 503:
        try:
            detail = json.loads(body).get("detail", "")
        except ValueError:
            detail = ""
        if any(d in detail for d in DEFINITE_503):
            return "failed"
    return "unknown"


class Client(threading.Thread):
    def __init__(self, n, run):
        super().__init__(daemon=True)
        self.n = n
        self.run_ = run
        self.rng = random.Random(run.seed * 1000 + n)
        self.conns = {}
        self.ops = []

    def call(self, method, path, body):
        port = self.run_.pick_port(self.rng)
        c = self.conns.get(port)
        if c is None:
            c = http.client.HTTPConnection("127.0.0.1", port,
                                           timeout=CLIENT_TIMEOUT)
            self.conns[port] = c
        try:
            data = json.dumps(body) if body is not None else None
            c.request(method, path, body=data,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            text = r.read().decode("utf-8", "replace")
            if r.getheader("Connection", "").lower() == "close":
                c.close()
                del self.conns[port]
            return r.status, text
        except ConnectionRefusedError:
            # Never sent: a definite failure.
            c.close()
            del self.conns[port]
            time.sleep(0.05)
            return 0, ""
        except (OSError, http.client.HTTPException):
            c.close()
            del self.conns[port]
            return None, ""

    def attempt(self, op):
        path, body = op.request()
        status, text = self.call("POST", path, body)
        out = "unknown" if status is None else classify(status, text)
        if status == 503:
            status = "503 %s" % detail_of(text)
        op.outcomes.append(out)
        op.statuses.append(status)
        self.run_.count(out, status)

    def run(self):
        accts = self.run_.accounts
        while not self.run_.stop_load.is_set():
            if self.ops and self.rng.random() < self.run_.resend:
                self.attempt(self.rng.choice(self.ops[-50:]))
                continue
            r = self.rng.random()
            a = self.rng.choice(accts)
            amount = self.rng.randint(1, 2000)
            if r < 0.3:
                op = Op("deposit", uuid.uuid4(), a, None, amount)
            elif r < 0.55:
                op = Op("withdraw", uuid.uuid4(), a, None, amount)
            else:
                b = self.rng.choice(accts)
                while b == a:
                    b = self.rng.choice(accts)
                op = Op("transfer", uuid.uuid4(), a, b, amount)
            self.ops.append(op)
            self.attempt(op)


# ---- the bank's states and events, as bank.c encodes them ----

class Reader:
    """bank.c's codec: little-endian int64, 16-byte ids, strings with a
    one-byte length.  A short read raises ValueError."""

    def __init__(self, data):
        self.data = data
        self.o = 0

    def take(self, n):
        if self.o + n > len(self.data):
            raise ValueError("%d bytes short" % (self.o + n - len(self.data)))
        out = self.data[self.o:self.o + n]
        self.o += n
        return out

    def u8(self):
        return self.take(1)[0]

    def i64(self):
        return struct.unpack("<q", self.take(8))[0]

    def id(self):
        return uuid.UUID(bytes=self.take(16))

    def text(self):
        return self.take(self.u8())

    def end(self):
        if self.o != len(self.data):
            raise ValueError("%d bytes left over" % (len(self.data) - self.o))


def decode_state(typ, payload):
    """A snapshot's state, as a tuple comparable with replay_state()."""
    r = Reader(payload)
    if typ == "bank_account":
        out = (typ, r.text(), r.text(), r.i64())
    elif typ == "bank_transfer":
        out = (typ, r.id(), r.id(), r.i64(), r.u8())
    else:
        raise ValueError("unknown aggregate type %s" % typ)
    r.end()
    return out


def replay_state(evs):
    """The state after the events (aggregate type, version, kind, payload),
    as decode_state gives it: every field, not only the balance."""
    state = None
    for typ, _, kind, payload in evs:
        r = Reader(payload)
        r.id()  # the event id
        if typ == "bank_account":
            amount, _after = r.i64(), r.i64()
            if kind == 1:
                owner, email = r.text(), r.text()
                state = (typ, owner, email, amount)
                r.end()
                continue
            if state is None or kind not in (2, 3, 4, 5, 6):
                raise ValueError("account event kind %d at %s" % (
                    kind, "the start" if state is None else "a later"))
            if kind in (4, 5, 6):
                r.id()  # the transfer
                r.id()  # the other account
            sign = 1 if kind in (2, 5, 6) else -1
            state = state[:3] + (state[3] + sign * amount,)
        elif typ == "bank_transfer":
            frm, to, amount = r.id(), r.id(), r.i64()
            if kind == 1 and state is None:
                state = (typ, frm, to, amount, 0)
            elif kind in (2, 3) and state is not None:
                state = state[:4] + (kind - 1,)
            else:
                raise ValueError("transfer event kind %d" % kind)
        else:
            raise ValueError("unknown aggregate type %s" % typ)
        r.end()
    return state


# The outbox messages that are not a step of the transfer saga: only the
# welcome e-mail of a new account.  Every other message moves money.
NOT_MONEY = {("bank_account", 1)}


# ---- the run ----

class Run:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.resend = 0.1
        self.pg = Postgres(os.path.join(TOP, "build", args.cluster))
        self.proxy = None
        self.a = None
        self.b = None
        self.accounts = []
        self.stop_load = threading.Event()
        self.stop_faults = threading.Event()
        self.injected = set()
        self.lock = threading.Lock()
        self.lock_servers = threading.Lock()
        self.counts = {}
        self.http = {}
        self.faults = []      # a dict per fault: kind, effect, recovered
        self.notes = []
        self.server_exits = 0
        self.term_failures = []   # a server that did not exit 0 on SIGTERM
        self.query_failures = []  # a check's query that failed

    def count(self, out, status):
        with self.lock:
            self.counts[out] = self.counts.get(out, 0) + 1
            self.http[str(status)] = self.http.get(str(status), 0) + 1

    def pick_port(self, rng):
        b = self.b
        if b is not None and b.alive() and rng.random() < 0.5:
            return b.port
        return self.a.port

    # -- helpers --

    def api(self, method, path, body=None, port=None, timeout=10,
            keep=False):
        """One request; keep=True reuses one connection (the checks)."""
        c = getattr(self, "_kept", None) if keep else None
        if c is None or c.port != (port or self.a.port):
            c = http.client.HTTPConnection("127.0.0.1", port or self.a.port,
                                           timeout=timeout)
        try:
            c.request(method, path, body=json.dumps(body) if body else None,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            out = r.status, r.read().decode("utf-8", "replace")
            if keep:
                self._kept = c
                return out
        except (OSError, http.client.HTTPException):
            out = None, ""
            self._kept = None
        c.close()
        return out

    def wait_healthy(self, seconds=60):
        """Until a read of an account answers 200 on every running server."""
        end = time.time() + seconds
        probe = "/accounts/%s" % self.accounts[0] if self.accounts \
            else "/healthz"
        while time.time() < end:
            self.ensure_servers()
            servers = [s for s in (self.a, self.b) if s and s.alive()]
            if servers and all(self.api("GET", probe, port=s.port,
                                        timeout=3)[0] == 200
                               for s in servers):
                return True
            time.sleep(0.2)
        return False

    def ensure_servers(self):
        """A server that exited by itself (not killed by us) is a finding:
        count it and restart it."""
        with self.lock_servers:
            self._ensure_servers()

    def _ensure_servers(self):
        for s in (self.a, self.b):
            if s is not None and not s.alive() and not s.busy:
                self.server_exits += 1
                self.notes.append("%s exited by itself (rc %s) at %.1fs" % (
                    s.name, s.proc.returncode if s.proc else None,
                    time.time() - self.t0))
                s.start()

    def open_accounts(self, n):
        for i in range(n):
            cid = uuid.uuid4()
            aid = uuid.uuid4()
            body = {"command_id": str(cid), "account_id": str(aid),
                    "owner": "owner %d" % i, "email": "o%d@example.com" % i,
                    "initial_balance": INITIAL}
            for _ in range(50):
                st, _ = self.api("POST", "/accounts", body)
                if st == 201:
                    break
                time.sleep(0.2)
            else:
                raise SystemExit("faults: cannot open accounts")
            self.accounts.append(aid)

    # -- faults --

    def fault(self, name):
        """Injects one fault and records it with its effect: a fault that
        did not take effect (nothing killed, stopped, cut or dropped, a
        second server that did not start) is not survived, it failed."""
        t = time.time() - self.t0
        log("%6.1fs fault %s" % (t, name))
        self.injected.add(name)
        hold = self.rng.uniform(0.5, 2.0)
        effect, detail = False, ""
        if name == "kill9":
            a = self.a
            pid = a.proc.pid if a.alive() else None
            a.busy = True
            a.kill9()
            killed = pid is not None and a.proc.returncode == -signal.SIGKILL
            time.sleep(hold)
            started = a.start()
            a.busy = False
            effect = killed and started
            detail = "bank-server pid %s killed: %s, restarted: %s" % (
                pid, killed, started)
        elif name == "pgstop":
            pid = self.pg.postmaster_pid()
            rc = self.pg.pg_ctl("-m", "immediate", "stop")
            gone = pid is not None and wait_gone(pid)
            time.sleep(hold)
            started = self.pg.start()
            new = self.pg.postmaster_pid()
            effect = rc == 0 and gone and started and new not in (None, pid)
            detail = "postmaster %s stopped (pg_ctl rc %d, gone: %s), " \
                "started again: %s as %s" % (pid, rc, gone, started, new)
        elif name == "pgkill9":
            pid = self.pg.postmaster_pid()
            killed = False
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed = wait_gone(pid)
                except ProcessLookupError:
                    pass
            time.sleep(hold)
            started = self.pg.start()
            new = self.pg.postmaster_pid()
            effect = killed and started and new not in (None, pid)
            detail = "postmaster %s killed: %s, started again: %s as %s" % (
                pid, killed, started, new)
        elif name == "cut":
            rows = self.pg.psql("SELECT pg_terminate_backend(pid) FROM "
                                "pg_stat_activity WHERE backend_type = "
                                "'client backend' AND pid <> "
                                "pg_backend_pid()")
            cut = sum(1 for r in rows if r == ["t"]) if rows else 0
            effect = cut > 0
            detail = "%s connections terminated" % (
                cut if rows is not None else "query failed, no")
        elif name == "pause":
            s = self.a
            pid = s.proc.pid if s.alive() else None
            s.busy = s.paused = True
            s.proc.send_signal(signal.SIGSTOP)
            stopped = pid is not None and wait_state(pid, "T")
            time.sleep(CLIENT_TIMEOUT + self.rng.uniform(0.5, 2.0))
            s.proc.send_signal(signal.SIGCONT)
            s.busy = s.paused = False
            effect = stopped
            detail = "bank-server pid %s stopped: %s" % (pid, stopped)
        elif name == "pgpause":
            pids = self.pg.processes()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped = [p for p in pids if wait_state(p, "T")]
            time.sleep(CLIENT_TIMEOUT + self.rng.uniform(0.5, 2.0))
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            # The postmaster and at least one backend or helper.
            effect = bool(pids) and pids[0] in stopped and len(stopped) > 1
            detail = "%d of %d PostgreSQL processes stopped" % (
                len(stopped), len(pids))
        elif name == "netdrop":
            n = self.proxy.drop(reset=self.rng.random() < 0.5)
            log("       %d connections dropped" % n)
            effect = n > 0
            detail = "%d connections dropped" % n
        elif name == "nethang":
            held = self.proxy.held
            self.proxy.hang()
            time.sleep(CLIENT_TIMEOUT + self.rng.uniform(0.5, 2.0))
            held = self.proxy.held - held
            if self.rng.random() < 0.5:
                n = self.proxy.drop(reset=self.rng.random() < 0.5)
                log("       %d connections dropped after the hang" % n)
            self.proxy.resume()
            effect = held > 0
            detail = "%d connections or sends held by the hang" % held
        elif name == "second":
            if self.b is not None and self.b.alive():
                # The second one goes away, the hard way or gently.
                b, self.b = self.b, None
                if self.rng.random() < 0.5:
                    b.kill9()
                    effect = b.proc.returncode == -signal.SIGKILL
                    detail = "second bank-server killed: %s" % effect
                else:
                    rc = b.term()
                    if rc != 0:
                        self.term_failures.append(
                            "b exited %s on SIGTERM at %.1fs" % (rc, t))
                    effect = rc == 0
                    detail = "second bank-server stopped, rc %s" % rc
            else:
                b = Server("b", self.pg, self.proxy.url())
                b.busy = True
                if b.start():
                    self.b = b
                    effect = True
                b.busy = False
                detail = "second bank-server started: %s" % effect
        ok = self.wait_healthy(60)
        dt = time.time() - self.t0 - t
        self.faults.append({"kind": name, "t": round(t, 1),
                            "recovered": ok, "effect": effect,
                            "detail": detail, "recovery_s": round(dt, 1)})
        if not effect:
            log("       no effect: %s" % detail)
        if not ok:
            log("       not recovered after %s" % name)

    def nemesis(self, kinds, interval):
        # Each kind once, in a seeded order, before any repeats: the run
        # lasts until every kind has been injected (see run).
        bag = []
        while not self.stop_faults.is_set():
            if self.stop_faults.wait(self.rng.uniform(*interval)):
                break
            if not bag:
                bag = list(kinds)
                self.rng.shuffle(bag)
            self.fault(bag.pop())

    # -- the run --

    def run(self):
        a = self.args
        kinds = a.faults.split(",") if a.faults else (
            SHORT_FAULTS if a.short else ALL_FAULTS)
        seconds = a.seconds or (40 if a.short else 240)
        log("seed %d, %ds of load at least (until every kind of fault was "
            "injected), %d clients, faults %s" % (
                self.seed, seconds, a.clients, ",".join(kinds)))
        subprocess.call([sys.executable, os.path.join(TESTS, "pgcluster.py"),
                         "stop", self.pg.dir], stdout=subprocess.DEVNULL)
        import shutil
        shutil.rmtree(self.pg.dir, ignore_errors=True)
        for n in ("a", "b"):
            try:
                os.unlink(os.path.join(TOP, "build", "faults-%s.log" % n))
            except OSError:
                pass
        self.t0 = time.time()
        if not self.pg.start():
            return 2
        self.proxy = Proxy(self.pg)
        try:
            self.a = Server("a", self.pg, self.proxy.url(), a.workers)
            if not self.a.start(migrate=True):
                log("bank-server did not start")
                return 2
            self.open_accounts(a.accounts)
            opened = INITIAL * len(self.accounts)
            self.t0 = time.time()
            clients = [Client(i, self) for i in range(a.clients)]
            for c in clients:
                c.start()
            nem = threading.Thread(target=self.nemesis, daemon=True,
                                   args=(kinds, (a.min_gap, a.max_gap)))
            nem.start()
            # The load lasts `seconds`, and longer until every kind of
            # fault was injected once (a short run needs about twice its
            # 40 s for the nine kinds), up to a limit.
            deadline = self.t0 + seconds
            limit = deadline + EXTRA_SECONDS
            while time.time() < deadline or (
                    not self.injected >= set(kinds) and time.time() < limit):
                time.sleep(0.5)
                self.ensure_servers()
            # The faults stop first, so that the last one meets the load
            # too; then the load.
            self.stop_faults.set()
            nem.join()
            self.stop_load.set()
            for c in clients:
                c.join(CLIENT_TIMEOUT * 3)
            load_s = time.time() - self.t0
            # Heal: the second server goes, PostgreSQL and the first one
            # run, the outbox drains.
            if self.b is not None:
                b, self.b = self.b, None
                rc = b.term()
                if rc != 0:
                    self.term_failures.append("b exited %s on SIGTERM after "
                                              "the load" % rc)
            healthy = self.wait_healthy(60)
            ops = [op for c in clients for op in c.ops]
            r, acked_missing, failed_applied, answered_503 = self.check(
                ops, opened, load_s, kinds)
            r["healthy_after_load"] = healthy
            # The server must drain and exit 0 on SIGTERM.
            a_, self.a = self.a, None
            rc = a_.term()
            if rc != 0:
                self.term_failures.append(
                    "a %s on SIGTERM at the end" % (
                        "was not running" if rc is None else
                        "exited %s" % rc))
            r["term_failures"] = self.term_failures
            r["server_exits"] = self.server_exits
            r["notes"] = self.notes[:20]
            r["failures"] = self.verdict(r, kinds)
            self.report(r, acked_missing, failed_applied)
            for i, st in answered_503[:5]:
                print("answered 503 but applied: %s %s" % (i, st))
            return 1 if r["failures"] else 0
        finally:
            for s in (self.a, self.b):
                if s is not None:
                    rc = s.term()
                    if rc not in (0, None):
                        log("%s exited %s on SIGTERM at the end" % (s.name,
                                                                    rc))
            self.proxy.close()
            self.pg.stop()

    def verdict(self, r, kinds):
        """Why the run failed, [] when it passed: data lost, a server that
        exited by itself or not with 0 on SIGTERM, too few acknowledged
        commands, a fault without effect or not recovered from, a kind of
        fault never injected, a check's query that failed."""
        why = []
        if r["data_lost"]:
            why.append("DATA LOST %d" % r["data_lost"])
        if r["server_exits"]:
            why.append("%d bank-server exits not caused by the test" %
                       r["server_exits"])
        if r["term_failures"]:
            why.append("SIGTERM: %s" % "; ".join(r["term_failures"]))
        floor = max(ACKED_FLOOR, int(ACKED_SHARE * r["commands"]))
        if r["ok"] < floor:
            why.append("%d commands acknowledged, fewer than %d (the "
                       "larger of %d and %d%% of %d)" % (
                           r["ok"], floor, ACKED_FLOOR, ACKED_SHARE * 100,
                           r["commands"]))
        for f in self.faults:
            if not f["effect"]:
                why.append("fault %s at %.1fs had no effect: %s" % (
                    f["kind"], f["t"], f["detail"]))
            if not f["recovered"]:
                why.append("not recovered from %s at %.1fs" % (f["kind"],
                                                               f["t"]))
        missing = [k for k in kinds if k not in self.injected]
        if missing:
            why.append("faults never injected: %s" % ", ".join(missing))
        if self.query_failures:
            why.append("%d queries of the checks failed: %s" % (
                len(self.query_failures), "; ".join(
                    self.query_failures[:3])))
        if not r["healthy_after_load"]:
            why.append("the servers did not answer after the load")
        if not r["views"]["ok"]:
            why.append("GET /stats %s, the truth %s" % (r["views"]["got"],
                                                        r["views"]["want"]))
        return why

    def q(self, sql, tries=3):
        """Rows of a check's query; a query that fails (after `tries`) is
        recorded, fails the run, and gives None."""
        for attempt in range(tries):
            rows = self.pg.psql(sql)
            if rows is not None:
                return rows
            time.sleep(1 + attempt)
        self.query_failures.append(" ".join(sql.split())[:80])
        return None

    def q_int(self, sql):
        rows = self.q(sql)
        return int(rows[0][0]) if rows else None

    def drain(self, stall=30, seconds=600):
        """Until the outbox has no pending work; gives up when it makes no
        progress for `stall` seconds (or after `seconds`).  Returns the
        pending count left, None when it cannot be read."""
        end = time.time() + seconds
        last, last_change = None, time.time()
        sql = "SELECT count(*) FROM outbox WHERE status = 'pending'"
        while time.time() < end and time.time() - last_change < stall:
            rows = self.pg.psql(sql)
            n = int(rows[0][0]) if rows else None
            if n == 0:
                return 0
            if n != last:
                last, last_change = n, time.time()
            self.ensure_servers()
            time.sleep(0.5)
        return self.q_int(sql)

    def check(self, ops, opened, load_s, kinds):
        """The figures of the report, from the rows and the clients'
        records.  A query that fails is a failed check (self.q), never
        a zero."""
        backlog = self.q_int("SELECT count(*) FROM outbox "
                             "WHERE status = 'pending'")
        t_drain = time.time()
        pending = self.drain()
        t_drain = time.time() - t_drain

        def q(sql):
            rows = self.q(sql)
            return [] if rows is None else rows
        stored = {}
        rejected = set()  # a rejection is recorded too, but applies nothing
        for cid, agg, first, n, rej in q(
                "SELECT command_id, aggregate_id, first_version, "
                "event_count, rejection IS NOT NULL FROM commands"):
            if rej == "t" and int(n) == 0:
                rejected.add(uuid.UUID(cid))
                continue
            stored[uuid.UUID(cid)] = (uuid.UUID(agg), int(first), int(n))
        events = {}
        for agg, typ, ver, kind, payload in q(
                "SELECT aggregate_id, aggregate_type, version, kind, "
                "encode(payload, 'hex') FROM events "
                "ORDER BY aggregate_id, version"):
            events.setdefault(uuid.UUID(agg), []).append(
                (typ, int(ver), int(kind), bytes.fromhex(payload)))
        r = {}
        by_out = {"ok": 0, "failed": 0, "unknown": 0}
        acked_missing = []
        failed_applied = []
        unknown_applied = 0
        answered_503_applied = []
        expected = opened
        resent = 0
        for op in ops:
            out = op.outcome()
            by_out[out] += 1
            resent += len(op.outcomes) > 1
            applied = op.command_id() in stored
            if out == "ok" and not applied:
                acked_missing.append(str(op.id))
            if out == "failed" and applied:
                failed_applied.append((str(op.id), op.statuses))
            if out == "unknown" and applied:
                unknown_applied += 1
                # Answered 503 every time (never a lost connection), yet
                # applied: the server said "unavailable" for a command
                # that committed (promise 1 wants such outcomes found out).
                if all(isinstance(st, str) for st in op.statuses):
                    answered_503_applied.append((str(op.id), op.statuses))
            if applied and op.kind == "deposit":
                expected += op.amount
            elif applied and op.kind == "withdraw":
                expected -= op.amount
        # Every event belongs to exactly one command's range.
        claimed = {}
        for cid, (agg, first, n) in stored.items():
            for v in range(first, first + n):
                claimed[(agg, v)] = claimed.get((agg, v), 0) + 1
        duplicates = sum(1 for c in claimed.values() if c > 1)
        unclaimed = 0
        gaps = 0
        for agg, evs in events.items():
            vers = [e[1] for e in evs]
            if vers != list(range(len(vers))):
                gaps += 1
            unclaimed += sum(1 for e in evs if (agg, e[1]) not in claimed)
        missing_events = sum(1 for k in claimed if k[0] not in events or
                             k[1] >= len(events[k[0]]))
        dup_rows = q("SELECT (SELECT count(*) FROM (SELECT 1 FROM events "
                     "GROUP BY aggregate_id, version HAVING count(*) > 1) x)"
                     " + (SELECT count(*) FROM (SELECT 1 FROM events GROUP "
                     "BY event_id HAVING count(*) > 1) y)")
        duplicates += int(dup_rows[0][0]) if dup_rows else 0
        # The same deposit applied twice under two commands would show as
        # two events with one id in its payload's first 16 bytes: checked
        # through the command ranges above.  Balances: by API and replay.
        balance_api = 0
        negative = 0
        api_mismatch = 0
        replay_bad = 0
        unreadable = 0
        for aid in self.accounts:
            st, text = self.api("GET", "/accounts/%s" % aid, keep=True)
            if st != 200:
                unreadable += 1
                continue
            bal = json.loads(text)["balance"]
            balance_api += bal
            negative += bal < 0
            evs = events.get(aid, [])
            replay = None
            for typ, ver, kind, p in evs:
                amount, after = struct.unpack_from("<qq", p, 16)
                if kind == 1:
                    nb = amount
                elif kind in (2, 5, 6):
                    nb = replay + amount
                else:
                    nb = replay - amount
                if nb != after or nb < 0:
                    replay_bad += 1
                replay = nb
            if replay != bal:
                api_mismatch += 1
        money_diff = balance_api - expected
        # Transfers: each whose debit committed must be settled.
        unsettled = 0
        transfers = [op for op in ops if op.kind == "transfer" and
                     op.command_id() in stored]
        for op in transfers:
            st, text = self.api("GET", "/transfers/%s" % op.id, keep=True)
            if st != 200 or json.loads(text)["status"] not in (
                    "completed", "refunded"):
                unsettled += 1
        # Snapshots equal to the replay of their stream up to their
        # version: the whole decoded state, every field.
        snap_bad = []
        snaps = self.q("SELECT aggregate_id, snapshot_version, version, "
                       "encode(payload, 'hex'), key_id FROM snapshots")
        for agg, sver, ver, payload, key_id in snaps or []:
            agg = uuid.UUID(agg)
            ver = int(ver)
            evs = events.get(agg, [])
            try:
                if ver >= len(evs):
                    raise ValueError("no event at its version")
                if sver != "1" or key_id:
                    raise ValueError("snapshot version %s, key %s: not "
                                     "decoded here" % (sver, key_id))
                got = decode_state(evs[0][0], bytes.fromhex(payload))
                want = replay_state(evs[:ver + 1])
                if got != want:
                    raise ValueError("%s, replay %s" % (got, want))
            except ValueError as e:
                snap_bad.append("snapshot of %s at version %d: %s" % (
                    agg, ver, e))
        # Dead letters: a dead message of the transfer saga is money in
        # limbo (debited, neither credited nor refunded).
        dead_rows = self.q("SELECT aggregate_type, kind, "
                           "encode(payload, 'hex'), key_id "
                           "FROM outbox WHERE status = 'dead'")
        dead = None if dead_rows is None else len(dead_rows)
        dead_money, dead_cents = 0, 0
        for typ, kind, payload, key_id in dead_rows or []:
            if (typ, int(kind)) in NOT_MONEY:
                continue
            dead_money += 1
            if (typ, kind, key_id) == ("bank_account", "2", ""):
                # credit the destination: effect id, transfer, to, amount
                p = bytes.fromhex(payload)
                if len(p) == 56:
                    dead_cents += struct.unpack_from("<q", p, 48)[0]
        views = self.read_model(events)
        survived = sum(1 for f in self.faults
                       if f["effect"] and f["recovered"])
        kinds_seen = {}
        for f in self.faults:
            kinds_seen[f["kind"]] = kinds_seen.get(f["kind"], 0) + 1
        r = {
            "seed": self.seed,
            "faults_enabled": kinds,
            "load_seconds": round(load_s, 1),
            "commands": len(ops),
            "attempts": sum(self.counts.values()),
            "ok": by_out["ok"], "failed": by_out["failed"],
            "unknown": by_out["unknown"],
            "unknown_applied": unknown_applied,
            "answered_503_but_applied": len(answered_503_applied),
            "resent": resent,
            "acked_per_s": round(by_out["ok"] / load_s, 1),
            "http": self.http,
            "faults_injected": len(self.faults),
            "faults_survived": survived,
            "faults_by_kind": kinds_seen,
            "server_exits": self.server_exits,
            "proxy_connections": self.proxy.accepted,
            "proxy_dropped": self.proxy.dropped,
            "acked_missing": len(acked_missing),
            "failed_but_applied": len(failed_applied),
            "duplicates": duplicates,
            "events_without_command": unclaimed,
            "commands_without_events": missing_events,
            "gaps": gaps,
            "money_expected": expected,
            "money_api": balance_api,
            "money_diff": money_diff,
            "negative_balances": negative,
            "unreadable_accounts": unreadable,
            "api_vs_replay": api_mismatch,
            "replay_errors": replay_bad,
            "unsettled_transfers": unsettled,
            "transfers_committed": len(transfers),
            # None: the query failed (and fails the run), never a 0
            "undelivered": (pending or 0) + (dead or 0),
            "outbox_pending": pending,
            "outbox_backlog_after_load": backlog,
            "drain_seconds": round(t_drain, 1),
            "outbox_dead": dead,
            "dead_holding_money": dead_money,
            "dead_money_cents": dead_cents,
            "snapshots": len(snaps or []),
            "snapshot_mismatches": len(snap_bad),
            "snapshot_examples": snap_bad[:3],
            "faults": self.faults,
            "query_failures": self.query_failures,
            "views": views,
        }
        lost = (r["acked_missing"] + r["failed_but_applied"] +
                r["duplicates"] + r["events_without_command"] +
                r["commands_without_events"] + r["gaps"] +
                abs(r["money_diff"]) + r["negative_balances"] +
                r["unreadable_accounts"] + r["api_vs_replay"] +
                r["replay_errors"] + r["unsettled_transfers"] +
                r["undelivered"] + r["snapshot_mismatches"] +
                r["dead_holding_money"])
        r["data_lost"] = lost
        return r, acked_missing, failed_applied, answered_503_applied

    def read_model(self, events):
        """GET /stats against the truth once quiet: accounts opened, the
        sum of the balances by SQL (each account's last event) and
        SELECT count(*) FROM events.  The projection may be in a backoff
        after the faults: it has a few seconds to converge."""
        total = 0
        for evs in events.values():
            if evs and evs[0][0] == "bank_account":
                total += struct.unpack_from("<qq", evs[-1][3], 16)[1]
        n = self.q_int("SELECT count(*) FROM events")
        want = {"accounts": len(self.accounts), "total_balance": total,
                "events": n}
        got, end = None, time.time() + 15
        while time.time() < end:
            st, text = self.api("GET", "/stats", keep=True)
            got = json.loads(text) if st == 200 else st
            if got == want:
                break
            time.sleep(0.2)
        return {"want": want, "got": got, "ok": got == want and
                n is not None}

    def report(self, r, acked_missing, failed_applied):
        fk = ", ".join("%s %d" % kv for kv in sorted(
            r["faults_by_kind"].items()))
        lines = [
            "==== eventastic fault test (seed %d) ====" % r["seed"],
            "load held       %.0f s, %d commands (%d attempts, %d re-sent),"
            " %.1f acked/s" % (r["load_seconds"], r["commands"],
                               r["attempts"], r["resent"], r["acked_per_s"]),
            "outcomes        ok %d, failed %d, unknown %d (%d of them "
            "applied, %d of those answered 503 each time)" % (
                r["ok"], r["failed"], r["unknown"], r["unknown_applied"],
                r["answered_503_but_applied"]),
            "faults          %d injected, %d survived (took effect, "
            "recovered) (%s)" % (r["faults_injected"], r["faults_survived"],
                                 fk or "none"),
            "server exits    %d by themselves (not counting our kills), %d "
            "not 0 on SIGTERM" % (r["server_exits"],
                                  len(r["term_failures"])),
            "network         %d database connections through the proxy, "
            "%d dropped by faults" % (r["proxy_connections"],
                                      r["proxy_dropped"]),
            "acked_missing   %d" % r["acked_missing"],
            "failed_applied  %d" % r["failed_but_applied"],
            "duplicates      %d (+%d events without command, %d commands "
            "without events)" % (r["duplicates"], r["events_without_command"],
                                 r["commands_without_events"]),
            "gaps            %d" % r["gaps"],
            "money diff      %d (expected %d, API %d; %d negative, %d "
            "unreadable, %d API/replay mismatches)" % (
                r["money_diff"], r["money_expected"], r["money_api"],
                r["negative_balances"], r["unreadable_accounts"],
                r["api_vs_replay"] + r["replay_errors"]),
            "transfers       %d committed, %d unsettled" % (
                r["transfers_committed"], r["unsettled_transfers"]),
            "undelivered     %d (pending %s, dead %s; backlog %s after the "
            "load, drained in %.0f s)" % (
                r["undelivered"], r["outbox_pending"], r["outbox_dead"],
                r["outbox_backlog_after_load"], r["drain_seconds"]),
            "snapshots       %d, %d mismatches (whole states)" % (
                r["snapshots"], r["snapshot_mismatches"]),
            "dead letters    %d holding money (%d cents in limbo)" % (
                r["dead_holding_money"], r["dead_money_cents"]),
            "read model      /stats %s (truth: %s)" % (
                "equals the truth" if r["views"]["ok"] else
                r["views"]["got"], r["views"]["want"]),
            "DATA LOST       %d" % r["data_lost"],
        ]
        for f in r["faults"]:
            lines.append("fault %-9s at %5.1fs: %s%s, recovered in %.1fs%s" %
                         (f["kind"], f["t"], "" if f["effect"] else
                          "NO EFFECT: ", f["detail"], f["recovery_s"],
                          "" if f["recovered"] else " NOT RECOVERED"))
        for e in r["snapshot_examples"]:
            lines.append("mismatch        %s" % e)
        for n in r["notes"]:
            lines.append("note            %s" % n)
        for i in acked_missing[:5]:
            lines.append("acked but missing: %s" % i)
        for i, st in failed_applied[:5]:
            lines.append("failed but applied: %s %s" % (i, st))
        for w in r["failures"]:
            lines.append("FAILED          %s" % w)
        lines.append("RESULT          %s: DATA LOST %d, %d commands "
                     "acknowledged, %d faults of %d kinds survived" % (
                         "FAILED" if r["failures"] else "ok",
                         r["data_lost"], r["ok"], r["faults_survived"],
                         len(r["faults_by_kind"])))
        lines.append("=" * 42)
        print("\n".join(lines))
        out = os.path.join(TOP, "build", "faults.json")
        with open(out, "w") as f:
            json.dump(r, f, indent=1)
        print("JSON " + json.dumps(r, sort_keys=True))
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--seed", type=int,
                    default=int(time.time() * 1000) % 1000000)
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--accounts", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--faults", default="",
                    help="comma-separated subset of %s" % ",".join(ALL_FAULTS))
    ap.add_argument("--cluster", default="pg-faults",
                    help="the cluster's directory under build/")
    ap.add_argument("--min-gap", type=float, default=2.0)
    ap.add_argument("--max-gap", type=float, default=5.0)
    a = ap.parse_args()
    os.makedirs(os.path.join(TOP, "build"), exist_ok=True)
    sys.exit(Run(a).run())


if __name__ == "__main__":
    main()
