"""The trainer's calls do no socket work: every ZeroMQ operation of the client happens on its I/O thread.

Each socket operation (connect, send, recv, poll) is noted with the thread that made it, while a
trainer logs with the relay absent, then present (a real `relay serve`), flushes and finishes. On
the test's own thread only what happens inside the client's calls counts (the test itself asks the
relay whether it is ready).
"""
from __future__ import annotations

import contextlib
import threading

import pytest
import zmq

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
