"""The relay's uploaders: runs with work served by uploader hosts (relay/uploader_host.py: up to
`runs_per_uploader` runs a process, each in a thread; relay/hosts.py), or by an uploader process
of their own (relay/uploader.py: every run when `runs_per_uploader` is 1, and a run whose uploader
failed in a host), all forked by a fork server and restarted with backoff when one fails; the
wandb-core they share; and what the relay learns from them each scan (silent runs to finish, W&B
outages, backlog progress).

An uploader is woken through its wake pipe; its lifeline pipe is never written to, so its end of
file tells the uploader that the relay is gone. relay/uploader.py says what an uploader does.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from relay import uploader as uploader_module
from relay.config import RelayConfig
from relay.hosts import HOST_DIED, MOVED, Ended, HostPool
from relay.metrics import error_kind
from relay.progress import BacklogProgress
from relay.sinks.wandb import SDK_PRELOAD, SharedCore
from relay.spool import Spool
from relay.uploader_host import OWN_CORE, STUCK
from relay.watches import SilenceWatch

log = logging.getLogger("relay.server")

RESTART_BACKOFF_MAX = 60.0  # longest wait before restarting an uploader that failed
CORE_RESTART_EVERY = 60.0  # at most one new shared wandb-core a minute, should one keep dying


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
    context.set_forkserver_preload(["relay.uploader", "relay.uploader_host", *SDK_PRELOAD])
    return context


class Supervisor:
    """Uploaders (hosts and processes of their own) and the shared wandb-core, looked after once a
    scan (`scan`), and drained at the relay's stop (`drain`). `stopping` says whether the relay is
    stopping: then no uploader is started."""

    def __init__(self, config: RelayConfig, mode: str, spool: Spool, silence: SilenceWatch,
                 stopping: Callable[[], bool]):
        self.config = config
        self.mode = mode
        self.spool = spool
        self.silence = silence
        self.stopping = stopping
        self.uploaders: dict[str, Uploader] = {}
        self.restart_after: dict[str, tuple[float, int]] = {}  # run -> (not before, failures so far)
        self.wandb_down_since: float | None = None  # wall clock, shown in `relay status`
        self.wandb_down_monotonic = 0.0
        self.wandb_errors: Counter = Counter()  # W&B failures by kind (for metrics)
        self.retrying_runs: set[str] = set()
        self.wandb_checked_at = 0.0  # time.time() of the last watch_wandb
        self.progress = BacklogProgress(config.progress_backlog, config.progress_every)
        self.context = uploader_context()
        self.core = SharedCore()
        self.core_started_at = 0.0
        self.core_lost = False
        self.hosts = HostPool(config, mode, self.context, lambda: self.core.token)
        self.alone: dict[str, bool] = {}  # run -> own wandb-core: runs served by a process of their own

    def scan(self) -> None:
        """Reap and restart uploaders, watch the shared wandb-core, finish silent runs, start or
        wake the uploaders of runs with work, log W&B outages once, log backlog progress."""
        self.reap_uploaders()
        self.watch_core()
        self.finish_silent_runs()
        for run_id in self.spool.report.runs_with_work():
            self.ensure_uploader(run_id)
        self.watch_wandb()
        self.report_backlogs()

    def running(self) -> int:
        """Runs with a live uploader."""
        return sum(1 for uploader in list(self.uploaders.values()) if uploader.alive()) + self.hosts.serving()

    def ensure_uploader(self, run_id: str) -> None:
        uploader = self.uploaders.get(run_id)
        if uploader is not None and uploader.alive():
            uploader.wake()
            return
        if self.hosts.wake(run_id, uploader_module.WAKE):
            return
        not_before, failures = self.restart_after.get(run_id, (0.0, 0))
        if self.stopping() or time.monotonic() < not_before:
            return
        if self.config.runs_per_uploader > 1 and run_id not in self.alone:
            self.hosts.place(run_id, failures)
            return
        # The write ends stay in this process only: the fork server gets the read ends (to hand
        # them to the child) and nothing else of ours, so they reach end of file when we die.
        wake_reader, wake_writer = self.context.Pipe(duplex=False)
        life_reader, life_writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=uploader_module.child_main, name="relay-uploader-" + run_id, daemon=True,
            args=(run_id, self.mode, self.config.model_dump_json(), wake_reader, life_reader,
                  None if self.alone.get(run_id) else self.core.token))
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
        if self.core.start(nice=self.config.uploader_nice):
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
                self.alone.pop(run_id, None)
                continue
            self.back_off(run_id, uploader.failures, "exited with code %d" % code, "")
        for ended in self.hosts.reap():
            self.host_run_ended(ended)

    def host_run_ended(self, ended: Ended) -> None:
        """A run no longer served by its host: done, moved to a fresh host, or (its own failure)
        retried with backoff in an uploader process of its own."""
        run_id = ended.run_id
        if ended.why == MOVED:
            if ended.code:
                log.info("run %s: its uploader host was replaced; it resumes in a fresh one", run_id)
        elif ended.why == HOST_DIED:
            self.back_off(run_id, ended.failures, "exited with code %d (its uploader host)" % ended.code, "")
        elif ended.code == 0:
            self.restart_after.pop(run_id, None)
        else:
            self.alone[run_id] = ended.why == OWN_CORE
            what = {STUCK: "was stuck in a W&B call", OWN_CORE: "needs a wandb-core of its own"}.get(
                ended.why, "exited with code 1")
            self.back_off(run_id, ended.failures, what, " in an uploader process of its own")

    def back_off(self, run_id: str, failures: int, what: str, where: str) -> None:
        failures += 1
        self.wandb_errors["uploader_exit"] += 1
        delay = min(RESTART_BACKOFF_MAX, 2.0 ** failures)
        self.restart_after[run_id] = (time.monotonic() + delay, failures)
        log.warning("uploader for run %s %s; restarting it%s in %.0f s (records are kept)",
                    run_id, what, where, delay)

    def finish_silent_runs(self) -> None:
        """Runs whose trainers were not heard from for silence_timeout are finished in W&B."""
        silent = self.silence.silent(time.monotonic())
        if not silent:
            return
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

    def watch_wandb(self) -> None:
        """One log line when W&B becomes unreachable, one when it is back (not one per retry). When
        an online run gets through to W&B, the runs still retrying retry at once rather than at the
        end of their backoff (up to backoff_max: a minute by default)."""
        now = time.time()  # compared with the state_since that uploaders store (wall clock)
        retrying = self.spool.report.runs_in_state("retrying")
        if retrying and self.spool.report.reached_wandb_since(self.wandb_checked_at):
            for run_id, _ in retrying:
                if run_id in self.uploaders:
                    self.uploaders[run_id].wake(uploader_module.RETRY_NOW)
                else:
                    self.hosts.wake(run_id, uploader_module.RETRY_NOW)
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
        for line in self.progress.update(time.monotonic(), self.spool.report.pending_counts()):
            log.info(line)

    def drain(self, cut: Callable[[], bool]) -> bool:
        """SIGTERM every uploader (each uploads what is spooled and closes its W&B run), wait for
        them until drain_timeout or until `cut()` says stop now, kill what is left (its records
        are in the spool; the next start resumes the run), stop the shared wandb-core. Returns
        whether every uploader ended by itself."""
        deadline = time.monotonic() + self.config.drain_timeout
        processes = [u.process for u in self.uploaders.values() if u.alive()] + self.hosts.processes()
        log.info("relay stopping: draining %d runs for at most %.0f s", self.running(), self.config.drain_timeout)
        for process in processes:
            process.terminate()
        for process in processes:
            while process.is_alive() and not cut() and time.monotonic() < deadline:
                process.join(0.1)
        clean = not any(process.is_alive() for process in processes)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        self.core.stop()
        return clean
