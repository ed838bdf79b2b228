"""RelayClient with values on an accelerator: one batched copy per row, rows kept in order.

No GPU here: a stand-in value claims to live on "cuda" and relay.tensors.start_transfer is
replaced by a stand-in transfer whose copy lands when the test says so. The real CUDA path of
relay.tensors is tested in test_rl_games.py (on a machine with a GPU) and measured by
bench/gpu_overhead.py.
"""
from __future__ import annotations

import msgpack
import pytest

from relay import client as client_module
from relay.client import MAX_DEFERRED, RelayClient


class Device:
    type = "cuda"


class OnDevice:
    """A 0-d tensor on a GPU, as far as the client can tell; reading it one by one is an error here."""
    device = Device()
    ndim = 0

    def __init__(self, value: float):
        self.value = value

    def item(self):
        raise AssertionError("a device value was read with .item() (a GPU sync per value)")


class FakeTransfer:
    def __init__(self, row: dict):
        self.row = row
        self.landed = False
        self.waited = False
        self.skipped = [name for name, value in row.items() if not isinstance(value, (OnDevice, int, float, str))]

    def ready(self) -> bool:
        return self.landed

    def values(self) -> dict:
        self.waited = not self.landed
        return {name: value.value if isinstance(value, OnDevice) else value for name, value in self.row.items()}


@pytest.fixture
def transfers(monkeypatch):
    started = []

    def start_transfer(row):
        started.append(FakeTransfer(row))
        return started[-1]

    monkeypatch.setattr(client_module.tensors, "start_transfer", start_transfer)
    return started


@pytest.fixture
def client(tmp_path, short_dir):
    # Nothing listens at this endpoint: records stay in the pending buffer, where the test reads them.
    made = RelayClient("ipc://%s/nobody.ipc" % short_dir, spill_dir=str(tmp_path / "spill"), heartbeat_every=0,
                       provenance=False, system_metrics=0)
    yield made
    made._outbox.pending.clear()
    made._outbox.deferred.clear()
    made.close()


def pending_messages(client: RelayClient) -> list[dict]:
    return [msgpack.unpackb(frame, raw=False) for frame in client._outbox.pending.values()]


def test_row_with_device_values_waits_for_its_copy_and_keeps_its_place(client, transfers):
    run = client.start_run(project="p", run_id="r1")
    run.log({"loss": OnDevice(0.5), "lr": 3e-4}, frame=1)
    run.log({"plain": 1.0}, frame=2)                    # behind the waiting row, not before it
    assert [m["t"] for m in pending_messages(client)] == ["open"]
    assert client.statistics()["pending"] == 3
    run.log({"loss": OnDevice(0.25)}, frame=3)
    assert len(transfers) == 2, "each row with device values starts its own copy at once"
    transfers[0].landed = True
    run.summary({"best": 1.0})                          # any later call lets the landed rows go
    messages = pending_messages(client)
    assert [(m["t"], m.get("frame")) for m in messages] == [("open", None), ("log", 1), ("log", 2)]
    assert messages[1]["metrics"] == {"loss": 0.5, "lr": 3e-4}
    assert [m["seq"] for m in messages] == [1, 2, 3]
    assert not transfers[0].waited


def test_flush_and_finish_wait_for_the_copies(client, transfers):
    run = client.start_run(project="p", run_id="r2")
    run.log({"loss": OnDevice(1.5)}, frame=1)
    report = run.finish(timeout=0.05)                   # no relay: spilled, but in order and complete
    assert transfers[0].waited
    assert report["spill_file"]
    with open(report["spill_file"], "rb") as handle:
        frames = [msgpack.unpackb(frame, raw=False) for frame in msgpack.Unpacker(handle, raw=False)]
    assert [m["t"] for m in frames] == ["open", "log", "finish"]
    assert frames[1]["metrics"] == {"loss": 1.5}


def test_at_most_max_deferred_rows_wait(client, transfers):
    run = client.start_run(project="p", run_id="r3")
    for step in range(MAX_DEFERRED):
        run.log({"loss": OnDevice(step)}, frame=step)
    assert len(client._outbox.deferred) == MAX_DEFERRED and not any(t.waited for t in transfers)
    run.log({"loss": OnDevice(-1.0)}, frame=MAX_DEFERRED)   # the GPU is far behind: wait for all
    assert transfers[0].waited
    assert len(client._outbox.deferred) == 1


def test_values_the_wire_cannot_carry_raise_at_once(client, transfers):
    run = client.start_run(project="p", run_id="r4")
    with pytest.raises(TypeError):
        run.log({"loss": OnDevice(1.0), "what": object()}, frame=1)
    run.log({"loss": OnDevice(1.0)}, frame=1)
    with pytest.raises(TypeError):                       # queued behind a waiting row: still said at once
        run.log({"what": object()}, frame=2)
    assert len(client._outbox.deferred) == 1


def test_host_values_take_the_direct_path(client, transfers):
    torch = pytest.importorskip("torch")
    run = client.start_run(project="p", run_id="r5")
    run.log({"cpu": torch.tensor(2.5), "n": torch.tensor(3)}, frame=1)
    assert transfers == [] and not client._outbox.deferred
    assert pending_messages(client)[-1]["metrics"] == {"cpu": 2.5, "n": 3}
