"""The relay daemon: ROUTER socket -> validate -> spool -> ack, and the uploaders (relay/supervisor.py).

Lifecycle (uvicorn's shape): serve() = install signal handlers -> startup() -> main_loop() ->
shutdown(). A signal handler only sets a flag. The first SIGTERM/SIGINT stops intake and drains
for at most `drain_timeout`: uploaders upload what is spooled and close their W&B runs. A second
signal exits at once. Either way nothing acked is lost: it is in the spool, and the next start
uploads it.

The work is done by the intake (relay/intake.py: batches, classify, snapshots, commits, acks,
status replies; its hold policy in relay/room.py) and the supervisor (relay/supervisor.py: uploader processes, the
shared wandb-core, silence, W&B outages); this module opens what they use, runs the loop, builds
the status (relay/status.py) and closes everything in order.
"""
from __future__ import annotations

import logging
import multiprocessing.forkserver
import os
import signal
import sqlite3
import time
from typing import Any

import zmq

from relay import security, snapshots
from relay.config import RelayConfig
from relay.intake import Intake, classify
from relay.keys import CurveKeyError
from relay.metrics import MetricsEndpoint, RelayGauges
from relay.snapshots import CopyThread, SnapshotDir
from relay.spool import Spool
from relay.spool_recovery import sweep_snapshots
from relay.status import RelayStatus
from relay.supervisor import Supervisor, Uploader, uploader_context
from relay.sinks.wandb_api import default_mode
from relay.watches import GapWatch, RefusalLog, SilenceWatch

__all__ = ["RelayServer", "classify", "GapWatch", "RefusalLog", "SilenceWatch", "Uploader", "uploader_context"]

log = logging.getLogger("relay.server")

SCAN_EVERY = 1.0  # seconds between looks at the spool for runs that need an uploader
# Retention (relay/spool_retention.py): a pass of at most RETENTION_BATCH runs (and watermarks) each
# RETENTION_EVERY seconds, or each scan while a pass finds a full batch.
RETENTION_EVERY = 60.0
RETENTION_BATCH = 500
# Replies queued for one client at most (ZeroMQ's own default). Past it the ROUTER socket drops
# replies to that client: a client that does not read loses replies (acks are re-earned by
# re-sending), the relay does not hold them. Status replies are kept small (relay/spool_report.py).
SEND_HWM = 1000
# Frames queued from one client at most (ZeroMQ's own default). Past it ZeroMQ stops reading that
# client's connection: a relay that has fallen behind pushes back through the transport to the
# client's socket queue and then its outbox (which keeps what the socket does not take, and
# spills it past max_pending), instead of holding a backlog (and re-sent duplicates) in memory.
RECEIVE_HWM = 1000


class RelayServer:
    def __init__(self, config: RelayConfig):
        self.config = config
        self.mode = config.mode or default_mode()
        self.silence = SilenceWatch(config.silence_timeout)
        self.should_exit = False
        self.force_exit = False
        self.started = time.time()            # shown to people (uptime is measured on the monotonic clock)
        self.started_monotonic = time.monotonic()
        self.spool: Spool | None = None
        self.snapshots: SnapshotDir | None = None
        self.copier: CopyThread | None = None
        self.socket: zmq.Socket | None = None
        self.context: zmq.Context | None = None
        self.authenticator: security.RelayAuthenticator | None = None
        self.handshakes: security.HandshakeWatch | None = None
        self.intake: Intake | None = None
        self.supervisor: Supervisor | None = None
        self.metrics: MetricsEndpoint | None = None
        self.next_retention = 0.0              # monotonic

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
        self.open_spool()
        self.supervisor = Supervisor(self.config, self.mode, self.spool, self.silence, lambda: self.should_exit)
        self.open_socket()
        self.intake = Intake(self.config, self.socket, self.spool, self.snapshots, self.copier, self.silence,
                             self.supervisor.ensure_uploader, self.status)
        if self.config.metrics_bind:
            self.metrics = MetricsEndpoint(self.config.metrics_bind, self.config.spool_dir, self.gauges)
        waiting = self.spool.report.status()["records"]["pending"]
        log.info("relay listening on %s (%s), W&B mode %s, spool %s (%d records waiting), artifact roots: %s",
                 self.config.bind, "CurveZMQ" if self.config.curve_dir else "no encryption", self.mode,
                 self.spool.path, waiting,
                 ", ".join(self.config.artifact_roots) or "none (checkpoints will be refused)")
        multiprocessing.forkserver.ensure_running()  # wandb is imported there now, not when the first run comes
        self.supervisor.start_core()
        self.scan()

    def open_spool(self) -> None:
        """The spool (checked, recovered, its damage said), and its checkpoint snapshots."""
        self.spool = Spool(self.config.spool_dir)
        if self.spool.wal_damage is not None:
            log.error("%s", self.spool.wal_damage.describe())
        if self.spool.recovery:
            log.error("%s; records that could not be read are lost", self.spool.recovery)
        self.spool.load_watermarks()
        self.silence.heard(self.spool.report.unfinished_runs(), time.monotonic())
        try:
            self.spool.forget_refusals()
        except sqlite3.Error as exc:  # disk full: they are let go at a later start
            log.warning("cannot delete passed refusals from spool %s: %s; going on without", self.spool.path, exc)
        swept = sweep_snapshots(self.spool.conn, self.spool.directory)
        if swept:
            log.info("deleted %d checkpoint snapshots no spooled record holds (left by a crash)", swept)
        try:
            self.snapshots = SnapshotDir(self.config.spool_dir, self.config.artifact_roots,
                                         self.config.max_artifact_bytes, self.config.max_spool_bytes)
        except OSError as exc:
            raise SystemExit("cannot open the checkpoint snapshot directory %s: %s"
                             % (snapshots.directory(self.config.spool_dir), exc))
        self.copier = CopyThread(self.snapshots)

    def open_socket(self) -> None:
        """The ROUTER socket, with CurveZMQ when configured, bound."""
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes * 2)
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        if self.config.curve_dir:
            try:
                self.authenticator = security.secure(self.socket, self.context, self.config.curve_dir)
            except CurveKeyError as exc:
                raise SystemExit("cannot start CurveZMQ from --curve %s: %s" % (self.config.curve_dir, exc))
            self.handshakes = security.HandshakeWatch(self.socket)
        try:
            self.socket.bind(self.config.bind)
        except zmq.ZMQError as exc:
            raise SystemExit("cannot listen on %s: %s (is another relay running there? choose another "
                             "address with --bind)" % (self.config.bind, exc))

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
                self.intake.handle_batch(self.intake.receive_batch())
            if self.handshakes is not None and self.handshakes.monitor in events:
                self.handshakes.read()
            if self.copier.wake_fd in events:
                self.intake.finish_copies()
            if time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + SCAN_EVERY

    def scan(self) -> None:
        """Every SCAN_EVERY: re-read the authorized client keys, close a minute of refusal warnings,
        measure the spool's room (and tell held clients to re-send once there is some), look after
        the uploaders (relay/supervisor.py), and now and then a retention pass."""
        if self.authenticator is not None:
            self.authenticator.load_authorized()
        self.intake.refusals.roll()
        self.intake.scan()
        self.supervisor.scan()
        self.retain()

    def retain(self) -> None:
        """Archive finished runs, delete old archived ones, let go of idle watermarks, in a bounded
        pass (relay/spool_retention.py)."""
        now = time.monotonic()
        if now < self.next_retention:
            return
        config = self.config
        try:
            done = self.spool.apply_retention(config.retention, config.archive_retention, config.watermark_retention,
                                              RETENTION_BATCH)
        except sqlite3.Error as exc:  # disk full, or busy: the next pass tries again
            log.warning("cannot archive finished runs in spool %s: %s; trying again in %.0f s", self.spool.path, exc,
                        RETENTION_EVERY)
            self.next_retention = now + RETENTION_EVERY
            return
        if done.archived or done.deleted or done.streams:
            log.info("retention: archived %d finished runs, deleted %d archived runs, let go of %d stream watermarks",
                     done.archived, done.deleted, len(done.streams))
        self.next_retention = now + (SCAN_EVERY if done.full(RETENTION_BATCH) else RETENTION_EVERY)

    def shutdown(self) -> bool:
        """Stop intake, let uploaders drain until the deadline, say what is left."""
        if self.handshakes is not None:
            self.handshakes.close(self.socket)
        self.socket.close(linger=0)  # clients keep what is unacked and re-send to the next relay
        self.copier.stop()           # copies not acked: their clients re-send those checkpoints too
        clean = self.supervisor.drain(lambda: self.force_exit)
        self.intake.refusals.roll(force=True)
        counters = self.intake.counters
        left = self.spool.report.status()["records"]
        log.info("relay stopped: received=%d acked=%d duplicates=%d refused=%d malformed=%d left_in_spool=%d "
                 "unsent=%d unconfirmed=%d%s", counters["received"], counters["acked"], counters["duplicates"],
                 counters["refused"], counters["malformed"], left["pending"], left["unsent"], left["unconfirmed"],
                 "" if clean else " (drain cut short; the rest is uploaded at the next start)")
        for run_id, location in self.spool.report.offline_locations():
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

    # -- what the relay reports ---------------------------------------------------------------

    def status(self, page: int | None = None) -> RelayStatus:
        """What a `status` request is answered with: the spool's status (relay/spool_report.py: the
        summary, or a page of every run) and the relay's own state and counters."""
        return RelayStatus.from_dict(dict(
            self.spool.report.status(page), mode=self.mode, bind=self.config.bind,
            uptime=round(time.monotonic() - self.started_monotonic, 1), counters=dict(self.intake.counters),
            wandb_down_since=self.supervisor.wandb_down_since, holding=self.intake.room.holding,
            hold_reason=self.intake.room.hold_reason, spool_error=self.intake.commits.spool_error,
            max_spool_bytes=self.config.max_spool_bytes))

    def gauges(self) -> RelayGauges:
        """The relay's counters and state for /metrics (called on the scrape's thread)."""
        return RelayGauges(
            counters=dict(self.intake.counters), wandb_errors=dict(self.supervisor.wandb_errors),
            max_spool_bytes=self.config.max_spool_bytes,
            holding=self.intake.room.holding or self.intake.commits.spool_error is not None,
            wandb_up=self.supervisor.wandb_down_since is None, uploaders_running=self.supervisor.running(),
            uptime=time.monotonic() - self.started_monotonic)
