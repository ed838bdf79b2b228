"""relay.outbox without sockets or threads: seqs, acks, re-sends, overflow, waiting device rows.

The clock is an object the test moves; the spill is a function that keeps what it was given (or
refuses, like a full disk). A hypothesis state machine drives random sequences of events against a
model of where every record is. The whole module runs in a few seconds at most.
"""
from __future__ import annotations

from collections import OrderedDict

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from relay import protocol
from relay.outbox import MAX_DEFERRED, MAX_RESEND_WAIT, Outbox

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Spills:
    """A spill that keeps (stream, seqs) of each file, or fails while `full`."""

    def __init__(self):
        self.files = []
        self.full = False
        self.attempts = 0

    def __call__(self, stream: str, frames: "OrderedDict[int, bytes]"):
        self.attempts += 1
        if self.full:
            return None
        self.files.append((stream, list(frames)))
        return "/spill/%d" % len(self.files)


def make(max_pending: int = 100, opens=(), **kwargs) -> Outbox:
    kwargs.setdefault("clock", Clock())
    kwargs.setdefault("spill", Spills())
    return Outbox("s1", max_pending, resend_after=1.0, reopen=lambda: [dict(m) for m in opens], **kwargs)


def log(outbox: Outbox, step: int, **values) -> None:
    outbox.submit({"t": "log", "run": "r", "metrics": dict(values or {"x": float(step)}), "frame": step})


def seqs(frames) -> list:
    return [seq for seq, _ in frames]


def test_records_get_consecutive_seqs_and_are_packed_as_the_wire_wants():
    outbox = make()
    for step in range(3):
        log(outbox, step)
    assert list(outbox.pending) == [1, 2, 3] and outbox.stats["sent"] == 3
    message = msgpack.unpackb(outbox.pending[2], raw=False)
    protocol.decode(outbox.pending[2])  # the relay's own check accepts it
    assert (message["v"], message["stream"], message["seq"], message["frame"]) == (protocol.VERSION, "s1", 2, 1)


def test_a_value_the_wire_cannot_carry_raises_and_takes_no_seq():
    outbox = make()
    with pytest.raises(TypeError):
        outbox.submit({"t": "log", "run": "r", "metrics": {"x": object()}})
    log(outbox, 0)
    assert list(outbox.pending) == [1]


def test_a_frame_over_the_limit_is_dropped_counted_and_takes_no_seq():
    outbox = make()
    log(outbox, 0, big="y" * (protocol.MAX_FRAME_BYTES + 1))
    log(outbox, 1)
    assert list(outbox.pending) == [1] and outbox.stats["dropped"] == 1
    assert "over the %d-byte frame limit" % protocol.MAX_FRAME_BYTES in outbox.report.last()


def test_take_hands_out_slices_in_order_and_give_back_resumes_at_the_first_refused():
    outbox = make()
    for step in range(10):
        log(outbox, step)
    stream, frames = outbox.take(4)
    assert stream == "s1" and seqs(frames) == [1, 2, 3, 4]
    assert seqs(outbox.take(4)[1]) == [5, 6, 7, 8]
    outbox.give_back("s1", 6)            # the socket took 5, not 6: 6 comes next
    assert seqs(outbox.take(100)[1]) == [6, 7, 8, 9, 10]
    assert outbox.take(100)[1] == [] and not outbox.unsent() and outbox.rewind_due() is not None


def test_acks_upto_and_ranges_remove_records_and_acks_of_another_stream_change_nothing():
    outbox = make()
    for step in range(10):
        log(outbox, step)
    outbox.take(100)
    assert outbox.on_reply({"t": "ack", "stream": "other", "upto": 10, "seqs": [[1, 10]]}) == 0
    assert outbox.on_reply({"t": "ack", "stream": "s1", "upto": 3, "seqs": [[1, 3], [6, 7]]}) == 5
    assert list(outbox.pending) == [4, 5, 8, 9, 10] and outbox.stats["acked"] == 5
    assert outbox.on_reply({"t": "ack", "stream": "s1", "upto": 3, "seqs": [[1, 7]]}) == 2   # duplicates re-acked
    assert outbox.on_reply({"t": "ack", "stream": "s1", "seqs": [[0, 10 ** 9]]}) == 3         # a huge range: cheap
    assert not outbox.pending and outbox.stats["acked"] == 10 and outbox.count() == 0


def test_an_error_reply_removes_its_record_and_is_counted_and_said():
    outbox = make()
    for step in range(3):
        log(outbox, step)
    assert outbox.on_reply({"t": "error", "stream": "s1", "seq": 2, "reason": "bad"}) == 1
    assert outbox.on_reply({"t": "error", "stream": "other", "seq": 3, "reason": "not ours"}) == 0
    assert list(outbox.pending) == [1, 3] and outbox.stats["errors"] == 2
    assert outbox.report.last() == "relay refused record seq=3: not ours"


def test_no_ack_progress_for_resend_after_sends_everything_unacked_again():
    clock = Clock()
    outbox = make(clock=clock)
    for step in range(6):
        log(outbox, step)
    outbox.take(100)                     # a window starts now
    assert outbox.rewind_due() == 1.0 and not outbox.maybe_rewind()
    clock.now += 0.6
    outbox.on_reply({"t": "ack", "stream": "s1", "upto": 2})    # progress: the timer starts again
    clock.now += 0.6
    assert not outbox.maybe_rewind()
    clock.now += 0.5
    assert outbox.rewind_due() == 0.0 and outbox.maybe_rewind()
    assert outbox.stats["resent"] == 4
    assert seqs(outbox.take(100)[1]) == [3, 4, 5, 6]
    assert outbox.rewind_due() == 2.0    # the new window's timer: twice as long, as no ack came


def rewinds_until(outbox: Outbox, clock: Clock, seconds: float) -> list:
    """Move the clock in quarter seconds up to `seconds` later, as the I/O thread would look (and
    send what a rewind gave it); the times of the rewinds, in seconds from the start."""
    start, times = clock.now, []
    while clock.now - start < seconds:
        clock.now += 0.25
        if outbox.maybe_rewind():
            times.append(clock.now - start)
            outbox.take(100)
    return times


def test_each_rewind_no_ack_follows_waits_twice_as_long_up_to_the_cap_and_an_ack_that_removes_one_resets_it():
    assert MAX_RESEND_WAIT == 30.0
    clock = Clock()
    outbox = make(clock=clock)
    for step in range(5):
        log(outbox, step)
    outbox.take(100)                     # a window starts now
    # waits 1, 2, 4, 8, 16, then 30 (the cap) each: not one re-send of everything per second
    assert rewinds_until(outbox, clock, 130.0) == [1.0, 3.0, 7.0, 15.0, 31.0, 61.0, 91.0, 121.0]
    assert outbox.stats["resent"] == 8 * 5 and outbox.resend_wait == MAX_RESEND_WAIT

    clock.now += 2.0
    outbox.on_reply({"t": "ack", "stream": "s1", "upto": 0, "seqs": []})   # removes nothing: no reset
    assert outbox.rewind_due() == 30.0 - 11.0
    outbox.on_reply({"t": "ack", "stream": "s1", "seqs": [[1, 1]]})         # progress: back to resend_after
    assert outbox.rewind_due() == 1.0
    assert rewinds_until(outbox, clock, 8.0) == [1.0, 3.0, 7.0]
    assert outbox.stats["resent"] == 8 * 5 + 3 * 4

    outbox.give_back("s1", 1)            # a new socket: everything pending again at once, whatever the wait
    assert seqs(outbox.take(100)[1]) == [2, 3, 4, 5] and outbox.rewind_due() == 8.0


def test_nothing_in_flight_means_nothing_to_rewind():
    outbox = make()
    log(outbox, 0)
    assert outbox.rewind_due() is None and not outbox.maybe_rewind()


def test_a_new_socket_resends_from_the_oldest_unacked_record():
    outbox = make()
    for step in range(5):
        log(outbox, step)
    outbox.take(100)
    outbox.on_reply({"t": "ack", "stream": "s1", "seqs": [[2, 2]]})
    outbox.give_back("s1", 1)
    assert seqs(outbox.take(100)[1]) == [1, 3, 4, 5]


def test_a_resend_reply_makes_the_rewind_due_now_and_starts_the_backoff_again():
    clock = Clock()
    outbox = make(clock=clock)
    for step in range(4):
        log(outbox, step)
    outbox.take(100)
    assert rewinds_until(outbox, clock, 7.0) == [1.0, 3.0, 7.0]   # held: the backoff grew to 8 s
    assert outbox.resend_wait == 8.0 and outbox.rewind_due() == 8.0
    clock.now += 0.5
    assert outbox.on_reply({"t": "resend", "v": 1}) == 0   # no stream: the client's, whatever its stream
    assert outbox.rewind_due() == 0.0 and outbox.resend_wait == 1.0
    assert outbox.maybe_rewind() and seqs(outbox.take(100)[1]) == [1, 2, 3, 4]
    assert outbox.stats["resent"] == 4 * 4 and outbox.stats["resend_asked"] == 1
    assert outbox.rewind_due() == 2.0   # the backoff from resend_after again: 1 s waited, then 2 s
    outbox.on_reply({"t": "ack", "stream": "s1", "upto": 4})
    assert outbox.rewind_due() is None and outbox.stats["acked"] == 4


def test_a_resend_reply_with_nothing_in_flight_changes_nothing():
    clock = Clock()
    outbox = make(clock=clock)
    outbox.on_reply({"t": "resend", "v": 1})          # nothing pending
    assert outbox.rewind_due() is None and outbox.resend_wait == 1.0
    for step in range(3):
        log(outbox, step)
    outbox.on_reply({"t": "resend", "v": 1})          # pending, none sent yet: they go out anyway
    assert outbox.rewind_due() is None
    assert seqs(outbox.take(100)[1]) == [1, 2, 3] and outbox.rewind_due() == 1.0   # a fresh window's wait
    outbox.on_reply({"t": "ack", "stream": "s1", "upto": 3})
    outbox.on_reply({"t": "resend", "v": 1})          # all acked
    assert outbox.rewind_due() is None and not outbox.maybe_rewind()
    assert outbox.stats["resent"] == outbox.stats["resend_asked"] == 0


def test_reply_kinds_the_client_does_not_know_are_ignored():
    outbox = make()
    log(outbox, 0)
    outbox.take(100)
    assert outbox.on_reply({"t": "something-newer", "v": 1, "stream": "s1", "upto": 1}) == 0
    assert list(outbox.pending) == [1] and outbox.rewind_due() == 1.0


def spill_thread_round(outbox: Outbox) -> bool:
    """One round of the spill thread (relay.spilling.SpillThread.run): write if there is work wanted."""
    spilling = outbox.spilling
    with spilling.write_lock:
        with outbox.lock:
            wanted, spilling.wanted = spilling.wanted, False
        if wanted:
            spilling.write()
    return wanted


def test_overflow_hands_everything_over_without_writing_and_goes_on_in_a_new_stream_that_opens_its_runs_first():
    spills = Spills()
    opens = [{"t": "open", "run": "r", "settings": {"project": "p"}}]
    outbox = make(max_pending=5, opens=opens, spill=spills)
    for step in range(5):
        log(outbox, step)
    outbox.take(2)
    log(outbox, 5)                       # the sixth record: the five pending are handed over first
    assert spills.attempts == 0          # the trainer's call wrote nothing
    assert outbox.spilling.wanted and outbox.spilling.count == 5 and outbox.stream != "s1"
    messages = [msgpack.unpackb(frame, raw=False) for frame in outbox.pending.values()]
    assert [(m["t"], m["seq"], m["stream"]) for m in messages] == [("open", 1, outbox.stream),
                                                                   ("log", 2, outbox.stream)]
    assert seqs(outbox.take(100)[1]) == [1, 2]          # the new stream is sent from its start
    outbox.on_reply({"t": "ack", "stream": "s1", "upto": 5})   # late acks of the old stream: nothing
    assert list(outbox.pending) == [1, 2] and outbox.spilling.count == 5
    assert spill_thread_round(outbox) and spills.files == [("s1", [1, 2, 3, 4, 5])]
    assert (outbox.stats["spilled"], outbox.spilling.count, outbox.spilling.wanted) == (5, 0, False)
    assert not spill_thread_round(outbox) and spills.attempts == 1


def test_while_a_batch_is_being_spilled_the_live_stream_grows_and_is_handed_over_whole_after_it():
    spills = Spills()
    outbox = make(max_pending=5, spill=spills)
    for step in range(12):               # the first five handed over at the sixth; none written yet
        log(outbox, step)
    assert (outbox.spilling.count, len(outbox.pending)) == (5, 7)
    spill_thread_round(outbox)
    log(outbox, 12)                      # the batch is in its file: the seven pending and this one's
    assert (outbox.spilling.count, len(outbox.pending)) == (7, 1)  # predecessors go whole
    spill_thread_round(outbox)
    assert [len(frames) for _, frames in spills.files] == [5, 7] and outbox.stats["spilled"] == 12


def test_a_failed_spill_keeps_its_batch_and_is_tried_again_one_overflow_later():
    spills = Spills()
    spills.full = True
    outbox = make(max_pending=10, spill=spills, max_buffered=1000)
    for step in range(11):
        log(outbox, step)
    spill_thread_round(outbox)           # refused: the ten stay in `spilling`, not pending again
    assert (spills.attempts, outbox.stats["spill_failed"], outbox.spilling.count) == (1, 1, 10)
    for step in range(11, 20):
        log(outbox, step)
    assert not spill_thread_round(outbox) and spills.attempts == 1   # not due before ten more records
    log(outbox, 20)
    assert outbox.spilling.wanted and spill_thread_round(outbox) and spills.attempts == 2
    spills.full = False
    for step in range(21, 31):
        log(outbox, step)
    spill_thread_round(outbox)
    assert spills.files == [("s1", list(range(1, 11)))] and outbox.stats["spilled"] == 10
    assert len(outbox.pending) == 21     # the live stream, handed over at the next record
    log(outbox, 31)
    spill_thread_round(outbox)
    assert [len(frames) for _, frames in spills.files] == [10, 21] and list(outbox.pending) == [1]


def test_past_max_buffered_new_records_are_dropped_counted_and_said_once_each_way():
    spills = Spills()
    spills.full = True
    opens = [{"t": "open", "run": "r", "settings": {"project": "p"}}]
    outbox = make(max_pending=10, opens=opens, spill=spills, max_buffered=25)
    for step in range(40):
        log(outbox, step)
        spill_thread_round(outbox)
        assert len(outbox.pending) + outbox.spilling.count <= 25
    # 10 handed over at the 11th, then the new stream's open and rows 10..23: 25 held; 24..39 dropped
    assert (outbox.spilling.count, len(outbox.pending)) == (10, 15)
    assert (outbox.stats["dropped"], outbox.stats["dropped_full"], outbox.stats["sent"]) == (16, 16, 25)
    started = outbox.report.last()
    assert started.startswith("client buffer full: 25 records held (max_buffered=25), not acked by the relay and "
                              "not in a spill file yet") and "starting with a log record" in started
    assert "free space there, or point RELAY_SPILL_DIR" in started and "raise max_buffered" in started
    spills.full = False
    assert outbox.spill(reopen=True) is not None   # finish: both batches go, the dropping ends
    log(outbox, 40)
    assert outbox.report.errors[-1] == ("client buffer has room again: 16 records were dropped while it was full "
                                        "(policy drop_newest); recording again")
    assert [len(frames) for _, frames in spills.files] == [10, 15]
    assert [msgpack.unpackb(f, raw=False)["t"] for f in outbox.pending.values()] == ["open", "log"]


def test_spill_writes_what_was_handed_over_first_then_the_pending_records_and_what_is_lost_when_it_fails():
    spills = Spills()
    outbox = make(max_pending=3, spill=spills)
    for step in range(5):
        log(outbox, step)
    assert outbox.spill() == "/spill/2" and spills.files == [("s1", [1, 2, 3]), (spills.files[1][0], [1, 2])]
    assert not outbox.pending and outbox.spill() is None and outbox.stats["spilled"] == 5
    log(outbox, 5)
    spills.full = True
    assert outbox.spill() is None and not outbox.pending and outbox.spilling.count == 1
    assert outbox.drop_all() == 1 and outbox.stats["lost"] == 1 and outbox.spilling.count == 0


def test_spill_of_only_what_was_handed_over_leaves_the_pending_records_to_be_sent():
    spills = Spills()
    outbox = make(max_pending=3, spill=spills)
    for step in range(5):
        log(outbox, step)
    assert outbox.spill(pending=False) is None and spills.files == [("s1", [1, 2, 3])]
    assert list(outbox.pending) == [1, 2] and outbox.stats["spilled"] == 3 and outbox.spilling.count == 0
    assert outbox.spill(pending=False) is None and len(spills.files) == 1 and list(outbox.pending) == [1, 2]


class Landing:
    """A device copy that lands when the test says so."""

    def __init__(self, row: dict):
        self.row, self.landed, self.skipped, self.events = row, False, [], [object()]

    def ready(self) -> bool:
        return self.landed

    def values(self) -> dict:
        return {name: getattr(value, "value", value) for name, value in self.row.items()}


class OnDevice:
    class device:
        type = "cuda"

    def __init__(self, value: float):
        self.value = value


def test_device_rows_wait_in_order_and_later_records_queue_behind_them(monkeypatch):
    from relay import tensors

    started = []
    monkeypatch.setattr(tensors, "start_transfer", lambda row: started.append(Landing(row)) or started[-1])
    outbox = make()
    outbox.submit({"t": "log", "run": "r", "metrics": {"loss": OnDevice(0.5)}, "frame": 1})
    log(outbox, 2)
    assert not outbox.pending and outbox.count() == 2
    outbox.deferred.release(wait=False)
    assert not outbox.pending            # the copy has not landed: nothing may pass it
    started[0].landed = True
    outbox.deferred.release(wait=False)
    frames = [msgpack.unpackb(frame, raw=False) for frame in outbox.pending.values()]
    assert [(m["seq"], m["frame"], m["metrics"]) for m in frames] == [(1, 1, {"loss": 0.5}), (2, 2, {"x": 2.0})]


def test_at_most_max_deferred_device_rows_wait(monkeypatch):
    from relay import tensors

    started = []
    monkeypatch.setattr(tensors, "start_transfer", lambda row: started.append(Landing(row)) or started[-1])
    outbox = make(max_pending=1000)
    for step in range(MAX_DEFERRED + 1):
        outbox.submit({"t": "log", "run": "r", "metrics": {"loss": OnDevice(step)}, "frame": step})
    assert len(outbox.pending) == MAX_DEFERRED and len(outbox.deferred) == 1   # waited for the 64 oldest


# -- a model: every accepted record is in exactly one place, whatever the order of events --------

class Ledger(RuleBasedStateMachine):
    """Random records, sends, socket refusals, acks (of this stream and of older ones), errors,
    re-send timers, overflows with a disk that is sometimes full, the spill thread's rounds, and
    spills. After each step every record accepted is in exactly one of: pending, being spilled,
    acked, refused, a spill file; at most max_buffered are held; and the counters say so."""

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.spills = Spills()
        self.outbox = make(max_pending=7, opens=[{"t": "open", "run": "r", "settings": {"project": "p"}}],
                           clock=self.clock, spill=self.spills, max_buffered=20)
        self.accepted = []       # (stream, seq) of every record accepted
        self.acked, self.refused = set(), set()
        self.streams = [self.outbox.stream]
        self.step = 0
        self.opens = 0           # open records a new stream began with

    def _held(self) -> set:
        return {(self.outbox.stream, seq) for seq in self.outbox.pending} | {
            (stream, seq) for stream, frames in self.outbox.spilling.batches for seq in frames}

    def _accepting(self, action) -> None:
        before = self._held() | self._spilled()
        action()
        if self.outbox.stream not in self.streams:
            self.streams.append(self.outbox.stream)
            first = self.outbox.pending.get(1)
            self.opens += first is not None and msgpack.unpackb(first, raw=False)["t"] == "open"
        new = self._held() | self._spilled()
        self.accepted.extend(sorted(new - before, key=lambda key: key[1]))

    def _spilled(self) -> set:
        return {(stream, seq) for stream, seqs in self.spills.files for seq in seqs}

    def _accept(self) -> None:
        self._accepting(lambda: log(self.outbox, self.step))
        self.step += 1

    @rule(count=st.integers(1, 5))
    def records(self, count):
        for _ in range(count):
            self._accept()

    @rule(budget=st.integers(1, 6), refused_at=st.integers(0, 6))
    def send(self, budget, refused_at):
        stream, frames = self.outbox.take(budget)
        if refused_at < len(frames):  # the socket took the first `refused_at` frames only
            self.outbox.give_back(stream, frames[refused_at][0])

    @rule(which=st.integers(0, 3), upto=st.integers(0, 12), low=st.integers(0, 12), width=st.integers(0, 4))
    def ack(self, which, upto, low, width):
        stream = self.streams[-1 - min(which, len(self.streams) - 1)]
        current = stream == self.outbox.stream
        # the relay acks only what it was sent: here, what is pending or was acked before
        known = set(self.outbox.pending) if current else set()
        upto_seqs = {seq for seq in known if seq <= upto}
        range_seqs = {seq for seq in known if low <= seq <= low + width}
        self.outbox.on_reply({"t": "ack", "stream": stream, "upto": upto, "seqs": [[low, low + width]]})
        self.acked |= {(stream, seq) for seq in upto_seqs | range_seqs}

    @rule(seq=st.integers(1, 12))
    def error(self, seq):
        if seq in self.outbox.pending:
            self.refused.add((self.outbox.stream, seq))
        self.outbox.on_reply({"t": "error", "stream": self.outbox.stream, "seq": seq, "reason": "no"})

    @rule(seconds=st.floats(0, 2))
    def time_passes(self, seconds):
        self.clock.now += seconds
        self.outbox.maybe_rewind()

    @rule(full=st.booleans())
    def disk(self, full):
        self.spills.full = full

    @rule()
    def spill_thread(self):
        spill_thread_round(self.outbox)

    @rule(reopen=st.booleans())
    def spill(self, reopen):
        self._accepting(lambda: self.outbox.spill(reopen=reopen))

    @invariant()
    def every_record_in_exactly_one_place(self):
        pending = {(self.outbox.stream, seq) for seq in self.outbox.pending}
        spilling = self._held() - pending
        spilled = self._spilled()
        places = [pending, spilling, self.acked, self.refused, spilled]
        assert sum(len(place) for place in places) == len(self.accepted) == len(set(self.accepted))
        assert set().union(*places) == set(self.accepted)
        stats = self.outbox.stats
        assert stats["sent"] == len(self.accepted)
        assert (stats["acked"], stats["spilled"], len(self.outbox.pending), self.outbox.spilling.count) == (
            len(self.acked), len(spilled), len(pending), len(spilling))
        assert len(pending) + len(spilling) <= 20 + 1   # max_buffered, and the open of a new stream (one run)
        assert stats["sent"] + stats["dropped"] == self.step + self.opens   # every record offered is counted
        assert list(self.outbox.pending) == sorted(self.outbox.pending)
        assert 1 <= self.outbox.cursor <= self.outbox.seq + 1   # what is sent next is a seq of this stream
        assert 1.0 <= self.outbox.resend_wait <= MAX_RESEND_WAIT   # the re-send backoff stays within its bounds


Ledger.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_the_ledger_model = Ledger.TestCase
