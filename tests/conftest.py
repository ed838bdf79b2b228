"""Shared fixtures: the fake W&B backend, the relay as a real subprocess, trainer processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from relay.cli import query_status

TESTS = os.path.dirname(os.path.abspath(__file__))
# Test-sized retry timing for every relay the suite starts (production defaults are minutes).
FAST_RETRIES = {"RELAY_BACKOFF_MAX": "1", "RELAY_REQUEST_TIMEOUT": "5", "RELAY_CONFIRM_EVERY": "1",
                "RELAY_INIT_TIMEOUT": "5"}
ROOT = os.path.dirname(TESTS)


@pytest.fixture
def fake_wandb():
    from fakewandb import FakeWandb

    fake = FakeWandb()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def short_dir():
    """A short directory for ipc:// endpoints (their paths are limited to ~100 characters)."""
    path = tempfile.mkdtemp(prefix="rly", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wandb_env(fake: "FakeWandb | None", home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env.update({"WANDB_SILENT": "true", "HOME": home, "WANDB_CONFIG_DIR": os.path.join(home, ".config", "wandb"),
                "WANDB_CACHE_DIR": os.path.join(home, ".cache", "wandb"), "PYTHONUNBUFFERED": "1",
                "WANDB_DATA_DIR": os.path.join(home, ".local", "share", "wandb")})
    if fake is not None:
        env.update(fake.env())
    return env


class RelayProcess:
    """`relay serve` as a real subprocess; its log goes to a file the test can read afterwards."""

    def __init__(self, endpoint: str, spool_dir: str, env: dict, args: list[str], log_path: str):
        self.endpoint = endpoint
        self.spool_dir = spool_dir
        self.env = env
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "RelayProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--bind", self.endpoint, "--spool-dir", self.spool_dir,
             "--log-level", "DEBUG", *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "relay exited with %s:\n%s" % (self.proc.returncode, self.log())
            status = query_status(self.endpoint, 1.0)  # waits on the socket, not a sleep
            if status:
                return status
        raise AssertionError("relay did not answer within %.0f s:\n%s" % (timeout, self.log()))

    def status(self) -> dict:
        status = query_status(self.endpoint, 10.0)
        assert status is not None, "relay did not answer a status request:\n" + self.log()
        return status

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("relay did not exit within %.0f s of signal %d:\n%s" % (timeout, sig, self.log()))

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""


@pytest.fixture
def relay_factory(tmp_path, short_dir):
    started: list[RelayProcess] = []
    home = str(tmp_path / "home")
    os.makedirs(home, exist_ok=True)

    def make(fake: "FakeWandb | None" = None, args: list[str] = (), spool_dir: str | None = None,
             name: str = "relay", start: bool = True, env: dict | None = None) -> RelayProcess:
        endpoint = "ipc://%s/%s.ipc" % (short_dir, name)
        relay_env = wandb_env(fake, home)
        relay_env.update(FAST_RETRIES)
        relay_env.update(env or {})
        relay = RelayProcess(endpoint, spool_dir or str(tmp_path / "spool"), relay_env, list(args),
                             str(tmp_path / ("%s.log" % name)))
        started.append(relay)
        return relay.start() if start else relay

    yield make
    for relay in started:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait()


class TrainerProcess:
    def __init__(self, args: dict, env: dict):
        self.proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "trainer.py"), json.dumps(args)],
                                     env=env, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=ROOT)

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


@pytest.fixture
def trainer_factory(tmp_path):
    started: list[TrainerProcess] = []

    def make(args: dict) -> TrainerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
        env["PYTHONPATH"] = ROOT
        args.setdefault("spill_dir", str(tmp_path / "spill"))
        trainer = TrainerProcess(args, env)
        started.append(trainer)
        return trainer

    yield make
    for trainer in started:
        if trainer.proc.poll() is None:
            trainer.proc.kill()
        trainer.proc.wait()
