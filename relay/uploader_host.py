"""Uploader hosts: one process serving many runs, each run's RunUploader loop (relay/uploader.py) in
a thread of its own, all on one wandb-core (the relay's shared one, else one the host starts).

Why threads in one process: an uploader process per run costs ~17 MiB PSS and a process each; a
thread per run costs a run's Python objects. A run's W&B calls block only its own thread, so one
slow run does not hold back the others. What threads cannot give is a way to end one run's
SDK state: so a run whose uploader fails (its loop raised), that must leave the shared wandb-core
(OwnCoreNeeded), or whose W&B call has not returned for `stuck_timeout`, makes the host report it
and exit. The server then starts the host's other runs in a fresh host at once (each resumes its
W&B run by id, as after an uploader crash) and retries the failing run, with backoff, in an
uploader process of its own (relay/supervisor.py).

The server talks to a host through three pipes:
- wake (server -> host): lines `<byte><run id>`: START serves a run (a thread is started unless
  one serves it), WAKE and RETRY_NOW are passed on to the run's own wake pipe (relay/uploader.py
  WakePipe); end of file means the server is gone.
- report (host -> server): lines `<word> <run id>`: END (the run's loop returned: finished, or
  nothing to do), and before the host exits because of a run, FAILED, OWN_CORE or STUCK.
- lifeline: never written to; its end of file makes the host exit at once.
A host with no run for HOST_IDLE_EXIT seconds exits (code 0). A first SIGTERM drains every run
(each uploads what is spooled and closes its W&B run), a second stops them; the host exits when
its threads have ended. One thread per run is enforced, across processes too, by the run's flock.
"""
from __future__ import annotations

import gc
import logging
import os
import select
import signal
import threading
import time
from typing import Any, Callable

from relay.config import RelayConfig
from relay.sinks.wandb import OwnCoreNeeded, SharedCore, WandbSink, wandb_core_dies_with_its_parent
from relay.uploader import WAKE, RunUploader, _exit_with_relay, _lock

log = logging.getLogger("relay.uploader")

START = b"s"  # besides WAKE and RETRY_NOW (relay/uploader.py), on a host's wake pipe
END, FAILED, OWN_CORE, STUCK = "end", "failed", "own-core", "stuck"  # the words of a host's reports
EXIT_RUN_FAILED = 4  # a host's exit code after a run's failure (reported before it exits)
HOST_IDLE_EXIT = 10.0  # seconds a host without runs waits for one before it exits


class WatchedSink:
    """A run's WandbSink as its uploader sees it in a host. `busy_since` is the start of the call in
    progress (None between calls), so that the host can tell a call that does not return. A
    run that needs a wandb-core of its own (OwnCoreNeeded) is stopped: `own_core` is set, the
    uploader told to stop (`stop`), and its `open` ends as an outage would, which a stopping
    uploader does not retry."""

    def __init__(self, sink: WandbSink, stop: Callable[[], None]):
        self._sink = sink
        self._stop = stop
        self.busy_since: float | None = None
        self.busy_with = ""
        self.own_core = False

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._sink, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self.busy_with, self.busy_since = name, time.monotonic()
            try:
                return value(*args, **kwargs)
            except OwnCoreNeeded as exc:
                self.own_core = True
                self._stop()
                raise ConnectionError(str(exc)) from None
            finally:
                self.busy_since = None
        return call


class HostedUploader(RunUploader):
    """A RunUploader in a host: its sink watched (WatchedSink), never alone in its process."""

    def __init__(self, run_id: str, config: RelayConfig, mode: str, wake_fd: int):
        super().__init__(run_id, config, mode, wake_fd=wake_fd)
        self.sink = WatchedSink(WandbSink(run_id, config, alone=False), self.stop_now)
        self._sink = self.sink

    def stop_now(self) -> None:
        self.stop.set()
        self.interrupt.set()


class RunThread:
    """One run served in a host: its RunUploader on a thread named after the run, its own wake
    pipe, the run's lock held while the thread runs. `code` is run()'s result once it ended."""

    def __init__(self, run_id: str, config: RelayConfig, mode: str, ended_fd: int):
        self.run_id = run_id
        self.config = config
        self._wake_reader, self._wake_writer = os.pipe()
        os.set_blocking(self._wake_writer, False)
        self.uploader = HostedUploader(run_id, config, mode, self._wake_reader)
        self.sink = self.uploader.sink
        self.code: int | None = None
        self._ended_fd = ended_fd  # a byte there tells the host's loop that a thread ended
        self.thread = threading.Thread(target=self._main, name=run_id, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        code = 1
        lock = _lock(self.config.spool_dir, self.run_id)
        try:
            if lock is None:
                log.info("another uploader already serves run %s", self.run_id)
                code = 0
            else:
                code = self.uploader.run()
        finally:
            if lock is not None:
                os.close(lock)
            self.code = code
            try:
                os.write(self._ended_fd, b".")
            except BlockingIOError:
                pass  # bytes already wait there: the host's loop looks at every thread

    def wake(self, news: bytes) -> None:
        try:
            os.write(self._wake_writer, news)
        except OSError:
            pass  # its pipe is full: it is awake

    def signal(self, stop: bool) -> None:
        """SIGTERM as an uploader process takes it: first drain, then stop."""
        (self.uploader.stop if stop else self.uploader.drain).set()
        self.uploader.interrupt.set()

    def close(self) -> None:
        os.close(self._wake_reader)
        os.close(self._wake_writer)


class UploaderHost:
    """A host's loop: runs started and woken as the server says, ended threads reported, stuck
    calls watched; the exit when idle, drained, or when a run fails (see the module docstring)."""

    def __init__(self, config: RelayConfig, mode: str, wake_fd: int, report_fd: int):
        self.config = config
        self.mode = mode
        self.wake_fd = wake_fd
        self.report_fd = report_fd
        self.runs: dict[str, RunThread] = {}
        self.terms = 0  # SIGTERMs received: 1 drain, 2 stop (set by the handler, applied by the loop)
        self._terms_applied = 0
        self._ended_reader, self._ended_writer = os.pipe()  # also the signal wake-up fd: SIGTERM cuts select short
        os.set_blocking(self._ended_writer, False)
        self._partial = b""

    @property
    def wakeup_fd(self) -> int:
        return self._ended_writer

    def on_term(self, signum: int, frame: Any) -> None:
        self.terms += 1

    def serve(self) -> int:
        idle_since = time.monotonic()
        while True:
            readable, _, _ = select.select([self.wake_fd, self._ended_reader], [], [], 1.0)
            if self._ended_reader in readable:
                os.read(self._ended_reader, 4096)
            self._reap()
            if self.wake_fd in readable:
                news = os.read(self.wake_fd, 65536)
                if not news:
                    log.warning("the relay server is gone; uploader host exits (records stay in the spool)")
                    return 3
                self._dispatch(news)
            if self.terms != self._terms_applied:
                self._terms_applied = self.terms
                for run in self.runs.values():
                    run.signal(stop=self.terms > 1)
            self._watch()
            now = time.monotonic()
            if self.runs:
                idle_since = now
            elif self.terms or now - idle_since >= HOST_IDLE_EXIT:
                return 0

    def _dispatch(self, news: bytes) -> None:
        lines = (self._partial + news).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            kind, run_id = line[:1], line[1:].decode("ascii")
            run = self.runs.get(run_id)
            if run is not None:
                run.wake(WAKE if kind == START else kind)
            elif kind == START and not self.terms:
                self.runs[run_id] = RunThread(run_id, self.config, self.mode, self._ended_writer)

    def _reap(self) -> None:
        for run_id, run in list(self.runs.items()):
            if run.code is None:
                continue
            run.thread.join()
            del self.runs[run_id]
            run.close()
            if run.sink.own_core:
                self._leave(OWN_CORE, run_id)
            elif run.code == 0:
                if not self.terms:  # while draining the server no longer reads reports
                    self._report(END, run_id)
            else:
                self._leave(FAILED, run_id)

    def _watch(self) -> None:
        now = time.monotonic()
        for run_id, run in self.runs.items():
            since = run.sink.busy_since
            if since is not None and now - since >= self.config.stuck_timeout:
                log.warning("run %s: its W&B call %s has not returned for %.0f s; this uploader host exits, its "
                            "other runs resume in a fresh one and run %s in a process of its own", run_id,
                            run.sink.busy_with, now - since, run_id)
                self._leave(STUCK, run_id)

    def _leave(self, word: str, run_id: str) -> None:
        """Report the run that makes this host exit, and exit now: its SDK state may be poisoned, and
        a stuck thread cannot be ended otherwise. The other runs' records stay in the spool."""
        self._report(word, run_id)
        logging.shutdown()
        os._exit(EXIT_RUN_FAILED)

    def _report(self, word: str, run_id: str) -> None:
        try:
            os.write(self.report_fd, ("%s %s\n" % (word, run_id)).encode("ascii"))
        except OSError:
            pass  # the server is gone: the lifeline ends this process


def host_main(name: str, mode: str, config_json: str, wake: Any, lifeline: Any, report: Any,
              core: str | None) -> None:
    """Entry point of an uploader host forked by the relay's fork server (relay/supervisor.py).
    `wake`, `lifeline` and `report` are pipe ends (multiprocessing Connections, used as fds); `core`
    is the shared wandb-core's token (None: the host starts a wandb-core of its own)."""
    _exit_with_relay(lifeline.fileno())
    gc.freeze()  # what the fork server imported (wandb, ...) stays out of this process's collections
    threading.current_thread().name = name
    config = RelayConfig.model_validate_json(config_json)
    os.nice(config.uploader_nice)  # uploads wait when the CPUs are busy; the server's intake does not
    # The log goes to stderr's descriptor through a file of its own, not through sys.stderr: while a
    # run's wandb.init runs, the SDK captures sys.stderr's writes for that run's Logs tab, and lines
    # about the host's other runs do not belong there.
    logging.basicConfig(level=getattr(logging, config.log_level), stream=os.fdopen(os.dup(2), "w", buffering=1),
                        format="%(asctime)s %(levelname)-7s %(name)s[%(threadName)s]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_core_dies_with_its_parent()  # a wandb-core the host starts dies with this (main) thread
    if not core:
        own = SharedCore()
        core = own.token if own.start() else None
    if core:
        os.environ["WANDB_SERVICE"] = core
    else:
        os.environ.pop("WANDB_SERVICE", None)  # no wandb-core: each run goes on in a process of its own
    host = UploaderHost(config, mode, wake.fileno(), report.fileno())
    signal.signal(signal.SIGTERM, host.on_term)
    signal.set_wakeup_fd(host.wakeup_fd)
    code = host.serve()
    logging.shutdown()
    os._exit(code)
