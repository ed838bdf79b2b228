"""Chaos for the relay: trainers log at a steady rate while the relay is SIGKILLed and restarted at
random moments and the W&B backend flips between ok, hang and 503. Used by tests/test_chaos.py
(short rounds in the default suite) and bench/soak.py (many clients, many minutes).

Every random choice comes from one seeded generator; the seed is in every failure message.
"""
from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass, field

from workload import metric_names, row, same_value

FAULTS = ("ok", "hang", "503")


@dataclass
class Outcome:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    max_latency: float = 0.0
    relay_kills: int = 0
    faults: list = field(default_factory=list)


def chaos_round(rng: random.Random, relay, fake, trainers: list, duration: float,
                pause: tuple = (0.05, 0.5)) -> Outcome:
    """Disturb a running relay for `duration` seconds: kill/restart it, flip the backend's faults."""
    outcome = Outcome()
    end = time.monotonic() + duration
    first = True
    while time.monotonic() < end or first:
        time.sleep(rng.uniform(*pause))  # the chaos schedule itself, not a readiness wait
        if not any(t.proc.poll() is None for t in trainers):
            break
        action = rng.random()
        if first or action < 0.4:  # every round kills the relay at least once
            relay.stop(signal.SIGKILL)
            relay.start(wait=rng.random() < 0.5)  # sometimes trainers reconnect before it answers
            outcome.relay_kills += 1
            first = False
        else:
            fault = rng.choice(FAULTS)
            fake.set_fault(fault)
            outcome.faults.append(fault)
    fake.set_fault("ok")
    if relay.proc.poll() is not None:
        relay.start()
    return outcome


def check_history(history: list, seed: int, steps: int, metrics: int, outcome: Outcome) -> Outcome:
    """Count lost, duplicated and out-of-order rows of one run against what its trainer logged."""
    seen: dict[int, int] = {}
    last = -1
    names = metric_names(metrics)
    for got in history:
        if got is None:
            continue
        step = got.get("epoch", 0) - 1
        expected = row(seed, step, metrics)
        if 0 <= step < steps and all(same_value(got.get(n), expected[n]) for n in names):
            seen[step] = seen.get(step, 0) + 1
            outcome.out_of_order += step < last
            last = step
    outcome.sent += steps
    outcome.delivered += len(seen)
    outcome.lost += steps - len(seen)
    outcome.duplicated += sum(count - 1 for count in seen.values())
    return outcome
