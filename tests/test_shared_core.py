"""The uploaders share one wandb-core, and a failure of it, or within it, loses and doubles nothing.

See relay/sinks/wandb.py (module docstring) for the design: one wandb-core started by the server,
streams left open in it closed by the next uploader of their run, and a wandb-core of its own
for a run that the shared one fails. Real relay, real wandb-core, the fake W&B backend, real
signals; outcomes are exact histories.
"""
from __future__ import annotations

import glob
import os
import signal
import sqlite3

import pytest

from harness import ROOT, lock_holder, wait_gone, wandb_cores
from test_e2e import assert_history

# W&B counts history rows 2 s after they arrive (the relay's bound in the tests: 3 s).
pytestmark = [pytest.mark.timeout(240), pytest.mark.wandb_lag(2.0)]

LEFT_OPEN = "left open in the shared wandb-core"
OWN_CORE = "goes on with a wandb-core of its own"


def paused_trainer(trainer_factory, relay, run_id, steps, seed):
    """A trainer that logs `steps` rows, hands them to the relay and waits for go_on() to finish."""
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": run_id, "steps": steps, "metrics": 6,
                               "seed": seed, "wait_stdin": True, "flush_before_wait": True})
    trainer.event("logged")
    return trainer


def finish(trainer, relay, fake, run_id, steps, seed):
    """Let the trainer finish; once the relay has finished the run in W&B (not before: a stream
    left open and closed may have marked it complete already), W&B holds every row exactly once."""
    trainer.go_on()
    assert trainer.event("finished")["report"]["delivered"] is True
    relay.wait_status(lambda s: relay_run(s, run_id)["finished"], 120, "run %s finished in W&B" % run_id)
    assert fake.complete(run_id)
    assert_history(fake.run(run_id).history, seed=seed, steps=steps, metrics=6)
    assert fake.run(run_id).exit_code == 0


def relay_run(status: dict, run_id: str) -> dict:
    return next(run for run in status["runs"] if run["run_id"] == run_id)


def steps_assigned(relay, run_id) -> int:
    """How many of the run's rows the uploader has handed to the SDK (their step is committed first)."""
    conn = sqlite3.connect("file:%s?mode=ro" % os.path.join(relay.spool_dir, "spool.sqlite"), uri=True)
    try:
        return conn.execute("SELECT count(*) FROM records r JOIN steps s ON s.id = r.id WHERE r.run_id = ? "
                            "AND r.kind = 'log'", (run_id,)).fetchone()[0]
    finally:
        conn.close()


def test_runs_share_one_wandb_core_started_by_the_relay(fake_wandb, relay_factory, trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainers = {run_id: paused_trainer(trainer_factory, relay, run_id, 40, seed)
                for run_id, seed in (("share-a", 31), ("share-b", 32))}
    relay.wait_status(lambda s: sorted((r["run_id"], r["state"], r["unsent"]) for r in s["runs"])
                      == [("share-a", "uploading", 0), ("share-b", "uploading", 0)], 60, "both runs in W&B")
    cores = wandb_cores(relay.proc.pid)
    assert list(cores.values()) == [relay.proc.pid], "expected one wandb-core, the relay's child: %s" % cores
    for (run_id, trainer), seed in zip(trainers.items(), (31, 32)):
        finish(trainer, relay, fake_wandb, run_id, 40, seed)
    assert relay.stop() == 0
    wait_gone(next(iter(cores)), 10)  # the relay stops its wandb-core too
    assert OWN_CORE not in relay.log() and LEFT_OPEN not in relay.log()
    # No transaction log of an online run (the spool holds what W&B has not confirmed), only its logs.
    runs = glob.glob(os.path.join(relay.spool_dir, "wandb", "run-*"))
    assert sorted(path.rsplit("-", 2)[-2:] for path in runs) == [["share", "a"], ["share", "b"]]
    assert glob.glob(os.path.join(relay.spool_dir, "wandb", "run-*", "*.wandb")) == []


def test_uploader_killed_mid_run_its_stream_is_closed_and_the_run_resumes_exactly_once(fake_wandb, relay_factory,
                                                                                       trainer_factory):
    # file_stream hangs: the rows the uploader hands over stay in the shared core's stream for the run.
    fake_wandb.set_fault("hang", "file_stream")
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = paused_trainer(trainer_factory, relay, "orphan", 120, 33)
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "uploading"
                      and steps_assigned(relay, "orphan") == 120, 60, "120 rows handed to wandb-core")
    uploader = lock_holder(relay.spool_dir, "orphan")
    os.kill(uploader, signal.SIGKILL)
    relay.wait_log("uploader for run orphan exited with code -9", 30)
    fake_wandb.set_fault("ok")
    relay.wait_log(LEFT_OPEN, 60)
    finish(trainer, relay, fake_wandb, "orphan", 120, 33)
    log = relay.log()
    assert OWN_CORE not in log
    assert list(wandb_cores(relay.proc.pid).values()) == [relay.proc.pid]


# Loaded by the relay's processes (sitecustomize, written by the test): the first Run.finish of
# TEST_FAULT_RUN, the close of its stream left open, raises as the SDK can, after finishing the
# stream ("after") or before ("before": the stream is still open).
FINISH_RAISES_ONCE = """
import os
import wandb.sdk.wandb_run as wandb_run
from wandb.sdk.mailbox.mailbox import MailboxClosedError

_finish = wandb_run.Run.finish


def finish(self, *args, **kwargs):
    if self.id == os.environ.get("TEST_FAULT_RUN"):
        flag = os.environ["TEST_FAULT_FLAG"]
        try:
            os.rename(flag, flag + ".used")  # once, atomically
        except FileNotFoundError:
            return _finish(self, *args, **kwargs)
        if os.environ["TEST_FAULT_WHEN"] == "after":
            _finish(self, *args, **kwargs)
        raise MailboxClosedError("injected")
    return _finish(self, *args, **kwargs)


wandb_run.Run.finish = finish
"""


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_close_of_the_stream_left_open_that_raises_is_judged_by_the_next_init(fake_wandb, relay_factory,
                                                                                trainer_factory, tmp_path, when):
    # The SDK's finish of the stream left open raises (as wandb 0.31's does at times once the stream
    # has ended): the run stays on the shared core; a stream still open is closed again first.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FINISH_RAISES_ONCE)
    flag = tmp_path / "fault-flag"
    flag.write_text("")
    fake_wandb.set_fault("hang", "file_stream")
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={
        "PYTHONPATH": os.pathsep.join([str(hook), ROOT]), "TEST_FAULT_RUN": "raises", "TEST_FAULT_FLAG": str(flag),
        "TEST_FAULT_WHEN": when})
    trainer = paused_trainer(trainer_factory, relay, "raises", 50, 37)
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "uploading"
                      and steps_assigned(relay, "raises") == 50, 60, "50 rows handed to wandb-core")
    os.kill(lock_holder(relay.spool_dir, "raises"), signal.SIGKILL)
    relay.wait_log("uploader for run raises exited with code -9", 30)
    fake_wandb.set_fault("ok")
    relay.wait_log("run raises started in W&B mode online", 60, seen=1)  # started again
    assert not flag.exists()
    finish(trainer, relay, fake_wandb, "raises", 50, 37)
    log = relay.log()
    assert "closing the stream left open raised MailboxClosedError: injected" in log
    assert log.count("closing its stream " + LEFT_OPEN) == (1 if when == "after" else 2)  # before: closed again
    assert OWN_CORE not in log
    assert list(wandb_cores(relay.proc.pid).values()) == [relay.proc.pid]


def test_init_failed_on_the_shared_core_then_wandb_back_resumes_there(fake_wandb, relay_factory, trainer_factory):
    # W&B answers the relay's own query but fails the run's start: wandb.init fails inside the shared
    # core and leaves the run's id registered there, which the next try must clear.
    fake_wandb.set_fault("503", "run_init")
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_INIT_TIMEOUT": "2"})
    trainer = paused_trainer(trainer_factory, relay, "flaky", 30, 34)
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "retrying", 60, "init retrying")
    fake_wandb.set_fault("ok")
    relay.wait_log(LEFT_OPEN, 60)
    finish(trainer, relay, fake_wandb, "flaky", 30, 34)
    assert OWN_CORE not in relay.log()
    assert list(wandb_cores(relay.proc.pid).values()) == [relay.proc.pid]


def test_shared_core_killed_mid_run_runs_go_on_with_their_own_and_lose_nothing(fake_wandb, relay_factory,
                                                                               trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = paused_trainer(trainer_factory, relay, "corekill", 80, 35)
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "uploading"
                      and steps_assigned(relay, "corekill") == 80, 60, "80 rows handed to wandb-core")
    (core,) = wandb_cores(relay.proc.pid)
    os.kill(core, signal.SIGKILL)
    relay.wait_log("the shared wandb-core exited", 30)
    finish(trainer, relay, fake_wandb, "corekill", 80, 35)  # the finish meets the dead core: the uploader restarts
    log = relay.log()
    assert "uploader for run corekill exited with code 1" in log
    assert fake_wandb.run("corekill").exit_code == 0


def test_init_failing_twice_on_the_shared_core_the_run_goes_on_with_its_own(fake_wandb, relay_factory,
                                                                            trainer_factory):
    fake_wandb.set_fault("503", "run_init")
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_INIT_TIMEOUT": "2"})
    trainer = paused_trainer(trainer_factory, relay, "twice", 30, 36)
    relay.wait_log(OWN_CORE, 60)  # failed, closed the stream it left, failed again
    assert relay.log().count(LEFT_OPEN) == 1
    fake_wandb.set_fault("ok")
    relay.wait_log("run twice started in W&B mode online", 60)
    uploader = lock_holder(relay.spool_dir, "twice")
    assert sorted(wandb_cores(relay.proc.pid).values()) == sorted([relay.proc.pid, uploader])
    finish(trainer, relay, fake_wandb, "twice", 30, 36)
