#!/usr/bin/env python3
"""Security checks of bank-server on PostgreSQL (issue 8).

On a throwaway cluster (build/pg-security) with log_statement = all:

- Parameters, never splicing: requests carry canary values (ids, owner
  names with SQL metacharacters); in the server log, a canary may appear
  only in a parameters DETAIL line, never in the text of a statement.
- Least privilege: the tables are migrated by the owner of the schema; bank-server
  runs as an application role with only SELECT, INSERT, UPDATE, DELETE on
  them.  It serves, delivers its outbox, and may check the migrations;
  the role cannot CREATE, DROP, ALTER or TRUNCATE (SQLSTATE 42501).
- Secrets: the cluster trusts every other role, but the application
  role must give its password (scram-sha-256, by pg_hba.conf), so it is
  really checked: without it or with a wrong one the connection fails
  with an authentication error.  Neither the canary password in the
  connection string nor a wrong one ever appears in the output of
  bank-server (also when the connection fails), nor in the PostgreSQL
  log.

Prints one line per check and a RESULT line; exits 1 when a check fails.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TOP = os.path.dirname(TESTS)
BIN = os.path.join(TOP, "build", "release", "bin")
sys.path.insert(0, HERE)
from faults import Postgres, Server  # noqa: E402
from badinput import raw, post, get  # noqa: E402

failures = []


def check(name, ok, detail=""):
    print("%s %s%s" % ("ok  " if ok else "FAIL", name,
                       ("  " + detail) if detail and not ok else ""))
    sys.stdout.flush()
    if not ok:
        failures.append(name)


def psql_state(url, sql):
    """(returncode, SQLSTATE or None) of one statement."""
    proc = subprocess.run(["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1",
                           "-v", "VERBOSITY=verbose", "-c",
                           "\\set VERBOSITY verbose", "-c", sql],
                          capture_output=True, text=True)
    m = re.search(r"ERROR:\s+([0-9A-Z]{5}):", proc.stderr)
    return proc.returncode, m.group(1) if m else None


def psql_env():
    """psql's environment without a password of the caller's (PGPASSWORD,
    a ~/.pgpass): only the connection string may bring one."""
    env = dict(os.environ, PGPASSFILE=os.path.join(TOP, "build",
                                                   "no-such.pgpass"))
    env.pop("PGPASSWORD", None)
    return env


def connect_error(url):
    """(returncode, stderr) of psql connecting with url."""
    proc = subprocess.run(["psql", url, "-X", "-q", "-c", "SELECT 1"],
                          capture_output=True, text=True, env=psql_env())
    return proc.returncode, proc.stderr.strip()


def require_scram(pg, role):
    """pg_hba.conf: the role authenticates with scram-sha-256 (the rules
    initdb wrote, trust for everyone, stay for the others).  pg_hba.conf
    takes the first matching line, so these go first."""
    hba = os.path.join(pg.data, "pg_hba.conf")
    with open(hba) as f:
        rules = f.read()
    with open(hba, "w") as f:  # rewritten in place: its owner stays
        f.write("# security.py: the application role gives its password\n"
                "local all %s scram-sha-256\n"
                "host all %s 127.0.0.1/32 scram-sha-256\n" % (role, role) +
                rules)
    rows = pg.psql("SELECT pg_reload_conf()")
    bad = pg.psql("SELECT count(*) FROM pg_hba_file_rules "
                  "WHERE error IS NOT NULL")
    used = pg.psql("SELECT auth_method FROM pg_hba_file_rules "
                   "WHERE '%s' = ANY(user_name) ORDER BY line_number" % role)
    return rows is not None and bad == [["0"]] and \
        used == [["scram-sha-256"], ["scram-sha-256"]]


def main():
    pg = Postgres(os.path.join(TOP, "build", "pg-security"))
    subprocess.call([sys.executable, os.path.join(TESTS, "pgcluster.py"),
                     "stop", pg.dir], stdout=subprocess.DEVNULL)
    import shutil
    shutil.rmtree(pg.dir, ignore_errors=True)
    if not pg.start():
        return 2
    pglog = os.path.join(pg.dir, "server.log")
    password = "canary-pw-" + secrets.token_hex(8)
    wrong = "canary-wrong-pw-" + secrets.token_hex(8)
    srv = None
    try:
        check("set up the roles", pg.psql(
            "SET password_encryption = 'scram-sha-256'; "
            "CREATE ROLE bank_owner LOGIN; "
            "CREATE ROLE bank_app LOGIN PASSWORD '%s'; "
            "ALTER SCHEMA public OWNER TO bank_owner; "
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC" % password)
            is not None)
        check("the application role's password is stored as a SCRAM "
              "verifier", pg.psql(
                  "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid "
                  "WHERE rolname = 'bank_app'") == [["t"]])
        check("pg_hba.conf: the application role authenticates with "
              "scram-sha-256", require_scram(pg, "bank_app"))
        check("log every statement", all(pg.psql(sql) is not None for sql in (
            "ALTER SYSTEM SET log_statement = 'all'",
            "ALTER SYSTEM SET log_parameter_max_length = -1",
            "SELECT pg_reload_conf()")))
        owner_url = pg.url.replace("user=postgres", "user=bank_owner")
        app_url = pg.url.replace("user=postgres", "user=bank_app") + \
            " password=" + password
        # The password is checked: none, or a wrong one, is refused.
        rc, err = connect_error(pg.url.replace("user=postgres",
                                               "user=bank_app"))
        check("the application role without a password is refused",
              rc != 0 and "no password supplied" in err, "rc %d: %s" % (
                  rc, err))
        rc, err = connect_error(app_url.replace(password, wrong))
        check("the application role with a wrong password is refused",
              rc != 0 and 'password authentication failed for user '
              '"bank_app"' in err, "rc %d: %s" % (rc, err))
        rc, err = connect_error(app_url)
        check("the application role with its password connects", rc == 0,
              "rc %d: %s" % (rc, err))
        # The owner migrates (bank-server --migrate, then stops).
        mig = Postgres(pg.dir)
        mig.url = owner_url
        s0 = Server("security-migrate", mig)
        ok = s0.start(migrate=True, tries=3)
        s0.term()
        check("the owner role migrates", ok)
        if not ok:
            return 1
        pg.psql("GRANT USAGE ON SCHEMA public TO bank_app; "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN "
                "SCHEMA public TO bank_app")
        # bank-server as the application role, with a password.
        app = Postgres(pg.dir)
        app.url = app_url
        srv = Server("security", app)
        open(srv.logf.name, "w").close()
        check("bank-server starts as the application role",
              srv.start(migrate=True, tries=3))
        canaries = []
        ids = []
        for i in range(3):
            cid, aid = uuid.uuid4(), uuid.uuid4()
            owner = "CanaryOwner%d' OR '1'='1 %s" % (i, secrets.token_hex(4))
            canaries.append(owner)
            ids += [str(cid), str(aid)]
            body = json.dumps({"command_id": str(cid), "account_id": str(aid),
                               "owner": owner, "email": "c%d@x" % i,
                               "initial_balance": 10})
            st, _ = raw(srv.port, post("/accounts", body))
            check("open account %d as the application role" % i, st == 201,
                  "got %s" % st)
            dcid = uuid.uuid4()
            ids.append(str(dcid))
            st, _ = raw(srv.port, post("/accounts/%s/deposits" % aid,
                                       json.dumps({"command_id": str(dcid),
                                                   "amount": 5})))
            check("deposit %d as the application role" % i, st == 200,
                  "got %s" % st)
        tid = uuid.uuid4()
        ids.append(str(tid))
        st, _ = raw(srv.port, post("/transfers", json.dumps(
            {"transfer_id": str(tid), "from": ids[1], "to": ids[4],
             "amount": 3})))
        check("transfer as the application role", st == 202, "got %s" % st)
        end = time.time() + 20
        while time.time() < end:
            st, body = raw(srv.port, get("/transfers/%s" % tid))
            if st == 200 and json.loads(body)["status"] == "completed":
                break
            time.sleep(0.2)
        check("the outbox delivers as the application role",
              st == 200 and json.loads(body)["status"] == "completed",
              "transfer: %s %s" % (st, body[:100]))
        # Least privilege: DDL outside migrations is refused.
        for sql in ["CREATE TABLE public.x (i int)",
                    "DROP TABLE public.events",
                    "ALTER TABLE public.events ADD COLUMN x int",
                    "TRUNCATE public.events",
                    "CREATE SCHEMA other",
                    "CREATE INDEX ON public.events (kind)",
                    "DROP TABLE public.es_migrations",
                    "CREATE ROLE other",
                    "ALTER ROLE bank_app SUPERUSER",
                    "ALTER TABLE public.events OWNER TO bank_app"]:
            rc, state = psql_state(app_url, sql)
            check("application role: %s -> 42501" % sql,
                  rc != 0 and state == "42501", "rc %d, %s" % (rc, state))
        rc = srv.term()
        check("bank-server drains and exits 0", rc == 0, "rc %s" % rc)
        srv = None
        # A failing connection: the message must not show the password.
        bad = Postgres(pg.dir)
        bad.url = app_url.replace("dbname=postgres", "dbname=nosuchdb")
        s2 = Server("security-bad", bad)
        open(s2.logf.name, "w").close()
        started = s2.start(tries=1)
        s2.term()
        out2 = open(s2.logf.name).read()
        check("bank-server refuses a database that does not exist",
              not started and "nosuchdb" in out2, out2[-300:])
        # A wrong password: refused, and neither password is shown.
        s3 = Server("security-wrong-pw", Postgres(pg.dir),
                    app_url.replace(password, wrong))
        open(s3.logf.name, "w").close()
        started = s3.start(tries=1)
        s3.term()
        out3 = open(s3.logf.name).read()
        check("bank-server with a wrong password is refused",
              not started and "authentication failed" in out3, out3[-300:])
        time.sleep(0.5)
        out = open(os.path.join(TOP, "build", "faults-security.log")).read()
        log = open(pglog, errors="replace").read()
        check("the PostgreSQL log shows the wrong password was refused",
              'password authentication failed for user "bank_app"' in log)
        check("the password is not in bank-server's output",
              password not in out + out2 + out3)
        check("the wrong password is not in bank-server's output",
              wrong not in out + out2 + out3)
        check("the password is not in the PostgreSQL log",
              password not in log)
        check("the wrong password is not in the PostgreSQL log",
              wrong not in log)
        # Parameters, never splicing.
        spliced = []
        seen_param = 0
        lines = log.splitlines()
        for i, line in enumerate(lines):
            for c in canaries + ids:
                if c not in line:
                    continue
                if "parameters:" in line:
                    seen_param += 1
                else:
                    spliced.append(line[:200])
        check("log_statement = all: the canaries are sent as parameters",
              seen_param > 0, "no canary seen in any parameters line")
        check("no canary spliced into a statement's text", not spliced,
              "%d lines, e.g. %s" % (len(spliced), spliced[:2]))
        stmts = [l for l in lines if "statement:" in l or "execute " in l]
        check("the log has the server's statements", len(stmts) > 20,
              "%d" % len(stmts))
    finally:
        if srv is not None:
            srv.term()
        pg.stop()
    print("RESULT %d checks failed%s" % (
        len(failures), (": " + ", ".join(failures)) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
