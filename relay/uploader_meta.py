"""An uploader's records of the trainer node beside the rows: the run's provenance for wandb.init,
and where `console`, `meta` and `system` records go (none takes a step; relay/planner.py).

The trainer sends its `meta` record when its `git diff` is done, moments after the run's `open`
(which says one follows): a new run waits up to META_WAIT for it, so that wandb.init sets the run's
host, program and commit from it. One that comes later is applied where it comes (the metadata and
files, not those three fields).
"""
from __future__ import annotations

import time
from typing import Any

from relay.sinks import wandb_meta
from relay.spool import Spool
from relay.spool_uploads import read_body

META_WAIT = 10.0  # seconds a new run waits for the `meta` record its open announces
NODE_KINDS = ("console", "meta", "system")


def provenance(spool: Spool, run_id: str, wake: Any) -> dict | None:
    """The provenance of the `meta` record the run's open announces, if it comes in time (`wake`:
    the uploader's WakePipe, woken when records come)."""
    deadline = time.monotonic() + META_WAIT
    while _record(spool, run_id, "open", "ASC").get("meta") and not wake.interrupt.is_set():
        meta = _record(spool, run_id, "meta", "DESC")
        if meta or time.monotonic() >= deadline:
            return meta.get("provenance")
        wake.wait(min(deadline - time.monotonic(), 0.5), b"w")  # relay.uploader's WAKE: records came
    return None


def apply(sink: Any, kind: str, body: dict) -> None:
    """A `console`, `meta` or `system` record into the W&B sink's open run."""
    if kind == "console":
        sink.write_console(body["lines"], body.get("dropped") or 0)
    else:
        wandb_meta.trainer_node(sink, kind, body)


def _record(spool: Spool, run_id: str, kind: str, order: str) -> dict:
    """The body of the run's first (ASC) or last (DESC) record of `kind` in the spool, or {}."""
    row = spool.uploads.conn.execute("SELECT CAST(body AS BLOB), crc FROM records WHERE run_id = ? AND kind = ? "
                                     "ORDER BY id %s LIMIT 1" % order, (run_id, kind)).fetchone()
    return (read_body(kind, row[0], row[1])[0] or {}) if row else {}
