#!/usr/bin/env python3
"""The bank over HTTP against a model, with Hypothesis' stateful testing.

Rules open accounts, deposit, withdraw, transfer, resend an earlier
request unchanged, and read.  Every id is drawn from pools that hold the
nil id, the accounts and transfers made so far, fresh random ids, and
command ids already used elsewhere, so requests name ids of the other
aggregate type, reuse command ids across aggregates, and so on.

After each step: no 5xx, a resent request answers what it answered the
first time, and the answers the model can tell (400 for nil ids, 404 for
an id of the other type, 409 for a command id reused with other content)
are the ones given.  At the end of each example, once the outbox has
drained: every transfer that got 202 is completed or refunded, no message
became a dead letter, and each account's balance is what the model says
(its opening, deposits, withdrawals and completed transfers).

One bank-server serves a whole run; each example salts its ids, so
examples do not see each other's aggregates.  A failure prints the shrunk
sequence of steps, each with the requests it made and their answers.

    tests/system/bank_model.py [--short | --long] [--memory | --postgresql]
                        [--bin DIR] [--seed N] [--examples N]

Runs on both stores unless one is named (PostgreSQL: DATABASE_URL or a
throwaway cluster under build/).  Needs Hypothesis (Debian's
python3-hypothesis): configure.py picks a python that has it.
"""

import argparse
import os
import sys
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, TESTS)  # run.py

try:
    import hypothesis
    import hypothesis.configuration
    from hypothesis import HealthCheck, note, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (RuleBasedStateMachine, invariant,
                                     precondition, rule,
                                     run_state_machine_as_test)
except ImportError as e:  # fail, never skip: the check would be silent
    print("FAIL bank_model: %s cannot import hypothesis (%s); install "
          "python3-hypothesis and re-run ./configure.py"
          % (sys.executable, e))
    sys.exit(1)

import bank_e2e  # noqa: E402  (Server, request)

# Hypothesis keeps caches beside the build, not in the source tree.
hypothesis.configuration.set_hypothesis_home_dir(
    os.path.join(bank_e2e.TOP, "build", "hypothesis"))

NIL = "00000000-0000-0000-0000-000000000000"
POOLS = ("account", "random", "transfer", "command", "nil")
# An id: which pool, and which member of it.  Shrinks toward the first
# account, then toward fresh ids; the nil id is the last resort.
ids = st.tuples(st.sampled_from(POOLS), st.integers(0, 7))
amounts = st.integers(1, 400)
names = st.text(alphabet="abcdefghij.@", min_size=1, max_size=24)

TAKEN = "transfer_id names an account, not a transfer; the debit is " \
    "refunded"
PORT = None  # the bank-server of this run
COUNT = {"examples": 0, "requests": 0, "settle": 0.0}
# The dead letters when the last example ended (the store's figure: on
# PostgreSQL /metrics is slow, so it is read only when it may change).
DEAD = {"count": 0.0}


class BankModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # Fresh per example, also when Hypothesis replays one: ids of an
        # earlier example never meet this one's.
        self.salt = uuid.uuid4()
        self.balances = {}    # account id -> opened + deposits - withdrawals
        self.transfers = {}   # transfer id -> (from, to, amount), got 202
        # (space, id) -> the request that used it and got a 2xx; space is
        # "command" for command ids, "transfer" for transfer ids (the
        # server derives the transfer's command ids from it).
        self.used = {}
        self.history = []     # (method, path, body, status, answer)
        self.debits = False   # a transfer that may have debited was sent
        COUNT["examples"] += 1

    # ---- ids ----

    def pick(self, which):
        pool, i = which
        members = {"account": list(self.balances),
                   "transfer": list(self.transfers),
                   "command": [id_ for space, id_ in self.used
                               if space == "command"]}.get(pool)
        if pool == "nil":
            return NIL
        if members:
            return members[i % len(members)]
        return str(uuid.uuid5(self.salt, "%s-%d" % (pool, i)))

    def kind(self, id_):
        if id_ == NIL:
            return "nil"
        if id_ in self.balances:
            return "account"
        if id_ in self.transfers:
            return "transfer"
        return "other"

    # ---- requests ----

    def send(self, method, path, body=None):
        st_, _, answer = bank_e2e.request(PORT, method, path, body)
        COUNT["requests"] += 1
        note("%s %s %s -> %d %s" % (method, path, body or "", st_, answer))
        assert st_ < 500, "server error %d for %s %s %s: %s" % (
            st_, method, path, body, answer)
        return st_, answer

    def other_type(self, path, body):
        """Whether a command names an aggregate of the other type (an
        account id that is a transfer, ...): the host answers that before
        it looks at the command id, so a 404 (409 already_exists for an
        open) may come where a reused id would be 409."""
        if path == "/transfers":
            return self.kind(body["from"]) == "transfer" or \
                self.kind(body["transfer_id"]) == "account"
        if path == "/accounts":
            return self.kind(body.get("account_id")) == "transfer"
        return self.kind(path.split("/")[2]) == "transfer"

    def post(self, path, body, valid):
        """A command: checks replays and reused ids, records.  valid: the
        request passes parsing (no nil id, ...).  Returns (status, answer,
        whether it was sent before)."""
        key = ("transfer", body["transfer_id"]) if path == "/transfers" \
            else ("command", body["command_id"])
        earlier = [h for h in self.history if h[1] == path and h[2] == body]
        status, answer = self.send("POST", path, body)
        other_type = self.other_type(path, body)
        wrong_type = [(409, {"error": "already_exists",
                             "detail": "account_id names a transfer"}),
                      (404, {"error": "not_found"}),
                      (404, {"error": "not_found", "detail": TAKEN})]
        if earlier and earlier[0][3:] == (409, {
                "error": "idempotency_conflict"}) and other_type:
            # Refused for its command id; since then its aggregate's id
            # was taken by the other type, which is checked first.
            assert (status, answer) in [earlier[0][3:]] + wrong_type, (
                "a resent request answered %d %s, first %d %s"
                % ((status, answer) + earlier[0][3:]))
            return status, answer, True
        if earlier:
            assert (status, answer) == earlier[0][3:], (
                "a resent request answered %d %s, first %d %s"
                % ((status, answer) + earlier[0][3:]))
            return status, answer, True
        first = self.used.get(key)
        if first is not None and valid:
            assert (status, answer.get("error")) in (
                (409, "idempotency_conflict"),
                (409, "already_exists") if other_type else None,
                (404, "not_found") if other_type else None), (
                    "%s id %s of %s %s reused by %s %s: got %d %s"
                    % (key + first + (path, body, status, answer)))
        self.history.append(("POST", path, body, status, answer))
        if 200 <= status < 300:
            self.used[key] = (path, body)
        return status, answer, False

    # ---- rules ----

    @rule(account=ids, command=ids, balance=st.integers(0, 1000),
          owner=names, email=names, given=st.booleans())
    def open_account(self, account, command, balance, owner, email, given):
        cid = self.pick(command)
        body = {"command_id": cid, "owner": owner, "email": email,
                "initial_balance": balance}
        aid = self.pick(account)
        if given:
            body["account_id"] = aid
        kind = self.kind(aid) if given else "other"
        valid = cid != NIL and not (given and aid == NIL)
        status, answer, replay = self.post("/accounts", body, valid)
        if cid == NIL or kind == "nil":
            assert status == 400, (status, answer)
        elif kind in ("account", "transfer") and not replay:
            assert status == 409, (status, answer)
        if status == 201 and not replay:
            new = answer["account_id"]
            assert self.kind(new) == "other", (
                "opened %s, already a %s" % (new, self.kind(new)))
            self.balances[new] = balance

    def change(self, sub, account, command, amount):
        aid = self.pick(account)
        cid = self.pick(command)
        body = {"command_id": cid, "amount": amount}
        kind = self.kind(aid)
        status, answer, replay = self.post(
            "/accounts/%s/%s" % (aid, sub), body, NIL not in (aid, cid))
        if cid == NIL or kind == "nil":
            assert status == 400, (status, answer)
        elif replay or status == 409:
            pass
        elif kind == "account":
            assert status in ((200,) if sub == "deposits" else (200, 422)), \
                (status, answer)
        elif kind == "transfer":
            assert status == 404, (status, answer)
        if status == 200 and not replay:
            self.balances[aid] += amount if sub == "deposits" else -amount
        return status

    @rule(account=ids, command=ids, amount=amounts)
    def deposit(self, account, command, amount):
        self.change("deposits", account, command, amount)

    @rule(account=ids, command=ids, amount=amounts)
    def withdraw(self, account, command, amount):
        self.change("withdrawals", account, command, amount)

    @rule(transfer=ids, source=ids, dest=ids, amount=amounts)
    def transfer(self, transfer, source, dest, amount):
        tid, src, dst = (self.pick(transfer), self.pick(source),
                         self.pick(dest))
        body = {"transfer_id": tid, "from": src, "to": dst,
                "amount": amount}
        bad = NIL in (tid, src, dst) or src == dst or tid in (src, dst)
        self.debits |= not bad
        status, answer, replay = self.post("/transfers", body, not bad)
        if bad:
            assert status == 400, (status, answer)
        elif replay or status == 409:
            pass
        elif self.kind(src) != "account":
            assert status == 404, (status, answer)
        elif self.kind(tid) == "account":
            assert status in (404, 422), (status, answer)
        else:
            assert status in (202, 422), (status, answer)
        if status == 202 and not replay:
            assert self.kind(tid) == "other", (
                "transfer %s accepted, already a %s" % (tid, self.kind(tid)))
            self.transfers[tid] = (src, dst, amount)

    @precondition(lambda self: self.history)
    @rule(i=st.integers(0, 63))
    def resend(self, i):
        _, path, body, _, _ = self.history[i % len(self.history)]
        self.post(path, body, False)

    @rule(which=ids, transfer=st.booleans())
    def read(self, which, transfer):
        id_ = self.pick(which)
        status, answer = self.send(
            "GET", "/%s/%s" % ("transfers" if transfer else "accounts", id_))
        kind = self.kind(id_)
        if kind == "nil":
            assert status == 400, (status, answer)
        elif kind == ("transfer" if transfer else "account"):
            assert status == 200, (status, answer)
        elif kind != "other":
            assert status == 404, (status, answer)

    @invariant()
    def types_apart(self):
        both = set(self.balances) & set(self.transfers)
        assert not both, "ids both account and transfer: %s" % both

    # ---- the end of an example ----

    def teardown(self):
        try:
            self.settle()
        finally:
            super().teardown()

    def settle(self):
        t0 = time.time()
        try:
            self.settle_()
        finally:
            COUNT["settle"] += time.time() - t0

    def settle_(self):
        # Until every transfer settled and the outbox is empty (refunds
        # of a transfer_id that names an account leave no transfer to
        # wait for); a transfer still pending a second after the outbox
        # emptied never will be.
        end = time.time() + 20
        drained = outbox = None
        status = {}
        while True:
            for tid in self.transfers:
                if status.get(tid) in (None, "pending"):
                    st_, _, b = bank_e2e.request(PORT, "GET",
                                                 "/transfers/" + tid)
                    status[tid] = b.get("status") if st_ == 200 else st_
            now = time.time()
            pending = "pending" in status.values()
            if not pending and not self.debits or now > end:
                break
            outbox = metric("eventastic_outbox_pending",
                            "eventastic_outbox_dead")
            if outbox is None or outbox[0] != 0:
                drained = None
            elif not pending or drained is not None and now - drained > 1:
                break
            elif drained is None:
                drained = now
            time.sleep(0.05)
        for tid, s in status.items():
            note("transfer %s %s: %s" % (tid, self.transfers[tid], s))
        unsettled = {t: s for t, s in status.items()
                     if s not in ("completed", "refunded")}
        assert not unsettled, "transfers not settled: %s" % unsettled
        if self.debits:
            dead = outbox[1] - DEAD["count"] if outbox else None
            DEAD["count"] = outbox[1] if outbox else DEAD["count"]
            assert dead == 0, "%s new dead letters" % dead
        want = dict(self.balances)
        for tid, (src, dst, amount) in self.transfers.items():
            if status[tid] == "completed":
                want[src] -= amount
                want[dst] += amount
        got = {}
        for aid in want:
            st_, _, b = bank_e2e.request(PORT, "GET", "/accounts/" + aid)
            got[aid] = b.get("balance") if st_ == 200 else st_
        note("balances: got %s, want %s" % (got, want))
        assert got == want, "balances differ from the model"


def metric(*names):
    """The values of these gauges of /metrics, or None."""
    st_, _, text = bank_e2e.request(PORT, "GET", "/metrics")
    if st_ != 200 or not isinstance(text, str):
        return None
    got = {}
    for line in text.splitlines():
        if line.split(" ")[0] in names:
            got[line.split()[0]] = float(line.split()[1])
    return tuple(got.get(n) for n in names)


def run(db_url, examples, steps, seed, bin_dir):
    """One bank-server on a store; True when every example passed."""
    global PORT
    name = "bank_model/%s" % ("postgresql" if db_url else "memory")
    t0 = time.time()
    srv = bank_e2e.Server(db_url, bin_dir=bin_dir, log="bank_model.log")
    PORT = srv.port
    COUNT.update(examples=0, requests=0)
    DEAD["count"] = (metric("eventastic_outbox_dead") or (0,))[0] or 0
    ok = False
    try:
        conf = settings(max_examples=examples, stateful_step_count=steps,
                        deadline=None, database=None, print_blob=True,
                        suppress_health_check=list(HealthCheck))
        print("%s: seed %d, %d examples of up to %d steps"
              % (name, seed, examples, steps), flush=True)
        # What pytest's --hypothesis-seed sets: the run can be repeated.
        hypothesis.core.global_force_seed = seed
        run_state_machine_as_test(BankModel, settings=conf)
        ok = True
    except Exception as e:
        # Hypothesis puts the shrunk steps in the exceptions' notes.
        for f in getattr(e, "exceptions", [e]):
            print("".join(traceback.format_exception(f)).rstrip())
        print("FAIL %s: %s" % (name, e))
    finally:
        rc = srv.stop()
        if rc != 0:
            print("FAIL %s: bank-server exited with %d" % (name, rc))
            ok = False
    if ok:
        print("ok   %-40s %.1fs %d examples, %d requests, %.1fs settling"
              % (name, time.time() - t0, COUNT["examples"],
                 COUNT["requests"], COUNT["settle"]), flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true",
                    help="a short run (ninja check)")
    ap.add_argument("--long", action="store_true",
                    help="a long run (ninja check-faults)")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--postgresql", action="store_true")
    ap.add_argument("--bin", default=bank_e2e.BIN,
                    help="where bank-server is")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--examples", type=int, default=None)
    a = ap.parse_args()
    examples, steps = (500, 50) if a.long else (120, 30)
    examples = a.examples or examples
    seed = a.seed if a.seed is not None else int(time.time()) % 1000000
    stores = [None, "pg"]
    if a.memory != a.postgresql:
        stores = [None] if a.memory else ["pg"]
    ok = True
    for store in stores:
        if store is None:
            ok &= run(None, examples, steps, seed, a.bin)
            continue
        from run import Cluster
        with Cluster("pg-bank-model") as db:
            ok &= run(db.url, examples, steps, seed, a.bin)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
