"""`relay serve` as a subprocess, for `relay demo`, the test suite and the benchmarks.

    relay = RelayProcess(free_endpoint(), spool_dir, ["--mode", "offline"]).start()  # waits until it answers
    relay.status()      # its status reply (relay.status.query_status)
    relay.stop()        # SIGTERM, then its exit code

Readiness is a status reply, never a sleep: `wait_ready` asks the relay (each ask waits on the
socket) until it answers, and says at once when the process has exited instead.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, List, Optional, Sequence

from relay.status import query_status


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the relay binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp:// endpoint on a free port of `host`."""
    return "tcp://%s:%d" % (host, free_tcp_port(host))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Ask `predicate` (which itself waits, on a socket) until it returns something truthy; that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
    raise TimeoutError("timed out after %.0f s waiting for %s" % (timeout, what))


class RelayProcess:
    """`relay serve --bind BIND --spool-dir SPOOL ARGS...` run by this interpreter.

    `endpoint`: where clients and status requests connect; `bind`: what the relay listens on
    (default: `endpoint`). `log_path`: a file its stdout and stderr are appended to (default: this
    process's). `client_keys`: a client key directory, for a relay started with --curve. `prefix`:
    a command to run it under (e.g. `ip netns exec NAME`)."""

    log_level = None  # type: Optional[str]  (passed as --log-level before `args` when set)

    def __init__(self, endpoint: str, spool_dir: str, args: Sequence[str] = (), env: Optional[dict] = None,
                 log_path: Optional[str] = None, bind: Optional[str] = None, client_keys: Optional[str] = None,
                 prefix: Sequence[str] = (), cwd: Optional[str] = None):
        self.endpoint = endpoint
        self.bind = bind or endpoint
        self.spool_dir = spool_dir
        self.args = list(args)
        self.env = env
        self.log_path = log_path
        self.client_keys = client_keys
        self.prefix = list(prefix)
        self.cwd = cwd
        self.proc = None  # type: Optional[subprocess.Popen]

    def command(self) -> List[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        return [*self.prefix, sys.executable, "-m", "relay", "serve", "--bind", self.bind, "--spool-dir",
                self.spool_dir, *level, *self.args]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, wait: bool = True) -> "RelayProcess":
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT if log else None)
        finally:
            if log:
                log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """The relay's first status reply; RuntimeError if it exits first, TimeoutError if it does
        not answer within `timeout` (both with its log, when it goes to a file)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("relay exited with code %s%s" % (self.proc.returncode, self._log_tail()))
            status = query_status(self.endpoint, 1.0, self.client_keys)  # waits on the socket, not a sleep
            if status:
                return status
        raise TimeoutError("relay did not answer within %.0f s%s" % (timeout, self._log_tail()))

    def status(self, timeout: float = 10.0) -> dict:
        status = query_status(self.endpoint, timeout, self.client_keys)
        if status is None:
            raise TimeoutError("relay did not answer a status request%s" % self._log_tail())
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0, must_exit: bool = True) -> int:
        """Send `sig` and wait up to `timeout` for the exit code. A relay still running then is
        killed; with `must_exit` that raises TimeoutError, else its (negative) code is returned."""
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            if must_exit:
                raise TimeoutError("relay did not exit within %.0f s of signal %d%s"
                                   % (timeout, sig, self._log_tail())) from None
            return self.proc.returncode

    def log(self) -> str:
        """What the relay wrote to `log_path` ('' without one)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def _log_tail(self) -> str:
        log = self.log()
        return ":\n" + log if log else ""
