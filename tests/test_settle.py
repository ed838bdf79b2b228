"""The settle rule (relay/settle.py): when W&B's count of a run's rows can be trusted. Pure: counts
and times are given."""
from __future__ import annotations

import pytest

from relay.settle import SETTLE_POLL, Settling

pytestmark = pytest.mark.timeout(30)

LAG = 10.0


def test_a_count_equal_to_the_steps_handed_is_trusted_at_once():
    assert Settling(handed=40, lag=LAG, writers_gone=100.0, now=100.0).look(40, now=100.0) is None


def test_no_count_leaves_it_to_wandb_init():
    assert Settling(handed=40, lag=LAG, writers_gone=100.0, now=100.0).look(None, now=100.0) is None


def test_a_smaller_count_waits_for_the_lag_after_the_last_writer_stopped():
    settling = Settling(handed=40, lag=LAG, writers_gone=100.0, now=101.0)
    why = settling.look(30, now=101.0)
    assert why is not None and "counts 30 of the 40 rows" in why and "in 9 s at most" in why
    assert settling.wait == SETTLE_POLL
    assert settling.look(30, now=109.8) is not None and settling.wait == pytest.approx(0.2)
    assert settling.look(30, now=110.0) is None


def test_a_smaller_count_that_catches_up_is_trusted_when_it_does():
    settling = Settling(handed=40, lag=LAG, writers_gone=100.0, now=100.0)
    assert settling.look(30, now=100.5) is not None
    assert settling.look(40, now=101.0) is None


def test_a_larger_count_must_hold_still_for_the_lag():
    settling = Settling(handed=40, lag=LAG, writers_gone=0.0, now=100.0)
    why = settling.look(50, now=100.0)
    assert why is not None and "more than the 40 handed" in why
    assert settling.look(50, now=109.0) is not None
    assert settling.look(51, now=109.5) is not None   # it moved: the lag starts again
    assert settling.look(51, now=119.0) is not None
    assert settling.look(51, now=119.5) is None


def test_a_writer_gone_long_ago_trusts_a_smaller_count_at_once():
    assert Settling(handed=40, lag=LAG, writers_gone=0.0, now=100.0).look(12, now=100.0) is None
