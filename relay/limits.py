"""The limits on every value of a wire message, however deep: a frame within the size limit can
still be hostile. relay/protocol.py checks each kind's own fields; `check` holds the whole message
to these:

    types       msgpack's nil, bool, int, float, str, array and map (no bin, no ext)
    nesting     at most MAX_DEPTH levels below the message
    entries     at most MAX_ITEMS in the whole message (and MAX_KEYS in one map or array: the
                unpacker's limit, in relay/protocol.py's decode_raw)
    keys        strings of 1..MAX_KEY_LEN characters
    strings     at most MAX_STR_LEN characters
    integers    signed 64-bit (SQLite and wandb-core hold no more)

The relay checks every frame it takes in, so `check` is built for the common case, a message
within the limits: one pass that builds no path string (a log record of 40 metrics in ~4 µs,
where the walk that names faults takes ~25 µs). Only when that pass meets a value it does not
accept at once does a second walk decide, naming the first value over a limit and where it is
(`message.settings.config.lr ...`).

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

from typing import Any, Dict

from relay.errors import ProtocolError

MAX_KEYS = 10000          # entries of one map or array
MAX_ITEMS = 20000         # map entries and array items of a whole message, all levels together
MAX_KEY_LEN = 256
MAX_STR_LEN = 65536
MAX_DEPTH = 8
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def check(message: Dict[str, Any]) -> None:
    """Raise ProtocolError naming the first value of `message` over a limit."""
    if not _within(message):
        _find_fault(message, "message", 0, [MAX_ITEMS])


def show(value: Any, limit: int = 80) -> str:
    """repr() of a client-sent value for an error message: control characters escaped, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(%d characters)" % len(text)


def _within(message: Dict[str, Any]) -> bool:
    """Whether the message is within the limits: one pass over an explicit stack of (map or array,
    depth) that builds no path. False also for what it does not recognise at once (a subclass of
    dict or int, say): _find_fault decides those."""
    if type(message) is not dict:
        return False
    entries = 0
    pending = [(message, 0)]
    while pending:
        node, depth = pending.pop()
        entries += len(node)
        if entries > MAX_ITEMS:
            return False
        if not node:
            continue
        if depth >= MAX_DEPTH:  # its entries would lie deeper than MAX_DEPTH
            return False
        if type(node) is dict:
            for key in node:
                if type(key) is not str or len(key) > MAX_KEY_LEN:
                    return False
            if "" in node:
                return False
            values = node.values()
        else:
            values = node
        for value in values:
            kind = type(value)
            if kind is float or kind is bool or value is None:
                continue
            if kind is int:
                if not INT_MIN <= value <= INT_MAX:
                    return False
            elif kind is str:
                if len(value) > MAX_STR_LEN:
                    return False
            elif kind is dict or kind is list:
                pending.append((value, depth + 1))
            else:
                return False
    return True


def _find_fault(value: Any, where: str, depth: int, budget: list) -> None:
    """Walk `value` (at `where`, `depth` levels down) in order, and raise ProtocolError at the first
    value over a limit. `budget` is [entries left] for the whole message."""
    if depth > MAX_DEPTH:
        raise ProtocolError("%s is nested deeper than %d levels" % (where, MAX_DEPTH))
    if isinstance(value, (dict, list)):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise ProtocolError("message has more than %d map entries and array items in all (at %s)"
                                % (MAX_ITEMS, where))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN:
                raise ProtocolError("%s has a key that is not a 1..%d character string: %s"
                                    % (where, MAX_KEY_LEN, show(key)))
            _find_fault(item, "%s.%s" % (where, key if key.isprintable() else repr(key)), depth + 1, budget)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _find_fault(item, "%s[%d]" % (where, index), depth + 1, budget)
    elif isinstance(value, str):
        if len(value) > MAX_STR_LEN:
            raise ProtocolError("%s is a string of %d characters, over the %d limit" % (where, len(value), MAX_STR_LEN))
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError("%s is an integer outside the signed 64-bit range" % where)
    elif value is not None and not isinstance(value, (bool, float)):
        raise ProtocolError("%s is a msgpack %s; only nil, bool, int, float, str, arrays and maps are accepted"
                            % (where, "bin" if isinstance(value, bytes) else "ext (%s)" % type(value).__name__))
