"""Wire protocol v1, shared by the trainer-side client and the relay.

Every frame is one msgpack map. Every message carries:

    v       protocol version (int, currently 1)
    t       kind (str)
    stream  the sender's stream id (str): one per client object, random
    seq     per-stream sequence number (int), strictly increasing from 1

Client -> relay kinds and their own fields:

    open        run, settings {project, entity, name, group, tags, notes, config, mode}
    log         run, metrics {name: scalar}, frame?, epoch?, ns?, time
    checkpoint  run, path, metadata {..}, aliases [..], time
    summary     run, values {name: scalar}
    finish      run, exit_code, time
    status      (nothing else; answered, never spooled)
    heartbeat   runs [run ids]: the trainer is alive (sent every few seconds from a client thread;
                never spooled, never answered, seq 0). A run silent for the relay's
                `silence_timeout` is finished in W&B with a non-zero exit code.

Relay -> client kinds:

    ack     upto (highest contiguous seq committed), seqs [[lo, hi], ...] (ranges committed
            by this batch, including ones above `upto` and re-acked duplicates)
    error   seq, reason: the message can never be accepted; its seq is consumed (also acked)
    status  runs [...], spool_bytes, ... (the reply to `status`)

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import msgpack

VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
MAX_FRAME_BYTES = 1 << 20  # 1 MiB; the relay also sets ZMQ_MAXMSGSIZE a little above this

# Structural limits: a frame within the size limit can still be hostile.
MAX_KEYS = 10000
MAX_KEY_LEN = 256
MAX_STR_LEN = 65536
MAX_DEPTH = 8

RECORD_KINDS = ("open", "log", "checkpoint", "summary", "finish")
UNSPOOLED_KINDS = ("status", "heartbeat")
CLIENT_KINDS = RECORD_KINDS + UNSPOOLED_KINDS
WANDB_MODES = ("online", "offline", "disabled")


class ProtocolError(ValueError):
    """A frame that can never be accepted. `stream`/`seq` are set when they could be read."""

    def __init__(self, reason: str, stream: Optional[str] = None, seq: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.stream = stream
        self.seq = seq


def encode(message: Dict[str, Any]) -> bytes:
    """Pack a message. Values msgpack does not know (numpy scalars, 0-d tensors) go through
    `to_scalar`; anything else unsupported raises TypeError naming the value."""
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
    stream = stream if isinstance(stream, str) and 0 < len(stream) <= MAX_KEY_LEN else None
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None
    try:
        validate(message)
    except ProtocolError as exc:
        raise ProtocolError(exc.reason, stream, seq)
    return message


def validate(message: Dict[str, Any]) -> None:
    if message.get("v") != VERSION:
        raise ProtocolError("unsupported protocol version %r (this relay speaks %d)" % (message.get("v"), VERSION))
    kind = message.get("t")
    if kind not in CLIENT_KINDS:
        raise ProtocolError("unknown message kind %r" % (kind,))
    _require(message, "stream", str)
    if not 0 < len(message["stream"]) <= MAX_KEY_LEN:
        raise ProtocolError("field 'stream' must be 1..%d characters" % MAX_KEY_LEN)
    _require(message, "seq", int)
    if kind == "status":
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
        raise ProtocolError("run id %r must be 1..64 characters of letters, digits, '-' or '_'" % message["run"])
    _check_value(message, "message", 0)
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
        if message.get("metadata") is not None:
            _require(message, "metadata", dict)
        aliases = message.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ProtocolError("field 'aliases' must be a list of non-empty strings")
    elif kind == "summary":
        _require(message, "values", dict)
        _check_scalars(message["values"], "values")
    elif kind == "finish":
        _require(message, "exit_code", int)


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
    if not settings.get("project"):
        raise ProtocolError("run setting 'project' is required")
    if not all(isinstance(tag, str) for tag in settings.get("tags") or []):
        raise ProtocolError("run setting 'tags' must be a list of strings")
    if settings.get("mode") is not None and settings["mode"] not in WANDB_MODES:
        raise ProtocolError("run setting 'mode' must be one of %s" % ", ".join(WANDB_MODES))


def valid_run_id(run_id: str) -> bool:
    return 0 < len(run_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in run_id)


def _require(message: Dict[str, Any], field: str, kind: type) -> None:
    value = message.get(field)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError("field %r must be %s, got %s" % (field, kind.__name__, type(value).__name__))


def _check_scalars(values: Dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if not isinstance(value, (int, float, str, bool)):
            raise ProtocolError("%s[%r] must be int, float, bool or str, got %s" % (where, key, type(value).__name__))


def _check_value(value: Any, where: str, depth: int) -> None:
    """Limits on nesting, key length and string length for any value in a message."""
    if depth > MAX_DEPTH:
        raise ProtocolError("%s is nested deeper than %d levels" % (where, MAX_DEPTH))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN:
                raise ProtocolError("%s has a key that is not a 1..%d character string" % (where, MAX_KEY_LEN))
            _check_value(item, "%s.%s" % (where, key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, "%s[%d]" % (where, index), depth + 1)
    elif isinstance(value, (str, bytes)) and len(value) > MAX_STR_LEN:
        raise ProtocolError("%s is longer than %d" % (where, MAX_STR_LEN))


def to_scalar(value: Any) -> Any:
    """Turn a metric value into an int/float/bool/str for the wire.

    Numpy scalars and 0-d torch tensors are converted with `.item()` (for CUDA tensors that is a
    device sync: batch them first, as relay.rl_games does). Anything else raises TypeError.
    """
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
