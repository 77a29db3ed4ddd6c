#!/usr/bin/env python3
"""ninja fuzz: runs each libFuzzer target of build/fuzz/ for a short,
bounded time (FUZZ_SECONDS, default 20) on its committed seed corpus
(tests/fuzz/corpus/<target>/; new inputs go to build/fuzz/corpus/, never
into the tree) with its dictionary (tests/fuzz/<target>.dict, else
json.dict).  A crash leaves its input in
build/fuzz/ and fails the step: make it a regression test."""

import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(TOP, "build", "fuzz")


def dict_for(name):
    """tests/fuzz/<target>.dict when there is one, else json.dict."""
    own = os.path.join(HERE, name + ".dict")
    return own if os.path.exists(own) else os.path.join(HERE, "json.dict")


def main():
    seconds = int(os.environ.get("FUZZ_SECONDS", "20"))
    failed = 0
    targets = sorted(p for p in glob.glob(os.path.join(OUT, "fuzz_*"))
                     if os.access(p, os.X_OK) and os.path.isfile(p)
                     and not p.endswith(".d"))
    for exe in targets:
        name = os.path.basename(exe)
        work = os.path.join(OUT, "corpus", name)
        os.makedirs(work, exist_ok=True)
        seeds = os.path.join(HERE, "corpus", name)
        cmd = [exe, work, seeds, "-max_total_time=%d" % seconds,
               "-timeout=10", "-rss_limit_mb=2048", "-max_len=70000",
               "-artifact_prefix=%s/%s-" % (OUT, name),
               "-dict=%s" % dict_for(name)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ,
                                       ASAN_OPTIONS="detect_leaks=1"))
        done = [l for l in proc.stdout.splitlines() if "Done" in l]
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout[-6000:])
            print("FAIL fuzz/%s (exit %d)" % (name, proc.returncode))
            failed += 1
        else:
            print("ok   fuzz/%-28s %ds %s" % (name, seconds,
                                              done[-1] if done else ""))
    if not targets:
        print("FAIL fuzz: no targets in build/fuzz (is clang installed?)")
        failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
