"""The server's side of uploader hosts (relay/uploader_host.py): the hosts it started, which runs
each one serves, the pipes to them, and what they report, gathered once a scan by the supervisor
(relay/supervisor.py), which decides what happens to a run that ended.

A run is placed in a new host while fewer than `uploader_hosts` hosts live (0: the CPUs, at most
AUTO_HOSTS; a host's runs share one interpreter, so one host is held to about one core: spread over
a few, a drain of a handful of runs uses the cores as a process per run did), else in the least busy live host with room for it
(`runs_per_uploader`), else in a new one. A host left without runs exits (HOST_IDLE_EXIT). A run
stays in its host until the host reports that it ended, or the host exits.
"""
from __future__ import annotations

import logging
import multiprocessing.context
import multiprocessing.process
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from relay import uploader_host
from relay.config import RelayConfig
from relay.uploader_host import END, EXIT_RUN_FAILED, START

log = logging.getLogger("relay.server")

AUTO_HOSTS = 4  # `uploader_hosts: 0` spreads the first runs over this many hosts at most (the CPUs, if fewer)
MOVED = "moved"  # an Ended's `why` when its host exited for another reason than this run
HOST_DIED = "host-died"  # ... when its host exited unexplained (killed, crashed): `code` is the host's


@dataclass
class Ended:
    """A run no longer served by a host: `why` is the host's report (END, FAILED, OWN_CORE, STUCK),
    or MOVED / HOST_DIED; `code` reads as an uploader process's exit code would."""
    run_id: str
    code: int
    why: str
    failures: int  # failures of its uploaders so far, as the run was placed


@dataclass
class Host:
    """The server's handle on one uploader host process."""
    name: str
    process: multiprocessing.process.BaseProcess
    wake_fd: int          # write end of the host's wake pipe (lines <kind><run id>)
    lifeline_fd: int      # write end of a pipe never written to (as for uploader processes)
    report_fd: int        # read end of the host's report pipe (lines <word> <run id>)
    runs: dict[str, int] = field(default_factory=dict)  # run -> its failures so far
    partial: bytes = b""
    started: threading.Event = field(default_factory=threading.Event)  # set once start() returned or failed
    start_failed: bool = False

    unsent: dict[bytes, None] = field(default_factory=dict)  # lines its full pipe did not take yet, in order

    def tell(self, kind: bytes, run_id: str) -> None:
        """Send a line `<kind><run id>`, after what waits in `unsent`; what the pipe does not take
        (the host is busy, or still starting) waits there, each line once, for the next `flush`."""
        self.unsent[kind + run_id.encode("ascii") + b"\n"] = None
        self.flush()

    def flush(self) -> None:
        for line in list(self.unsent):
            try:
                os.write(self.wake_fd, line)  # < PIPE_BUF: whole or not at all
            except BlockingIOError:
                return  # full: the rest waits, in order
            except OSError:
                self.unsent.clear()  # the host is exiting: the server sees it gone and places its runs again
                return
            del self.unsent[line]

    def reports(self) -> list[tuple[str, str]]:
        """(word, run id) for every whole line the host reported since the last call."""
        data = b""
        while True:
            try:
                chunk = os.read(self.report_fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            data += chunk
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return [tuple(line.decode("ascii").split(" ", 1)) for line in lines if b" " in line]

    def alive(self) -> bool:
        """Starting (messages wait in its pipe) or running."""
        return not self.started.is_set() or (not self.start_failed and self.process.is_alive())

    def exitcode(self) -> int | None:
        if not self.started.is_set():
            return None
        return 1 if self.start_failed else self.process.exitcode

    def release(self) -> None:
        """After the process ended: close our end of its pipes."""
        for fd in (self.wake_fd, self.lifeline_fd, self.report_fd):
            os.close(fd)
        if not self.start_failed:
            self.process.close()


class HostPool:
    """The uploader hosts of a relay. `core` gives the shared wandb-core's token for a host that
    starts now (None: it starts a wandb-core of its own)."""

    def __init__(self, config: RelayConfig, mode: str, context: multiprocessing.context.BaseContext,
                 core: Callable[[], str | None]):
        self.config = config
        self.mode = mode
        self.context = context
        self.core = core
        self.hosts: list[Host] = []
        self.where: dict[str, Host] = {}  # run -> the host serving it
        self._started = 0

    def serving(self) -> int:
        """Runs served by a live host."""
        return sum(len(host.runs) for host in self.hosts if host.alive())

    def wake(self, run_id: str, news: bytes) -> bool:
        """Pass `news` (WAKE, RETRY_NOW) to the run in its host; False if no host has it (a host that
        exited still has it until `reap`, so that a run is never placed twice)."""
        host = self.where.get(run_id)
        if host is None:
            return False
        host.tell(news, run_id)  # a host that exited has no reader: the line goes nowhere (no waitpid per line)
        return True

    def place(self, run_id: str, failures: int) -> None:
        """Serve the run in a new host while fewer than `uploader_hosts` live, else in the least
        busy live host with room, else in a new host."""
        limit = self.config.runs_per_uploader
        spread = self.config.uploader_hosts or max(1, min(AUTO_HOSTS, os.cpu_count() or 1))
        live = [host for host in self.hosts if host.alive()]
        room = [host for host in live if len(host.runs) < limit]
        host = min(room, key=lambda h: len(h.runs)) if room and len(live) >= spread else self._start()
        host.runs[run_id] = failures
        self.where[run_id] = host
        host.tell(START, run_id)

    def _start(self) -> Host:
        """A new host, started on a thread of its own: a start waits for the fork server (its
        imports, at the relay's start), which the server's loop must not. What the server tells
        the host meanwhile waits in its wake pipe."""
        self._started += 1
        name = "relay-uploader-host-%d" % self._started
        # The write ends of wake and lifeline, and the read end of report, stay in this process
        # only (see Supervisor.ensure_uploader): they reach end of file when the other side dies.
        wake_reader, wake_writer = self.context.Pipe(duplex=False)
        life_reader, life_writer = self.context.Pipe(duplex=False)
        report_reader, report_writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=uploader_host.host_main, name=name, daemon=True,
            args=(name, self.mode, self.config.model_dump_json(), wake_reader, life_reader, report_writer,
                  self.core()))
        fds = [os.dup(end.fileno()) for end in (wake_writer, life_writer, report_reader)]
        for end in (wake_writer, life_writer, report_reader):
            end.close()
        os.set_blocking(fds[0], False)
        os.set_blocking(fds[2], False)
        host = Host(name, process, *fds)
        self.hosts.append(host)
        threading.Thread(target=self._run_start, args=(host, (wake_reader, life_reader, report_writer)),
                         name="relay-host-start", daemon=True).start()
        return host

    @staticmethod
    def _run_start(host: Host, child_ends: tuple) -> None:
        try:
            host.process.start()
            log.debug("uploader host %s started (pid %d)", host.name, host.process.pid)
        except Exception as exc:  # the fork server is gone: the host's runs back off, and are placed again
            host.start_failed = True
            log.error("cannot start uploader host %s: %s", host.name, exc)
        finally:
            for end in child_ends:
                end.close()
            host.started.set()

    def reap(self) -> list[Ended]:
        """The runs that hosts reported ended, and those of hosts that exited."""
        ended: list[Ended] = []
        for host in list(self.hosts):
            host.flush()
            code = host.exitcode()  # read before the reports: an exited host reported all it will
            for word, run_id in host.reports():
                if self.where.get(run_id) is host:
                    del self.where[run_id]
                failures = host.runs.pop(run_id, None)
                if failures is not None:
                    ended.append(Ended(run_id, 0 if word == END else 1, word, failures))
            if code is None:
                continue
            for run_id, failures in host.runs.items():
                if self.where.get(run_id) is host:
                    del self.where[run_id]
                ended.append(Ended(run_id, code, MOVED if code in (0, EXIT_RUN_FAILED) else HOST_DIED, failures))
            self.hosts.remove(host)
            host.release()
        return ended

    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        """The hosts' processes that run (after the starts under way)."""
        for host in self.hosts:
            host.started.wait(10.0)
        return [host.process for host in self.hosts if host.started.is_set() and host.alive()]
