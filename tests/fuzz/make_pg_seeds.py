#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_pg_rows and fuzz_pg_migrations
(tests/fuzz/corpus/<target>/), in the input format of pg_fake.h: one
well-formed exchange per reader, plain and sealed, and the migrations
table as a current, an old, a tampered and a newer database has it.
Run it again when a reader's columns or a migration change; the files it
writes are committed."""

import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))

AGG = b"\xa5" * 16  # the aggregate the fuzz target asks for
EVENT_ID = b"\x5a" * 16


def cell(b):
    if b is None:
        return b"\xff\xff"
    return struct.pack("<H", len(b)) + b


def result(rows):
    return bytes([len(rows)]) + b"".join(cell(c) for r in rows for c in r)


def i32(v):
    return struct.pack(">i", v)


def i64(v):
    return struct.pack(">q", v)


def uid(n):
    return bytes([n]) * 16


OK = b"\x00"  # a DECLARE, CLOSE or data-key lookup answered


def opts(encrypt=False, seal=False, chunk=1, agg_filter=False):
    return (encrypt | seal << 1 | (chunk - 1) << 2 | agg_filter << 4)


def event_row(v, key):
    return [i64(v), uid(0x10 + v), i32(1 + v % 3), b"payload %d" % v, key]


def rows_seeds():
    s = {}
    # A stream of three events in pages of two: the first page, then the
    # cursor (DECLARE, FETCH, FETCH, CLOSE).
    s["stream_pages"] = bytes([0, opts(chunk=2)]) + result(
        [event_row(0, None), event_row(1, None)]) + OK + result(
        [event_row(2, None)]) + OK
    s["stream_sealed"] = bytes([0, opts(seal=True, chunk=4)]) + result(
        [event_row(0, b"fuzz"), event_row(1, b"fuzz")]) + OK
    s["stream_no_key"] = bytes([0, opts(chunk=4)]) + result(
        [event_row(0, b"fuzz")])
    s["get_event"] = bytes([1, opts()]) + result(
        [[AGG, i64(4), i32(2), b"an event", None]])
    s["get_event_sealed"] = bytes([1, opts(seal=True, agg_filter=True)]) + \
        result([[AGG, i64(4), i32(2), b"an event", b"fuzz"]]) + OK
    s["snapshot"] = bytes([2, opts()]) + result([[i64(7), b"state", None]])
    s["snapshot_sealed"] = bytes([2, opts(seal=True)]) + result(
        [[i64(7), b"state", b"fuzz"]]) + OK
    se = [[uid(1), AGG, EVENT_ID, i32(3), b"effect one", None],
          [uid(2), AGG, EVENT_ID, i32(4), b"effect two", None]]
    s["side_effects"] = bytes([3, opts()]) + result(se)
    s["side_effects_sealed"] = bytes([3, opts(seal=True)]) + result(
        [r[:5] + [b"fuzz"] for r in se]) + OK

    def ob(key, status=b"pending"):
        return [uid(1), AGG, EVENT_ID, i32(3), b"message", key,
                b"bank_account", status, i32(2), i64(1764000000000),
                i64(1764000005000), b"handler failed", i64(9)]
    s["outbox"] = bytes([4, opts()]) + result([ob(None), ob(None, b"dead")])
    s["outbox_sealed"] = bytes([4, opts(seal=True)]) + result(
        [ob(b"fuzz")]) + OK
    s["command"] = bytes([5, opts()]) + result(
        [[AGG, i32(1), b"\x11" * 32, i64(0), i64(2), i64(1)]])
    s["command_no_version"] = bytes([5, opts()]) + result(
        [[AGG, i32(1), b"\x11" * 32, i64(-1), i64(0), i64(-1)]])
    s["data_key_valid"] = bytes([6, opts(seal=True)]) + OK
    s["data_key_wrong"] = bytes([6, opts(encrypt=True)]) + result(
        [[b"fuzz", b"\x00" * 72]])
    s["data_key_forgotten"] = bytes([6, opts(encrypt=True)]) + result(
        [[b"fuzz", None]])
    return s


def c_strings(text):
    """The C string literals of text, in order, unescaped."""
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', text):
        out.append(m.group(1).encode().decode("unicode_escape"))
    return out


def migrations():
    """[(version, sql)] parsed from src/store/pg/migrations.c."""
    text = open(os.path.join(TOP, "src", "store", "pg", "migrations.c")).read()
    body = text[text.index("es__pg_migrations[] = {"):]
    out = []
    lit = r'"(?:[^"\\]|\\.)*"'
    for m in re.finditer(r"\{(\d+),\s*(%s),((?:\s*%s)+)\s*\}" % (lit, lit),
                         body):
        out.append((int(m.group(1)), "".join(c_strings(m.group(3)))))
    return out


def fnv1a(s):
    h = 0xcbf29ce484222325
    for ch in s.encode():
        h ^= ch
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "fnv1a64:%016x" % h


def migration_seeds():
    ms = migrations()
    assert ms, "no migrations parsed"
    rows = [[str(v).encode(), fnv1a(sql).encode()] for v, sql in ms]

    def table(rs):
        return result(rs)
    s = {
        "current": table(rows),
        "fresh": table([]),
        "old": table(rows[:2]),
        "tampered": table(rows[:1] + [[rows[1][0], b"fnv1a64:0000000000000000"]]),
        "newer": table(rows + [[b"%d" % (ms[-1][0] + 1), b"fnv1a64:1"]]),
        "not_a_number": table([[b"1x", rows[0][1]]]),
        "huge": table([[b"99999999999", rows[0][1]]]),
    }
    return s


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    print("%s: %d seeds" % (target, len(seeds)))


if __name__ == "__main__":
    write("fuzz_pg_rows", rows_seeds())
    write("fuzz_pg_migrations", migration_seeds())
