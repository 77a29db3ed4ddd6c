#!/usr/bin/env python3
"""Writes build.ninja for eventastic.

Like Ninja's own configure.py: a tiny writer, compiler depfiles, the
arguments are recorded in build.ninja and it regenerates itself when this
file changes.  Dependencies are probed with pkg-config; on a fresh Debian
machine, run as root, missing packages are installed with apt-get.
"""

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# pkg-config module -> Debian package that provides it.
PKG_MODULES = {
    "libpq": "libpq-dev",
    "libevent_core": "libevent-dev",
    "libevent_pthreads": "libevent-dev",
    "libevent_extra": "libevent-dev",
    "cmocka": "libcmocka-dev",
    "libsodium": "libsodium-dev",
    "jansson": "libjansson-dev",
}
# Programs -> Debian package.
PROGRAMS = {
    "ninja": "ninja-build",
    "pkg-config": "pkg-config",
    "cc": "gcc",
    "c++": "g++",
    "/usr/lib/postgresql/15/bin/initdb": "postgresql-15",
    "psql": "postgresql-client-15",
    "doxygen": "doxygen",
    "clang": "clang",  # libFuzzer targets (ninja fuzz)
    "valgrind": "valgrind",  # helgrind run of ninja check-faults
}
# Always wanted for the test suite, checked by dpkg.
EXTRA_PACKAGES = [
    "python3-hypothesis",  # tests/bank_model.py
]


class Writer:
    """The smallest useful ninja syntax writer."""

    def __init__(self, out):
        self.out = out

    def line(self, text=""):
        self.out.write(text + "\n")

    def variable(self, key, value, indent=0):
        if isinstance(value, list):
            value = " ".join(v for v in value if v)
        self.line("%s%s = %s" % ("  " * indent, key, value))

    def rule(self, name, command, description=None, depfile=None,
             generator=False, pool=None, restat=False):
        self.line("rule " + name)
        self.variable("command", command, 1)
        if description:
            self.variable("description", description, 1)
        if depfile:
            self.variable("depfile", depfile, 1)
            self.variable("deps", "gcc", 1)
        if generator:
            self.variable("generator", "1", 1)
        if pool:
            self.variable("pool", pool, 1)
        if restat:
            self.variable("restat", "1", 1)
        self.line()

    def build(self, outputs, rule, inputs=(), implicit=(), order_only=(),
              variables=None):
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        text = "build %s: %s" % (" ".join(esc(o) for o in outputs), rule)
        if inputs:
            text += " " + " ".join(esc(i) for i in inputs)
        if implicit:
            text += " | " + " ".join(esc(i) for i in implicit)
        if order_only:
            text += " || " + " ".join(esc(i) for i in order_only)
        self.line(text)
        for key, value in (variables or {}).items():
            self.variable(key, value, 1)
        self.line()

    def default(self, targets):
        self.line("default " + " ".join(targets))


def esc(path):
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def have_program(name):
    return os.path.exists(name) if name.startswith("/") else \
        shutil.which(name) is not None


def have_module(mod):
    if not shutil.which("pkg-config"):
        return False
    return subprocess.call(["pkg-config", "--exists", mod]) == 0


def have_deb(pkg):
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                             capture_output=True, text=True)
    except FileNotFoundError:
        return True
    return out.returncode == 0 and "install ok installed" in out.stdout


def missing_packages():
    missing = []
    for prog, pkg in PROGRAMS.items():
        if not have_program(prog):
            missing.append(pkg)
    for mod, pkg in PKG_MODULES.items():
        if not have_module(mod):
            missing.append(pkg)
    for pkg in EXTRA_PACKAGES:
        if not have_deb(pkg):
            missing.append(pkg)
    out = []
    for p in missing:
        if p not in out:
            out.append(p)
    return out


def ensure_dependencies(no_install):
    missing = missing_packages()
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + missing
    if no_install or os.geteuid() != 0:
        sys.stderr.write(
            "configure.py: missing packages: %s\n"
            "run as root:\n  apt-get update && %s\n"
            % (" ".join(missing), " ".join(cmd)))
        sys.exit(1)
    print("configure.py: installing %s" % " ".join(missing), flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.call(cmd, env=env) != 0:
        # A fresh machine may have no package lists yet.
        subprocess.check_call(["apt-get", "update"], env=env)
        subprocess.check_call(cmd, env=env)
    still = missing_packages()
    if still:
        sys.stderr.write("configure.py: still missing after apt-get: %s\n"
                         % " ".join(still))
        sys.exit(1)
    print("configure.py: installed %s" % " ".join(missing), flush=True)


def hypothesis_python():
    """A python that imports hypothesis: the one running configure.py, or
    the system's (Debian's python3-hypothesis is for /usr/bin/python3).
    None when neither can."""
    for py in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(py) and subprocess.call(
                [py, "-c", "import hypothesis"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL) == 0:
            return py
    return None


def pkg(flag, *mods):
    out = subprocess.check_output(["pkg-config", flag] + list(mods), text=True)
    return out.split()


# Sources are found by name, so adding a file needs only a re-run:
#   src/**/*.c            the library (src/<part>/, src/store/pg/, ...)
#   tests/fixtures/*.c    linked into every test
#   tests/suites/*.c      test bodies run on more than one store, linked
#                         into every test (not the fuzz targets)
#   tests/test_*.c        one test binary each (test_pg_* need PostgreSQL)
#   examples/*.c          one example binary each
#   bench/*.c             one benchmark binary each (ninja bench runs them)
def sources(pattern):
    return sorted(os.path.relpath(p, HERE)
                  for p in glob.glob(os.path.join(HERE, pattern),
                                     recursive=True))


VARIANTS = {
    "release": ["-O2", "-g"],
    "debug": ["-O0", "-g3"],
    "asan": ["-O1", "-g", "-fsanitize=address,undefined",
             "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}
VARIANT_LDFLAGS = {
    "release": [],
    "debug": [],
    "asan": ["-fsanitize=address,undefined"],
    "tsan": ["-fsanitize=thread"],
}

WARNINGS = [
    "-Wall", "-Wextra", "-Werror", "-Wswitch-enum", "-Wshadow",
    "-Wstrict-prototypes", "-Wmissing-prototypes", "-Wformat=2",
    "-Wvla", "-Wpointer-arith", "-Wundef", "-Wnull-dereference",
    "-Wdouble-promotion", "-Wimplicit-fallthrough",
    # Only ES_EXPORT symbols leave the shared library.
    "-fvisibility=hidden", "-fPIC",
]


def write_fuzz(n):
    """libFuzzer targets tests/fuzz/fuzz_*.c -> build/fuzz/: clang with
    address and undefined sanitizers; the library, the bank's domain and
    the test fixtures are built again with clang for them.  Not part of
    all: ninja fuzz builds and runs them."""
    flags = ["-O1", "-g", "-fno-omit-frame-pointer",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    n.rule("fuzzcc", "clang -MMD -MF $out.d $fuzz_cflags $extra "
           "-fsanitize=fuzzer-no-link -c $in -o $out",
           description="CC $out", depfile="$out.d")
    n.rule("fuzzlink", "clang -pthread -fsanitize=fuzzer $fuzz_cflags "
           "$wrap -o $out $in $lib_libs $jansson_libs",
           description="LINK $out")
    # The warnings minus -Werror: clang's set differs from gcc's.
    n.variable("fuzz_cflags", ["-std=c11", "-D_GNU_SOURCE", "-pthread",
                               "-Iinclude", "-Isrc", "-Itests"] +
               [w for w in WARNINGS if w != "-Werror"] + flags +
               pkg("--cflags", "jansson", "libpq", "libevent_core",
                   "libsodium"))
    objs = []
    for src in (sources("src/**/*.c") + ["examples/bank/bank.c"] +
                sources("tests/fixtures/*.c")):
        o = "build/fuzz/obj/%s.o" % src[:-2]
        n.build(o, "fuzzcc", src)
        objs.append(o)
    outs = []
    for src in sources("tests/fuzz/fuzz_*.c"):
        name = os.path.basename(src)[:-2]
        o = "build/fuzz/obj/%s.o" % src[:-2]
        n.build(o, "fuzzcc", src, variables={
            "extra": "-Wno-missing-prototypes"})
        exe = "build/fuzz/%s" % name
        wrap = ""
        if name.startswith("fuzz_pg_"):
            # The store's calls of PQexecParams and PQexec go to the
            # target's fakes, __wrap_PQexec* (tests/fuzz/pg_fake.h).
            wrap = "-Wl,--wrap=PQexecParams -Wl,--wrap=PQexec"
        n.build(exe, "fuzzlink", [o] + objs, variables={"wrap": wrap})
        outs.append(exe)
    return outs


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"))
    ap.add_argument("--prefix", default="/usr/local")
    ap.add_argument("--no-install", action="store_true",
                    help="never run apt-get, only report what is missing")
    args = ap.parse_args()

    ensure_dependencies(args.no_install)

    os.chdir(HERE)
    lib_mods = ["libpq", "libevent_core", "libevent_pthreads",
                "libevent_extra", "libsodium"]
    cflags_deps = pkg("--cflags", "cmocka", "jansson", *lib_mods)
    libs_lib = pkg("--libs", *lib_mods) + ["-lpthread"]
    libs_cmocka = pkg("--libs", "cmocka")
    libs_jansson = pkg("--libs", "jansson")
    so_version = "0.1.0"
    so_name = "libeventastic.so.0"

    with open("build.ninja.tmp", "w") as f:
        n = Writer(f)
        n.line("# Written by configure.py; do not edit.")
        n.line("# configure arguments: %s" % " ".join(
            shlex.quote(a) for a in sys.argv[1:]))
        n.line("ninja_required_version = 1.10")
        n.line()
        n.variable("cc", args.cc)
        n.variable("python", sys.executable)
        hypython = hypothesis_python()
        if hypython is None:
            # tests/bank_model.py then fails and says what to install.
            print("configure.py: no python imports hypothesis: ninja check "
                  "will fail; install python3-hypothesis")
        n.variable("hypothesis_python", hypython or sys.executable)
        n.variable("configure_args",
                   " ".join(shlex.quote(a) for a in sys.argv[1:]))
        n.variable("common_cflags", ["-std=c11", "-D_GNU_SOURCE", "-pthread",
                                     "-Iinclude", "-Isrc", "-Itests"] + WARNINGS
                   + cflags_deps)
        n.variable("lib_libs", libs_lib)
        n.variable("cmocka_libs", libs_cmocka)
        n.variable("jansson_libs", libs_jansson)
        n.variable("cxx", "c++")
        n.variable("prefix", os.path.abspath(args.prefix))
        n.line()
        n.rule("cc", "$cc -MMD -MF $out.d $common_cflags $vflags "
               "-c $in -o $out", description="CC $out", depfile="$out.d")
        n.rule("ar", "rm -f $out && ar crs $out $in",
               description="AR $out")
        n.rule("link", "$cc -pthread $vldflags -o $out $in $libs",
               description="LINK $out")
        n.rule("cxx", "$cxx -MMD -MF $out.d -std=c++17 -Wall -Wextra "
               "-Werror -pedantic -Iinclude $vflags -c $in -o $out",
               description="CXX $out", depfile="$out.d")
        n.rule("cxxlink", "$cxx -pthread $vldflags -o $out $in $libs",
               description="LINK $out")
        n.rule("solink", "$cc -shared -Wl,-soname,%s -Wl,--no-undefined "
               "-o $out $in $libs" % so_name, description="SOLINK $out")
        n.rule("symlink", "ln -sf $target $out", description="LN $out")
        n.rule("pc", "$python tools/install.py pc --prefix $prefix "
               "--version %s --libs '$libs' > $out" % so_version,
               description="PC $out")
        n.rule("configure", "$python configure.py $configure_args",
               description="CONFIGURE", generator=True)
        n.rule("run", "$cmd", description="$desc", pool="console")
        n.build("build.ninja", "configure",
                implicit=["configure.py"])

        all_targets = {}
        for variant, vflags in VARIANTS.items():
            vars_ = {"vflags": vflags,
                     "vldflags": VARIANT_LDFLAGS[variant]}
            bdir = "build/%s" % variant
            outs = []

            built = set()

            def obj(src):
                o = "%s/obj/%s.o" % (bdir, src[:-2])
                if o not in built:  # the bank's domain is linked twice
                    n.build(o, "cc", src, variables=vars_)
                    built.add(o)
                return o

            lib = "%s/lib/libeventastic.a" % bdir
            lib_objs = [obj(s) for s in sources("src/**/*.c")]
            n.build(lib, "ar", lib_objs)
            outs.append(lib)
            if variant == "release":
                real = "%s/lib/libeventastic.so.%s" % (bdir, so_version)
                n.build(real, "solink", lib_objs,
                        variables={"libs": "$lib_libs"})
                for link in (so_name, "libeventastic.so"):
                    n.build("%s/lib/%s" % (bdir, link), "symlink", real,
                            variables={"target": os.path.basename(real)})
                    outs.append("%s/lib/%s" % (bdir, link))
                n.build("%s/lib/eventastic.pc" % bdir, "pc",
                        implicit=["tools/install.py"],
                        variables={"libs": "$lib_libs"})
                outs += [real, "%s/lib/eventastic.pc" % bdir]
            for src in sources("tests/cxx/*.cpp"):
                o = "%s/obj/%s.o" % (bdir, src[:-4])
                n.build(o, "cxx", src, variables=vars_)
                exe = "%s/tests/%s" % (bdir, "test_cxx_" +
                                       os.path.basename(src)[:-4])
                n.build(exe, "cxxlink", [o, lib], variables=dict(
                    vars_, libs="$lib_libs"))
                outs.append(exe)
            fixtures = [obj(s) for s in sources("tests/fixtures/*.c") +
                        sources("tests/suites/*.c")]
            tests = []
            for src in sources("tests/test_*.c"):
                name = os.path.basename(src)[:-2]
                objs = [obj(src)] + fixtures
                if name.startswith("test_bank"):
                    objs.append(obj("examples/bank/bank.c"))
                exe = "%s/tests/%s" % (bdir, name)
                n.build(exe, "link", objs + [lib], variables=dict(
                    vars_, libs="$cmocka_libs $lib_libs"))
                tests.append(exe)
            outs += tests
            bench_common = [obj(s) for s in sources("bench/common/*.c")]
            for src in sources("bench/*.c"):
                exe = "%s/bench/%s" % (bdir, os.path.basename(src)[:-2])
                n.build(exe, "link", [obj(src)] + bench_common + [lib],
                        variables=dict(vars_, libs="$lib_libs"))
                outs.append(exe)
            for src in sources("examples/*.c"):
                exe = "%s/bin/%s" % (bdir, os.path.basename(src)[:-2])
                n.build(exe, "link", [obj(src), lib],
                        variables=dict(vars_, libs="$lib_libs"))
                outs.append(exe)
            # The bank: its domain is shared by the server and its tests.
            # bank-server is examples/bank/server.c and its server_*.c.
            bank = [obj("examples/bank/bank.c")]
            server_srcs = (["examples/bank/server.c"] +
                           sources("examples/bank/server_*.c"))
            for name, srcs, libs in (
                    ("bank-server", server_srcs,
                     "$jansson_libs $lib_libs"),
                    ("bank-load", ["examples/bank/load.c"],
                     "$jansson_libs $lib_libs")):
                exe = "%s/bin/%s" % (bdir, name)
                deps = [obj(s) for s in srcs] + (bank if name == "bank-server"
                                                 else [])
                n.build(exe, "link", deps + [lib],
                        variables=dict(vars_, libs=libs))
                outs.append(exe)
            # Command line tools: tools/<name>.c -> build/<variant>/bin/<name>
            for src in sources("tools/*.c"):
                exe = "%s/bin/%s" % (bdir, os.path.basename(src)[:-2])
                n.build(exe, "link", [obj(src), lib],
                        variables=dict(vars_, libs="$lib_libs"))
                outs.append(exe)
            n.build(variant, "phony", outs)
            all_targets[variant] = outs

        fuzz_targets = write_fuzz(n)

        everything = [t for v in all_targets.values() for t in v]
        n.build("test", "run", all_targets["release"],
                variables={"cmd": "$python tests/run.py --variants release "
                           "--unit-only", "desc": "TEST unit (release)"})
        # The bank's model-based test runs after the rest, under a python
        # that has Hypothesis; both run, and either failing fails the step.
        n.build("check", "run", everything, variables={
            "cmd": "$python tests/run.py --variants release,asan,tsan "
                   "--compile-fail --install-test --docs --bank --badinput "
                   "--security --faults; r=$$?; "
                   "$hypothesis_python tests/bank_model.py --short "
                   "&& exit $$r",
            "desc": "CHECK"})
        # The host tests under helgrind (minutes), then the long fault
        # run; both run, and either failing fails the step.  HOST_TEST
        # would narrow test_host to a pattern, perhaps to no test at all
        # (tests/run.py clears it itself).
        n.build("check-faults", "run", all_targets["release"] +
                ["build/debug/tests/test_host"], implicit=[
                    "tests/valgrind.py", "tests/faults.py",
                    "tests/bank_model.py"], variables={
            "cmd": "env -u HOST_TEST -u CMOCKA_MESSAGE_OUTPUT "
                   "$python tests/valgrind.py; v=$$?; "
                   "$hypothesis_python tests/bank_model.py --long; m=$$?; "
                   "$python tests/faults.py && exit $$((v || m))",
            "desc": "CHECK-FAULTS"})
        n.build("demo", "run", all_targets["release"], variables={
            "cmd": "$python tests/demo.py",
            "desc": "DEMO"})
        n.build("bench", "run", all_targets["release"], variables={
            "cmd": "$python tests/run.py --bench",
            "desc": "BENCH"})
        n.build("install", "run", all_targets["release"], variables={
            "cmd": "$python tools/install.py install --prefix $prefix",
            "desc": "INSTALL"})
        n.build("uninstall", "run", [], variables={
            "cmd": "$python tools/install.py uninstall --prefix $prefix",
            "desc": "UNINSTALL"})
        n.build("docs", "run", [], implicit=["docs/Doxyfile"], variables={
            "cmd": "$python tests/run.py --docs", "desc": "DOCS"})
        n.build("fuzz", "run", fuzz_targets, implicit=[
            "tests/fuzz/run_fuzz.py"], variables={
            "cmd": "$python tests/fuzz/run_fuzz.py", "desc": "FUZZ"})
        n.build("all", "phony", everything)
        n.default(["release"])
    os.replace("build.ninja.tmp", "build.ninja")
    print("configure.py: wrote build.ninja")


if __name__ == "__main__":
    main()
