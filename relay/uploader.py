"""One uploader process per run: spool -> wandb SDK -> W&B. The only module that imports wandb.

Why a process and not a thread: the wandb SDK keeps per-process state that a failure poisons, so
each run's Python side lives in a process of its own; the server restarts a failed uploader, which
resumes the W&B run by id (nothing is lost or doubled: see spool.py). One uploader per run is
enforced by an flock on `<spool>/locks/<run>.lock`. The processes are forked from a fork server
that imported this module (and wandb) once, so starting one costs a fork, not an import of wandb.
The server wakes an uploader by writing a byte to its wake pipe; end of file there means the
server is gone, and the uploader exits at once.

The uploaders share one wandb-core (the SDK's Go service), which the server starts (SharedCore)
and hands to each uploader as a WANDB_SERVICE token: one Go process instead of one per run, and a
run starts without starting a service (with 16 runs, sharing cut the CPU per row by about a
third; see docs/performance.md). Sharing has one trap in
wandb 0.31: a run whose stream was left open in the core (its `wandb.init` failed, or its uploader
died) keeps its id "in use" there until the core stops. So an uploader
- asks W&B whether it answers before `wandb.init` in online mode (an outage fails there, not in
  wandb-core);
- closes a stream left open for its run (it attaches to it, marks it preempted and finishes it:
  what it held goes to W&B first) and starts the run again;
- and when the shared core fails it twice, or cannot be reached, goes on with a wandb-core of its
  own, as every uploader did before sharing.

W&B counts a run's history rows seconds after they arrive (up to `wandb_count_lag`), and a resume
goes on from that count: wandb-core continues its file stream at that line, the relay its steps.
Resumed on a count that trails what W&B holds, the next rows would land on lines already taken,
over rows W&B had. So before it resumes a run, an uploader waits until the count can be trusted
("settling" in `relay status`): it reached the steps the relay handed to the SDK for the run, or
no writer of the run has been alive for the lag, so that whatever reached W&B is counted. No
writer outlives its relay: the uploaders exit when the server is gone (the lifeline), and every
wandb-core gets a parent-death signal (a wandb-core whose parent is gone would otherwise go on
for a second or so, and write).

The uploader owns W&B's step: every row it logs gets the next value of a per-run counter, and
the (record, step) pairing is committed to the spool before the row goes to the SDK (see the
invariants in spool.py). The trainer's own axes, `frame` and `epoch`, are ordinary metrics made
into axes with define_metric, so a trainer that restarts from an older checkpoint never logs a
step that W&B would drop.

Consecutive `log` records of one run that carry the same `frame` are coalesced into one row.
Init failures (unreachable, 5xx, timeouts) are retried with capped exponential backoff while
the records wait in the spool; the relay keeps accepting from trainers meanwhile.
"""
from __future__ import annotations

import base64
import ctypes
import fcntl
import gc
import json
import logging
import netrc
import os
import queue
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

import tenacity
import wandb

from relay import planner
from relay.config import RelayConfig
from relay.snapshots import open_snapshot
from relay.spool import Record, Spool

log = logging.getLogger("relay.uploader")

RETRY_FOREVER = 1_000_000_000
SETTLE_POLL = 0.5  # seconds between looks at W&B's count of a run's rows while it settles
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when the thread that started it ends
WAKE, RETRY_NOW = b"w", b"r"  # what the server writes to an uploader's wake pipe

# How many history rows W&B holds for a run (the field wandb-core itself reads when it resumes).
SERVER_STEP_QUERY = """query RelayServerStep($entity: String, $project: String!, $name: String!) {
  model(name: $project, entityName: $entity) { bucket(name: $name) { historyLineCount } }
}"""

# Modules the wandb SDK (0.31) imports lazily inside wandb.init / log / finish. The uploader fork
# server imports them once, with this module, so that each uploader does not: they were about half
# of an uploader's start-up CPU. A name that fails to import is skipped (another wandb version).
SDK_PRELOAD = ("wandb.sdk.launch", "wandb.apis.public", "wandb._analytics", "wandb.sdk.lib.gitlib", "requests",
               "psutil", "opentelemetry.sdk.metrics", "opentelemetry.sdk._logs", "opentelemetry.sdk.resources",
               "opentelemetry.exporter.otlp.proto.http.metric_exporter",
               "opentelemetry.exporter.otlp.proto.http._log_exporter")

# What a W&B outage looks like from wandb.init; anything else is a bug and is not retried.
RETRYABLE = (wandb.errors.CommError, ConnectionError, TimeoutError, OSError)


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def api_key() -> str | None:
    """The API key wandb would use: WANDB_API_KEY, or the netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url()).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def api_key_configured() -> bool:
    return api_key() is not None


def default_mode() -> str:
    return "online" if api_key_configured() else "offline"


def history_count(url: str, key: str, entity: str | None, project: str, run_id: str, timeout: float) -> int:
    """How many history rows W&B holds for a run (0 for a run it does not know)."""
    query = {"operationName": "RelayServerStep", "query": SERVER_STEP_QUERY,
             "variables": {"entity": entity, "project": project, "name": run_id}}
    token = base64.b64encode(("api:%s" % key).encode()).decode()
    request = urllib.request.Request(url.rstrip("/") + "/graphql", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Basic " + token})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.load(response)
    bucket = answer["data"]["model"]["bucket"]
    return int(bucket["historyLineCount"] or 0) if bucket else 0


class Unreachable(ConnectionError):
    """W&B did not answer the relay's own query (raised before wandb.init is tried)."""


class Interrupted(ConnectionError):
    """The uploader was told to stop while the run waited for W&B's count to settle."""


class _CorePopen(subprocess.Popen):
    """Popen whose child, before it runs its program, asks for SIGKILL when the thread that
    started it ends (and exits at once if its parent is already gone)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parent, prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

        def die_with_parent() -> None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)

        super().__init__(*args, preexec_fn=die_with_parent, **kwargs)


class _SubprocessForCore:
    """The subprocess module as wandb's service_process sees it: wandb-core started with Popen dies
    with the thread that started it."""
    Popen = _CorePopen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def wandb_core_dies_with_its_parent() -> None:
    """From now on, every wandb-core this process starts (shared or its own) is SIGKILLed when the
    thread that started it ends: no wandb-core outlives its relay or uploader, and writes to a run
    that a restarted relay has resumed. (wandb-core watches its parent too, but only every second
    or so, and may write before it exits.)"""
    from wandb.sdk.lib.service import service_process  # not public: wandb is pinned (pyproject)

    service_process.subprocess = _SubprocessForCore()


class SharedCore:
    """The wandb-core that the relay's uploaders share: the server starts it, and passes its
    token to each uploader it starts (see the module docstring). It dies with the server (a
    parent-death signal); if it ends before, the server starts another."""

    def __init__(self) -> None:
        self.token: str | None = None   # WANDB_SERVICE for uploaders; None while there is no core
        self.exit_code: int | None = None
        self._process: Any = None

    def start(self) -> bool:
        """Start it (from the server's main thread: it dies when that thread ends)."""
        from wandb.sdk.lib.service import service_process  # not public: wandb is pinned (pyproject)

        wandb_core_dies_with_its_parent()
        try:
            process = service_process.start(wandb.Settings())
        except Exception as exc:  # wandb-core missing or broken: uploaders start their own (and say why)
            log.warning("could not start the shared wandb-core (%s); each run's uploader starts its own",
                        _short(exc))
            return False
        self._process, self.token, self.exit_code = process, process.token.env_value, None
        threading.Thread(target=self._watch, args=(process,), name="relay-wandb-core", daemon=True).start()
        return True

    def _watch(self, process: Any) -> None:
        code = process.join()
        if process is self._process:
            self.token, self.exit_code = None, code

    def ended(self) -> bool:
        return self._process is not None and self.token is None

    def stop(self) -> None:
        """After the uploaders have exited: stop wandb-core now rather than when it sees us gone."""
        if self._process is not None and self.token is not None:
            self.token = None
            self._process._process.terminate()  # the Popen inside wandb's handle (no public stop)


class RunUploader:
    def __init__(self, run_id: str, config: RelayConfig, mode: str, wake_fd: int | None = None):
        self.run_id = run_id
        self.config = config
        self.default_mode = mode
        self.wake_fd = wake_fd             # readable when the server has news; EOF when it is gone
        self.drain = threading.Event()     # upload what is spooled, finish the run, exit
        self.stop = threading.Event()      # exit as soon as possible
        self.interrupt = threading.Event() # set with either: cuts retry waits short
        self.location: str | None = None
        self.mode: str | None = None
        self._wb: Any = None               # the wandb Run while one is open
        self._cursor = 0                   # highest record id handed to the SDK
        self._next_step = 0
        self._confirmed_step = 0           # W&B holds every row below this step
        self._next_confirm = 0.0           # monotonic time of the next server-step query
        self._unreachable = False          # the last server-step query failed
        # No earlier writer of this run's history is alive since this moment (monotonic): an
        # uploader that had the run before is gone (we hold its lock), and its wandb-core with it.
        self._writers_gone = time.monotonic()
        self._spool: Spool | None = None
        self.shared_core = bool(os.environ.get("WANDB_SERVICE"))  # on the relay's wandb-core (SharedCore)
        self.shared_core_failures = 0
        self._artifacts = ArtifactWatch(run_id)  # checkpoints logged, until W&B commits them
        self._losses_told: dict | None = None  # what the run's W&B summary says about records it will not get

    # -- process ------------------------------------------------------------------------------

    def run(self) -> int:
        self._spool = Spool(self.config.spool_dir, check=False)  # the server checked it at its start
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
                self._spool.set_state(self.run_id, "failed", _short(exc))
            except sqlite3.Error as also:
                log.warning("run %s: cannot note the failure in the spool either: %s", self.run_id, also)
            return 1
        finally:
            self._spool.close()

    def _loop(self) -> None:
        spool = self._spool
        while not self.stop.is_set():
            for record_id in self._artifacts.committed():
                spool.confirm_checkpoint(self.run_id, record_id)
            online = self._wb is not None and self.mode == "online"
            if online and time.monotonic() >= self._next_confirm and self._next_step > self._confirmed_step:
                self._confirm()
            records = spool.records(self.run_id, self._cursor, self.config.batch_max)
            if not records:
                if self._wb is None:
                    return  # finished, or nothing to do: the server starts a new uploader when more comes
                if self.drain.is_set():
                    self._finish(exit_code=None)
                    return
                self._idle()
                continue
            if online and self._next_step - self._confirmed_step >= self.config.max_unconfirmed_rows:
                self._idle()  # the backlog stays in the spool, not in wandb-core's memory
                continue
            if self._wb is None:
                settings = spool.settings(self.run_id)
                if settings is None:
                    spool.set_state(self.run_id, "waiting for open")
                    if self.drain.is_set():
                        return
                    self._idle()
                    continue
                if not self._start(settings):
                    if self.drain.is_set() or self.stop.is_set():
                        return
                continue  # the resume may have confirmed records: read them again
            self._upload(records)

    def _idle(self) -> None:
        """Wait up to a second for the server's wake-up byte."""
        self._wait_for_server(1.0, RETRY_NOW + WAKE)

    def _wait_for_server(self, seconds: float, wake_on: bytes) -> None:
        """Wait `seconds`, less if the server sends one of the bytes in `wake_on` (WAKE: records
        came; RETRY_NOW: W&B answers another uploader again) or we are told to stop."""
        if self.wake_fd is None:
            self.interrupt.wait(seconds)
            return
        deadline = time.monotonic() + seconds
        while not self.interrupt.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                readable, _, _ = select.select([self.wake_fd], [], [], min(left, 1.0))
                if not readable:
                    continue
                news = os.read(self.wake_fd, 4096)
            except InterruptedError:
                continue
            if not news:
                log.warning("run %s: the relay server is gone; uploader exits (records stay in the spool)",
                            self.run_id)
                os._exit(3)
            if any(byte in wake_on for byte in news):
                return

    # -- W&B run lifecycle --------------------------------------------------------------------

    def _start(self, settings: dict) -> bool:
        self.mode = settings.get("mode") or self.default_mode
        if self.mode == "disabled":
            self._wb = DISABLED
            self._spool.set_state(self.run_id, "disabled")
            return True
        self._spool.set_state(self.run_id, "initialising")
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RETRYABLE),
            wait=tenacity.wait_exponential_jitter(initial=1.0, max=self.config.backoff_max),
            stop=lambda state: self.interrupt.is_set(),
            sleep=lambda seconds: self._wait_for_server(seconds, RETRY_NOW),  # records coming in do not cut it
            before_sleep=self._on_retry,
            reraise=True,
        )
        try:
            self._wb = retrying(self._init_once, settings)
        except RETRYABLE:
            return False
        # After a resume, wandb reports the next free step as starting_step (run.step reads 0).
        server_step = int(self._wb.starting_step or 0) if self.mode == "online" else 0
        confirmed = self._spool.confirm_below_step(self.run_id, server_step)
        if server_step:
            log.info("run %s resumed at W&B step %d (%d spooled records were already there)",
                     self.run_id, server_step, confirmed)
        self._cursor = 0
        self._next_step = server_step
        self._confirmed_step = server_step
        self._next_confirm = time.monotonic() + self.config.confirm_every
        self._losses_told = None  # tell this W&B run about records it will not get, if any
        for axis in ("frame", "epoch"):
            self._wb.define_metric(axis)
        self._wb.define_metric("*", step_metric="frame")
        if self.mode == "offline":
            self.location = os.path.dirname(self._wb.dir.rstrip("/"))  # .../wandb/offline-run-*
        else:
            self.location = self._wb.url
        self._spool.set_state(self.run_id, "uploading", location=self.location)
        log.info("run %s started in W&B mode %s at %s", self.run_id, self.mode, self.location)
        return True

    def _init_once(self, settings: dict) -> Any:
        if self.mode == "online":
            self._settle(settings)
        if self.shared_core:
            try:
                return self._init_on_shared_core(settings)
            except Exception as exc:
                self.shared_core_failures += 1
                if isinstance(exc, RETRYABLE) and self.shared_core_failures < 2:
                    raise  # an outage that began after the probe; the next try closes the stream it left
                self._leave_shared_core(exc)
        try:
            return self._init_sdk(settings)
        except RETRYABLE:
            # The failed run id stays registered in this process's wandb-core: start a fresh one.
            wandb.teardown()
            raise

    def _probe(self, settings: dict) -> int | None:
        """Raise Unreachable unless W&B answers (any answer but 5xx, 408 or 429 counts). Return its
        count of the run's history rows, or None if it answered without one."""
        key = api_key()
        if key is None:
            return None  # wandb.init will say what is missing
        try:
            return history_count(base_url(), key, settings.get("entity"), settings["project"], self.run_id,
                                 self.config.request_timeout)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code in (408, 429):
                raise Unreachable("W&B at %s answered HTTP %d" % (base_url(), exc.code)) from None
        except (KeyError, TypeError):
            pass  # a GraphQL error (no such entity, no permission): W&B answers; wandb.init will say more
        except (OSError, ValueError) as exc:
            raise Unreachable("W&B at %s did not answer: %s" % (base_url(), _short(exc))) from None
        return None

    def _settle(self, settings: dict) -> None:
        """Return once W&B's count of the run's history rows can be trusted (see the module
        docstring); raise Unreachable if W&B does not answer, Interrupted if told to stop.

        Trusted: a count equal to the steps handed to the SDK for this run (every row arrived and
        is counted); a smaller one once no writer of the run has been alive for `wandb_count_lag`
        (what arrived is counted; the rest never arrives, and is handed again); a larger one (rows
        the relay did not hand) once it has not changed for `wandb_count_lag`."""
        handed = self._spool.steps_handed(self.run_id)
        lag = self.config.wandb_count_lag
        last, changed = None, time.monotonic()
        settling = False
        while True:
            count = self._probe(settings)
            now = time.monotonic()
            if count != last:
                last, changed = count, now
            ready_at = (self._writers_gone if count is not None and count < handed else changed) + lag
            if count is None or count == handed or now >= ready_at:
                break
            if count < handed:
                why = ("W&B counts %d of the %d rows handed to it; resuming when it counts them all, or in %.0f s "
                       "at most" % (count, handed, ready_at - now))
            else:
                why = ("W&B counts %d rows, more than the %d handed to it; resuming when the count has held for "
                       "%.0f s" % (count, handed, lag))
            self._spool.set_state(self.run_id, "settling", why)
            settling = True
            self._wait_for_server(min(SETTLE_POLL, ready_at - now), b"")
            if self.interrupt.is_set():
                raise Interrupted("stopped while W&B's count of run %s settled" % self.run_id)
        if count is not None and count != handed:
            log.info("run %s: W&B counts %d rows (the relay handed %d) and nothing more can arrive: resuming "
                     "there", self.run_id, count, handed)
        if settling:
            self._spool.set_state(self.run_id, "initialising")

    def _init_on_shared_core(self, settings: dict) -> Any:
        try:
            return self._init_sdk(settings)
        except Exception as exc:
            if "is in use" not in str(exc):
                raise
        # The core holds a stream of this run: its uploader died, or a wandb.init failed. Close it
        # (what it holds goes to W&B first) and start the run again: it resumes after those rows.
        log.info("run %s: closing its stream left open in the shared wandb-core (by an uploader that died or a "
                 "wandb.init that failed); the run resumes after what that stream held", self.run_id)
        stale = wandb._attach(attach_id=self.run_id)
        stale.mark_preempting()
        stale.finish()
        self._writers_gone = time.monotonic()  # what that stream held has reached W&B, not yet its count
        if self.mode == "online":
            self._settle(settings)
        return self._init_sdk(settings)

    def _leave_shared_core(self, error: BaseException) -> None:
        log.warning("run %s: the shared wandb-core failed it (%s); this run goes on with a wandb-core of its own",
                    self.run_id, _short(error))
        self.shared_core = False
        wandb.teardown()  # this process's connection only: the shared core runs on for the others
        os.environ.pop("WANDB_SERVICE", None)

    def _init_sdk(self, settings: dict) -> Any:
        return wandb.init(
            project=settings["project"], entity=settings.get("entity"), name=settings.get("name"),
            group=settings.get("group"), tags=settings.get("tags") or None, notes=settings.get("notes"),
            job_type=settings.get("job_type"), config=settings.get("config") or None,
            id=self.run_id, resume="allow", mode=self.mode, dir=self.config.spool_dir,
            reinit="create_new", allow_val_change=True,
            settings=wandb.Settings(
                init_timeout=self.config.init_timeout, silent=True, console="off", save_code=False,
                disable_git=True, x_disable_stats=True, x_disable_machine_info=True,
                # The relay host's pip packages say nothing about the trainer's run (and listing
                # them read every installed package's metadata: a tenth of an uploader's CPU).
                x_save_requirements=False,
                # An online run's transaction log (`run-*.wandb`: every row again, on the relay's disk,
                # never cleaned up) would duplicate what the spool holds until W&B confirms it; it also
                # cost a quarter of wandb-core's CPU in a drain. An offline run is its transaction log.
                x_skip_transaction_log=self.mode == "online",
                # wandb-core must never give up on a row it accepted: the spool has already let go
                # of the choice. It retries forever, waiting at most backoff_max between tries.
                x_file_stream_retry_max=RETRY_FOREVER, x_graphql_retry_max=RETRY_FOREVER,
                x_file_transfer_retry_max=RETRY_FOREVER,
                x_file_stream_retry_wait_max_seconds=self.config.backoff_max,
                x_graphql_retry_wait_max_seconds=self.config.backoff_max,
                x_file_transfer_retry_wait_max_seconds=self.config.backoff_max,
                x_file_stream_transmit_interval=self._upload_interval(),
                x_file_stream_timeout_seconds=self.config.request_timeout,
                x_graphql_timeout_seconds=self.config.request_timeout,
                x_file_transfer_timeout_seconds=self.config.request_timeout),
        )

    def _upload_interval(self) -> float:
        """wandb-core's file-stream interval for this run: `upload_interval`, stretched so that the
        live runs together make at most `upload_requests` requests a second (runs that start later
        are given longer intervals; one already started keeps its own)."""
        live = max(1, self._spool.live_runs())
        return max(self.config.upload_interval, live / self.config.upload_requests)

    def _on_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        self._spool.set_state(self.run_id, "retrying", _short(error))  # the server logs the outage once
        log.debug("run %s: wandb.init failed (%s); retry in %.1f s", self.run_id, _short(error),
                  state.next_action.sleep if state.next_action else 0)

    def _wait_for_wandb(self) -> None:
        """Before a finish (which blocks until W&B has everything) or an artifact (whose first calls
        are synchronous), make sure W&B answers, so an outage shows as 'retrying' in `relay status`
        rather than as a call that never ends or raises."""
        if self.mode != "online":
            return
        self._confirm()
        while self._unreachable and not self.interrupt.is_set():
            self._wait_for_server(self.config.backoff_max, RETRY_NOW)
            self._confirm()

    def _confirm(self) -> None:
        """Ask W&B how many history rows it holds; the spool lets go of those rows.

        This is also how the relay notices a W&B outage in the middle of a run: the SDK retries
        quietly, this query does not."""
        self._next_confirm = time.monotonic() + self.config.confirm_every
        try:
            server_step = history_count(self._wb.settings.base_url, self._wb.settings.api_key, self._wb.entity,
                                        self._wb.project, self.run_id, self.config.request_timeout)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._unreachable = True
            self._spool.set_state(self.run_id, "retrying", "asking W&B for the run failed: %s" % _short(exc))
            return
        self._unreachable = False
        self._spool.set_state(self.run_id, "uploading")
        if server_step > self._confirmed_step:
            confirmed = self._spool.confirm_logged(self.run_id, server_step)
            log.debug("run %s: W&B holds %d rows; %d spooled records let go", self.run_id, server_step, confirmed)
            self._confirmed_step = server_step

    def _finish(self, exit_code: int | None, through_id: int | None = None) -> None:
        """Close the W&B run; once finish() returns, everything logged is confirmed."""
        if self._wb is None:
            return
        if self._wb is not DISABLED and exit_code is None:  # the relay stops while the trainer runs on
            self._wb.mark_preempting()
            self._wb.finish()
        elif self._wb is not DISABLED:
            self._wb.finish(exit_code=exit_code)
        self._wb = None
        done = self._cursor if through_id is None else through_id
        self._spool.confirm_through(self.run_id, done, exit_code, finished=exit_code is not None)
        self._cursor = 0 if through_id is None else self._cursor
        self._spool.set_state(self.run_id, "finished" if exit_code is not None else "paused")
        log.info("run %s %s at %s", self.run_id,
                 "finished with exit code %s" % exit_code if exit_code is not None else "paused (relay stopping)",
                 self.location)

    # -- records ------------------------------------------------------------------------------

    def _upload(self, records: list[Record]) -> None:
        """Assign steps (committed first), then hand rows, artifacts and summaries to the SDK."""
        if self._wb is DISABLED:  # accepted and acked, then dropped on purpose
            finish = next((r for r in records if r.kind == "finish"), None)
            self._cursor = records[-1].id
            self._spool.confirm_through(self.run_id, self._cursor, finish and finish.body["exit_code"],
                                        finished=finish is not None)
            return
        losses = self._spool.losses(self.run_id)  # unreadable records set aside, acked records found lost
        if losses != self._losses_told:
            if losses:  # shown in the run's W&B summary: the run lacks what these records held
                self._wb.summary.update(losses)
            self._losses_told = losses
        batch = planner.plan(records, self._next_step)
        self._spool.assign_steps(self.run_id, batch.steps, batch.through_id)
        self._next_step = batch.next_step
        for item in batch.items:
            if isinstance(item, planner.Row):
                self._wb.log(item.values, step=item.step, commit=True)
            else:
                self._cursor = item.id
                self._apply(item)
        self._cursor = batch.through_id

    def _apply(self, record: Record) -> None:
        body = record.body
        if record.kind == "summary":
            self._wb.summary.update(body["values"])
        elif record.kind == "open":
            self._wb.config.update(body["settings"].get("config") or {}, allow_val_change=True)
        elif record.kind == "checkpoint":
            self._wait_for_wandb()  # log_artifact talks to W&B in this thread, and raises when it cannot
            self._log_checkpoint(record)
        elif record.kind == "finish":
            self._wait_for_wandb()
            self._finish(body["exit_code"], through_id=record.id)

    def _log_checkpoint(self, record: Record) -> None:
        """Log the checkpoint's snapshot, taken when the relay took the record (relay/snapshots.py)."""
        body = record.body
        try:
            fd = open_snapshot(self.config.spool_dir, body)
        except OSError as exc:
            log.error("checkpoint %s of run %s (seq %d) is not uploaded: its snapshot in the spool cannot be read "
                      "(%s); the record is let go", body["path"], self.run_id, body["seq"], exc)
            self._spool.confirm_checkpoint(self.run_id, record.id)
            return
        artifact = wandb.Artifact("model-%s" % self.run_id, type="model", metadata=body.get("metadata") or {})
        try:  # add_file copies it now (policy "mutable") into wandb's staging area
            artifact.add_file("/proc/self/fd/%d" % fd, name=os.path.basename(body["path"]), policy="mutable")
        finally:
            os.close(fd)
        logged = self._wb.log_artifact(artifact, aliases=body.get("aliases") or None)
        self._artifacts.watch(record.id, logged, body["path"])
        log.info("run %s: checkpoint %s logged as a model artifact", self.run_id, body["path"])


class ArtifactWatch:
    """Waits, on a thread of its own, for W&B to commit each logged artifact, in order, so the
    spool can let go of the checkpoint record and its snapshot then rather than at the run's end.
    (wandb-core retries an upload for ever: during an outage the wait lasts as long.) A run
    finished, or an uploader gone, leaves the rest to the spool: `confirm_through` at the finish,
    a re-upload after a restart."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._waiting: queue.Queue = queue.Queue()
        self._committed: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def watch(self, record_id: int, artifact: Any, path: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait, name="relay-artifact-watch", daemon=True)
            self._thread.start()
        self._waiting.put((record_id, artifact, path))

    def committed(self) -> list[int]:
        """Record ids whose artifacts W&B committed (or refused for good) since the last call."""
        done = []
        while True:
            try:
                done.append(self._committed.get_nowait())
            except queue.Empty:
                return done

    def _wait(self) -> None:
        while True:
            record_id, artifact, path = self._waiting.get()
            # wandb 0.31 (pinned): what Artifact.wait() waits on, without the query it then makes.
            handle = getattr(artifact, "_save_handle", None)
            if handle is None:
                continue  # offline: nothing is committed until `wandb sync`; the run's finish lets go of it
            try:
                result = handle.wait_or(timeout=None)
            except Exception as exc:  # the run was finished or the SDK torn down: the spool decides
                log.debug("run %s: stopped waiting for the artifact of checkpoint %s (%s)", self.run_id, path,
                          _short(exc))
                continue
            error = result.response.log_artifact_response.error_message
            if error:
                log.error("run %s: W&B did not take checkpoint %s: %s", self.run_id, path, error)
            else:
                log.debug("run %s: W&B committed the artifact of checkpoint %s", self.run_id, path)
            self._committed.put(record_id)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return "%s: %s" % (type(error).__name__, text[0] if text else "")


DISABLED = object()  # stands in for a W&B run in disabled mode


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
