#!/usr/bin/env python3
"""The bad-input catalogue: bank-server on PostgreSQL (issue 8).

Each case sends bad bytes and expects a clear answer: a status from a
small set, never 500, never a crash, and the server keeps serving others.
For every case that must not write, the store is read before and after
(events, commands, outbox, snapshots: counts and the newest position) and
must be unchanged; the accounts the run made are read back through the API.

Prints one line per case and a RESULT line; exits 1 when a case fails.
A case that fails because of a known, reported bug prints XFAIL and does
not fail the run unless --strict is given (ninja check-faults does).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TOP = os.path.dirname(TESTS)
sys.path.insert(0, HERE)
from faults import Postgres, Server, log  # noqa: E402

OK = "ok  "
STRICT = "--strict" in sys.argv
failures = []
xfails = []
# Known bugs of bank-server are marked known_bug=...: such a case fails
# only with --strict.  None is known today.


def raw(port, data, timeout=10, half_close=False):
    """Send bytes, return (status or None, body bytes).  None: the server
    closed the connection without an answer (acceptable for some cases,
    never for well-formed HTTP)."""
    s = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        if b"\r\n\r\n" not in buf:
            return None, buf
        head, body = buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ")[1])
        clen = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                clen = int(v)
        while len(body) < clen:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, body
    except (ConnectionResetError, BrokenPipeError):
        return None, b""
    finally:
        s.close()


def post(path, body, extra=b""):
    if isinstance(body, str):
        body = body.encode()
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bank\r\n"
            b"Content-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + body)


def get(path, extra=b""):
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: bank\r\n" +
            extra + b"Connection: close\r\n\r\n")


class Bench:
    def __init__(self):
        self.pg = Postgres(os.path.join(TOP, "build", "pg-badinput"))
        self.srv = None
        self.n = 0

    def fingerprint(self):
        """The store's counts and newest position, or None when the query
        failed (a case then fails: None == None is no evidence)."""
        rows = self.pg.psql(
            "SELECT (SELECT count(*) FROM events), "
            "(SELECT coalesce(max(position), 0) FROM events), "
            "(SELECT count(*) FROM commands), (SELECT count(*) FROM outbox),"
            " (SELECT count(*) FROM snapshots)")
        return tuple(rows[0]) if rows else None

    def case(self, name, request, expect, writes=False, json_error=True,
             known_bug=None, error=None, recorded=False, **kw):
        """expect: the statuses that are a clear answer; None in it means
        a closed connection is one too.  error: the JSON body's "error"
        (413 and 431 are checked only with it).  recorded: a rejection,
        whose command-id record is the one row it may write."""
        self.n += 1
        before = None if writes else self.fingerprint()
        t0 = time.time()
        try:
            status, body = raw(self.srv.port, request, **kw)
        except OSError as e:
            status, body = "error %s" % e, b""
        dt = time.time() - t0
        why = []
        if status not in expect:
            why.append("got %s, want %s" % (status, expect))
        if status == 500:
            why.append("500")
        if json_error and isinstance(status, int) and 400 <= status < 500 \
                and status not in (413, 431):
            try:
                if "error" not in json.loads(body):
                    why.append("no error in body")
            except ValueError:
                why.append("body is not JSON: %r" % body[:80])
        if error is not None and isinstance(status, int):
            try:
                got = json.loads(body).get("error")
            except (ValueError, AttributeError):
                got = "not JSON: %r" % body[:80]
            if got != error:
                why.append("error %r, want %r" % (got, error))
        if not self.srv.alive():
            why.append("server died (rc %s)" % self.srv.proc.returncode)
            self.srv.start()
        elif self.health() != 200:
            why.append("server does not answer others afterwards")
        if not writes:
            after = self.fingerprint()
            if before is None or after is None:
                why.append("the store could not be read (psql failed): "
                           "%s -> %s" % (before, after))
            else:
                if recorded:
                    before = before[:2] + (str(int(before[2]) + 1),) + \
                        before[3:]
                if after != before:
                    why.append("store changed: %s -> %s" % (before, after))
        if writes:
            self.settle()
        tag = OK if not why else "XFAIL" if known_bug and not STRICT \
            else "FAIL"
        line = "%-4s %-44s %s %.2fs" % (tag, name, status, dt)
        if why:
            line += "  " + "; ".join(why)
            if tag == "XFAIL":
                line += "  (known bug: %s)" % known_bug
                xfails.append(name)
            else:
                failures.append(name)
        print(line)
        sys.stdout.flush()
        return status, body

    def settle(self, seconds=20):
        """Until the outbox is drained and the store stands still."""
        end = time.time() + seconds
        last = None
        while time.time() < end:
            rows = self.pg.psql("SELECT count(*) FROM outbox "
                                "WHERE status = 'pending'")
            fp = self.fingerprint()
            if rows and rows[0][0] == "0" and fp is not None and fp == last:
                return
            last = fp
            time.sleep(0.2)

    def health(self):
        try:
            return raw(self.srv.port, get("/healthz"), timeout=5)[0]
        except OSError:
            return None

    def account(self, balance=1000, owner="owner", email="o@example.com"):
        aid = uuid.uuid4()
        body = json.dumps({"command_id": str(uuid.uuid4()),
                           "account_id": str(aid), "owner": owner,
                           "email": email, "initial_balance": balance})
        status, text = raw(self.srv.port, post("/accounts", body))
        assert status == 201, (status, text)
        return aid

    def balance(self, aid):
        status, body = raw(self.srv.port, get("/accounts/%s" % aid))
        return json.loads(body) if status == 200 else status

    def run(self):
        subprocess.call([sys.executable, os.path.join(TESTS, "pgcluster.py"),
                         "stop", self.pg.dir], stdout=subprocess.DEVNULL)
        if not self.pg.start():
            return 2
        self.srv = Server("badinput", self.pg)
        try:
            if not self.srv.start(migrate=True):
                log("bank-server did not start")
                return 2
            return self.catalogue()
        finally:
            rc = self.srv.term()
            self.pg.stop()
            if rc not in (0, None):
                print("FAIL bank-server exited %s on SIGTERM" % rc)
                failures.append("sigterm")

    def catalogue(self):
        a = self.account(1000)
        b = self.account(1000)
        dep = "/accounts/%s/deposits" % a
        wd = "/accounts/%s/withdrawals" % a
        good = {"command_id": str(uuid.uuid4()), "amount": 5}
        good_text = json.dumps(good)
        NO = (400,)
        c = self.case

        # Malformed and truncated JSON.
        for i, body in enumerate(["{", "not json", "[]", '"text"', "null",
                                  "1", "{}", "{,}", '{"amount":5,}',
                                  "{'amount': 5}", "\ufeff" + good_text]):
            c("malformed json %d %r" % (i, body[:16]), post(dep, body), NO)
        for cut in range(1, len(good_text), 7):
            c("truncated json at %d" % cut, post(dep, good_text[:cut]), NO)
        dup = '{"command_id":"%s","amount":5,"amount":7}' % uuid.uuid4()
        c("duplicate key", post(dep, dup), NO)
        c("empty body", post(dep, ""), NO)

        # Wrong types.
        for field, v in [("amount", "5"), ("amount", 1.5), ("amount", True),
                         ("amount", None), ("amount", [5]),
                         ("amount", {"v": 5}), ("command_id", 123),
                         ("command_id", "not-a-uuid"), ("command_id", None),
                         ("command_id", str(uuid.uuid4()) + "0")]:
            body = dict(good, command_id=str(uuid.uuid4()))
            body[field] = v
            c("wrong type %s=%r" % (field, v), post(dep, json.dumps(body)),
              NO)
        for field, v in [("owner", 5), ("email", None), ("initial_balance",
                                                          "1"),
                         ("account_id", 7), ("owner", ""),
                         ("owner", "x" * 128), ("initial_balance", -1)]:
            body = {"command_id": str(uuid.uuid4()), "owner": "o",
                    "email": "e", "initial_balance": 1}
            body[field] = v
            c("open: wrong %s=%r" % (field, str(v)[:12]),
              post("/accounts", json.dumps(body)), NO)
        for field, v in [("from", "x"), ("to", 5), ("amount", "1"),
                         ("transfer_id", None), ("to", str(a))]:
            body = {"transfer_id": str(uuid.uuid4()), "from": str(a),
                    "to": str(b), "amount": 1}
            body[field] = v
            c("transfer: wrong %s=%r" % (field, str(v)[:12]),
              post("/transfers", json.dumps(body)), NO)

        # Huge numbers and amounts that overflow.
        for text in ["1e400", "99999999999999999999999999",
                     "9223372036854775808", "-9223372036854775809",
                     "-1", "0", "-0", "1e3", "0x10", "NaN", "Infinity"]:
            body = '{"command_id":"%s","amount":%s}' % (uuid.uuid4(), text)
            c("amount %s" % text, post(dep, body), NO)
        big = '{"command_id":"%s","amount":9223372036854775807}' % (
            uuid.uuid4())
        # Amounts above the server's cap (10^15 cents) are bad requests;
        # an overflowing sum is rejected by the domain
        # (tests/unit/test_bank.c takes a balance to INT64_MAX, which the
        # cap keeps HTTP from).
        c("deposit of INT64_MAX", post(dep, big), (400,))
        c("withdrawal of INT64_MAX", post(wd, big), (400,))
        t = {"transfer_id": str(uuid.uuid4()), "from": str(a), "to": str(b),
             "amount": 9223372036854775807}
        c("transfer of INT64_MAX", post("/transfers", json.dumps(t)),
          (400,))
        t = dict(t, transfer_id=str(uuid.uuid4()), amount=10 ** 15)
        c("transfer beyond the balance", post("/transfers", json.dumps(t)),
          (422,), recorded=True)
        c("withdrawal beyond the balance",
          post(wd, '{"command_id":"%s","amount":%d}' % (uuid.uuid4(),
                                                       10 ** 15)), (422,),
          recorded=True)
        rich = self.account(10 ** 15)
        body = {"command_id": str(uuid.uuid4()), "amount": 10 ** 15 + 1}
        c("deposit above the cap",
          post("/accounts/%s/deposits" % rich, json.dumps(body)), (400,))

        # Invalid UTF-8 and NUL bytes.
        cid = str(uuid.uuid4())
        for name, owner in [("invalid utf-8", b"\xff\xfe"),
                            ("overlong utf-8", b"\xc0\xaf"),
                            ("lone surrogate", b"\xed\xa0\x80"),
                            ("escaped NUL", b"a\\u0000b"),
                            ("raw NUL", b"a\x00b"),
                            ("escaped lone surrogate", b"\\ud800")]:
            body = (b'{"command_id":"' + cid.encode() + b'","owner":"' +
                    owner + b'","email":"e@x","initial_balance":1}')
            c("open: owner %s" % name, post("/accounts", body), NO)
        c("NUL byte before the body's end",
          post(dep, good_text.encode() + b"\x00"), NO)
        c("NUL in the path", get("/accounts/%s\x00x" % a), (400, 404, None),
          json_error=False)

        # Sizes.
        pad = good_text + " " * (64 * 1024 + 1 - len(good_text))
        c("body of 64 KiB + 1", post(dep, pad), (413,),
          error="payload_too_large")
        c("body of 1 MiB", post(dep, good_text + " " * ((1 << 20) -
                                                      len(good_text))),
          (413,), error="payload_too_large")
        # Beyond what evhttp reads (1 MiB), libevent 2.1 answers its own
        # 413 page (HTML) before reading the body: no hook to change it.
        c("Content-Length 1 MiB + 1",
          b"POST " + dep.encode() + b" HTTP/1.1\r\nHost: b\r\n"
          b"Content-Length: 1048577\r\n\r\n", (413, None),
          json_error=False, half_close=True)
        c("Content-Length 64 KiB + 1, no body sent",
          b"POST " + dep.encode() + b" HTTP/1.1\r\nHost: b\r\n"
          b"Content-Length: 65537\r\n\r\n", (413, None), json_error=False,
          half_close=True)
        c("Content-Length -1",
          b"POST " + dep.encode() + b" HTTP/1.1\r\nHost: b\r\n"
          b"Content-Length: -1\r\nConnection: close\r\n\r\n", (400, 411,
                                                               None),
          json_error=False, half_close=True)
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(10000))
        c("10,000 headers", get("/healthz", many), (400, 413, 431, None),
          json_error=False)
        c("a header line of 1 MB", get("/healthz", b"X-Big: " +
                                       b"a" * (1 << 20) + b"\r\n"),
          (400, 413, 431, None), json_error=False)
        c("a request line of 1 MB", get("/accounts/" + "a" * (1 << 20)),
          (400, 404, 413, 414, None), json_error=False)

        # Not HTTP, and wrong routes and methods.
        c("garbage request line", b"GARBAGE\r\n\r\n", (400, None),
          json_error=False, half_close=True)
        c("HTTP/9.9", b"GET /health HTTP/9.9\r\n\r\n", (400, 505, None, 200),
          json_error=False, half_close=True)
        c("unknown route", post("/nope", good_text), (404,))
        c("unknown account subroute", post("/accounts/%s/x" % a, good_text),
          (404,))
        c("PUT", b"PUT /accounts HTTP/1.1\r\nHost: b\r\nContent-Length: 0"
          b"\r\nConnection: close\r\n\r\n", (405,))
        c("GET a malformed id", get("/accounts/xyz"), (400, 404))
        c("GET an unknown account", get("/accounts/%s" % uuid.uuid4()),
          (404,))
        c("deposit to an unknown account",
          post("/accounts/%s/deposits" % uuid.uuid4(), good_text), (404,),
          recorded=True)
        c("zero-padded id", post("/accounts/0%s/deposits" % a, good_text),
          (400, 404))

        # SQL metacharacters in every string field.
        evil = ["'; DROP TABLE events; --", "\" OR 1=1 --", "\\x00\\",
                "$1 $2", "%s%n", "') ; SELECT pg_sleep(5); --",
                "E'\\\\'", "\u2028;--"]
        for i, s in enumerate(evil):
            aid = uuid.uuid4()
            body = {"command_id": str(uuid.uuid4()), "account_id": str(aid),
                    "owner": s, "email": s, "initial_balance": 1}
            st, _ = c("open: SQL metacharacters %d" % i,
                      post("/accounts", json.dumps(body)), (201,),
                      writes=True)
            # The GET answer has no owner (the route's contract): the
            # account must read back, and the same request re-sent must be
            # recognised as the same content.
            got = self.balance(aid)
            again, _ = raw(self.srv.port, post("/accounts", json.dumps(body)))
            if not isinstance(got, dict) or got.get("balance") != 1 or \
                    again != 201:
                failures.append("metachar read-back %d" % i)
                print("FAIL SQL metacharacters %d: read back %r" % (i, got))
            for field in ("command_id", "account_id"):
                body2 = dict(body, command_id=str(uuid.uuid4()))
                body2[field] = s
                c("open: %s = SQL %d" % (field, i),
                  post("/accounts", json.dumps(body2)), NO)
            c("deposit: command_id = SQL %d" % i,
              post(dep, json.dumps({"command_id": s, "amount": 1})), NO)
            for field in ("transfer_id", "from", "to"):
                t = {"transfer_id": str(uuid.uuid4()), "from": str(a),
                     "to": str(b), "amount": 1}
                t[field] = s
                c("transfer: %s = SQL %d" % (field, i),
                  post("/transfers", json.dumps(t)), NO)
        import urllib.parse
        c("path with SQL", get("/accounts/" + urllib.parse.quote(evil[0])),
          (400, 404))
        tables = self.pg.psql("SELECT count(*) FROM pg_tables WHERE "
                              "tablename IN ('events','commands','outbox',"
                              "'snapshots')")
        if not tables or tables[0][0] != "4":
            failures.append("tables")
            print("FAIL the tables are not all there: %s" % tables)

        # The read model's routes: hostile limits, odd paths, methods.
        st = "/accounts/%s/statement" % a
        c("statement", get(st), (200,), json_error=False)
        c("statement, limit 100", get(st + "?limit=100"), (200,),
          json_error=False)
        c("stats", get("/stats"), (200,), json_error=False)
        for q in ["limit=0", "limit=101", "limit=abc", "limit=", "limit",
                  "limit=1e3", "limit=-1", "limit=%2B5", "limit=5.0",
                  "limit=%31", "limit=0x10", "limit=99999999999999999999",
                  "limit=1&limit=1", "limit=5&x=1", "x=1", "&", "&&limit=5",
                  "limit=5;x", "limit=%00", "limit=1%00",
                  "limit=" + "9" * 5000]:
            c("statement ?%s" % q[:24], get(st + "?" + q), (400,))
        c("statement of an unknown account",
          get("/accounts/%s/statement" % uuid.uuid4()), (404,))
        c("statement of a malformed id", get("/accounts/xyz/statement"),
          (400,))
        c("statement of the nil id", get("/accounts/%s/statement" %
                                         uuid.UUID(int=0)), (400,))
        for path in [st + "/x", st + "/", "/accounts/%s/statements" % a,
                     "/accounts/%s/Statement" % a, "/stats/x", "/stats/",
                     "/accounts//statement", "/accounts/%s//statement" % a]:
            c("GET %s" % path.replace(str(a), "{a}"), get(path), (400, 404))
        for m in ["POST", "PUT", "DELETE", "PATCH"]:
            for path in [st, "/stats"]:
                c("%s %s" % (m, path.replace(str(a), "{a}")),
                  m.encode() + b" " + path.encode() + b" HTTP/1.1\r\n"
                  b"Host: b\r\nContent-Length: 2\r\nConnection: close"
                  b"\r\n\r\n{}", (405,))

        # Idempotency: the same id with other content.
        cid = str(uuid.uuid4())
        c("deposit", post(dep, json.dumps({"command_id": cid, "amount": 3})),
          (200,), writes=True)
        c("deposit resent, same content",
          post(dep, json.dumps({"command_id": cid, "amount": 3})), (200,))
        c("deposit resent, other amount",
          post(dep, json.dumps({"command_id": cid, "amount": 4})), (409,))

        # Slowloris: many connections trickling a request; others served.
        self.slowloris()

        # Balances read back: a and b are as the writes above left them.
        self.settle()
        got_a, got_b = self.balance(a), self.balance(b)
        if got_a.get("balance") != 1003 or got_b.get("balance") != 1000:
            failures.append("balances")
            print("FAIL balances: a %s (want 1003), b %s (want 1000)" % (
                got_a, got_b))
        print("RESULT %d cases, %d failed%s, %d known bugs%s" % (
            self.n, len(failures), (" (" + ", ".join(failures[:10]) + ")")
            if failures else "", len(xfails), (" (" + ", ".join(xfails) +
                                                ")") if xfails else ""))
        return 1 if failures else 0

    def slowloris(self, n=100, seconds=4.0):
        self.n += 1
        stop = threading.Event()
        socks = []
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", self.srv.port), 5)
                s.sendall(b"POST /accounts HTTP/1.1\r\nHost: b\r\n")
                socks.append(s)
            except OSError:
                break

        def trickle():
            i = 0
            while not stop.is_set():
                for s in socks:
                    try:
                        s.sendall(b"X-%d: y\r\n" % i)
                    except OSError:
                        pass
                i += 1
                stop.wait(0.5)
        th = threading.Thread(target=trickle, daemon=True)
        th.start()
        worst = 0.0
        bad = 0
        end = time.time() + seconds
        while time.time() < end:
            t0 = time.time()
            try:
                st = raw(self.srv.port, get("/healthz"), timeout=5)[0]
            except OSError:
                st = None
            worst = max(worst, time.time() - t0)
            bad += st != 200
            time.sleep(0.1)
        stop.set()
        th.join()
        for s in socks:
            s.close()
        ok = bad == 0 and worst < 2.0 and self.srv.alive()
        print("%s slowloris: %d slow connections, others: %d failed, "
              "slowest %.2fs" % (OK if ok else "FAIL", len(socks), bad,
                                 worst))
        if not ok:
            failures.append("slowloris")


def main():
    os.makedirs(os.path.join(TOP, "build"), exist_ok=True)
    sys.exit(Bench().run())


if __name__ == "__main__":
    main()
