"""How long the spool keeps what it no longer needs for uploads: finished runs, their archive,
and the streams' watermarks.

Invariants:
- A run that has records or steps in the spool is in `runs` (the hot table). Only a run that W&B
  confirmed finished (`finished` = 1, state `finished` or `disabled`) with no record and no step
  left, finished and last heard of `retention` seconds ago or more, moves to `runs_done` (the
  archive), its row as it was (`steps_handed`, `received`, its W&B location). A run of the
  archive that gets a record again (a trainer resuming it, a spill replay with records not seen
  before) is moved back to `runs`, in the transaction that stores the record, before its upload.
- An archived run is deleted `archive_retention` seconds after it was archived, with its rows of
  the `lost` and `quarantine` tables (which live as long as their run's row). Nothing depends on
  it for exactly once: a run id that comes back after that starts as a new run of the relay, and
  its W&B run is resumed by id, which tells from W&B's own count what W&B already holds.
- A stream's watermark (`streams.upto`, what makes a re-sent or replayed record a duplicate) is
  kept until its stream has had no record for `watermark_retention` seconds and none of its
  records is left in the spool. Once one is let go, the relay keeps the latest time a let-go
  watermark moved (`tallies.watermarks_let_go_until`): a record of a stream with no watermark that
  was logged before then (plus CLOCK_MARGIN for the trainer's clock) may be one already uploaded,
  so it is refused (relay/spool.py `ingest`), never stored a second time. Records without a time
  of their own (open, summary) follow their stream's timed records of the same spill file.
- Work is done in batches of at most `limit` rows each, called from the server's periodic scan,
  so a pass never holds the spool's write lock long enough to stall intake.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from relay.spool_db import RUN_COLUMNS, transaction

# Trainers' clocks may be ahead of the relay's by this much: a record logged up to this long after
# the last let-go watermark moved is still judged one that may have been uploaded.
CLOCK_MARGIN = 86400.0
LET_GO_UNTIL = "watermarks_let_go_until"
ARCHIVED_RECEIVED = "archived_received"   # records received of runs now archived or deleted from the archive

_COLUMNS = ", ".join(RUN_COLUMNS)


@dataclass
class Pass:
    """What one retention pass did."""
    archived: int = 0       # runs moved from runs to runs_done
    deleted: int = 0        # archived runs deleted
    streams: tuple = ()     # streams whose watermark was let go

    def full(self, limit: int) -> bool:
        """Whether a batch was cut at `limit`: there is more to do."""
        return max(self.archived, self.deleted, len(self.streams)) >= limit


class Retention:
    """Archiving, bringing back and deleting, on the spool's connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def run(self, now: float, retention: float, archive_retention: float, watermark_retention: float,
            limit: int) -> Pass:
        """One pass: archive finished runs past `retention`, delete archived ones past
        `archive_retention`, let go of watermarks idle for `watermark_retention`; at most `limit`
        of each, each in its own short transaction."""
        return Pass(self.archive(now, retention, limit), self.delete(now - archive_retention, limit),
                    self.let_go(now - watermark_retention, limit))

    def archive(self, now: float, retention: float, limit: int) -> int:
        """Move up to `limit` finished, confirmed runs, finished and last heard of `retention`
        seconds before `now` or earlier, into the archive."""
        with transaction(self.conn):
            run_ids = [row[0] for row in self.conn.execute(
                "SELECT run_id FROM runs WHERE finished = 1 AND state IN ('finished', 'disabled') "
                "AND max(coalesce(state_since, 0), last_seen) <= ? "
                "AND NOT EXISTS (SELECT 1 FROM records WHERE records.run_id = runs.run_id) "
                "AND NOT EXISTS (SELECT 1 FROM steps WHERE steps.run_id = runs.run_id) "
                "ORDER BY rowid LIMIT ?", (now - retention, limit))]
            if not run_ids:
                return 0
            marks = ",".join("?" * len(run_ids))
            self.conn.execute("INSERT INTO runs_done (%s, archived) SELECT %s, ? FROM runs WHERE run_id IN (%s)"
                              % (_COLUMNS, _COLUMNS, marks), [now] + run_ids)
            received = self.conn.execute("SELECT coalesce(sum(received), 0) FROM runs WHERE run_id IN (%s)" % marks,
                                         run_ids).fetchone()[0]
            self.conn.execute("DELETE FROM runs WHERE run_id IN (%s)" % marks, run_ids)
            self._add(ARCHIVED_RECEIVED, received)
        return len(run_ids)

    def bring_back(self, run_id: str) -> bool:
        """Inside the caller's transaction: move `run_id` from the archive back to runs, its row as
        it was. Whether it was archived."""
        row = self.conn.execute("SELECT received FROM runs_done WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return False
        self.conn.execute("INSERT OR IGNORE INTO runs (%s) SELECT %s FROM runs_done WHERE run_id = ?"
                          % (_COLUMNS, _COLUMNS), (run_id,))
        self.conn.execute("DELETE FROM runs_done WHERE run_id = ?", (run_id,))
        self._add(ARCHIVED_RECEIVED, -row[0])
        return True

    def delete(self, before: float, limit: int) -> int:
        """Delete up to `limit` runs archived at `before` or earlier, and their lost and quarantine
        rows. Their received records stay counted in the relay's totals."""
        with transaction(self.conn):
            run_ids = [row[0] for row in self.conn.execute(
                "SELECT run_id FROM runs_done WHERE archived <= ? ORDER BY archived LIMIT ?", (before, limit))]
            if not run_ids:
                return 0
            marks = ",".join("?" * len(run_ids))
            for table in ("lost", "quarantine", "runs_done"):
                self.conn.execute("DELETE FROM %s WHERE run_id IN (%s)" % (table, marks), run_ids)
        return len(run_ids)

    def let_go(self, before: float, limit: int) -> tuple:
        """Delete up to `limit` watermarks of streams that last moved before `before` and have no
        record left in the spool; note the latest time one of them moved. Returns their streams."""
        with transaction(self.conn):
            rows = self.conn.execute(
                "SELECT stream, moved FROM streams WHERE moved < ? "
                "AND NOT EXISTS (SELECT 1 FROM records WHERE records.stream = streams.stream) "
                "ORDER BY moved LIMIT ?", (before, limit)).fetchall()
            if not rows:
                return ()
            self.conn.executemany("DELETE FROM streams WHERE stream = ?", [(stream,) for stream, _ in rows])
            self.conn.execute("INSERT INTO tallies (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                              "SET value = max(value, excluded.value)", (LET_GO_UNTIL, max(m for _, m in rows)))
        return tuple(stream for stream, _ in rows)

    def let_go_until(self) -> float | None:
        """The latest time a let-go watermark had moved (None: none was let go)."""
        return self.tally(LET_GO_UNTIL)

    def tally(self, name: str) -> float | None:
        row = self.conn.execute("SELECT value FROM tallies WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _add(self, name: str, amount: float) -> None:
        self.conn.execute("INSERT INTO tallies (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                          "SET value = value + excluded.value", (name, amount))
