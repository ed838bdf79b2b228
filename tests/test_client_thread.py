"""The trainer's calls do no socket work: every ZeroMQ operation of the client happens on its I/O thread.

Each socket operation (connect, send, recv, poll) is noted with the thread that made it, while a
trainer logs with the relay absent, then present (a real `relay serve`), flushes and finishes. On
the test's own thread only what happens inside the client's calls counts (the test itself asks the
relay whether it is ready).

A process that forks while its spill thread is writing an overflow's file: the child's client
spills only its own records, the parent's file is written once, by the parent.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest
import zmq

from harness import ROOT
from relay.client import RelayClient
from workload import frame, row

pytestmark = pytest.mark.timeout(120)


class SocketCalls:
    """[(thread ident, operation)] for the operations on pyzmq sockets: every one made by another
    thread, and those made by this thread inside `with calls.client():`."""

    def __init__(self):
        self.calls = []
        self.test_thread = threading.get_ident()
        self.inside = False

    def note(self, name: str) -> None:
        ident = threading.get_ident()
        if ident != self.test_thread or self.inside:
            self.calls.append((ident, name))

    @contextlib.contextmanager
    def client(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


@pytest.fixture
def socket_calls(monkeypatch):
    noted = SocketCalls()
    sugar = zmq.sugar.socket.Socket
    for name in ("connect", "send", "recv", "poll"):
        original = getattr(sugar, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            noted.note(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(sugar, name, wrapper)
    return noted


def test_log_does_no_socket_work_on_the_trainers_thread(socket_calls, relay_factory, tmp_path):
    relay = relay_factory(None, ["--mode", "offline"], start=False)
    with socket_calls.client():
        client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), heartbeat_every=0.2)
        run = client.start_run(project="tokenHSI", run_id="thread1")
        for step in range(100):                      # no relay yet
            run.log(row(41, step, 10), frame=frame(step), epoch=step + 1)
        assert client.flush(0.3) is False
    relay.start()
    with socket_calls.client():
        for step in range(100, 300):                 # the relay takes the backlog meanwhile
            run.log(row(41, step, 10), frame=frame(step), epoch=step + 1)
        assert client.flush(30.0) is True
        stats = client.statistics()
        report = run.finish(timeout=30.0)
        client.close()
    assert report["delivered"] is True and stats["acked"] == 302   # open, meta (its provenance), 300 rows

    trainer = socket_calls.test_thread
    on_trainer = sorted({name for ident, name in socket_calls.calls if ident == trainer})
    assert on_trainer == [], "socket operations on the trainer's thread: %s" % on_trainer
    elsewhere = {name for ident, name in socket_calls.calls if ident != trainer}
    assert {"connect", "send", "recv"} <= elsewhere, elsewhere


FORK_DURING_A_SPILL = """
import json, os, sys, threading
import msgpack
from relay.client import RelayClient
parent, real, gate, inside = os.getpid(), os.fsync, threading.Event(), threading.Event()
def fsync(fd):  # the parent's spill thread stays inside its first fsync until the child is done
    if os.getpid() == parent and threading.current_thread().name == "relay-client-spill" and not gate.is_set():
        inside.set()
        gate.wait(30)
    real(fd)
os.fsync = fsync
def records(files):
    return [msgpack.unpackb(f, raw=False)["run"] for p in files for f in msgpack.Unpacker(open(p, "rb"), raw=False)]
client = RelayClient(sys.argv[1], spill_dir=sys.argv[2], max_pending=100, heartbeat_every=0, provenance=False,
                     system_metrics=0)
run = client.start_run(project="tokenHSI", run_id="forkspill")
for step in range(150):
    run.log({"step": step}, frame=step)
assert inside.wait(30), "the overflow's spill did not start"
child = os.fork()
if child == 0:
    own = client.start_run(project="tokenHSI", run_id="forkspill-child")
    for step in range(10):
        own.log({"step": step}, frame=step)
    client.close()
    print(json.dumps({"child": records(client.spill_files), "stats": client.statistics()}), flush=True)
    os._exit(0)
_, status = os.waitpid(child, 0)
gate.set()
client.close()
print(json.dumps({"parent": records(client.spill_files), "status": status, "stats": client.statistics()}), flush=True)
"""


def test_a_child_forked_during_an_overflow_spill_writes_only_its_own_records(short_dir, tmp_path):
    done = subprocess.run([sys.executable, "-c", FORK_DURING_A_SPILL, "ipc://%s/none.ipc" % short_dir,
                           str(tmp_path / "spill")], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    child, parent = [json.loads(line) for line in done.stdout.splitlines()]
    assert child["child"] == ["forkspill-child"] * 11 and parent["status"] == 0
    assert (child["stats"]["sent"], child["stats"]["spilled"], child["stats"]["lost"]) == (11, 11, 0)
    assert parent["parent"] == ["forkspill"] * 152           # the open, 150 rows, the second stream's open
    assert (parent["stats"]["sent"], parent["stats"]["spilled"], parent["stats"]["lost"]) == (152, 152, 0)
    assert len(parent["stats"]["spill_files"]) == 2 and len(child["stats"]["spill_files"]) == 1
