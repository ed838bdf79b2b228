"""The rl_games observer's rows: scalars buffered per epoch, sent as one `run.log` row each.

Rows: everything written between two `update_epoch` calls (without one, two `after_steps` calls) is
one row. For agents that call neither (rl_games' SAC), a row ends when a tag written since the last
`after_print_stats` is written again. Every row is also sent before a checkpoint is reported and when training ends;
the relay merges rows logged with the same `frame`.

Values: Python numbers (and numpy scalars) pass through. Torch tensors are never `.item()`-ed one
by one: at the end of a row, the row's 1-element tensors are stacked per device
(`torch.stack([v.detach().reshape(()).double() ...])`, float32 off CPU/CUDA) and copied to the host
in ONE transfer; from CUDA the copy goes non-blocking into pinned memory and a CUDA event is
recorded. The row is logged when the event has fired (looked at, without waiting, at every
`process_infos`/`after_steps`), and at the latest at the next row, checkpoint or end of training
(so at most one sync per row, normally none). Tensors with more than one element are not sent.
Float64 is used so that int and float64 tensors keep their value.

`extras(epoch)`, when given, adds values to a row as it is sent (the observer's histograms of the
epoch's actions and rewards).

Standard library and relay.tensors only at import time (Python 3.8).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple  # noqa: F401 (in type comments)

from relay.integrations.rl_games_tags import map_tag
from relay.tensors import Waiting, start_transfer

Stamp = Tuple[Optional[int], Optional[int]]  # (frame, epoch)


class Rows(object):
    """The scalars of the epoch under way, and the rows whose copy to the host is under way.

    `send(values, frame, epoch)` logs a finished row; `counters()` is the agent's own (frame,
    epoch), used when no `after_print_stats` stamped the row; `warn_once(key, text)` says a
    problem once. Nothing here raises into training: problems are warned about."""

    def __init__(self, send, counters, warn_once, extras=None):
        # type: (Callable[[Dict[str, Any], Optional[int], Optional[int]], None], Callable[[], Stamp], Callable[[str, str], None], Optional[Callable[[Optional[int]], Dict[str, Any]]]) -> None
        self._send = send
        self._extras = extras      # epoch -> values added to that epoch's row when it is sent (histograms)
        self._counters = counters
        self._warn_once = warn_once
        self.row = {}              # type: Dict[str, Any]   (W&B name -> value, this row)
        self.tags = set()          # raw tags written since the epoch's stamp (a repeat = a new epoch)
        self.stamp = None          # type: Optional[Tuple[int, int]]  (frame, epoch) from after_print_stats
        self.fallback = None       # type: Optional[Stamp]
        self.logged = None         # type: Optional[Stamp]  (frame, epoch) of the last row
        self.waiting = Waiting()   # the rows whose copy to the host is under way: ((frame, epoch), extras)
        self.seen_after_steps = False
        self.names = {}            # type: Dict[str, str]  (tag -> name cache)
        self.closed = False        # the run finished: record nothing more

    def record(self, tag: str, value: Any) -> None:
        """A scalar the agent wrote (through the RelayWriter)."""
        if self.closed:
            return
        try:
            name = self.names.get(tag)
            if name is None:
                name = self.names[tag] = map_tag(str(tag))
            if tag in self.tags:
                if self.stamp is not None or not self.seen_after_steps:
                    if self.row:
                        self.flush()  # the same tag again after the epoch's stats: a new epoch
                    self.stamp = None
                    self.tags.clear()
            self.tags.add(tag)
            if not self.row and self.stamp is None:
                self.fallback = self._counters()
            self.row[name] = value
        except Exception as exc:  # the relay must never break training
            self._warn_once("record", "relay: could not record %r: %s" % (tag, exc))

    def end_row(self) -> None:
        """An epoch ended: send its row (logged once its device copy has landed)."""
        self.seen_after_steps = True
        if self.row:
            self.flush()
        else:
            self.poll()
        self.stamp = None
        self.tags.clear()

    def print_stats(self, frame: Any, epoch_num: Any) -> None:
        """rl_games' `after_print_stats`: the (frame, epoch) of the row under way."""
        stamp = (int(frame), int(epoch_num))
        if self.stamp is not None and stamp != self.stamp:
            if self.row:
                self.flush()  # an agent that skipped after_steps: the old epoch's row ends here
            self.tags.clear()
        self.stamp = stamp

    def flush(self, wait: bool = False) -> None:
        """Send the buffered row (its copy to the host started now; logged when it is done). The
        row before it is logged first, waited for if need be: at most one row is under way."""
        self.complete(wait=True)
        if self.row:
            row, self.row = self.row, {}
            frame, epoch = self.stamp if self.stamp is not None else (self.fallback or (None, None))
            self.logged = (_as_int(frame), _as_int(epoch))
            transfer = start_transfer(row)
            if transfer.skipped:
                self._warn_once("skipped:" + ",".join(transfer.skipped),
                                "relay: not sent (not a single number): %s" % ", ".join(transfer.skipped))
            extra = self._extra(self.logged[1])
            self.waiting.add((self.logged, extra), transfer)
            if not transfer.events or wait:
                self.complete(wait=True)

    def _extra(self, epoch: Optional[int]) -> Dict[str, Any]:
        if self._extras is None:
            return {}
        try:
            return self._extras(epoch)
        except Exception as exc:  # the relay must never break training
            self._warn_once("extras", "relay: could not add to the row of epoch %s: %s" % (epoch, exc))
            return {}

    def poll(self) -> None:
        """Log the rows whose copy has landed, without waiting."""
        if self.waiting:
            self.complete(wait=False)

    def complete(self, wait: bool) -> None:
        """Log the rows whose copy has landed (`wait`: all of them, waiting for the copies)."""
        try:
            for ((frame, epoch), extra), values in self.waiting.landed(wait):
                try:
                    self._send(dict(values, **extra) if extra else values, frame, epoch)
                except Exception as exc:
                    self._warn_once("log", "relay: could not send a row: %s" % exc)
        except Exception as exc:  # the copy itself failed
            self._warn_once("poll", "relay: a row was lost: %s" % exc)

    def checkpoint_stamp(self):
        # type: () -> Stamp
        """(frame, epoch) for a checkpoint: those of this epoch's row, so that the checkpoint sits on
        the chart where its row does (TokenHSI's agents add the epoch's frames to `algo.frame`
        before they save); the agent's own counters when no row was logged yet."""
        if self.stamp is not None:
            return _as_int(self.stamp[0]), _as_int(self.stamp[1])
        if self.logged is not None:
            return self.logged
        frame, epoch = self._counters()
        return _as_int(frame), _as_int(epoch)


def _as_int(value: Any) -> Optional[int]:
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, int) else value
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return int(number)
    except (TypeError, ValueError):
        return None
