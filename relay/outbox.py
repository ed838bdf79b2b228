"""The trainer side's ledger of records: what the client accepted and where each record is now.

No sockets and no threads of its own. relay.client hands it the trainer's records; the client's I/O
thread (relay.iothread) asks it what to send next and gives it the relay's replies. Both hold
`outbox.lock` (a Condition, notified when acks arrive) around every use, each for a short time.

A record's states (every accepted record is in exactly one):
- waiting:  a row with values on an accelerator whose one batched copy to the host (relay.tensors)
            has not landed yet. Waiting rows are in `deferred`, in the order they were logged, with
            no seq yet; a later record queues behind them. They are packed as soon as their copy has
            landed (looked at without waiting), or waited for by `deferred.release(wait=True)`
            (flush, finish, close) or when more than MAX_DEFERRED rows wait.
- pending:  packed into its frame, with its seq (1, 2, 3, ... within `stream`, no gaps), in
            `pending`. Seqs below the send cursor are in flight (handed to ZeroMQ, not acked yet),
            the others unsent. A pending record is sent again until it is acked.
- acked:    the relay committed it to its spool: gone from `pending`.
- refused:  the relay answered an error for its seq (it can never be accepted): gone, counted.
            An older relay refuses a kind of record it does not know ("unknown message kind
            'X'"): the trainer is told once to upgrade the relay, and later records of that kind
            are dropped at `submit` (counted), the rest goes on.
- spilling: handed over at an overflow (or by `spill()`) with its stream's other pending records,
            in `spilling`, not in a file yet: being written, or kept after a failed write.
- spilled:  written to a spill file (fsynced, renamed into place): gone, counted.
- lost:     only at close, when a spill failed: gone, counted and said.

An ack names its stream: `upto` N means every seq <= N of that stream is committed; `seqs` lists
ranges [low, high] committed in one batch of the relay's. Acks and errors of another stream (one
left behind at an overflow, whose records are in a spill file now) remove nothing.

A record leaves `pending` only by an ack, an error reply, a hand-over to `spilling`, or at close;
it leaves `spilling` only by a spill that succeeded, or at close.
A record is never accepted (counted `dropped`, its seq not taken, so the relay sees no gap) when
its frame is over protocol.MAX_FRAME_BYTES, it comes after close, or `max_buffered` records are
held; one with a value the wire cannot carry raises TypeError/ValueError to the caller instead.

Re-sending: when records are in flight and no ack has made progress for `resend_after` seconds, the
cursor goes back to the oldest pending record and everything unacked is sent again (the relay acks
duplicates again and stores each record once). Each re-send that no ack progress follows doubles the
wait before the next (`resend_after`, 2x, 4x, ... at most MAX_RESEND_WAIT); an ack that removes a
record sets it back to `resend_after`. Why: a relay that has fallen behind must read every duplicate
too; a window re-sent each `resend_after` by each of its clients puts it further behind, which makes
more re-sends (a congestion collapse). A socket made anew starts again from the oldest pending record
at once, whatever the wait; so does a `resend` reply, which a relay sends to the clients whose
records it held for want of room once it takes records again (the wait starts again from
`resend_after`).

Overflow (`max_pending` records pending: the relay is away or slow): the trainer's call hands
every pending record over as one batch to `spilling` (relay.spilling; O(1): the dict itself
moves), and the outbox goes on in a new stream, naming its open runs again first, so that the
relay, which takes each stream in order, does not wait for records that now live in a file. The
spill thread writes the batch; `spill()` (finish, close) waits for a write in flight, then writes
what is left, so files keep the records' order. While a batch is in `spilling` no other is handed
over: the live stream grows past `max_pending`, and the first record after the batch is written
hands all of it over. A failed write keeps its batch in `spilling` and is tried again
`max_pending` records later. Records in `spilling` are never sent again: the relay gets them only
through the file (`relay replay`).

Bounded memory, policy drop_newest: at most `max_buffered` records are held (`pending` plus
`spilling`; default twice `max_pending`, at least 20,000). A record that comes when that many are
held (spills fail, or the trainer logs faster than the disk writes) is dropped, counted (`dropped`,
`dropped_full`) and said (relay.spilling). Open records (one per run) are never dropped.
"""
from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import msgpack

from relay import protocol, tensors
from relay.errors import RelayError
from relay.spill import Reporter
from relay.spilling import Spill, Spilling, default_max_buffered

# The record kinds a relay older than this client may not know, and what they carry.
NEWER_KINDS = {"console": "the trainer's console output", "meta": "the trainer node's provenance",
               "system": "the trainer node's system metrics", "media": "images, videos and histograms"}
_UNKNOWN_KIND = re.compile(r"unknown message kind '([A-Za-z0-9_]+)'")
MAX_DEFERRED = 64      # rows waiting for their device values' copy before a call waits for the oldest
MAX_RESEND_WAIT = 30.0  # seconds at most between two re-sends of a window no ack answers (the backoff's cap)
VALUE_FIELDS = {"log": "metrics", "summary": "values"}   # the fields whose device values are batched


class _OnDevice(RelayError):
    """Raised while packing at the first value that lives on an accelerator."""


def _host_value(value: Any) -> Any:
    """msgpack's `default` for a new record: like protocol.to_scalar, but a value on an accelerator
    stops the packing (its `.item()` would wait for the device) so the row can take the batched path."""
    device = getattr(value, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise _OnDevice()
    return protocol.to_scalar(value)


class Outbox:
    """Seq numbering, the pending buffer, acks, re-send decisions, overflow hand-overs; the batches
    being spilled in `spilling` (relay.spilling.Spilling); waiting device rows in `deferred`
    (DeviceRows). `clock` is injected (time.monotonic) so that tests can drive the re-send timer."""

    def __init__(self, stream: Optional[str] = None, max_pending: int = 10000, resend_after: float = 1.0,
                 spill: Optional[Spill] = None, reopen: Callable[[], Iterable[Dict[str, Any]]] = tuple,
                 reporter: Optional[Reporter] = None, clock: Callable[[], float] = time.monotonic,
                 max_buffered: Optional[int] = None, endpoint: str = ""):
        self.lock = threading.Condition(threading.Lock())
        self.endpoint = endpoint       # the relay's, for the messages that name it
        self.unsupported = set()       # type: set  (record kinds the relay said it does not know)
        self.max_pending = max(1, int(max_pending))
        self.resend_after = resend_after
        self.resend_wait = resend_after  # the wait before the next re-send: doubled by each, reset by acks
        self.report = reporter or Reporter()
        self.stats = {"sent": 0, "acked": 0, "spilled": 0, "dropped": 0, "errors": 0, "resent": 0,
                      "resend_asked": 0, "spill_failed": 0, "lost": 0, "dropped_full": 0}
        bound = (max(self.max_pending + 1, int(max_buffered)) if max_buffered is not None
                 else default_max_buffered(self.max_pending))
        self.spilling = Spilling(self.lock, self.stats, self.report, spill, self.max_pending, bound)
        self._reopen = reopen
        self._clock = clock
        self.deferred = DeviceRows(self._queue)
        self._restart(stream)

    def _restart(self, stream: Optional[str]) -> None:
        self.stream = stream or uuid.uuid4().hex
        self.seq = 0                   # the last seq given
        self.pending = OrderedDict()   # type: OrderedDict[int, bytes]  (seq -> frame, in seq order)
        self.cursor = 1                # the lowest seq not handed to the socket yet
        self.last_progress = 0.0       # last time an ack removed something or a send started a window

    # -- taking records (the trainer's thread) -----------------------------------------------------

    def submit(self, message: Dict[str, Any]) -> None:
        """Accept one record: packed now, or (values on an accelerator) waiting behind the rows
        that wait. Raises TypeError/ValueError at once for a value the wire cannot carry. A record
        of a kind the relay said it does not take is dropped (counted)."""
        if self.unsupported and message.get("t") in self.unsupported:
            self.stats["dropped"] += 1
            return
        self.deferred.submit(message)

    def _queue(self, message: Dict[str, Any], default: Any) -> None:
        """Give the record its seq, pack it, add it to `pending`. Raises _OnDevice (with
        `_host_value`) before taking a seq when a value lives on an accelerator."""
        if len(self.pending) >= self.max_pending and not self.spilling.batches:
            self._hand_over(reopen=True)
        if not self.spilling.offered(len(self.pending), message["t"]):
            return  # dropped (the bound): its seq is not taken, so the relay sees no gap
        message["v"] = protocol.VERSION
        message["stream"] = self.stream
        message["seq"] = self.seq + 1
        if "joins" in message and message["joins"] is None:  # a media record: the row of the log before it
            message["joins"] = self.seq
        # protocol.encode's packing, with `default` chosen by the caller (see _host_value); a value
        # the wire cannot carry raises here, before the seq is taken
        frame = msgpack.packb(message, use_bin_type=True, default=default)
        if len(frame) > protocol.MAX_FRAME_BYTES:
            self.stats["dropped"] += 1  # its seq is not taken, so the relay sees no gap
            self.report.error("record %s of %d bytes is over the %d-byte frame limit; dropped (log fewer or "
                              "shorter values)" % (message["t"], len(frame), protocol.MAX_FRAME_BYTES))
            return
        self.seq += 1
        self.pending[self.seq] = frame
        self.stats["sent"] += 1

    def _hand_over(self, reopen: bool) -> None:
        """Move every pending record into `spilling` as one batch (the dict itself: O(1)) and go on
        in a new stream, which names the open runs again first when `reopen`."""
        self.spilling.add(self.stream, self.pending)
        self._restart(None)
        if reopen:
            for message in self._reopen():
                self._queue(message, protocol.to_scalar)

    def spill(self, reopen: bool = False, pending: bool = True) -> Optional[str]:
        """Hand every pending record over and write every batch handed over, in order, now (after
        a write in flight: this waits for it). The path of the file holding what was pending; None
        when nothing was pending or a write failed (then those records stay in `spilling`).
        `reopen`: the client goes on, so the new stream names the open runs again. `pending`:
        False writes only the batches handed over before, and the pending records stay to be
        sent. Call it without holding `lock`."""
        spilling = self.spilling
        with spilling.write_lock:
            with self.lock:
                handed = pending and bool(self.pending)
                if handed:
                    self._hand_over(reopen)
                spilling.wanted = False
            path = spilling.write()
        return path if handed else None

    def drop_all(self) -> int:
        """At close, after a spill failed: forget every record held; how many were lost."""
        lost = len(self.pending) + self.spilling.clear()
        self.pending.clear()
        self.stats["lost"] += lost
        return lost

    # -- sending (the I/O thread) ---------------------------------------------------------------

    def unsent(self) -> bool:
        return bool(self.pending) and self.cursor <= self.seq

    def take(self, budget: int) -> Tuple[str, List[Tuple[int, bytes]]]:
        """Up to `budget` frames to send next, oldest first, with their stream; the cursor moves
        past them (`give_back` moves it back to the first one the socket did not take)."""
        if not self.pending:
            self.cursor = self.seq + 1
            return self.stream, []
        oldest = next(iter(self.pending))
        if self.cursor < oldest:
            self.cursor = oldest
        if self.cursor > self.seq:
            return self.stream, []
        if self.cursor == oldest:
            self.last_progress = self._clock()  # nothing was in flight: a new window starts now
        frames = []
        while self.cursor <= self.seq and len(frames) < budget:
            frame = self.pending.get(self.cursor)
            if frame is not None:
                frames.append((self.cursor, frame))
            self.cursor += 1
        return self.stream, frames

    def give_back(self, stream: str, seq: int) -> None:
        """The socket did not take frame `seq` of `stream` (and the ones after it): send from there.
        `give_back(stream, 1)`: send every pending record again (a new socket)."""
        if stream == self.stream and seq < self.cursor:
            self.cursor = seq

    def rewind_due(self) -> Optional[float]:
        """Seconds until an unanswered window is sent again (0: now); None when nothing is in flight."""
        if not self.pending or next(iter(self.pending)) >= self.cursor:
            return None
        return max(0.0, self.last_progress + self.resend_wait - self._clock())

    def maybe_rewind(self) -> bool:
        """No ack progress for `resend_wait` while records are in flight: re-send them all, and wait
        twice as long (at most MAX_RESEND_WAIT) before the next re-send unless an ack comes."""
        if self.rewind_due() != 0.0:
            return False
        oldest = next(iter(self.pending))
        self.stats["resent"] += self.cursor - oldest
        self.cursor = oldest
        self.last_progress = self._clock()
        self.resend_wait = min(2 * self.resend_wait, max(MAX_RESEND_WAIT, self.resend_after))
        return True

    # -- replies (the I/O thread) -------------------------------------------------------------------

    def on_reply(self, reply: Dict[str, Any]) -> int:
        """Apply one reply of the relay's (`ack`, `error`, `resend`; other kinds are ignored); how
        many records it removed from `pending`."""
        kind = reply.get("t")
        if kind == "ack":
            return self._on_ack(reply)
        if kind == "error":
            removed = 0
            if isinstance(reply.get("seq"), int) and reply.get("stream") in (None, self.stream):
                removed = int(self.pending.pop(reply["seq"], None) is not None)  # no use re-sending it
            self.stats["errors"] += 1
            newer = unknown_kind(reply.get("reason"))
            if newer is None:
                self.report.error("relay refused record seq=%s: %s" % (reply.get("seq"), reply.get("reason")))
            elif newer not in self.unsupported:  # said once: records of the kind sent before it was known
                self.unsupported.add(newer)
                self.report.error(older_relay(self.endpoint, newer, reply.get("seq"), reply.get("reason")))
            return removed
        if kind == "resend" and self.rewind_due() is not None:
            # The relay held this client's records for want of room and takes records again (per
            # client, not per stream: it has no stream field): what is in flight is due again now,
            # and the backoff starts again from `resend_after`. Nothing in flight: what is unsent
            # is sent anyway.
            self.resend_wait = self.resend_after
            self.last_progress = -math.inf  # as if unanswered for ever: rewind_due() is 0 until the re-send
            self.stats["resend_asked"] += 1
        return 0  # `resend`, or a kind newer than this client: ignored

    def _on_ack(self, reply: Dict[str, Any]) -> int:
        if reply.get("stream") not in (None, self.stream):
            return 0  # a stream left behind at an overflow: its records are in a spill file
        pending = self.pending
        before = len(pending)
        upto = reply.get("upto")
        if isinstance(upto, int):
            while pending and next(iter(pending)) <= upto:
                pending.popitem(last=False)
        for bounds in reply.get("seqs") or []:
            if isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds):
                low, high = bounds
                if high - low < len(pending):
                    for seq in range(low, high + 1):
                        pending.pop(seq, None)
                else:
                    for seq in [s for s in pending if low <= s <= high]:
                        del pending[seq]
        acked = before - len(pending)
        if acked:
            self.stats["acked"] += acked
            self.last_progress = self._clock()
            self.resend_wait = self.resend_after
        return acked

    def count(self) -> int:
        """Records accepted and neither acked, refused, handed over to be spilled nor lost."""
        return len(self.pending) + len(self.deferred)


def unknown_kind(reason: Any) -> Optional[str]:
    """The kind an older relay names in its refusal "unknown message kind 'X'", else None."""
    match = _UNKNOWN_KIND.match(reason) if isinstance(reason, str) else None
    return match.group(1) if match else None


def older_relay(endpoint: str, kind: str, seq: Any, reason: str) -> str:
    """What the trainer is told when the relay does not know a kind of record: upgrade it."""
    return ("the relay at %s is older than this client and does not take %r records (%s); they are not sent to "
            "it (record seq=%s refused: %s): upgrade the relay (pip install -U 'tokenhsi-relay[server]' where it "
            "runs, then restart `relay serve`)"
            % (endpoint or "its endpoint", kind, NEWER_KINDS.get(kind, "a kind newer than the relay"), seq, reason))


def _start_device_copy(message: Dict[str, Any]) -> Optional[tensors.Transfer]:
    """For a record that must wait: start the copy of its device values (None if it has none).
    Raises TypeError at once for a value the wire cannot carry, as packing would."""
    try:  # the packing of Outbox._queue, without taking a seq
        msgpack.packb(message, use_bin_type=True, default=_host_value)
        return None
    except _OnDevice:
        pass
    field = VALUE_FIELDS.get(message.get("t"))
    if field is None or not isinstance(message.get(field), dict):
        return None  # device values elsewhere (checkpoint metadata): read one by one when packed
    transfer = tensors.start_transfer(message[field])
    if transfer.skipped:
        raise TypeError("metric values %s are not numbers, bools, strs or 1-element tensors"
                        % ", ".join(repr(name) for name in transfer.skipped))
    return transfer


class DeviceRows:
    """How a record enters the outbox: packed at once (`queue`), or, when it holds values on an
    accelerator or rows are waiting before it, added to the rows waiting for their copies."""

    def __init__(self, queue: Callable[[Dict[str, Any], Any], None]):
        self._queue = queue
        self._waiting = tensors.Waiting()

    def __len__(self) -> int:
        return len(self._waiting)

    def clear(self) -> None:
        self._waiting.clear()

    def submit(self, message: Dict[str, Any]) -> None:
        if self._waiting:
            self.release(wait=len(self._waiting) >= MAX_DEFERRED)
        if not self._waiting:
            try:
                self._queue(message, _host_value)
                return
            except _OnDevice:
                pass
        self._waiting.add(message, _start_device_copy(message))

    def release(self, wait: bool) -> None:
        """Pack the waiting rows whose device values have landed, oldest first; `wait`: all of them."""
        for message, values in self._waiting.landed(wait):
            if values is not None:
                message[VALUE_FIELDS[message["t"]]] = values
            self._queue(message, protocol.to_scalar)
