#!/usr/bin/env python3
"""bank_http: deposits through bank-server over HTTP on PostgreSQL.

bank-server (2 workers) on the given database, bank-load with 64
keep-alive connections over 1,000 accounts for 30 s (5 s with --quick),
twice on the same server: first only deposits (unique command ids, no
re-sends), then only reads (GET /accounts/{id}, host queries).  Two
records, bank_http and bank_query: store postgres, clients = connections,
ops_per_s, p50_us, p99_us (bank-load's, client side), peak_rss_kb
(bank-server's VmHWM), and the CPU share of bank-server, of bank-load and
of the cluster's PostgreSQL processes during the load phase (100 = one
core).
tests/run.py --bench runs it; standalone:
  bench/bank_http.py OUT.json DATABASE_URL [--quick] [--pg-dir DIR]
"""

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
BIN = os.path.join(TOP, "build", "release", "bin")
CLIENTS = 64
ACCOUNTS = 1000
TICK = os.sysconf("SC_CLK_TCK")

# The demo's server helpers (tests/system/demo.py).
sys.path.insert(0, os.path.join(TOP, "tests", "system"))
from demo import free_port, wait_listening  # noqa: E402


def cpu_ticks(pid):
    """utime + stime of a process (0 when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def children(ppid):
    """Processes whose parent is ppid (a postmaster's backends)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == ppid:
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return out


def postmaster(pg_dir):
    try:
        with open(os.path.join(pg_dir, "data", "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError, TypeError):
        return None


def pg_ticks(pm, pids):
    """CPU ticks of the postmaster and its children; pids is updated
    with the children seen, so that backends that exit still count up to
    their last sample."""
    for p in children(pm):
        pids.setdefault(p, 0)
    for p in list(pids):
        t = cpu_ticks(p)
        if t > pids[p]:
            pids[p] = t
    return cpu_ticks(pm) + sum(pids.values())


def peak_rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


STAGES = ("queue_wait", "decide", "lane_wait", "batch_write", "batch_commit",
          "hand_back", "total", "query")


def stages(port):
    """The host's latency by stage from bank-server's /metrics (since it
    started): {stage_p50_us: ..., stage_p99_us: ...}, and commands per
    batch."""
    import http.client
    import re
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for st, q, v in re.findall(
            r'eventastic_host_latency_seconds\{stage="(\w+)",'
            r'quantile="(0\.5|0\.99)"\} (\S+)', text):
        if st in STAGES:
            key = "%s_p%s_us" % (st, "50" if q == "0.5" else "99")
            out[key] = round(float(v) * 1e6)
    m = dict(re.findall(r'^(eventastic_host_\w+_total) (\S+)$', text,
                        re.M))
    batches = float(m.get("eventastic_host_batches_total", 0))
    if batches:
        out["commands_per_batch"] = round(
            float(m.get("eventastic_host_batch_items_total", 0)) / batches, 1)
    return out


def one_load(name, mix, port, seconds, server, pm, json_out):
    """One bank-load run against the server: its record, or None."""
    load = subprocess.Popen(
        [os.path.join(BIN, "bank-load"), "--url",
         "http://127.0.0.1:%d" % port, "--clients", str(CLIENTS),
         "--accounts", str(ACCOUNTS), "--duration", str(seconds),
         "--mix", mix, "--retry-ratio", "0", "--seed", "1",
         "--json", json_out], stdout=subprocess.PIPE, text=True)
    t0 = s0 = l0 = p0 = None
    pids = {}
    end_line = None
    for line in load.stdout:
        sys.stdout.write("  " + line)
        # the load phase starts after the accounts are opened
        if t0 is None and "accounts opened" in line:
            t0 = time.time()
            s0, l0 = cpu_ticks(server.pid), cpu_ticks(load.pid)
            p0 = pg_ticks(pm, pids) if pm else None
        # the summary follows the load phase
        if t0 is not None and end_line is None and \
                line.startswith("requests "):
            end_line = time.time()
            s1, l1 = cpu_ticks(server.pid), cpu_ticks(load.pid)
            p1 = pg_ticks(pm, pids) if pm else None
    rc = load.wait()
    rss = peak_rss_kb(server.pid)
    if rc != 0 or t0 is None or end_line is None:
        print("%s: bank-load failed (exit %d)" % (name, rc))
        return None
    with open(json_out) as f:
        res = json.load(f)
    os.unlink(json_out)
    wall = (end_line - t0) * TICK / 100.0
    rec = {
        "name": name, "store": "postgres", "workers": 2,
        "clients": CLIENTS, "keys": ACCOUNTS,
        "ops_per_s": round(res["throughput"]),
        "p50_us": round(res["p50_ms"] * 1000),
        "p99_us": round(res["p99_ms"] * 1000),
        "peak_rss_kb": rss,
        "cpu_host_pct": round((s1 - s0) / wall),
        "cpu_load_pct": round((l1 - l0) / wall),
        "errors": res["requests"] - res["ok"],
    }
    if pm:
        rec["cpu_pg_pct"] = round((p1 - p0) / wall)
    try:
        st = stages(port)
    except OSError as e:
        print("%s: /metrics: %s" % (name, e))
        st = {}
    rec.update(st)
    print("  %s stages p50/p99 us since start: %s; %s commands a batch" % (
        name, "  ".join("%s %s/%s" % (k, st.get(k + "_p50_us", "-"),
                                      st.get(k + "_p99_us", "-"))
                        for k in STAGES), st.get("commands_per_batch", "-")))
    return rec


def run(out_path, db_url, quick=False, pg_dir=None):
    """Returns 0 and writes [record] to out_path, or 1."""
    seconds = 5 if quick else 30
    port = free_port()
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    log = open(os.path.join(TOP, "build", "bench", "bank_http.log"), "w")
    server = subprocess.Popen(
        [os.path.join(BIN, "bank-server"), "--listen",
         "127.0.0.1:%d" % port, "--workers", "2", "--db", db_url,
         "--migrate"], env=env, stdout=log, stderr=log)
    pm = postmaster(pg_dir) if pg_dir else None
    try:
        if not wait_listening(port, server):
            print("bank_http: bank-server did not start (build/bench/"
                  "bank_http.log)")
            return 1
        recs = []
        for name, mix in (("bank_http", "deposit=100"),
                          ("bank_query", "read=100")):
            rec = one_load(name, mix, port, seconds, server, pm,
                           out_path + ".load")
            if rec is None:
                return 1
            recs.append(rec)
        with open(out_path, "w") as f:
            json.dump(recs, f, indent=2)
            f.write("\n")
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    pg_dir = None
    if "--pg-dir" in sys.argv:
        pg_dir = sys.argv[sys.argv.index("--pg-dir") + 1]
        args.remove(pg_dir)
    if len(args) != 2:
        sys.exit(__doc__)
    os.makedirs(os.path.join(TOP, "build", "bench"), exist_ok=True)
    sys.exit(run(args[0], args[1], "--quick" in sys.argv, pg_dir))


if __name__ == "__main__":
    main()
