"""A run's uploader: spool -> row planner -> W&B sink. The loop that moves a run's records to W&B,
confirms them, and waits (for the server, for W&B, for W&B's count).

Where it runs: in a thread of an uploader host, among other runs (relay/uploader_host.py), or in a
process of its own (`child_main` below: every run with `runs_per_uploader: 1`, and a run whose
uploader failed in a host). The wandb SDK keeps per-process state that a failure poisons, so a run
that fails in a host goes on in a process of its own; the server restarts a failed uploader, which
resumes the W&B run by id (nothing is lost or doubled: see relay/spool_uploads.py). One uploader
per run is enforced by an flock on `<spool>/locks/<run>.lock`. The processes are forked from a
fork server that imported this module (and, through relay/sinks/wandb.py, wandb) once, so
starting one costs a fork, not an import of wandb. The server wakes an uploader by writing a byte to its wake pipe; end
of file there, or on its lifeline, means the server is gone, and the uploader exits at once.

The uploader owns W&B's step: every row it logs gets the next value of a per-run counter, and
the (record, step) pairing is committed to the spool before the row goes to the SDK (see the
invariants in relay/spool_uploads.py). relay/planner.py makes the rows: consecutive `log` records
of one run with the same `frame` are one row, and a `finish` ends a batch. The trainer's own axes, `frame`
and `epoch`, are ordinary metrics made into axes, so a trainer that restarts from an older
checkpoint never logs a step that W&B would drop.

Before it resumes a run online, an uploader waits until W&B's count of the run's rows can be
trusted ("settling" in `relay status`; the rule is in relay/settle.py): it reached the steps the
relay handed to the SDK for the run, or no writer of the run has been alive for `wandb_count_lag`.
No writer outlives its relay: the uploaders exit when the server is gone (the lifeline), and every
wandb-core gets a parent-death signal (relay/sinks/wandb.py). Asking W&B for that count first is
also how an outage fails before `wandb.init`, not in wandb-core.

With many live runs, rows go to the SDK in bursts, paced so that the runs together stay within
`upload_requests` W&B requests a second (relay/cadence.py); offline runs keep the same pace, which
spares their uploaders a spool transaction for every row.

While a run is open, W&B is asked every `confirm_every` seconds how many rows it holds, and the
spool lets go of those; at most `max_unconfirmed_rows` rows are handed over beyond that. Init
failures (unreachable, 5xx, timeouts) are retried with capped exponential backoff while the
records wait in the spool; the relay keeps accepting from trainers meanwhile.
"""
from __future__ import annotations

import fcntl
import gc
import logging
import os
import select
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

import tenacity

from relay import planner, uploader_meta
from relay.cadence import Cadence, phase
from relay.config import RelayConfig
from relay.rowcount import RowCount
from relay.sinks.wandb import RETRYABLE, WandbSink, wandb_core_dies_with_its_parent
from relay.sinks.wandb_api import short_error
from relay.sinks.wandb_media import row_with_media
from relay.spool import Spool
from relay.spool_uploads import Record
from relay.uploader_checkpoints import Checkpoints

log = logging.getLogger("relay.uploader")

WAKE, RETRY_NOW = b"w", b"r"  # what the server writes to an uploader's wake pipe
UPLOADER_CACHE_KIB = 64  # a run's spool connection's page cache: the OS caches the file anyway (SQLite: 2 MiB)


class WakePipe:
    """The server's side of an uploader's waits: a byte on the wake pipe cuts a wait short, end of
    file there means the server is gone (the uploader exits at once), `interrupt` means stop."""

    def __init__(self, run_id: str, fd: int | None, interrupt: threading.Event):
        self.run_id = run_id
        self.fd = fd                # readable when the server has news; EOF when it is gone
        self.interrupt = interrupt

    def wait(self, seconds: float, wake_on: bytes) -> None:
        """Wait `seconds`, less if the server sends one of the bytes in `wake_on` (WAKE: records
        came; RETRY_NOW: W&B answers another uploader again) or we are told to stop."""
        if self.fd is None:
            self.interrupt.wait(seconds)
            return
        deadline = time.monotonic() + seconds
        while not self.interrupt.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                readable, _, _ = select.select([self.fd], [], [], min(left, 1.0))
                if not readable:
                    continue
                news = os.read(self.fd, 4096)
            except InterruptedError:
                continue
            if not news:
                log.warning("run %s: the relay server is gone; uploader exits (records stay in the spool)",
                            self.run_id)
                os._exit(3)
            if any(byte in wake_on for byte in news):
                return

    def idle(self) -> None:
        """Wait up to a second for the server's wake-up byte."""
        self.wait(1.0, RETRY_NOW + WAKE)


class RunUploader:
    """The loop of one run's uploader: spool -> planner -> sink, W&B's count confirmed, waits and
    backoff. A first SIGTERM sets `drain`, a second `stop` (main's handler); either sets `interrupt`."""

    def __init__(self, run_id: str, config: RelayConfig, mode: str, wake_fd: int | None = None):
        self.run_id = run_id
        self.config = config
        self.default_mode = mode
        self.drain = threading.Event()     # upload what is spooled, finish the run, exit
        self.stop = threading.Event()      # exit as soon as possible
        self.interrupt = threading.Event() # set with either: cuts retry waits short
        self.location: str | None = None
        self.mode: str | None = None
        self._open = False                 # a W&B run is open (in mode "disabled": records are dropped)
        self._cursor = 0                   # highest record id handed to the SDK
        self._next_step = 0
        self._spool: Spool | None = None
        self._count: RowCount | None = None  # W&B's count of the run's rows (made with the spool)
        self._cadence: Cadence | None = None  # when rows may go to the SDK (made with the spool)
        self._wake = WakePipe(run_id, wake_fd, self.interrupt)
        self._sink = WandbSink(run_id, config)
        self._checkpoints: Checkpoints | None = None  # made with the spool
        self._losses_told: dict | None = None  # what the run's W&B summary says about records it will not get

    # -- process ------------------------------------------------------------------------------

    def run(self) -> int:
        self._spool = Spool(self.config.spool_dir, check=False, cache_kib=UPLOADER_CACHE_KIB)  # the server checked it
        self._count = RowCount(self.run_id, self.config, self._spool.uploads, self._sink.history_count,
                               self._wake.wait, self.interrupt)
        self._checkpoints = Checkpoints(self.run_id, self.config, self._spool.uploads, self._sink)
        self._cadence = Cadence(self.config, self._spool.report.live_runs, phase=phase(self.run_id))
        try:
            self._loop()
            return 0
        except sqlite3.OperationalError as exc:  # disk full, I/O error: nothing to debug in our code
            log.warning("run %s: cannot write to spool %s (%s); uploader exits, its records stay in the spool and "
                        "its next uploader resumes the run (free disk space if it is full)",
                        self.run_id, self._spool.path, exc)
            return 1
        except Exception as exc:  # a bug or a broken SDK: say so, keep the records, the server restarts us
            log.exception("uploader for run %s failed; its records stay in the spool", self.run_id)
            try:
                self._spool.uploads.set_state(self.run_id, "failed", short_error(exc))
            except sqlite3.Error as also:
                log.warning("run %s: cannot note the failure in the spool either: %s", self.run_id, also)
            return 1
        finally:
            self._spool.close()

    def _loop(self) -> None:
        uploads = self._spool.uploads
        while not self.stop.is_set():
            self._checkpoints.let_go_committed()
            online = self._open and self.mode == "online"
            if online and self._count.due(self._next_step):
                self._count.confirm()
            records = uploads.records(self.run_id, self._cursor, self.config.batch_max)
            if not records:
                if not self._open:
                    return  # finished, or nothing to do: the server starts a new uploader when more comes
                if self.drain.is_set():
                    self._finish(exit_code=None)
                    return
                self._wake.idle()
                continue
            if online and self._count.backlog_full(self._next_step):
                self._wake.idle()  # the backlog stays in the spool, not in wandb-core's memory
                continue
            if not self._open:
                settings = uploads.settings(self.run_id)
                if settings is None:
                    uploads.set_state(self.run_id, "waiting for open")
                    if self.drain.is_set():
                        return
                    self._wake.idle()
                    continue
                if not self._start(settings):
                    if self.drain.is_set() or self.stop.is_set():
                        return
                continue  # the resume may have confirmed records: read them again
            records, media_wait = planner.ready(records, records[-1].received, time.time(), self.drain.is_set())
            if media_wait:  # the media record of the row is on its way: woken when it is spooled
                self._wake.wait(media_wait, WAKE)
                continue
            wait = self._cadence.wait() if self.mode != "disabled" and not self.drain.is_set() else 0.0
            if wait > 0:  # many live runs: this run's rows go to the SDK in bursts (relay/cadence.py)
                self._wake.wait(wait, b"")
                continue
            self._upload(records)

    # -- W&B run lifecycle --------------------------------------------------------------------

    def _start(self, settings: dict) -> bool:
        self.mode = settings.get("mode") or self.default_mode
        if self.mode == "disabled":
            self._open = True
            self._spool.uploads.set_state(self.run_id, "disabled")
            return True
        self._spool.uploads.set_state(self.run_id, "initialising")
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RETRYABLE),
            wait=tenacity.wait_exponential_jitter(initial=1.0, max=self.config.backoff_max),
            stop=lambda state: self.interrupt.is_set(),
            sleep=lambda seconds: self._wake.wait(seconds, RETRY_NOW),  # records coming in do not cut it
            before_sleep=self._on_retry,
            reraise=True,
        )
        try:
            retrying(self._init_once, settings, uploader_meta.provenance(self._spool, self.run_id, self._wake))
        except RETRYABLE:
            return False
        self._open = True
        server_step = self._sink.starting_step if self.mode == "online" else 0
        self._spool.uploads.confirm_console(self.run_id, server_step)  # else a resume would write them again
        confirmed = self._spool.uploads.confirm_below_step(self.run_id, server_step)
        if server_step:
            log.info("run %s resumed at W&B step %d (%d spooled records were already there)",
                     self.run_id, server_step, confirmed)
        self._cursor = 0
        self._next_step = server_step
        self._count.started(server_step)
        self._losses_told = None  # tell this W&B run about records it will not get, if any
        self._sink.use_axes(("frame", "epoch"), step_axis="frame")
        self.location = self._sink.location
        self._spool.uploads.set_state(self.run_id, "uploading", location=self.location)
        log.info("run %s started in W&B mode %s at %s", self.run_id, self.mode, self.location)
        return True

    def _init_once(self, settings: dict, meta: dict | None) -> None:
        if self.mode == "online":
            self._count.settle(settings)
        self._sink.open(settings, self.mode, lambda: self._left_open_closed(settings), provenance=meta)

    def _left_open_closed(self, settings: dict) -> None:
        """The sink closed a stream of this run left open in the shared wandb-core: what it held has
        reached W&B, not yet its count."""
        self._count.writers_gone = time.monotonic()
        if self.mode == "online":
            self._count.settle(settings)

    def _on_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        self._spool.uploads.set_state(self.run_id, "retrying", short_error(error))  # the server logs the outage once
        log.debug("run %s: wandb.init failed (%s); retry in %.1f s", self.run_id, short_error(error),
                  state.next_action.sleep if state.next_action else 0)

    def _wait_for_wandb(self) -> None:
        """Before a finish (which blocks until W&B has everything) or an artifact (whose first calls
        are synchronous), make sure W&B answers, so an outage shows as 'retrying' in `relay status`
        rather than as a call that never ends or raises."""
        if self.mode == "online":
            self._count.wait_until_reachable(RETRY_NOW)

    def _finish(self, exit_code: int | None, through_id: int | None = None) -> None:
        """Close the W&B run; once finish() returns, everything logged is confirmed."""
        if not self._open:
            return
        if self.mode != "disabled":
            self._sink.finish(exit_code)  # no exit code: the relay stops while the trainer runs on
        self._open = False
        done = self._cursor if through_id is None else through_id
        self._spool.uploads.confirm_through(self.run_id, done, exit_code, finished=exit_code is not None)
        self._cursor = 0 if through_id is None else self._cursor
        self._spool.uploads.set_state(self.run_id, "finished" if exit_code is not None else "paused")
        log.info("run %s %s at %s", self.run_id,
                 "finished with exit code %s" % exit_code if exit_code is not None else "paused (relay stopping)",
                 self.location)

    # -- records ------------------------------------------------------------------------------

    def _upload(self, records: list[Record]) -> None:
        """Assign steps (committed first), then hand rows, artifacts and summaries to the SDK."""
        if self.mode == "disabled":  # accepted and acked, then dropped on purpose
            finish, self._cursor = next((r for r in records if r.kind == "finish"), None), records[-1].id
            self._spool.uploads.confirm_through(self.run_id, self._cursor, finish and finish.body["exit_code"],
                                                finished=finish is not None)
            return
        losses = self._spool.uploads.losses(self.run_id)  # unreadable records set aside, acked records found lost
        if losses != self._losses_told:
            if losses:  # shown in the run's W&B summary: the run lacks what these records held
                self._sink.update_summary(losses)
            self._losses_told = losses
        batch = planner.plan(records, self._next_step)
        self._spool.uploads.assign_steps(self.run_id, batch.steps, batch.through_id)
        self._cadence.handed_rows(bool(batch.steps))
        self._next_step = batch.next_step
        for item in batch.items:
            if isinstance(item, planner.Row):  # media values: made wandb objects from the spool's copies
                values = row_with_media(self.run_id, item.values, self.config.spool_dir) if item.media else item.values
                self._sink.log(values, item.step)
            else:
                self._cursor = item.id
                self._apply(item)
        self._cursor = batch.through_id

    def _apply(self, record: Record) -> None:
        body = record.body
        if record.kind == "summary":
            self._sink.update_summary(body["values"])
        elif record.kind == "open":
            self._sink.update_config(body["settings"].get("config") or {})
        elif record.kind in uploader_meta.NODE_KINDS:  # the trainer node's: console, provenance, system metrics
            uploader_meta.apply(self._sink, record.kind, body)
        elif record.kind == "checkpoint":
            self._wait_for_wandb()  # log_artifact talks to W&B in this thread, and raises when it cannot
            self._checkpoints.log(record)
        elif record.kind == "finish":
            self._wait_for_wandb()
            self._finish(body["exit_code"], through_id=record.id)


def _lock(spool_dir: str, run_id: str) -> int | None:
    """Hold `<spool>/locks/<run>.lock` for the life of this process; None if another uploader has it."""
    directory = os.path.join(spool_dir, "locks")
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, run_id + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _exit_with_relay(lifeline_fd: int) -> None:
    """Exit at once when the relay server dies, so a SIGKILLed relay leaves no uploader behind (a
    restarted relay starts new ones, which resume from the spool; an orphan would hold the run's
    lock). The server holds the only write end of the lifeline and never writes: end of file there
    means it is gone, whatever this process is doing. (Our parent is the fork server, which
    outlives the relay while any uploader lives, so PR_SET_PDEATHSIG cannot tell.)"""
    def watch() -> None:
        while True:
            try:
                if not os.read(lifeline_fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        log.warning("the relay server is gone; uploader exits (records stay in the spool)")
        os._exit(3)

    threading.Thread(target=watch, name="relay-lifeline", daemon=True).start()


def child_main(run_id: str, mode: str, config_json: str, wake: Any, lifeline: Any, core: str | None) -> None:
    """Entry point of an uploader forked by the relay's fork server (relay.server.uploader_context).
    `wake` and `lifeline` are the read ends of two pipes (multiprocessing Connections, read as fds);
    `core` is the shared wandb-core's token (None: start a wandb-core of its own)."""
    _exit_with_relay(lifeline.fileno())
    gc.freeze()  # what the fork server imported (wandb, ...) stays out of this process's collections
    if core:
        os.environ["WANDB_SERVICE"] = core
    else:
        os.environ.pop("WANDB_SERVICE", None)
    main([run_id, mode, config_json], wake_fd=wake.fileno())


def main(argv: list[str], wake_fd: int | None = None) -> int:
    """`python -m relay.uploader RUN_ID MODE CONFIG_JSON`: the wake pipe is stdin (or `wake_fd`)."""
    run_id, mode, config_json = argv
    config = RelayConfig.model_validate_json(config_json)
    os.nice(config.uploader_nice)  # uploads wait when the CPUs are busy; the server's intake does not
    logging.basicConfig(level=getattr(logging, config.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s[" + run_id + "]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    wandb_core_dies_with_its_parent()  # a wandb-core of the uploader's own dies with it (wandb.init: main thread)
    if _lock(config.spool_dir, run_id) is None:
        log.info("another uploader already serves run %s; exiting", run_id)
        return 0
    os.environ.setdefault("WANDB_SILENT", "true")
    # For a wandb-core of the uploader's own (not the shared one): with one run to serve, one OS
    # thread running Go code is plenty, and with many of them on few cores the Go schedulers'
    # spinning cost a quarter of their CPU.
    os.environ.setdefault("GOMAXPROCS", "1")
    uploader = RunUploader(run_id, config, mode, wake_fd=sys.stdin.fileno() if wake_fd is None else wake_fd)

    def on_term(signum: int, frame: Any) -> None:
        (uploader.stop if uploader.drain.is_set() else uploader.drain).set()
        uploader.interrupt.set()

    signal.signal(signal.SIGTERM, on_term)
    code = uploader.run()
    logging.shutdown()
    os._exit(code)  # wandb's exit hooks have nothing left to do: every run was finished or is resumable


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
