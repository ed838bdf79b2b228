"""W&B counts a run's history lines seconds after they arrive: restarts inside that lag write no row
over another, lose none and double none.

The relay resumes a run only on a count it can trust (see relay/settle.py). Real relay, real
signals, real wandb SDK; the fake W&B counts history lines `lag` seconds after they arrive and
counts every line written over another (the wandb_lag marker fails the test on one).
"""
from __future__ import annotations

import signal
import time

import pytest

from test_e2e import assert_history

pytestmark = pytest.mark.timeout(240)


@pytest.mark.wandb_lag(10.0)
def test_relay_sigkilled_after_the_first_flush_and_restarted_twice_inside_the_lag(fake_wandb, relay_factory,
                                                                                  trainer_factory):
    """A trainer logs at 100 Hz; the relay is SIGKILLed just after wandb-core's first file-stream
    flush, started again 0.3 s later (Docker's `restart: unless-stopped`), and killed and started
    once more 4 s later, all while W&B has counted none of the rows it holds."""
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_WANDB_COUNT_LAG": "10"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "lagkill", "steps": 2000, "metrics": 6,
                               "seed": 41, "interval": 0.01, "finish_timeout": 120})
    fake_wandb.wait_for(lambda f: f.history_rows().get("lagkill", 0) > 0, 60)  # the first flush arrived
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.3)  # the restart delay of the scenario, not a wait for readiness
    relay.start()
    status = relay.wait_status(lambda s: s["runs"] and s["runs"][0]["state"] == "settling", 30,
                               "the run to wait for W&B's count")
    assert "W&B counts 0 of the" in status["runs"][0]["last_error"], status["runs"][0]
    time.sleep(4.0)  # the second restart of the scenario comes 4 s later
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.3)
    relay.start()
    done = trainer.event("finished", timeout=180)
    assert done["report"]["delivered"] is True and done["stats"]["acked"] == 2002
    fake_wandb.wait_for(lambda f: f.complete("lagkill"), 120)
    assert_history(fake_wandb.run("lagkill").history, seed=41, steps=2000, metrics=6)
    assert fake_wandb.overwrites() == 0
    assert fake_wandb.run("lagkill").exit_code == 0


@pytest.mark.wandb_lag(8.0)  # longer than a relay takes to start again
def test_graceful_stop_then_fast_restart_inside_the_lag_continues_after_every_row(fake_wandb, relay_factory,
                                                                                   trainer_factory):
    """A SIGTERM drains the run (every row on W&B, not yet counted); the next relay, started at
    once, takes the trainer's next rows after them, not over them."""
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_WANDB_COUNT_LAG": "8"})
    first = trainer_factory({"endpoint": relay.endpoint, "run_id": "lagstop", "steps": 120, "metrics": 6,
                             "seed": 42, "wait_stdin": True, "flush_before_wait": True})
    first.event("logged")
    relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] == 121 and s["runs"][0]["unsent"] == 0,
                      60, "every record handed to W&B")
    assert relay.stop(signal.SIGTERM) == 0
    assert len(fake_wandb.run("lagstop").history) == 120
    first.proc.kill()  # the trainer dies too; it is started again from its last checkpoint
    first.proc.wait()
    relay.start()
    second = trainer_factory({"endpoint": relay.endpoint, "run_id": "lagstop", "steps": 120, "metrics": 6,
                              "seed": 42, "start_step": 120})
    assert second.event("finished")["report"]["delivered"] is True
    relay.wait_status(lambda s: s["runs"][0]["finished"], 60, "W&B to confirm the run's finish")
    assert_history(fake_wandb.run("lagstop").history, seed=42, steps=240, metrics=6)
    assert fake_wandb.overwrites() == 0
