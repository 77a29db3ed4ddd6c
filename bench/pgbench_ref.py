#!/usr/bin/env python3
"""pgbench_per_command: the yardstick for per_command_pg.

pgbench runs bench/pgbench_per_command.sql (one deposit a transaction,
written by hand, prepared statements) on tables made by the library's own
migrations (schema pgbench_ref), at 8 and 64 clients for 15 s each (3 s
with --quick), over 10,000 accounts.  Records name pgbench_per_command,
clients, ops_per_s, cpu_pg_pct (the cluster's processes, 100 = one core)
and pg_us_per_op (PostgreSQL CPU per command), to compare with bench_pg's
per_command_pg in the same run.  tests/run.py --bench runs it after the
bench_* programs, on their cluster; standalone:
  bench/pgbench_ref.py OUT.json DATABASE_URL PG_DIR [--quick]
"""

import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
TOOL = os.path.join(TOP, "build", "release", "bin", "eventastic")

sys.path.insert(0, HERE)
from bank_http import TICK, pg_ticks, postmaster  # noqa: E402


def run(out_path, db_url, pg_dir, quick=False):
    seconds = 3 if quick else 15
    env = dict(os.environ, DATABASE_URL=db_url)
    subprocess.run(["psql", db_url, "-qc",
                    "DROP SCHEMA IF EXISTS pgbench_ref CASCADE"],
                   env=env, check=True, capture_output=True)
    subprocess.run([TOOL, "--schema", "pgbench_ref", "migrate"], env=env,
                   check=True, capture_output=True)
    pm = postmaster(pg_dir)
    script = os.path.join(HERE, "pgbench_per_command.sql")
    recs = []
    for clients in (8, 64):
        pids = {}
        p0, t0 = pg_ticks(pm, pids), time.time()
        proc = subprocess.Popen(
            ["pgbench", "-n", "-M", "prepared", "-f", script, "-c",
             str(clients), "-j", "2", "-T", str(seconds), db_url],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        # pgbench's backends exit with it: sample them while they run
        p1, t1 = p0, t0
        while proc.poll() is None:
            p1, t1 = pg_ticks(pm, pids), time.time()
            time.sleep(0.1)
        out, errs = proc.communicate()
        m = re.search(r"tps = ([0-9.]+) \(without initial connection",
                      out)
        if proc.returncode != 0 or m is None:
            print("pgbench_per_command: pgbench failed:\n" + out + errs)
            return 1
        tps = float(m.group(1))
        pct = (p1 - p0) * 100.0 / TICK / (t1 - t0)
        rec = {"name": "pgbench_per_command", "store": "postgres",
               "clients": clients, "keys": 10000, "ops_per_s": round(tps),
               "cpu_pg_pct": round(pct),
               "pg_us_per_op": round(pct * 1e4 / tps) if tps else 0}
        print("  pgbench_per_command clients %d: %.0f/s, cpu pg %.0f%%, "
              "%s us of PostgreSQL CPU a command" % (
                  clients, tps, pct, rec["pg_us_per_op"]))
        recs.append(rec)
    with open(out_path, "w") as f:
        json.dump(recs, f, indent=2)
        f.write("\n")
    return 0


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 3:
        print(__doc__)
        return 2
    return run(args[0], args[1], args[2], "--quick" in sys.argv)


if __name__ == "__main__":
    sys.exit(main())
