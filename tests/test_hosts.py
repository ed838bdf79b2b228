"""Uploader hosts: many runs in one process, each in a thread (relay/uploader_host.py). A run that
fails or gets stuck there stops its host's other runs for no longer than a restart from the spool,
and is retried alone in an uploader process of its own; nothing is lost or doubled.

Real relay, real wandb SDK and wandb-core, the fake W&B backend; outcomes are exact histories.
The stuck run is a real one: the fake W&B never answers its file_stream, so its `run.finish()`
does not return. The failing run's SDK call raises through a sitecustomize that the relay's
processes load (written by the test): wandb's `Run.log` raises once for that run.
"""
from __future__ import annotations

import os
import textwrap

import pytest

from harness import ROOT, lock_holder
from test_e2e import assert_history
from test_shared_core import paused_trainer

pytestmark = [pytest.mark.timeout(240), pytest.mark.wandb_lag(1.0)]

RAISE_ONCE = '''
import os
import wandb.sdk.wandb_run as wandb_run

_log = wandb_run.Run.log


def log(self, *args, **kwargs):
    if self.id == os.environ.get("TEST_FAULT_RUN"):
        try:
            os.rename(os.environ["TEST_FAULT_FLAG"], os.environ["TEST_FAULT_FLAG"] + ".used")  # once, atomically
        except FileNotFoundError:
            return _log(self, *args, **kwargs)
        raise RuntimeError("injected failure inside the wandb SDK")
    return _log(self, *args, **kwargs)


wandb_run.Run.log = log
'''


def finish(relay, trainer, fake, run_id, steps, seed):
    """The trainer finishes; once its uploader has finished the W&B run (a stream left open that
    the next uploader closed is complete in W&B too), W&B has its every row once."""
    trainer.go_on()
    assert trainer.event("finished")["report"]["delivered"] is True
    wait_finished(relay, fake, run_id, steps, seed)


def wait_finished(relay, fake, run_id, steps, seed):
    relay.wait_status(lambda s: relay.run_status(run_id)["state"] == "finished", 120, "run %s finished" % run_id)
    assert fake.complete(run_id) and fake.run(run_id).exit_code == 0
    assert_history(fake.run(run_id).history, seed=seed, steps=steps, metrics=6)


def read(pid: int, name: str) -> str:
    with open("/proc/%d/%s" % (pid, name)) as file:
        return file.read()


def nice(pid: int) -> int:
    """The process's nice value (field 19 of /proc/<pid>/stat)."""
    return int(read(pid, "stat").rsplit(")", 1)[1].split()[16])


def children(pid: int) -> list[int]:
    return [int(child) for task in os.listdir("/proc/%d/task" % pid)
            for child in read(pid, "task/%s/children" % task).split()]


def holder(relay, run_id) -> int | None:
    try:
        return lock_holder(relay.spool_dir, run_id)
    except AssertionError:  # no process holds it (between two uploaders)
        return None


def holders(relay, runs) -> dict[str, int]:
    return {run_id: lock_holder(relay.spool_dir, run_id) for run_id in runs}


def all_uploading(relay, runs):
    relay.wait_status(lambda s: sorted((r["run_id"], r["state"], r["unsent"]) for r in s["runs"])
                      == [(run_id, "uploading", 0) for run_id in sorted(runs)], 90, "%s uploading" % runs)


def test_a_run_whose_sdk_call_raises_is_retried_alone_and_the_others_go_on(fake_wandb, relay_factory,
                                                                           trainer_factory, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(RAISE_ONCE))
    flag = tmp_path / "fault-flag"
    flag.write_text("")
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_UPLOADER_HOSTS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook), ROOT]), "TEST_FAULT_RUN": "fails",
        "TEST_FAULT_FLAG": str(flag)})
    seeds = {"steady-a": 42, "steady-b": 43, "fails": 41}
    trainers = {run_id: paused_trainer(trainer_factory, relay, run_id, 60, seeds[run_id])
                for run_id in ("steady-a", "steady-b")}
    all_uploading(relay, ["steady-a", "steady-b"])
    first = holders(relay, ["steady-a", "steady-b"])
    trainers["fails"] = paused_trainer(trainer_factory, relay, "fails", 60, seeds["fails"])  # joins their host
    relay.wait_log("uploader for run fails exited with code 1; restarting it in an uploader process of its own", 60)
    assert not flag.exists()
    all_uploading(relay, seeds)
    where = holders(relay, seeds)
    assert where["steady-a"] == where["steady-b"] != where["fails"], where  # the others share a fresh host
    assert first["steady-a"] == first["steady-b"] != where["steady-a"], (first, where)
    for run_id, trainer in trainers.items():
        finish(relay, trainer, fake_wandb, run_id, 60, seeds[run_id])
    log = relay.log()
    assert "injected failure inside the wandb SDK" in log
    assert "run steady-a: its uploader host was replaced" in log
    assert "uploader for run steady-a exited" not in log and "uploader for run steady-b exited" not in log
    assert relay.stop() == 0


def test_a_run_stuck_in_a_wandb_call_is_moved_out_and_the_others_go_on(fake_wandb, relay_factory,
                                                                      trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_STUCK_TIMEOUT": "3", "RELAY_UPLOADER_HOSTS": "1"})
    seeds = {"stuck": 51, "steady-c": 52, "steady-d": 53}
    trainers = {run_id: paused_trainer(trainer_factory, relay, run_id, 40, seed) for run_id, seed in seeds.items()}
    all_uploading(relay, seeds)
    first = holders(relay, seeds)
    assert len(set(first.values())) == 1, first  # one host serves the three runs
    core = [pid for pid in children(relay.pid) if read(pid, "comm").strip() == "wandb-core"]
    assert len(core) == 1 and nice(core[0]) == nice(first["stuck"]) == nice(relay.pid) + 10  # uploader_nice
    fake_wandb.set_fault("hang", "file_stream", run="stuck")  # W&B never answers this run's uploads
    trainers["stuck"].go_on()  # its finish waits for W&B to have everything: it never returns
    relay.wait_log("uploader for run stuck was stuck in a W&B call; restarting it in an uploader process of "
                   "its own", 60)
    # Its host is gone; the others resume in a fresh host and finish, while the stuck run waits.
    for run_id in ("steady-c", "steady-d"):
        finish(relay, trainers[run_id], fake_wandb, run_id, 40, seeds[run_id])
    relay.wait_status(lambda s: holder(relay, "stuck") not in (None, first["stuck"]), 60,
                      "the stuck run in an uploader process of its own")
    assert nice(holder(relay, "stuck")) == nice(relay.pid) + 10
    fake_wandb.set_fault("ok")
    assert trainers["stuck"].event("finished")["report"]["delivered"] is True
    wait_finished(relay, fake_wandb, "stuck", 40, 51)
    assert relay.stop() == 0


def test_a_host_pipe_that_is_full_keeps_what_it_did_not_take_for_later():
    """The server never loses a START: what a host's full wake pipe does not take (the host is
    busy, or still starting) waits, in order and each line once, until the pipe has room."""
    from relay.hosts import Host
    from relay.uploader import RETRY_NOW, WAKE
    from relay.uploader_host import START

    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    os.set_blocking(reader, False)
    host = Host("h", None, writer, -1, -1)
    filler = 0
    while True:
        try:
            os.write(writer, b"w" + b"x" * 30 + b"\n")
            filler += 32
        except BlockingIOError:
            break
    for kind, run_id in [(START, "late"), (WAKE, "late"), (WAKE, "late"), (RETRY_NOW, "late"), (START, "later")]:
        host.tell(kind, run_id)
    assert list(host.unsent) == [b"slate\n", b"wlate\n", b"rlate\n", b"slater\n"]
    got = b""
    while len(got) < filler:
        got += os.read(reader, 65536)
    assert got == (b"w" + b"x" * 30 + b"\n") * (filler // 32)  # the pipe held only the filler
    host.flush()
    assert host.unsent == {}
    assert os.read(reader, 65536) == b"slate\nwlate\nrlate\nslater\n"
    os.close(reader)
    host.tell(WAKE, "gone")  # the host's end is closed: nothing waits for a host that is exiting
    assert host.unsent == {}
    os.close(writer)
