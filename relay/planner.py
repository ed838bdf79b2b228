"""The uploader's row planner: a run's spooled records and its next W&B step in, the plan out.

Pure: no wandb, no spool, no I/O. The uploader commits the plan's (record, step) pairs to the spool
*before* it hands a row to the SDK (relay/spool_uploads.py's invariants), then walks the plan's items in
order: rows go to `log`, every other record (open, summary, checkpoint, finish) is applied between
them, where it came. `media` records are rows, or parts of rows, as `log` records are.

Rules:
- Every row gets the next step of the run, one more than the row before (steps never go backwards:
  the relay owns W&B's step; `frame` and `epoch` are ordinary metrics made into axes).
- Consecutive `log` records with the same `frame` (not None) are one row, under one step; a
  record of another kind between them ends the row. A batch's first `log` record always starts a
  row of its own.
- A `log` record with no values at all (no metrics, no axes) takes its step but makes no row.
- A `media` record whose `joins` is the seq of the `log` record just before it (same stream) goes
  into that record's row, under its step. Any other `media` record is a row as a `log` record is
  (merged with the row before it when both have the same `frame` and it joins nothing). A media
  record at the start of a batch, its `log` record in the batch before, is a row of its own; so
  that this stays the exception, `ready` holds back a batch's last `log` record marked `with_media`
  (the client sends its media record right after it) until that media record is in the spool, or
  for at most MEDIA_WAIT seconds (the relay may have refused the media record).
- Records of the trainer node beside the rows (SIDE_KINDS: `console`, `meta`, `system`) take no
  step and do not end a row: they are applied where they came, and the rows around them are made
  as if they were not there.
- A `finish` ends the plan: records after it belong to a run resumed later, and wait for the next
  batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, Union


class Entry(Protocol):
    """What the planner reads of a spooled record (relay.spool_uploads.Record has it)."""
    id: int
    kind: str
    body: dict


ROW_KINDS = ("log", "media")
MEDIA_WAIT = 2.0  # seconds a `log` record marked `with_media` waits for its media record (see `ready`)
SIDE_KINDS = ("console", "meta", "system")  # records of the trainer node: no step, no row ended


@dataclass
class Row:
    """One W&B history row: the merged values of one or more `log` and `media` records, and its
    step. Media values are MediaValue (`media`: the row has some)."""
    step: int
    values: dict[str, Any]
    media: bool = False


@dataclass
class MediaValue:
    """A media record's item (relay/media.py's wire item), with the record and the item's place in
    it, where the uploader finds the copy of its file (relay/mediafiles.py)."""
    item: dict
    stream: str
    seq: int
    index: int


@dataclass
class Plan:
    steps: list[tuple[int, int]]           # (record id, step) of every `log` and `media` record: commit first
    through_id: int                        # the last record the plan covers (the spool's uploaded_id)
    next_step: int                         # the run's next step after these rows
    items: list[Union[Row, Entry]] = field(default_factory=list)  # rows and other records, in order


def plan(records: Sequence[Entry], next_step: int) -> Plan:
    """Plan one batch of a run's records (in spool order, at least one), the run's next step given."""
    if not records:
        raise ValueError("nothing to plan: no records")
    steps: list[tuple[int, int]] = []
    items: list[Union[Row, Entry]] = []
    last_frame = None
    previous: Entry | None = None
    row: Row | None = None  # the row the previous record went into
    for record in records:
        if record.kind in SIDE_KINDS:
            items.append(record)
            through = record
            continue
        if record.kind in ROW_KINDS:
            frame = record.body.get("frame")
            values = row_values(record.body) if record.kind == "log" else media_values(record.body)
            if row is not None and (joins(record, previous) or (
                    frame is not None and frame == last_frame and record.body.get("joins") is None)):
                row.values.update(values)
                row.media = row.media or record.kind == "media"
            else:
                row = Row(next_step, values, media=record.kind == "media") if values else None
                if row is not None:
                    items.append(row)
                next_step += 1
            last_frame = frame
            steps.append((record.id, next_step - 1))
        else:
            items.append(record)
            row = None
        previous = through = record
        if record.kind == "finish":
            break
    return Plan(steps, through.id, next_step, items)


def ready(records: Sequence[Entry], received: float, now: float, draining: bool) -> tuple[list[Entry], float]:
    """The records that may be planned now, and how long to wait when that is none of them. A
    batch's last record, a `log` marked `with_media` and received (wall clock) less than MEDIA_WAIT
    before `now`, waits for the media record that joins its row; while the relay drains, nothing
    waits. Side records after that `log` record (SIDE_KINDS) wait with it."""
    end = len(records)
    while end and records[end - 1].kind in SIDE_KINDS:
        end -= 1
    last = records[end - 1] if end else None
    if draining or last is None or last.kind != "log" or not last.body.get("with_media"):
        return list(records), 0.0
    wait = min(MEDIA_WAIT, received + MEDIA_WAIT - now)  # min: a wall clock set back waits no longer
    if wait <= 0:
        return list(records), 0.0
    return list(records[:end - 1]), (wait if end == 1 else 0.0)


def joins(record: Entry, previous: Entry | None) -> bool:
    """A media record that joins the row of the `log` record just before it (same stream, its seq)."""
    return (record.kind == "media" and previous is not None and previous.kind == "log"
            and record.body.get("joins") is not None and record.body.get("joins") == previous.body.get("seq")
            and record.body.get("stream") == previous.body.get("stream"))


def media_values(body: dict) -> dict[str, Any]:
    """A `media` record's values as MediaValues, named and with axes as row_values does."""
    items = {name: MediaValue(item, body["stream"], body["seq"], index)
             for index, (name, item) in enumerate(body["values"].items())}
    return row_values(dict(body, metrics=items))


def row_values(body: dict) -> dict[str, Any]:
    """A `log` record's values as W&B gets them: metrics under `ns/` if the record names a namespace,
    and its `frame` and `epoch` axes."""
    prefix = body.get("ns")
    metrics = body["metrics"]
    row = {"%s/%s" % (prefix, k): v for k, v in metrics.items()} if prefix else dict(metrics)
    for axis in ("frame", "epoch"):
        if body.get(axis) is not None:
            row[axis] = body[axis]
    return row
