"""`RelayWriter`: stands in for an rl_games agent's TensorBoard writer and hands its scalars on.

`install_writer(algo, record)` replaces `algo.writer` with a RelayWriter that calls the original
writer exactly as before and also calls `record(tag, value)` for every scalar; objects that
captured the writer earlier (the central value net's `writter`, the self-play manager's) are
re-pointed too. With no writer (None) it only records, and every other writer method does nothing.

Standard library only (Python 3.8).
"""
from __future__ import annotations

from typing import Any, Callable


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class RelayWriter(object):
    """Stands in for the agent's SummaryWriter: every call reaches the original writer unchanged;
    scalars are also handed to the observer's row buffer."""

    def __init__(self, writer: Any, record: Callable[[str, Any], None]):
        self.__dict__["_relay_writer"] = writer
        self.__dict__["_relay_record"] = record

    @property
    def original(self) -> Any:
        return self.__dict__["_relay_writer"]

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
        writer = self.__dict__["_relay_writer"]
        result = None
        if writer is not None:
            result = writer.add_scalar(tag, scalar_value, global_step, *args, **kwargs)
        self.__dict__["_relay_record"](tag, scalar_value)
        return result

    def add_scalars(self, main_tag, tag_scalar_dict, global_step=None, *args, **kwargs):
        writer = self.__dict__["_relay_writer"]
        result = None
        if writer is not None:
            result = writer.add_scalars(main_tag, tag_scalar_dict, global_step, *args, **kwargs)
        record = self.__dict__["_relay_record"]
        for key, value in dict(tag_scalar_dict).items():
            record("%s/%s" % (main_tag, key), value)
        return result

    def __getattr__(self, name):
        writer = self.__dict__.get("_relay_writer")
        if writer is None:
            if name.startswith("__"):
                raise AttributeError(name)
            return _noop  # flush(), close(), add_histogram(), ... on a relay-only writer
        return getattr(writer, name)

    def __setattr__(self, name, value):
        writer = self.__dict__.get("_relay_writer")
        if writer is None:
            self.__dict__[name] = value
        else:
            setattr(writer, name, value)


def install_writer(algo: Any, record: Callable[[str, Any], None]) -> RelayWriter:
    """Put a RelayWriter in place of `algo.writer` (and of every other reference to it held by an
    attribute of `algo`, e.g. central_value_net.writter, self_play_manager.writter)."""
    original = getattr(algo, "writer", None)
    writer = RelayWriter(original, record)
    algo.writer = writer
    if original is None:
        return writer
    for holder in list(vars(algo).values()):
        attrs = getattr(holder, "__dict__", None)
        if holder is algo or holder is original or not isinstance(attrs, dict):
            continue
        for attr in ("writter", "writer"):
            if attrs.get(attr) is original:
                try:
                    setattr(holder, attr, writer)
                except Exception:
                    pass
    return writer
