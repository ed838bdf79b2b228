"""Hypothesis strategies for the wire protocol, shared by the decoder and live-relay fuzz tests.

`valid_messages()` draws messages that relay.protocol must accept, one strategy per kind;
`hostile_values()` draws anything msgpack can carry (big integers, bin, ext, deep nesting);
`mutated_frames()` breaks valid frames byte by byte; `mutated_messages()` breaks them field by
field (drop a field, give one a value of another type, add an unknown one).

Examples per test come from the `relay-fuzz` settings profile, derandomized so that CI runs the
same inputs every time; RELAY_FUZZ_EXAMPLES=<n> scales every test up (n examples for the
largest one).
"""
from __future__ import annotations

import math
import os
import string
import struct

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from relay import protocol

BASE_EXAMPLES = 1500
EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", BASE_EXAMPLES))

settings.register_profile(
    "relay-fuzz", max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def fuzz_settings(share: float) -> settings:
    """The profile with `share` of the examples (at least 10)."""
    return settings(settings.get_profile("relay-fuzz"), max_examples=max(10, int(EXAMPLES * share)))


# -- building blocks ----------------------------------------------------------------------------

INT64 = st.integers(protocol.INT_MIN, protocol.INT_MAX)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, -math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308])
SCALARS = st.one_of(st.booleans(), INT64, FLOATS, st.text(max_size=30))
KEYS = st.text(min_size=1, max_size=24)
PRINTABLE = st.text(st.characters(blacklist_categories=("C", "Z")), min_size=1, max_size=40)
RUN_IDS = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=64)
STREAMS = st.text(st.characters(blacklist_categories=("C", "Z")), min_size=1, max_size=64)
SEQS = st.integers(1, protocol.INT_MAX)


def json_values(depth: int, floats=FLOATS) -> st.SearchStrategy:
    """nil, bool, int64, float, str, and lists and maps of those, nested at most `depth` deep."""
    leaves = st.one_of(st.none(), st.booleans(), INT64, floats, st.text(max_size=20))
    if depth == 0:
        return leaves
    inner = json_values(depth - 1, floats)
    return st.one_of(leaves, st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4))


def _text_without(forbidden: str, min_size: int, max_size: int) -> st.SearchStrategy:
    return st.text(st.characters(blacklist_characters=forbidden, blacklist_categories=("Cs",)),
                   min_size=min_size, max_size=max_size)


SETTINGS = st.fixed_dictionaries(
    {"project": _text_without(protocol.PROJECT_FORBIDDEN, 1, protocol.MAX_PROJECT_LEN)},
    optional={"entity": st.none() | st.text(max_size=30), "name": st.none() | st.text(max_size=30),
              "group": st.none() | st.text(max_size=30), "notes": st.none() | st.text(max_size=60),
              "job_type": st.none() | st.text(max_size=20),
              "tags": st.none() | st.lists(st.text(min_size=1, max_size=protocol.MAX_TAG_LEN), max_size=4),
              "config": st.none() | st.dictionaries(KEYS, json_values(3), max_size=6),
              "mode": st.none() | st.sampled_from(protocol.WANDB_MODES)})

KIND_FIELDS = {
    "open": st.fixed_dictionaries({"run": RUN_IDS, "settings": SETTINGS}, optional={"meta": st.booleans()}),
    "log": st.fixed_dictionaries(
        {"run": RUN_IDS, "metrics": st.dictionaries(KEYS, SCALARS, min_size=1, max_size=8)},
        optional={"frame": st.none() | INT64, "epoch": st.none() | INT64, "ns": st.none() | st.text(max_size=10),
                  "time": FLOATS}),
    "checkpoint": st.fixed_dictionaries(
        {"run": RUN_IDS, "path": PRINTABLE.map(lambda p: "/" + p)},
        optional={"metadata": st.none() | st.dictionaries(KEYS, json_values(2, st.floats(allow_infinity=False)),
                                                          max_size=5),
                  "aliases": st.lists(_text_without(protocol.ALIAS_FORBIDDEN, 1, 20), max_size=3)}),
    "summary": st.fixed_dictionaries({"run": RUN_IDS, "values": st.dictionaries(KEYS, SCALARS, max_size=6)}),
    "finish": st.fixed_dictionaries({"run": RUN_IDS, "exit_code": st.integers(protocol.EXIT_CODE_MIN,
                                                                              protocol.EXIT_CODE_MAX)},
                                    optional={"time": FLOATS}),
    "media": st.fixed_dictionaries(
        {"run": RUN_IDS, "values": st.dictionaries(KEYS, st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(("image", "audio", "html")),
                                   "path": PRINTABLE.map(lambda p: "/" + p),
                                   "stat": st.fixed_dictionaries({"size": INT64, "mtime_ns": INT64})},
                                  optional={"caption": st.text(max_size=20)}),
            st.fixed_dictionaries({"type": st.just("video"), "path": PRINTABLE.map(lambda p: "/" + p),
                                   "stat": st.fixed_dictionaries({"size": INT64, "mtime_ns": INT64})},
                                  optional={"fps": st.floats(0.5, 240.0)}),
            st.integers(1, 6).flatmap(lambda bins: st.fixed_dictionaries({
                "type": st.just("histogram"), "counts": st.lists(st.integers(0, 1 << 40), min_size=bins, max_size=bins),
                "edges": st.just([float(edge) for edge in range(bins + 1)])}))), min_size=1, max_size=4)},
        optional={"frame": st.none() | INT64, "epoch": st.none() | INT64, "joins": st.none() | SEQS,
                  "ns": st.none() | st.text(max_size=10), "time": FLOATS}),
    "console": st.fixed_dictionaries(
        {"run": RUN_IDS, "lines": st.lists(st.tuples(st.sampled_from(protocol.CONSOLE_STREAMS), st.text(max_size=80))
                                           .map(list), max_size=5),
         "dropped": st.integers(0, protocol.INT_MAX)},
        optional={"time": FLOATS}),
    "meta": st.fixed_dictionaries(
        {"run": RUN_IDS, "provenance": st.fixed_dictionaries(
            {}, optional={"host": st.text(max_size=30), "args": st.lists(st.text(max_size=20), max_size=4),
                          "cpu_count": st.integers(1, 512), "started_at": FLOATS,
                          "git": st.fixed_dictionaries({}, optional={"commit": st.text(max_size=40),
                                                                      "dirty": st.booleans()}),
                          "gpus": st.lists(st.fixed_dictionaries({"name": st.text(max_size=20)},
                                                                 optional={"memory_total": INT64}), max_size=2)})},
        optional={"diff": st.text(max_size=200)}),
    "system": st.fixed_dictionaries(
        {"run": RUN_IDS, "values": st.dictionaries(KEYS, st.integers(0, 1 << 40) | FLOATS, max_size=8)},
        optional={"time": FLOATS}),
    "status": st.just({}),
    "heartbeat": st.fixed_dictionaries({"runs": st.lists(RUN_IDS, max_size=5)}),
}


@st.composite
def valid_messages(draw, kinds=protocol.CLIENT_KINDS, streams=STREAMS, runs=None) -> dict:
    kind = draw(st.sampled_from(kinds))
    message = {"v": protocol.VERSION, "t": kind, "stream": draw(streams),
               "seq": draw(st.integers(0, protocol.INT_MAX) if kind in protocol.UNSPOOLED_KINDS else SEQS)}
    message.update(draw(KIND_FIELDS[kind]))
    if runs is not None and "run" in message:
        message["run"] = draw(runs)
    return message


def hostile_values(max_leaves: int = 12) -> st.SearchStrategy:
    """Anything msgpack can carry, including what the relay must refuse."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), FLOATS, st.text(max_size=40),
        st.binary(max_size=40), st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
        st.sampled_from(["", "x" * (protocol.MAX_KEY_LEN + 1), "\x00", "\n", "../../etc/passwd", "/\x00",
                         1 << 63, -(1 << 63) - 0, (1 << 31), -(1 << 31) - 1, 2, 1.0, True]))
    keys = st.one_of(KEYS, st.sampled_from(["v", "t", "stream", "seq", "run", "metrics", "settings", "path",
                                            "frame", "epoch", "values", "exit_code", "runs", "aliases",
                                            "metadata", "ns", "project", "tags", "config", "mode"]))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
                        max_leaves=max_leaves)


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


HEADER = ("v", "t", "stream", "seq")
BOUNDARY_INTS = st.sampled_from([0, -1, 1, (1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) - 1, (1 << 63) - 1,
                                  1 << 63, (1 << 64) - 1, -(1 << 63)])


def _edit_text(draw, text: str) -> str:
    """Another string of the same shape: a prefix of the old one (a path keeps its root) with
    anything after it, control characters and W&B's separators included."""
    keep = text[:draw(st.integers(0, len(text)))]
    tail = draw(st.text(max_size=80) | st.sampled_from(["\x00", "\n", "/", ":", "/../../etc", "x" * 300]))
    return keep + tail


def _mutate_in_place(draw, target, depth: int = 0) -> None:
    """One edit somewhere in `target` (a map or list): drop an entry, replace it with a hostile
    value, give it another value of its own type, or add an entry."""
    if isinstance(target, dict):
        keys = sorted(target)
        nested = [key for key in keys if isinstance(target[key], (dict, list)) and target[key]]
        if nested and depth < 4 and draw(st.booleans()):
            _mutate_in_place(draw, target[draw(st.sampled_from(nested))], depth + 1)
            return
        operation = draw(st.sampled_from(["drop", "replace", "retype", "retype", "add"]))
        if operation == "add" or not keys:
            target[draw(KEYS)] = draw(hostile_values())
            return
        # Mostly the payload: a broken header (v, t, stream, seq) is refused before anything else.
        payload = [key for key in keys if key not in HEADER] if depth == 0 else keys
        key = draw(st.sampled_from(payload if payload and draw(st.integers(0, 3)) else keys))
        if operation == "drop":
            del target[key]
        elif operation == "replace":
            target[key] = draw(hostile_values())
        else:
            target[key] = _same_type(draw, target[key])
    elif isinstance(target, list) and target:
        index = draw(st.integers(0, len(target) - 1))
        target[index] = _same_type(draw, target[index]) if draw(st.booleans()) else draw(hostile_values())


def _same_type(draw, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(BOUNDARY_INTS | st.integers(-(1 << 63), (1 << 64) - 1))
    if isinstance(value, float):
        return draw(FLOATS)
    if isinstance(value, str):
        return _edit_text(draw, value)
    if isinstance(value, list):
        return value + draw(st.lists(hostile_values(4), min_size=1, max_size=3))
    if isinstance(value, dict):
        value = dict(value)
        _mutate_in_place(draw, value)
        return value
    return draw(hostile_values())


@st.composite
def mutated_messages(draw, kinds=protocol.CLIENT_KINDS) -> dict:
    """A valid message with 1..3 edits (see _mutate_in_place), at any level."""
    message = draw(valid_messages(kinds=kinds))
    for _ in range(draw(st.integers(1, 3))):
        _mutate_in_place(draw, message)
    return message


@st.composite
def mutated_frames(draw) -> bytes:
    """A valid frame with 1..4 byte-level edits: flip, overwrite with a msgpack marker, insert,
    delete, truncate, duplicate a slice."""
    frame = bytearray(pack(draw(valid_messages())))
    markers = st.sampled_from([0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc7, 0xca, 0xcb, 0xcf, 0xd3, 0xd4, 0xd9, 0xdb,
                               0xdc, 0xdd, 0xde, 0xdf, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xff, 0x00, 0x7f])
    for _ in range(draw(st.integers(1, 4))):
        if not frame:
            break
        at = draw(st.integers(0, len(frame) - 1))
        operation = draw(st.sampled_from(["flip", "marker", "insert", "delete", "truncate", "duplicate"]))
        if operation == "flip":
            frame[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "marker":
            frame[at] = draw(markers)
        elif operation == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=9))
        elif operation == "delete":
            del frame[at:at + draw(st.integers(1, 8))]
        elif operation == "truncate":
            del frame[at:]
        else:
            frame[at:at] = frame[at:at + draw(st.integers(1, 16))]
    return bytes(frame)


# -- comparing ----------------------------------------------------------------------------------

def same(a, b) -> bool:
    """Equal with types kept and floats bit for bit (NaN payloads, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
