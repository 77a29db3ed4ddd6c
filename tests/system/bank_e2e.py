#!/usr/bin/env python3
"""The bank end to end: bank-server on a store, through its HTTP API.

Every route and error answer of issue 7, idempotent replays, a transfer to
an unknown account refunded, and SIGTERM during load losing no
acknowledged deposit (the server is restarted on the same database and
every account read back).  The read model (GET /stats, GET
/accounts/{id}/statement) against the truth, on a server of its own (on
PostgreSQL with a database of its own): the counts the script implies,
and on PostgreSQL the SQL counts and the balances of every account.
run(db_url) returns a list of failures; with db_url None the server runs
on the in-memory store and the restart check is skipped.  Standalone:
tests/system/bank_e2e.py [--memory].
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TOP = os.path.dirname(TESTS)
BIN = os.path.join(TOP, "build", "release", "bin")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, db_url, port=None, bin_dir=BIN, log="bank_e2e.log"):
        self.port = port or free_port()
        cmd = [os.path.join(bin_dir, "bank-server"), "--listen",
               "127.0.0.1:%d" % self.port, "--workers", "2"]
        if db_url:
            cmd += ["--db", db_url, "--migrate"]
        env = dict(os.environ)
        env.pop("DATABASE_URL", None)
        self.log = open(os.path.join(TOP, "build", log), "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log,
                                     stderr=self.log)
        end = time.time() + 30
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("bank-server exited with %d"
                                   % self.proc.returncode)
            try:
                socket.create_connection(("127.0.0.1", self.port),
                                         0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("bank-server did not start")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        self.log.close()
        return rc


def request(port, method, path, body=None, raw=None, headers=None):
    """(status, headers dict, parsed JSON or text)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (
        json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    text = r.read()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    try:
        parsed = json.loads(text.decode("utf-8")) if text else None
    except (ValueError, UnicodeDecodeError):
        parsed = text.decode("utf-8", "replace")
    return r.status, hdrs, parsed


def uid():
    return str(uuid.uuid4())


class Checker:
    def __init__(self):
        self.failures = []
        self.checks = 0

    def eq(self, what, got, want):
        self.checks += 1
        if got != want:
            self.failures.append("%s: got %r, want %r" % (what, got, want))

    def true(self, what, cond, detail=""):
        self.checks += 1
        if not cond:
            self.failures.append("%s %s" % (what, detail))


def open_account(port, balance=1000, account_id=None):
    body = {"command_id": uid(), "owner": "Ada", "email": "ada@example.com",
            "initial_balance": balance}
    if account_id:
        body["account_id"] = account_id
    return request(port, "POST", "/accounts", body)


def routes_and_errors(ck, port):
    p = port
    # health and metrics
    st, _, b = request(p, "GET", "/healthz")
    ck.eq("healthz status", st, 200)
    ck.eq("healthz body", b.get("status") if isinstance(b, dict) else b,
          "ok")
    st, h, text = request(p, "GET", "/metrics")
    ck.eq("metrics status", st, 200)
    ck.true("metrics content type", h.get("content-type", "").startswith(
        "text/plain"), h.get("content-type"))
    for name in ("eventastic_host_accepted_total",
                 "eventastic_host_latency_seconds",
                 "eventastic_outbox_deliveries_total",
                 "eventastic_outbox_pending", "bank_http_responses_total"):
        ck.true("metrics has " + name, isinstance(text, str) and name in text)

    # open
    aid = uid()
    cmd = {"command_id": uid(), "owner": "Ada", "email": "ada@example.com",
           "initial_balance": 1000, "account_id": aid}
    st, h, b = request(p, "POST", "/accounts", cmd)
    ck.eq("open", (st, b), (201, {"account_id": aid, "balance": 1000,
                                   "version": 0}))
    ck.true("open content type", "application/json" in
            h.get("content-type", ""))
    ck.eq("open replay", request(p, "POST", "/accounts", cmd)[::2],
          (201, {"account_id": aid, "balance": 1000, "version": 0}))
    other = dict(cmd, initial_balance=5)
    ck.eq("open same id other body", request(p, "POST", "/accounts",
                                             other)[::2],
          (409, {"error": "idempotency_conflict"}))
    st, _, b = open_account(p, 7)
    ck.eq("open without account_id", st, 201)
    ck.true("derived account id", isinstance(b, dict) and
            uuid.UUID(b["account_id"]) is not None)
    ck.eq("get", request(p, "GET", "/accounts/" + aid)[::2],
          (200, {"account_id": aid, "balance": 1000, "version": 0}))

    # deposit, withdrawal, replays
    dep = {"command_id": uid(), "amount": 250}
    want = (200, {"account_id": aid, "balance": 1250, "version": 1})
    ck.eq("deposit", request(p, "POST", "/accounts/%s/deposits" % aid,
                             dep)[::2], want)
    ck.eq("deposit replay", request(p, "POST", "/accounts/%s/deposits" % aid,
                                    dep)[::2], want)
    ck.eq("deposit same id other amount",
          request(p, "POST", "/accounts/%s/deposits" % aid,
                  dict(dep, amount=1))[::2],
          (409, {"error": "idempotency_conflict"}))
    ck.eq("deposit same id as withdrawal",
          request(p, "POST", "/accounts/%s/withdrawals" % aid, dep)[::2],
          (409, {"error": "idempotency_conflict"}))
    wd = {"command_id": uid(), "amount": 50}
    want = (200, {"account_id": aid, "balance": 1200, "version": 2})
    ck.eq("withdraw", request(p, "POST", "/accounts/%s/withdrawals" % aid,
                              wd)[::2], want)
    ck.eq("withdraw replay", request(p, "POST", "/accounts/%s/withdrawals"
                                     % aid, wd)[::2], want)
    ck.eq("insufficient", request(p, "POST", "/accounts/%s/withdrawals" % aid,
                                  {"command_id": uid(),
                                   "amount": 1201})[::2],
          (422, {"error": "insufficient_funds"}))
    ck.eq("balance unchanged by replays and rejections",
          request(p, "GET", "/accounts/" + aid)[::2],
          (200, {"account_id": aid, "balance": 1200, "version": 2}))
    ck.eq("deposit to unknown account",
          request(p, "POST", "/accounts/%s/deposits" % uid(),
                  {"command_id": uid(), "amount": 1})[::2],
          (404, {"error": "not_found"}))
    ck.eq("get unknown account", request(p, "GET", "/accounts/" + uid())[::2],
          (404, {"error": "not_found"}))

    # transfers
    bid = uid()
    open_account(p, 0, bid)
    tid = uid()
    tr = {"transfer_id": tid, "from": aid, "to": bid, "amount": 200}
    ck.eq("transfer", request(p, "POST", "/transfers", tr)[::2],
          (202, {"transfer_id": tid, "status": "pending"}))
    ck.eq("transfer replay", request(p, "POST", "/transfers", tr)[::2],
          (202, {"transfer_id": tid, "status": "pending"}))
    ck.eq("transfer same id other amount",
          request(p, "POST", "/transfers", dict(tr, amount=201))[::2],
          (409, {"error": "idempotency_conflict"}))
    ck.eq("transfer same id other source",
          request(p, "POST", "/transfers", dict(tr, **{"from": bid,
                                                        "to": aid}))[::2],
          (409, {"error": "idempotency_conflict"}))
    settled = wait_transfer(p, tid)
    ck.eq("transfer completed", settled, (200, {
        "transfer_id": tid, "from": aid, "to": bid, "amount": 200,
        "status": "completed"}))
    ck.eq("source after transfer",
          request(p, "GET", "/accounts/" + aid)[2].get("balance"), 1000)
    ck.eq("destination after transfer",
          request(p, "GET", "/accounts/" + bid)[2].get("balance"), 200)
    ghost = uid()
    t2 = uid()
    ck.eq("transfer to unknown account",
          request(p, "POST", "/transfers", {"transfer_id": t2, "from": aid,
                                            "to": ghost,
                                            "amount": 300})[::2],
          (202, {"transfer_id": t2, "status": "pending"}))
    ck.eq("transfer to unknown account refunded", wait_transfer(p, t2),
          (200, {"transfer_id": t2, "from": aid, "to": ghost, "amount": 300,
                 "status": "refunded"}))
    ck.eq("source after refund",
          request(p, "GET", "/accounts/" + aid)[2].get("balance"), 1000)
    ck.eq("transfer from unknown account",
          request(p, "POST", "/transfers", {"transfer_id": uid(),
                                            "from": uid(), "to": aid,
                                            "amount": 1})[::2],
          (404, {"error": "not_found"}))
    ck.eq("transfer insufficient",
          request(p, "POST", "/transfers", {"transfer_id": uid(),
                                            "from": bid, "to": aid,
                                            "amount": 201})[::2],
          (422, {"error": "insufficient_funds"}))
    ck.eq("get unknown transfer",
          request(p, "GET", "/transfers/" + uid())[::2],
          (404, {"error": "not_found"}))

    # the largest amount: 10^15 cents (sums beyond int64 are rejected by
    # the domain: tests/unit/test_bank.c)
    ck.eq("largest initial balance", open_account(p, 10 ** 15)[0], 201)
    ck.eq("initial balance too large", open_account(p, 10 ** 15 + 1)[::2],
          (400, {"error": "bad_request",
                 "detail": "initial_balance is too large (at most "
                           "1000000000000000)"}))

    # bad requests
    dpath = "/accounts/%s/deposits" % aid
    bad = [
        ("malformed JSON", "POST", dpath, b"{\"command_id\":"),
        ("not an object", "POST", dpath, b"[1,2]"),
        ("empty body", "POST", dpath, b""),
        ("invalid UTF-8", "POST", dpath,
         b"{\"command_id\":\"\xff\xfe\",\"amount\":1}"),
        ("missing command_id", "POST", dpath, b"{\"amount\":1}"),
        ("missing amount", "POST", dpath,
         json.dumps({"command_id": uid()}).encode()),
        ("amount is a string", "POST", dpath,
         json.dumps({"command_id": uid(), "amount": "1"}).encode()),
        ("amount is a float", "POST", dpath,
         json.dumps({"command_id": uid(), "amount": 1.5}).encode()),
        ("amount zero", "POST", dpath,
         json.dumps({"command_id": uid(), "amount": 0}).encode()),
        ("amount negative", "POST", dpath,
         json.dumps({"command_id": uid(), "amount": -5}).encode()),
        ("amount too large", "POST", dpath,
         json.dumps({"command_id": uid(), "amount": 10 ** 16}).encode()),
        ("amount beyond int64", "POST", dpath,
         json.dumps({"command_id": uid(), "amount": 2 ** 64}).encode()),
        ("bad command_id", "POST", dpath,
         json.dumps({"command_id": "nope", "amount": 1}).encode()),
        ("command_id a number", "POST", dpath,
         json.dumps({"command_id": 7, "amount": 1}).encode()),
        ("bad account id in path", "POST", "/accounts/xyz/deposits",
         json.dumps({"command_id": uid(), "amount": 1}).encode()),
        ("bad id in GET", "GET", "/accounts/not-a-uuid", None),
        ("bad transfer id in GET", "GET", "/transfers/1234", None),
        ("open missing owner", "POST", "/accounts",
         json.dumps({"command_id": uid(), "email": "a@b",
                     "initial_balance": 0}).encode()),
        ("open negative balance", "POST", "/accounts",
         json.dumps({"command_id": uid(), "owner": "a", "email": "a@b",
                     "initial_balance": -1}).encode()),
        ("open owner not a string", "POST", "/accounts",
         json.dumps({"command_id": uid(), "owner": 5, "email": "a@b",
                     "initial_balance": 0}).encode()),
        ("open bad account_id", "POST", "/accounts",
         json.dumps({"command_id": uid(), "owner": "a", "email": "a@b",
                     "initial_balance": 0, "account_id": "x"}).encode()),
        ("transfer to itself", "POST", "/transfers",
         json.dumps({"transfer_id": uid(), "from": aid, "to": aid,
                     "amount": 1}).encode()),
        ("transfer bad to", "POST", "/transfers",
         json.dumps({"transfer_id": uid(), "from": aid, "to": "x",
                     "amount": 1}).encode()),
        ("transfer missing transfer_id", "POST", "/transfers",
         json.dumps({"from": aid, "to": bid, "amount": 1}).encode()),
        ("duplicate keys", "POST", dpath,
         b"{\"command_id\":\"%s\",\"amount\":1,\"amount\":2}"
         % uid().encode()),
    ]
    for what, method, path, raw in bad:
        st, _, b = request(p, method, path, raw=raw)
        ck.eq(what + ": status", st, 400)
        ck.true(what + ": body", isinstance(b, dict) and
                b.get("error") == "bad_request" and
                isinstance(b.get("detail"), str), repr(b))
    ck.eq("nothing changed by bad requests",
          request(p, "GET", "/accounts/" + aid)[2].get("balance"), 1000)

    # not found, wrong method, too large
    for path in ("/", "/nope", "/accounts/%s/loans" % aid, "/transfers/a/b"):
        ck.eq("404 " + path, request(p, "GET", path)[::2],
              (404, {"error": "not_found"}))
    for method, path in (("GET", "/accounts"), ("PUT", "/accounts/" + aid),
                         ("DELETE", "/transfers/" + tid),
                         ("GET", dpath), ("POST", "/healthz"),
                         ("POST", "/metrics"), ("GET", "/transfers"),
                         ("PATCH", "/accounts")):
        st, h, b = request(p, method, path, raw=b"{}")
        ck.eq("405 %s %s" % (method, path), (st, b),
              (405, {"error": "method_not_allowed"}))
        ck.true("405 Allow header", "allow" in h)
    big_body = b"{\"command_id\":\"%s\",\"amount\":1,\"pad\":\"%s\"}" % (
        uid().encode(), b"x" * (70 * 1024))
    try:
        st, _, b = request(p, "POST", dpath, raw=big_body)
    except (ConnectionError, http.client.HTTPException):
        st, b = "connection closed", None
    ck.eq("413 for a body over 64 KiB", (st, b),
          (413, {"error": "payload_too_large",
                 "detail": "the body is over 64 KiB"}))
    ck.eq("server alive after bad input", request(p, "GET",
                                                  "/healthz")[0], 200)


def rejection_replays(ck, port):
    """Rejections are outcomes: replayed after the state changed so that
    the request would now pass, they answer the same status and body.
    Returns the replays as (what, method, path, body, answer), to be sent
    again after a restart."""
    p = port
    replays = []

    def first(what, path, body, want):
        got = request(p, "POST", path, body)[::2]
        ck.eq(what, got, want)
        replays.append((what + " replayed", "POST", path, body, got))

    def again(what):
        for w, m, path, body, want in replays:
            if w == what + " replayed":
                ck.eq(w, request(p, m, path, body)[::2], want)

    cid = uid()
    open_account(p, 100, cid)
    wd = {"command_id": uid(), "amount": 150}
    first("withdrawal rejected", "/accounts/%s/withdrawals" % cid, wd,
          (422, {"error": "insufficient_funds"}))
    ck.eq("deposit after the rejection",
          request(p, "POST", "/accounts/%s/deposits" % cid,
                  {"command_id": uid(), "amount": 100})[::2],
          (200, {"account_id": cid, "balance": 200, "version": 1}))
    again("withdrawal rejected")
    ck.eq("rejected withdrawal, same id other amount",
          request(p, "POST", "/accounts/%s/withdrawals" % cid,
                  dict(wd, amount=151))[::2],
          (409, {"error": "idempotency_conflict"}))

    tid = uid()
    tr = {"transfer_id": tid, "from": cid, "to": uid(), "amount": 500}
    first("transfer rejected (insufficient)", "/transfers", tr,
          (422, {"error": "insufficient_funds"}))
    ck.eq("deposit after the rejected transfer",
          request(p, "POST", "/accounts/%s/deposits" % cid,
                  {"command_id": uid(), "amount": 1000})[::2],
          (200, {"account_id": cid, "balance": 1200, "version": 2}))
    again("transfer rejected (insufficient)")
    ck.eq("rejected transfer, same id other amount",
          request(p, "POST", "/transfers", dict(tr, amount=501))[::2],
          (409, {"error": "idempotency_conflict"}))
    ck.eq("rejected transfer not recorded",
          request(p, "GET", "/transfers/" + tid)[::2],
          (404, {"error": "not_found"}))

    ghost = uid()
    first("transfer from unknown account", "/transfers",
          {"transfer_id": uid(), "from": ghost, "to": cid, "amount": 1},
          (404, {"error": "not_found"}))
    first("deposit to unknown account", "/accounts/%s/deposits" % ghost,
          {"command_id": uid(), "amount": 5}, (404, {"error": "not_found"}))
    ck.eq("the unknown account opened", open_account(p, 10, ghost)[0], 201)
    again("transfer from unknown account")
    again("deposit to unknown account")
    ck.eq("balances unchanged by the replayed rejections",
          [request(p, "GET", "/accounts/" + a)[2].get("balance")
           for a in (cid, ghost)], [1200, 10])
    return replays


NIL = "00000000-0000-0000-0000-000000000000"


def hostile_ids(ck, port):
    """Ids a client may send that cannot work (issue 14): the nil id is
    400 on every route; an id of the other aggregate type is 404 (409 for
    an open; a detail on reads); a transfer to an id that is no account is
    refunded; a transfer_id that names an account is 404 and its debit
    refunded; one command id on two accounts is 409.  Returns the reads to repeat after
    a restart, as (what, path, want)."""
    p = port
    a, b, c = uid(), uid(), uid()
    for x in (a, b, c):
        open_account(p, 1000, x)
    t = uid()
    ck.eq("transfer for the hostile ids",
          request(p, "POST", "/transfers", {"transfer_id": t, "from": a,
                                            "to": b, "amount": 100})[0],
          202)
    ck.eq("it completes", wait_transfer(p, t)[1].get("status"), "completed")

    nil_path = (400, {"error": "bad_request",
                      "detail": "the id in the path must not be the nil "
                                "UUID"})
    for method, path in (("GET", "/accounts/" + NIL),
                         ("GET", "/transfers/" + NIL),
                         ("POST", "/accounts/%s/deposits" % NIL),
                         ("POST", "/accounts/%s/withdrawals" % NIL)):
        ck.eq("nil id: %s %s" % (method, path),
              request(p, method, path, {"command_id": uid(),
                                        "amount": 1})[::2], nil_path)
    opening = {"command_id": uid(), "owner": "Ada", "email": "a@b",
               "initial_balance": 1}
    transfer = {"transfer_id": uid(), "from": a, "to": b, "amount": 1}
    for what, path, body, field in (
            ("open", "/accounts", dict(opening, command_id=NIL),
             "command_id"),
            ("open", "/accounts", dict(opening, account_id=NIL),
             "account_id"),
            ("deposit", "/accounts/%s/deposits" % a,
             {"command_id": NIL, "amount": 1}, "command_id"),
            ("withdrawal", "/accounts/%s/withdrawals" % a,
             {"command_id": NIL, "amount": 1}, "command_id"),
            ("transfer", "/transfers", dict(transfer, transfer_id=NIL),
             "transfer_id"),
            ("transfer", "/transfers", dict(transfer, **{"from": NIL}),
             "from"),
            ("transfer", "/transfers", dict(transfer, to=NIL), "to")):
        ck.eq("nil %s of a %s" % (field, what),
              request(p, "POST", path, body)[::2],
              (400, {"error": "bad_request",
                     "detail": "%s must not be the nil UUID" % field}))
    for what, body in (("transfer_id equal to from",
                        dict(transfer, transfer_id=a)),
                       ("transfer_id equal to to",
                        dict(transfer, transfer_id=b))):
        ck.eq(what, request(p, "POST", "/transfers", body)[::2],
              (400, {"error": "bad_request",
                     "detail": "transfer_id must differ from from and to"}))

    reads = [("account id read as a transfer", "/transfers/" + a,
              (404, {"error": "not_found",
                     "detail": "the id names an account, not a transfer"})),
             ("transfer id read as an account", "/accounts/" + t,
              (404, {"error": "not_found",
                     "detail": "the id names a transfer, not an account"}))]
    for what, path, want in reads:
        ck.eq(what, request(p, "GET", path)[::2], want)
    # Commands answer as for an unknown account: the same command may
    # have been answered so before the id became a transfer.
    not_account = (404, {"error": "not_found"})
    for sub in ("deposits", "withdrawals"):
        ck.eq("%s with a transfer id" % sub,
              request(p, "POST", "/accounts/%s/%s" % (t, sub),
                      {"command_id": uid(), "amount": 1})[::2], not_account)
    ck.eq("open with a transfer id",
          request(p, "POST", "/accounts", dict(opening, account_id=t))[::2],
          (409, {"error": "already_exists",
                 "detail": "account_id names a transfer"}))
    ck.eq("transfer from a transfer id",
          request(p, "POST", "/transfers", dict(transfer, **{
              "from": t}))[::2],
          not_account)
    ghost = uid()
    from_ghost = dict(transfer, transfer_id=uid(), **{"from": ghost})
    ck.eq("transfer from an unknown account",
          request(p, "POST", "/transfers", from_ghost)[::2], not_account)
    ck.eq("the unknown account's id becomes a transfer",
          request(p, "POST", "/transfers", dict(
              transfer, transfer_id=ghost, amount=1))[0], 202)
    ck.eq("transfer from an unknown account, resent",
          request(p, "POST", "/transfers", from_ghost)[::2], not_account)
    ck.eq("the transfer under that id completes",
          wait_transfer(p, ghost)[1].get("status"), "completed")
    taken = dict(transfer, transfer_id=c, amount=7)
    want = (404, {"error": "not_found",
                  "detail": "transfer_id names an account, not a "
                            "transfer; the debit is refunded"})
    ck.eq("transfer_id that names an account",
          request(p, "POST", "/transfers", taken)[::2], want)
    ck.eq("transfer_id that names an account, resent",
          request(p, "POST", "/transfers", taken)[::2], want)
    to_t = uid()
    ck.eq("transfer to a transfer id",
          request(p, "POST", "/transfers", dict(
              transfer, transfer_id=to_t, to=t, amount=11))[::2],
          (202, {"transfer_id": to_t, "status": "pending"}))
    ck.eq("transfer to a transfer id refunded",
          wait_transfer(p, to_t)[1].get("status"), "refunded")
    end = time.time() + 30
    while request(p, "GET", "/accounts/" + a)[2].get("balance") != 899 \
            and time.time() < end:
        time.sleep(0.05)
    ck.eq("every debit of a refused transfer refunded",
          [request(p, "GET", "/accounts/" + x)[2].get("balance")
           for x in (a, b, c)], [899, 1101, 1000])

    cid = uid()
    ck.eq("a command id on one account",
          request(p, "POST", "/accounts/%s/deposits" % a,
                  {"command_id": cid, "amount": 5})[0], 200)
    ck.eq("the same command id on another account",
          request(p, "POST", "/accounts/%s/deposits" % b,
                  {"command_id": cid, "amount": 5})[::2],
          (409, {"error": "idempotency_conflict"}))
    return reads


def dead_letters(port):
    """The store's dead letters (other tests may share the database)."""
    _, _, text = request(port, "GET", "/metrics")
    return [float(l.split()[1]) for l in text.splitlines()
            if l.startswith("eventastic_outbox_dead ")]


def garbage(ck, port):
    """Raw bytes no HTTP parser should choke on; the server must live."""
    blobs = [b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
             b"POST /accounts HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
             b"POST /accounts HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
             b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
             b"POST /transfers HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"zz\r\n"]
    for blob in blobs:
        try:
            s = socket.create_connection(("127.0.0.1", port), 2)
            s.sendall(blob)
            s.settimeout(2)
            try:
                s.recv(4096)
            except OSError:
                pass
            s.close()
        except OSError:
            pass
    ck.eq("server alive after garbage", request(port, "GET",
                                                "/healthz")[0], 200)


def wait_transfer(port, tid, seconds=30):
    end = time.time() + seconds
    while True:
        st, _, b = request(port, "GET", "/transfers/" + tid)
        if st != 200 or b.get("status") != "pending" or time.time() > end:
            return st, b
        time.sleep(0.05)


def psql(db_url, sql):
    """Rows of a query, as lists of text fields."""
    env = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")
    out = subprocess.check_output(
        ["psql", db_url, "-X", "-q", "-A", "-t", "-F", "\t", "-v",
         "ON_ERROR_STOP=1", "-c", sql], text=True, timeout=30, env=env)
    return [l.split("\t") for l in out.splitlines() if l]


def fresh_database(db_url, name):
    """A new, empty database next to db_url's (dropped first when it is
    there); its connection string."""
    psql(db_url, "DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
    psql(db_url, "CREATE DATABASE %s" % name)
    if "://" in db_url:
        import urllib.parse
        u = urllib.parse.urlsplit(db_url)
        return urllib.parse.urlunsplit(u._replace(path="/" + name))
    if re.search(r"\bdbname=\S+", db_url):
        return re.sub(r"\bdbname=\S+", "dbname=" + name, db_url)
    return db_url + " dbname=" + name


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def truth(port, db_url, accounts, events):
    """(accounts, sum of the balances read by GET, events): on
    PostgreSQL from every account the database holds and the SQL counts,
    else from the script's accounts and its count of events."""
    if db_url:
        ids = [r[0] for r in psql(db_url, "SELECT DISTINCT aggregate_id "
                                  "FROM events WHERE aggregate_type = "
                                  "'bank_account'")]
        accounts = ids
        events = int(psql(db_url, "SELECT count(*) FROM events")[0][0])
        n = int(psql(db_url, "SELECT count(*) FROM events WHERE "
                     "aggregate_type = 'bank_account' AND kind = 1")[0][0])
    else:
        n = len(accounts)
    total = 0
    for a in accounts:
        st, _, b = request(port, "GET", "/accounts/" + a)
        total += b["balance"] if st == 200 else 0
    return {"accounts": n, "total_balance": total, "events": events}


def nth(statement, i):
    """The i-th movement of a statement's answer, {} when it has none."""
    mv = statement.get("movements") if isinstance(statement, dict) else None
    return mv[i] if isinstance(mv, list) and i < len(mv) else {}


def read_model(ck, port, db_url):
    """GET /stats and the statements after a scripted set of writes, on a
    fresh server (and database): the truth is counted by SQL on
    PostgreSQL, and must equal what the script implies."""
    p = port
    a, b, c, ghost = uid(), uid(), uid(), uid()
    events = 0
    for x, bal in ((a, 1000), (b, 500), (c, 0)):
        ck.eq("views: open", open_account(p, bal, x)[0], 201)
        events += 1
    for path, amount, want in (("/accounts/%s/deposits" % a, 250, 200),
                               ("/accounts/%s/withdrawals" % a, 100, 200),
                               ("/accounts/%s/withdrawals" % a, 5000, 422),
                               ("/accounts/%s/deposits" % b, 40, 200)):
        ck.eq("views: %s" % path[47:], request(p, "POST", path, {
            "command_id": uid(), "amount": amount})[0], want)
        events += want == 200
    transfers = [(uid(), a, b, 300, "completed"),
                 (uid(), b, c, 200, "completed"),
                 (uid(), c, ghost, 50, "refunded")]
    # One after the other: each needs the money of the one before, and
    # the statements' order is then known.
    for tid, src, dst, amount, status in transfers:
        ck.eq("views: transfer", request(p, "POST", "/transfers", {
            "transfer_id": tid, "from": src, "to": dst,
            "amount": amount})[0], 202)
        # debit and credit (or refund) on accounts, the transfer's two
        events += 4
        ck.eq("views: transfer settled", wait_transfer(p, tid)[1].get(
            "status"), status)
    # Quiet: every transfer settled (its last event is its status), and
    # on PostgreSQL the outbox empty and the events standing still.
    if db_url:
        end, last = time.time() + 30, None
        while time.time() < end:
            now = psql(db_url, "SELECT (SELECT count(*) FROM outbox WHERE "
                       "status = 'pending'), (SELECT count(*) FROM events)")
            if now == last and now[0][0] == "0":
                break
            last = now
            time.sleep(0.3)
    quiet = time.time()
    want = truth(p, db_url, [a, b, c], events)
    # a database of its own: SQL and the script agree
    ck.eq("views: the truth is the script's", want,
          {"accounts": 3, "total_balance": 1690, "events": events})
    got = None
    while True:
        st, _, got = request(p, "GET", "/stats")
        if (st, got) == (200, want) or time.time() > quiet + 1.0:
            break
        time.sleep(0.02)
    ck.eq("views: /stats within 1 s of the last write (%.2f s)" % (
        time.time() - quiet), got, want)

    # Statements: newest first, the balance after each movement.
    t1, t2, t3 = (t[0] for t in transfers)
    st, _, body = request(p, "GET", "/accounts/%s/statement" % a)
    ck.eq("views: statement status", st, 200)
    mv = body.get("movements", []) if isinstance(body, dict) else []
    ck.eq("views: statement account", body.get("account_id"), a)
    ck.eq("views: statement of a", [(m["version"], m["kind"], m["amount"],
                                     m["balance"]) for m in mv],
          [(3, "transfer_out", 300, 850), (2, "withdrawal", 100, 1150),
           (1, "deposit", 250, 1250), (0, "opened", 1000, 1000)])
    ck.true("views: times are RFC 3339 UTC", all(
        RFC3339.match(m.get("at", "")) for m in mv), repr(mv[:1]))
    ck.eq("views: a transfer's movement names it", [
        (m.get("transfer_id"), m.get("other")) for m in mv],
        [(t1, b), (None, None), (None, None), (None, None)])
    st, _, body = request(p, "GET", "/accounts/%s/statement?limit=2" % c)
    ck.eq("views: statement of c, limit 2", (st, [
        (m["kind"], m["amount"], m["balance"], m.get("other"))
        for m in body.get("movements", [])]),
        (200, [("refund", 50, 200, ghost), ("transfer_out", 50, 150, ghost)]))
    ck.eq("views: refund names its transfer",
          nth(body, 0).get("transfer_id"), t3)
    st, _, body = request(p, "GET", "/accounts/%s/statement?limit=100" % b)
    ck.eq("views: statement of b", (st, [
        (m["kind"], m["balance"]) for m in body.get("movements", [])]),
        (200, [("transfer_out", 640), ("transfer_in", 840),
               ("deposit", 540), ("opened", 500)]))
    ck.eq("views: b's transfer_in from a", nth(body, 1).get("transfer_id"),
          t1)
    ck.eq("views: b's transfer_out", nth(body, 0).get("other"), c)
    d = uid()
    open_account(p, 7, d)
    st, _, body = request(p, "GET", "/accounts/%s/statement" % d)
    ck.true("views: a just-opened account has a statement", st == 200 and
            body.get("account_id") == d, "%s %r" % (st, body))
    for q in ("limit=0", "limit=101", "limit=abc", "limit=", "limit=1e3",
              "limit=-1", "limit=%2B5", "limit=1&limit=2", "size=5",
              "limit=5&x=1", "&"):
        st, _, body = request(p, "GET", "/accounts/%s/statement?%s" % (a, q))
        ck.true("views: ?%s is 400" % q, st == 400 and
                body.get("error") == "bad_request" and
                isinstance(body.get("detail"), str), "%s %r" % (st, body))
    ck.eq("views: statement of an unknown account",
          request(p, "GET", "/accounts/%s/statement" % uid())[::2],
          (404, {"error": "not_found"}))
    ck.eq("views: statement of a transfer's id",
          request(p, "GET", "/accounts/%s/statement" % t1)[::2],
          (404, {"error": "not_found",
                 "detail": "the id names a transfer, not an account"}))
    ck.eq("views: statement with a bad id",
          request(p, "GET", "/accounts/xyz/statement")[0], 400)
    for path in ("/accounts/%s/statement/x" % a, "/stats/x"):
        ck.eq("views: 404 " + path, request(p, "GET", path)[::2],
              (404, {"error": "not_found"}))
    for method, path in (("POST", "/accounts/%s/statement" % a),
                         ("DELETE", "/stats"), ("POST", "/stats")):
        st, h, body = request(p, method, path, raw=b"{}")
        ck.eq("views: 405 %s %s" % (method, path), (st, body),
              (405, {"error": "method_not_allowed"}))
        ck.eq("views: Allow", h.get("allow"), "GET")
    _, _, text = request(p, "GET", "/metrics")
    for name in ("eventastic_projection_lag_events",
                 "eventastic_projection_lag_seconds",
                 "eventastic_projection_applied_total",
                 "eventastic_projection_failures_total"):
        ck.true("views: metrics has " + name, name +
                '{projection="bank.views"}' in text)
    ck.true("views: the projection is live", 'eventastic_projection_state{'
            'projection="bank.views",state="live"} 1' in text)


def sigterm_under_load(ck, db_url, port):
    """Deposits from 8 threads; SIGTERM in the middle; restart; every
    acknowledged deposit is in the balances."""
    accounts = []
    for _ in range(16):
        aid = uid()
        st = open_account(port, 0, aid)[0]
        ck.eq("open for sigterm", st, 201)
        accounts.append(aid)
    acked = {a: 0 for a in accounts}
    unknown = {a: 0 for a in accounts}
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        conn = None
        n = 0
        while not stop.is_set():
            aid = accounts[(i + n) % len(accounts)]
            n += 1
            amount = 1 + n % 97
            body = json.dumps({"command_id": uid(), "amount": amount})
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port,
                                                      timeout=30)
                conn.request("POST", "/accounts/%s/deposits" % aid, body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                st = r.status
            except (OSError, http.client.HTTPException):
                st = -1
                conn = None
            with lock:
                if st == 200:
                    acked[aid] += amount
                elif st != 422:
                    unknown[aid] += amount
            if st == -1:
                time.sleep(0.01)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    return accounts, acked, unknown, stop, threads


def run(db_url):
    ck = Checker()
    srv = Server(db_url)
    try:
        routes_and_errors(ck, srv.port)
        replays = rejection_replays(ck, srv.port)
        dead = dead_letters(srv.port)
        reads = hostile_ids(ck, srv.port)
        ck.eq("no new dead letter", dead_letters(srv.port), dead)
        garbage(ck, srv.port)
        # The read model on a server and a database of their own: the
        # projection must read every event of its database, and the
        # shared one holds events of the unit tests that bank-server
        # cannot decrypt (they hold a projection at the first of them).
        views_url = fresh_database(db_url, "bank_e2e_views") if db_url \
            else None
        fresh = Server(views_url, log="bank_e2e_views.log")
        try:
            read_model(ck, fresh.port, views_url)
        finally:
            ck.eq("exit status of the read model's server",
                  fresh.stop(signal.SIGTERM), 0)
        if db_url:
            accounts, acked, unknown, stop, threads = sigterm_under_load(
                ck, db_url, srv.port)
            time.sleep(1.5)
            rc = srv.stop(signal.SIGTERM)
            stop.set()
            for t in threads:
                t.join()
            ck.eq("exit status after SIGTERM under load", rc, 0)
            srv = Server(db_url)
            for what, m, path, body, want in replays:
                ck.eq(what + " after a restart",
                      request(srv.port, m, path, body)[::2], want)
            # Nothing resident: the reads meet the stored rows.
            for what, path, want in reads:
                ck.eq(what + " after a restart",
                      request(srv.port, "GET", path)[::2], want)
            total = 0
            for a in accounts:
                st, _, b = request(srv.port, "GET", "/accounts/" + a)
                bal = b.get("balance") if st == 200 else None
                total += acked[a]
                ck.true("acknowledged deposits kept after restart",
                        bal is not None and
                        acked[a] <= bal <= acked[a] + unknown[a],
                        "account %s: balance %r, acknowledged %d, unknown %d"
                        % (a, bal, acked[a], unknown[a]))
            ck.true("deposits acknowledged before SIGTERM", total > 0)
    except Exception as e:  # the server died or answered garbage
        ck.failures.append("exception: %r" % (e,))
    finally:
        rc = srv.stop(signal.SIGTERM)
        ck.eq("exit status after SIGTERM", rc, 0)
    return ck


def main():
    sys.path.insert(0, TESTS)
    if "--memory" in sys.argv:
        ck = run(None)
    else:
        from run import Cluster
        with Cluster() as db:
            ck = run(db.url)
    for f in ck.failures:
        print("FAIL " + f)
    print("%d checks, %d failed" % (ck.checks, len(ck.failures)))
    sys.exit(1 if ck.failures else 0)


if __name__ == "__main__":
    main()
