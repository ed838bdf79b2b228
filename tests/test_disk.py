"""The spool's disk: full, filled by someone else, damaged. The relay stays up and says what it lost.

Real processes and signals, a real small filesystem (tmpfs: needs root, skipped otherwise), the real
wandb SDK against the fake W&B; outcomes are exact counts and values.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sqlite3
import struct

import pytest

from harness import mount_tmpfs
from relay.room import MAX_HELD_CLIENTS, HeldClients
from test_e2e import assert_history
from workload import frame, row, same_value

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` (e.g. "24m"): a real filesystem that really fills."""
    unmounts = []

    def mount(size: str):
        point = tmp_path / ("disk%d" % len(unmounts))
        point.mkdir()
        unmounts.append(mount_tmpfs(point, size))
        return point

    yield mount
    for unmount in unmounts:
        unmount()


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
                          env={"RELAY_MIN_FREE_BYTES": str(8 * MIB), "RELAY_BATCH_MAX": "100",
                               # the reserve must hold what one confirmation deletes (see README)
                               "RELAY_MAX_UNCONFIRMED_ROWS": "1000"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "backlog", "steps": 8000, "metrics": 100,
                               "seed": 41, "heartbeat_every": 0.2, "finish_timeout": 240})
    status = relay.wait_status(lambda s: s["counters"].get("held", 0) > 0, 120, "the relay to hold")
    assert status["holding"] and "would leave less than min_free_bytes (8.4 MB)" in status["hold_reason"], status
    held_at = status["runs"][0]["received"]
    assert 1000 < held_at < 8001, held_at
    statvfs = os.statvfs(disk)
    assert statvfs.f_bavail * statvfs.f_frsize > 7 * MIB, "the reserve must stay free"
    # Held, heartbeating, still answering: a few scans later nothing changed.
    relay.wait_status(lambda s: s["counters"].get("held", 0) > 0 and s["runs"][0]["received"] == held_at, 30,
                      "records held")
    fake_wandb.set_fault("ok")
    done = trainer.event("finished", timeout=280)
    assert done["report"]["delivered"] is True and done["stats"]["dropped"] == 0, (done, relay.log()[-6000:])
    assert done["stats"]["acked"] == 8002 and done["stats"]["spilled"] == 0
    fake_wandb.wait_for(lambda: fake_wandb.complete("backlog"), 180)
    run = fake_wandb.run("backlog")
    assert run.exit_code == 0
    assert_history(run.history, seed=41, steps=8000, metrics=100)
    assert relay.log().count("spool has room again") >= 1
    # held long enough for the trainer's backoff to grow, it was told to re-send once there was room
    assert "taking records again: told 1 held clients to re-send" in relay.log()
    assert done["stats"]["resend_asked"] >= 1, done["stats"]
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
    relay.wait_status(lambda s: s["holding"] and "would leave less than min_free_bytes" in s["hold_reason"], 30, "holding")
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
        # the relay's word, not W&B's "complete": an uploader that finds its run's stream left open in
        # the shared wandb-core by one that died on the full disk closes it (W&B shows the run
        # finished for a moment) and resumes the run
        relay.wait_status(lambda s: any(r["run_id"] == run_id and r["finished"] for r in s["runs"]), 120,
                          "run %s finished" % run_id)
        assert fake_wandb.run(run_id).exit_code == 0
        assert_history(fake_wandb.run(run_id).history, seed=seed, steps=steps, metrics=10)
    assert "spool has room again" in relay.log()
    assert relay.stop() == 0


def test_held_clients_are_told_to_resend_once_each_up_to_the_bound(caplog):
    """Past MAX_HELD_CLIENTS the others are not noted (they wait for their backoff); a telling
    forgets everyone, skips the clients whose records are being taken, and counts only the
    replies ZeroMQ took."""
    sent = []
    held = HeldClients(lambda identity, message: sent.append((identity, message)) or identity != b"gone")
    for number in range(MAX_HELD_CLIENTS + 5):
        held.note(b"c%d" % number)
        held.note(b"c0")
    held.note(b"gone")
    assert len(held) == MAX_HELD_CLIENTS and held.past_bound
    with caplog.at_level(logging.INFO, "relay.server"):
        held.tell(skip=frozenset({b"c1"}))
    assert sorted(identity for identity, _ in sent) == sorted(b"c%d" % n for n in range(MAX_HELD_CLIENTS) if n != 1)
    assert all(message == {"t": "resend"} for _, message in sent)
    assert caplog.messages == ["taking records again: told %d held clients to re-send (more were held: they re-send "
                               "after their backoff)" % (MAX_HELD_CLIENTS - 1)]
    sent.clear()
    held.tell()
    assert sent == [] and len(held) == 0 and not held.past_bound and len(caplog.messages) == 1
    held.note(b"gone")
    with caplog.at_level(logging.INFO, "relay.server"):
        held.tell()
    assert sent == [(b"gone", {"t": "resend"})] and len(caplog.messages) == 1   # not told: not said


# -- a damaged spool -----------------------------------------------------------------------------------

STEPS, METRICS = 3000, 10


def assert_rows_except(history: list[dict], seed: int, missing: set[int]) -> None:
    """W&B holds the workload's rows of every step not in `missing`, once, in order, bit-exact
    (W&B's own step counts the rows it got)."""
    steps = [step for step in range(STEPS) if step not in missing]
    assert len(history) == len(steps), "expected %d rows, W&B holds %d" % (len(steps), len(history))
    for index, (got, step) in enumerate(zip(history, steps)):
        assert got["_step"] == index and got["frame"] == frame(step) and got["epoch"] == step + 1, (index, step)
        for name, value in row(seed, step, METRICS).items():
            assert same_value(got[name], value), "step %d %s: sent %r, W&B has %r" % (step, name, value, got[name])


def acked_then_killed(fake_wandb, relay_factory, trainer_factory, run_id: str, seed: int):
    """A trainer logs STEPS rows, all acked, while W&B answers 503 (nothing leaves the spool); then the
    relay is SIGKILLed: the acked records sit in the spool's WAL. The trainer waits to finish."""
    fake_wandb.set_fault("503")
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": run_id, "steps": STEPS, "metrics": METRICS,
                               "seed": seed, "wait_stdin": True, "flush_before_wait": True})
    trainer.event("logged")
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] == STEPS + 1, 60, "every record acked")
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    wal = os.path.join(relay.spool_dir, "spool.sqlite-wal")
    with open(os.path.join(relay.spool_dir, "spool.sqlite-shm"), "rb") as shm:
        assert struct.unpack("=I", shm.read(100)[96:100])[0] == 0, "a checkpoint moved records out of the WAL"
    return relay, trainer, wal


def finish_and_fetch(fake_wandb, relay, trainer, run_id: str):
    fake_wandb.set_fault("ok")
    relay.start()
    trainer.go_on()
    done = trainer.event("finished", timeout=120)
    assert done["report"]["delivered"] is True and done["stats"]["dropped"] == 0
    fake_wandb.wait_for(lambda: fake_wandb.complete(run_id), 120)
    return fake_wandb.run(run_id)


def test_a_wal_cut_in_half_is_reported_at_start_and_the_lost_seqs_are_named_when_the_trainer_resends(
        fake_wandb, relay_factory, trainer_factory):
    relay, trainer, wal = acked_then_killed(fake_wandb, relay_factory, trainer_factory, "cut", 61)
    with open(wal, "r+b") as handle:
        handle.truncate(os.path.getsize(wal) // 2)
    run = finish_and_fetch(fake_wandb, relay, trainer, "cut")
    log = relay.log()
    start = re.findall(r"spool WAL \S+ is damaged: the file holds (\d+) frames but its index recorded (\d+) committed "
                       r"ones \(its end was cut off\); the transactions in frames (\d+)\.\.(\d+) were committed "
                       r"\(their records acked\) and cannot be replayed: their records are lost", log)
    assert len(start) == 1, log
    lost = re.findall(r"run cut: (\d+) records of stream \S+ \(seq=(\d+)\.\.(\d+)\) were acked but are not in the "
                      r"spool, and the trainer no longer holds them: lost", log)
    assert len(lost) == 1, log
    count, first, last = map(int, lost[0])
    assert last == STEPS + 1 and count == last - first + 1 and 500 < count < STEPS  # seq 1 opened the run
    assert run.exit_code == 0 and run.summary["relay/records_lost"] == count
    assert_rows_except(run.history, 61, set(range(first - 2, STEPS)))


def wal_frames(path: str):
    """(offset of the page, page number, page bytes) of every frame of a WAL."""
    with open(path, "rb") as handle:
        data = handle.read()
    page_size = struct.unpack(">I", data[8:12])[0]
    for start in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        yield start + 24, struct.unpack(">I", data[start:start + 4])[0], data[start + 24:start + 24 + page_size]


def test_eight_bytes_changed_in_the_wal_are_found_and_only_the_record_they_hit_is_set_aside(
        fake_wandb, relay_factory, trainer_factory):
    relay, trainer, wal = acked_then_killed(fake_wandb, relay_factory, trainer_factory, "flip", 62)
    frames = list(wal_frames(wal))
    last_of = {page: index for index, (_, page, _) in enumerate(frames)}
    # A records leaf page (type 13) in the middle of the WAL that no later frame replaces; change 8
    # bytes of the first cell written there (cells fill a page from its end): inside a record body.
    index = next(i for i in range(len(frames) // 2, len(frames))
                 if frames[i][2][0] == 13 and last_of[frames[i][1]] == i and frames[i][1] > 4)
    offset = frames[index][0] + len(frames[index][2]) - 120
    with open(wal, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(byte ^ 0xFF for byte in frames[index][2][-120:-112]))
    run = finish_and_fetch(fake_wandb, relay, trainer, "flip")
    log = relay.log()
    assert len(re.findall(r"spool WAL \S+ is damaged: frame %d of %d fails its checksum; the checksums of frames "
                          r"%d\.\.\d+ were rewritten so that these \d+ committed frames are replayed"
                          % (index + 1, len(frames), index + 1), log)) == 1, log
    aside = re.findall(r"run flip: record seq=(\d+) of stream \S+ \(log\) cannot be read: its checksum does not match",
                       log)
    assert len(aside) == 1, log
    assert run.exit_code == 0 and run.summary["relay/records_set_aside"] == 1
    assert "relay/records_lost" not in run.summary and "were acked but are not in the spool" not in log
    assert_rows_except(run.history, 62, {int(aside[0]) - 2})


def test_an_unreadable_record_is_set_aside_and_the_run_goes_on(fake_wandb, relay_factory, trainer_factory):
    relay, trainer, _ = acked_then_killed(fake_wandb, relay_factory, trainer_factory, "unread", 63)
    spool = sqlite3.connect(os.path.join(relay.spool_dir, "spool.sqlite"))
    with spool:  # the first byte of one record's body becomes 0xc1, which msgpack never uses
        assert spool.execute("UPDATE records SET body = CAST(x'c1' || substr(body, 2) AS BLOB) WHERE run_id = 'unread' "
                             "AND seq = 1500").rowcount == 1
    spool.close()
    run = finish_and_fetch(fake_wandb, relay, trainer, "unread")
    log = relay.log()
    assert len(re.findall(r"run unread: record seq=1500 of stream \S+ \(log\) cannot be read: its checksum does not "
                          r"match \(the bytes changed on disk\); set aside in the quarantine table", log)) == 1, log
    assert "uploader for run unread exited" not in log
    assert run.exit_code == 0 and run.summary["relay/records_set_aside"] == 1
    assert_rows_except(run.history, 63, {1498})
    quarantined = sqlite3.connect(os.path.join(relay.spool_dir, "spool.sqlite")).execute(
        "SELECT seq, kind FROM quarantine").fetchall()
    assert quarantined == [(1500, "log")]
