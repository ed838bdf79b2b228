"""The client's I/O thread: all of the trainer side's socket work, off the trainer's thread.

One thread per client and process (started at the client's first record; a forked child starts
its own, never touching its parent's thread, socket or context). It owns the Connection and does,
in small slices so that the trainer's thread gets the GIL back often (pyzmq releases it in every
send and receive, and the outbox's lock is held only to take or give a slice):
- reads the relay's replies (at most RECV_SLICE per slice) and applies them to the outbox;
- re-sends everything unacked when acks stopped for the outbox's re-send wait (`resend_after`,
  doubled after each re-send no ack follows), or at once when the socket was made anew or the
  relay's `resend` reply says it takes the records it held again (read and acted on in one slice);
- sends what is unsent (at most SEND_SLICE frames per slice); when a send finds no connection it
  tries again RETRY_EVERY seconds later;
- packs waiting device rows whose copy has landed (never waits for one);
- wakes the spill thread (relay.spilling; started here the first time) when an overflow handed
  records over or a failed spill is due again, and ends it when it ends itself;
- makes the console records that are due (`pump`, relay.console: at least once a second);
- sends a heartbeat every `heartbeat_every` seconds (0: none) naming the client's open runs: when
  the trainer dies the heartbeats stop and the relay finishes its runs after its silence timeout.

When nothing is to be done it sleeps in a poll on its socket and a pipe. The trainer's thread wakes
it with `nudge()` after each record: an attribute store, plus one byte into the pipe (written
without letting go of the GIL) only when the thread is asleep. No trainer call ever waits for this
thread; `flush` waits on the outbox's condition, which this thread notifies when acks arrive.

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, FrozenSet, List, Optional

import zmq

from relay import protocol
from relay.connection import Connection
from relay.outbox import Outbox
from relay.spill import Reporter
from relay.spilling import SpillThread

SEND_SLICE = 64        # frames handed to ZeroMQ per slice
RECV_SLICE = 256       # replies read per slice
RETRY_EVERY = 0.05     # seconds between sends tried while there is no connection
LOOK_EVERY = 0.1       # seconds between looks at waiting device rows
IDLE_WAKE = 1.0        # seconds at most between rounds when nothing is to be done


def _gil_holding_write() -> Callable[[int, bytes], None]:
    """write(2) that keeps the GIL: os.write lets go of it, and a trainer's thread that lets go of
    the GIL in the middle of its call waits to get it back from whatever thread took it (this
    one, or the training code's own), for up to the interpreter's switch interval (5 ms). A
    one-byte write to a non-blocking pipe never blocks. Errors (a full or closed pipe) are ignored."""
    try:
        import ctypes

        write = ctypes.PyDLL(None).write  # PyDLL: called with the GIL held
        write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
        write.restype = ctypes.c_ssize_t
        return lambda fd, data: write(fd, data, len(data)) and None
    except (ImportError, OSError, AttributeError):  # no ctypes or no libc: the plain call
        def plain(fd: int, data: bytes) -> None:
            try:
                os.write(fd, data)
            except OSError:
                pass
        return plain


_write_holding_the_gil = _gil_holding_write()


class IOThread(threading.Thread):
    """Moves records from the outbox to the relay and acks back; see the module's text."""

    def __init__(self, outbox: Outbox, connection: Connection, reporter: Reporter, heartbeat_every: float = 10.0,
                 spills: Optional[SpillThread] = None):
        super().__init__(name="relay-client-io", daemon=True)
        self.outbox = outbox
        self.spills = spills
        self.connection = connection
        self.report = reporter
        self.heartbeat_every = heartbeat_every
        self.runs = frozenset()        # type: FrozenSet[str]  (open runs, for heartbeats; replaced, never changed)
        self.pump = None               # type: Optional[Callable[[], None]]  (makes due console records)
        self.pid = os.getpid()
        self.idle = False              # True while asleep in its poll (or about to be)
        self.work = False              # set by nudge(): a record came since the last slice began
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    # -- the trainer's thread ---------------------------------------------------------------------

    def nudge(self) -> None:
        """Something new is in the outbox: make sure the thread looks (O(1), never waits)."""
        self.work = True
        if self.idle:
            self._poke()

    def stop(self) -> None:
        """Finish the current slice, close the socket, end (only in the process that started it)."""
        if self.pid != os.getpid():
            return
        self._stopping = True
        self._poke()

    def close_pipe(self) -> None:
        """After join(): let go of the wake-up pipe."""
        if self.pid == os.getpid() and not self.is_alive():
            for fd in (self._wake_read, self._wake_write):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_read = self._wake_write = -1

    def _poke(self) -> None:
        _write_holding_the_gil(self._wake_write, b"\0")  # full: it is awake anyway; closed: it has ended

    # -- the I/O thread -----------------------------------------------------------------------------

    def run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_every
        try:
            while not self._stopping:
                try:
                    pump = self.pump
                    if pump is not None:
                        pump()
                    busy = self._slice()
                    if self.heartbeat_every > 0 and time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + self.heartbeat_every
                        self._heartbeat()
                except Exception as exc:  # never let the trainer's records or this thread die of it
                    self.report.warn("io", "relay client: background send failed: %s" % exc)
                    busy = False
                if not busy:
                    self._sleep(next_beat if self.heartbeat_every > 0 else None)
        finally:
            self.connection.close()
            if self.spills is not None:
                self.spills.stop()

    def _slice(self) -> bool:
        """One slice of socket work; True when more is waiting right now."""
        outbox, connection = self.outbox, self.connection
        self.work = False
        connection.socket  # made now if it is not there (after a reconnect: everything is re-sent)
        more = self._read_replies()
        with outbox.lock:
            if connection.renewed():
                outbox.give_back(outbox.stream, 1)  # a new socket: every pending record again
            if outbox.deferred:
                outbox.deferred.release(wait=False)
            outbox.maybe_rewind()
            stream, frames = outbox.take(SEND_SLICE)
            pending = len(outbox.pending)
        if outbox.spilling.wanted and self.spills is not None:
            self.spills.wake()
        for seq, frame in frames:
            if not connection.send(frame):
                with outbox.lock:
                    outbox.give_back(stream, seq)
                connection.stalled(pending)
                return more
        return more or len(frames) == SEND_SLICE

    def _read_replies(self) -> bool:
        frames = []  # type: List[bytes]
        while len(frames) < RECV_SLICE:
            frame = self.connection.recv()
            if frame is None:
                break
            frames.append(frame)
        if not frames:
            return False
        replies = []
        for frame in frames:
            try:
                replies.append(protocol.decode_raw(frame))
            except protocol.ProtocolError as exc:
                self.report.warn("reply", "unreadable reply from relay: %s" % exc.reason)
        with self.outbox.lock:
            removed = 0
            for reply in replies:
                removed += self.outbox.on_reply(reply)
            if removed:
                self.outbox.lock.notify_all()
        return len(frames) == RECV_SLICE

    def _heartbeat(self) -> None:
        runs = sorted(self.runs)
        if runs and not self.connection.send(protocol.encode({"v": protocol.VERSION, "t": "heartbeat",
                                                              "stream": self.outbox.stream, "seq": 0, "runs": runs})):
            self.connection.stalled(len(self.outbox.pending))  # warn, and reconnect after a refused handshake

    def _sleep(self, next_beat) -> None:
        """Wait for a reply, a nudge, or the next thing due, whichever comes first."""
        outbox = self.outbox
        self.idle = True
        try:
            if self.work or self._stopping:
                return  # a record came after the slice began (see nudge)
            now = time.monotonic()
            timeout = IDLE_WAKE
            with outbox.lock:
                if outbox.unsent():
                    timeout = RETRY_EVERY  # the last send found no connection
                elif outbox.deferred:
                    timeout = LOOK_EVERY
                rewind = outbox.rewind_due()
            if rewind is not None:
                timeout = min(timeout, rewind)
            if next_beat is not None:
                timeout = min(timeout, max(0.0, next_beat - now))
            poller = zmq.Poller()
            poller.register(self.connection.socket, zmq.POLLIN)
            poller.register(self._wake_read, zmq.POLLIN)
            poller.poll(int(timeout * 1000) + 1)
        finally:
            self.idle = False
        try:
            os.read(self._wake_read, 4096)
        except OSError:
            pass
