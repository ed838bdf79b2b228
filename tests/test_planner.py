"""The uploader's row planner (relay/planner.py): steps, same-frame coalescing, the finish boundary.
No sockets, no wandb, no spool."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.planner import MEDIA_WAIT, MediaValue, Row, plan, ready, row_values

pytestmark = pytest.mark.timeout(60)


@dataclass
class R:
    id: int
    kind: str
    body: dict


def log(rid, frame=None, ns=None, epoch=None, **metrics):
    body = {"metrics": metrics or {"x": rid}}
    for key, value in (("frame", frame), ("ns", ns), ("epoch", epoch)):
        if value is not None:
            body[key] = value
    return R(rid, "log", body)


def other(rid, kind):
    return R(rid, kind, {"exit_code": 0} if kind == "finish" else {})


def shape(items):
    return [(item.step, item.values) if isinstance(item, Row) else item.kind for item in items]


def test_each_log_record_gets_the_next_step():
    p = plan([log(1), log(2), log(3)], next_step=7)
    assert p.steps == [(1, 7), (2, 8), (3, 9)]
    assert p.next_step == 10 and p.through_id == 3
    assert shape(p.items) == [(7, {"x": 1}), (8, {"x": 2}), (9, {"x": 3})]


def test_consecutive_records_of_one_frame_are_one_row():
    p = plan([log(1, frame=5, a=1), log(2, frame=5, ns="eval", b=2), log(3, frame=6, a=3)], next_step=0)
    assert p.steps == [(1, 0), (2, 0), (3, 1)]
    assert shape(p.items) == [(0, {"a": 1, "eval/b": 2, "frame": 5}), (1, {"a": 3, "frame": 6})]
    assert p.next_step == 2


def test_records_without_a_frame_are_never_merged():
    p = plan([log(1, a=1), log(2, a=2)], next_step=0)
    assert p.steps == [(1, 0), (2, 1)]


def test_a_later_record_of_the_same_frame_overrides_a_value():
    p = plan([log(1, frame=3, a=1), log(2, frame=3, a=2)], next_step=0)
    assert shape(p.items) == [(0, {"a": 2, "frame": 3})]


def test_a_summary_or_checkpoint_between_rows_ends_the_row_and_stays_in_place():
    records = [log(1, frame=4, a=1), other(2, "summary"), log(3, frame=4, b=2), other(4, "checkpoint"),
               log(5, frame=5, c=3)]
    p = plan(records, next_step=10)
    assert p.steps == [(1, 10), (3, 11), (5, 12)]
    assert shape(p.items) == [(10, {"a": 1, "frame": 4}), "summary", (11, {"b": 2, "frame": 4}), "checkpoint",
                              (12, {"c": 3, "frame": 5})]


def test_console_meta_and_system_records_take_no_step_and_do_not_end_a_row():
    records = [log(1, frame=4, a=1), other(2, "system"), log(3, frame=4, b=2), other(4, "meta"),
               other(6, "console"), log(5, frame=4, c=3), log(7, frame=5)]
    p = plan(records, next_step=0)
    assert p.steps == [(1, 0), (3, 0), (5, 0), (7, 1)] and p.next_step == 2
    assert shape(p.items) == [(0, {"a": 1, "b": 2, "c": 3, "frame": 4}), "system", "meta", "console",
                              (1, {"x": 7, "frame": 5})]
    assert plan([other(1, "system")], next_step=3).through_id == 1


def test_a_finish_ends_the_plan():
    p = plan([log(1), other(2, "finish"), other(3, "open"), log(4)], next_step=0)
    assert p.through_id == 2 and p.steps == [(1, 0)] and p.next_step == 1
    assert shape(p.items) == [(0, {"x": 1}), "finish"]


def test_a_batch_of_other_records_takes_no_step():
    p = plan([other(1, "open"), other(2, "summary")], next_step=3)
    assert p.steps == [] and p.next_step == 3 and p.through_id == 2


def test_a_log_record_without_values_takes_a_step_but_makes_no_row():
    p = plan([R(1, "log", {"metrics": {}}), log(2)], next_step=0)
    assert p.steps == [(1, 0), (2, 1)]
    assert shape(p.items) == [(1, {"x": 2})]


def test_row_values_prefix_the_namespace_and_keep_the_axes():
    assert row_values({"metrics": {"r": 1.5}, "ns": "train", "frame": 9, "epoch": 2}) == \
        {"train/r": 1.5, "frame": 9, "epoch": 2}
    assert row_values({"metrics": {"r": 1}, "frame": None}) == {"r": 1}


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError):
        plan([], next_step=0)


KINDS = st.sampled_from(["log", "log", "log", "log", "summary", "checkpoint", "open", "finish", "system", "meta"])
SIDE = ("system", "meta")


@st.composite
def batches(draw):
    kinds = draw(st.lists(KINDS, min_size=1, max_size=40))
    frames = draw(st.lists(st.sampled_from([None, 1, 2, 3]), min_size=len(kinds), max_size=len(kinds)))
    return [log(i + 1, frame=f) if k == "log" else other(i + 1, k) for i, (k, f) in enumerate(zip(kinds, frames))]


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(min_value=0, max_value=10**9))
def test_plans_keep_every_rule(records, next_step):
    p = plan(records, next_step)
    finish = next((r.id for r in records if r.kind == "finish"), None)
    covered = [r for r in records if finish is None or r.id <= finish]
    assert p.through_id == covered[-1].id
    assert [rid for rid, _ in p.steps] == [r.id for r in covered if r.kind == "log"]
    steps = [step for _, step in p.steps]
    # Steps start at next_step and go up by one per row, never back.
    assert steps == sorted(steps) and all(b - a in (0, 1) for a, b in zip(steps, steps[1:]))
    assert not steps or steps[0] == next_step
    assert p.next_step == (steps[-1] + 1 if steps else next_step)
    # Two records share a step exactly when they are consecutive log records of one frame (side
    # records between them do not count).
    by_id = {r.id: r for r in records}
    for (a, sa), (b, sb) in zip(p.steps, p.steps[1:]):
        between = [by_id[i].kind for i in range(a + 1, b)]
        merged = all(kind in SIDE for kind in between) and by_id[a].body.get("frame") is not None \
            and by_id[a].body.get("frame") == by_id[b].body.get("frame")
        assert (sa == sb) == merged
    # Other records stay in place, between the rows around them; rows come in step order.
    assert [i.id for i in p.items if not isinstance(i, Row)] == [r.id for r in covered if r.kind != "log"]
    rows = [i.step for i in p.items if isinstance(i, Row)]
    assert rows == sorted(set(rows)) == sorted(set(steps))


def media(rid, seq, joins=None, frame=None, stream="s", **items):
    body = {"stream": stream, "seq": seq, "values": items}
    for key, value in (("joins", joins), ("frame", frame)):
        if value is not None:
            body[key] = value
    return R(rid, "media", body)


def logged(rid, seq, frame=None, stream="s", **metrics):
    record = log(rid, frame=frame, **metrics)
    record.body.update(stream=stream, seq=seq)
    return record


def media_shape(items):
    return [(item.step, item.media, {name: (value.item["type"], value.seq, value.index) if isinstance(value, MediaValue)
                                     else value for name, value in item.values.items()}) for item in items]


def test_a_media_record_joins_the_row_of_its_log_record_and_takes_its_step():
    picture, curve = {"type": "image", "path": "/o/a.png"}, {"type": "histogram", "counts": [1], "edges": [0, 1]}
    p = plan([logged(1, 10, frame=5, a=1), media(2, 11, joins=10, frame=5, p=picture, h=curve),
              logged(3, 12, frame=6, a=2), media(4, 13, joins=99, o=picture),    # joins a log it does not follow
              media(5, 14, joins=13, o=picture, stream="other"),                  # follows no log record
              media(6, 15, frame=6, q=picture)], next_step=0)                     # frame 6, but not after its row
    assert p.steps == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (6, 4)]
    assert media_shape(p.items) == [
        (0, True, {"a": 1, "frame": 5, "p": ("image", 11, 0), "h": ("histogram", 11, 1)}),
        (1, False, {"a": 2, "frame": 6}), (2, True, {"o": ("image", 13, 0)}), (3, True, {"o": ("image", 14, 0)}),
        (4, True, {"q": ("image", 15, 0), "frame": 6})]


def test_media_records_of_one_frame_coalesce_like_log_records():
    picture = {"type": "image", "path": "/o/a.png"}
    p = plan([media(1, 1, frame=3, a=picture), logged(2, 2, frame=3, x=1), media(3, 3, frame=3, b=picture)],
             next_step=4)
    assert p.steps == [(1, 4), (2, 4), (3, 4)] and p.next_step == 5
    assert media_shape(p.items) == [(4, True, {"a": ("image", 1, 0), "frame": 3, "x": 1, "b": ("image", 3, 0)})]


def test_a_batchs_last_log_record_marked_with_media_waits_for_its_media_record_a_bounded_time():
    marked = R(2, "log", {"metrics": {"x": 1}, "with_media": True})
    assert ready([log(1), marked], received=100.0, now=100.5, draining=False) == ([log(1)], 0.0)
    assert ready([marked], received=100.0, now=100.5, draining=False) == ([], MEDIA_WAIT - 0.5)
    assert ready([marked], received=100.0, now=100.0 + MEDIA_WAIT, draining=False) == ([marked], 0.0)
    assert ready([marked], received=100.0, now=100.5, draining=True) == ([marked], 0.0)
    assert ready([marked], received=100.0, now=50.0, draining=False) == ([], MEDIA_WAIT)  # clock set back
    assert ready([marked, log(3)], received=100.0, now=100.5, draining=False) == ([marked, log(3)], 0.0)
    assert ready([log(1)], received=100.0, now=100.5, draining=False) == ([log(1)], 0.0)
    # A system or meta record that came between the log record and its media record waits with it.
    side = [other(3, "system"), other(4, "meta")]
    assert ready([log(1), marked, *side], received=100.0, now=100.5, draining=False) == ([log(1)], 0.0)
    assert ready([marked, *side], received=100.0, now=100.5, draining=False) == ([], MEDIA_WAIT - 0.5)
