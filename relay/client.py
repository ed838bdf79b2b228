"""The trainer-side client: hands records to the relay without ever waiting on it.

Invariants (DESIGN.md §3):
- Every call returns in bounded time and never raises for transport problems (relay absent,
  restarting, slow). Problems are counted in `statistics()` and warned about, rate-limited.
- A record the client accepted is at every moment in exactly one place: the bounded pending
  buffer (re-sent until acked), a spill file (written on overflow or at finish/close, ingested
  later by `relay replay`), or the relay's spool (which acks only after its commit).
- Each call does a bounded amount of socket work (drain acks, send what is queued, rewind for a
  re-send when acks stopped). `finish()` is the only call that waits, for at most its `timeout`.
  While the trainer is quiet (a long evaluation, a save), the heartbeat thread does the same work
  about once a second, so records waiting for a relay that came back are sent without another call
  (a trainer killed during that quiet time then loses nothing the relay could have taken). It only
  ever *tries* the client's lock: it never makes a trainer's call wait.
- Values on an accelerator (0-d CUDA tensors) are never read one by one with `.item()`, which
  waits for the GPU each time: a row's device values go to the host in one non-blocking copy
  (relay.tensors) and the row waits in `_deferred`, in order, until the copy has landed (looked
  at, without waiting, at every later call; waited for by flush/finish/close, or when more than
  MAX_DEFERRED rows are waiting).
- After `os.fork()` the child's copy of a client is a new, empty client of the child's: a new
  stream id, no pending records (those are the parent's to deliver), its own ZeroMQ context and
  socket made at its first call (the parent's are never touched: ZeroMQ contexts do not survive
  fork), its own heartbeat thread at its first `start_run`, statistics from zero. A `Run` belongs
  to the process that started it: used in a forked child it raises ForkedRunError, and so does
  `start_run` there with the id of a run the parent has open. A run has one writer: two would
  interleave their rows in one W&B history, merge rows that share a `frame`, and the first
  `finish` would end the run for both.
- A spill that fails (disk full, no permission) leaves no file behind, keeps the records pending
  and is counted (`spill_failed`); an overflow tries again only after `max_pending` more records.
  What `close()` cannot spill is lost: counted (`lost`), logged with its count, the directory and
  what to do.

Exceptions raised to the caller (the trainer's misuse, never transport trouble): ValueError and
TypeError for arguments and values the wire cannot carry, ForkedRunError (a RuntimeError) for a run
used in a forked child, and relay.keys.CurveKeyError for an unusable key directory.

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from typing import Any, Dict, List, Optional

import msgpack
import zmq

from relay import protocol, tensors
from relay.keys import CLIENT_KEYS_VARIABLE, ClientKeys, load_client_keys

log = logging.getLogger("relay.client")

SEND_BUDGET = 256      # frames sent per call at most, so a call's cost stays bounded
RECV_BUDGET = 1024     # replies drained per call at most
STALL_WARNING = 3.0    # seconds without a connection before the client warns
PUMP_EVERY = 1.0       # seconds between the heartbeat thread's looks at a quiet client's records
DRAIN_EVERY = 0.001    # seconds between looks for acks on the hot path (flush() always looks)
# A socket whose sends have failed this long is made anew: ZeroMQ never retries a connection whose
# handshake the relay refused (a Curve key it did not know), and a relay fixed since should get
# the records.
RECONNECT_AFTER = 30.0
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused this client's Curve key (its <name>.key is not in the relay's "
                                     "authorized/ directory; `relay keys new DIR --client NAME` puts one there)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "and this client do not agree on encryption (a relay started with --curve "
                                         "needs RELAY_CLIENT_KEYS on the trainer; one without it needs none)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "broke off the connection handshake (a relay started with --curve needs "
                                          "RELAY_CLIENT_KEYS on the trainer, made for this relay: its relay.key)",
}

SPILL_FIX = "free space there, or point RELAY_SPILL_DIR or the client's spill_dir at a directory with room"

_MONITOR_NUMBERS = itertools.count()
MAX_DEFERRED = 64      # rows waiting for their device values' copy before a call waits for the oldest
VALUE_FIELDS = {"log": "metrics", "summary": "values"}   # the fields whose device values are batched


class ForkedRunError(RuntimeError):
    """A Run (or its id) used in a process forked from the one that started it."""


class _OnDevice(Exception):
    """Raised while packing at the first value that lives on an accelerator."""


def _host_value(value: Any) -> Any:
    """msgpack's `default` on the hot path: like protocol.to_scalar, but a value on an accelerator
    stops the packing (its `.item()` would wait for the device) so the row can take the batched path."""
    device = getattr(value, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise _OnDevice()
    return protocol.to_scalar(value)


def default_spill_dir() -> str:
    explicit = os.environ.get("RELAY_SPILL_DIR")
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "tokenhsi-relay", "spill")


def _locked(method):
    """Run a RelayClient method holding the client's lock (the heartbeat thread pumps under it too)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return call


_CLIENTS = weakref.WeakSet()  # type: weakref.WeakSet  (every RelayClient of this process)


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RelayClient:
    """One connection to a relay. Its methods may be called from any one thread at a time; the
    heartbeat thread works the socket only between them (the client's lock)."""

    def __init__(self, endpoint: Optional[str] = None, max_pending: int = 10000,
                 spill_dir: Optional[str] = None, resend_after: float = 1.0,
                 warn_every: float = 30.0, stream: Optional[str] = None, heartbeat_every: float = 10.0,
                 keys: Optional[str] = None, reconnect_after: float = RECONNECT_AFTER):
        self.endpoint = endpoint or os.environ.get("RELAY_ENDPOINT") or protocol.DEFAULT_ENDPOINT
        # CurveZMQ keys (the DIR/<name>/ directory of `relay keys new`); a bad directory raises
        # CurveKeyError here, at start: a configuration mistake, not a transport problem.
        keys = keys or os.environ.get(CLIENT_KEYS_VARIABLE)
        self.keys = load_client_keys(keys) if keys else None  # type: Optional[ClientKeys]
        self.reconnect_after = reconnect_after
        self.max_pending = max(1, int(max_pending))
        self.spill_dir = spill_dir or default_spill_dir()
        self.resend_after = resend_after
        self.warn_every = warn_every
        self.heartbeat_every = heartbeat_every
        self._closed = False
        self._parent_runs = set()      # type: set  (runs open in the process this one was forked from)
        self._begin(stream)
        _CLIENTS.add(self)

    def _begin(self, stream: Optional[str]) -> None:
        """The state of one process's use of the client: a stream, its records, its socket."""
        self.stream = stream or uuid.uuid4().hex
        self._life = object()          # what this process's Runs hold (a forked child gets a new one)
        self._seq = 0
        self._pending = OrderedDict()  # type: OrderedDict[int, bytes]  (seq -> frame, in seq order)
        self._deferred = deque()       # type: deque  ((message, Transfer or None), waiting for device values)
        self._next_send = 1            # lowest seq not yet handed to ZeroMQ
        self._last_progress = 0.0      # last time an ack removed something or a send started a window
        self._stalled_since = 0.0      # when sends started failing (no connection), 0 if they do not
        self._drained_at = 0.0         # last time replies were read
        self._socket = None
        self._monitor = None           # handshake failures of _socket (read only while sends fail)
        self._opened_at = 0.0
        self._handshake = ""           # why the relay last refused the handshake, "" if it did not
        self._context = None
        self._pid = None
        self._warned_at = {}           # type: Dict[str, float]
        self.spill_files = []          # type: List[str]
        self.errors = []               # type: List[str]  (last few error replies from the relay)
        self._stats = {"sent": 0, "acked": 0, "spilled": 0, "dropped": 0, "errors": 0, "resent": 0,
                       "spill_failed": 0, "lost": 0}
        self._spill_again_at = 0       # records sent before an overflow may try a failed spill again
        self._spill_stamp = 0          # the time in the last spill file's name, in microseconds (never goes back)
        self._spill_error = ""         # why the last spill failed
        self._heartbeat = None         # type: Optional[_Heartbeat]
        self._open_runs = {}           # type: Dict[str, Dict[str, Any]]  (run id -> settings)
        self._lock = threading.RLock()  # the trainer's calls; the heartbeat thread only tries it

    def _after_fork(self) -> None:
        """In a forked child (os.register_at_fork): start over as a new stream of this process.
        The parent's pending records, socket and heartbeat thread are left as they are, unused
        (pyzmq leaves another process's sockets alone when they are collected); its open
        runs are remembered so that they are refused here. A new lock: the parent's may have been
        held, at the fork, by its heartbeat thread, which does not exist here."""
        self._parent_runs = self._parent_runs | set(self._open_runs)
        self._begin(None)

    # -- public API ---------------------------------------------------------------------------

    @_locked
    def start_run(self, project: str, name: Optional[str] = None, entity: Optional[str] = None,
                  group: Optional[str] = None, tags: Optional[List[str]] = None, notes: Optional[str] = None,
                  config: Optional[Dict[str, Any]] = None, mode: Optional[str] = None,
                  run_id: Optional[str] = None, job_type: Optional[str] = None) -> "Run":
        if mode is not None and mode not in protocol.WANDB_MODES:
            raise ValueError("mode must be one of %s, got %r" % (", ".join(protocol.WANDB_MODES), mode))
        if os.environ.get("WANDB_MODE") == "disabled":
            mode = "disabled"
        run_id = run_id or uuid.uuid4().hex[:12]
        if not protocol.valid_run_id(run_id):
            raise ValueError("run_id %r must be 1..64 letters, digits, '-' or '_'" % run_id)
        if mode == "disabled":
            return DisabledRun(run_id, name)
        if run_id in self._parent_runs:
            raise ForkedRunError("run %s is open in the process this one (pid %d) was forked from, and a run has "
                                 "one writer: start a run with another run_id here" % (run_id, os.getpid()))
        settings = {"project": project, "entity": entity, "name": name, "group": group,
                    "tags": list(tags or []), "notes": notes, "config": dict(config or {}),
                    "mode": mode, "job_type": job_type}
        settings = {key: value for key, value in settings.items() if value is not None}
        protocol.validate_settings(settings)
        run = Run(self, run_id, name)
        self._open_runs[run_id] = settings
        self.submit({"t": "open", "run": run_id, "settings": settings})
        if self.heartbeat_every > 0:
            if self._heartbeat is None or self._heartbeat.pid != os.getpid():
                self._heartbeat = _Heartbeat(self.endpoint, self.stream, self.heartbeat_every, self.keys,
                                             max(self.reconnect_after, 3 * self.heartbeat_every),
                                             weakref.ref(self))
                self._heartbeat.start()
            self._heartbeat.runs.add(run_id)
        return run

    @_locked
    def _run_finished(self, run_id: str) -> None:
        self._open_runs.pop(run_id, None)
        if self._heartbeat is not None:
            self._heartbeat.runs.discard(run_id)

    @_locked
    def statistics(self) -> Dict[str, Any]:
        self._release_deferred(wait=False)
        self._pump(force=True)
        stats = dict(self._stats)
        stats["pending"] = len(self._pending) + len(self._deferred)
        stats["last_error"] = self.errors[-1] if self.errors else None
        stats["spill_files"] = list(self.spill_files)
        return stats

    @_locked
    def flush(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for every pending record to be acked."""
        deadline = time.monotonic() + timeout
        self._release_deferred(wait=True)
        self._pump(force=True)
        while self._pending and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._sock().poll(int(min(remaining, 0.05) * 1000) + 1, zmq.POLLIN)
            except zmq.ZMQError:
                pass
            self._pump(force=True)
        return not self._pending

    @_locked
    def spill_pending(self) -> Optional[str]:
        """Write every pending record to a new spill file now; returns its path (None if none)."""
        self._release_deferred(wait=True)
        return self._spill()

    @_locked
    def close(self, timeout: float = 0.0) -> Optional[str]:
        """Wait up to `timeout` for acks, spill whatever is still pending, close the socket. What
        cannot be spilled (see _spill) is lost: counted in `lost`, logged with the reason."""
        if self._closed:
            return None
        if timeout > 0:
            self.flush(timeout)
        spilled = self.spill_pending()
        if self._pending:  # the spill failed: these records are in no place any more
            lost = len(self._pending)
            self._pending.clear()
            self._stats["lost"] += lost
            text = ("%d records lost at close: the relay at %s had not acked them and they could not be spilled: "
                    "%s (%s)" % (lost, self.endpoint, self._spill_error, SPILL_FIX))
            self.errors = (self.errors + [text])[-20:]
            self._warn("lost", text, force=True)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._close_socket()
        self._context = None
        self._closed = True
        return spilled

    # -- records ------------------------------------------------------------------------------

    def pump_if_idle(self) -> None:
        """The heartbeat thread's call, about once a second: send, re-send and read acks when no
        trainer call is running and something is waiting. Never waits for the lock."""
        if not self._lock.acquire(False):
            return  # a trainer call is doing this work right now
        try:
            if self._closed or self._pid != os.getpid() or not (self._pending or self._deferred):
                return
            self._release_deferred(wait=False)
            self._pump(force=True)
        finally:
            self._lock.release()

    @_locked
    def submit(self, message: Dict[str, Any]) -> None:
        """Queue one record and do a bounded amount of socket work. Never blocks (a row with device
        values waits only when more than MAX_DEFERRED such rows are still being copied)."""
        if self._closed:
            self._stats["dropped"] += 1
            self._warn("closed", "record after close() dropped: %s" % message.get("t"))
            return
        if self._deferred:
            self._release_deferred(wait=len(self._deferred) >= MAX_DEFERRED)
        if not self._deferred:
            try:
                self._queue(message, _host_value)
                return
            except _OnDevice:
                pass
        self._deferred.append((message, self._start_transfer(message)))  # behind the rows still waiting

    def _start_transfer(self, message: Dict[str, Any]) -> Optional[tensors.Transfer]:
        """For a record that must wait: start the copy of its device values (None if it has none).
        Raises TypeError at once for a value the wire cannot carry, as `_queue` does."""
        try:  # the packing of _queue, without taking a seq
            msgpack.packb(message, use_bin_type=True, default=_host_value)
            return None
        except _OnDevice:
            pass
        field = VALUE_FIELDS.get(message.get("t"))
        if field is None or not isinstance(message.get(field), dict):
            return None  # device values elsewhere (checkpoint metadata): read one by one when sent
        transfer = tensors.start_transfer(message[field])
        if transfer.skipped:
            raise TypeError("metric values %s are not numbers, bools, strs or 1-element tensors"
                            % ", ".join(repr(name) for name in transfer.skipped))
        return transfer

    def _release_deferred(self, wait: bool) -> None:
        """Queue the waiting rows whose device values have landed, oldest first; `wait`: all of them."""
        while self._deferred:
            message, transfer = self._deferred[0]
            if transfer is not None:
                if not wait and not transfer.ready():
                    return
                message[VALUE_FIELDS[message["t"]]] = transfer.values()
            self._deferred.popleft()
            self._queue(message, protocol.to_scalar)

    def _queue(self, message: Dict[str, Any], default: Any) -> None:
        """Give the record its seq, pack it, add it to the pending buffer and pump. Raises _OnDevice
        (with `_host_value`) before taking a seq when a value lives on an accelerator."""
        if len(self._pending) >= self.max_pending:
            self._overflow()
        self._seq += 1
        message["v"] = protocol.VERSION
        message["stream"] = self.stream
        message["seq"] = self._seq
        try:
            # protocol.encode's packing, with `default` chosen by the caller (see _host_value)
            frame = msgpack.packb(message, use_bin_type=True, default=default)
        except _OnDevice:
            self._seq -= 1
            raise
        except (TypeError, ValueError):
            self._seq -= 1  # a value of a type the wire cannot carry: the caller's bug, said at once
            raise
        if len(frame) > protocol.MAX_FRAME_BYTES:
            self._seq -= 1  # the seq is reused, so the relay sees no gap
            self._stats["dropped"] += 1
            self._error("record %s of %d bytes is over the %d-byte frame limit; dropped (log fewer or "
                        "shorter values)" % (message["t"], len(frame), protocol.MAX_FRAME_BYTES))
            return
        self._pending[self._seq] = frame
        self._stats["sent"] += 1
        self._pump()

    def _overflow(self) -> None:
        """max_pending reached (the relay is away or slow): spill every pending record to a file
        and carry on in a fresh stream, so the relay, which takes each stream in order, is not
        left waiting for records that now live in a file (`relay replay` delivers those).
        A spill that failed is tried again only after `max_pending` more records: one attempt per
        overflow, not one per call."""
        if self._stats["sent"] < self._spill_again_at:
            return
        if self._spill() is None:
            # Nowhere to spill: the buffer grows rather than lose records (said in _spill).
            self._spill_again_at = self._stats["sent"] + self.max_pending
            return
        self.stream = uuid.uuid4().hex
        self._seq = 0
        self._next_send = 1
        for run_id, settings in self._open_runs.items():  # the new stream names its runs again, first
            self._queue({"t": "open", "run": run_id, "settings": settings}, protocol.to_scalar)

    # -- socket work --------------------------------------------------------------------------

    def _sock(self) -> zmq.Socket:
        # pyzmq's shared context: one per process (it makes a new one in a forked child, as
        # contexts do not survive fork), never terminated here. A context of the client's own would
        # be terminated when collected, and a client dropped without close() in a reference cycle
        # can be collected after its socket was forgotten but not closed: term() then waits for ever.
        if self._context is None or self._pid != os.getpid():
            self._context, self._socket, self._pid = zmq.Context.instance(), None, os.getpid()
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)       # no queueing into a pipe with no relay behind it
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.setsockopt(zmq.RCVHWM, 10000)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if self.keys is not None:
                self.keys.apply(sock)
            self._monitor = self._watch_handshakes(sock)
            sock.connect(self.endpoint)
            self._socket = sock
            self._opened_at = time.monotonic()
            self._next_send = next(iter(self._pending), self._seq + 1)
        return self._socket

    def _watch_handshakes(self, sock: zmq.Socket) -> zmq.Socket:
        address = "inproc://relay-client-handshakes-%d" % next(_MONITOR_NUMBERS)  # never reused in a context
        sock.monitor(address, sum(HANDSHAKE_FAILURES))
        monitor = self._context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.setsockopt(zmq.RCVHWM, 0)  # never full: ZeroMQ's I/O thread must not wait on this pipe
        monitor.connect(address)
        return monitor

    def _close_socket(self) -> None:
        if self._socket is not None and self._pid == os.getpid():
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = self._monitor = None

    def _read_handshakes(self) -> None:
        """Why the relay refused the connection, if it did (only looked at while sends fail)."""
        from zmq.utils.monitor import recv_monitor_message

        event = None
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
        if event is None:
            return
        reason = "relay at %s %s" % (self.endpoint, HANDSHAKE_FAILURES.get(event, "refused the connection"))
        if reason != self._handshake:
            self._handshake = reason
            self._error(reason)

    def _pump(self, force: bool = False) -> None:
        if self._closed:
            return
        try:
            sock = self._sock()
            now = time.monotonic()
            if force or now - self._drained_at > DRAIN_EVERY or len(self._pending) >= self.max_pending:
                self._drained_at = now
                self._drain(sock)
                self._maybe_rewind()
            self._send_queued(sock)
        except zmq.ZMQError as exc:  # transport trouble is counted, never raised
            self._warn("zmq", "relay socket error at %s: %s" % (self.endpoint, exc))

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(RECV_BUDGET):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = protocol.decode_raw(frame)
            except protocol.ProtocolError as exc:
                self._warn("reply", "unreadable reply from relay: %s" % exc.reason)
                continue
            kind = reply.get("t")
            if kind == "ack":
                self._on_ack(reply)
            elif kind == "error":
                if isinstance(reply.get("seq"), int) and reply.get("stream") in (None, self.stream):
                    self._pending.pop(reply["seq"], None)  # can never be accepted: no use re-sending
                self._stats["errors"] += 1
                self._error("relay refused record seq=%s: %s" % (reply.get("seq"), reply.get("reason")))

    def _on_ack(self, reply: Dict[str, Any]) -> None:
        before = len(self._pending)
        upto = reply.get("upto")
        if isinstance(upto, int):
            while self._pending and next(iter(self._pending)) <= upto:
                self._pending.popitem(last=False)
        for bounds in reply.get("seqs") or []:
            if isinstance(bounds, list) and len(bounds) == 2:
                low, high = bounds
                if high - low < len(self._pending):
                    for seq in range(low, high + 1):
                        self._pending.pop(seq, None)
                else:
                    for seq in [s for s in self._pending if low <= s <= high]:
                        del self._pending[seq]
        acked = before - len(self._pending)
        if acked:
            self._stats["acked"] += acked
            self._last_progress = time.monotonic()

    def _maybe_rewind(self) -> None:
        """No ack progress for `resend_after`: re-send everything unacked, oldest first."""
        if not self._pending:
            return
        oldest = next(iter(self._pending))
        if oldest >= self._next_send:
            return  # nothing in flight
        if time.monotonic() - self._last_progress > self.resend_after:
            self._stats["resent"] += self._next_send - oldest
            self._next_send = oldest
            self._last_progress = time.monotonic()

    def _send_queued(self, sock: zmq.Socket) -> None:
        if not self._pending:
            self._next_send = self._seq + 1
            return
        if self._next_send < next(iter(self._pending)):
            self._next_send = next(iter(self._pending))
        for _ in range(SEND_BUDGET):
            if self._next_send > self._seq:
                return
            frame = self._pending.get(self._next_send)
            if frame is not None:
                if not self._in_flight():
                    self._last_progress = time.monotonic()  # a new window starts now
                try:
                    sock.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    self._stalled()
                    return
                self._stalled_since = 0.0
                self._handshake = ""
            self._next_send += 1

    def _stalled(self) -> None:
        """A send found no connection: say why once it lasts, and make the socket anew now and then."""
        now = time.monotonic()
        self._stalled_since = self._stalled_since or now
        if now - self._stalled_since <= STALL_WARNING:
            return  # a connection being made
        if self._due("absent"):
            self._read_handshakes()
            if self._handshake:
                self._warn("absent", "%s; %d records pending (kept and re-sent)" % (self._handshake, len(self._pending)))
            else:
                self._warn("absent", "relay at %s is not answering; %d records pending (kept and re-sent; start "
                           "it with `relay serve`)" % (self.endpoint, len(self._pending)))
        if now - self._opened_at > self.reconnect_after and now - self._stalled_since > self.reconnect_after:
            self._read_handshakes()
            self._close_socket()  # the next call connects anew and re-sends from the oldest unacked record

    def _in_flight(self) -> bool:
        return bool(self._pending) and next(iter(self._pending)) < self._next_send

    # -- spill files --------------------------------------------------------------------------

    def _spill(self) -> Optional[str]:
        """Move every pending record into a new spill file (temp -> fsync -> rename -> fsync dir).
        On failure nothing is left on disk, the records stay pending, and it is counted and said."""
        if not self._pending:
            return None
        first, last = next(iter(self._pending)), next(reversed(self._pending))
        # Names sort in the order they were written, so `relay replay DIR/*` keeps run order; the
        # time in them never goes back within a client, even when the wall clock is set back.
        self._spill_stamp = max(int(time.time() * 1e6), self._spill_stamp + 1)
        name = "relay-spill-%s-%06d-%s-%d-%d.msgpack" % (
            time.strftime("%Y%m%dT%H%M%S", time.localtime(self._spill_stamp // 1000000)),
            self._spill_stamp % 1000000, self.stream[:12], first, last)
        path = os.path.join(self.spill_dir, name)
        tmp = None
        try:
            os.makedirs(self.spill_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".spill-", dir=self.spill_dir)
            with os.fdopen(fd, "wb") as handle:
                packer = msgpack.Packer(use_bin_type=True)
                for frame in self._pending.values():
                    handle.write(packer.pack(frame))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            tmp = path
            dir_fd = os.open(self.spill_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self._stats["spill_failed"] += 1
            self._spill_error = "cannot write spill file in %s: %s%s" % (
                self.spill_dir, exc, " (%s)" % errno.errorcode[exc.errno] if exc.errno in errno.errorcode else "")
            self._error("%s; %d records kept in memory (%s)" % (self._spill_error, len(self._pending), SPILL_FIX))
            return None
        spilled = len(self._pending)
        self._pending.clear()
        self._spill_again_at = 0
        self._stats["spilled"] += spilled
        self.spill_files.append(path)
        self._warn("spill", "%d records spilled to %s; deliver them with: relay replay %s (with the relay's "
                   "--config or --artifact-root, so that its checkpoints are taken too)"
                   % (spilled, path, path), force=True)
        return path

    # -- reporting ----------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        self.errors = (self.errors + [text])[-20:]
        self._warn("error", text)

    def _due(self, kind: str) -> bool:
        return time.monotonic() - self._warned_at.get(kind, -1e9) >= self.warn_every

    def _warn(self, kind: str, text: str, force: bool = False) -> None:
        if force or self._due(kind):
            self._warned_at[kind] = time.monotonic()
            log.warning(text)


class _Heartbeat(threading.Thread):
    """Tells the relay every few seconds that this process's runs are alive.

    Its own socket (ZeroMQ sockets belong to one thread); sends are non-blocking and unanswered.
    When the trainer dies (SIGKILL, OOM, node loss) the heartbeats stop and the relay finishes
    its runs in W&B with a non-zero exit code after its `silence_timeout`.
    """

    def __init__(self, endpoint: str, stream: str, every: float, keys: Optional[ClientKeys] = None,
                 reconnect_after: float = RECONNECT_AFTER, client: Any = None):
        super().__init__(name="relay-heartbeat", daemon=True)
        self.endpoint = endpoint
        self.keys = keys
        self.stream = stream
        self.every = every
        self.reconnect_after = reconnect_after
        self.runs = set()  # type: set
        self.client = client  # weakref to the RelayClient, pumped while its trainer is quiet
        self.pid = os.getpid()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        context = zmq.Context()
        sock = self._connect(context)
        failing_since = 0.0
        next_beat = time.monotonic() + self.every
        try:
            while not self._stop_event.wait(min(PUMP_EVERY, self.every)):
                self._pump_client()
                if time.monotonic() < next_beat:
                    continue
                next_beat = time.monotonic() + self.every
                runs = sorted(self.runs)
                if not runs:
                    continue
                try:
                    sock.send(protocol.encode({"v": protocol.VERSION, "t": "heartbeat", "stream": self.stream,
                                               "seq": 0, "runs": runs}), zmq.NOBLOCK)
                    failing_since = 0.0
                except zmq.ZMQError:  # relay away: the main socket warns about that
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.reconnect_after:  # see RECONNECT_AFTER
                        sock.close(linger=0)
                        sock, failing_since = self._connect(context), 0.0
        finally:
            sock.close(linger=0)
            context.term()

    def _pump_client(self) -> None:
        client = self.client() if self.client is not None else None
        if client is None:
            return
        try:
            client.pump_if_idle()
        except Exception as exc:  # never let the trainer's records or this thread die of it
            log.warning("relay client: background send failed: %s", exc)

    def _connect(self, context: zmq.Context) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 4)
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(self.endpoint)
        return sock


class Run:
    """A W&B run as seen from the trainer. Methods queue records; none of them waits.

    A run belongs to the process that started it: in a process forked from that one, its methods
    raise ForkedRunError (start a run of the child's own there; the client works in the child)."""

    def __init__(self, client: RelayClient, run_id: str, name: Optional[str]):
        self.client = client
        self.id = run_id
        self.name = name
        self._life = client._life
        self._pid = os.getpid()

    def _refuse_if_forked(self) -> None:
        if self._life is not self.client._life:
            raise ForkedRunError(
                "run %s belongs to process %d, and this process (pid %d) is a fork of it: a run has one writer. "
                "Start a run of this process's own with client.start_run(..., run_id=<another id>); its records "
                "are delivered as a stream of their own" % (self.id, self._pid, os.getpid()))

    def log(self, metrics: Dict[str, Any], frame: Optional[int] = None, epoch: Optional[int] = None,
            namespace: Optional[str] = None) -> None:
        if self._life is not self.client._life:  # the hot path: _refuse_if_forked's test, inline
            self._refuse_if_forked()
        if not isinstance(metrics, dict):
            raise TypeError("metrics must be a dict of name -> number, got %s" % type(metrics).__name__)
        # Values are converted while packing: no per-metric Python work here. A row with values on
        # an accelerator takes the batched path (one copy per row, see submit).
        message = {"t": "log", "run": self.id, "time": time.time(), "metrics": metrics}
        if frame is not None:
            message["frame"] = int(frame)
        if epoch is not None:
            message["epoch"] = int(epoch)
        if namespace:
            message["ns"] = str(namespace)
        self.client.submit(message)

    def log_checkpoint(self, path: str, metadata: Optional[Dict[str, Any]] = None,
                       aliases: Optional[List[str]] = None) -> None:
        """The relay uploads the file as it finds it when it takes the record (it snapshots it then);
        the size and mtime seen here let it refuse a file that a later save replaced meanwhile."""
        self._refuse_if_forked()
        message = {"t": "checkpoint", "run": self.id, "time": time.time(), "path": os.path.abspath(os.fspath(path)),
                   "metadata": dict(metadata or {}), "aliases": list(aliases or [])}
        try:
            info = os.stat(message["path"])
            message["stat"] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        except OSError:
            pass  # the relay says what is wrong with the path
        self.client.submit(message)

    def summary(self, values: Dict[str, Any]) -> None:
        self._refuse_if_forked()
        self.client.submit({"t": "summary", "run": self.id, "values": dict(values)})

    def finish(self, exit_code: int = 0, timeout: float = 10.0) -> Dict[str, Any]:
        """Queue the finish record, wait at most `timeout` for acks, spill the rest to disk."""
        self._refuse_if_forked()
        self.client.submit({"t": "finish", "run": self.id, "exit_code": int(exit_code), "time": time.time()})
        self.client._run_finished(self.id)
        delivered = self.client.flush(timeout)
        spill_file = None if delivered else self.client.spill_pending()
        stats = self.client.statistics()
        return {"run": self.id, "delivered": delivered, "spill_file": spill_file,
                "acked": stats["acked"], "spilled": stats["spilled"], "errors": stats["errors"]}


class DisabledRun:
    """What `start_run` returns when reporting is disabled (mode or WANDB_MODE=disabled)."""

    def __init__(self, run_id: str, name: Optional[str]):
        self.id = run_id
        self.name = name

    def log(self, metrics: Dict[str, Any], frame: Optional[int] = None, epoch: Optional[int] = None,
            namespace: Optional[str] = None) -> None:
        pass

    def log_checkpoint(self, path: str, metadata: Optional[Dict[str, Any]] = None,
                       aliases: Optional[List[str]] = None) -> None:
        pass

    def summary(self, values: Dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0, timeout: float = 10.0) -> Dict[str, Any]:
        return {"run": self.id, "delivered": True, "spill_file": None, "acked": 0, "spilled": 0,
                "errors": 0, "disabled": True}
