"""The W&B sink: one run's side in the wandb SDK, and the wandb-core the uploaders share. With its
siblings (wandb_media.py: a row's media as wandb objects; wandb_meta.py, wandb_quiet.py: SDK state),
the only modules of the relay that import wandb, and where every workaround for the SDK (pinned) is.

The uploaders share one wandb-core (the SDK's Go service), which the server starts (SharedCore)
and hands to each uploader as a WANDB_SERVICE token: one Go process instead of one per run, and a
run starts without starting a service (with 16 runs, sharing cut the CPU per row by about a third;
see docs/performance.md). Sharing has one trap in wandb 0.31: a run whose stream was left open in
the core (its `wandb.init` failed, or its uploader died) keeps its id "in use" there until the
core stops. So a sink
- closes a stream left open for its run (it attaches to it, marks it preempted and finishes it:
  what it held goes to W&B first), lets the uploader wait for W&B's count again, and starts the
  run again (a close that raised is judged by that start: "in use" again is tried again);
- and when the shared core fails it twice, or cannot be reached, goes on with a wandb-core of its
  own.
Every wandb-core, shared or not, gets a parent-death signal (a wandb-core whose parent is gone
would otherwise go on for a second or so, and write to a run that a restarted relay resumed).

A sink does what its uploader tells it, in that order: the uploader owns the steps, the spool and
when to wait (relay/uploader.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
from typing import Any, Callable

import wandb

from relay.config import RelayConfig
from relay.errors import RelayError
from relay.sinks import wandb_meta, wandb_quiet
from relay.sinks.wandb_api import history_count, short_error

log = logging.getLogger("relay.uploader")  # part of the uploader's log, as operators read it

RETRY_FOREVER = 1_000_000_000
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when the thread that started it ends

# Modules the wandb SDK (0.31) imports lazily inside wandb.init / log / finish. The uploader fork
# server imports them once, with the uploader, so that each uploader does not: they were about half
# of an uploader's start-up CPU. A name that fails to import is skipped (another wandb version).
# (The SDK's OpenTelemetry exporters are never imported: its analytics are off, wandb_quiet.py.)
SDK_PRELOAD = ("wandb.sdk.launch", "wandb.apis.public", "wandb._analytics", "wandb.sdk.lib.gitlib", "requests", "psutil")

# The trainer's console streams (relay/protocol.py) as the SDK names them; the line of lines dropped.
CONSOLE_STREAMS = {"out": "stdout", "err": "stderr"}
DROPPED_LINES = ("[relay: %s console lines dropped: the trainer printed more than its console limits let through "
                 "(relay.console.ConsoleLimits)]")

# What a W&B outage looks like from wandb.init; anything else is a bug and is not retried.
RETRYABLE = (wandb.errors.CommError, ConnectionError, TimeoutError, OSError)


class OwnCoreNeeded(RelayError, RuntimeError):
    """A run that must go on with a wandb-core of its own, opened in an uploader host that serves
    other runs too: starting (or tearing down) a wandb-core is per process, so the run moves to an
    uploader process of its own (relay/uploader_host.py)."""


class WandbSink:
    """One run in W&B, for the uploader of that run: `open` (wandb.init, on the shared wandb-core or
    one of its own), then rows, summaries, config, checkpoints, and `finish`. Lives as long as the
    uploader process: a run finished and started again is opened again on the same sink.
    `alone`: the run is the only one of its process; otherwise (an uploader host) the sink never
    starts or tears down a wandb-core, which the process's other runs use, and raises OwnCoreNeeded
    where it would."""

    def __init__(self, run_id: str, config: RelayConfig, alone: bool = True):
        self.run_id = run_id
        self.config = config
        self.alone = alone
        self.mode: str | None = None
        self.shared_core = bool(os.environ.get("WANDB_SERVICE"))  # on the relay's wandb-core (SharedCore)
        self.shared_core_failures = 0
        self._run: Any = None  # the wandb Run while one is open
        self._provenance: dict | None = None  # the trainer's provenance given to wandb.init

    # -- opening ------------------------------------------------------------------------------

    def open(self, settings: dict, mode: str, on_left_open_closed: Callable[[], None],
             provenance: dict | None = None) -> None:
        """wandb.init the run (resumed if W&B has it). Raises one of RETRYABLE on an outage.
        `on_left_open_closed` is called after a stream of this run left open in the shared core was
        closed, before the run starts again (its rows reached W&B, not yet its count). `provenance`
        (a `meta` record's): the trainer's host, program and commit as the run's (wandb_meta)."""
        self.mode = mode
        self._provenance = provenance
        if self.shared_core:
            try:
                self._run = self._open_on_shared_core(settings, on_left_open_closed)
                return
            except Exception as exc:
                self.shared_core_failures += 1
                if isinstance(exc, RETRYABLE) and self.shared_core_failures < 2:
                    raise  # an outage that began after the probe; the next try closes the stream it left
                self._leave_shared_core(exc)
        if not self.alone:
            raise OwnCoreNeeded("run %s needs a wandb-core of its own" % self.run_id)
        try:
            self._run = self._init(settings)
        except RETRYABLE:
            # The failed run id stays registered in this process's wandb-core: start a fresh one.
            wandb.teardown()
            raise

    def _open_on_shared_core(self, settings: dict, on_left_open_closed: Callable[[], None]) -> Any:
        try:
            return self._init(settings)
        except Exception as exc:
            if "is in use" not in str(exc):
                raise
        log.info("run %s: closing its stream left open in the shared wandb-core (by an uploader that died or a "
                 "wandb.init that failed); the run resumes after what that stream held", self.run_id)
        # A stream of this run left open (its uploader died, a wandb.init failed): close it (what it
        # holds reaches W&B first), start again after it. The SDK may raise once the stream ended (it asks
        # for its summary): the next init tells; one still there is closed again (it may send rows yet).
        closed = True
        try:
            stale = wandb._attach(attach_id=self.run_id)
            stale.mark_preempting()
            stale.finish()
        except Exception as exc:
            closed = False
            log.info("run %s: closing the stream left open raised %s; the next wandb.init tells whether it ended",
                     self.run_id, short_error(exc))
        on_left_open_closed()
        try:
            return self._init(settings)
        except Exception as exc:
            if closed or "is in use" not in str(exc):
                raise
            raise ConnectionError("run %s: its stream left open in the shared wandb-core is still open after a "
                                  "close that raised; trying again" % self.run_id) from exc

    def _leave_shared_core(self, error: BaseException) -> None:
        log.warning("run %s: the shared wandb-core failed it (%s); this run goes on with a wandb-core of its own",
                    self.run_id, short_error(error))
        if not self.alone:  # the process's other runs keep using it
            raise OwnCoreNeeded("run %s needs a wandb-core of its own" % self.run_id) from error
        self.shared_core = False
        wandb.teardown()  # this process's connection only: the shared core runs on for the others
        os.environ.pop("WANDB_SERVICE", None)

    def _init(self, settings: dict) -> Any:
        wandb_quiet.prepare_process()
        run = wandb.init(
            project=settings["project"], entity=settings.get("entity"), name=settings.get("name"),
            group=settings.get("group"), tags=settings.get("tags") or None, notes=settings.get("notes"),
            job_type=settings.get("job_type"), config=settings.get("config") or None,
            id=self.run_id, resume="allow", mode=self.mode, dir=self.config.spool_dir,
            reinit="create_new", allow_val_change=True,
            settings=wandb.Settings(
                # console: wandb-core writes the output records of `write_console` to output.log
                # only when console capture is on; the capture it turns on in this process is
                # undone at once (`_init`): the relay's own output is not the trainer's.
                init_timeout=self.config.init_timeout, silent=True, console="wrap_raw", save_code=False,
                # Nothing of the relay's host: no git, no stats, no machine info, or (when the trainer
                # sent its provenance) the trainer's host, program and commit instead (wandb_meta).
                disable_git=True, x_disable_stats=True, **wandb_meta.init_settings(self._provenance),
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
                # Whole seconds (wandb-core cuts a fraction off), fixed for the run's life; how
                # often rows are handed over under load is the uploader's (relay/cadence.py).
                x_file_stream_transmit_interval=self.config.upload_interval,
                x_file_stream_timeout_seconds=self.config.request_timeout,
                x_graphql_timeout_seconds=self.config.request_timeout,
                x_file_transfer_timeout_seconds=self.config.request_timeout),
        )
        run._restore()  # the SDK's capture of this process's stdout/stderr, off (wandb 0.31, pinned)
        wandb_quiet.quiet_run(run)
        return run

    # -- an open run --------------------------------------------------------------------------

    @property
    def starting_step(self) -> int:
        """After a resume, wandb reports the next free step as starting_step (run.step reads 0)."""
        return int(self._run.starting_step or 0)

    @property
    def location(self) -> str:
        """The run's W&B URL, or (offline) its run directory, .../wandb/offline-run-*."""
        if self.mode == "offline":
            return os.path.dirname(self._run.dir.rstrip("/"))
        return self._run.url

    def use_axes(self, axes: tuple[str, ...], step_axis: str) -> None:
        """Make metrics of the rows into axes, and chart everything against `step_axis`."""
        for axis in axes:
            self._run.define_metric(axis)
        self._run.define_metric("*", step_metric=step_axis)

    def log(self, values: dict, step: int) -> None:
        self._run.log(values, step=step, commit=True)

    def write_console(self, lines: list[list[str]], dropped: int) -> None:
        """The trainer's console lines into the run's Logs (`output.log`), as in-process wandb
        writes a captured console: raw output records, which wandb-core runs through its terminal
        emulator, stamps with the time it takes them, and marks "ERROR " when they came from
        stderr. Consecutive lines of one stream go in one record. Then the count of lines the
        client dropped, if any, as a line of its own."""
        publish = self._run._interface.publish_output_raw  # not public: wandb is pinned (pyproject)
        chunk: list[str] = []
        stream = None
        for name, text in lines:
            if name != stream and chunk:
                publish(CONSOLE_STREAMS[stream], "".join(chunk))
                chunk = []
            stream = name
            chunk.append(text + "\n")
        if chunk:
            publish(CONSOLE_STREAMS[stream], "".join(chunk))
        if dropped:
            publish("stderr", DROPPED_LINES % format(dropped, ",") + "\n")

    def update_summary(self, values: dict) -> None:
        self._run.summary.update(values)

    def update_config(self, values: dict) -> None:
        self._run.config.update(values, allow_val_change=True)

    def log_checkpoint(self, fd: int, name: str, metadata: dict, aliases: list[str] | None) -> Any:
        """Log the file open at `fd` (closed here) as a `model` artifact of the run; return what
        ArtifactWatch waits on. Talks to W&B in this thread, and raises when it cannot."""
        artifact = wandb.Artifact("model-%s" % self.run_id, type="model", metadata=metadata)
        try:  # add_file copies it now (policy "mutable") into wandb's staging area
            artifact.add_file("/proc/self/fd/%d" % fd, name=name, policy="mutable")
        finally:
            os.close(fd)
        return self._run.log_artifact(artifact, aliases=aliases)

    def history_count(self) -> int:
        """How many history rows W&B holds for the open run (raises one of wandb_api.COUNT_ERRORS)."""
        run = self._run
        return history_count(run.settings.base_url, run.settings.api_key, run.entity, run.project, self.run_id,
                             self.config.request_timeout)

    def finish(self, exit_code: int | None) -> None:
        """Close the run; when this returns, W&B has everything logged. No exit code: the relay
        stops while the trainer runs on, and the run is marked preempted (it is resumed later)."""
        if exit_code is None:
            self._run.mark_preempting()
            self._run.finish()
        else:
            self._run.finish(exit_code=exit_code)
        self._run = None


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
                          short_error(exc))
                continue
            error = result.response.log_artifact_response.error_message
            if error:
                log.error("run %s: W&B did not take checkpoint %s: %s", self.run_id, path, error)
            else:
                log.debug("run %s: W&B committed the artifact of checkpoint %s", self.run_id, path)
            self._committed.put(record_id)


# -- wandb-core -------------------------------------------------------------------------------

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


def lower(pid: int, nice: int) -> None:
    """Put process `pid` `nice` steps below this process's CPU priority (at most 19)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError as exc:  # it ended already, or we may not: it just keeps our priority
        log.debug("could not lower the CPU priority of process %d: %s", pid, exc)


class SharedCore:
    """The wandb-core that the relay's uploaders share: the server starts it, and passes its
    token to each uploader it starts (see the module docstring). It dies with the server (a
    parent-death signal); if it ends before, the server starts another."""

    def __init__(self) -> None:
        self.token: str | None = None   # WANDB_SERVICE for uploaders; None while there is no core
        self.exit_code: int | None = None
        self._process: Any = None

    def start(self, nice: int = 0) -> bool:
        """Start it (from the server's main thread: it dies when that thread ends), `nice` steps
        below this process's CPU priority."""
        from wandb.sdk.lib.service import service_process  # not public: wandb is pinned (pyproject)

        wandb_core_dies_with_its_parent()
        try:
            process = service_process.start(wandb.Settings())
        except Exception as exc:  # wandb-core missing or broken: uploaders start their own (and say why)
            log.warning("could not start the shared wandb-core (%s); each run's uploader starts its own",
                        short_error(exc))
            return False
        self._process, self.token, self.exit_code = process, process.token.env_value, None
        if nice:
            lower(process._process.pid, nice)  # the Popen inside wandb's handle
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
