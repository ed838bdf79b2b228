"""Wire compatibility across versions: this client with the previous relay, the previous client
with this relay. "The previous" is the package at git rev OLD, extracted with `git archive` and run
from there (its own `relay serve`, its own client), against the fake W&B."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from harness import FAST_RETRIES, ROOT, RelayProcess, wandb_env
from test_e2e import assert_history

pytestmark = pytest.mark.timeout(240)

OLD = "2c5fe0e"  # the last version before the console, meta, system and media records


@pytest.fixture(scope="module")
def old_package(tmp_path_factory) -> str:
    """The package (and its test trainer) as it was at OLD, in a directory of its own."""
    archive = subprocess.run(["git", "archive", OLD, "relay", "tests/trainer.py", "tests/workload.py"], cwd=ROOT,
                             capture_output=True, timeout=60)
    assert archive.returncode == 0, "git archive %s failed (the tests need the git checkout): %s" % (
        OLD, archive.stderr.decode())
    directory = str(tmp_path_factory.mktemp("relay-" + OLD))
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(directory)
    return directory


def python_env(pythonpath: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_", "PYTHON"))}
    env["PYTHONPATH"] = pythonpath
    return env


def test_an_older_relay_takes_the_rows_refuses_the_console_and_the_client_says_to_upgrade(
        old_package, fake_wandb, tmp_path, short_dir):
    home = str(tmp_path / "home")
    env = wandb_env(fake_wandb, home)
    env.update(FAST_RETRIES, PYTHONPATH=old_package)
    relay = RelayProcess("ipc://%s/old.ipc" % short_dir, str(tmp_path / "spool"), env, ["--mode", "online"],
                         str(tmp_path / "old-relay.log"))
    relay.cwd = old_package  # `python -m relay` imports the package of its working directory
    relay.start()
    try:
        args = {"endpoint": relay.endpoint, "run_id": "newclient", "lines": 2, "spill_dir": str(tmp_path / "spill"),
                "report": str(tmp_path / "report.json")}
        trainer = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "console_trainer.py"), json.dumps(args)],
                                 env=python_env(ROOT), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert trainer.returncode == 0, trainer.stderr
        with open(args["report"]) as handle:
            report = json.load(handle)
        assert report["finish"]["delivered"] is True and report["finish"]["spill_file"] is None
        assert report["finish"]["errors"] == 1  # the console record; the open, the row and the finish were acked
        assert report["errors"] == [
            "the relay at %s is older than this client and does not take 'console' records (the trainer's console "
            "output); they are not sent to it (record seq=3 refused: unknown message kind 'console'): upgrade the "
            "relay (pip install -U 'tokenhsi-relay[server]' where it runs, then restart `relay serve`)"
            % relay.endpoint]
        assert "older than this client" in trainer.stderr  # the warning, on the trainer's terminal
        fake_wandb.wait_for(lambda: fake_wandb.complete("newclient"), 90)
        run = fake_wandb.run("newclient")
        assert [row["loss"] for row in run.history] == [0.5] and run.exit_code == 0 and run.console == []
    finally:
        relay.stop()


def test_the_previous_client_is_taken_and_uploaded_unchanged(old_package, fake_wandb, relay_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    args = {"endpoint": relay.endpoint, "run_id": "oldclient", "steps": 50, "metrics": 6, "seed": 14,
            "spill_dir": str(tmp_path / "spill"), "config": {"lr": 0.001}}
    trainer = subprocess.run([sys.executable, os.path.join(old_package, "tests", "trainer.py"), json.dumps(args)],
                             env=python_env(old_package), cwd=old_package, capture_output=True, text=True, timeout=120)
    assert trainer.returncode == 0, trainer.stderr
    done = json.loads(trainer.stdout.splitlines()[-1])
    assert done["report"]["delivered"] is True and done["stats"]["acked"] == 52 and done["stats"]["errors"] == 0
    fake_wandb.wait_for(lambda: fake_wandb.complete("oldclient"), 90)
    run = fake_wandb.run("oldclient")
    assert_history(run.history, seed=14, steps=50, metrics=6)
    assert run.config["lr"] == 0.001 and run.exit_code == 0 and run.console == []
