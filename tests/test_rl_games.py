"""relay.rl_games: RelayAlgoObserver in a real rl_games Runner, through a real relay, to fake W&B.

The end-to-end test trains rl_games' continuous PPO agent (`a2c_continuous`) for 3 epochs on a tiny
vectorised torch environment registered with rl_games (no gym/IsaacGym), exactly as a user plugs the
observer into their own Runner, and checks the W&B run row by row against what the agent wrote to
its TensorBoard writer, and every checkpoint byte by byte. The hook-order tests drive the observer
as rl_games does, without rl_games, through a real client and a real relay whose W&B is held back,
and read what it sent from the relay's spool (the tensor ones need torch).
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import sqlite3
import subprocess
import sys
import time
import types

import msgpack
import pytest

from relay.client import RelayClient
from relay.rl_games import (
    RelayAlgoObserver,
    RelayWriter,
    batch_to_python,
    map_tag,
    observer_from_train_config,
    start_transfer,
)

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KNOWN_NAMES = {"losses/a_loss", "losses/c_loss", "info/last_lr", "info/kl", "performance/step_fps",
               "rewards/mean", "rewards/1", "episode_lengths/mean"}


# -- the tag mapping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tag, name", [
    ("rewards/step", "rewards/mean"), ("rewards/iter", "rewards/mean"), ("rewards/time", "rewards/mean"),
    ("rewards/frame", "rewards/mean"), ("rewards0/frame", "rewards/mean"), ("rewards1/iter", "rewards/1"),
    ("rewards12/time", "rewards/12"), ("shaped_rewards/step", "shaped_rewards/mean"),
    ("shaped_rewards2/time", "shaped_rewards/2"), ("episode_lengths/step", "episode_lengths/mean"),
    ("episode_lengths/iter", "episode_lengths/mean"), ("episode_lengths/frame", "episode_lengths/mean"),
    ("episode_lengths/time", "episode_lengths/mean"), ("scores/mean", "scores/mean"),
    ("scores/iter", "scores/mean"), ("reward_traj/frame", "rewards/traj"), ("reward_sit/iter", "rewards/sit"), ("reward_carry/time", "rewards/carry"),
    ("info/e_clip", "info/e_clip"), ("info/disc_logit_loss", "info/disc_logit_loss"),
    ("losses/compensate_composer_reg_loss", "losses/compensate_composer_reg_loss"), ("Episode/len/frame", "Episode/len"), ("eval/success/frame", "eval/success"),
    ("performance/step_fps", "performance/step_fps"), ("performance/step_time", "performance/step_time"),
    ("losses/a_loss", "losses/a_loss"), ("losses/c_loss", "losses/c_loss"), ("info/last_lr", "info/last_lr"),
    ("info/kl", "info/kl"), ("info/epochs", "info/epochs"), ("info/time", "info/time"),
    ("eval/iter", "eval/iter"), ("Episode/distance", "Episode/distance"), ("consecutive_successes/iter",
                                                                            "consecutive_successes"),
    ("plain", "plain"), ("/frame", "/frame"),
    ("successes/consecutive_successes/mean", "successes/consecutive_successes/mean"),
    ("successes/consecutive_successes/iter", "successes/consecutive_successes/mean"),
    ("successes/consecutive_successes/time", "successes/consecutive_successes/mean"),
    ("performance/step_inference_rl_update_fps", "performance/total_fps"),
    ("performance/rl_update_time", "performance/update_time"),
    ("performance/step_inference_time", "performance/play_time"),
])
def test_tag_mapping(tag, name):
    assert map_tag(tag) == name


def test_module_imports_without_torch_or_rl_games():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['rl_games'] = None\n"
            "import relay.rl_games as m\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "assert m.map_tag('rewards/iter') == 'rewards/mean'\n"
            "assert m.batch_to_python({'a': 1.5, 'b': 2}) == {'a': 1.5, 'b': 2}\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- batched tensor conversion -----------------------------------------------------------------------

def _counting_tensor_type(torch):
    calls = {"item": 0, "tolist": 0}

    class CountingTensor(torch.Tensor):
        def item(self):
            calls["item"] += 1
            return super().item()

        def tolist(self):
            calls["tolist"] += 1
            return super().tolist()

    return CountingTensor, calls


def test_batched_conversion_makes_one_transfer_and_no_item_calls():
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    counting, calls = _counting_tensor_type(torch)
    row = {
        "losses/a_loss": torch.tensor(0.125, dtype=torch.float32).as_subclass(counting),
        "rewards/mean": torch.tensor([-3.75], dtype=torch.float32).as_subclass(counting),  # 1-element, 1-d
        "info/kl": torch.tensor(1e-300, dtype=torch.float64).as_subclass(counting),       # float64 kept exact
        "info/count": torch.tensor(2 ** 40 + 1, dtype=torch.int64).as_subclass(counting),
        "info/flag": torch.tensor(True).as_subclass(counting),
        "info/grad": torch.tensor(2.0, requires_grad=True).as_subclass(counting) * 1.5,
        "info/epochs": 3, "info/last_lr": 3e-4, "info/nan": float("nan"), "info/ok": True, "text": "amp",
        "np/f32": np.float32(0.5), "np/arr": np.array([7.0]), "np/i64": np.int64(9),
        "not/scalar": torch.zeros(3).as_subclass(counting),
    }
    transfer = start_transfer(row)
    assert transfer.skipped == ["not/scalar"]
    assert transfer.events == [] and len(transfer.parts) == 1, "one stacked host tensor for all CPU tensors"
    got = transfer.values()
    assert calls == {"item": 0, "tolist": 1}, "tensors must be converted in one batch, not .item() each"
    assert list(got) == [name for name in row if name != "not/scalar"]
    assert got["losses/a_loss"] == 0.125 and got["rewards/mean"] == -3.75 and got["info/kl"] == 1e-300
    assert got["info/count"] == 2 ** 40 + 1 and got["info/flag"] == 1.0 and got["info/grad"] == 3.0
    assert got["info/epochs"] == 3 and type(got["info/epochs"]) is int and got["info/last_lr"] == 3e-4
    assert math.isnan(got["info/nan"]) and got["info/ok"] is True and got["text"] == "amp"
    assert got["np/f32"] == 0.5 and got["np/arr"] == 7.0 and got["np/i64"] == 9
    assert all(type(v) in (int, float, bool, str) for v in got.values())


def test_python_only_rows_never_touch_torch():
    assert batch_to_python({"a": 1, "b": 2.5, "c": False}) == {"a": 1, "b": 2.5, "c": False}


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


def test_cuda_rows_are_copied_once_into_pinned_memory_without_waiting():
    torch = _cuda_torch()
    counting, calls = _counting_tensor_type(torch)
    base = (torch.arange(20, device="cuda", dtype=torch.float32) / 8).as_subclass(counting)
    cpu = torch.tensor(4.5).as_subclass(counting)

    def make_row(values):
        row = {"m%02d" % i: values[i] for i in range(20)}
        row.update(cpu=cpu, py=2.0)
        return row

    assert start_transfer(make_row(base * 1)).values()["m01"] == 0.125  # warm: kernels, pinned block
    torch.cuda.synchronize()
    calls.update(item=0, tolist=0)
    torch.cuda._sleep(int(2e9))          # the GPU is busy for about a second from here on
    values = base * 1                    # queued behind it
    started = time.perf_counter()
    transfer = start_transfer(make_row(values))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.2, "start_transfer waited %.3f s for the GPU" % elapsed
    assert not transfer.ready(), "the copy cannot have finished while the GPU sleeps"
    assert len(transfer.events) == 1 and len(transfer.parts) == 2
    host = [h for names, h in transfer.parts if "m00" in names][0]
    assert host.device.type == "cpu" and host.is_pinned()
    got = transfer.values()
    assert transfer.ready()
    assert calls["item"] == 0, "no tensor may be .item()-ed"
    assert calls["tolist"] == 1, "one .tolist() of the CPU stack (the CUDA one is a plain pinned buffer)"
    assert got == dict({"m%02d" % i: float(i) / 8 for i in range(20)}, cpu=4.5, py=2.0)


def test_observer_never_waits_for_the_gpu_and_logs_the_row_once_copied(held_relay, tmp_path):
    torch = _cuda_torch()
    relay, client = held_relay
    algo = FakeAlgo(ListWriter(), str(tmp_path))
    observer, client = _observer_with(client, algo)
    run = client.runs[0]
    base = torch.arange(4, device="cuda", dtype=torch.float32)

    def epoch(number):
        values = base * number
        algo.epoch_num = number
        observer.after_steps()
        algo.writer.add_scalar("losses/a_loss", values[0], number * 100)
        algo.writer.add_scalar("info/kl", values[1], number * 100)
        observer.after_print_stats(number * 100, number, 1.0)
        for suffix in ("step", "iter", "time"):
            algo.writer.add_scalar("rewards/" + suffix, values[2], number * 100)

    epoch(1)
    observer.after_steps()
    torch.cuda.synchronize()
    observer.process_infos({}, None)  # the copy is done: the row goes out here
    assert [c for c in run.calls if c[0] == "log"] == [("log", {"losses/a_loss": 0.0, "info/kl": 1.0,
                                                                "rewards/mean": 2.0}, 100, 1)]
    epoch(2)
    torch.cuda._sleep(int(2e9))
    started = time.perf_counter()
    epoch(3)                              # after_steps sends epoch 2's row: starts its copy only
    elapsed = time.perf_counter() - started
    assert elapsed < 0.2, "the observer waited %.3f s for the GPU" % elapsed
    assert len([c for c in run.calls if c[0] == "log"]) == 1, "epoch 2's row is still being copied"
    observer.process_infos({}, None)
    algo.train()                          # the end: waits for the last copies, logs, finishes
    logs = [c for c in run.calls if c[0] == "log"]
    assert [(c[2], c[3]) for c in logs] == [(100, 1), (200, 2), (300, 3)]
    assert logs[2][1] == {"losses/a_loss": 0.0, "info/kl": 3.0, "rewards/mean": 6.0}
    assert run.calls[-1] == ("finish", 0, 10.0)
    assert_spool_matches(relay, client)


# -- the observer with a real client and a real relay, W&B held back ---------------------------------
#
# The relay answers, spools and acks as always; its W&B answers 503, so everything the observer sent
# waits in the spool in arrival order, where the test reads it. SpyRun records the calls the observer
# made on the real Run (their order, and each checkpoint's bytes at the moment it was reported).

class SpyRun:
    def __init__(self, run):
        self.run = run
        self.client = run.client
        self.calls = []

    def log(self, metrics, frame=None, epoch=None):
        self.calls.append(("log", dict(metrics), frame, epoch))
        self.run.log(metrics, frame=frame, epoch=epoch)

    def log_checkpoint(self, path, metadata=None, aliases=None):
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        self.calls.append(("checkpoint", path, dict(metadata or {}), list(aliases or []), digest))
        self.run.log_checkpoint(path, metadata=metadata, aliases=aliases)

    def summary(self, values):
        self.calls.append(("summary", dict(values)))
        self.run.summary(values)

    def finish(self, exit_code=0, timeout=10.0):
        self.calls.append(("finish", exit_code, timeout))
        return self.run.finish(exit_code, timeout)


class SpyClient:
    def __init__(self, client):
        self.client = client
        self.runs = []
        self.opened = []

    def start_run(self, **settings):
        self.opened.append(settings)
        run = SpyRun(self.client.start_run(**settings))
        self.runs.append(run)
        return run


@pytest.fixture
def held_relay(fake_wandb, relay_factory, tmp_path):
    fake_wandb.set_fault("503")
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(tmp_path)])
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), heartbeat_every=0,
                         provenance=False, system_metrics=0)
    yield relay, SpyClient(client)
    client.close()


def spooled(relay, run_id):
    """(kind, message) of every record of the run in the relay's spool, in arrival order."""
    path = os.path.join(relay.spool_dir, "spool.sqlite")
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        rows = conn.execute("SELECT kind, body FROM records WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
    finally:
        conn.close()
    return [(kind, msgpack.unpackb(body, raw=False)) for kind, body in rows]


def assert_spool_matches(relay, spy):
    """The relay stored exactly what the observer sent, in the order it sent it."""
    assert spy.client.flush(30.0), "the relay did not ack everything: %s" % spy.client.statistics()
    run = spy.runs[0]
    records = spooled(relay, run.run.id)
    assert records[0][0] == "open" and records[0][1]["settings"]["config"] == spy.opened[0]["config"]
    assert len(records) == 1 + len(run.calls), [kind for kind, _ in records]
    for (kind, body), call in zip(records[1:], run.calls):
        assert kind == call[0]
        if kind == "log":
            assert (body["metrics"], body.get("frame"), body.get("epoch")) == call[1:4]
        elif kind == "checkpoint":
            assert (body["path"], body["metadata"], body["aliases"]) == call[1:4]
        elif kind == "summary":
            assert body["values"] == call[1]
        else:
            assert body["exit_code"] == call[1]


class FakeAlgo:
    """The parts of an rl_games agent the observer touches."""

    def __init__(self, writer, nn_dir):
        self.writer = writer
        self.nn_dir = nn_dir
        self.frame = 0
        self.epoch_num = 0
        self.saved = []
        self.central_value_net = types.SimpleNamespace(writter=writer)

    def save(self, fn):
        self.saved.append(fn)
        path = fn + ".pth"
        with open(path, "wb") as handle:
            handle.write(b"part-1;")
            handle.flush()
            assert not os.path.exists(self.final), "the real name must not exist while the save writes"
            handle.write(("epoch=%d frame=%d" % (self.epoch_num, self.frame)).encode())

    def train(self):
        return "trained"


class ListWriter:
    def __init__(self):
        self.calls = []
        self.flushed = 0

    def add_scalar(self, tag, value, step=None):
        self.calls.append((tag, value, step))

    def flush(self):
        self.flushed += 1


def _observer_with(client, algo, config=None, **kwargs):
    """The observer as rl_games drives it, reporting through `client` (a SpyClient)."""
    observer = RelayAlgoObserver(client=client, run_id="unit", **kwargs)
    observer.before_init("run", config if config is not None else {"name": "unit"}, "unit_01-02-03")
    observer.after_init(algo)
    return observer, client


def test_rl_games_order_gives_one_row_per_epoch_and_atomic_checkpoints(held_relay, tmp_path):
    relay, client = held_relay
    writer = ListWriter()
    tmp_path = tmp_path / "nn"
    tmp_path.mkdir()
    algo = FakeAlgo(writer, str(tmp_path))
    observer, client = _observer_with(client, algo, config={"name": "unit", "lr": 2e-5, "obj": object(),
                                                     "deep": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}},
                                                     "features": {"observer": None}})
    run = client.runs[0]
    assert isinstance(algo.writer, RelayWriter) and algo.central_value_net.writter is algo.writer
    settings = client.opened[0]
    assert settings["name"] == "unit_01-02-03" and settings["project"] == "tokenHSI"
    assert settings["config"]["lr"] == 2e-5 and isinstance(settings["config"]["obj"], str)
    assert settings["config"]["deep"]["a"]["b"]["c"]["d"]["e"] == "{'f': 1}"  # 6 levels kept, then str
    frames = {1: 0, 2: 128, 3: 256}
    for epoch in (1, 2, 3):
        algo.epoch_num = epoch
        observer.process_infos({}, None)
        observer.after_steps()
        algo.central_value_net.writter.add_scalar("losses/cval_loss", 0.5 * epoch, 7)
        algo.writer.add_scalar("losses/a_loss", 0.1 * epoch, frames[epoch])
        algo.writer.add_scalar("info/epochs", epoch, frames[epoch])
        algo.frame = frames[epoch] + 128
        observer.after_print_stats(frames[epoch], epoch, 1.5 * epoch)
        observer.after_print_stats(frames[epoch], epoch, 1.5 * epoch)  # rl_games' discrete agent calls it twice
        for suffix, step in (("step", frames[epoch]), ("iter", epoch), ("time", 1.5 * epoch)):
            algo.writer.add_scalar("rewards/" + suffix, -1.0 * epoch, step)
            algo.writer.add_scalar("episode_lengths/" + suffix, 8, step)
        algo.final = str(tmp_path / ("last_ep_%d" % epoch)) + ".pth"
        assert algo.save(str(tmp_path / ("last_ep_%d" % epoch))) is None
    algo.writer.flush()
    assert algo.train() == "trained"
    assert writer.flushed == 1 and len(writer.calls) == 3 * 9, "the original writer gets every call"
    logs = [c for c in run.calls if c[0] == "log"]
    assert [(c[2], c[3]) for c in logs] == [(0, 1), (128, 2), (256, 3)]
    for epoch, call in zip((1, 2, 3), logs):
        assert call[1] == {"losses/cval_loss": 0.5 * epoch, "losses/a_loss": 0.1 * epoch, "info/epochs": epoch,
                           "rewards/mean": -1.0 * epoch, "episode_lengths/mean": 8}
    checkpoints = [c for c in run.calls if c[0] == "checkpoint"]
    assert len(checkpoints) == 3
    for epoch, call in zip((1, 2, 3), checkpoints):
        path = str(tmp_path / ("last_ep_%d.pth" % epoch))
        assert call[1] == path and call[2] == {"epoch": epoch, "frame": frames[epoch]}  # the row's, not algo.frame
        assert call[3] == ["latest"]
        assert call[4] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    # each epoch: its row, then its checkpoint; finish last
    kinds = [c[0] for c in run.calls]
    assert kinds == ["log", "checkpoint"] * 3 + ["finish"]
    assert run.calls[-1] == ("finish", 0, 10.0)
    assert sorted(os.listdir(tmp_path)) == ["last_ep_1.pth", "last_ep_2.pth", "last_ep_3.pth"]
    assert all(".relay-tmp-" in os.path.basename(fn) for fn in algo.saved)
    algo.writer.add_scalar("losses/a_loss", 1.0, 999)  # after the end: TensorBoard only
    assert len(writer.calls) == 3 * 9 + 1 and len(run.calls) == 7
    assert_spool_matches(relay, client)


def test_a_row_is_sent_when_its_epoch_ends_not_after_the_next_rollout(held_relay, tmp_path):
    """rl_games' loop calls update_epoch() first in each epoch; after_steps() comes after that
    epoch's rollout. The previous epoch's row leaves at update_epoch()."""
    relay, client = held_relay

    class EpochAlgo(FakeAlgo):
        def update_epoch(self):
            self.epoch_num += 1
            return self.epoch_num

    algo = EpochAlgo(ListWriter(), str(tmp_path))
    observer, client = _observer_with(client, algo)
    run = client.runs[0]

    def rows():
        return [(c[1], c[2], c[3]) for c in run.calls if c[0] == "log"]

    expected = []
    for epoch in (1, 2, 3):
        assert algo.update_epoch() == epoch
        assert rows() == expected, "epoch %d's first call: the rows of the epochs before it are sent" % epoch
        observer.process_infos({}, None)  # the rollout
        observer.after_steps()
        assert rows() == expected, "after_steps sends nothing more"
        algo.writer.add_scalar("losses/a_loss", 0.1 * epoch, 64 * epoch)
        observer.after_print_stats(64 * epoch, epoch, 1.5 * epoch)
        for suffix, step in (("frame", 64 * epoch), ("iter", epoch), ("time", 1.5 * epoch)):
            algo.writer.add_scalar("rewards0/" + suffix, -1.0 * epoch, step)
        expected.append(({"losses/a_loss": 0.1 * epoch, "rewards/mean": -1.0 * epoch}, 64 * epoch, epoch))
    assert rows() == expected[:2]
    observer.finish()
    assert rows() == expected
    assert_spool_matches(relay, client)


def test_agent_without_after_steps_still_gets_one_row_per_epoch(held_relay, tmp_path):
    """rl_games' SAC: stats, after_print_stats, rewards; no after_steps; the next epoch repeats tags."""
    relay, client = held_relay
    algo = FakeAlgo(None, str(tmp_path))   # no TensorBoard writer at all: a relay-only writer
    observer, client = _observer_with(client, algo)
    assert isinstance(algo.writer, RelayWriter) and algo.writer.original is None
    algo.writer.flush()  # whatever else the agent calls on its writer is a no-op
    for epoch in (1, 2):
        algo.epoch_num, algo.frame = epoch, 1000 * epoch
        algo.writer.add_scalar("performance/step_fps", 10.0 * epoch, algo.frame)
        algo.writer.add_scalar("info/epochs", epoch, algo.frame)
        observer.after_print_stats(algo.frame, epoch, 2.0)
        algo.writer.add_scalar("rewards/step", 5.0 * epoch, algo.frame)
        algo.writer.add_scalar("rewards/time", 5.0 * epoch, 2.0)
    algo.train()
    logs = [c for c in client.runs[0].calls if c[0] == "log"]
    assert logs == [("log", {"performance/step_fps": 10.0, "info/epochs": 1, "rewards/mean": 5.0}, 1000, 1),
                    ("log", {"performance/step_fps": 20.0, "info/epochs": 2, "rewards/mean": 10.0}, 2000, 2)]
    assert_spool_matches(relay, client)


def test_failed_training_finishes_with_exit_code_1_and_reraises(held_relay, tmp_path):
    relay, client = held_relay
    algo = FakeAlgo(ListWriter(), str(tmp_path))

    def boom():
        algo.writer.add_scalar("losses/a_loss", 0.5, 0)
        observer.after_print_stats(0, 1, 0.1)
        raise RuntimeError("simulation exploded")

    algo.train = boom
    observer, client = _observer_with(client, algo)
    with pytest.raises(RuntimeError, match="simulation exploded"):
        algo.train()
    calls = client.runs[0].calls
    assert calls == [("log", {"losses/a_loss": 0.5}, 0, 1), ("finish", 1, 10.0)]
    assert observer.report["delivered"] is True and observer.report["spill_file"] is None, observer.report
    assert_spool_matches(relay, client)


def test_failed_save_leaves_no_temp_file_and_reports_nothing(held_relay, tmp_path):
    relay, client = held_relay
    tmp_path = tmp_path / "nn"
    tmp_path.mkdir()
    algo = FakeAlgo(ListWriter(), str(tmp_path))
    (tmp_path / "model.pth").write_bytes(b"the previous checkpoint")

    def bad_save(fn):
        with open(fn + ".pth", "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    algo.save = bad_save
    observer, client = _observer_with(client, algo)
    with pytest.raises(OSError, match="disk full"):
        algo.save(str(tmp_path / "model"))
    assert os.listdir(tmp_path) == ["model.pth"] and (tmp_path / "model.pth").read_bytes() == b"the previous checkpoint"
    assert not [c for c in client.runs[0].calls if c[0] == "checkpoint"]
    observer.finish()
    assert_spool_matches(relay, client)
    assert [kind for kind, _ in spooled(relay, "unit")] == ["open", "finish"]


def test_wandb_disabled_wraps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    writer = ListWriter()
    algo = FakeAlgo(writer, str(tmp_path))
    save, train = algo.save, algo.train
    observer = RelayAlgoObserver(endpoint="ipc:///nonexistent/relay.ipc")
    observer.before_init("run", {"name": "off"}, "off")
    observer.after_init(algo)
    assert observer.client is None and observer.run is None, "no client, no run"
    assert algo.writer is writer and algo.save == save and algo.train == train
    assert "save" not in vars(algo) and "train" not in vars(algo)
    observer.process_infos({}, None)
    observer.after_steps()
    observer.after_print_stats(0, 1, 0.0)
    assert observer.finish() is None


# -- a TokenHSI checkout's cfg_train -> the observer --------------------------------------------------

def test_observer_from_train_config_opens_the_run_its_yaml_describes(held_relay, tmp_path):
    import yaml

    relay, _ = held_relay
    with open(os.path.join(ROOT, "cfg", "train", "amp_point_multitask.yaml")) as handle:
        cfg_train = yaml.safe_load(handle)
    cfg_train["wandb"].update(entity="lab", group="ablation", name=None, mode="offline")
    cfg_train["relay"].update(endpoint=relay.endpoint, spill_dir=str(tmp_path / "spill-here"), finish_timeout=20,
                              provenance=False, system_metrics=0)
    cfg_train["params"]["config"]["name"] = "HumanoidTraj"
    observer = observer_from_train_config(cfg_train)
    algo = FakeAlgo(ListWriter(), str(tmp_path))
    observer.before_init("run", cfg_train["params"]["config"], "HumanoidTraj_26-11-09-00-00")
    observer.after_init(algo)
    algo.writer.add_scalar("losses/a_loss", 0.25, 64)
    observer.after_print_stats(64, 1, 0.5)
    report = observer.finish()
    assert report["delivered"] is True and observer.client.spill_dir == str(tmp_path / "spill-here")
    assert observer.finish_timeout == 20.0 and (observer.provenance, observer.system_metrics) == (False, 0)
    records = spooled(relay, observer.run_id or report["run"])
    assert [kind for kind, _ in records] == ["open", "log", "finish"]
    settings = records[0][1]["settings"]
    assert "meta" not in records[0][1]   # provenance off: no `meta` record announced
    assert {k: settings.get(k) for k in ("project", "entity", "name", "group", "tags", "notes", "mode")} == {
        "project": "tokenHSI", "entity": "lab", "name": "HumanoidTraj", "group": "ablation",
        "tags": ["amp", "point", "multitask"], "notes": cfg_train["wandb"]["notes"], "mode": "offline"}
    assert settings["config"]["horizon_length"] == cfg_train["params"]["config"]["horizon_length"]
    assert records[1][1]["metrics"] == {"losses/a_loss": 0.25} and records[2][1]["exit_code"] == 0


def test_observer_from_train_config_knows_the_keys_run_py_knows():
    """The checkout's helper and tokenhsi/config.py read the same wandb: and relay: blocks."""
    from dataclasses import fields

    from relay.integrations.tokenhsi import RELAY_KEYS, WANDB_KEYS
    from tokenhsi import config

    assert set(WANDB_KEYS) == {f.name for f in fields(config.WandbSettings)}
    assert set(RELAY_KEYS) == {f.name for f in fields(config.RelaySettings)}


def test_the_console_goes_to_the_run_unless_the_relay_block_says_console_false():
    on = observer_from_train_config({"use_wandb": True, "params": {}})
    off = observer_from_train_config({"use_wandb": True, "relay": {"console": False}, "params": {}})
    assert (on.console, off.console) == (True, False)


def test_observer_from_train_config_with_use_wandb_false_reports_nothing(tmp_path):
    observer = observer_from_train_config({"use_wandb": False, "wandb": {"project": "p"}, "params": {}})
    writer = ListWriter()
    algo = FakeAlgo(writer, str(tmp_path))
    observer.before_init("run", {}, "exp")
    observer.after_init(algo)
    assert observer.client is None and algo.writer is writer and "save" not in vars(algo)


@pytest.mark.parametrize("cfg_train, message", [
    ({"use_wandb": True, "wandb": {"projct": "x"}}, "amp.yaml: wandb: unknown key 'projct'"),
    ({"use_wandb": True, "relay": {"endpiont": "tcp://h:5555"}}, "amp.yaml: relay: unknown key 'endpiont'"),
    ({"use_wandb": "yes"}, "amp.yaml: use_wandb must be True or False, got 'yes'"),
    ({"use_wandb": True, "wandb": {"tags": "amp"}}, "amp.yaml: wandb.tags must be a list of strings"),
    ({"use_wandb": True, "wandb": {"mode": "sometimes"}}, "amp.yaml: wandb.mode must be online, offline or disabled"),
    ({"use_wandb": True, "relay": {"finish_timeout": "30"}}, "amp.yaml: relay.finish_timeout has the wrong type"),
    ({"use_wandb": True, "relay": {"console": "off"}}, "amp.yaml: relay.console must be true or false, got 'off'"),
    ({"use_wandb": True, "relay": {"provenance": "no"}}, "amp.yaml: relay.provenance must be True or False, got 'no'"),
    ({"use_wandb": True, "relay": {"system_metrics": -1}}, "amp.yaml: relay.system_metrics must be seconds between "
     "samples (0: none), got -1"),
    ({"use_wandb": True, "wandb": ["project"]}, "amp.yaml: wandb must be a mapping, got list"),
    ({"params": {"use_wandb": True}}, "amp.yaml: params.use_wandb is misplaced: `use_wandb` belongs at the top level"),
    ({"use_wandb": True, "params": {"config": {"wandb": {"project": "p"}}}},
     "amp.yaml: params.config.wandb is misplaced: `wandb` belongs at the top level of the training yaml, next to "
     "`params:` (move it there)"),
    ({"params": {"config": {"amp": {"relay": {"endpoint": "tcp://h:1"}}}}},
     "amp.yaml: params.config.amp.relay is misplaced: `relay` belongs at the top level"),
])
def test_observer_from_train_config_names_the_bad_key(cfg_train, message):
    with pytest.raises(ValueError) as error:
        observer_from_train_config(cfg_train, where="amp.yaml")
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("wandb_name, experiment, where, expected", [
    ("mine", "exp1", "cfg/amp_humanoid_traj.yaml", "mine"),        # wandb.name wins
    (None, "exp1", "cfg/amp_humanoid_traj.yaml", "exp1"),          # then --experiment
    (None, "Base", "cfg/amp_humanoid_traj.yaml", "amp_humanoid_traj"),  # TokenHSI's default: not given
    (None, None, "cfg/amp_humanoid_traj.yml", "amp_humanoid_traj"),
    (None, None, "cfg_train", "Humanoid"),                          # no file name: params.config.name
])
def test_run_name_defaults_to_experiment_then_the_yaml_file_name(wandb_name, experiment, where, expected):
    cfg_train = {"use_wandb": True, "wandb": {"name": wandb_name}, "params": {"config": {"name": "Humanoid"}}}
    assert observer_from_train_config(cfg_train, where=where, experiment=experiment).name == expected


def test_config_strings_yaml_1_1_leaves_unparsed_become_numbers():
    from relay.rl_games import sanitize_config

    config = sanitize_config({"learning_rate": "2e-5", "big": "1E6", "neg": "-3.5e+2", "dot": ".5e1",
                              "name": "2e-5x", "plain": "1.5", "word": "None", "version": "1.2.3e4"})
    assert config == {"learning_rate": 2e-05, "big": 1e6, "neg": -350.0, "dot": 5.0, "name": "2e-5x",
                      "plain": "1.5", "word": "None", "version": "1.2.3e4"}
    assert all(type(config[k]) is float for k in ("learning_rate", "big", "neg", "dot"))


def test_console_shows_the_final_checkpoint_name(held_relay, tmp_path, capsys):
    """rl_games prints the name it was given to save to; the observer shows the final one."""
    relay, client = held_relay
    algo = FakeAlgo(ListWriter(), str(tmp_path))
    original_save = algo.save

    def printing_save(fn, *args):
        print("=> saving checkpoint '%s'" % (fn + ".pth"))
        return original_save(fn, *args)

    algo.save = printing_save
    observer, client = _observer_with(client, algo)
    algo.epoch_num = 1
    observer.after_print_stats(64, 1, 0.5)
    algo.final = str(tmp_path / "Humanoid.pth")
    algo.save(str(tmp_path / "Humanoid"))
    out = capsys.readouterr().out
    assert out == "=> saving checkpoint '%s'\n" % (tmp_path / "Humanoid.pth"), out
    assert sys.stdout is not None and type(sys.stdout).__name__ != "_Renaming"
    observer.finish()


def test_multi_observer_relays_what_an_observer_holding_the_writer_writes(held_relay, tmp_path):
    """TokenHSI's RLGPUAlgoObserver keeps `algo.writer` at after_init and writes its success rate
    at after_print_stats; behind the relay's observer in MultiObserver that value is reported."""
    from relay.rl_games import MultiObserver

    relay, client = held_relay

    class SuccessObserver:     # the shape of TokenHSI's RLGPUAlgoObserver
        def after_init(self, algo):
            self.writer = algo.writer

        def after_print_stats(self, frame, epoch_num, total_time):
            self.writer.add_scalar("successes/consecutive_successes/mean", 0.75, frame)
            self.writer.add_scalar("successes/consecutive_successes/iter", 0.75, epoch_num)

    relay_observer = RelayAlgoObserver(client=client, run_id="multi")
    both = MultiObserver(relay_observer, SuccessObserver())
    writer = ListWriter()
    algo = FakeAlgo(writer, str(tmp_path))
    both.before_init("run", {"name": "multi"}, "multi")
    both.after_init(algo)
    for epoch in (1, 2):
        both.after_steps()
        algo.writer.add_scalar("losses/a_loss", 0.5 * epoch, 100 * epoch)
        both.after_print_stats(100 * epoch, epoch, 1.0)
    algo.train()
    assert [c[1:] for c in writer.calls if c[0].startswith("successes/")] == [(0.75, 100), (0.75, 1), (0.75, 200),
                                                                                (0.75, 2)]
    assert_spool_matches(relay, client)
    logs = [body for kind, body in spooled(relay, "multi") if kind == "log"]
    assert [(b["metrics"], b["frame"], b["epoch"]) for b in logs] == [
        ({"losses/a_loss": 0.5, "successes/consecutive_successes/mean": 0.75}, 100, 1),
        ({"losses/a_loss": 1.0, "successes/consecutive_successes/mean": 0.75}, 200, 2)]


# -- end to end: rl_games Runner -> RelayAlgoObserver -> relay -> wandb SDK -> fake W&B ---------------

NUM_ENVS = 8
HORIZON = 16
EPISODE = 6
EPOCHS = 3


def _point_env_class(torch, IVecEnv, Box):
    class PointEnv(IVecEnv):
        """A 1-D point per env that should move to 0: obs = position; two reward heads (value_size 2,
        as multi-objective TokenHSI tasks have): -|position| and -position^2."""

        def __init__(self, num_envs):
            self.num_envs = num_envs
            self.generator = torch.Generator().manual_seed(0)
            self.observation_space = Box(low=-10.0, high=10.0, shape=(1,))
            self.action_space = Box(low=-1.0, high=1.0, shape=(1,))
            self.pos = torch.zeros(num_envs, 1)
            self.steps = torch.zeros(num_envs)

        def get_env_info(self):
            return {"observation_space": self.observation_space, "action_space": self.action_space,
                    "agents": 1, "value_size": 2}

        def _start(self, mask):
            count = int(mask.sum())
            self.pos[mask] = torch.rand(count, 1, generator=self.generator) * 2 - 1
            self.steps[mask] = 0

        def reset(self):
            self._start(torch.ones(self.num_envs, dtype=torch.bool))
            return self.pos.clone()

        def step(self, actions):
            self.pos = (self.pos + 0.1 * actions.clamp(-1, 1)).clamp(-10, 10)
            self.steps += 1
            reward = torch.cat([-self.pos.abs(), -self.pos ** 2], dim=1)
            done = self.steps >= EPISODE
            if done.any():
                self._start(done)
            return self.pos.clone(), reward, done.to(torch.uint8), {}

    return PointEnv


def _params(train_dir: str) -> dict:
    return {"params": {
        "seed": 7,
        "torch_threads": 1,
        "algo": {"name": "a2c_continuous"},
        "model": {"name": "continuous_a2c_logstd"},
        "network": {
            "name": "actor_critic", "separate": False,
            "space": {"continuous": {"mu_activation": "None", "sigma_activation": "None",
                                     "mu_init": {"name": "default"},
                                     "sigma_init": {"name": "const_initializer", "val": 0}, "fixed_sigma": True}},
            "mlp": {"units": [16], "activation": "elu", "initializer": {"name": "default"}},
        },
        "config": {
            "name": "point", "env_name": "relay_point", "device": "cpu", "ppo": True, "multi_gpu": False,
            "mixed_precision": False, "normalize_input": False, "normalize_value": False, "value_bootstrap": True,
            "num_actors": NUM_ENVS, "reward_shaper": {"scale_value": 1.0}, "normalize_advantage": True,
            "gamma": 0.99, "tau": 0.95, "learning_rate": 3e-4, "lr_schedule": "adaptive", "kl_threshold": 0.008,
            "max_epochs": EPOCHS, "save_frequency": 1, "save_best_after": 1000, "grad_norm": 1.0,
            "entropy_coef": 0.0, "truncate_grads": True, "e_clip": 0.2, "horizon_length": HORIZON,
            "minibatch_size": NUM_ENVS * HORIZON // 2, "mini_epochs": 2, "critic_coef": 2, "clip_value": True,
            "bounds_loss_coef": 0.0001, "train_dir": train_dir, "torch_compile": False, "print_stats": False,
            "use_diagnostics": True,
        },
    }}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_rl_games_runner_reports_rows_config_and_checkpoints(fake_wandb, relay_factory, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("rl_games")
    from rl_games.algos_torch import torch_ext
    from rl_games.common import a2c_common, env_configurations, vecenv
    from rl_games.common.ivecenv import IVecEnv
    from rl_games.torch_runner import Runner
    from tensorboardX import SummaryWriter
    import gymnasium

    root = tmp_path / "output"
    root.mkdir()
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("RELAY_SPILL_DIR", str(tmp_path / "spill"))

    point_env = _point_env_class(torch, IVecEnv, gymnasium.spaces.Box)
    env_configurations.register("relay_point", {"vecenv_type": "RELAY_POINT", "env_creator": lambda **kw: None})
    vecenv.register("RELAY_POINT", lambda config_name, num_actors, **kwargs: point_env(num_actors))

    observer = RelayAlgoObserver(project="tokenHSI", group="rl-games-e2e", tags=["ppo", "point"], notes="e2e",
                                 run_id="rlgames1", endpoint=relay.endpoint, finish_timeout=30.0)
    recorded = []   # (epoch the agent was in, tag, value, step): what the TensorBoard writer received
    writers = []

    class RecordingWriter(SummaryWriter):   # the agent's own TensorBoard writer, recording its calls
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

        def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
            recorded.append((observer.algo.epoch_num if observer.algo else None, tag, scalar_value, global_step))
            return super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)

    monkeypatch.setattr(a2c_common, "SummaryWriter", RecordingWriter)
    saves = []
    real_save_checkpoint = torch_ext.save_checkpoint

    def counting_save_checkpoint(filename, state):
        saves.append((filename, state["epoch"], state["frame"]))
        return real_save_checkpoint(filename, state)

    monkeypatch.setattr(torch_ext, "save_checkpoint", counting_save_checkpoint)

    runner = Runner(algo_observer=observer)
    runner.load(_params(str(root / "runs")))
    runner.run({"train": True, "play": False, "checkpoint": None, "sigma": None})

    # -- the trainer side: finished, delivered, nothing spilled
    assert observer.report["delivered"] is True and observer.report["spill_file"] is None, observer.report
    assert observer.report["errors"] == 0
    algo = observer.algo
    assert algo.epoch_num == EPOCHS and isinstance(algo.writer, RelayWriter) and algo.writer.original is writers[0]

    # -- what the agent wrote, per epoch, mapped to W&B names (last write wins)
    epochs = sorted({epoch for epoch, _, _, _ in recorded})
    assert epochs == [1, 2, 3], epochs
    expected = {}
    for epoch, tag, value, step in recorded:
        row = expected.setdefault(epoch, {})
        row[map_tag(tag)] = value.item() if hasattr(value, "item") else value  # tensors, numpy (test side)
    reported_frames = {epoch: step for epoch, tag, value, step in recorded if tag == "info/epochs"}
    assert {epoch: value for epoch, tag, value, _ in recorded if tag == "info/epochs"} == {1: 1, 2: 2, 3: 3}
    for epoch in epochs:
        assert KNOWN_NAMES <= set(expected[epoch]), "the agent did not write %s" % (KNOWN_NAMES - set(expected[epoch]))
        assert [step for e, tag, _, step in recorded if e == epoch and tag == "rewards/iter"] == [epoch]

    # -- W&B: one row per epoch with the agent's frame and epoch, and exactly those values
    fake_wandb.wait_for(lambda: fake_wandb.complete("rlgames1"), 120)
    run = fake_wandb.run("rlgames1")
    assert (run.project, run.group, run.notes, list(run.tags), run.exit_code) == (
        "tokenHSI", "rl-games-e2e", "e2e", ["ppo", "point"], 0)
    assert (run.display_name or run.name).startswith("point_"), "defaults to rl_games' experiment name"
    assert len(run.history) == EPOCHS, run.history
    for index, got in enumerate(run.history):
        epoch = index + 1
        assert got["epoch"] == epoch and got["frame"] == reported_frames[epoch]
        names = {k for k in got if not k.startswith("_")} - {"frame", "epoch"}
        assert names == set(expected[epoch]), (names ^ set(expected[epoch]))
        for name, value in expected[epoch].items():
            assert _same(got[name], value), "epoch %d %s: the writer got %r, W&B has %r" % (
                epoch, name, value, got[name])
    config = run.config
    assert {k: config[k] for k in ("name", "env_name", "horizon_length", "max_epochs", "save_frequency",
                                   "learning_rate", "num_actors")} == {
        "name": "point", "env_name": "relay_point", "horizon_length": HORIZON, "max_epochs": EPOCHS,
        "save_frequency": 1, "learning_rate": 3e-4, "num_actors": NUM_ENVS}
    assert isinstance(config["features"]["observer"], str) and isinstance(config["reward_shaper"], str)

    # -- checkpoints: every save is one model artifact with the file's exact bytes, epoch and frame
    nn_dir = algo.nn_dir
    files = sorted(glob.glob(os.path.join(nn_dir, "*.pth")))
    assert not [n for n in os.listdir(nn_dir) if ".relay-tmp-" in n], os.listdir(nn_dir)
    assert len(saves) == len(files) == EPOCHS + 1, (saves, files)  # save_frequency 1, plus the final save
    assert all(os.path.basename(name).startswith(".last_point_ep_") for name, _, _ in saves)
    fake_wandb.wait_for(lambda: len(fake_wandb.artifacts()) >= len(files), 60)
    artifacts = fake_wandb.artifacts()
    assert len(artifacts) == len(files)
    by_file = {}
    for artifact in artifacts:
        assert artifact.type == "model" and len(artifact.files) == 1
        (name, data), = artifact.files.items()
        by_file[name] = (artifact, data)
    assert sorted(by_file) == sorted(os.path.basename(f) for f in files)
    for path in files:
        artifact, data = by_file[os.path.basename(path)]
        with open(path, "rb") as handle:
            assert hashlib.sha256(data).hexdigest() == hashlib.sha256(handle.read()).hexdigest()
        state = torch_ext.load_checkpoint(path)
        # the checkpoint sits on the chart where its epoch's row is (rl_games counted the epoch's
        # frames into its own counter before it saved)
        assert artifact.metadata == {"epoch": state["epoch"], "frame": reported_frames[state["epoch"]]}
        assert state["frame"] > reported_frames[state["epoch"]]
    assert sorted((e, reported_frames[e]) for _, e, f in saves) == sorted(
        (a.metadata["epoch"], a.metadata["frame"]) for a in artifacts)
    assert "latest" in max(artifacts, key=lambda a: a.version).aliases

    # -- TensorBoard: the original writer got every scalar, with its step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writers[0].flush()
    accumulator = EventAccumulator(algo.summaries_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    tb = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    for tag in {tag for _, tag, _, _ in recorded}:
        sent = [(int(step), float(value)) for _, t, value, step in recorded if t == tag]
        assert len(tb.get(tag, [])) == len(sent), tag
        for (tb_step, tb_value), (step, value) in zip(tb[tag], sent):
            assert tb_step == step and (tb_value == pytest.approx(value, rel=1e-6, abs=1e-30)
                                        or math.isnan(value)), (tag, tb_value, value)
    assert relay.stop() == 0


def test_histograms_every_n_epochs_put_the_rollouts_actions_and_rewards_in_the_epochs_row(
        fake_wandb, relay_factory, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    numpy = pytest.importorskip("numpy")
    pytest.importorskip("rl_games")
    from rl_games.common import env_configurations, vecenv
    from rl_games.common.ivecenv import IVecEnv
    from rl_games.torch_runner import Runner
    import gymnasium

    from relay.integrations import rl_games as integration

    (tmp_path / "runs").mkdir()
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(tmp_path / "runs")])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    point_env = _point_env_class(torch, IVecEnv, gymnasium.spaces.Box)
    env_configurations.register("relay_point", {"vecenv_type": "RELAY_POINT", "env_creator": lambda **kw: None})
    vecenv.register("RELAY_POINT", lambda config_name, num_actors, **kwargs: point_env(num_actors))
    binned = []   # (epoch, what the observer binned, copied then)
    real_bin_many = integration.bin_many

    def recording_bin_many(named, bins=64):
        binned.append((observer.algo.epoch_num, {k: v.clone() for k, v in named.items()}))
        return real_bin_many(named, bins)

    monkeypatch.setattr(integration, "bin_many", recording_bin_many)
    observer = RelayAlgoObserver(project="tokenHSI", run_id="histograms", endpoint=relay.endpoint,
                                 spill_dir=str(tmp_path / "spill"), finish_timeout=30.0, histograms_every=2)
    params = _params(str(tmp_path / "runs"))
    params["params"]["config"].update(max_epochs=4, save_frequency=0)
    runner = Runner(algo_observer=observer)
    runner.load(params)
    runner.run({"train": True, "play": False, "checkpoint": None, "sigma": None})
    assert observer.report["delivered"] is True and observer.report["errors"] == 0, observer.report

    assert [epoch for epoch, _ in binned] == [2, 4]
    fake_wandb.wait_for(lambda: fake_wandb.complete("histograms"), 120)
    rows = fake_wandb.run("histograms").history
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert [sorted(k for k in row if k.startswith("histograms/")) for row in rows] == [
        [], ["histograms/actions", "histograms/rewards"], [], ["histograms/actions", "histograms/rewards"]]
    for (epoch, tensors), row in zip(binned, (rows[1], rows[3])):
        assert tensors["histograms/actions"].shape == (HORIZON, NUM_ENVS, 1)
        assert tensors["histograms/rewards"].shape == (HORIZON, NUM_ENVS, 2)
        for name, values in tensors.items():
            counts, edges = numpy.histogram(values.double().numpy().reshape(-1), bins=64)
            assert row[name] == {"_type": "histogram", "values": counts.tolist(), "bins": edges.tolist()}, name
    assert relay.stop() == 0


def test_multi_observer_forwards_every_hook_in_order():
    from relay.rl_games import MultiObserver

    calls = []

    class Recorder(object):
        def __init__(self, name):
            self.name = name

        def __getattr__(self, hook):
            return lambda *args: calls.append((self.name, hook, args))

    both = MultiObserver(Recorder("tokenhsi"), Recorder("relay"))
    both.before_init("base", {"a": 1}, "exp")
    both.after_print_stats(128, 2, 1.5)
    assert calls == [("tokenhsi", "before_init", ("base", {"a": 1}, "exp")),
                     ("relay", "before_init", ("base", {"a": 1}, "exp")),
                     ("tokenhsi", "after_print_stats", (128, 2, 1.5)),
                     ("relay", "after_print_stats", (128, 2, 1.5))]
