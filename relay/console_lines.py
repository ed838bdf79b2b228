"""The console's lines (relay.console): the limits, the buffer that cuts writes into lines and
queues them within the limits, and `quiet()`, which keeps a thread's writes out of the Logs.

`ConsoleBuffer` is pure (no streams, no threads of its own; the clock injected): at most
`max_lines` lines or `max_bytes` characters queued, lines cut at `max_line_length` characters, and
at most `lines_per_second` lines (a token bucket of `burst`). A line over a bound is dropped and
counted, and the count goes with the next batch taken. Lines are queued when they end ("\\n"); a
line redrawn with carriage returns (a progress bar) keeps what follows its last "\\r"; the
unfinished line of each stream is taken last (`take(final=True)`).

Trainer side: standard library only (Python 3.8).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple  # noqa: F401 (type comments)

STREAMS = ("out", "err")          # the wire's names of stdout and stderr
BATCH_LINES = 100                 # lines in one console record at most
BATCH_BYTES = 256 * 1024          # characters in one console record at most (a frame stays under 1 MiB)
BATCH_EVERY = 1.0                 # seconds a queued line waits at most for its record


class ConsoleLimits(object):
    """How much of the console the client takes: see the module's text."""

    def __init__(self, max_lines=10000, max_bytes=4 * 1024 * 1024, max_line_length=4096,
                 lines_per_second=1000.0, burst=10000):
        # type: (int, int, int, float, int) -> None
        for name, value in (("max_lines", max_lines), ("max_bytes", max_bytes),
                            ("max_line_length", max_line_length), ("burst", burst)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError("console limit %s must be an int >= 1, got %r" % (name, value))
        if not isinstance(lines_per_second, (int, float)) or not lines_per_second > 0:
            raise ValueError("console limit lines_per_second must be a number > 0, got %r" % (lines_per_second,))
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_line_length = max_line_length
        self.lines_per_second = float(lines_per_second)
        self.burst = burst


def console_limits(console):
    # type: (Any) -> Optional[ConsoleLimits]
    """`start_run`'s `console` argument: False -> None, True -> the default limits, or the limits given."""
    if isinstance(console, ConsoleLimits):
        return console
    if not isinstance(console, bool):
        raise TypeError("console must be True, False or a relay.console.ConsoleLimits, got %r" % (console,))
    return ConsoleLimits() if console else None


class _Quiet(threading.local):
    on = False


QUIET = _Quiet()  # `on` while the thread is inside quiet()


@contextlib.contextmanager
def quiet():
    # type: () -> Iterator[None]
    """Writes of this thread inside the block reach the terminal but not the run's Logs."""
    before = QUIET.on
    QUIET.on = True
    try:
        yield
    finally:
        QUIET.on = before


class ConsoleBuffer(object):
    """Lines assembled per stream, queued within the limits, taken in batches. Safe from any thread;
    its lock is a leaf (nothing is called while it is held), and reentrant: a signal handler that
    prints while its thread is inside `write` must not wait for itself. `clock` is injected for tests."""

    def __init__(self, limits, clock=time.monotonic):
        # type: (ConsoleLimits, Callable[[], float]) -> None
        self.limits = limits
        self._clock = clock
        self._lock = threading.RLock()
        self._partial = ["", ""]     # the unfinished line of each stream
        self._return = [False, False]  # the stream's last write ended in "\r"
        self._lines = collections.deque()  # type: Deque[Tuple[int, str]]
        self._chars = 0              # characters queued
        self._tokens = float(limits.burst)
        self._refilled = clock()
        self._since = None           # type: Optional[float]  (when the oldest untaken line or drop came)
        self.dropped = 0             # lines dropped since the last batch taken
        self.totals = {"lines": 0, "dropped": 0, "cut": 0}  # lines taken, dropped and cut, up to the last take

    def write(self, index, text):
        # type: (int, str) -> bool
        """Take one write of stream `index`; True when a full batch is queued (worth a nudge)."""
        with self._lock:
            if text == "\n":  # print()'s own write: the commonest
                self._end_line(index)
                return len(self._lines) >= BATCH_LINES
            if "\n" not in text:
                line = self._partial[index] + text
                if "\r" in text or self._return[index] or len(line) > self.limits.max_line_length:
                    self._extend(index, text)
                else:
                    self._partial[index] = line
                return False
            pieces = text.split("\n")
            for piece in pieces[:-1]:
                self._extend(index, piece[:-1] if piece.endswith("\r") else piece)
                self._end_line(index)
            self._extend(index, pieces[-1])
            return len(self._lines) >= BATCH_LINES

    def _extend(self, index, text):
        # type: (int, str) -> None
        if not text:
            return
        line = self._partial[index]
        if self._return[index]:  # a "\r" ended the last write: what comes now draws the line again
            line, self._return[index] = "", False
        if text.endswith("\r"):
            text, self._return[index] = text.rstrip("\r"), True
        cr = text.rfind("\r")
        if cr >= 0:
            line, text = "", text[cr + 1:]
        if len(line) + len(text) > self.limits.max_line_length:
            if len(line) < self.limits.max_line_length:
                self.totals["cut"] += 1
            text = text[:max(0, self.limits.max_line_length - len(line))]
        self._partial[index] = line + text

    def _end_line(self, index):
        # type: (int) -> None
        line = self._partial[index]
        self._partial[index] = ""
        self._return[index] = False
        now = self._clock()
        limits = self.limits
        tokens = self._tokens + (now - self._refilled) * limits.lines_per_second
        self._tokens = tokens if tokens < limits.burst else float(limits.burst)
        self._refilled = now
        if self._since is None:
            self._since = now
        if self._tokens < 1.0 or len(self._lines) >= limits.max_lines or self._chars + len(line) > limits.max_bytes:
            self.dropped += 1
            return
        self._tokens -= 1.0
        self._lines.append((index, line))
        self._chars += len(line)

    def due(self):
        # type: () -> bool
        """Whether a record should be made now: a full batch, or lines or drops waiting BATCH_EVERY."""
        since = self._since
        return since is not None and (len(self._lines) >= BATCH_LINES or self._clock() - since >= BATCH_EVERY)

    def take(self, final=False):
        # type: (bool) -> List[Tuple[List[List[str]], int]]
        """The queued lines as batches of (lines [[stream, text], ...], dropped); the count of
        dropped lines goes with the first batch. `final`: the unfinished lines too, and a batch
        even when only drops are left to tell."""
        with self._lock:
            if final:
                for index in (0, 1):
                    if self._partial[index]:
                        self._lines.append((index, self._partial[index]))
                        self._partial[index] = ""
            batches = []  # type: List[Tuple[List[List[str]], int]]
            dropped, self.dropped = self.dropped, 0
            self.totals["dropped"] += dropped
            self.totals["lines"] += len(self._lines)
            while self._lines:
                lines, size = [], 0  # type: List[List[str]], int
                while self._lines and len(lines) < BATCH_LINES and (
                        not lines or size + len(self._lines[0][1]) <= BATCH_BYTES):
                    index, text = self._lines.popleft()
                    lines.append([STREAMS[index], text])
                    size += len(text)
                batches.append((lines, dropped))
                dropped = 0
            if dropped:
                batches.append(([], dropped))
            self._chars = 0
            self._since = None
        return batches

    def clear(self):
        # type: () -> None
        with self._lock:
            self._lines.clear()
            self._partial, self._return = ["", ""], [False, False]
            self._chars, self._since, self.dropped = 0, None, 0
