"""Records on their way to a spill file: the batches an overflow hands over, the bound on what the
client holds, and the thread that writes them.

Spilling is the outbox's part for records that left the live stream (relay.outbox says when): a
batch is one stream's pending records at an overflow, moved here in O(1) on the trainer's thread.
Its bookkeeping is done under the outbox's lock; the write itself under `write_lock` only, so that
neither the trainer's thread nor the I/O thread waits for a disk:
- Batches are written oldest first, one file each, by whoever holds `write_lock`: the spill thread,
  or `Outbox.spill()` at finish/close, which thereby waits for a write in flight. Files are named in
  the order they are written (relay.spill), which is the order of the records.
- A write that failed keeps its batch (and the ones after it) here; the next attempt is due
  `max_pending` records later (one attempt per overflow, as a failed disk is not worth more).
- Bound, policy drop_newest: while `max_buffered` records are held (pending plus here), a new
  record is dropped and counted (`dropped`, `dropped_full`); the client says so once when the
  dropping starts and once when it ends, with the count.

SpillThread writes the batches. A thread of its own rather than the I/O thread: a spill takes a
durable write (fsync; seconds on a slow or network filesystem), and meanwhile the I/O thread must go
on reading acks, sending and heartbeating (an overflow also happens with a slow relay, not only an
absent one). It exists only in a client that overflowed: the I/O thread starts it at the first batch
handed over (no trainer call starts a thread or waits for one); later hand-overs wake it at once
through `waker` (an Event set). It ends with the I/O thread (after the write in flight, if any). A
forked child never runs its parent's: the child's client starts over with an outbox of its own
(relay.client), threads do not survive fork, and the parent's batches stay the parent's to write.

The bound counts records, not bytes. drop_newest rather than block (the trainer never waits) or
drop_oldest (the oldest records are a batch whose file may be being written right now, and each
batch begins with its stream's open record).

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from typing import Callable, Dict, Optional

from relay.spill import SPILL_FIX, Reporter

BUFFERED_FLOOR = 20000  # the default max_buffered: twice max_pending, and at least this many records

# Writes one batch: spill(stream, frames) -> the file's path, or None when it could not be written
# (said and counted by the spiller).
Spill = Callable[[str, Dict[int, bytes]], Optional[str]]


def default_max_buffered(max_pending: int) -> int:
    return max(2 * max_pending, BUFFERED_FLOOR)


class Spilling:
    """The batches handed over to be spilled (`batches`, oldest first, `count` records in all), their
    writing and retries, and the bound on the records held. `lock` is the outbox's Condition."""

    def __init__(self, lock: threading.Condition, stats: Dict[str, int], report: Reporter,
                 spill: Optional[Spill], max_pending: int, max_buffered: int):
        self.lock = lock
        self.write_lock = threading.Lock()   # held for a whole write (file, fsync, rename)
        self.stats = stats
        self.report = report
        self.max_pending = max_pending
        self.max_buffered = max_buffered
        self.batches = deque()         # type: deque  ((stream, {seq: frame}), oldest first)
        self.count = 0
        self.wanted = False            # work for the spill thread: a batch handed over, or an attempt due again
        self.waker = None              # type: Optional[Callable[[], None]]  (SpillThread.nudge, once there is one)
        self._spill = spill
        self._offered = 0              # records offered to the outbox since it was made
        self._retry_at = None          # type: Optional[int]  (_offered at which a failed write is tried again)
        self._dropping = 0             # records dropped since the bound was last reached

    # -- the trainer's thread, under the lock ---------------------------------------------------

    def add(self, stream: str, frames: Dict[int, bytes]) -> None:
        self.batches.append((stream, frames))
        self.count += len(frames)
        self._want()

    def _want(self) -> None:
        self.wanted = True
        if self.waker is not None:
            self.waker()

    def offered(self, pending: int, kind: str) -> bool:
        """A record comes while `pending` records are in the live stream: False when it is to be
        dropped (the bound reached; open records, one per run, are never dropped). Makes an attempt
        due again `max_pending` records after a failed one."""
        self._offered += 1
        if self._retry_at is not None and self._offered >= self._retry_at:
            self._retry_at = None
            self._want()
        if pending + self.count < self.max_buffered or kind == "open":
            if self._dropping:
                self._say("client buffer has room again: %d records were dropped while it was full (policy "
                          "drop_newest); recording again" % self._dropping)
                self._dropping = 0
            return True
        self.stats["dropped"] += 1
        self.stats["dropped_full"] += 1
        self._dropping += 1
        if self._dropping == 1:
            where = getattr(self._spill, "directory", None) or "the spill directory"  # relay.spill.Spiller's
            self._say("client buffer full: %d records held (max_buffered=%d), not acked by the relay and not in a "
                      "spill file yet (the last spill failed, or is still being written); dropping new records "
                      "(policy drop_newest, counted in statistics()['dropped_full']), starting with a %s record, "
                      "until a spill to %s succeeds: start the relay, %s, or raise max_buffered"
                      % (pending + self.count, self.max_buffered, kind, where, SPILL_FIX))
        return False

    def _say(self, text: str) -> None:
        self.report.note(text)
        self.report.warn("full", text, force=True)

    def clear(self) -> int:
        """At close, after a write failed: forget every batch; how many records that was."""
        count = self.count
        self.batches.clear()
        self.count = 0
        return count

    # -- writing: the caller holds write_lock, not lock ------------------------------------------

    def write(self) -> Optional[str]:
        """Write the batches, oldest first, one file each, until one fails; the path of the last
        file written (None if none was, or a write failed)."""
        path = None
        while True:
            with self.lock:
                if not self.batches or self._spill is None:
                    return path
                stream, frames = self.batches[0]
            written = self._spill(stream, frames)
            with self.lock:
                self._written(written)
                self.lock.notify_all()
            if written is None:
                return None
            path = written

    def _written(self, path: Optional[str]) -> None:
        if path is None:
            self.stats["spill_failed"] += 1
            self._retry_at = self._offered + self.max_pending
            return
        _, frames = self.batches.popleft()
        self.count -= len(frames)
        self.stats["spilled"] += len(frames)
        self._retry_at = None


class SpillThread(threading.Thread):
    """Writes the batches of one Spilling whenever it is woken with work wanted; see the module's text."""

    def __init__(self, spilling: Spilling, report: Reporter):
        super().__init__(name="relay-client-spill", daemon=True)
        self.spilling = spilling
        self.report = report
        self.pid = os.getpid()
        self._wake = threading.Event()
        self._stopping = False
        self._begun = False

    def wake(self) -> None:
        """Look for work (the I/O thread, when `wanted` is set); starts the thread the first time."""
        if not self._begun:
            self._begun = True
            self.start()
        self._wake.set()

    def nudge(self) -> None:
        """Look for work, if started (the trainer's thread, at a hand-over: an Event set, O(1))."""
        if self._begun:
            self._wake.set()

    def stop(self) -> None:
        """End after the write in flight (only in the process that made it)."""
        if self.pid == os.getpid():
            self._stopping = True
            self._wake.set()

    def join_if_started(self, timeout: float) -> None:
        if self._begun and self.pid == os.getpid():
            self.join(timeout)

    def run(self) -> None:
        spilling = self.spilling
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            with spilling.write_lock:
                with spilling.lock:
                    wanted, spilling.wanted = spilling.wanted, False
                if wanted:
                    try:
                        spilling.write()
                    except Exception as exc:  # noqa: BLE001  never let a bug here end the thread silently
                        self.report.error("relay client: spilling failed: %r" % (exc,))
