#!/usr/bin/env python3
"""Runs eventastic's test suites; called by ninja test / check / demo.

Unit tests need no database.  Tests named test_pg_* get a throwaway
PostgreSQL (tests/pgcluster.py) under build/, or DATABASE_URL when set; the
cluster is stopped when the run ends, also when it fails.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
SYSTEM = os.path.join(HERE, "system")  # the python system tests
sys.path.insert(1, SYSTEM)  # demo, bank_e2e: imported by the bank checks
BUILD = os.path.join(TOP, "build")

SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}


class Cluster:
    """The database for the PostgreSQL tests: DATABASE_URL or our own."""

    def __init__(self, name="pg", extra=()):
        self.url = os.environ.get("DATABASE_URL")
        self.dir = None
        self.name = name
        self.extra = list(extra)

    def __enter__(self):
        if not self.url:
            self.dir = os.path.join(BUILD, self.name)
            out = subprocess.check_output(
                [sys.executable, os.path.join(HERE, "pgcluster.py"), "start",
                 self.dir] + self.extra, text=True)
            self.url = out.strip().splitlines()[-1]
        return self

    def env(self):
        """For a test binary: DATABASE_URL, and when the cluster is ours,
        where it is and the tool that restarts it (ES_PG_CLUSTER_DIR,
        ES_PG_CLUSTER_TOOL), so a test may restart PostgreSQL."""
        e = {"DATABASE_URL": self.url}
        if self.dir:
            e["ES_PG_CLUSTER_DIR"] = self.dir
            e["ES_PG_CLUSTER_TOOL"] = os.path.join(HERE, "pgcluster.py")
        return e

    def __exit__(self, *exc):
        if self.dir:
            subprocess.call([sys.executable, os.path.join(HERE,
                                                          "pgcluster.py"),
                             "stop", self.dir])
        return False


# Variables that narrow or reshape what a test program runs: a run of the
# suites runs all of it, so they are cleared (and said so).  HOST_TEST
# filters test_host to a pattern, HOST_OOM_EVERY changes how often
# test_host_oom's allocator fails (0: never), CMOCKA_MESSAGE_OUTPUT and
# CMOCKA_XML_FILE move cmocka's report away from the output read here.
NARROWING = ("HOST_TEST", "HOST_OOM_EVERY", "CMOCKA_MESSAGE_OUTPUT",
             "CMOCKA_XML_FILE")

# A skipped test fails the run unless it is allowed here: a comma-separated
# list of patterns (fnmatch) of test names, program names or program/test,
# e.g. ES_TEST_ALLOW_SKIP='test_pg_restart'.  An allowed skip is still
# listed, with the reason the test printed.
ALLOW_SKIP = "ES_TEST_ALLOW_SKIP"


def clear_narrowing():
    for k in NARROWING:
        if k in os.environ:
            print("note: %s=%s cleared: every test runs" % (
                k, os.environ.pop(k)))


class Ledger:
    """What should run and what did.  Every program is planned before the
    run and recorded after it, so a program that is missing or never ran
    fails the run instead of shrinking the total; skipped tests are
    counted and fail it unless allowed (ALLOW_SKIP)."""

    def __init__(self):
        self.planned = []
        self.results = {}        # name -> passed
        self.skipped = []        # (program, test, allowed)
        self.allow = [p.strip() for p in
                      os.environ.get(ALLOW_SKIP, "").split(",") if p.strip()]

    def plan(self, name):
        if name not in self.planned:
            self.planned.append(name)

    def record(self, name, ok):
        self.plan(name)
        self.results[name] = bool(ok) and self.results.get(name, True)
        return bool(ok)

    def allowed(self, program, test):
        import fnmatch
        return any(fnmatch.fnmatchcase(x, p) for p in self.allow
                   for x in (test, program, "%s/%s" % (program, test)))

    def finish(self):
        """Prints the verdict; True when the run passed."""
        never = [n for n in self.planned if n not in self.results]
        for n in never:
            print("FAIL %-40s (planned, never ran)" % n)
        failed = [n for n in self.planned if self.results.get(n) is False]
        print("%d of %d test programs passed" % (
            len(self.planned) - len(failed) - len(never), len(self.planned)))
        ok = not failed and not never
        if self.skipped:
            bad = ["%s/%s" % s[:2] for s in self.skipped if not s[2]]
            print("%d tests skipped, %d of them allowed by %s=%r" % (
                len(self.skipped), len(self.skipped) - len(bad), ALLOW_SKIP,
                os.environ.get(ALLOW_SKIP, "")))
            if bad:
                print("FAIL a skipped test is a failure unless %s names "
                      "it: %s" % (ALLOW_SKIP, ", ".join(bad[:10])))
                if os.environ.get("DATABASE_URL"):
                    print("     (DATABASE_URL is set: some tests need "
                          "the runner's own cluster; unset it, or allow "
                          "their skips)")
                ok = False
        return ok


LEDGER = Ledger()


def cmocka_report(out):
    """([tests run, per group], [skipped test names]) from the output of a
    cmocka program (stdout and stderr together)."""
    runs = [int(m) for m in re.findall(r"^\[=+\] (\d+) test\(s\) run\.",
                                       out, re.M)]
    skipped = []
    for m in re.finditer(r"^\[  SKIPPED \] (.+)$", out, re.M):
        name = m.group(1).strip()
        if not re.match(r"\d+ test\(s\), listed below:", name) and \
                name not in skipped:
            skipped.append(name)
    return runs, skipped


def run_binary(path, variant, env_extra=None, cmocka=True):
    """One program; it must exit 0.  cmocka=True (a tests/*/test_*.c): it
    must also report at least one test in every group it runs, and each
    skipped test is listed and counted (cmocka exits 0 on a skip)."""
    name = "%s/%s" % (variant, os.path.basename(path))
    if not os.access(path, os.X_OK):
        print("FAIL %-40s (not built: %s)" % (name,
                                              os.path.relpath(path, TOP)))
        return LEDGER.record(name, False)
    env = dict(os.environ, **SAN_ENV)
    for k in NARROWING:
        env.pop(k, None)
    if cmocka:
        env["CMOCKA_MESSAGE_OUTPUT"] = "STDOUT"
    if env_extra:
        env.update(env_extra)
    cmd = [path]
    if variant == "tsan":
        # tsan needs the classic address-space layout on newer kernels.
        cmd = ["setarch", "-R"] + cmd
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    dt = time.time() - t0
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        print("FAIL %-40s (exit %d, %.1fs)" % (name, proc.returncode, dt))
        return LEDGER.record(name, False)
    if not cmocka:
        print("ok   %-40s %.1fs" % (name, dt))
        return LEDGER.record(name, True)
    runs, skipped = cmocka_report(proc.stdout)
    if not runs or min(runs) == 0:
        sys.stdout.write(proc.stdout)
        print("FAIL %-40s (exit 0, but %s)" % (
            name, "no cmocka report" if not runs else "a group ran 0 tests"))
        return LEDGER.record(name, False)
    summary = "%d tests passed" % (sum(runs) - len(skipped))
    if not skipped:
        print("ok   %-40s %.1fs %s" % (name, dt, summary))
        return LEDGER.record(name, True)
    prog = os.path.basename(path)
    allowed = [LEDGER.allowed(prog, t) for t in skipped]
    LEDGER.skipped += [(prog, t, a) for t, a in zip(skipped, allowed)]
    print("%s %-40s %.1fs %s, %d SKIPPED%s" % (
        "ok  " if all(allowed) else "FAIL", name, dt, summary, len(skipped),
        "" if all(allowed) else " (not allowed)"))
    for t, a in zip(skipped, allowed):
        print("     skipped: %s%s" % (t, " (allowed by %s)" % ALLOW_SKIP
                                      if a else ""))
    why = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "skipped" in line.lower() and not line.startswith("[") and \
                not re.match(r"\d+ SKIPPED TEST", line) and line not in why:
            why.append(line)
            print("     " + line)
    return LEDGER.record(name, all(allowed))


def expected_programs(variant):
    """The programs configure.py builds from the sources, as (path, is a
    cmocka test, needs PostgreSQL): tests/unit/test_*.c, tests/pg/test_*.c
    (all need it), tests/cxx/*.cpp (as test_cxx_*) and examples/*.c.
    Taken from the sources, not from build/: a program that was not built
    fails the run, it does not drop out of it."""
    b = os.path.join(BUILD, variant)
    out = []
    for group, pg in (("unit", False), ("pg", True)):
        for src in sorted(glob.glob(os.path.join(HERE, group, "test_*.c"))):
            name = os.path.basename(src)[:-2]
            out.append((os.path.join(b, "tests", name), True, pg))
    for src in sorted(glob.glob(os.path.join(HERE, "cxx", "*.cpp"))):
        name = "test_cxx_" + os.path.basename(src)[:-4]
        out.append((os.path.join(b, "tests", name), False, False))
    for src in sorted(glob.glob(os.path.join(TOP, "examples", "*.c"))):
        name = os.path.basename(src)[:-2]
        out.append((os.path.join(b, "bin", name), False, False))
    return out


def compile_fail_tests():
    """Each tests/compile_fail/*.c must fail to compile with the diagnostic
    its first line names (`// expect: REGEX`); each ok_*.c must compile, so
    a broken harness cannot pass."""
    ok = True
    cc = os.environ.get("CC", "cc")
    for src in sorted(glob.glob(os.path.join(HERE, "compile_fail", "*.c"))):
        first = open(src).readline()
        m = re.match(r"//\s*expect:\s*(.*)", first)
        cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror",
               "-Wswitch-enum", "-I", os.path.join(TOP, "include"),
               "-I", os.path.join(TOP, "tests"), "-fsyntax-only", src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        name = os.path.basename(src)
        if name.startswith("ok_"):
            good = proc.returncode == 0
            why = proc.stderr.strip()
        elif m is None:
            good, why = False, "no '// expect:' line"
        else:
            good = proc.returncode != 0 and re.search(m.group(1), proc.stderr)
            why = "expected /%s/, got: %s" % (m.group(1),
                                              proc.stderr.strip()[:400])
        print("%s compile-fail/%s" % ("ok  " if good else "FAIL", name))
        if not good:
            print("     " + why)
            ok = False
    return ok


def run_each_benchmark(quick, out_dir, records, db_url, only=None):
    import json
    failed = 0
    for exe in sorted(glob.glob(os.path.join(BUILD, "release", "bench",
                                             "bench_*"))):
        if not os.access(exe, os.X_OK) or exe.endswith(".d"):
            continue
        name = os.path.basename(exe)
        if only and name not in only:
            continue
        out = os.path.join(out_dir, name + ".json")
        print("BENCH %s" % name, flush=True)
        cmd = [exe, out] + (["--quick"] if quick else [])
        if subprocess.call(cmd, env=dict(os.environ,
                                         DATABASE_URL=db_url)) != 0:
            print("FAIL %s" % name)
            failed += 1
            continue
        with open(out) as f:
            records += json.load(f)
    return failed


def write_chart(records, path):
    """An SVG of ops/s and p99 against clients for host_pg and
    per_command_pg (log scales), next to results.json."""
    import math
    series = {}
    for r in records:
        if r.get("name") in ("host_pg", "per_command_pg"):
            series.setdefault(r["name"], []).append(
                (r["clients"], r["ops_per_s"], r["p99_us"] / 1000.0))
    if not series:
        return
    colors = {"host_pg": "#1f77b4", "per_command_pg": "#d62728"}
    w, h, pad = 420, 300, 50
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="11">' % (2 * w, h + 30)]

    def panel(x0, idx, title, unit):
        vals = [p[idx] for pts in series.values() for p in pts if p[idx] > 0]
        lo = 10 ** math.floor(math.log10(min(vals)))
        hi = 10 ** math.ceil(math.log10(max(vals)))
        cl = [p[0] for pts in series.values() for p in pts]
        cmin, cmax = min(cl), max(cl)

        def X(c):
            return x0 + pad + (w - 2 * pad) * (
                math.log(c / cmin) / math.log(cmax / cmin) if cmax > cmin
                else 0)

        def Y(v):
            return h - pad + 20 - (h - 2 * pad) * (
                math.log(max(v, lo) / lo) / math.log(hi / lo))
        out.append('<text x="%d" y="15">%s (%s, log) against clients</text>'
                   % (x0 + pad, title, unit))
        out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" '
                   'stroke="#999"/>' % (x0 + pad, pad - 30 + 20, w - 2 * pad,
                                        h - 2 * pad + 30))
        e = lo
        while e <= hi:
            out.append('<text x="%d" y="%.0f" text-anchor="end">%g</text>'
                       % (x0 + pad - 4, Y(e) + 4, e))
            e *= 10
        for c in sorted(set(cl)):
            out.append('<text x="%.0f" y="%d" text-anchor="middle">%d</text>'
                       % (X(c), h + 5, c))
        for name, pts in series.items():
            pts = sorted(pts)
            out.append('<polyline fill="none" stroke="%s" stroke-width="2" '
                       'points="%s"/>' % (colors[name], " ".join(
                           "%.1f,%.1f" % (X(p[0]), Y(p[idx])) for p in pts)))
            for p in pts:
                out.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>'
                           % (X(p[0]), Y(p[idx]), colors[name]))
    panel(0, 1, "committed commands/s", "ops/s")
    panel(w, 2, "p99 latency", "ms")
    y = h + 22
    for i, name in enumerate(sorted(series)):
        out.append('<text x="%d" y="%d" fill="%s">%s</text>'
                   % (pad + i * 160, y, colors[name], name))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def run_benchmarks(quick, only=None):
    """Runs build/release/bench/bench_* and bench/bank_http.py (only those
    named in `only`, when given); each writes a JSON array to
    build/bench/<name>.json; they are merged into build/bench/results.json
    (with `only`, the records of the others are kept from the last one)
    and shown as a table, and the PostgreSQL records are drawn in
    build/bench/host_pg.svg.  Benchmarks are not tests: they run one at a
    time, outside the test run."""
    import json
    out_dir = os.path.join(BUILD, "bench")
    os.makedirs(out_dir, exist_ok=True)
    records = []
    failed = 0
    results = os.path.join(out_dir, "results.json")
    if only and os.path.exists(results):
        with open(results) as f:
            kept = json.load(f)
        ran = set()
        for name in only:
            out = os.path.join(out_dir, name + ".json")
            if os.path.exists(out):
                with open(out) as f:
                    ran |= {r.get("name") for r in json.load(f)}
        ran |= set(only)
        records = [r for r in kept if r.get("name") not in ran]
    # bench_pg: its own throwaway cluster, with room for a connection per
    # client thread of per_command_pg (256).
    if not only or any(n.startswith("bench_") for n in only):
        with Cluster("pg-bench", ["--max-connections", "300"]) as db:
            failed = run_each_benchmark(quick, out_dir, records, db.url,
                                        only)
            # per_command_pg's yardstick, on the same cluster
            if not only or "bench_pg" in only:
                sys.path.insert(0, os.path.join(TOP, "bench"))
                import pgbench_ref
                print("BENCH pgbench_per_command", flush=True)
                out = os.path.join(out_dir, "pgbench_ref.json")
                if pgbench_ref.run(out, db.url, db.dir, quick) != 0:
                    print("FAIL pgbench_per_command")
                    failed += 1
                else:
                    with open(out) as f:
                        records += json.load(f)
    # bank_http: bank-server and bank-load on a cluster of its own (the
    # tables bench_pg left behind would not change it, a fresh one is
    # simpler to reason about).
    if not only or "bank_http" in only:
        sys.path.insert(0, os.path.join(TOP, "bench"))
        import bank_http
        print("BENCH bank_http", flush=True)
        with Cluster("pg-bank-bench") as db:
            out = os.path.join(out_dir, "bank_http.json")
            if bank_http.run(out, db.url, quick, db.dir) != 0:
                print("FAIL bank_http")
                failed += 1
            else:
                with open(out) as f:
                    records += json.load(f)
    with open(results, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")
    cols = ["name", "workers", "clients", "keys", "ops_per_s", "p50_us",
            "p99_us", "peak_rss_kb", "bytes_per_aggregate", "cpu_host_pct",
            "cpu_pg_pct", "events_per_s", "cpu_load_pct", "phase", "window",
            "events_in_store", "lag_p99_ms", "pg_us_per_op"]
    print(" ".join("%-16s" % c if i == 0 else "%12s" % c
                   for i, c in enumerate(cols)))
    for r in records:
        print(" ".join("%-16s" % r.get(c, "") if i == 0 else
                       "%12s" % r.get(c, "") for i, c in enumerate(cols)))
    write_chart(records, os.path.join(out_dir, "host_pg.svg"))
    print("wrote %s" % os.path.join(out_dir, "results.json"))
    return 1 if failed else 0


def install_test():
    """Install the release build into a staging DESTDIR, build a program
    outside the tree with pkg-config, run it against the shared library,
    check that only es_* symbols are exported, then uninstall."""
    import shutil
    import tempfile
    stage = os.path.join(BUILD, "stage")
    shutil.rmtree(stage, ignore_errors=True)
    prefix = "/usr/local"
    env = dict(os.environ, DESTDIR=stage)
    tools = os.path.join(TOP, "tools", "install.py")
    subprocess.check_call([sys.executable, tools, "install", "--prefix",
                           prefix], env=env, stdout=subprocess.DEVNULL)
    root = stage + prefix
    pcenv = dict(os.environ, PKG_CONFIG_SYSROOT_DIR=stage,
                 PKG_CONFIG_PATH=os.path.join(root, "lib", "pkgconfig"))
    flags = subprocess.check_output(["pkg-config", "--cflags", "--libs",
                                     "eventastic"], env=pcenv,
                                    text=True).split()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "hello.c")
        shutil.copy(os.path.join(HERE, "install", "hello.c"), src)
        exe = os.path.join(tmp, "hello")
        subprocess.check_call(["cc", "-std=c11", "-Wall", "-Werror", src,
                               "-o", exe] + flags)
        out = subprocess.run([exe], env=dict(
            os.environ, LD_LIBRARY_PATH=os.path.join(root, "lib")),
            capture_output=True, text=True)
        libs = subprocess.check_output(["ldd", exe], env=dict(
            os.environ, LD_LIBRARY_PATH=os.path.join(root, "lib")),
            text=True)
        ok = out.returncode == 0 and os.path.join(root, "lib") in libs
        print("%s install/pkg-config/shared: %s" % (
            "ok  " if ok else "FAIL", out.stdout.strip() or out.stderr))
    so = os.path.join(root, "lib", "libeventastic.so")
    syms = subprocess.check_output(["nm", "-D", "--defined-only", so],
                                   text=True).split("\n")
    leaked = [l.split()[-1] for l in syms if l.strip()
              and not l.split()[-1].startswith("es_")]
    if leaked:
        print("FAIL exported symbols without es_ prefix: %s" % leaked[:10])
        ok = False
    subprocess.check_call([sys.executable, tools, "uninstall", "--prefix",
                           prefix], env=env, stdout=subprocess.DEVNULL)
    left = [os.path.join(d, f) for d, _, fs in os.walk(stage) for f in fs]
    if left:
        print("FAIL uninstall left %s" % left[:5])
        ok = False
    shutil.rmtree(stage, ignore_errors=True)
    return ok


def captured(fn, *args):
    """fn(*args) with file descriptors 1 and 2 sent to a temporary file, so
    that the output of the processes it starts is caught too; returns
    (its result, the text)."""
    import tempfile
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(1), os.dup(2)
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        tmp.seek(0)
        return result, tmp.read().decode("utf-8", "replace")


def bank_check(db_url):
    """The bank under a short load, on the memory store or PostgreSQL:
    bank-load's checker must print its RESULT line with OK (no money
    created, lost or moved twice), and the server must drain and exit 0
    on SIGTERM."""
    import demo
    import types
    args = types.SimpleNamespace(seconds=3, clients=16, accounts=200,
                                 workers=2, seed=int(time.time()) % 100000)
    t0 = time.time()
    rc, out = captured(demo.run, db_url, args)
    name = "bank/%s" % ("postgresql" if db_url else "memory")
    result = [l for l in out.splitlines() if l.startswith("RESULT")]
    if rc != 0 or len(result) != 1 or "OK" not in result[0]:
        sys.stdout.write(out)
        print("FAIL %-40s (exit %d, %s)" % (
            name, rc, result[0] if result else "no RESULT line"))
        return LEDGER.record(name, False)
    print("ok   %-40s %.1fs %s" % (name, time.time() - t0,
                                   " ".join(result[0].split())))
    return LEDGER.record(name, True)


def bank_e2e(db_url):
    """The bank's HTTP API end to end (tests/system/bank_e2e.py)."""
    import bank_e2e as e2e
    t0 = time.time()
    ck = e2e.run(db_url)
    name = "bank_e2e/%s" % ("postgresql" if db_url else "memory")
    if ck.failures or ck.checks == 0:
        for f in ck.failures:
            print("  " + f)
        print("FAIL %-40s (%d of %d checks failed)" % (name,
                                                        len(ck.failures),
                                                        ck.checks))
        return LEDGER.record(name, False)
    print("ok   %-40s %.1fs %d checks" % (name, time.time() - t0, ck.checks))
    return LEDGER.record(name, True)


def script(name, *args):
    """A test script of tests/system/ (faults.py, badinput.py, ...): its
    output is shown when it fails, its last report line when it passes."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(SYSTEM, name)] +
                          list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    label = " ".join((name,) + args)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        print("FAIL %-40s (exit %d)" % (label, proc.returncode))
        return LEDGER.record(label, False)
    last = [l for l in proc.stdout.splitlines()
            if l.startswith(("DATA LOST", "RESULT"))]
    print("ok   %-40s %.1fs %s" % (label, time.time() - t0,
                                   " ".join(last[-1].split()) if last
                                   else ""))
    return LEDGER.record(label, True)


def docs():
    """ninja docs: the API reference; any undocumented public symbol or
    doc error is listed and fails the step."""
    import shutil
    out = os.path.join(BUILD, "docs")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    subprocess.check_call(["doxygen", os.path.join("docs", "Doxyfile")],
                          cwd=TOP)
    warnings = open(os.path.join(out, "warnings.txt")).read().strip()
    if warnings:
        print(warnings.replace(TOP + "/", ""))
        print("FAIL docs: %d warnings" % len(warnings.splitlines()))
        return False
    print("ok   docs: build/docs/html/index.html, no warnings")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="release")
    ap.add_argument("--unit-only", action="store_true")
    ap.add_argument("--compile-fail", action="store_true")
    ap.add_argument("--install-test", action="store_true")
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--bank", action="store_true")
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--faults", action="store_true",
                    help="the short fault test (tests/system/faults.py "
                    "--short)")
    ap.add_argument("--badinput", action="store_true",
                    help="the bad-input catalogue "
                    "(tests/system/badinput.py)")
    ap.add_argument("--security", action="store_true",
                    help="log_statement, least privilege, secrets "
                    "(tests/system/security.py)")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="with --bench: short runs, smaller sets")
    ap.add_argument("--bench-only", default="",
                    help="with --bench: only these benchmarks "
                    "(comma-separated: bench_host, bench_pg, bench_growth, bench_read, "
                    "bank_http)")
    a = ap.parse_args()

    if a.docs and a.variants == "release" and not a.compile_fail:
        sys.exit(0 if docs() else 1)
    if a.demo:
        ok = all([run_binary(p, "release", cmocka=False) for p, test, _ in
                  expected_programs("release") if "/bin/" in p])
        sys.exit(0 if ok else 1)
    if a.bench:
        sys.exit(run_benchmarks(a.quick, [b for b in
                                          a.bench_only.split(",") if b]))

    clear_narrowing()
    variants = a.variants.split(",")
    # Everything that should run is planned first: what is missing or
    # never runs fails the run.
    progs = {v: [(p, cm, pg) for p, cm, pg in expected_programs(v)
                 if not (pg and a.unit_only)] for v in variants}
    for v in variants:
        for p, _, _ in progs[v]:
            LEDGER.plan("%s/%s" % (v, os.path.basename(p)))
    checks = [("compile-fail", a.compile_fail), ("docs", a.docs),
              ("install", a.install_test)]
    for n, on in checks:
        if on:
            LEDGER.plan(n)
    if a.bank and not a.unit_only:
        for n in ("bank/memory", "bank/postgresql", "bank_e2e/memory",
                  "bank_e2e/postgresql"):
            LEDGER.plan(n)
    scripts = [(a.badinput, "badinput.py"), (a.security, "security.py"),
               (a.faults, "faults.py --short")]
    for on, label in scripts:
        if on:
            LEDGER.plan(label)

    for v in variants:
        for p, cm, pg in progs[v]:
            if not pg:
                run_binary(p, v, cmocka=cm)
    if a.compile_fail:
        LEDGER.record("compile-fail", compile_fail_tests())
    if a.docs:
        LEDGER.record("docs", docs())
    if a.install_test:
        LEDGER.record("install", install_test())
    if not a.unit_only:
        with Cluster() as db:
            for v in variants:
                for p, cm, pg in progs[v]:
                    if pg:
                        run_binary(p, v, db.env(), cmocka=cm)
            if a.bank:
                bank_check(None)
                bank_check(db.url)
                bank_e2e(None)
                bank_e2e(db.url)
    if a.badinput:
        script("badinput.py")
    if a.security:
        script("security.py")
    if a.faults:
        script("faults.py", "--short")
    sys.exit(0 if LEDGER.finish() else 1)


if __name__ == "__main__":
    main()
