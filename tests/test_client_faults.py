"""Trainer-side faults: a trainer that forks, a client dropped without close(), a spill directory
on a full disk, the wall clock set back.

Real processes (a trainer that really forks, the relay as a subprocess, the real wandb SDK against
the fake W&B), a real full filesystem (a tmpfs, so root), the kernel's own count of the files made
(inotify), a real clock set back (libfaketime); outcomes are exact counts.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import struct
import subprocess
import sys

import pytest

from harness import ROOT, TESTS, mount_tmpfs
from relay.client import RelayClient
from relay.spool import Spool
from test_e2e import assert_history
from workload import frame, row, same_value

pytestmark = pytest.mark.timeout(240)

SPILL_FIX = "free space there, or point RELAY_SPILL_DIR or the client's spill_dir at a directory with room"


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
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2])
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
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2])
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


# -- a full spill directory -------------------------------------------------------------------

IN_CREATE, IN_Q_OVERFLOW = 0x100, 0x4000


class Creations:
    """The names of the files made in a directory, as the kernel saw them (inotify IN_CREATE)."""

    def __init__(self, directory: str):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert libc.inotify_add_watch(self.fd, directory.encode(), IN_CREATE) >= 0, os.strerror(ctypes.get_errno())
        self.names: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return list(self.names)
            offset = 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                assert not mask & IN_Q_OVERFLOW, "more files were made than inotify could queue"
                self.names.append(data[offset + 16:offset + 16 + length].rstrip(b"\0").decode())
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def full_spill_dir(tmp_path):
    """A 256 KiB tmpfs filled to the last block by `filler`: a real full disk, no mocks."""
    mount_point = tmp_path / "spill"
    mount_point.mkdir()
    unmount = mount_tmpfs(mount_point, "256k")
    try:
        fd = os.open(str(mount_point / "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc
        finally:
            os.close(fd)
        yield mount_point
    finally:
        unmount()


def test_full_spill_dir_is_tried_once_per_overflow_leaves_no_file_and_counts_what_is_lost(full_spill_dir,
                                                                                         short_dir, caplog):
    directory = str(full_spill_dir)
    creations = Creations(directory)
    endpoint = "ipc://%s/no-relay.ipc" % short_dir  # nothing listens: every record stays pending
    client = RelayClient(endpoint, spill_dir=directory, max_pending=100)
    run = client.start_run(project="tokenHSI", run_id="fullspill")
    for step in range(1000):
        run.log(row(33, step, 4), frame=frame(step), epoch=step + 1)
    # 1,001 records (the open and 1,000 rows): overflows at 100, 200, ... 1,000 records sent, one
    # spill attempt each, every one refused by the full disk; the records stay pending.
    assert len(creations.read()) == 10, "spill attempts: %d" % len(creations.read())
    assert os.listdir(directory) == ["filler"], "a failed spill left files behind"
    stats = client.statistics()
    assert (stats["sent"], stats["pending"], stats["spill_failed"], stats["spilled"], stats["lost"]) == (
        1001, 1001, 10, 0, 0), stats
    full = "cannot write spill file in %s: [Errno 28] No space left on device (ENOSPC)" % directory
    assert stats["last_error"] == "%s; 1000 records kept in memory (%s)" % (full, SPILL_FIX)

    report = run.finish(timeout=0.2)  # no relay: finish tries to spill (attempt 11)
    assert (report["delivered"], report["spill_file"]) == (False, None)
    with caplog.at_level(logging.WARNING, logger="relay.client"):
        assert client.close() is None  # and close once more (attempt 12): then they are lost
    lost = ("1002 records lost at close: the relay at %s had not acked them and they could not be spilled: %s (%s)"
            % (endpoint, full, SPILL_FIX))
    assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == [lost]
    stats = client.statistics()
    assert (stats["sent"], stats["pending"], stats["spill_failed"], stats["spilled"], stats["lost"]) == (
        1002, 0, 12, 0, 1002), stats
    assert stats["last_error"] == lost and stats["spill_files"] == []

    created = creations.read()
    creations.close()
    assert len(created) == 12 and all(name.startswith(".spill-") for name in created), created
    assert os.listdir(directory) == ["filler"], "a failed spill left files behind"


def test_spill_after_space_is_freed_holds_every_record_and_relay_replay_delivers_them(full_spill_dir, short_dir,
                                                                                      tmp_path):
    directory = str(full_spill_dir)
    creations = Creations(directory)
    client = RelayClient("ipc://%s/no-relay.ipc" % short_dir, spill_dir=directory, max_pending=100)
    run = client.start_run(project="tokenHSI", run_id="freed")
    for step in range(150):
        run.log(row(34, step, 4), frame=frame(step), epoch=step + 1)
    stats = client.statistics()
    assert (stats["pending"], stats["spill_failed"], stats["spilled"]) == (151, 1, 0), stats
    os.unlink(os.path.join(directory, "filler"))
    # The next attempt comes with the next overflow, 100 records after the failed one: at 200
    # records it writes all 200 (the open and rows 0..198), and the run goes on in a new stream.
    for step in range(150, 250):
        run.log(row(34, step, 4), frame=frame(step), epoch=step + 1)
    stats = client.statistics()
    assert (stats["pending"], stats["spill_failed"], stats["spilled"]) == (52, 1, 200), stats
    report = run.finish(timeout=0.2)  # no relay: the new stream's open, rows 199..249 and the finish
    client.close()
    files = client.spill_files
    assert report["spill_file"] == files[1] and len(files) == 2
    stats = client.statistics()
    assert (stats["pending"], stats["spill_failed"], stats["spilled"], stats["lost"]) == (0, 1, 253, 0), stats
    assert sorted(os.listdir(directory)) == sorted(os.path.basename(path) for path in files)
    assert len(creations.read()) == 3  # the failed attempt's temp file and one per spill file
    creations.close()

    spool_dir = str(tmp_path / "spool")
    replay = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", spool_dir, *files], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 2 files: 253 new records" in replay.stdout, replay.stdout
    spool = Spool(spool_dir)
    records = spool.uploads.records("freed", 0, 1000)
    spool.close()
    assert [r.kind for r in records] == ["open"] + ["log"] * 199 + ["open"] + ["log"] * 51 + ["finish"]
    logs = [r.body for r in records if r.kind == "log"]
    for step, body in enumerate(logs):
        assert body["frame"] == frame(step) and body["epoch"] == step + 1
        expected = row(34, step, 4)
        assert body["metrics"].keys() == expected.keys()
        assert all(same_value(body["metrics"][name], value) for name, value in expected.items()), step


# -- the wall clock set back ------------------------------------------------------------------

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"

CLOCK_SET_BACK = """
import json, sys
sys.path.insert(0, sys.argv[4])
from relay.client import RelayClient
from workload import frame, row
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2], max_pending=10, heartbeat_every=0)
run = client.start_run(project="tokenHSI", run_id="clock")
for step in range(30):
    if step == 15:
        with open(sys.argv[3], "w") as handle:
            handle.write("-1d")  # the wall clock is set back a day (read again at every call)
    run.log(row(35, step, 4), frame=frame(step), epoch=step + 1)
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
