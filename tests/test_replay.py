"""`relay replay` of a spill file that holds rows and a checkpoint, end to end.

A trainer process (tests/trainer.py) logs rows and a checkpoint with no relay anywhere, so that its
finish spills everything to a file. `relay replay` puts the file into a spool, reading the same
configuration `relay serve` reads (flags, RELAY_* variables, --config); then `relay serve` uploads the
spool through the real wandb SDK to the fake W&B backend.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from harness import ROOT, wandb_env
from test_e2e import assert_history
from workload import frame

pytestmark = pytest.mark.timeout(300)

STEPS, METRICS = 200, 12
RECORDS = STEPS + 3  # open, the rows, the checkpoint, finish


def spill_a_run(trainer_factory, short_dir: str, run_id: str, seed: int, checkpoint: str) -> str:
    """Run a trainer whose relay never comes; return the spill file its finish wrote."""
    trainer = trainer_factory({
        "endpoint": "ipc://%s/nobody.ipc" % short_dir, "run_id": run_id, "steps": STEPS, "metrics": METRICS,
        "seed": seed, "project": "tokenHSI", "finish_timeout": 1.0,
        "checkpoints": [{"path": checkpoint, "after_step": STEPS - 1, "aliases": ["latest", "best"],
                         "metadata": {"epoch": STEPS, "frame": frame(STEPS - 1)}}]})
    report = trainer.event("finished")["report"]
    assert trainer.proc.wait(timeout=30) == 0
    assert report["delivered"] is False and report["spilled"] == RECORDS, report
    return report["spill_file"]


def write_checkpoint(path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(200_000)
    path.write_bytes(payload)
    return payload


def relay_replay(args: list[str], home: str, env: dict | None = None) -> subprocess.CompletedProcess:
    replay_env = wandb_env(None, home)  # no RELAY_* variable but those given here
    replay_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "relay", "replay", *args], env=replay_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_replayed_rows_and_checkpoint_reach_wandb_once_with_the_relays_configuration(
        fake_wandb, relay_factory, trainer_factory, short_dir, tmp_path):
    root = tmp_path / "output"
    spool_dir = str(tmp_path / "spool")
    home = str(tmp_path / "home")
    runs = {"by-flag": 11, "by-variable": 12, "by-config": 13}  # run id -> workload seed
    payloads, spills = {}, {}
    for run_id, seed in runs.items():
        checkpoint = root / run_id / "nn" / "Humanoid.pth"
        payloads[run_id] = write_checkpoint(checkpoint)
        spills[run_id] = spill_a_run(trainer_factory, short_dir, run_id, seed, str(checkpoint))
    config = tmp_path / "relay.yaml"
    config.write_text("spool_dir: %s\nartifact_roots: [%s]\n" % (spool_dir, root))
    ways = {"by-flag": (["--spool-dir", spool_dir, "--artifact-root", str(root)], {}),
            "by-variable": ([], {"RELAY_SPOOL_DIR": spool_dir, "RELAY_ARTIFACT_ROOTS": str(root)}),
            "by-config": (["--config", str(config)], {})}
    for run_id, (args, env) in ways.items():
        first = relay_replay([*args, spills[run_id]], home, env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "%s: %d records new, 0 already delivered, 0 refused\n" % (spills[run_id], RECORDS) in first.stdout
        again = relay_replay([*args, spills[run_id]], home, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "%s: 0 records new, %d already delivered, 0 refused\n" % (spills[run_id], RECORDS) in again.stdout

    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)], spool_dir=spool_dir)
    fake_wandb.wait_for(lambda: all(fake_wandb.complete(run_id) for run_id in runs), 180)
    for run_id, seed in runs.items():
        run = fake_wandb.run(run_id)
        assert run.exit_code == 0
        assert_history(run.history, seed=seed, steps=STEPS, metrics=METRICS)
    artifacts = {artifact.run_id: artifact for artifact in fake_wandb.artifacts()}
    assert len(fake_wandb.artifacts()) == len(runs) and set(artifacts) == set(runs), fake_wandb.artifacts()
    for run_id, artifact in artifacts.items():
        assert artifact.type == "model" and list(artifact.files) == ["Humanoid.pth"]
        assert sha256(artifact.files["Humanoid.pth"]) == sha256(payloads[run_id])
        assert artifact.metadata == {"epoch": STEPS, "frame": frame(STEPS - 1)}
        assert {"latest", "best"} <= set(artifact.aliases)
    assert relay.stop() == 0


def test_replay_without_an_artifact_root_takes_nothing_from_a_file_with_a_checkpoint_and_says_how(
        fake_wandb, relay_factory, trainer_factory, short_dir, tmp_path):
    """Taking the rows and refusing the checkpoint would use up the checkpoint's record for good: a
    file holding checkpoints is not replayed at all without an artifact root, and the replay that
    follows the advice delivers everything, the checkpoint included."""
    root = tmp_path / "output"
    checkpoint = root / "nn" / "Humanoid.pth"
    payload = write_checkpoint(checkpoint)
    spill = spill_a_run(trainer_factory, short_dir, "rootless", 14, str(checkpoint))
    spool_dir = str(tmp_path / "spool")
    home = str(tmp_path / "home")
    replay = relay_replay(["--spool-dir", spool_dir, spill], home)
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert replay.stderr == ("%s: not replayed: it holds 1 checkpoints and no artifact root is configured; give "
                             "`relay replay` the relay's --artifact-root DIR (or RELAY_ARTIFACT_ROOTS=DIR, or "
                             "--config) and run it again\n" % spill), replay.stderr
    assert "replayed 1 files: 0 new records" in replay.stdout

    again = relay_replay(["--spool-dir", spool_dir, "--artifact-root", str(root), spill], home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "%s: %d records new, 0 already delivered, 0 refused\n" % (spill, RECORDS) in again.stdout

    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)], spool_dir=spool_dir)
    fake_wandb.wait_for(lambda: fake_wandb.complete("rootless"), 120)
    assert_history(fake_wandb.run("rootless").history, seed=14, steps=STEPS, metrics=METRICS)
    assert fake_wandb.run("rootless").exit_code == 0
    artifact, = fake_wandb.artifacts()
    assert sha256(artifact.files["Humanoid.pth"]) == sha256(payload)
    assert relay.stop() == 0
