"""Nothing lost, nothing doubled: relay/trainer kills, W&B outages, restarts, disk pressure.

Real processes and signals, the real wandb SDK, the fake W&B backend; outcomes are exact counts.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from harness import mount_tmpfs
from relay.client import RelayClient
from relay.spool import Spool
from test_e2e import assert_history
from workload import frame, row

# W&B counts history rows 2 s after they arrive (the relay's bound in the tests: 3 s).
pytestmark = [pytest.mark.timeout(240), pytest.mark.wandb_lag(2.0)]


def complete(fake, run_id):
    return lambda: fake.complete(run_id)


def kill_and_restart_after(relay, uploaded: int) -> None:
    """SIGKILL the relay once `uploaded` records went to W&B, then start it on the same spool and
    endpoint (the trainer's client re-sends what was not acked)."""
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] - s["runs"][0]["unsent"] >= uploaded, 60,
                      "%d records handed to W&B" % uploaded)
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    relay.start()


def test_relay_sigkill_mid_upload_then_restart_delivers_exactly_once(fake_wandb, relay_factory, trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "kill9", "steps": 1500, "metrics": 10,
                               "seed": 11, "interval": 0.002})
    kill_and_restart_after(relay, 300)
    done = trainer.event("finished")
    assert done["report"]["delivered"] is True and done["stats"]["acked"] == 1502
    fake_wandb.wait_for(complete(fake_wandb, "kill9"), 120)
    assert_history(fake_wandb.run("kill9").history, seed=11, steps=1500, metrics=10)
    assert fake_wandb.run("kill9").exit_code == 0


def test_trainer_sigkill_run_is_finished_with_nonzero_exit_after_silence(fake_wandb, relay_factory, trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_SILENCE_TIMEOUT": "3"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "ghost", "steps": 100, "metrics": 5,
                               "seed": 12, "wait_stdin": True, "heartbeat_every": 0.5,
                               "flush_before_wait": True})
    trainer.event("logged")
    logged_at = time.time()
    # Alive but quiet: heartbeats alone keep the run open past the silence timeout.
    status = relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] == 101
                               and s["runs"][0]["last_seen"] > logged_at + 4, 30, "heartbeats past the timeout")
    assert not status["runs"][0]["finished"] and "ghost" not in [r for r, v in fake_wandb.runs().items() if v.complete]
    trainer.proc.kill()
    trainer.proc.wait()
    fake_wandb.wait_for(complete(fake_wandb, "ghost"), 60)
    run = fake_wandb.run("ghost")
    assert run.exit_code == 1
    assert_history(run.history, seed=12, steps=100, metrics=5)
    assert "no record or heartbeat from its trainer" in relay.log()


def test_quiet_trainer_hands_records_to_a_relay_that_came_back_without_another_call(fake_wandb, relay_factory,
                                                                                    trainer_factory):
    """Rows logged while no relay listened reach the relay once it is up although the trainer makes
    no further call (its client's heartbeat thread sends them), so killing the trainer then loses none."""
    relay = relay_factory(fake_wandb, ["--mode", "online"], start=False, env={"RELAY_SILENCE_TIMEOUT": "3"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "quiet", "steps": 50, "metrics": 5,
                               "seed": 21, "wait_stdin": True, "heartbeat_every": 0.5})
    trainer.event("logged")   # 50 rows handed to the client, no relay to take them; then it waits, quiet
    relay.start()
    relay.wait_status(lambda s: any(r["run_id"] == "quiet" and r["received"] == 51 for r in s["runs"]), 30,
                      "the quiet trainer's open and 50 rows")
    trainer.proc.kill()
    trainer.proc.wait()
    fake_wandb.wait_for(complete(fake_wandb, "quiet"), 60)
    run = fake_wandb.run("quiet")
    assert run.exit_code == 1  # killed: finished after the silence timeout
    assert_history(run.history, seed=21, steps=50, metrics=5)


def test_trainer_restarted_from_older_checkpoint_keeps_every_row(fake_wandb, relay_factory, trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    first = trainer_factory({"endpoint": relay.endpoint, "run_id": "again", "steps": 200, "metrics": 6, "seed": 13,
                             "exit_code": 1})
    assert first.event("finished")["report"]["delivered"] is True
    fake_wandb.wait_for(complete(fake_wandb, "again"), 60)
    second = trainer_factory({"endpoint": relay.endpoint, "run_id": "again", "steps": 200, "metrics": 6, "seed": 13,
                              "start_step": 100})   # frames go back to those of step 100
    assert second.event("finished")["report"]["delivered"] is True
    fake_wandb.wait_for(lambda: len(fake_wandb.run("again").history) == 400 and fake_wandb.run("again").exit_code == 0,
                        120)
    history = fake_wandb.run("again").history
    assert [r["_step"] for r in history] == list(range(400))
    assert [r["frame"] for r in history] == [frame(s) for s in range(200)] + [frame(s) for s in range(100, 300)]
    assert_history(history[:200], seed=13, steps=200, metrics=6)
    for index, got in enumerate(history[200:]):
        expected = row(13, 100 + index, 6)
        assert all(got[k] == v or (v != v and got[k] != got[k]) for k, v in expected.items())


@pytest.mark.parametrize("fault", ["hang", "503", "reset"])
def test_wandb_outage_mid_run_keeps_acking_and_drains_in_order(fault, fake_wandb, relay_factory, trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "mid" + fault, "steps": 300, "metrics": 8,
                               "seed": 14, "wait_stdin": True, "interval": 0.001})
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "uploading", 60, "the W&B run to start")
    fake_wandb.set_fault(fault)
    trainer.event("logged")
    trainer.go_on()
    done = trainer.event("finished", timeout=60)
    assert done["report"]["delivered"] is True and done["stats"]["acked"] == 302, "the relay must ack during outages"
    relay.wait_status(lambda s: s["wandb_down_since"], 60, "the relay to notice the outage")
    fake_wandb.set_fault("ok")
    fake_wandb.wait_for(complete(fake_wandb, "mid" + fault), 120)
    assert_history(fake_wandb.run("mid" + fault).history, seed=14, steps=300, metrics=8)
    relay.wait_status(lambda s: s["wandb_down_since"] is None, 30, "the relay to see W&B back")
    log = relay.log()
    assert log.count("W&B unreachable") == 1 and log.count("W&B reachable again") == 1


def test_when_one_run_gets_through_to_wandb_the_runs_retrying_retry_at_once(fake_wandb, relay_factory,
                                                                           trainer_factory):
    fake_wandb.set_fault("503")
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_BACKOFF_MAX": "120"})
    patient = trainer_factory({"endpoint": relay.endpoint, "run_id": "patient", "steps": 20, "metrics": 6,
                               "seed": 37})
    assert patient.event("finished")["report"]["delivered"] is True
    # Let its backoff grow (1, 2, 4, 8 s, with jitter) until its next try is at least 15 s away.
    deadline = time.monotonic() + 90
    while not any(float(wait) >= 15 for wait in re.findall(r"run patient: wandb.init failed .*; retry in ([\d.]+) s",
                                                              relay.log())):
        assert time.monotonic() < deadline, relay.log()
        relay.wait_log("run patient: wandb.init failed", 30, seen=relay.log().count("run patient: wandb.init failed"))
    fake_wandb.set_fault("ok")
    eager = trainer_factory({"endpoint": relay.endpoint, "run_id": "eager", "steps": 20, "metrics": 6, "seed": 38})
    assert eager.event("finished")["report"]["delivered"] is True
    relay.wait_status(lambda s: {r["run_id"]: r["state"] for r in s["runs"]}["eager"] in ("uploading", "finished"),
                      30, "the new run to get through to W&B")
    # The relay wakes the retrying run: it goes on within seconds, not at the end of its backoff.
    relay.wait_status(lambda s: {r["run_id"]: r["state"] for r in s["runs"]}["patient"] in ("uploading", "finished"),
                      10, "the retrying run to retry at once")
    for run_id, seed in (("patient", 37), ("eager", 38)):
        fake_wandb.wait_for(complete(fake_wandb, run_id), 60)
        assert_history(fake_wandb.run(run_id).history, seed=seed, steps=20, metrics=6)


def test_wandb_refusing_connections_at_start_then_listening_delivers(relay_factory, trainer_factory):
    from fakewandb import FakeWandb
    import socket

    with socket.socket() as probe:  # a port where nothing listens: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = FakeWandb()
    fake.base_url = "http://127.0.0.1:%d" % port
    relay = relay_factory(fake, ["--mode", "online"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "refused", "steps": 50, "metrics": 4,
                               "seed": 19})
    assert trainer.event("finished")["report"]["delivered"] is True
    status = relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "retrying", 60, "retrying")
    # The uploader asks W&B before wandb.init (so the shared wandb-core never holds a failed start).
    error = status["runs"][0]["last_error"]
    assert error.startswith("Unreachable: W&B at %s did not answer" % fake.base_url) and "refused" in error, error
    assert status["runs"][0]["pending"] == 52
    fake.start(port)
    try:
        fake.wait_for(complete(fake, "refused"), 120)
        assert_history(fake.run("refused").history, seed=19, steps=50, metrics=4)
    finally:
        fake.stop()


def test_first_sigterm_drains_with_deadline_second_exits_now_and_restart_delivers(fake_wandb, relay_factory,
                                                                                   trainer_factory):
    def open_run_then_hang(relay, run_id):
        """A run handed to W&B, then W&B hangs: the drain's finish() can only wait."""
        trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": run_id, "steps": 100, "metrics": 4,
                                   "seed": 15, "wait_stdin": True, "flush_before_wait": True})
        trainer.event("logged")
        relay.wait_status(lambda s: any(r["run_id"] == run_id and r["state"] == "uploading" and r["unsent"] == 0
                                        for r in s["runs"]), 60, "run %s handed to W&B" % run_id)
        fake_wandb.set_fault("hang")
        return trainer

    relay = relay_factory(fake_wandb, ["--mode", "online", "--drain-timeout", "3"])
    first = open_run_then_hang(relay, "drain")
    started = time.monotonic()
    assert relay.stop(signal.SIGTERM) == 0
    assert 3 <= time.monotonic() - started < 3 + 10
    assert "drain cut short" in relay.log()

    fake_wandb.set_fault("ok")
    relay.args = ["--mode", "online", "--drain-timeout", "60"]
    relay.start()
    second = open_run_then_hang(relay, "drain2")
    stops = relay.log().count("relay stopping")
    relay.proc.send_signal(signal.SIGTERM)
    relay.wait_log("relay stopping", 30, seen=stops)  # two signals at once would reach the handler as one
    relay.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert relay.proc.wait(timeout=30) == 1
    assert time.monotonic() - started < 10, "a second SIGTERM must not wait for the drain"

    fake_wandb.set_fault("ok")
    relay.start()
    for trainer in (first, second):
        trainer.go_on()
        assert trainer.event("finished")["report"]["delivered"] is True
    for run_id in ("drain", "drain2"):
        fake_wandb.wait_for(lambda: fake_wandb.run(run_id).exit_code == 0 and fake_wandb.complete(run_id), 120)
        assert_history(fake_wandb.run(run_id).history, seed=15, steps=100, metrics=4)


def test_client_overflow_spills_and_replay_delivers_every_record_once(fake_wandb, relay_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"], start=False)
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), max_pending=100,
                         provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="overflow")
    for step in range(1000):
        run.log(row(16, step, 4), frame=frame(step), epoch=step + 1)
    stats = client.statistics()  # the spill thread writes what overflows meanwhile; nothing is dropped
    assert stats["spilled"] + stats["spilling"] + stats["pending"] == stats["sent"] and stats["dropped"] == 0
    report = run.finish(timeout=0.5)
    client.close()
    files = client.spill_files
    reopens = len(files) - 1  # each overflow starts a new stream that names the run again; the last is finish's
    assert sorted(files) == files, "spill file names must sort in the order they were written"
    assert client.statistics()["spilled"] == 1002 + reopens
    relay.start()
    result = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", relay.spool_dir, *files],
                            capture_output=True, text=True, timeout=60, env=relay.env)
    assert result.returncode == 0, result.stderr
    assert "replayed %d files: %d new records" % (len(files), 1002 + reopens) in result.stdout
    fake_wandb.wait_for(complete(fake_wandb, "overflow"), 120)
    assert_history(fake_wandb.run("overflow").history, seed=16, steps=1000, metrics=4)
    assert report["delivered"] is False


def test_full_spool_holds_records_without_loss_until_room(fake_wandb, relay_factory, trainer_factory):
    fake_wandb.set_fault("hang")
    relay = relay_factory(fake_wandb, ["--mode", "online", "--init-timeout", "2"],
                          env={"RELAY_MAX_SPOOL_BYTES": "150000"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "full", "steps": 1500, "metrics": 10,
                               "seed": 17, "interval": 0.001, "finish_timeout": 120})
    status = relay.wait_status(lambda s: s["holding"], 60, "the spool to fill")
    held_at = status["runs"][0]["received"]
    assert 0 < held_at < 1502
    assert "spool full" in relay.log()
    fake_wandb.set_fault("ok")  # uploads confirm rows, the spool shrinks, records flow again
    done = trainer.event("finished", timeout=180)
    assert done["report"]["delivered"] is True and done["stats"]["dropped"] == 0
    fake_wandb.wait_for(complete(fake_wandb, "full"), 120)
    assert_history(fake_wandb.run("full").history, seed=17, steps=1500, metrics=10)
    # Each time the relay took records again it told the trainer, which re-sent at once rather than
    # after its backoff (up to 30 s): one `resend` per hold, each acted on (records were in flight).
    told = re.findall(r"taking records again: told (\d+) held clients to re-send", relay.log())
    assert told and all(count == "1" for count in told), told
    assert done["stats"]["resend_asked"] == len(told), (done["stats"], told)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs that the test can grow later: a real full disk, no mocks."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    unmount = mount_tmpfs(mount_point, "1m")
    yield mount_point
    unmount()


def test_full_disk_holds_records_without_loss_until_there_is_room(fake_wandb, relay_factory, trainer_factory,
                                                                  tiny_disk):
    fake_wandb.set_fault("hang")  # nothing leaves the spool while the disk fills
    # min_free_bytes 0: no reserve, so that the disk really fills and a commit fails (the reserve that
    # keeps a disk from filling is tested in test_disk.py).
    relay = relay_factory(fake_wandb, ["--mode", "online"], spool_dir=str(tiny_disk / "spool"),
                          env={"RELAY_MIN_FREE_BYTES": "0"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "disk", "steps": 4000, "metrics": 10,
                               "seed": 18, "interval": 0.0005, "finish_timeout": 120})
    # The log line, not status["spool_error"]: that clears at the next commit that fits, which can
    # be a millisecond later (SQLite reuses pages), between two status polls.
    # Either the room check finds the next batch would not fit, or a commit fails: both hold.
    relay.wait_log("holding", 60)
    line = next(line for line in relay.log().splitlines() if re.search(r"holding (new )?records", line))
    assert ("database or disk is full" in line or "No space" in line
            or "would leave less than min_free_bytes (0.0 MB)" in line), line
    assert relay.status()["counters"]["held"] > 0
    subprocess.run(["mount", "-o", "remount,size=256m", str(tiny_disk)], check=True)
    fake_wandb.set_fault("ok")
    done = trainer.event("finished", timeout=180)
    assert done["report"]["delivered"] is True and done["stats"]["dropped"] == 0
    fake_wandb.wait_for(complete(fake_wandb, "disk"), 120)
    assert_history(fake_wandb.run("disk").history, seed=18, steps=4000, metrics=10)


def test_corrupt_spool_is_set_aside_and_what_was_readable_recovered(tmp_path, relay_factory):
    spool_dir = tmp_path / "spool"
    spool = Spool(str(spool_dir))
    spool.load_watermarks()
    spool.ingest([({"v": 1, "t": "log", "stream": "s", "seq": n, "run": "r", "metrics": {"n": n}}, "")
                  for n in range(1, 2001)])
    spool.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    spool.close()
    path = spool_dir / Spool.FILENAME
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)   # one page of garbage in the middle
    path.write_bytes(bytes(data))
    relay = relay_factory(None, ["--mode", "disabled"], spool_dir=str(spool_dir))
    log = relay.log()
    assert "spool was damaged" in log and "set aside as" in log
    recovered = int(log.split("recovered ")[1].split(" ")[0])
    assert 0 < recovered < 2000
    status = relay.status()
    assert status["runs"][0]["received"] >= recovered


def test_offline_mode_relay_sigkill_loses_nothing_at_least_once(relay_factory, trainer_factory, tmp_path):
    """Offline runs cannot be asked what they hold, so the promise is weaker: at least once."""
    from fakewandb import FakeWandb
    from harness import wandb_env

    relay = relay_factory(None, ["--mode", "offline"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "offkill", "steps": 800, "metrics": 6,
                               "seed": 20, "interval": 0.002})
    kill_and_restart_after(relay, 200)
    assert trainer.event("finished")["report"]["delivered"] is True
    relay.wait_status(lambda s: s["runs"][0]["finished"] and s["runs"][0]["pending"] == 0, 60, "the run to finish")
    assert relay.stop() == 0
    directories = sorted(glob.glob(os.path.join(relay.spool_dir, "wandb", "offline-run-*-offkill")))
    assert len(directories) == 2, directories  # one per relay life
    epochs = []
    for directory in directories:  # each offline run synced to its own server, then counted
        fake = FakeWandb()
        fake.start()
        try:
            sync = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "sync", directory],
                                  env=wandb_env(fake, str(tmp_path / "home")), capture_output=True, text=True,
                                  timeout=120)
            assert sync.returncode == 0, sync.stdout + sync.stderr
            # `wandb sync` returns once it has uploaded; a run killed before its first flush holds nothing
            history = fake.run("offkill").history if "offkill" in fake.runs() else []
            for got in history:
                expected = row(20, got["epoch"] - 1, 6)
                assert all(got[k] == v or v != v for k, v in expected.items())
            epochs += [got["epoch"] for got in history]
        finally:
            fake.stop()
    assert set(epochs) == set(range(1, 801)), "lost: %s" % sorted(set(range(1, 801)) - set(epochs))[:10]


def test_sigterm_pauses_open_runs_as_preempted_and_the_next_relay_resumes_them(fake_wandb, relay_factory,
                                                                                trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "paused", "steps": 120, "metrics": 5,
                               "seed": 21, "wait_stdin": True, "flush_before_wait": True, "exit_code": 3})
    trainer.event("logged")
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] == 121 and s["runs"][0]["unsent"] == 0,
                      60, "every record handed to W&B")
    assert relay.stop(signal.SIGTERM) == 0
    assert "paused (relay stopping)" in relay.log()
    paused = fake_wandb.run("paused")
    assert paused.preempting and len(paused.history) == 120  # drained: every row already on the server
    relay.start()
    trainer.go_on()
    assert trainer.event("finished")["report"]["delivered"] is True
    fake_wandb.wait_for(lambda: fake_wandb.run("paused").exit_code == 3, 60)  # the trainer's own finish
    assert_history(fake_wandb.run("paused").history, seed=21, steps=120, metrics=5)
