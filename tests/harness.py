"""Real processes for tests and benchmarks: the relay as a subprocess, trainer processes."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from relay import testing
from relay.testing import free_tcp_port  # noqa: F401 (the tests' name for it)

if TYPE_CHECKING:
    from fakewandb import FakeWandb

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# Test-sized retry timing for every relay the suite starts (production defaults are minutes).
FAST_RETRIES = {"RELAY_BACKOFF_MAX": "1", "RELAY_REQUEST_TIMEOUT": "5", "RELAY_CONFIRM_EVERY": "1",
                "RELAY_INIT_TIMEOUT": "5", "RELAY_WANDB_COUNT_LAG": "3"}


def wandb_env(fake: "FakeWandb | None", home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env.update({"WANDB_SILENT": "true", "HOME": home, "WANDB_CONFIG_DIR": os.path.join(home, ".config", "wandb"),
                "WANDB_CACHE_DIR": os.path.join(home, ".cache", "wandb"), "PYTHONUNBUFFERED": "1",
                "WANDB_DATA_DIR": os.path.join(home, ".local", "share", "wandb")})
    if fake is not None:
        env.update(fake.env())
    return env


class RelayProcess(testing.RelayProcess):
    """`relay serve --log-level DEBUG` as a real subprocess (relay.testing); its log goes to a file
    the test can read afterwards."""

    log_level = "DEBUG"

    def __init__(self, endpoint: str, spool_dir: str, env: dict, args: list[str], log_path: str,
                 bind: str | None = None, client_keys: str | None = None, prefix: list[str] = ()):
        super().__init__(endpoint, spool_dir, args, env=env, log_path=log_path, bind=bind,
                         client_keys=client_keys, prefix=prefix, cwd=ROOT)

    def run_status(self, run_id: str) -> dict:
        runs = {run["run_id"]: run for run in self.status()["runs"]}
        assert run_id in runs, "relay knows no run %s: %s" % (run_id, list(runs))
        return runs[run_id]

    def wait_status(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            try:  # poll the relay's state every 0.2 s, returning early if the relay dies
                self.proc.wait(timeout=0.2)
                raise AssertionError("relay exited with %s:\n%s" % (self.proc.returncode, self.log()))
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError("timed out waiting for %s; last status %s\n%s" % (what, status, self.log()))

    def wait_log(self, text: str, timeout: float, seen: int = 0) -> None:
        """Wait until the relay has logged `text` more than `seen` times (the log file, which keeps
        earlier lives of the relay, is its only voice while it stops)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) <= seen:
            assert time.monotonic() < deadline, "relay did not log %r within %.0f s:\n%s" % (text, timeout, self.log())
            time.sleep(0.05)


class TrainerProcess:
    """tests/trainer.py as a real subprocess, run by `python` (this interpreter unless told)."""

    def __init__(self, args: dict, env: dict, prefix: list[str] = (), python: str = sys.executable,
                 cwd: str = ROOT):
        self.proc = subprocess.Popen([*prefix, python, os.path.join(TESTS, "trainer.py"), json.dumps(args)],
                                     env=env, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=cwd)

    def event(self, name: str, timeout: float = 120.0) -> dict:
        """Read the trainer's stdout until it reports `name` (a blocking read: a real signal)."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=timeout)
                raise AssertionError("trainer exited with %s before %r" % (self.proc.returncode, name))
            event = json.loads(line)
            if event["event"] == name:
                return event

    def go_on(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def process_tree(root_pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, executable name) of every process under root_pid (not root_pid itself)."""
    table = {}
    for pid in _pids():
        try:
            with open("/proc/%d/stat" % pid) as handle:
                stat = handle.read()
        except OSError:
            continue  # it ended while we looked
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        table[pid] = (int(stat[stat.rindex(")") + 2:].split()[1]), name)
    tree = {}
    for pid, (parent, name) in table.items():
        ancestor = parent
        while ancestor > 1 and ancestor != root_pid:
            ancestor = table.get(ancestor, (0, ""))[0]
        if ancestor == root_pid:
            tree[pid] = (parent, name)
    return tree


def wandb_cores(root_pid: int) -> dict[int, int]:
    """pid -> parent pid of every wandb-core process under root_pid."""
    return {pid: parent for pid, (parent, name) in process_tree(root_pid).items() if name == "wandb-core"}


def lock_holder(spool_dir: str, run_id: str) -> int:
    """The pid of the uploader that holds the run's lock file (what makes it that run's uploader)."""
    lock = os.path.realpath(os.path.join(spool_dir, "locks", run_id + ".lock"))
    for pid in _pids():
        try:
            if any(os.readlink("/proc/%d/fd/%s" % (pid, fd)) == lock for fd in os.listdir("/proc/%d/fd" % pid)):
                return pid
        except OSError:
            continue  # it ended while we looked, or is not ours to read
    raise AssertionError("no process holds %s" % lock)


def wait_gone(pid: int, timeout: float) -> None:
    """Wait until process `pid` has exited (its pidfd becomes readable), however it is parented."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        assert readable, "process %d still running after %.0f s" % (pid, timeout)
    finally:
        os.close(fd)


def mount_tmpfs(point, size: str):
    """Mount a fresh tmpfs of `size` (e.g. "24m") at the existing directory `point`: a real filesystem
    that really fills. Returns the function that unmounts it; skips the test when no tmpfs can be
    mounted here (it needs root)."""
    import pytest

    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): %s" % made.stderr.strip())
    return lambda: subprocess.run(["umount", "-l", str(point)], capture_output=True)
