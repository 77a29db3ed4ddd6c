#!/usr/bin/env python3
"""The host stress test under valgrind's thread checker (issue 8).

Runs build/debug/tests/test_host (every host test: many producers, per-key
order, passivation racing sends, overload, shutdown while sending, blocking
calls from decide and from completion callbacks, commit chaos) under
helgrind, or drd with --tool drd.  The debug build keeps the stacks exact.
Part of ninja check-faults, not of ninja check: it takes minutes.

It prints one summary line and fails when a test fails or valgrind reports
any error (--error-exitcode); the whole report is kept in
build/valgrind-<tool>-test_host.log and its first error is printed.
Besides valgrind's defaults, tests/system/valgrind.supp hides two reports that
are not about our code (glibc's timed wait, p11-kit at exit; no data
race); the summary line says how often each matched.  One data race is
accepted, by its address, not by a stack: a write to a global in
libevent_core's BSS (libevent 2.1 sets its event_debug_mode_too_late in
every event_add, event_del, event_assign and event_free without a lock,
libevent issue #777, fixed upstream after 2.1.12).  The host runs two
event_bases (its commit loop and its timer loop, or the embedder's), so
their threads write that int under different base locks.  Every other
report still fails the run.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TOP = os.path.dirname(TESTS)
ERROR_EXIT = 99


def first_error(text):
    """The first error block of a valgrind log, without the pid prefix."""
    lines = [re.sub(r"^==\d+== ?", "", l) for l in text.splitlines()]
    out, on = [], False
    for l in lines:
        if l.startswith("-" * 20) and "Thread-Announcement" not in l:
            if on and len(out) > 2:
                break
            on, out = True, []
            continue
        if on:
            out.append(l)
    return "\n".join(out[:60])


def error_blocks(text):
    """The error blocks of a valgrind log (no thread announcements), each
    without the pid prefix."""
    lines = [re.sub(r"^==\d+== ?", "", l) for l in text.splitlines()]
    blocks, cur = [], None
    for l in lines:
        if l.startswith("---"):
            if cur:
                blocks.append("\n".join(cur))
            cur = [] if "Thread-Announcement" not in l else None
            continue
        if cur is not None:
            if l.startswith("ERROR SUMMARY") or l.startswith("HEAP SUMMARY"):
                blocks.append("\n".join(cur))
                cur = None
                continue
            cur.append(l)
    if cur:
        blocks.append("\n".join(cur))
    return [b for b in blocks if b.strip()]


def libevent_flag_race(block):
    """A race on a global of libevent_core itself (its debug flag)."""
    m = re.search(r"Possible data race during (?:read|write) of size \d+ "
                  r"at (0x[0-9A-Fa-f]+)", block)
    if not m:
        return False
    addr = int(m.group(1), 16)
    for a in re.finditer(r"Address (0x[0-9A-Fa-f]+) is in the BSS segment "
                         r"of \S*/libevent_core-[0-9.]+\.so\S*", block):
        if int(a.group(1), 16) == addr:
            return True
    return False


def used_suppressions(text):
    """{name: count} of our suppression file's entries that matched (-s)."""
    used = {}
    for m in re.finditer(r"used_suppression:\s+(\d+) (\S+) (\S+):\d+",
                         text):
        if os.path.basename(m.group(3)) == "valgrind.supp":
            used[m.group(2)] = used.get(m.group(2), 0) + int(m.group(1))
    return used


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool", choices=["helgrind", "drd"], default="helgrind")
    ap.add_argument("--binary", default=os.path.join(
        TOP, "build", "debug", "tests", "test_host"))
    a = ap.parse_args()
    name = os.path.basename(a.binary)
    if not os.access(a.binary, os.X_OK):
        print("FAIL valgrind: %s is not built (ninja %s)" % (
            a.binary, os.path.relpath(a.binary, TOP)))
        return 1
    logpath = os.path.join(TOP, "build", "valgrind-%s-%s.log" % (a.tool,
                                                                name))
    cmd = ["valgrind", "--tool=%s" % a.tool,
           "--error-exitcode=%d" % ERROR_EXIT, "--log-file=%s" % logpath,
           "--suppressions=%s" % os.path.join(HERE, "valgrind.supp"), "-s",
           a.binary]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        print("FAIL valgrind: valgrind is not installed")
        return 1
    dt = time.time() - t0
    with open(logpath, errors="replace") as f:
        log = f.read()
    m = re.findall(r"ERROR SUMMARY: (\d+) errors from (\d+) contexts", log)
    errors, contexts = (int(m[-1][0]), int(m[-1][1])) if m else (-1, -1)
    passed = re.findall(r"\[  PASSED  \] (\d+) test", proc.stdout)
    failed = re.findall(r"\[  FAILED  \] (\d+) test", proc.stdout)
    tests = "%s tests passed" % passed[-1] if passed else "tests: no summary"
    if failed:
        tests += ", %s FAILED" % failed[-1]
    blocks = error_blocks(log) if errors != 0 else []
    known = [b for b in blocks if libevent_flag_race(b)]
    others = [b for b in blocks if not libevent_flag_race(b)]
    only_known = errors > 0 and blocks and not others
    ok = (not failed and (proc.returncode == 0 and errors == 0 or
          proc.returncode == ERROR_EXIT and only_known))
    used = used_suppressions(log)
    print("%s valgrind %s %s: %s, %d errors from %d contexts, exit %d, "
          "%.0f s; not ours, suppressed: %s; accepted: libevent's debug "
          "flag race %d of %d reports"
          % ("ok  " if ok else "FAIL", a.tool, name, tests, errors, contexts,
             proc.returncode, dt, ", ".join(
                 "%s %d" % kv for kv in sorted(used.items())) or "none",
             len(known), len(blocks)))
    if not ok:
        if others:
            print(others[0][:6000])
        elif errors != 0:
            print(first_error(log))
        if proc.returncode not in (0, ERROR_EXIT) or failed:
            print(proc.stdout[-4000:])
        print("(full report: %s)" % os.path.relpath(logpath, TOP))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
