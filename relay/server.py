"""The relay daemon: ROUTER socket -> validate -> spool -> ack, and one uploader process per run.

Lifecycle (uvicorn's shape): serve() = install signal handlers -> startup() -> main_loop() ->
shutdown(). A signal handler only sets a flag. The first SIGTERM/SIGINT stops intake and drains
for at most `drain_timeout`: uploaders upload what is spooled and close their W&B runs. A second
signal exits at once. Either way nothing acked is lost: it is in the spool, and the next start
uploads it.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import os
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import zmq

from relay import protocol, security, snapshots
from relay import uploader as uploader_module
from relay.artifacts import RefusedPath, resolve_checkpoint
from relay.config import RelayConfig
from relay.keys import CurveKeyError
from relay.metrics import MetricsEndpoint, error_kind
from relay.progress import BacklogProgress
from relay.snapshots import CopyThread, SnapshotDir, SnapshotError
from relay.spool import Spool, SpoolError
from relay.sinks.wandb import SDK_PRELOAD, SharedCore
from relay.sinks.wandb_api import default_mode

log = logging.getLogger("relay.server")

SCAN_EVERY = 1.0  # seconds between looks at the spool for runs that need an uploader
RESTART_BACKOFF_MAX = 60.0  # longest wait before restarting an uploader that failed
CORE_RESTART_EVERY = 60.0  # at most one new shared wandb-core a minute, should one keep dying
BATCH_BYTES_FRAMES = 8  # one batch reads at most this many max_frame_bytes of frames
COMMIT_COST = 2  # disk bytes a commit may take per byte of frames: the WAL's copy, then the database's
ROOM_HYSTERESIS = 1.25  # holding for want of disk ends once min_free_bytes times this is free
REFUSALS_LOGGED = 20  # refusal warnings logged per minute at most; the rest are counted
# Replies queued for one client at most (ZeroMQ's own default). Past it the ROUTER socket drops
# replies to that client: a client that does not read loses replies (acks are re-earned by
# re-sending), the relay does not hold them. Status replies are kept small (relay/spool.py).
SEND_HWM = 1000


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


@dataclass
class Uploader:
    """The server's handle on one uploader process (forked by the uploader fork server)."""
    run_id: str
    process: multiprocessing.process.BaseProcess
    wake_fd: int          # write end of the uploader's wake pipe
    lifeline_fd: int      # write end of a pipe never written to: its end of file tells the uploader we are gone
    failures: int = 0

    def wake(self, news: bytes = uploader_module.WAKE) -> None:
        try:
            os.write(self.wake_fd, news)
        except OSError:
            pass  # already awake with bytes to read, or exiting: the next scan sees it

    def alive(self) -> bool:
        return self.process.is_alive()

    def release(self) -> None:
        """After the process ended: close our end of its pipes."""
        os.close(self.wake_fd)
        os.close(self.lifeline_fd)
        self.process.close()


def uploader_context() -> multiprocessing.context.BaseContext:
    """Uploaders are forked from a fork server that imported relay.uploader (and so wandb) once.

    Each run still gets a process of its own (see relay/uploader.py for why), but it starts as a
    fork of an interpreter that already holds the wandb SDK (and what wandb.init imports lazily,
    SDK_PRELOAD in relay/sinks/wandb.py): starting one costs a fork, not the ~0.7 s of CPU those
    imports take, and the imported code's pages are shared. The fork server starts no thread before
    it forks."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["relay.uploader", *SDK_PRELOAD])
    return context


def classify(frame: bytes, config: RelayConfig) -> tuple[dict, str]:
    """Decode a frame into (message, refusal reason or '').

    A frame whose (stream, seq) can be read but which can never be accepted comes back as a
    refusal, so that its seq is consumed and the client stops re-sending it. A frame without a
    readable (stream, seq) raises ProtocolError.
    """
    try:
        message = protocol.decode(frame, config.max_frame_bytes)
    except protocol.ProtocolError as exc:
        if exc.stream is None or not exc.seq:
            raise
        return {"stream": exc.stream, "seq": exc.seq, "t": "invalid"}, exc.reason
    if message["t"] == "checkpoint":
        try:
            resolve_checkpoint(message["path"], config.artifact_roots, config.max_artifact_bytes)
        except RefusedPath as exc:
            return message, str(exc)
    return message, ""


class RelayServer:
    def __init__(self, config: RelayConfig):
        self.config = config
        self.mode = config.mode or default_mode()
        self.counters: Counter = Counter()
        self.uploaders: dict[str, Uploader] = {}
        self.restart_after: dict[str, tuple[float, int]] = {}  # run -> (not before, failures so far)
        self.wandb_down_since: float | None = None  # wall clock, shown in `relay status`
        self.wandb_down_monotonic = 0.0
        self.holding = False   # no room in the spool (watch_room): records are not taken (policy "hold")
        self.hold_reason: str | None = None
        self.held_bytes = 0    # frame bytes of the last batch held
        self.touch_error: str | None = None  # the last failed heartbeat write, until one succeeds
        self.spool_error: str | None = None  # the last failed spool write, until one succeeds
        self.wandb_errors: Counter = Counter()  # W&B failures by kind (for metrics)
        self.retrying_runs: set[str] = set()
        self.wandb_checked_at = 0.0  # time.time() of the last watch_wandb
        self.progress = BacklogProgress(config.progress_backlog, config.progress_every)
        self.refusals = RefusalLog()
        self.silence = SilenceWatch(config.silence_timeout)
        self.gaps = GapWatch()
        self.metrics: MetricsEndpoint | None = None
        self.should_exit = False
        self.force_exit = False
        self.started = time.time()            # shown to people (uptime is measured on the monotonic clock)
        self.started_monotonic = time.monotonic()
        self.spool: Spool | None = None
        self.snapshots: SnapshotDir | None = None
        self.copier: CopyThread | None = None
        self.copying: dict[str, int] = {}  # stream -> seq of its checkpoint being copied: the stream waits
        self.socket: zmq.Socket | None = None
        self.context: zmq.Context | None = None
        self.authenticator: security.RelayAuthenticator | None = None
        self.handshakes: security.HandshakeWatch | None = None
        self.uploader_context = uploader_context()
        self.core = SharedCore()
        self.core_started_at = 0.0
        self.core_lost = False

    # -- lifecycle ----------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until signalled. Exit code 0 after a drain (even one cut short by its deadline:
        acked records are safe in the spool), 1 when a second signal cut the drain."""
        self.started, self.started_monotonic = time.time(), time.monotonic()
        self.install_signal_handlers()
        self.startup()
        try:
            self.main_loop()
        finally:
            self.shutdown()
        return 1 if self.force_exit else 0

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    def startup(self) -> None:
        try:
            security.check_bind(self.config)
        except security.BindRefused as exc:
            raise SystemExit(str(exc))
        self.spool = Spool(self.config.spool_dir)
        if self.spool.wal_damage is not None:
            log.error("%s", self.spool.wal_damage.describe())
        if self.spool.recovery:
            log.error("%s; records that could not be read are lost", self.spool.recovery)
        self.spool.load_watermarks()
        self.silence.heard(self.spool.unfinished_runs(), time.monotonic())
        try:
            self.spool.forget_refusals()
        except sqlite3.Error as exc:  # disk full: they are let go at a later start
            log.warning("cannot delete passed refusals from spool %s: %s; going on without", self.spool.path, exc)
        swept = self.spool.sweep_snapshots()
        if swept:
            log.info("deleted %d checkpoint snapshots no spooled record holds (left by a crash)", swept)
        try:
            self.snapshots = SnapshotDir(self.config.spool_dir, self.config.artifact_roots,
                                         self.config.max_artifact_bytes, self.config.max_spool_bytes)
        except OSError as exc:
            raise SystemExit("cannot open the checkpoint snapshot directory %s: %s"
                             % (snapshots.directory(self.config.spool_dir), exc))
        self.copier = CopyThread(self.snapshots)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes * 2)
        self.socket.setsockopt(zmq.RCVHWM, 100000)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        if self.config.curve_dir:
            self.start_curve()
        try:
            self.socket.bind(self.config.bind)
        except zmq.ZMQError as exc:
            raise SystemExit("cannot listen on %s: %s (is another relay running there? choose another "
                             "address with --bind)" % (self.config.bind, exc))
        self.start_metrics()
        waiting = self.spool.status()["records"]["pending"]
        log.info("relay listening on %s (%s), W&B mode %s, spool %s (%d records waiting), artifact roots: %s",
                 self.config.bind, "CurveZMQ" if self.config.curve_dir else "no encryption", self.mode,
                 self.spool.path, waiting,
                 ", ".join(self.config.artifact_roots) or "none (checkpoints will be refused)")
        multiprocessing.forkserver.ensure_running()  # wandb is imported there now, not when the first run comes
        self.start_core()
        self.scan_runs()

    def start_curve(self) -> None:
        try:
            self.authenticator = security.secure(self.socket, self.context, self.config.curve_dir)
        except CurveKeyError as exc:
            raise SystemExit("cannot start CurveZMQ from --curve %s: %s" % (self.config.curve_dir, exc))
        self.handshakes = security.HandshakeWatch(self.socket)

    def main_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.handshakes is not None:
            poller.register(self.handshakes.monitor, zmq.POLLIN)
        poller.register(self.copier.wake_fd, zmq.POLLIN)
        next_scan = time.monotonic() + SCAN_EVERY
        while not self.should_exit:
            events = dict(poller.poll(100))
            if self.socket in events:
                self.handle_batch(self.receive_batch())
            if self.handshakes is not None and self.handshakes.monitor in events:
                self.handshakes.read()
            if self.copier.wake_fd in events:
                self.finish_copies()
            if time.monotonic() >= next_scan:
                self.scan_runs()
                next_scan = time.monotonic() + SCAN_EVERY

    def shutdown(self) -> bool:
        """Stop intake, let uploaders drain until the deadline, say what is left."""
        if self.handshakes is not None:
            self.handshakes.close(self.socket)
        self.socket.close(linger=0)  # clients keep what is unacked and re-send to the next relay
        self.copier.stop()           # copies not acked: their clients re-send those checkpoints too
        deadline = time.monotonic() + self.config.drain_timeout
        uploaders = [u for u in self.uploaders.values() if u.alive()]
        log.info("relay stopping: draining %d runs for at most %.0f s", len(uploaders), self.config.drain_timeout)
        for uploader in uploaders:
            uploader.process.terminate()  # SIGTERM: upload what is spooled, close the W&B run
        for uploader in uploaders:
            while uploader.alive() and not self.force_exit and time.monotonic() < deadline:
                uploader.process.join(0.1)
        clean = not any(uploader.alive() for uploader in uploaders)
        for uploader in uploaders:
            if uploader.alive():
                uploader.process.kill()  # its records are in the spool; the next start resumes the run
                uploader.process.join()
        self.core.stop()
        self.refusals.roll(force=True)
        left = self.spool.status()["records"]
        log.info("relay stopped: received=%d acked=%d duplicates=%d refused=%d malformed=%d left_in_spool=%d "
                 "unsent=%d unconfirmed=%d%s", self.counters["received"], self.counters["acked"],
                 self.counters["duplicates"], self.counters["refused"], self.counters["malformed"], left["pending"],
                 left["unsent"], left["unconfirmed"],
                 "" if clean else " (drain cut short; the rest is uploaded at the next start)")
        for run_id, location in self.spool.offline_locations():
            if os.path.isdir(location):
                log.info("offline run %s is in %s; upload it with: wandb sync %s", run_id, location, location)
        if self.metrics is not None:
            self.metrics.close()
        self.spool.close()
        self.snapshots.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        return clean

    # -- intake -------------------------------------------------------------------------------

    def receive_batch(self) -> list[tuple[bytes, bytes]]:
        """Up to batch_max messages, and at most BATCH_BYTES_FRAMES frames' worth of bytes, so that
        a burst of large frames does not pile up in memory. A message of several frames is answered
        with an error; its extra frames are read one by one and let go."""
        batch = []
        budget = self.config.max_frame_bytes * BATCH_BYTES_FRAMES
        while len(batch) < self.config.batch_max and budget > 0:
            try:
                identity = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            frames = 0
            frame = b""
            while self.socket.getsockopt(zmq.RCVMORE):
                part = self.socket.recv()  # the rest of a message is already here: never blocks
                frames += 1
                if frames == 1:
                    frame = part
            if frames != 1:
                self.refuse(identity, protocol.ProtocolError(
                    "message of %d frames refused: send each message as exactly one frame" % frames))
                continue
            budget -= len(frame)
            batch.append((identity, frame))
        return batch

    def handle_batch(self, batch: list[tuple[bytes, bytes]]) -> None:
        items = []             # (message, refusal, frame) for the spool
        senders = {}           # stream -> ROUTER identity to answer
        status_requests = {}   # ROUTER identity -> its last status request (one answer each)
        alive = set()          # runs whose trainers sent a heartbeat
        heard = set()          # runs whose trainers sent anything
        unsnapped = set()      # streams whose checkpoint could not be snapshotted in this batch
        for identity, frame in batch:
            try:
                message, refusal = classify(frame, self.config)
            except protocol.ProtocolError as exc:
                self.refuse(identity, exc)
                continue
            except Exception:  # a bug in our validation must not stop the relay for every other client
                if not self.counters["unreadable"]:
                    log.exception("could not read a frame from client %s (a relay bug: please report it with "
                                  "this traceback); it is refused", identity.hex()[:16])
                self.counters["unreadable"] += 1
                self.refuse(identity, protocol.ProtocolError("the relay could not read this frame (a relay bug, "
                                                             "logged there)"))
                continue
            if message["t"] == "status":
                self.counters["status_requests"] += 1
                status_requests[identity] = message
                continue
            if message["t"] == "heartbeat":
                alive.update(message["runs"])
                continue
            if not refusal:
                heard.add(message["run"])  # held or not, a record from the trainer says it is alive
            if self.holding or message["stream"] in self.copying or message["stream"] in unsnapped:
                self.counters["held"] += 1  # not acked: the client keeps it, re-sends it, spills it
                continue
            if message["t"] == "checkpoint" and not refusal:
                try:
                    refusal, opened = self.snapshot(message)
                except SnapshotError as exc:
                    self.counters["held"] += 1
                    self.refusals.warn("%s; not acking the record (its client sends it again)", exc)
                    unsnapped.add(message["stream"])  # what the stream sent after it waits too
                    continue
                if opened is not None:  # copied off this thread; the record is committed when the copy is done
                    self.copying[message["stream"]] = message["seq"]
                    self.copier.submit(opened, (message, frame, identity, opened.size, time.monotonic()))
                    continue
            if refusal:
                self.refusals.warn("refused record seq=%d of stream %s: %s", message["seq"], message["stream"],
                                   refusal)
            items.append((message, refusal, frame))
            senders[message["stream"]] = identity
        if items and (self.watch_room(incoming=sum(len(frame) for _, _, frame in items)) or self.wal_too_big()):
            self.discard_snapshots(items, ["held"] * len(items))
            self.counters["held"] += len(items)  # not acked: the clients keep them, re-send them, spill them
        elif items:
            self.commit(items, senders)
        if alive or heard:
            self.silence.heard(alive | heard, time.monotonic())
        if alive:
            self.touch(alive)
        self.answer_status(status_requests)

    def snapshot(self, message: dict) -> tuple[str, "snapshots.Opened | None"]:
        """Take the snapshot of a checkpoint before its record is committed (relay/snapshots.py).
        Returns (refusal reason or '', the opened file when it must be copied); raises
        SnapshotError when the relay cannot take it for a reason of its own (its disk)."""
        if message["seq"] <= self.spool.upto(message["stream"]):
            return "", None  # a re-sent record already spooled: its snapshot was taken then
        try:
            return "", self.snapshots.take(message)
        except RefusedPath as exc:
            return str(exc), None

    def finish_copies(self) -> None:
        """Commit (and ack) the checkpoint records whose copies are done; their streams go on."""
        for (message, frame, identity, size, started), error in self.copier.finished():
            self.copying.pop(message["stream"], None)
            if isinstance(error, SnapshotError):
                self.counters["held"] += 1
                self.refusals.warn("%s; not acking the record (its client sends it again)", error)
                continue
            refusal = str(error) if error else ""
            if refusal:
                self.refusals.warn("refused record seq=%d of stream %s: %s", message["seq"], message["stream"],
                                   refusal)
            else:
                log.info("copied checkpoint %s into the spool (%d bytes in %.0f ms: it is on another filesystem than "
                         "the spool, so it cannot be linked)", message["path"], size,
                         (time.monotonic() - started) * 1e3)
            if self.holding or self.watch_room(incoming=len(frame)):  # no room now: not acked (it is re-sent)
                self.snapshots.discard(message)
                self.counters["held"] += 1
                continue
            self.commit([(message, refusal, frame)], {message["stream"]: identity})

    def commit(self, items: list[tuple[dict, str, bytes]], senders: dict[str, bytes]) -> None:
        try:
            outcomes = self.spool.ingest(items)
        except SpoolError as exc:  # disk full, I/O error: nothing acked, clients keep and re-send
            self.discard_snapshots(items, ["error"] * len(items))
            self.counters["held"] += len(items)
            if self.spool_error is None:
                log.error("%s; holding records (not acked: trainers keep them, spill them if it lasts) "
                          "until the spool can be written again", exc)
            self.spool_error = str(exc)
            return
        if self.spool_error is not None:
            log.info("spool writable again: taking records")
            self.spool_error = None
        self.discard_snapshots(items, [outcome.status for outcome in outcomes])
        committed: dict[str, list[int]] = {}
        runs = set()
        for (message, _, _), outcome in zip(items, outcomes):
            if outcome.status == "gap":
                self.counters["out_of_order"] += 1
                committed.setdefault(outcome.stream, [])  # answer with `upto`: the client re-sends from there
                below = self.gaps.past_gap(outcome.stream, outcome.seq)
                if below is not None:
                    self.give_up(outcome.stream, message["run"], below)
                continue
            if outcome.status == "new":
                self.gaps.filled(outcome.stream)
            committed.setdefault(outcome.stream, []).append(outcome.seq)
            if outcome.status == "new":
                self.counters["received"] += 1
                runs.add(message["run"])
            elif outcome.status == "dup":
                self.counters["duplicates"] += 1
            else:
                self.counters["refused"] += 1
                self.reply(senders[outcome.stream], {"t": "error", "stream": outcome.stream, "seq": outcome.seq,
                                                     "reason": outcome.reason})
        for stream, seqs in committed.items():
            self.counters["acked"] += len(seqs)
            self.reply(senders[stream], {"t": "ack", "stream": stream, "upto": self.spool.upto(stream),
                                         "seqs": protocol.ranges(sorted(seqs))})
        for run_id in runs:
            self.ensure_uploader(run_id)

    def discard_snapshots(self, items: list[tuple[dict, str, bytes]], statuses: list[str]) -> None:
        """Delete the snapshots taken for checkpoint records that were not stored after all (a gap,
        a failed commit), unless a stored record holds that name (an earlier copy of the record)."""
        for (message, refusal, _), status in zip(items, statuses):
            if message["t"] != "checkpoint" or refusal or status == "new":
                continue
            try:
                if not self.spool.has_record(message["stream"], message["seq"]):
                    self.snapshots.discard(message)
            except sqlite3.Error:
                pass  # the spool cannot be read now: the next start sweeps what no record holds

    def touch(self, runs: set[str]) -> None:
        """Note the heartbeats in the spool (`last_seen`, shown by `relay status`). A failed write
        (disk full) is logged once and otherwise let go: the next heartbeat writes it again."""
        try:
            self.spool.touch(runs)
        except (SpoolError, sqlite3.Error) as exc:
            if self.touch_error is None:
                log.warning("cannot note heartbeats of %d runs in spool %s: %s; the relay goes on (they are noted "
                            "again once the spool can be written)", len(runs), self.spool.path, exc)
            self.touch_error = str(exc)
            return
        self.touch_error = None

    def give_up(self, stream: str, run_id: str, below: int) -> None:
        """The stream's client holds nothing below `below`, the spool nothing between: lost."""
        try:
            first, last = self.spool.give_up(stream, run_id, below)
        except sqlite3.Error as exc:  # the watch starts over; the next passes try again
            log.warning("cannot note lost records of stream %s in spool %s: %s", stream, self.spool.path, exc)
            return
        self.counters["lost"] += last - first + 1
        log.error("run %s: %d records of stream %s (seq=%d..%d) were acked but are not in the spool, and the trainer no "
                  "longer holds them: lost (a damaged or cut spool WAL; see the start of this log); the stream goes "
                  "on from seq=%d and the run's W&B summary counts them in relay/records_lost",
                  run_id, last - first + 1, stream, first, last, below)

    def refuse(self, identity: bytes, error: protocol.ProtocolError) -> None:
        """A frame without a readable (stream, seq): nothing to store or ack, only an answer."""
        self.counters["malformed"] += 1
        self.refusals.warn("refused a frame from client %s: %s", identity.hex()[:16], error.reason)
        self.reply(identity, {"t": "error", "seq": None, "reason": error.reason})

    def answer_status(self, requests: dict[bytes, dict]) -> None:
        """One reply per client that asked in this batch, however often it asked: to its last
        request, whose stream the reply carries. Each status (the summary, or a page) is read from
        the spool once for all who asked for it."""
        statuses: dict[int | None, dict] = {}
        for identity, request in requests.items():
            page = request.get("page")
            if page not in statuses:
                statuses[page] = dict(self.status(page), t="status", v=protocol.VERSION)
            self.send(identity, protocol.encode(dict(statuses[page], stream=request["stream"])))

    def reply(self, identity: bytes, message: dict) -> None:
        message.setdefault("v", protocol.VERSION)
        self.send(identity, protocol.encode(message))

    def send(self, identity: bytes, frame: bytes) -> None:
        try:
            self.socket.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # client gone or its queue full: it will re-send and be re-acked
            log.debug("could not reply to %s: %s", identity.hex()[:16], exc)

    # -- uploaders ----------------------------------------------------------------------------

    def scan_runs(self) -> None:
        if self.authenticator is not None:
            self.authenticator.load_authorized()
        self.refusals.roll()
        self.reap_uploaders()
        self.watch_core()
        self.relieve_wal()
        self.watch_room()
        silent = self.silence.silent(time.monotonic())
        if silent:
            try:
                finished = self.spool.finish_silent_runs(silent, self.config.silence_exit_code)
            except sqlite3.Error as exc:  # disk full: the next scan tries again
                self.silence.heard(silent, time.monotonic() - self.config.silence_timeout)
                log.warning("cannot spool the finish of %d silent runs in %s: %s; trying again", len(silent),
                            self.spool.path, exc)
                finished = []
            for run_id in finished:
                log.warning("run %s: no record or heartbeat from its trainer for %.0f s; finishing it in W&B "
                            "with exit code %d", run_id, self.config.silence_timeout, self.config.silence_exit_code)
        for run_id in self.spool.runs_with_work():
            self.ensure_uploader(run_id)
        self.watch_wandb()
        self.report_backlogs()

    def ensure_uploader(self, run_id: str) -> None:
        uploader = self.uploaders.get(run_id)
        if uploader is not None and uploader.alive():
            uploader.wake()
            return
        not_before, failures = self.restart_after.get(run_id, (0.0, 0))
        if self.should_exit or time.monotonic() < not_before:
            return
        # The write ends stay in this process only: the fork server gets the read ends (to hand
        # them to the child) and nothing else of ours, so they reach end of file when we die.
        wake_reader, wake_writer = self.uploader_context.Pipe(duplex=False)
        life_reader, life_writer = self.uploader_context.Pipe(duplex=False)
        process = self.uploader_context.Process(
            target=uploader_module.child_main, name="relay-uploader-" + run_id, daemon=True,
            args=(run_id, self.mode, self.config.model_dump_json(), wake_reader, life_reader, self.core.token))
        try:
            process.start()
        finally:
            wake_reader.close()
            life_reader.close()
        wake_fd, lifeline_fd = os.dup(wake_writer.fileno()), os.dup(life_writer.fileno())
        wake_writer.close()
        life_writer.close()
        os.set_blocking(wake_fd, False)
        self.uploaders[run_id] = Uploader(run_id, process, wake_fd, lifeline_fd, failures)

    def start_core(self) -> None:
        """The wandb-core the uploaders share (relay/sinks/wandb.py says why and how)."""
        self.core_started_at = time.monotonic()
        self.core_lost = False
        if self.core.start():
            log.debug("shared wandb-core started: %s", self.core.token)

    def watch_core(self) -> None:
        if not self.core.ended():
            return
        if not self.core_lost:
            self.core_lost = True
            log.warning("the shared wandb-core exited (code %s): uploaders that used it restart and resume their "
                        "runs from the spool; new uploaders start a wandb-core of their own until another shared "
                        "one starts", self.core.exit_code)
        if time.monotonic() >= self.core_started_at + CORE_RESTART_EVERY:
            self.start_core()

    def reap_uploaders(self) -> None:
        for run_id, uploader in list(self.uploaders.items()):
            code = uploader.process.exitcode
            if code is None:
                continue
            del self.uploaders[run_id]
            uploader.release()
            if code == 0:
                self.restart_after.pop(run_id, None)
                continue
            failures = uploader.failures + 1
            self.wandb_errors["uploader_exit"] += 1
            delay = min(RESTART_BACKOFF_MAX, 2.0 ** failures)
            self.restart_after[run_id] = (time.monotonic() + delay, failures)
            log.warning("uploader for run %s exited with code %d; restarting it in %.0f s (records are kept)",
                        run_id, code, delay)

    def relieve_wal(self) -> None:
        """While the spool's room is short (under twice min_free_bytes), checkpoint and truncate its
        WAL once a scan: a WAL that readers keep from being reused grows with every write (uploads
        rewrite rows when they assign steps), which would eat the reserve that lets them go on."""
        try:
            if self.spool.room_bytes() < 2 * self.config.min_free_bytes:
                self.spool.truncate_wal()
        except (OSError, sqlite3.Error) as exc:
            log.debug("cannot truncate the spool's WAL: %s", exc)

    def wal_too_big(self) -> bool:
        """Records that reuse the spool's free pages are written to its WAL first, and the WAL gives
        its space back only when truncated: past a quarter of min_free_bytes it is checkpointed and
        truncated now, and while that cannot be done the batch waits (a pause, not a hold: it is
        counted as held but not logged), so that the WAL never eats the reserve."""
        limit = self.config.min_free_bytes // 4
        if not limit or self.spool.wal_bytes() <= limit:
            return False
        try:
            self.spool.truncate_wal()
        except sqlite3.Error as exc:
            log.debug("cannot truncate the spool's WAL: %s", exc)
        return self.spool.wal_bytes() > limit

    def watch_room(self, incoming: int = 0) -> bool:
        """Policy 'hold': take no new records while the spool holds more than max_spool_bytes, or
        while less than min_free_bytes would be left for it on its disk (free space plus the
        spool's free pages) after storing `incoming` bytes of frames, until uploads make room.
        Checked before every commit, so a burst cannot eat the reserve: the reserve is what lets
        uploaders write to the spool (steps, states, deletes) and so empty a spool whose backlog
        filled the disk. Nothing is dropped: unacked records stay with their clients, which spill
        them to disk. Returns whether the relay holds.

        Once holding, the relay takes records again only when a quarter more than the reserve
        would be left after the last batch it held (not at every batch that just fits)."""
        if self.holding and not incoming:
            incoming = self.held_bytes  # a scan: would the batch it last held fit now?
        try:
            live = self.spool.live_bytes() + snapshots.held_bytes(self.config.spool_dir)
            room = self.spool.room_bytes()
        except (OSError, sqlite3.Error) as exc:
            log.debug("cannot measure the spool's room (%s); holding stays %s", exc, self.holding)
            return self.holding
        reserve = self.config.min_free_bytes * (ROOM_HYSTERESIS if self.holding else 1.0)
        if live > self.config.max_spool_bytes:
            reason = "spool full (%.1f MB of max_spool_bytes %.1f MB)" % (live / 1e6, self.config.max_spool_bytes / 1e6)
        elif room - COMMIT_COST * incoming < reserve:
            reason = ("%.1f MB free for the spool on its disk: storing %.1f MB more would leave less than "
                      "min_free_bytes (%.1f MB)" % (room / 1e6, incoming / 1e6, self.config.min_free_bytes / 1e6))
        else:
            reason = None
        if reason:
            self.held_bytes = incoming
        if reason and not self.holding:
            log.warning("%s: holding new records until W&B uploads make room (or disk is freed); trainers keep "
                        "them and spill them to disk if it lasts", reason)
        elif self.holding and not reason:
            log.info("spool has room again (%.1f MB live, %.1f MB free for it): taking records",
                     live / 1e6, room / 1e6)
        self.holding, self.hold_reason = reason is not None, reason
        return self.holding

    def watch_wandb(self) -> None:
        """One log line when W&B becomes unreachable, one when it is back (not one per retry). When
        an online run gets through to W&B, the runs still retrying retry at once rather than at the
        end of their backoff (up to backoff_max: a minute by default)."""
        now = time.time()  # compared with the state_since that uploaders store (wall clock)
        retrying = self.spool.runs_in_state("retrying")
        if retrying and self.spool.reached_wandb_since(self.wandb_checked_at):
            for run_id, _ in retrying:
                if run_id in self.uploaders:
                    self.uploaders[run_id].wake(uploader_module.RETRY_NOW)
        self.wandb_checked_at = now
        self.count_wandb_errors(retrying)
        if retrying and self.wandb_down_since is None:
            self.wandb_down_since, self.wandb_down_monotonic = now, time.monotonic()
            log.warning("W&B unreachable (%d runs retrying); records wait in the spool: %s",
                        len(retrying), retrying[0][1])
        elif not retrying and self.wandb_down_since is not None:
            log.info("W&B reachable again after %.0f s", time.monotonic() - self.wandb_down_monotonic)
            self.wandb_down_since = None

    def count_wandb_errors(self, retrying: list[tuple[str, str]]) -> None:
        """One error per run that starts retrying, by the kind of exception it names."""
        for run_id, error in retrying:
            if run_id not in self.retrying_runs:
                self.wandb_errors[error_kind(error)] += 1
        self.retrying_runs = {run_id for run_id, _ in retrying}

    def report_backlogs(self) -> None:
        """Progress lines (count, rate, ETA) for runs with a large backlog to upload."""
        for line in self.progress.update(time.monotonic(), self.spool.pending_counts()):
            log.info(line)

    # -- ops ----------------------------------------------------------------------------------

    def start_metrics(self) -> None:
        if self.config.metrics_bind:
            self.metrics = MetricsEndpoint(self, self.config.metrics_bind)

    # -- status -------------------------------------------------------------------------------

    def status(self, page: int | None = None) -> dict:
        """What a `status` request is answered with: the spool's status (relay/spool.py: the
        summary, or a page of every run) and the relay's own state and counters."""
        status = self.spool.status(page)
        status.update({
            "mode": self.mode, "bind": self.config.bind, "uptime": round(time.monotonic() - self.started_monotonic, 1),
            "counters": dict(self.counters),
            "wandb_down_since": self.wandb_down_since, "holding": self.holding, "hold_reason": self.hold_reason,
            "spool_error": self.spool_error,
            "max_spool_bytes": self.config.max_spool_bytes,
        })
        return status
