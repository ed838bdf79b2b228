"""What the spool tells about its runs: the spool's part of `relay status` (and of `/metrics`),
its size kept far below the frame limit however many runs the spool has held, and the runs the
server's loop asks for (unfinished, with work, in a state, backlog progress, offline locations).
The hot table `runs` is read whole, its records counted in grouped queries (not one per run); of the
archive `runs_done` (relay/spool_retention.py), a status reads a count per state and a running
total, and `--all` its pages. Read only: nothing here writes to the spool.
"""
from __future__ import annotations

import heapq
import os
import sqlite3
import time
from typing import Any

import msgpack

from relay import protocol, spool_db

# What one status lists, so that its reply stays far below the frame limit however many runs the
# spool has held: every active run up to STATUS_RUNS, and the most recently finished runs.
STATUS_RUNS = 100
STATUS_RECENT_FINISHED = 10
STATUS_BYTES = 64 * 1024           # packed size of a status's runs at most (at least one run is listed)
STATUS_PAGE_RUNS = 1000            # a page of every run (`relay status --all`): this many runs at most,
STATUS_PAGE_BYTES = 256 * 1024     # and about this many bytes
STATUS_TEXT = 256                  # characters of a run's project, name or last error that a status shows

# A page cursor at or above HOT_CURSOR is in `runs` (HOT_CURSOR + its rowid); below it, in the
# archive (`runs_done`'s rowid): `relay status --all` pages through the archive, then the hot runs.
HOT_CURSOR = 1 << 40

# The runs of the hot table, in the order they came.
_RUN_ROWS = ("SELECT rowid, run_id, received, uploaded_id, state, state_since, last_error, finished, exit_code, "
             "location, last_seen FROM runs ORDER BY rowid")
# Per run with records, in one grouped query that walks each run's range of the index records_by_run
# (the runs first: CROSS JOIN keeps that order, so no record looks its run up): pending (records not
# yet confirmed by W&B: all the run's records in the spool), unsent (not yet handed to the SDK), and
# the first unsent record's id.
_COUNTS = ("SELECT u.run_id, count(*), count(CASE WHEN r.id > u.uploaded_id THEN 1 END), "
           "min(CASE WHEN r.id > u.uploaded_id THEN r.id END) "
           "FROM runs u CROSS JOIN records r ON r.run_id = u.run_id GROUP BY u.run_id")
# Per run, the first record handed to the SDK and not yet confirmed. The oldest pending age of a run
# is the receive time of the earlier of this and its first unsent record: of the records W&B has not
# confirmed, those that a row count can confirm or that are not handed over yet (an `open`, summary
# or checkpoint handed over is confirmed only by the run's finish: it would make every live run look
# as old as itself, and has no step).
_FIRST_HANDED = "SELECT s.run_id, min(s.id) FROM steps s JOIN records r ON r.id = s.id GROUP BY s.run_id"
# An archived run as a row of _RUN_ROWS.
_ARCHIVE_PAGE = ("SELECT rowid, run_id, received, uploaded_id, state, state_since, last_error, finished, exit_code, "
                 "location, last_seen FROM runs_done WHERE rowid > ? ORDER BY rowid LIMIT ?")


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= STATUS_TEXT else text[:STATUS_TEXT - 1] + "…"


class SpoolReport:
    """The spool's runs and counts, read on a connection of the spool's (the relay's own, or a
    read-only one of another thread's: relay/metrics.py)."""

    def __init__(self, conn: sqlite3.Connection, directory: str):
        self.conn = conn
        self.path = os.path.join(directory, spool_db.FILENAME)

    # -- the status ---------------------------------------------------------------------------

    def status(self, page: int | None = None, max_bytes: int | None = STATUS_BYTES) -> dict[str, Any]:
        """The spool's part of `relay status`, of a size that does not grow with the spool's history.

        `records`: totals over every run the spool received records for, archived and deleted ones
        included: received, uploaded (confirmed by W&B), pending (not yet confirmed) = unsent (not
        yet handed to the wandb SDK) + unconfirmed (handed to it, not yet confirmed), and
        `oldest_pending_age` (see _FIRST_HANDED for which records count). `run_counts`: runs in
        the spool, the archive included, by state (`by_state`), those still active (not finished,
        or with records pending) by state, and how many `runs` lists.

        `runs` (see `_run` for one entry): without `page`, from the hot table only (the archive is
        not read), in the order the runs came: the active runs and then the STATUS_RECENT_FINISHED
        most recently finished ones, STATUS_RUNS and `max_bytes` of packed size at most (None: no
        size limit), taken in that order. With `page` (0 for the first), every run in turn, the
        archive first (see HOT_CURSOR): the runs after that cursor, STATUS_PAGE_RUNS and about
        STATUS_PAGE_BYTES of them at most, and `next`, the cursor of the next page (None after the
        last). At least one run is listed when there is one. A run that moves between the archive
        and the hot table while pages are asked for may be listed twice or not at all.
        """
        now = time.time()
        counts, oldest_ids = self._counts()
        received_at = self._received_at(oldest_ids.values())
        archived = self.conn.execute("SELECT value FROM tallies WHERE name = 'archived_received'").fetchone()
        totals = {"received": int(archived[0]) if archived else 0, "pending": 0, "unsent": 0}
        oldest = None
        by_state: dict[str, int] = dict(self.conn.execute("SELECT state, count(*) FROM runs_done GROUP BY state"))
        active_by_state: dict[str, int] = {}
        active: list[tuple] = []
        recent: list[tuple] = []      # (state_since, rowid, row) of the most recently finished runs
        listed: list[tuple] = []      # a page
        if page is not None and page < HOT_CURSOR:
            listed = [row + (0, 0, None) for row in self.conn.execute(_ARCHIVE_PAGE, (page, STATUS_PAGE_RUNS + 1))]
        more = len(listed) > STATUS_PAGE_RUNS
        for row in self.conn.execute(_RUN_ROWS):
            pending, unsent, _ = counts.get(row[1], (0, 0, None))
            first = received_at.get(oldest_ids.get(row[1]))
            row = (row[0] + HOT_CURSOR,) + row[1:] + (pending, unsent, first)
            received, state, since, finished = row[2], row[4], row[5], row[7]
            totals["received"] += received
            totals["pending"] += pending
            totals["unsent"] += unsent
            if first is not None and (oldest is None or first < oldest):
                oldest = first
            by_state[state] = by_state.get(state, 0) + 1
            is_active = not finished or pending > 0
            if is_active:
                active_by_state[state] = active_by_state.get(state, 0) + 1
            if page is not None:
                if row[0] > page:
                    if len(listed) < STATUS_PAGE_RUNS:
                        listed.append(row)
                    else:
                        more = True
            elif is_active:
                if len(active) < STATUS_RUNS:
                    active.append(row)
            else:
                heapq.heappush(recent, (since or 0.0, row[0], row))
                if len(recent) > STATUS_RECENT_FINISHED:
                    heapq.heappop(recent)
        if page is None:  # active runs first, then the most recently finished
            listed = (active + [row for _, _, row in sorted(recent, reverse=True)])[:STATUS_RUNS]
            budget = max_bytes
        else:
            listed = listed[:STATUS_PAGE_RUNS]
            budget = STATUS_PAGE_BYTES
        settings = self._settings(listed)
        runs, size = [], 0
        for row in listed:
            run = self._run(row, settings.get(row[0]), now)
            if budget is not None:
                size += len(protocol.encode(run))
                if runs and size > budget:
                    more = True
                    break
            runs.append((run, row[0]))
        runs.sort(key=lambda run: run[1])
        status: dict[str, Any] = {
            "runs": [run for run, _ in runs],
            "records": {
                "received": totals["received"], "uploaded": totals["received"] - totals["pending"],
                "pending": totals["pending"], "unsent": totals["unsent"],
                "unconfirmed": totals["pending"] - totals["unsent"],
                "oldest_pending_age": round(now - oldest, 3) if oldest is not None else None},
            "run_counts": {"total": sum(by_state.values()), "active": sum(active_by_state.values()),
                           "listed": len(runs), "by_state": by_state, "active_by_state": active_by_state},
            "spool_bytes": spool_db.files_bytes(self.path), "spool_path": self.path,
        }
        if page is not None:
            status["next"] = runs[-1][1] if more and runs else None
        return status

    def _counts(self) -> tuple[dict[str, tuple[int, int, int | None]], dict[str, int]]:
        """Run id -> (pending, unsent, first unsent id) for the runs with records, and run id -> the
        id of the record its oldest pending age is measured from: three grouped queries in all."""
        counts = {run_id: (pending, unsent, first) for run_id, pending, unsent, first in self.conn.execute(_COUNTS)}
        oldest = {run_id: first for run_id, (_, _, first) in counts.items() if first is not None}
        for run_id, handed in self.conn.execute(_FIRST_HANDED):
            if handed < oldest.get(run_id, handed + 1):
                oldest[run_id] = handed
        return counts, oldest

    def _received_at(self, ids: Any) -> dict[int, float]:
        """Record id -> its receive time, for these records."""
        ids = list(ids)
        found: dict[int, float] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(self.conn.execute("SELECT id, received FROM records WHERE id IN (%s)"
                                           % ",".join("?" * len(chunk)), chunk))
        return found

    def _settings(self, rows: list[tuple]) -> dict[int, bytes | None]:
        """Cursor -> the run's settings, for these rows (hot and archived)."""
        found: dict[int, bytes | None] = {}
        for table, rowids in (("runs", [row[0] - HOT_CURSOR for row in rows if row[0] >= HOT_CURSOR]),
                              ("runs_done", [row[0] for row in rows if row[0] < HOT_CURSOR])):
            offset = HOT_CURSOR if table == "runs" else 0
            for start in range(0, len(rowids), 500):
                chunk = rowids[start:start + 500]
                found.update((rowid + offset, settings) for rowid, settings in self.conn.execute(
                    "SELECT rowid, settings FROM %s WHERE rowid IN (%s)" % (table, ",".join("?" * len(chunk))), chunk))
        return found

    def _run(self, row: tuple, settings: bytes | None, now: float) -> dict[str, Any]:
        """One run of a status. Client-given names and error texts are cut to STATUS_TEXT
        characters, so that a run's entry has a size limit."""
        (_, run_id, received, uploaded_id, state, since, error, finished, exit_code, location, last_seen,
         pending, unsent, first) = row
        info = msgpack.unpackb(settings, raw=False) if settings else {}
        return {
            "run_id": run_id, "project": _cut(info.get("project")), "name": _cut(info.get("name")),
            "received": received, "uploaded": max(0, received - pending), "pending": pending,
            "unsent": unsent, "unconfirmed": pending - unsent,
            "oldest_pending_age": round(now - first, 3) if first is not None else None,
            "state": state, "state_since": since, "last_error": _cut(error),
            "exit_code": exit_code, "finished": bool(finished), "location": location, "last_seen": last_seen,
        }

    # -- the runs the server's loop and the uploaders follow -----------------------------------

    def unfinished_runs(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT run_id FROM runs WHERE finished = 0")]

    def runs_with_work(self) -> list[str]:
        """Runs that have records not yet confirmed by W&B."""
        return [row[0] for row in self.conn.execute(
            "SELECT DISTINCT run_id FROM records WHERE run_id != '' ORDER BY run_id")]

    def runs_in_state(self, state: str) -> list[tuple[str, str]]:
        return list(self.conn.execute("SELECT run_id, coalesce(last_error, '') FROM runs WHERE state = ?", (state,)))

    def reached_wandb_since(self, since: float) -> bool:
        """Did W&B answer an online run's uploader at `since` or later: did one start uploading (a
        wandb.init, or a query after failed ones, went through), finish or pause there?"""
        return self.conn.execute(
            "SELECT 1 FROM runs WHERE state IN ('uploading', 'finished', 'paused') AND state_since >= ? "
            "AND location LIKE 'http%' LIMIT 1", (since,)).fetchone() is not None

    def live_runs(self) -> int:
        """Runs whose finish W&B has not confirmed."""
        return self.conn.execute("SELECT count(*) FROM runs WHERE finished = 0").fetchone()[0]

    def offline_locations(self) -> list[tuple[str, str]]:
        """(run id, location) of the runs whose W&B location is not a URL: offline run directories."""
        return list(self.conn.execute(
            "SELECT run_id, location FROM runs WHERE location IS NOT NULL AND location NOT LIKE 'http%' "
            "ORDER BY rowid"))

    def pending_counts(self) -> dict[str, tuple[int, int]]:
        """Run id -> (received, records not yet handed to the SDK) for every unfinished run (what
        backlog progress follows), in one grouped query."""
        return {run_id: (received, unsent) for run_id, received, unsent in self.conn.execute(
            "SELECT u.run_id, u.received, count(r.id) FROM runs u LEFT JOIN records r "
            "ON r.run_id = u.run_id AND r.id > u.uploaded_id WHERE u.finished = 0 GROUP BY u.run_id")}
