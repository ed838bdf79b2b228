"""The upload cadence: live runs together stay within `upload_requests` W&B file-stream requests a
second (relay/cadence.py). The rule with a fake clock, then 30 live runs through a real relay,
real wandb-core and the fake W&B, counting what reaches it."""
from __future__ import annotations

import time

import pytest

from relay.cadence import HAND_OVER, Cadence, phase, upload_interval
from relay.client import RelayClient
from relay.config import RelayConfig
from test_e2e import assert_history
from workload import frame, row


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_upload_interval_stretches_with_live_runs_past_the_budget():
    config = RelayConfig(upload_interval=2.0, upload_requests=20.0)
    assert [upload_interval(config, n) for n in (0, 1, 40, 41, 200)] == [2.0, 2.0, 2.0, 41 / 20, 10.0]


def test_within_the_budget_rows_go_as_they_come():
    live = [40]  # 40 runs x 1 request / 2 s = 20 requests/s: the budget
    clock = Clock()
    cadence = Cadence(RelayConfig(upload_interval=2.0, upload_requests=20.0), lambda: live[0], clock)
    for _ in range(5):
        assert cadence.wait() == 0.0
        cadence.handed_rows()
        clock.now += 0.3


def test_past_the_budget_rows_go_in_bursts_whose_pace_follows_the_live_runs():
    live = [200]  # 200 runs / 20 per s: a request every 10 s per run, two per burst: a burst every 20 s
    clock = Clock()
    cadence = Cadence(RelayConfig(upload_interval=2.0, upload_requests=20.0), lambda: live[0], clock)
    assert cadence.wait() == 0.0              # the open, the config: nothing waits for them
    clock.now += 3.0
    assert cadence.wait() == 0.0              # nor for the first rows: the first burst begins with them
    cadence.handed_rows()
    clock.now += HAND_OVER / 2
    assert cadence.wait() == 0.0              # and goes on for HAND_OVER seconds
    clock.now += HAND_OVER
    assert cadence.wait() == pytest.approx(20.0 - 1.5 * HAND_OVER)
    clock.now += 10.0
    live[0] = 100                             # half the runs finished: a burst every 10 s
    assert cadence.wait() == 0.0
    clock.now += 5.0
    live[0] = 400                             # more runs came: the next burst waits 40 s from the last
    assert cadence.wait() == pytest.approx(35.0)
    live[0] = 10                              # within the budget again: at once
    assert cadence.wait() == 0.0


def test_runs_opened_together_spread_their_bursts_over_the_gap():
    """1,000 runs open at once (1,000 / 20 per s: a burst every 100 s each). Each bursts at once,
    then after its phase of the gap, then a whole gap apart: every 10 s of a gap holds about a
    tenth of the bursts, not all of them."""
    clock = Clock()
    run_ids = ["many-1000-%04d" % i for i in range(1000)]
    runs = {run_id: Cadence(RelayConfig(upload_interval=2.0, upload_requests=20.0), lambda: 1000, clock,
                            phase(run_id)) for run_id in run_ids}
    assert [cadence.wait() for cadence in runs.values()] == [0.0] * 1000  # first rows are not held
    for cadence in runs.values():
        cadence.handed_rows()
    opened = clock.now
    clock.now += HAND_OVER
    bursts: dict[str, list[float]] = {run_id: [] for run_id in run_ids}
    while clock.now < opened + 320.0:  # the clock moves a second at a time
        clock.now += 1.0
        for run_id, cadence in runs.items():
            if cadence.wait() == 0.0 and cadence.burst_began == clock.now:
                bursts[run_id].append(clock.now)
    for run_id, times in bursts.items():
        due = opened + 100.0 * phase(run_id)  # its phase of the first gap (then the next tick)
        assert due <= times[0] < max(due, opened + 1.0) + 1.0
        assert [round(b - a) for a, b in zip(times, times[1:])] == [100] * (len(times) - 1)  # then whole gaps
    in_a_gap = [t for times in bursts.values() for t in times if opened + 200.5 <= t < opened + 300.5]
    per_window = [sum(1 for t in in_a_gap if opened + start + 0.5 <= t < opened + start + 10.5)
                  for start in range(200, 300, 10)]
    assert len(in_a_gap) == 1000 and max(per_window) <= 150 and min(per_window) >= 50, per_window
    assert 0.0 < phase("a") <= 1.0 and phase("a") == phase("a")


def test_a_run_past_the_budget_waits_its_phase_of_the_gap_once():
    live = [10]
    clock = Clock()
    cadence = Cadence(RelayConfig(upload_interval=2.0, upload_requests=20.0), lambda: live[0], clock, phase=0.25)
    assert cadence.wait() == 0.0
    cadence.handed_rows()
    clock.now += 1.0
    assert cadence.wait() == 0.0              # within the budget: as they come
    live[0] = 200                             # a burst every 20 s from now on: the first after a quarter of it
    clock.now += 1.0
    assert cadence.wait() == pytest.approx(5.0 - 1.0)
    clock.now += 4.0
    assert cadence.wait() == 0.0
    clock.now += HAND_OVER
    assert cadence.wait() == pytest.approx(20.0 - HAND_OVER)


BUDGET, RUNS, WINDOW = 6.0, 30, 15.0  # 30 runs / 6 per s: a request every 5 s per run, a burst every 10 s


@pytest.mark.timeout(150)
def test_thirty_live_runs_stay_within_the_request_budget(fake_wandb, relay_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"], env={"RELAY_UPLOAD_REQUESTS": str(BUDGET)})
    client = RelayClient(relay.endpoint)
    run_ids = ["cadence%02d" % i for i in range(RUNS)]
    runs = [client.start_run(project="cadence", run_id=run_id) for run_id in run_ids]
    began = time.monotonic()
    steady_from = steady_to = None
    step = 0
    while steady_to is None or time.time() < steady_to:  # a row a second per run, as trainers log
        for index, run in enumerate(runs):
            run.log(row(index, step, 4), frame=frame(step), epoch=step + 1)
        step += 1
        if steady_from is None and all(n > 0 for n in fake_wandb.history_rows().values()) \
                and len(fake_wandb.history_rows()) == RUNS:
            steady_from = time.time()  # every run is uploading
            steady_to = steady_from + WINDOW
        assert time.monotonic() - began < 90, "the runs did not all reach W&B: %s" % fake_wandb.history_rows()
        time.sleep(max(0.0, began + step - time.monotonic()))
    posts = {run_id: fake_wandb.run(run_id).post_times for run_id in run_ids}
    in_window = sum(1 for times in posts.values() for t in times if steady_from <= t <= steady_to)
    rate = in_window / WINDOW
    # Before the cadence, each run's wandb-core sent every 2 s: 15 requests/s here.
    assert rate <= BUDGET * 1.5, "%.1f file-stream requests/s for a budget of %.0f/s" % (rate, BUDGET)
    assert rate >= BUDGET * 0.5, "%.1f requests/s: the runs upload far slower than the budget allows" % rate
    reports = [run.finish(exit_code=0, timeout=60) for run in runs]
    client.close()
    assert all(report["delivered"] for report in reports), reports
    fake_wandb.wait_for(lambda: all(fake_wandb.complete(run_id) for run_id in run_ids), 60)
    for index, run_id in enumerate(run_ids):
        assert_history(fake_wandb.run(run_id).history, seed=index, steps=step, metrics=4)
