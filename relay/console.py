"""The trainer's console (stdout and stderr) for the run's Logs tab: captured, bounded, never in the way.

How it is captured: `write` is replaced on the `sys.stdout` and `sys.stderr` objects themselves
(as wandb's "wrap" console mode does), so print(), logging handlers that hold the stream, and the
tracebacks `sys.excepthook` writes all pass through it. Each write goes to the original stream
first (the terminal sees everything, whatever happens next); then its text is cut into lines on
the writing thread (`ConsoleBuffer.write`: a lock held for the few list operations, no I/O), and
the client's I/O thread packs the queued lines into `console` records (every BATCH_EVERY seconds
or BATCH_LINES lines), which are delivered like any other record. Nothing here waits or raises
into the trainer: an error in the capture is swallowed after the original write went through.

What is not captured: output written straight to file descriptors 1 and 2 (C and C++ code such
as IsaacGym's and PhysX's messages, CUDA, subprocesses), and bytes written to `sys.stdout.buffer`.
Redirecting the descriptors themselves would take those too, but a pipe whose reader falls
behind blocks the writer, and that writer is the trainer.

Bounds (`ConsoleLimits`): at most `max_lines` lines or `max_bytes` characters queued, lines cut at
`max_line_length` characters, and at most `lines_per_second` lines (a token bucket of `burst`).
A line over a bound is dropped and counted; each record carries the count of lines dropped since
the record before it (`dropped`), and the relay writes it into the Logs as
"[relay: N console lines dropped: ...]". Lines are queued when they end ("\\n"); a line redrawn
with carriage returns (a progress bar) keeps what follows its last "\\r"; an unfinished line is
sent when the capture stops.

The client's own warnings are written with the capture paused on their thread (`quiet()`), so a
relay that refuses console records cannot make the refusals loop back through the console. In a
process forked from the capturing one the capture passes every write through and queues nothing:
the parent's lines are the parent's to send.

Trainer side: standard library only (Python 3.8).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple  # noqa: F401 (type comments)

log = logging.getLogger("relay.client")

STREAMS = ("out", "err")          # the wire's names of stdout and stderr
BATCH_LINES = 100                 # lines in one console record at most
BATCH_BYTES = 256 * 1024          # characters in one console record at most (a frame stays under 1 MiB)
BATCH_EVERY = 1.0                 # seconds a queued line waits at most for its record
EXIT_FLUSH = 10.0                 # seconds an exit with the run not finished waits for the acks (as finish)


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


_quiet = _Quiet()


@contextlib.contextmanager
def quiet():
    # type: () -> Iterator[None]
    """Writes of this thread inside the block reach the terminal but not the run's Logs."""
    before = _quiet.on
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = before


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


_CAPTURES = weakref.WeakSet()  # type: weakref.WeakSet  (captures of this process, for fork)


def _after_fork_in_child():
    # type: () -> None
    for capture in list(_CAPTURES):
        capture.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ConsoleCapture(object):
    """The capture of one run's console: installed on sys.stdout and sys.stderr by `start`,
    pumped into records by the client's I/O thread (`pump`), stopped by `stop` (the run's finish,
    the client's close, or the exit of the process). `submit(record)` hands a record to the client
    from any thread and returns False when the relay does not take console records; `nudge()`
    wakes the I/O thread."""

    def __init__(self, run_id, submit, nudge, limits=None):
        # type: (str, Callable[[dict], bool], Callable[[], None], Optional[ConsoleLimits]) -> None
        self.run_id = run_id
        self.buffer = ConsoleBuffer(limits or ConsoleLimits())
        self.active = False
        self._submit = submit
        self._nudge = nudge
        self._packing = threading.RLock()  # one packer at a time (I/O thread, finish): records in order
        self._installed = []  # type: List[Tuple[Any, Any, Any]]  (stream, our write, its own write or None)
        self.io = None        # type: Any  (the client's I/O thread, whose `pump` this is while it runs)
        _CAPTURES.add(self)

    def start(self):
        # type: () -> bool
        """Install on sys.stdout and sys.stderr; False when neither could be wrapped, or when
        another run of this process captures the console (one at a time does)."""
        import sys

        for other in list(_CAPTURES):
            if other.active and other is not self:
                with quiet():
                    log.warning("relay: the console already goes to run %s; run %s does not capture it",
                                other.run_id, self.run_id)
                return False
        for index, stream in enumerate((sys.stdout, sys.stderr)):
            try:
                self._install(stream, index)
            except Exception as exc:  # None (no console), or a stream that takes no attributes
                with quiet():
                    log.warning("relay: the run's console cannot capture %s (%s: %s); its lines are not sent",
                                ("stdout", "stderr")[index], type(exc).__name__, exc)
        self.active = bool(self._installed)
        return self.active

    def _install(self, stream, index):
        # type: (Any, int) -> None
        own = getattr(stream, "__dict__", {}).get("write")  # an instance's own write, to put back
        original = stream.write
        capture, buffer = self, self.buffer

        def write(text):
            written = original(text)
            if capture.active and not _quiet.on:
                try:
                    if buffer.write(index, text):
                        capture._nudge()
                except Exception:  # never let the capture fail a print
                    pass
            return written

        stream.write = write
        self._installed.append((stream, write, own))

    def _uninstall(self):
        # type: () -> None
        for stream, write, own in self._installed:
            try:
                if stream.__dict__.get("write") is write:  # else someone wrapped it since: ours passes through
                    if own is None:
                        del stream.write
                    else:
                        stream.write = own
            except Exception:
                pass
        self._installed = []

    def pump(self):
        # type: () -> None
        """On the I/O thread: make the records that are due."""
        if self.active and self.buffer.due():
            self._send(final=False)

    def flush(self):
        # type: () -> None
        """Make a record of the lines queued so far now (the client's flush)."""
        if self.active:
            self._send(final=False)

    def stop(self):
        # type: () -> None
        """Put the streams back and send what is left, the unfinished lines too."""
        if not self._installed and not self.active:
            return
        self.active = False
        if self.io is not None and self.io.pump == self.pump:
            self.io.pump = None
        self._uninstall()
        self._send(final=True)

    def exception(self, exc):
        # type: (BaseException) -> None
        """Queue the traceback of `exc` as stderr lines without writing it (the caller finishes
        the run before the interpreter prints it)."""
        if not self.active:
            return
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.buffer.write(1, text if text.endswith("\n") else text + "\n")

    def forked(self):
        # type: () -> None
        """In a forked child: pass writes through, forget the parent's lines."""
        self.active = False
        self._installed = []
        self._packing = threading.RLock()
        self.buffer._lock = threading.RLock()
        self.buffer.clear()

    def _send(self, final):
        # type: (bool) -> None
        with self._packing:
            for lines, dropped in self.buffer.take(final):
                record = {"t": "console", "run": self.run_id, "lines": lines, "dropped": dropped, "time": time.time()}
                if not self._submit(record):
                    self.active = False  # the relay does not take console records: stop queueing
                    self.buffer.clear()
                    return


def capture_for(run_id, outbox, io, limits):
    # type: (str, Any, Any, ConsoleLimits) -> Optional[ConsoleCapture]
    """The console capture of a client's run, started: its records go into the client's `outbox`
    (relay.outbox; without the client's lock, which close() holds while it waits for the I/O
    thread), made on the client's I/O thread `io` (relay.iothread) while it runs. None when it
    could not start."""
    def offer(record):
        # type: (dict) -> bool
        with outbox.lock:
            if record["t"] in outbox.unsupported:
                return False  # the relay is older than the client: it refused a console record
            outbox.submit(record)
        return True

    capture = ConsoleCapture(run_id, offer, io.nudge, limits)
    if not capture.start():
        return None
    capture.io = io
    io.pump = capture.pump
    return capture
