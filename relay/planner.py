"""The uploader's row planner: a run's spooled records and its next W&B step in, the plan out.

Pure: no wandb, no spool, no I/O. The uploader commits the plan's (record, step) pairs to the spool
*before* it hands a row to the SDK (relay/spool_uploads.py's invariants), then walks the plan's items in
order: rows go to `log`, every other record (open, summary, checkpoint, finish) is applied between
them, where it came.

Rules:
- Every row gets the next step of the run, one more than the row before (steps never go backwards:
  the relay owns W&B's step; `frame` and `epoch` are ordinary metrics made into axes).
- Consecutive `log` records with the same `frame` (not None) are one row, under one step; a
  record of another kind between them ends the row. A batch's first `log` record always starts a
  row of its own.
- A `log` record with no values at all (no metrics, no axes) takes its step but makes no row.
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


@dataclass
class Row:
    """One W&B history row: the merged values of one or more `log` records, and its step."""
    step: int
    values: dict[str, Any]


@dataclass
class Plan:
    steps: list[tuple[int, int]]           # (record id, step) of every `log` record: commit before logging
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
    for record in records:
        if record.kind == "log":
            frame = record.body.get("frame")
            same_row = frame is not None and frame == last_frame and previous is not None and previous.kind == "log"
            if same_row:
                items[-1].values.update(row_values(record.body))  # type: ignore[union-attr]
            else:
                values = row_values(record.body)
                if values:
                    items.append(Row(next_step, values))
                next_step += 1
            last_frame = frame
            steps.append((record.id, next_step - 1))
        else:
            items.append(record)
        previous = record
        if record.kind == "finish":
            break
    return Plan(steps, previous.id, next_step, items)  # type: ignore[union-attr]


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
