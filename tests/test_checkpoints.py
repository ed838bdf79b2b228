"""A checkpoint is uploaded as it was when the relay took its record: the relay snapshots it then
(a hard link, or a copy when the checkpoint is on another filesystem than the spool), whatever the
trainer does to the file afterwards. Real relay subprocess, real wandb SDK, fake W&B, real files."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from harness import mount_tmpfs, wandb_env
from relay.client import RelayClient

pytestmark = pytest.mark.timeout(240)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(path, data: bytes) -> None:
    """Write a checkpoint the way rl_games' saves through our observer do: temp file, fsync, rename."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


@pytest.fixture
def checkpoint_dir(request, tmp_path):
    """Where the trainer saves: beside the spool (one filesystem: the relay links), or on a tmpfs
    this test mounts (another filesystem: the relay copies)."""
    root = tmp_path / "output"
    root.mkdir()
    if request.param == "copy":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs for the checkpoints needs root")
        request.addfinalizer(mount_tmpfs(root, "64m"))
        assert os.stat(root).st_dev != os.stat(tmp_path).st_dev
    (root / "nn").mkdir()
    return root


def snapshot_files(relay) -> list[str]:
    directory = os.path.join(relay.spool_dir, "snapshots")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.mark.parametrize("checkpoint_dir", ["link", "copy"], indirect=True)
def test_checkpoint_rewritten_then_deleted_during_outage_arrives_as_logged(fake_wandb, relay_factory, tmp_path,
                                                                          checkpoint_dir, request):
    path = checkpoint_dir / "nn" / "Humanoid.pth"
    first, second = os.urandom(3_000_000), os.urandom(2_000_000)
    fake_wandb.set_fault("503")
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(checkpoint_dir)])
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", name="rewrite", run_id="rewrite")
    save(path, first)
    run.log({"rewards/mean": 1.0}, frame=32_768, epoch=1)
    run.log_checkpoint(str(path), metadata={"epoch": 1, "frame": 32_768}, aliases=["epoch-1"])
    assert client.flush(30), "the relay did not ack the first checkpoint"
    save(path, second)                                       # TokenHSI's next save, same name
    run.log({"rewards/mean": 2.0}, frame=65_536, epoch=2)
    run.log_checkpoint(str(path), metadata={"epoch": 2, "frame": 65_536}, aliases=["latest"])
    assert client.flush(30), "the relay did not ack the second checkpoint"
    path.unlink()
    relay.wait_status(lambda s: s["wandb_down_since"], 60, "the relay to see W&B down")
    assert fake_wandb.artifacts() == []
    assert len(snapshot_files(relay)) == 2
    report = run.finish(exit_code=0, timeout=30)
    stats = client.statistics()
    client.close()
    assert report["delivered"] is True
    assert stats["errors"] == 0, stats["last_error"]

    fake_wandb.set_fault("ok")
    fake_wandb.wait_for(lambda: fake_wandb.complete("rewrite"), 120)
    artifacts = sorted(fake_wandb.artifacts(), key=lambda a: a.version)
    assert [(a.name, a.type, list(a.files), a.metadata, sha(a.files["Humanoid.pth"])) for a in artifacts] == [
        ("model-rewrite", "model", ["Humanoid.pth"], {"epoch": 1, "frame": 32_768}, sha(first)),
        ("model-rewrite", "model", ["Humanoid.pth"], {"epoch": 2, "frame": 65_536}, sha(second)),
    ]
    assert "epoch-1" in artifacts[0].aliases and "latest" in artifacts[1].aliases
    relay.wait_status(lambda s: s["runs"][0]["finished"] and snapshot_files(relay) == [], 30,
                      "the run finished and its snapshots deleted")
    log = relay.log()
    assert "ERROR" not in log, log
    copied = "copied checkpoint %s into the spool" % path
    assert log.count(copied) == (2 if request.node.callspec.params["checkpoint_dir"] == "copy" else 0), log
    assert relay.stop() == 0


@pytest.mark.parametrize("checkpoint_dir", ["link", "copy"], indirect=True)
def test_snapshot_is_deleted_once_wandb_commits_the_artifact(fake_wandb, relay_factory, tmp_path, checkpoint_dir):
    path = checkpoint_dir / "nn" / "Humanoid_00000050.pth"
    payload = os.urandom(1_000_000)
    save(path, payload)
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(checkpoint_dir)])
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="commit")
    fake_wandb.set_fault("hang", "upload")                  # the artifact's bytes wait: so does its snapshot
    run.log_checkpoint(str(path), metadata={"epoch": 50}, aliases=["latest"])
    assert client.flush(30)
    assert len(snapshot_files(relay)) == 1
    fake_wandb.set_fault("ok")
    fake_wandb.wait_for(lambda f: f.artifacts(), 120)
    assert sha(fake_wandb.artifacts()[0].files[path.name]) == sha(payload)
    # The run goes on (no finish): the snapshot goes once W&B has committed the artifact.
    relay.wait_status(lambda s: snapshot_files(relay) == [], 30, "the snapshot deleted")
    assert not fake_wandb.complete("commit")
    assert relay.run_status("commit")["finished"] is False
    assert run.finish(exit_code=0, timeout=30)["delivered"] is True
    client.close()
    fake_wandb.wait_for(lambda: fake_wandb.complete("commit"), 120)
    assert len(fake_wandb.artifacts()) == 1
    assert relay.stop() == 0


def test_checkpoint_missing_or_replaced_before_the_relay_took_it_is_refused_to_the_trainer(
        fake_wandb, relay_factory, tmp_path):
    root = tmp_path / "output"
    nn = root / "nn"
    nn.mkdir(parents=True)
    path = nn / "Humanoid.pth"
    gone = nn / "Humanoid_00000010.pth"
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)], start=False)
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="early")
    save(path, b"epoch 1" * 1000)
    run.log_checkpoint(str(path), metadata={"epoch": 1}, aliases=["epoch-1"])   # waits in the client
    save(path, b"epoch 2" * 1001)
    run.log_checkpoint(str(path), metadata={"epoch": 2}, aliases=["latest"])
    save(gone, b"deleted")
    gone.unlink()
    run.log_checkpoint(str(gone), metadata={"epoch": 10})
    relay.start()
    report = run.finish(exit_code=0, timeout=30)
    stats = client.statistics()
    client.close()
    assert report["delivered"] is True
    assert stats["errors"] == 2, stats
    refusals = [error for error in client.errors if "refused" in error]
    assert len(refusals) == 2, client.errors
    assert "checkpoint %s refused: it changed after it was logged (then 7000 bytes, now 7007" % path in refusals[0]
    assert "checkpoint %s refused: No such file or directory" % gone in refusals[1]
    assert stats["last_error"] == refusals[1]
    fake_wandb.wait_for(lambda: fake_wandb.complete("early"), 120)
    artifacts = fake_wandb.artifacts()
    assert [(a.metadata, a.files["Humanoid.pth"]) for a in artifacts] == [({"epoch": 2}, b"epoch 2" * 1001)]
    log = relay.log()
    assert "checkpoint %s refused: it changed after it was logged" % path in log
    assert "checkpoint %s refused: No such file or directory" % gone in log
    relay.wait_status(lambda s: s["runs"][0]["finished"] and snapshot_files(relay) == [], 30,
                      "the run finished and its snapshots deleted")
    assert relay.stop() == 0


def test_replayed_spill_file_snapshots_its_checkpoints_and_refuses_a_replaced_one(fake_wandb, relay_factory,
                                                                                 tmp_path):
    root = tmp_path / "output"
    (root / "nn").mkdir(parents=True)
    path = root / "nn" / "Humanoid.pth"
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)], start=False)
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="spilled")
    save(path, b"first" * 1000)
    run.log_checkpoint(str(path), metadata={"epoch": 1})
    save(path, b"second" * 1000)
    run.log_checkpoint(str(path), metadata={"epoch": 2}, aliases=["latest"])
    report = run.finish(exit_code=0, timeout=0.5)           # no relay: all of it goes to the spill file
    client.close()
    assert report["delivered"] is False
    relay.start()
    env = dict(wandb_env(fake_wandb, str(tmp_path / "home")), RELAY_ARTIFACT_ROOTS=str(root))
    replay = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", relay.spool_dir,
                             report["spill_file"]], env=env, capture_output=True, text=True, timeout=60)
    assert replay.returncode == 1, replay.stderr  # a record was refused; the others were taken
    assert "refused seq 2: checkpoint %s refused: it changed after it was logged" % path in replay.stderr
    assert "3 records new, 0 already delivered, 1 refused" in replay.stdout
    path.unlink()                                            # the snapshot taken by the replay is what uploads
    fake_wandb.wait_for(lambda: fake_wandb.complete("spilled"), 120)
    assert [(a.metadata, a.files["Humanoid.pth"]) for a in fake_wandb.artifacts()] == [
        ({"epoch": 2}, b"second" * 1000)]
    relay.wait_status(lambda s: s["runs"][0]["finished"] and snapshot_files(relay) == [], 30,
                      "the run finished and its snapshots deleted")
    assert relay.stop() == 0
