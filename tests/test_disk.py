"""The spool's disk: full, filled by someone else, damaged. The relay stays up and says what it lost.

Real processes and signals, a real small filesystem (tmpfs: needs root, skipped otherwise), the real
wandb SDK against the fake W&B; outcomes are exact counts and values.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest

from test_e2e import assert_history

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` (e.g. "24m"): a real filesystem that really fills."""
    mounted = []

    def mount(size: str):
        point = tmp_path / ("disk%d" % len(mounted))
        point.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root): %s" % made.stderr.strip())
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(path) -> int:
    """Write `path` until its filesystem has no byte left; return how many bytes it took."""
    written = 0
    chunk = b"\0" * MIB
    with open(path, "wb", buffering=0) as handle:
        while chunk:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk = chunk[:len(chunk) // 2]
        os.fsync(handle.fileno())
    assert os.statvfs(os.path.dirname(path)).f_bavail == 0
    return written


def test_a_backlog_that_fills_the_disk_holds_and_drains_exactly_once_when_wandb_is_back(
        fake_wandb, relay_factory, trainer_factory, small_disk):
    """W&B answers 503 while a trainer logs more than the spool's disk can hold: the relay holds
    (stops acking) at min_free_bytes, stays up through the trainer's heartbeats, and once W&B is
    back the uploads empty the spool, intake resumes and every row arrives once."""
    disk = small_disk("24m")
    fake_wandb.set_fault("503")
    relay = relay_factory(fake_wandb, ["--mode", "online"], spool_dir=str(disk / "spool"),
                          env={"RELAY_MIN_FREE_BYTES": str(6 * MIB)})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "backlog", "steps": 8000, "metrics": 100,
                               "seed": 41, "heartbeat_every": 0.2, "finish_timeout": 240})
    status = relay.wait_status(lambda s: s["counters"].get("held", 0) > 0, 120, "the relay to hold")
    assert status["holding"] and "under min_free_bytes 6.3 MB" in status["hold_reason"], status
    held_at = status["runs"][0]["received"]
    assert 1000 < held_at < 8001, held_at
    statvfs = os.statvfs(disk)
    assert statvfs.f_bavail * statvfs.f_frsize > 5 * MIB, "the reserve must stay free"
    # Held, heartbeating, still answering: a few scans later nothing changed.
    relay.wait_status(lambda s: s["counters"].get("held", 0) > 0 and s["runs"][0]["received"] == held_at, 30,
                      "records held")
    fake_wandb.set_fault("ok")
    done = trainer.event("finished", timeout=280)
    assert done["report"]["delivered"] is True and done["stats"]["dropped"] == 0
    assert done["stats"]["acked"] == 8002 and done["stats"]["spilled"] == 0
    fake_wandb.wait_for(lambda: fake_wandb.complete("backlog"), 180)
    run = fake_wandb.run("backlog")
    assert run.exit_code == 0
    assert_history(run.history, seed=41, steps=8000, metrics=100)
    assert relay.log().count("spool has room again") >= 1
    assert relay.stop() == 0


def test_a_disk_filled_by_another_file_holds_without_stopping_the_relay_and_resumes_when_freed(
        fake_wandb, relay_factory, trainer_factory, small_disk):
    """Another file takes the last byte of the spool's disk: heartbeats cannot be noted, records
    cannot be stored; the relay holds and answers, comes up again on the full disk after a
    SIGKILL, and takes everything once the file is gone."""
    disk = small_disk("32m")
    relay = relay_factory(fake_wandb, ["--mode", "online"], spool_dir=str(disk / "spool"),
                          env={"RELAY_MIN_FREE_BYTES": str(4 * MIB)})
    before = trainer_factory({"endpoint": relay.endpoint, "run_id": "before", "steps": 100, "metrics": 10,
                              "seed": 42, "heartbeat_every": 0.2, "wait_stdin": True, "flush_before_wait": True})
    before.event("logged")
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] == 101, 60, "the first run spooled")
    fill(disk / "filler")
    relay.wait_log("cannot note heartbeats of", 30)
    relay.wait_status(lambda s: s["holding"] and "under min_free_bytes" in s["hold_reason"], 30, "holding")
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    relay.start()  # on the full disk
    after = trainer_factory({"endpoint": relay.endpoint, "run_id": "after", "steps": 50, "metrics": 10,
                             "seed": 43, "heartbeat_every": 0.2, "finish_timeout": 120})
    relay.wait_status(lambda s: s["holding"] and s["counters"].get("held", 0) > 0, 60, "the new run held")
    assert "after" not in {run["run_id"] for run in relay.status()["runs"]}
    os.unlink(disk / "filler")
    before.go_on()
    for trainer in (before, after):
        done = trainer.event("finished", timeout=120)
        assert done["report"]["delivered"] is True and done["stats"]["dropped"] == 0
    for run_id, seed, steps in (("before", 42, 100), ("after", 43, 50)):
        fake_wandb.wait_for(lambda: fake_wandb.complete(run_id), 120)
        assert fake_wandb.run(run_id).exit_code == 0
        assert_history(fake_wandb.run(run_id).history, seed=seed, steps=steps, metrics=10)
    assert "spool has room again" in relay.log()
    assert relay.stop() == 0
