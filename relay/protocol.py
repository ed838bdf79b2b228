"""Wire protocol v1, shared by the trainer-side client and the relay.

Every frame is one msgpack map. Every message carries:

    v       protocol version (int, currently 1)
    t       kind (str)
    stream  the sender's stream id (str): one per client object, random
    seq     per-stream sequence number (int), strictly increasing from 1

Client -> relay kinds and their own fields:

    open        run, settings {project, entity, name, group, tags, notes, config, mode}, meta? (true: the
                client sends a `meta` record for the run; the relay waits a little for it before
                starting the W&B run, whose host, program and commit it sets)
    log         run, metrics {name: scalar}, frame?, epoch?, ns?, time, with_media? (true: a `media`
                record joining this row follows; the relay holds the row a moment for it)
    checkpoint  run, path, metadata {..}, aliases [..], time, stat? {size, mtime_ns}: the file as
                the client saw it when it was logged (the relay refuses it if it has changed since)
    summary     run, values {name: scalar}
    media       run, values {name: item}, frame?, epoch?, ns?, time, joins? (the seq of the `log`
                record of the same `run.log` call, whose row it joins): images, videos, audio and
                HTML by path, histograms; relay/media.py specifies the items
    finish      run, exit_code, time
    console     run, lines [[stream, text], ...], dropped, time: the trainer's console. `stream` is
                "out" (stdout) or "err" (stderr), `text` one line without its "\n" (at most
                MAX_CONSOLE_LINES lines a record); `dropped` (int >= 0) counts the lines the client
                dropped since its previous console record (its limits: relay/console.py). Takes no
                W&B step.
    meta        run, provenance {host, program, args, root, ..., git {commit, remote_url, dirty}},
                diff? (str): where and how the trainer runs, taken on the trainer's node once per run
                (relay/provenance.py says what each field holds); the relay hands it to W&B as the
                run's metadata, `diff` (the uncommitted changes) as the run file diff.patch
    system      run, values {name: number}, time: one sample of the trainer node's system metrics
                (relay/sysmetrics.py), named as W&B names its own (`cpu`, `gpu.0.temp`, ...)
    status      page? (answered, never spooled): without `page`, the relay-wide totals and the
                runs worth a look (the active ones, the last few finished); with `page` (0, then
                the reply's `next`), the same totals and every run in turn, a page at a time
    heartbeat   runs [run ids]: the trainer is alive (sent every few seconds from a client thread;
                never spooled, never answered, seq 0). A run silent for the relay's
                `silence_timeout` is finished in W&B with a non-zero exit code.

Relay -> client kinds:

    ack     upto (highest contiguous seq committed), seqs [[lo, hi], ...] (ranges committed
            by this batch, including ones above `upto` and re-acked duplicates)
    error   seq, reason: the message can never be accepted; its seq is consumed (also acked)
    status  stream, runs [...], records {totals}, run_counts {...}, next (with `page`),
            spool_bytes, ... (the reply to `status`; relay/spool_report.py's SpoolReport.status
            says what each holds). One client gets one reply per batch the relay reads, however
            many requests it sent: to the last of them, whose `stream` the reply carries.
    resend  (no other fields): the relay held records of this client for want of room (spool
            full, disk reserve reached, a failed spool write) and takes records again: send what is
            unacked now rather than after the re-send backoff. Per client (its socket), not per
            stream. Sent at most once per hold, NOBLOCK, to at most relay/room.py's
            MAX_HELD_CLIENTS clients; one not told re-sends after its backoff as before.

A client ignores reply kinds it does not know (an older client ignores `resend`).

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import msgpack

from relay import limits, media, provenance
from relay.errors import ProtocolError  # noqa: F401 (part of this module's API)
# Structural limits on every value of a message (types, nesting, entries, key, string and integer
# sizes): relay/limits.py. Part of this module's API too.
from relay.limits import INT_MAX, INT_MIN, MAX_DEPTH, MAX_ITEMS, MAX_KEY_LEN, MAX_KEYS, MAX_STR_LEN  # noqa: F401
from relay.limits import show as _show

VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
MAX_FRAME_BYTES = 1 << 20  # 1 MiB; the relay sets ZMQ_MAXMSGSIZE to twice this (ZeroMQ drops bigger)

EXIT_CODE_MIN, EXIT_CODE_MAX = -(1 << 31), (1 << 31) - 1  # W&B's exit code is an int32

# What W&B itself refuses (wandb 0.31's own checks): refused here, where the trainer is told why,
# rather than in an uploader that would fail on the record for ever.
MAX_PROJECT_LEN = 128
PROJECT_FORBIDDEN = "/\\#?%:"
MAX_TAG_LEN = 64
ALIAS_FORBIDDEN = "/:"
MAX_METADATA_KEYS = 100

RECORD_KINDS = ("open", "log", "checkpoint", "summary", "finish", "media", "console", "meta", "system")
UNSPOOLED_KINDS = ("status", "heartbeat")
CLIENT_KINDS = RECORD_KINDS + UNSPOOLED_KINDS
WANDB_MODES = ("online", "offline", "disabled")
CONSOLE_STREAMS = ("out", "err")
MAX_CONSOLE_LINES = 1000


def encode(message: Dict[str, Any]) -> bytes:
    """Pack a message. Values msgpack does not know (numpy scalars, 0-d tensors, integers beyond
    64 bits) go through `to_scalar`; anything unsupported raises TypeError naming the value."""
    return msgpack.packb(message, use_bin_type=True, default=to_scalar)


def decode_raw(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Dict[str, Any]:
    """Unpack a frame into a map without checking its kind-specific shape."""
    if len(frame) > max_bytes:
        raise ProtocolError("frame of %d bytes is over the %d-byte limit" % (len(frame), max_bytes))
    try:
        message = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_STR_LEN, max_bin_len=max_bytes,
            max_array_len=MAX_KEYS, max_map_len=MAX_KEYS,
        )
    except msgpack.StackError:
        raise ProtocolError("frame is not valid msgpack (nested deeper than the unpacker's stack)")
    except msgpack.ExtraData:
        raise ProtocolError("frame is not valid msgpack (bytes after the end of the first value)")
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ProtocolError("frame is not valid msgpack (%s: %s)" % (type(exc).__name__, exc))
    if not isinstance(message, dict):
        raise ProtocolError("frame is a msgpack %s, not a map" % type(message).__name__)
    return message


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Dict[str, Any]:
    """Unpack and validate a client frame. Raises ProtocolError naming what is wrong."""
    message = decode_raw(frame, max_bytes)
    stream = message.get("stream")
    seq = message.get("seq")
    stream = stream if _valid_stream(stream) else None
    seq = seq if _is_int(seq) and 0 <= seq <= INT_MAX else None
    try:
        validate(message)
    except ProtocolError as exc:
        raise ProtocolError(exc.reason, stream, seq)
    return message


def validate(message: Dict[str, Any]) -> None:
    version = message.get("v")
    if not _is_int(version) or version != VERSION:
        raise ProtocolError("unsupported protocol version %s (this relay speaks %d)" % (_show(version), VERSION))
    kind = message.get("t")
    if not isinstance(kind, str) or kind not in CLIENT_KINDS:
        raise ProtocolError("unknown message kind %s" % _show(kind))
    _require(message, "stream", str)
    if not _valid_stream(message["stream"]):
        raise ProtocolError("field 'stream' must be 1..%d printable characters" % MAX_KEY_LEN)
    _require(message, "seq", int)
    limits.check(message)
    if kind == "status":
        page = message.get("page")
        if page is not None and not (_is_int(page) and 0 <= page <= INT_MAX):
            raise ProtocolError("field 'page' must be an int >= 0, got %s" % _show(page))
        return
    if kind == "heartbeat":
        runs = message.get("runs")
        if not isinstance(runs, list) or len(runs) > 1000 or not all(
                isinstance(run, str) and valid_run_id(run) for run in runs):
            raise ProtocolError("field 'runs' must be a list of run ids")
        return
    if message["seq"] < 1:
        raise ProtocolError("field 'seq' must be >= 1")
    _require(message, "run", str)
    if not valid_run_id(message["run"]):
        raise ProtocolError("run id %s must be 1..64 characters of letters, digits, '-' or '_'"
                            % _show(message["run"]))
    if kind == "open":
        _require(message, "settings", dict)
        validate_settings(message["settings"])
    elif kind == "log":
        _require(message, "metrics", dict)
        _check_scalars(message["metrics"], "metrics")
        for axis in ("frame", "epoch"):
            if message.get(axis) is not None:
                _require(message, axis, int)
        if message.get("ns") is not None:
            _require(message, "ns", str)
    elif kind == "checkpoint":
        _require(message, "path", str)
        if not message["path"]:
            raise ProtocolError("field 'path' is empty")
        if not message["path"].isprintable():
            raise ProtocolError("field 'path' contains a control character")
        if message.get("metadata") is not None:
            _require(message, "metadata", dict)
            _check_metadata(message["metadata"])
        seen = message.get("stat")
        if seen is not None and not (isinstance(seen, dict) and set(seen) == {"size", "mtime_ns"}
                                     and all(_is_int(value) for value in seen.values())):
            raise ProtocolError("field 'stat' must be {size: int, mtime_ns: int}")
        aliases = message.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ProtocolError("field 'aliases' must be a list of non-empty strings")
        for alias in aliases:
            if any(c in alias for c in ALIAS_FORBIDDEN):
                raise ProtocolError("alias %s contains %s (W&B forbids '/' and ':' in aliases)"
                                    % (_show(alias), " or ".join(repr(c) for c in ALIAS_FORBIDDEN if c in alias)))
    elif kind == "summary":
        _require(message, "values", dict)
        _check_scalars(message["values"], "values")
    elif kind == "media":
        _check_media(message)
    elif kind == "console":
        _check_console(message)
    elif kind == "finish":
        _require(message, "exit_code", int)
        if not EXIT_CODE_MIN <= message["exit_code"] <= EXIT_CODE_MAX:
            raise ProtocolError("field 'exit_code' %d is outside the 32-bit range W&B stores" % message["exit_code"])
    elif kind == "meta":
        provenance.validate(message)
    elif kind == "system":
        _require(message, "values", dict)
        for key, value in message["values"].items():
            if type(value) not in (int, float):
                raise ProtocolError("values[%s] must be a number, got %s" % (_show(key), type(value).__name__))


SETTINGS_FIELDS = {
    "project": str, "entity": str, "name": str, "group": str, "notes": str,
    "tags": list, "config": dict, "mode": str, "job_type": str,
}


def validate_settings(settings: Dict[str, Any]) -> None:
    for key, value in settings.items():
        if key not in SETTINGS_FIELDS:
            raise ProtocolError("unknown run setting %r (known: %s)" % (key, ", ".join(sorted(SETTINGS_FIELDS))))
        if value is not None and not isinstance(value, SETTINGS_FIELDS[key]):
            raise ProtocolError("run setting %r must be %s, got %s"
                                % (key, SETTINGS_FIELDS[key].__name__, type(value).__name__))
    project = settings.get("project")
    if not project:
        raise ProtocolError("run setting 'project' is required")
    if len(project) > MAX_PROJECT_LEN:
        raise ProtocolError("run setting 'project' is %d characters; W&B allows at most %d"
                            % (len(project), MAX_PROJECT_LEN))
    bad = sorted(set(PROJECT_FORBIDDEN) & set(project))
    if bad:
        raise ProtocolError("run setting 'project' %s contains %s, which W&B forbids in project names"
                            % (_show(project), ", ".join(repr(c) for c in bad)))
    for tag in settings.get("tags") or []:
        if not isinstance(tag, str):
            raise ProtocolError("run setting 'tags' must be a list of strings, got a %s" % type(tag).__name__)
        if not 0 < len(tag) <= MAX_TAG_LEN:
            raise ProtocolError("tag %s is %d characters; W&B tags are 1..%d" % (_show(tag), len(tag), MAX_TAG_LEN))
    if settings.get("mode") is not None and settings["mode"] not in WANDB_MODES:
        raise ProtocolError("run setting 'mode' must be one of %s" % ", ".join(WANDB_MODES))


def valid_run_id(run_id: str) -> bool:
    """1..64 ASCII letters, digits, '-' and '_' (ASCII isalnum() holds for letters and digits only)."""
    return 0 < len(run_id) <= 64 and run_id.isascii() and run_id.replace("-", "a").replace("_", "a").isalnum()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_stream(stream: Any) -> bool:
    return isinstance(stream, str) and 0 < len(stream) <= MAX_KEY_LEN and stream.isprintable()


def _require(message: Dict[str, Any], field: str, kind: type) -> None:
    value = message.get(field)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError("field %r must be %s, got %s" % (field, kind.__name__, type(value).__name__))


_SCALAR_TYPES = frozenset((int, float, str, bool))


def _check_scalars(values: Dict[str, Any], where: str) -> None:
    if set(map(type, values.values())) <= _SCALAR_TYPES:  # the common case, a type at a time
        return
    for key, value in values.items():
        if not isinstance(value, (int, float, str, bool)):
            raise ProtocolError("%s[%s] must be int, float, bool or str, got %s"
                                % (where, _show(key), type(value).__name__))


def _check_media(message: Dict[str, Any]) -> None:
    _require(message, "values", dict)
    media.check_values(message["values"])
    for axis in ("frame", "epoch", "joins"):
        if message.get(axis) is not None:
            _require(message, axis, int)
    if message.get("ns") is not None:
        _require(message, "ns", str)


def _check_console(message: Dict[str, Any]) -> None:
    lines = message.get("lines")
    if not isinstance(lines, list) or len(lines) > MAX_CONSOLE_LINES:
        raise ProtocolError("field 'lines' must be a list of at most %d [stream, text] pairs" % MAX_CONSOLE_LINES)
    for index, line in enumerate(lines):
        if not (isinstance(line, list) and len(line) == 2 and line[0] in CONSOLE_STREAMS and isinstance(line[1], str)):
            raise ProtocolError("lines[%d] must be [stream, text] with stream 'out' or 'err' and text a str, got %s"
                                % (index, _show(line)))
    dropped = message.get("dropped")
    if not (_is_int(dropped) and dropped >= 0):
        raise ProtocolError("field 'dropped' must be an int >= 0, got %s" % _show(dropped))
    if message.get("time") is not None and not isinstance(message["time"], (int, float)):
        raise ProtocolError("field 'time' must be a number, got %s" % type(message["time"]).__name__)


def _check_metadata(metadata: Dict[str, Any]) -> None:
    """W&B artifact metadata: JSON without infinities, at most MAX_METADATA_KEYS keys."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise ProtocolError("checkpoint metadata has %d keys; W&B allows at most %d"
                            % (len(metadata), MAX_METADATA_KEYS))
    pending = list(metadata.items())
    while pending:
        key, value = pending.pop()
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            raise ProtocolError("checkpoint metadata %s is %r; W&B artifact metadata cannot hold infinities"
                                % (_show(key), value))
        if isinstance(value, dict):
            pending.extend(value.items())
        elif isinstance(value, list):
            pending.extend((key, item) for item in value)


def to_scalar(value: Any) -> Any:
    """Turn a metric value into an int/float/bool/str for the wire.

    Numpy scalars and 0-d torch tensors are converted with `.item()` (for CUDA tensors that is a
    device sync: batch them first, as relay.rl_games does). Anything else raises TypeError.
    """
    if isinstance(value, int):  # msgpack hands over the integers it cannot carry
        raise TypeError("integer metric value %d is outside the 64-bit range the wire carries" % value)
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", 0) == 0:
        converted = item()
        if isinstance(converted, (bool, int, float, str)):
            return converted
    raise TypeError("metric value %r of type %s is not a number, bool, str or 0-d tensor"
                    % (value, type(value).__name__))


def ranges(seqs) -> list:
    """[1, 2, 3, 7, 8] -> [[1, 3], [7, 8]] (input sorted ascending)."""
    out = []
    for seq in seqs:
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out
