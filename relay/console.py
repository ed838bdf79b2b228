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

import atexit
import logging
import os
import threading
import time
import traceback
import weakref
from typing import Any, Callable, List, Optional, Tuple  # noqa: F401 (type comments)

from relay.console_lines import (  # noqa: F401 (BATCH_*, console_limits: part of this module's API)
    BATCH_BYTES, BATCH_EVERY, BATCH_LINES, STREAMS, ConsoleBuffer, ConsoleLimits, QUIET, console_limits, quiet)

log = logging.getLogger("relay.client")

EXIT_FLUSH = 10.0                 # seconds an exit with the run not finished waits for the acks (as finish)


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
        self.at_exit = None   # type: Optional[Callable[[], None]]  (delivers the last lines when the process exits)
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
            if capture.active and not QUIET.on:
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
        if self.at_exit is not None:
            atexit.unregister(self.exit)
        if self.io is not None and self.io.pump == self.pump:
            self.io.pump = None
        self._uninstall()
        self._send(final=True)

    def exit(self):
        # type: () -> None
        """At the exit of the process (atexit), still capturing: the run was not finished (a crash,
        no finish()). Its last lines go, the traceback `sys.excepthook` wrote too."""
        if self.active:
            self.stop()
            self.at_exit()

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


NO_CAPTURE = ConsoleCapture("", lambda record: False, lambda: None)  # what a run without a capture holds: inert


def capture_for(run_id, outbox, io, limits, client):
    # type: (str, Any, Any, Optional[ConsoleLimits], Any) -> ConsoleCapture
    """The console capture of a client's run, started: its records go into the client's `outbox`
    (relay.outbox; without the client's lock, which close() holds while it waits for the I/O
    thread), made on the client's I/O thread `io` (relay.iothread) while it runs. If the process
    exits while it captures (the run not finished: a crash, no finish()), it stops, and `client`
    delivers the last lines, the traceback too, as finish() would: waiting EXIT_FLUSH seconds for
    the acks, then spilling the rest. NO_CAPTURE when there is nothing to capture (no `limits`),
    nothing to send it (no `io`: the client is closed), or it could not start."""
    if limits is None or io is None:
        return NO_CAPTURE

    def offer(record):
        # type: (dict) -> bool
        with outbox.lock:
            if record["t"] in outbox.unsupported:
                return False  # the relay is older than the client: it refused a console record
            outbox.submit(record)
        return True

    def at_exit():
        # type: () -> None
        if not client._closed and not client.flush(EXIT_FLUSH):
            client.spill_pending()

    capture = ConsoleCapture(run_id, offer, io.nudge, limits)
    if not capture.start():
        return NO_CAPTURE
    capture.io = io
    io.pump = capture.pump
    capture.at_exit = at_exit
    atexit.register(capture.exit)
    return capture
