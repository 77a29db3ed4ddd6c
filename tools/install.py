#!/usr/bin/env python3
"""Install, uninstall, and write eventastic.pc; called by ninja.

  install.py pc --prefix P --version V --libs L   print eventastic.pc
  install.py install --prefix P                   copy the release build
  install.py uninstall --prefix P                 remove what install put

DESTDIR is honoured by install and uninstall.  install records every file
it wrote in build/install_manifest.txt; uninstall removes those.
"""

import argparse
import glob
import os
import shutil
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(TOP, "build", "release")
MANIFEST = os.path.join(TOP, "build", "install_manifest.txt")
PRIVATE_REQUIRES = "libpq libevent_core libevent_pthreads libevent_extra " \
                   "libsodium"


def pc(prefix, version):
    return """prefix=%s
exec_prefix=${prefix}
libdir=${prefix}/lib
includedir=${prefix}/include

Name: eventastic
Description: Event sourcing and CQRS for C with PostgreSQL persistence
Version: %s
Requires.private: %s
Libs: -L${libdir} -leventastic
Libs.private: -lpthread
Cflags: -I${includedir}
""" % (prefix, version, PRIVATE_REQUIRES)


def plan(prefix):
    """(source, destination relative to prefix, is_symlink) triples."""
    files = []
    for h in sorted(glob.glob(os.path.join(TOP, "include", "eventastic",
                                           "*.h"))):
        files.append((h, "include/eventastic/" + os.path.basename(h), False))
    files.append((os.path.join(TOP, "include", "eventastic.h"),
                  "include/eventastic.h", False))
    lib = os.path.join(REL, "lib")
    files.append((os.path.join(lib, "libeventastic.a"),
                  "lib/libeventastic.a", False))
    for so in sorted(glob.glob(os.path.join(lib, "libeventastic.so*"))):
        files.append((so, "lib/" + os.path.basename(so), os.path.islink(so)))
    files.append((os.path.join(lib, "eventastic.pc"),
                  "lib/pkgconfig/eventastic.pc", False))
    tool = os.path.join(REL, "bin", "eventastic")
    if os.path.exists(tool):
        files.append((tool, "bin/eventastic", False))
    man = os.path.join(TOP, "docs", "eventastic.1")
    if os.path.exists(man):
        files.append((man, "share/man/man1/eventastic.1", False))
    return files


def dest_root(prefix):
    destdir = os.environ.get("DESTDIR", "")
    return destdir + prefix if destdir else prefix


def install(prefix):
    root = dest_root(prefix)
    written = []
    for src, rel, is_link in plan(prefix):
        if not os.path.lexists(src):
            sys.exit("install: %s is missing; run ninja first" % src)
        dst = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.remove(dst)
        if is_link:
            os.symlink(os.readlink(src), dst)
        elif rel.endswith(".pc"):
            # Built for configure's --prefix; say where it really goes, so
            # that "install.py install --prefix X" alone is right too.
            lines = open(src).read().splitlines(True)
            lines = ["prefix=%s\n" % prefix if l.startswith("prefix=")
                     else l for l in lines]
            with open(dst, "w") as f:
                f.write("".join(lines))
        else:
            shutil.copy2(src, dst)
        written.append(dst)
        print("install %s" % dst)
    with open(MANIFEST, "w") as f:
        f.write("\n".join(written) + "\n")


def uninstall(prefix):
    if os.path.exists(MANIFEST):
        paths = [l for l in open(MANIFEST).read().splitlines() if l]
    else:
        root = dest_root(prefix)
        paths = [os.path.join(root, rel) for _, rel, _ in plan(prefix)]
    for p in paths:
        if os.path.lexists(p):
            os.remove(p)
            print("remove %s" % p)
    d = os.path.join(dest_root(prefix), "include", "eventastic")
    if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
    if os.path.exists(MANIFEST):
        os.remove(MANIFEST)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["pc", "install", "uninstall"])
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--version", default="")
    ap.add_argument("--libs", default="")
    a = ap.parse_args()
    if a.action == "pc":
        sys.stdout.write(pc(a.prefix, a.version))
    elif a.action == "install":
        install(a.prefix)
    else:
        uninstall(a.prefix)


if __name__ == "__main__":
    main()
