"""Small pure watches the relay keeps: refusal warnings per minute, trainers' silence on the
monotonic clock, and acked records lost in a gap. Bookkeeping only: no sockets, no spool; the
caller (relay/intake.py, relay/supervisor.py) acts on what they say."""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("relay.server")

REFUSALS_LOGGED = 20  # refusal warnings logged per minute at most; the rest are counted


class RefusalLog:
    """Refusal warnings, at most `limit` a minute, so that a client sending garbage in a loop does
    not fill the log (or the disk under it). What is left out is counted, and one line says how
    many when the minute is over (or the relay stops); `relay status` counts every refusal."""

    def __init__(self, limit: int = REFUSALS_LOGGED, window: float = 60.0):
        self.limit = limit
        self.window = window
        self.window_start = -window  # the first warning opens a window
        self.logged = 0
        self.left_out = 0

    def warn(self, message: str, *args: Any) -> None:
        self.roll()
        if self.logged < self.limit:
            self.logged += 1
            log.warning(message, *args)
        else:
            self.left_out += 1

    def roll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.window_start + self.window:
            return
        if self.left_out:
            log.warning("%d more refusals in the last %.0f s were not logged (the first %d were; `relay status` "
                        "counts them all)", self.left_out, min(self.window, now - self.window_start), self.limit)
        self.window_start, self.logged, self.left_out = now, 0, 0


class SilenceWatch:
    """When each run's trainer was last heard from (a record or a heartbeat), on the monotonic
    clock: a wall-clock jump (NTP, a VM resumed, an operator) neither finishes a live run nor
    keeps a dead one open. Silence counts from this relay's start at the earliest (trainers
    reconnect when it is back), so at start every unfinished run is counted as just heard from.
    Pure bookkeeping: the caller passes the time."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.last_heard: dict[str, float] = {}

    def heard(self, run_ids: Any, now: float) -> None:
        for run_id in run_ids:
            self.last_heard[run_id] = now

    def silent(self, now: float) -> list[str]:
        """Runs not heard from for `timeout` seconds (0: never any); they are forgotten until heard again."""
        if self.timeout <= 0:
            return []
        runs = [run_id for run_id, heard in self.last_heard.items() if now - heard >= self.timeout]
        for run_id in runs:
            del self.last_heard[run_id]
        return runs


class GapWatch:
    """Finds acked records that the spool no longer holds (a damaged or cut WAL), from how clients
    re-send. A client holds every record the relay has not acked, never one it acked, and while no
    ack makes progress it sends them all again, oldest first, about once a second. Live records
    are taken in seq order, so a record past a gap (seq > upto + 1) is answered with `upto`, and
    the client's next pass starts at the oldest record it holds. When `PASSES` passes in a row
    start at the same seq P past the gap, seqs upto+1..P-1 are held by no one: they were acked and
    lost, and waiting longer would stop the stream (and its run) forever. One pass starting
    elsewhere (a message delayed across a reconnect) starts the count again. Pure bookkeeping."""

    PASSES = 3

    def __init__(self) -> None:
        self.streams: dict[str, list[int]] = {}   # stream -> [last seq seen, start of the last pass, passes there]

    def past_gap(self, stream: str, seq: int) -> int | None:
        """A record of `stream` came past a gap. Returns P once the client has shown that it holds
        nothing below P (then the watch of this stream starts over)."""
        state = self.streams.get(stream)
        if state is None:
            self.streams[stream] = [seq, seq, 0]   # the first one seen: not known to start a pass
            return None
        last, start, passes = state
        if seq <= last:  # the client went back: a pass starts here
            passes = passes + 1 if seq == start else 1
            start = seq
        state[:] = [seq, start, passes]
        if passes >= self.PASSES:
            del self.streams[stream]
            return start
        return None

    def filled(self, stream: str) -> None:
        """The stream's next record came: there is no gap (any more)."""
        self.streams.pop(stream, None)
