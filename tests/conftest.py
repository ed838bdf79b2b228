"""Shared fixtures: the fake W&B backend, the relay as a real subprocess, trainer processes, and the
extra interpreters of tests/venvs.py."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

import pytest

from harness import FAST_RETRIES, ROOT, RelayProcess, TrainerProcess, wandb_env  # noqa: F401 (re-exported)
from venvs import base_python, py38_python, rlg114_python  # noqa: F401 (fixtures)

if TYPE_CHECKING:
    from fakewandb import FakeWandb


def pytest_configure(config):
    config.addinivalue_line("markers", "wandb_lag(seconds): the fake W&B counts history lines this long after "
                            "they arrive (as W&B does); at the end, the test fails if any line was written over")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the logs of the relays it started (their last 20,000
    characters each): a failure that happens once in many runs is read from CI's output."""
    report = (yield).get_result()
    make = getattr(item, "funcargs", {}).get("relay_factory")
    if report.when == "call" and report.failed and make is not None:
        for relay in make.started:
            report.sections.append(("relay log " + relay.log_path, relay.log()[-20000:]))


@pytest.fixture
def fake_wandb(request):
    """The fake W&B backend; with the wandb_lag marker, one whose counts lag, and which must end
    the test without a history row written over another."""
    from fakewandb import FakeWandb

    marker = request.node.get_closest_marker("wandb_lag")
    fake = FakeWandb(lag=marker.args[0] if marker else 0.0)
    fake.start()
    yield fake
    fake.stop()
    if marker:
        assert fake.overwrites() == 0, "history rows written over others:\n" + fake.describe()


@pytest.fixture
def short_dir():
    """A short directory for ipc:// endpoints (their paths are limited to ~100 characters)."""
    path = tempfile.mkdtemp(prefix="rly", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def relay_factory(tmp_path, short_dir):
    started: list[RelayProcess] = []
    home = str(tmp_path / "home")
    os.makedirs(home, exist_ok=True)

    def make(fake: "FakeWandb | None" = None, args: list[str] = (), spool_dir: str | None = None,
             name: str = "relay", start: bool = True, env: dict | None = None, endpoint: str | None = None,
             bind: str | None = None, client_keys: str | None = None, prefix: list[str] = ()) -> RelayProcess:
        endpoint = endpoint or "ipc://%s/%s.ipc" % (short_dir, name)
        relay_env = wandb_env(fake, home)
        relay_env.update(FAST_RETRIES)
        relay_env.update(env or {})
        relay = RelayProcess(endpoint, spool_dir or str(tmp_path / "spool"), relay_env, list(args),
                             str(tmp_path / ("%s.log" % name)), bind=bind, client_keys=client_keys, prefix=prefix)
        started.append(relay)
        return relay.start() if start else relay

    make.started = started
    yield make
    for relay in started:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait()


@pytest.fixture
def trainer_factory(tmp_path):
    started: list[TrainerProcess] = []

    def make(args: dict, env: dict | None = None, prefix: list[str] = (),
             python: str = sys.executable, cwd: str = ROOT) -> TrainerProcess:
        trainer_env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
        trainer_env["PYTHONPATH"] = ROOT
        trainer_env.update(env or {})
        args.setdefault("spill_dir", str(tmp_path / "spill"))
        trainer = TrainerProcess(args, trainer_env, prefix, python, cwd)
        started.append(trainer)
        return trainer

    yield make
    for trainer in started:
        if trainer.proc.poll() is None:
            trainer.proc.kill()
        trainer.proc.wait()
