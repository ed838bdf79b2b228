"""Timing decisions: timeouts on the monotonic clock (a wall-clock jump finishes no live run), and when
the relay gives up waiting for acked records that neither the spool nor the client holds.

The silence decision as pure bookkeeping with an injected clock, and a real relay whose wall clock
jumps 20 minutes (libfaketime, `apt-get install libfaketime`; skipped without it).
"""
from __future__ import annotations

import glob
import os
import time

import pytest

from relay.server import SilenceWatch

pytestmark = pytest.mark.timeout(120)

LIBFAKETIME = (glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
               + [None])[0]


def test_silence_watch_counts_from_the_last_record_or_heartbeat_and_forgets_what_it_reported():
    watch = SilenceWatch(timeout=600)
    watch.heard(["a", "b"], now=1000.0)
    watch.heard(["b"], now=1500.0)
    assert watch.silent(now=1599.9) == []
    assert watch.silent(now=1600.0) == ["a"]
    assert watch.silent(now=1601.0) == []          # reported once
    assert watch.silent(now=2100.0) == ["b"]
    watch.heard(["a"], now=2200.0)                 # a trainer that comes back is watched again
    assert watch.silent(now=2799.0) == [] and watch.silent(now=2800.0) == ["a"]
    assert SilenceWatch(timeout=0).silent(now=1e12) == []


@pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime is not installed (apt-get install libfaketime)")
def test_a_wall_clock_jump_does_not_finish_a_heartbeating_run_and_silence_still_counts(
        relay_factory, trainer_factory, tmp_path):
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    relay = relay_factory(None, ["--mode", "disabled"], env={
        "LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1", "RELAY_SILENCE_TIMEOUT": "10"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "jump", "steps": 20, "metrics": 4, "seed": 51,
                               "heartbeat_every": 4, "wait_stdin": True, "flush_before_wait": True})
    trainer.event("logged")
    first = relay.wait_status(lambda s: s["runs"] and s["runs"][0]["received"] == 21, 30, "the run spooled")
    # Jump just after a heartbeat was noted: the relay scans for silent runs (every second) several
    # times before the next heartbeat (4 s later) can be noted.
    seen = relay.wait_status(lambda s: s["runs"][0]["last_seen"] > first["runs"][0]["last_seen"], 30,
                             "a heartbeat")["runs"][0]["last_seen"]
    clock.write_text("+20m\n")
    after = relay.wait_status(lambda s: s["runs"][0]["last_seen"] > seen + 1000, 30,
                              "a heartbeat noted on the jumped wall clock")
    assert after["runs"][0]["last_seen"] > time.time() + 1000, "the relay's wall clock did not jump"
    assert not after["runs"][0]["finished"], "a live run was finished after a wall-clock jump"
    assert "no record or heartbeat from its trainer" not in relay.log()
    # Silence still counts, on the monotonic clock: a dead trainer's run is finished 10 s later.
    trainer.proc.kill()
    trainer.proc.wait()
    killed = time.monotonic()
    done = relay.wait_status(lambda s: s["runs"][0]["finished"], 40, "the silent run to be finished")
    assert done["runs"][0]["exit_code"] == 1
    assert time.monotonic() - killed >= 10 - 4  # its last heartbeat came at most 4 s before the kill
    assert relay.log().count("run jump: no record or heartbeat from its trainer for 10 s") == 1
    assert relay.stop() == 0


def test_gap_watch_gives_up_only_after_three_passes_start_at_the_same_seq_past_the_gap():
    from relay.server import GapWatch

    watch = GapWatch()
    # upto is 100; the client holds 150..152 (101..149 were acked, then lost with the spool).
    assert [watch.past_gap("s", seq) for seq in (150, 151, 152)] == [None, None, None]   # first sends
    assert [watch.past_gap("s", seq) for seq in (150, 151, 152)] == [None, None, None]   # pass 1
    assert [watch.past_gap("s", seq) for seq in (140, 141)] == [None, None]              # late messages: a pass at 140
    for _ in range(3):  # the count starts again: not a pass (it goes up from 141), then passes 1 and 2
        assert [watch.past_gap("s", seq) for seq in (150, 151, 152)] == [None, None, None]
    assert watch.past_gap("s", 150) == 150                                               # pass 3: held by no one
    assert watch.streams == {}
    # A gap the client fills (its pass starts at upto + 1, which is taken) is never given up.
    for _ in range(5):
        assert watch.past_gap("t", 8) is None   # past the gap: 7 is on its way
        watch.filled("t")                       # 7 came (then 8 is taken too)
    assert watch.streams == {}
