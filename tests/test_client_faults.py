"""Trainer-side faults: a trainer that forks, a client dropped without close(), overflow spills
while the relay is away (off the trainer's thread), a spill directory that fills, close() during a
spill in flight, the wall clock set back.

Real processes (a trainer that really forks, the relay as a subprocess, the real wandb SDK against
the fake W&B), a real filesystem that fills (a tmpfs, so root), an observation probe on os.fsync
(which thread made each durable write; it can also hold one, as a slow disk would), a real clock
set back (libfaketime); outcomes are exact counts and the records read back from the files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from harness import ROOT, TESTS, mount_tmpfs
from relay.client import RelayClient
from relay.spool import Spool
from test_e2e import assert_history
from workload import frame, row, same_value

pytestmark = pytest.mark.timeout(240)

# -- fork -------------------------------------------------------------------------------------

def test_forked_child_logs_as_a_stream_of_its_own_and_is_refused_the_parents_run(fake_wandb, relay_factory,
                                                                                  tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env["PYTHONPATH"] = ROOT
    args = {"endpoint": relay.endpoint, "spill_dir": str(tmp_path / "spill"), "run_id": "forked", "before": 10,
            "steps": 100, "metrics": 8, "seed": 31}
    done = subprocess.run([sys.executable, os.path.join(TESTS, "fork_trainer.py"), json.dumps(args)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    parent, child = result["parent"], result["child"]
    assert parent["child_exit"] == 0, done.stderr

    own = ("run forked belongs to process %d, and this process (pid %d) is a fork of it: a run has one writer. "
           "Start a run of this process's own with client.start_run(..., run_id=<another id>); its records are "
           "delivered as a stream of their own" % (parent["pid"], child["pid"]))
    start = ("run forked is open in the process this one (pid %d) was forked from, and a run has one writer: "
             "start a run with another run_id here" % child["pid"])
    assert child["refusals"] == [["ForkedRunError", own]] * 4 + [["ForkedRunError", start]]

    # Each process acked exactly its own records (open, rows, finish), nothing inherited, nothing spilled.
    assert child["report"]["delivered"] is True and parent["report"]["delivered"] is True
    for stats, records in ((child["stats"], 102), (parent["stats"], 112)):
        assert (stats["sent"], stats["acked"], stats["pending"], stats["spilled"], stats["lost"]) == (
            records, records, 0, 0, 0), stats
    counters = relay.status()["counters"]
    assert counters["received"] == 214, counters  # each stored once (re-sends under load are acked as duplicates)

    fake_wandb.wait_for(lambda: fake_wandb.complete("forked") and fake_wandb.complete("forked-child"), 120)
    assert_history(fake_wandb.run("forked").history, seed=31, steps=110, metrics=8)
    assert_history(fake_wandb.run("forked-child").history, seed=32, steps=100, metrics=8)
    assert fake_wandb.run("forked").exit_code == 0 and fake_wandb.run("forked-child").exit_code == 0
    assert relay.stop() == 0


FORK_WHILE_A_THREAD_HOLDS_THE_CLIENT = """
import json, os, sys, threading, time
from relay.client import RelayClient
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2], provenance=False, system_metrics=0)
run = client.start_run(project="tokenHSI", run_id="busy")
run.log({"a": 1.0}, frame=1)
waiting = threading.Thread(target=client.flush, args=(20.0,))  # no relay: holds the client for 20 s
waiting.start()
deadline = time.monotonic() + 10
while "<locked" not in repr(client._lock):  # until that thread is inside the client
    assert time.monotonic() < deadline, "flush did not start"
    time.sleep(0.001)
child = os.fork()
if child == 0:
    own = client.start_run(project="tokenHSI", run_id="busy-child")
    for step in range(10):
        own.log({"a": float(step)}, frame=step)
    stats = client.statistics()
    client.close()
    print(json.dumps({"stats": stats, "spill_files": client.spill_files}), flush=True)
    os._exit(0)
print(json.dumps({"child": child}), flush=True)
_, status = os.waitpid(child, 0)
print(json.dumps({"child_exit": status}), flush=True)
os._exit(0)
"""


def test_fork_while_another_thread_is_inside_the_client_leaves_the_child_a_working_client(short_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        done = subprocess.run([sys.executable, "-c", FORK_WHILE_A_THREAD_HOLDS_THE_CLIENT,
                               "ipc://%s/none.ipc" % short_dir, str(tmp_path / "spill")],
                              env=env, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        for line in output.splitlines():  # the stuck child outlives its parent: end it
            if "child" in json.loads(line):
                os.kill(json.loads(line)["child"], signal.SIGKILL)
        raise AssertionError("the forked child's first client call did not return: %r" % output)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    child = next(line for line in lines if "stats" in line)
    assert [line for line in lines if "child_exit" in line] == [{"child_exit": 0}]
    # its open and 10 rows, none of the parent's
    assert (child["stats"]["sent"], child["stats"]["pending"]) == (11, 11)
    [spill] = child["spill_files"]
    assert os.path.basename(spill).endswith("-1-11.msgpack")


DROPPED_IN_A_CYCLE = """
import gc, sys, time
from relay.client import RelayClient
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2], provenance=False, system_metrics=0)
run = client.start_run(project="tokenHSI", run_id="dropped")
run.log({"a": 1.0}, frame=1)
client.cycle = client  # an exception's traceback holding the trainer's frame makes such cycles too
del client, run
started = time.monotonic()
gc.collect()
print("%.3f" % (time.monotonic() - started))
"""


def test_client_dropped_without_close_in_a_reference_cycle_does_not_hang_the_garbage_collector(short_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", DROPPED_IN_A_CYCLE,
                               "ipc://%s/none.ipc" % short_dir, str(tmp_path / "spill")],
                              env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("gc.collect() of a client dropped without close() did not return within 30 s")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 5.0, done.stdout


# -- overflow spills off the trainer's thread; a spill directory that fills -----------------------

class Fsyncs:
    """An observation probe on os.fsync (every durable write ends with one): which thread made
    each. `hold()`: the next fsync on another thread waits until `release()` (a slow disk)."""

    def __init__(self, monkeypatch):
        self.trainer = threading.get_ident()
        self.threads: list[int] = []
        self.inside = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.released_at = 0.0
        real = os.fsync

        def fsync(fd):
            self.threads.append(threading.get_ident())
            if threading.get_ident() != self.trainer and not self.gate.is_set():
                self.inside.set()
                assert self.gate.wait(30), "the held fsync was never released"
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def on_trainer(self) -> int:
        return sum(1 for ident in self.threads if ident == self.trainer)

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.released_at = time.monotonic()
        self.gate.set()


def spilled_records(files: list[str]) -> list[dict]:
    """Every record in the spill files, file by file, in order."""
    records = []
    for path in files:
        with open(path, "rb") as handle:
            records.extend(msgpack.unpackb(frame, raw=False) for frame in msgpack.Unpacker(handle, raw=False))
    return records


def assert_rows(bodies: list[dict], seed: int, steps: list[int]) -> None:
    """The log records `bodies` are the rows of `steps`, in that order, values bit-exact."""
    assert [body["epoch"] - 1 for body in bodies] == steps
    for step, body in zip(steps, bodies):
        assert body["frame"] == frame(step)
        expected = row(seed, step, 4)
        assert body["metrics"].keys() == expected.keys()
        assert all(same_value(body["metrics"][name], value) for name, value in expected.items()), step


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.005)


def test_overflow_spills_off_the_trainers_thread_and_every_record_reaches_a_file_or_the_relay_once(
        monkeypatch, relay_factory, tmp_path):
    relay = relay_factory(None, ["--mode", "offline"], start=False)  # away while the trainer overflows
    fsyncs = Fsyncs(monkeypatch)
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), max_pending=100, heartbeat_every=0,
                         provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="offthread")
    for step in range(550):             # handed over at rows 99, 198, 297, 396 and 495: five files
        run.log(row(36, step, 4), frame=frame(step), epoch=step + 1)
        if step % 100 == 99:  # a trainer's pace: the batch handed over is written before the next
            wait_until(lambda: client.statistics()["spilling"] == 0, 30, "the spill thread")
    assert len(client.spill_files) == 5 and fsyncs.on_trainer() == 0, fsyncs.threads
    assert len(fsyncs.threads) == 10   # the file and its directory, for each of the five

    relay.start()  # the live stream (the open, rows 495..549) reaches the relay without another call
    relay.wait_status(lambda status: status["counters"].get("received") == 56, 30, "the live stream")
    for step in range(550, 600):
        run.log(row(36, step, 4), frame=frame(step), epoch=step + 1)
    assert client.flush(30.0) is True
    client.close()
    stats = client.statistics()
    assert (stats["sent"], stats["spilled"], stats["acked"], stats["dropped"], stats["lost"]) == (606, 500, 106, 0, 0)
    assert fsyncs.on_trainer() == 0
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL  # what it took stays in its spool, unconfirmed

    files = client.spill_files
    assert sorted(files) == files
    spilled = spilled_records(files)
    assert [r["t"] for r in spilled] == ["open"] + ["log"] * 99 + (["open"] + ["log"] * 99) * 4
    replay = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", relay.spool_dir, *files],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 5 files: 500 new records" in replay.stdout, replay.stdout
    spool = Spool(relay.spool_dir)
    records = spool.uploads.records("offthread", 0, 10000)
    spool.close()
    keys = [(r.body["stream"], r.body["seq"]) for r in records]
    assert len(keys) == len(set(keys)) == 606
    [live] = {r.body["stream"] for r in records} - {r["stream"] for r in spilled}  # the one the relay took
    assert_rows([r.body for r in records if r.kind == "log" and r.body["stream"] == live], 36, list(range(495, 600)))
    assert_rows([r for r in spilled if r["t"] == "log"], 36, list(range(495)))


@pytest.fixture
def tiny_spill_dir(tmp_path):
    """A 64 KiB tmpfs: a real disk that fills after a few spill files; `grow()` makes room."""
    mount_point = tmp_path / "spill"
    mount_point.mkdir()
    unmount = mount_tmpfs(mount_point, "64k")
    try:
        yield mount_point
    finally:
        unmount()


def test_a_spill_directory_that_fills_bounds_memory_and_counts_every_dropped_record(monkeypatch, tiny_spill_dir,
                                                                                   short_dir, caplog):
    directory = str(tiny_spill_dir)
    fsyncs = Fsyncs(monkeypatch)
    client = RelayClient("ipc://%s/no-relay.ipc" % short_dir, spill_dir=directory, max_pending=100,
                         max_buffered=300, provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="tiny")
    slowest, step = 0.0, 0
    with caplog.at_level(logging.WARNING, logger="relay.client"):
        while step < 3000 or client.statistics()["spill_failed"] == 0:
            started = time.monotonic()
            run.log(row(37, step, 4), frame=frame(step), epoch=step + 1)
            slowest = max(slowest, time.monotonic() - started)
            stats = client.statistics()
            assert stats["pending"] + stats["spilling"] <= 300, stats
            step += 1
            assert step < 100000, "the 64 KiB tmpfs never filled"
        full = "cannot write spill file in %s: [Errno 28] No space left on device (ENOSPC)" % directory
        assert any(error.startswith(full) for error in client.errors), client.errors
        stats = client.statistics()
        assert stats["dropped_full"] > 0 and stats["dropped"] == stats["dropped_full"]
        assert fsyncs.on_trainer() == 0 and slowest < 0.5, (fsyncs.on_trainer(), slowest)

        subprocess.run(["mount", "-o", "remount,size=8m", directory], check=True)  # room again
        while client.statistics()["spilling"] > 0 or client.statistics()["pending"] > 100:
            run.log(row(37, step, 4), frame=frame(step), epoch=step + 1)  # the attempt comes with records
            step += 1
            assert step < 200000, "the spill was not tried again"
        dropped = client.statistics()["dropped_full"]
        run.log(row(37, step, 4), frame=frame(step), epoch=step + 1)
        step += 1
        client.close()
    # Each stretch of drops is said when it starts and when it ends, with its count.
    said = [r.getMessage() for r in caplog.records]
    starts = [text for text in said if text.startswith("client buffer full: ")]
    ends = [int(re.match(r"client buffer has room again: (\d+) records were dropped while it was full \(policy "
                         r"drop_newest\); recording again$", text).group(1))
            for text in said if text.startswith("client buffer has room again")]
    assert starts and len(starts) == len(ends) and sum(ends) == dropped, said
    assert starts[-1] == (
        "client buffer full: 300 records held (max_buffered=300), not acked by the relay and not in a spill file yet "
        "(the last spill failed, or is still being written); dropping new records (policy drop_newest, counted in "
        "statistics()['dropped_full']), starting with a log record, until a spill to %s succeeds: start the relay, "
        "free space there, or point RELAY_SPILL_DIR or the client's spill_dir at a directory with room, or raise "
        "max_buffered" % directory)
    stats = client.statistics()
    assert (stats["pending"], stats["spilling"], stats["lost"], stats["dropped_full"]) == (0, 0, 0, dropped)
    assert sorted(os.listdir(directory)) == sorted(os.path.basename(path) for path in client.spill_files)

    # Every row logged is in a spill file exactly once, in order, or was counted as dropped.
    records = spilled_records(client.spill_files)
    assert stats["spilled"] == len(records) == stats["sent"]
    logged = [r["epoch"] - 1 for r in records if r["t"] == "log"]
    assert logged == sorted(set(logged)) and len(logged) + dropped == step
    assert_rows([r for r in records if r["t"] == "log"], 37, logged)


def test_close_during_an_overflow_spill_in_flight_waits_for_it_and_loses_nothing(monkeypatch, short_dir, tmp_path):
    fsyncs = Fsyncs(monkeypatch)
    client = RelayClient("ipc://%s/no-relay.ipc" % short_dir, spill_dir=str(tmp_path / "spill"), max_pending=100,
                         provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="inflight")
    fsyncs.hold()                        # the disk is slow: the overflow's spill stays in flight
    for step in range(150):
        run.log(row(38, step, 4), frame=frame(step), epoch=step + 1)
    assert fsyncs.inside.wait(30), "the overflow's spill did not start"
    assert client.statistics()["spilling"] == 100 and client.spill_files == []
    releaser = threading.Timer(0.3, fsyncs.release)  # the slow disk finishes while close() waits
    releaser.start()
    client.close()
    closed_at = time.monotonic()
    releaser.join()
    assert fsyncs.released_at and closed_at > fsyncs.released_at
    stats = client.statistics()
    assert (stats["sent"], stats["spilled"], stats["pending"], stats["spilling"], stats["lost"]) == (152, 152, 0, 0, 0)
    files = client.spill_files
    assert len(files) == 2 and sorted(files) == files
    records = spilled_records(files)
    assert [r["t"] for r in records] == ["open"] + ["log"] * 99 + ["open"] + ["log"] * 51
    assert_rows([r for r in records if r["t"] == "log"], 38, list(range(150)))
    assert fsyncs.trainer not in fsyncs.threads[:2]   # the overflow's file and directory: on the spill thread


# -- the wall clock set back ------------------------------------------------------------------

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"

CLOCK_SET_BACK = """
import json, select, sys, time
sys.path.insert(0, sys.argv[4])
from relay.client import RelayClient
from workload import frame, row
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2], max_pending=10, heartbeat_every=0,
                     provenance=False, system_metrics=0)
run = client.start_run(project="tokenHSI", run_id="clock")
for step in range(30):
    if step == 15:
        with open(sys.argv[3], "w") as handle:
            handle.write("-1d")  # the wall clock is set back a day (read again at every call)
    run.log(row(35, step, 4), frame=frame(step), epoch=step + 1)
    deadline = time.monotonic() + 30
    while client.statistics()["spilling"]:  # each overflow's file written before the next row
        assert time.monotonic() < deadline, "the spill thread did not write"
        select.select([], [], [], 0.001)  # (time.sleep fails under libfaketime)
run.finish(timeout=0.1)
client.close()
print(json.dumps(client.spill_files))
"""


def test_spill_files_sort_in_the_order_written_when_the_wall_clock_is_set_back(short_dir, tmp_path):
    if not os.path.exists(LIBFAKETIME):
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    clock = tmp_path / "faketime"
    clock.write_text("+0")
    spill = tmp_path / "spill"
    env = dict(os.environ, PYTHONPATH=ROOT, LD_PRELOAD=LIBFAKETIME, FAKETIME_TIMESTAMP_FILE=str(clock),
               FAKETIME_NO_CACHE="1", DONT_FAKE_MONOTONIC="1")
    done = subprocess.run([sys.executable, "-c", CLOCK_SET_BACK, "ipc://%s/none.ipc" % short_dir, str(spill),
                           str(clock), TESTS], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)
    assert len(files) == 4  # an overflow every 10 records, one of them after the clock went back; the finish
    assert sorted(files) == files, "spill file names must sort in the order they were written"
    # What the sort order is for: `relay replay DIR/*` keeps the run's rows in order.
    spool_dir = str(tmp_path / "spool")
    everything = sorted(os.path.join(spill, name) for name in os.listdir(spill))
    replay = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", spool_dir, *everything],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    spool = Spool(spool_dir)
    records = spool.uploads.records("clock", 0, 1000)
    spool.close()
    assert [r.body["epoch"] for r in records if r.kind == "log"] == list(range(1, 31))
