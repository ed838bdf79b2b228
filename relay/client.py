"""The trainer-side client: hands records to the relay without ever waiting on it.

The public facade of the trainer side: RelayClient, Run, DisabledRun, ForkedRunError. The work is
done by relay.outbox (the records' ledger: seqs, pending records, acks, re-sends, overflow, rows
waiting for their device values), relay.iothread (the client's I/O thread: every socket operation,
heartbeats), relay.connection (the socket, its handshake diagnostics, reconnects) and relay.spill
(spill files; the client's errors and rate-limited warnings). relay.runthreads runs each run's
threads beside the training loop: its provenance, once (relay.provenance), and its system metrics
sampler (relay.sysmetrics).

Invariants (DESIGN.md):
- Every call returns in bounded time and never raises for transport problems (relay absent,
  restarting, slow, taking a backlog). A record is packed on the trainer's thread (its values are
  read there, once), added to the outbox, and the I/O thread is nudged; no trainer call touches the
  socket. Problems are counted in `statistics()` and warned about, rate-limited.
- A record the client accepted is at every moment in exactly one place: the bounded outbox
  (pending, re-sent until acked; or handed over at an overflow, on its way to a file), a spill file
  (written by the spill thread after an overflow, or at finish/close; ingested later by `relay
  replay`), or the relay's spool (which acks only after its commit). relay.outbox says how.
- `flush(timeout)` and `finish(timeout)` are the only calls that wait, for at most `timeout`
  (and `finish`/`close` for the spill files they write). An overflow (`max_pending` records
  unacked) only hands the records over to the spill thread (relay.spilling): no trainer call
  writes a file on overflow. At most `max_buffered` records are held; past that, new records are
  dropped and counted (policy drop_newest).
- While the trainer is quiet (a long evaluation, a save) the I/O thread goes on: records waiting
  for a relay that came back are sent without another call, and heartbeats name the open runs.
- After `os.fork()` the child's copy of a client is a new, empty client of the child's: a new
  stream id, no pending records (those are the parent's to deliver), its own I/O thread, socket and
  ZeroMQ context made at its first record (the parent's are never touched: ZeroMQ contexts do not
  survive fork), statistics from zero. A `Run` belongs to the process that started it: used in a
  forked child it raises ForkedRunError, and so does `start_run` there with the id of a run the
  parent has open. A run has one writer: two would interleave their rows in one W&B history, merge
  rows that share a `frame`, and the first `finish` would end the run for both.
- `close()` waits for a spill in flight, then spills what is left. What it cannot spill (see
  relay.spill) is lost: counted (`lost`), logged with its count, the directory and what to do.

Exceptions raised to the caller (the trainer's misuse, never transport trouble): ValueError and
TypeError for arguments and values the wire cannot carry, ForkedRunError (a RuntimeError) for a run
used in a forked child, and relay.keys.CurveKeyError for an unusable key directory.

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import functools
import os
import threading
import time
import uuid
import weakref
from typing import Any, Dict, List, Optional

from relay import media, protocol, tensors  # noqa: F401 (tensors: where the outbox starts device copies)
from relay.connection import RECONNECT_AFTER, Connection
from relay.console import NO_CAPTURE, ConsoleCapture, ConsoleLimits, capture_for, console_limits  # noqa: F401
from relay.errors import ForkedRunError  # noqa: F401 (part of this module's API)
from relay.iothread import IOThread
from relay.keys import CLIENT_KEYS_VARIABLE, ClientKeys, load_client_keys
from relay.modes import DisabledRun, reporting_disabled  # noqa: F401 (DisabledRun: part of this module's API)
from relay.outbox import MAX_DEFERRED, Outbox  # noqa: F401 (MAX_DEFERRED: part of this module's API)
from relay.runthreads import RunThreads
from relay.spill import SPILL_FIX, Reporter, Spiller, default_spill_dir
from relay.spilling import SpillThread

JOIN_TIMEOUT = 2.0     # seconds close() gives the I/O thread to end its slice and close the socket


def _locked(method):
    """Run a RelayClient method holding the client's lock: one trainer call at a time."""
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
    client's I/O thread does the socket work meanwhile."""

    def __init__(self, endpoint: Optional[str] = None, max_pending: int = 10000,
                 spill_dir: Optional[str] = None, resend_after: float = 1.0,
                 warn_every: float = 30.0, stream: Optional[str] = None, heartbeat_every: float = 10.0,
                 keys: Optional[str] = None, reconnect_after: float = RECONNECT_AFTER,
                 max_buffered: Optional[int] = None, provenance: bool = True, system_metrics: Optional[float] = 15.0):
        self.endpoint = endpoint or os.environ.get("RELAY_ENDPOINT") or protocol.DEFAULT_ENDPOINT
        # CurveZMQ keys (the DIR/<name>/ directory of `relay keys new`); a bad directory raises
        # CurveKeyError here, at start: a configuration mistake, not a transport problem.
        keys = keys or os.environ.get(CLIENT_KEYS_VARIABLE)
        self.keys = load_client_keys(keys) if keys else None  # type: Optional[ClientKeys]
        self.reconnect_after = reconnect_after
        self.max_pending = max(1, int(max_pending))
        self.max_buffered = max_buffered
        self.spill_dir = spill_dir or default_spill_dir()
        self.resend_after = resend_after
        self.warn_every = warn_every
        self.heartbeat_every = heartbeat_every
        self._closed, self.provenance, self.system_metrics = False, bool(provenance), float(system_metrics or 0)
        self._parent_runs = set()      # type: set  (runs open in the process this one was forked from)
        self._begin(stream)
        _CLIENTS.add(self)

    def _begin(self, stream: Optional[str]) -> None:
        """The state of one process's use of the client: its records, its I/O thread."""
        self._life = object()          # what this process's Runs hold (a forked child gets a new one)
        self._report = Reporter(self.warn_every)
        self._spiller = Spiller(self.spill_dir, self._report)
        self._outbox = Outbox(stream, self.max_pending, self.resend_after, spill=self._spiller,
                              reopen=self._reopen_messages, reporter=self._report, max_buffered=self.max_buffered,
                              endpoint=self.endpoint)
        self._io = None                # type: Optional[IOThread]  (started with the first record)
        self._spills = None            # type: Optional[SpillThread]  (made with the I/O thread, started by it)
        self._console = NO_CAPTURE     # type: ConsoleCapture  (the console a run of this client captures)
        self._open_runs = {}           # type: Dict[str, Dict[str, Any]]  (run id -> settings)
        self._lock = threading.RLock()

    def _after_fork(self) -> None:
        """In a forked child (os.register_at_fork): start over as a new stream of this process.
        The parent's records, I/O thread and socket are left as they are, unused (pyzmq leaves
        another process's sockets alone when they are collected); its open runs are remembered so
        that they are refused here. A new lock: the parent's may have been held at the fork by
        another of its threads, which do not exist here."""
        self._parent_runs = self._parent_runs | set(self._open_runs)
        self._begin(None)

    @property
    def stream(self) -> str:
        """The stream id the records are sent in now (a new one after each overflow)."""
        return self._outbox.stream

    @property
    def spill_files(self) -> List[str]:
        return self._spiller.files

    @property
    def errors(self) -> List[str]:
        """The last few errors (the relay's refusals, handshake trouble, spills that failed)."""
        return self._report.errors

    # -- public API ---------------------------------------------------------------------------

    @_locked
    def start_run(self, project: str, name: Optional[str] = None, entity: Optional[str] = None,
                  group: Optional[str] = None, tags: Optional[List[str]] = None, notes: Optional[str] = None,
                  config: Optional[Dict[str, Any]] = None, mode: Optional[str] = None, run_id: Optional[str] = None,
                  job_type: Optional[str] = None, console: Any = False, provenance: Optional[bool] = None,
                  system_metrics: Optional[float] = None) -> "Run":
        limits = console_limits(console)  # True or a ConsoleLimits: stdout/stderr to the run's Logs (relay.console)
        if mode is not None and mode not in protocol.WANDB_MODES:
            raise ValueError("mode must be one of %s, got %r" % (", ".join(protocol.WANDB_MODES), mode))
        run_id = run_id or uuid.uuid4().hex[:12]
        if not protocol.valid_run_id(run_id):
            raise ValueError("run_id %r must be 1..64 letters, digits, '-' or '_'" % run_id)
        if reporting_disabled(mode):
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
        run._threads = RunThreads(self, run_id, provenance, system_metrics).open(settings)
        if self._io is not None:
            self._io.runs = frozenset(self._open_runs)
        run._console = self._console = capture_for(run.id, self._outbox, self._io, limits, self)
        return run

    @_locked
    def _run_finished(self, run_id: str) -> None:
        self._open_runs.pop(run_id, None)
        if self._io is not None:
            self._io.runs = frozenset(self._open_runs)

    def _reopen_messages(self) -> List[Dict[str, Any]]:
        """The open records a new stream starts with (after an overflow): one per open run."""
        return [{"t": "open", "run": run_id, "settings": settings} for run_id, settings in self._open_runs.items()]

    @_locked
    def statistics(self) -> Dict[str, Any]:
        outbox = self._outbox
        with outbox.lock:
            if not self._closed:
                outbox.deferred.release(wait=False)
            stats = dict(outbox.stats)
            stats["pending"] = outbox.count()
            stats["spilling"] = outbox.spilling.count
        stats["last_error"] = self._report.last()
        stats["spill_files"] = list(self._spiller.files)
        return stats

    @_locked
    def flush(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for every pending record to be acked."""
        deadline = time.monotonic() + timeout
        self._console.flush()  # the console lines queued so far go in a record first
        outbox = self._outbox
        with outbox.lock:
            outbox.deferred.release(wait=True)
            if not outbox.pending or self._closed:
                return not outbox.pending
        (self._io or self._start_io()).nudge()
        with outbox.lock:
            while outbox.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                outbox.lock.wait(remaining)
            return not outbox.pending

    @_locked
    def spill_pending(self, only_handed_over: bool = False) -> Optional[str]:
        """Write every pending record (`only_handed_over`: none) to a new spill file now, after the
        records an overflow handed over (waiting for a spill in flight); returns the new file's path
        (None if nothing was pending, or the spill failed)."""
        with self._outbox.lock:
            self._outbox.deferred.release(wait=True)
        return self._outbox.spill(reopen=not self._closed, pending=not only_handed_over)

    @_locked
    def close(self, timeout: float = 0.0) -> Optional[str]:
        """Wait up to `timeout` for acks, stop the I/O thread, spill whatever is still pending.
        What cannot be spilled is lost: counted in `lost`, logged with the reason."""
        if self._closed:
            return None
        self._console.stop()  # a run not finished captures it: its last lines go now (or to the spill)
        if timeout > 0:
            self.flush(timeout)
        io = self._io
        if io is not None:
            io.stop()
            io.join(JOIN_TIMEOUT)
            io.close_pipe()
        self._closed = True
        outbox = self._outbox
        with outbox.lock:
            outbox.deferred.release(wait=True)
        spilled = outbox.spill()       # after the spill in flight, if any
        if self._spills is not None:
            self._spills.stop()
            self._spills.join_if_started(JOIN_TIMEOUT)
        with outbox.lock:
            if outbox.pending or outbox.spilling.count:  # a spill failed: these records are in no place any more
                lost = outbox.drop_all()
                text = ("%d records lost at close: the relay at %s had not acked them and they could not be "
                        "spilled: %s (%s)" % (lost, self.endpoint, self._spiller.last_error, SPILL_FIX))
                self._report.note(text)
                self._report.warn("lost", text, force=True)
        return spilled

    # -- records ------------------------------------------------------------------------------

    def submit(self, message: Dict[str, Any]) -> None:
        """Accept one record (see Outbox.submit) and nudge the I/O thread. Never waits on the relay
        (a row with device values waits only when more than MAX_DEFERRED such rows are still being
        copied)."""
        with self._lock:
            if self._closed:
                self._outbox.stats["dropped"] += 1
                self._report.warn("closed", "record after close() dropped: %s" % message.get("t"))
                return
            outbox = self._outbox
            with outbox.lock:
                outbox.submit(message)
            io = self._io
            if io is None:
                io = self._start_io()
            io.work = True             # IOThread.nudge, inline: the hot path
            if io.idle:
                io.nudge()

    def _start_io(self) -> IOThread:
        connection = Connection(self.endpoint, self.keys, self._report, self.reconnect_after)
        self._spills = SpillThread(self._outbox.spilling, self._report)
        self._outbox.spilling.waker = self._spills.nudge
        io = IOThread(self._outbox, connection, self._report, self.heartbeat_every, self._spills)
        io.runs = frozenset(self._open_runs)
        io.start()
        # A client dropped without close(): its thread ends too (not at exit, where a trainer's own
        # atexit handler may still finish a run through it).
        weakref.finalize(self, io.stop).atexit = False
        self._io = io
        return io


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
        self._threads = None  # type: Optional[RunThreads]  (its provenance and sampler: relay.runthreads)
        self._console = NO_CAPTURE  # type: ConsoleCapture

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
        try:
            self.client.submit(message)
        except TypeError:
            if not media.holds_media(metrics):
                raise
            self._log_media(message)

    def _log_media(self, message: Dict[str, Any]) -> None:
        """A row holding media (relay.media), which packing refused: its scalars and axes go as the
        `log` record, its media as a `media` record joining that row (`joins`, filled in with the
        log's seq when it is packed). Media whose file is missing are left out and reported."""
        metrics, items, problems = media.split(message["metrics"])
        for problem in problems:
            self.client._report.error("run %s: %s; the rest of the row is logged" % (self.id, problem))
        row = {key: message[key] for key in ("frame", "epoch", "ns") if key in message}
        joins = bool(metrics or "frame" in row or "epoch" in row)
        if joins:  # `with_media`: the relay's uploader holds the row a moment for its media record
            self.client.submit(dict(message, metrics=metrics, **({"with_media": True} if items else {})))
        if items:
            record = dict(row, t="media", run=self.id, time=message["time"], values=items)
            if joins:
                record["joins"] = None  # the outbox puts the log record's seq here
            self.client.submit(record)

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
        """Queue the finish record, wait at most `timeout` for acks; if they did not all come,
        spill the rest to disk."""
        self._refuse_if_forked()
        deadline = time.monotonic() + timeout
        if self._threads is not None:  # its provenance given up to `timeout` to come first; then no more
            self._threads.finish(timeout)
        self._console.stop()
        self.client.submit({"t": "finish", "run": self.id, "exit_code": int(exit_code), "time": time.time()})
        self.client._run_finished(self.id)
        delivered = self.client.flush(max(0.0, deadline - time.monotonic()))
        # Not delivered: what is not acked goes to a file, after what an overflow handed over.
        # Delivered: every record up to its finish was acked (or handed over, and is written now);
        # what is pending now came after it (another run's sample or row, handed over the moment
        # the wait ended) and is sent: the relay is there, acking.
        spill_file = self.client.spill_pending(only_handed_over=delivered)
        stats = self.client.statistics()
        return {"run": self.id, "delivered": delivered, "spill_file": spill_file,
                "acked": stats["acked"], "spilled": stats["spilled"], "errors": stats["errors"]}
