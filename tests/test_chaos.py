"""Chaos, repeated: relay SIGKILLs and W&B faults at random moments; lost = 0, duplicated = 0."""
from __future__ import annotations

import os
import random

import pytest

from chaos import chaos_round, check_history

ROUNDS = int(os.environ.get("RELAY_CHAOS_ROUNDS", "12"))
SEED = int(os.environ.get("RELAY_CHAOS_SEED", str(random.SystemRandom().randrange(1 << 30))))


@pytest.mark.timeout(120)
@pytest.mark.wandb_lag(2.0)  # W&B counts rows 2 s late (the relay's bound in the tests: 3 s)
@pytest.mark.parametrize("round_index", range(ROUNDS))
def test_chaos_round_loses_and_doubles_nothing(round_index, fake_wandb, relay_factory, trainer_factory):
    seed = SEED + round_index
    rng = random.Random(seed)
    why = "RELAY_CHAOS_SEED=%d (round %d); rerun with that seed to replay the schedule" % (SEED, round_index)
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    steps = rng.randrange(200, 500)
    run_id = "chaos%d" % seed
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": run_id, "steps": steps, "metrics": 6,
                               "seed": seed, "interval": 0.004, "finish_timeout": 60})
    outcome = chaos_round(rng, relay, fake_wandb, [trainer], duration=steps * 0.004)
    print("round %d: %d relay kills, faults %s" % (round_index, outcome.relay_kills, outcome.faults))
    done = trainer.event("finished")
    assert done["report"]["delivered"] is True, why
    assert done["max_latency"] < 0.25, "a log call took %.1f ms; %s" % (done["max_latency"] * 1e3, why)
    fake_wandb.wait_for(lambda: fake_wandb.complete(run_id), 90)
    result = check_history(fake_wandb.run(run_id).history, seed, steps, 6, outcome)
    assert (result.lost, result.duplicated, result.out_of_order) == (0, 0, 0), "%s; %s" % (result, why)
    assert len(fake_wandb.run(run_id).history) == steps, why
