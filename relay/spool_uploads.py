"""The uploaders' part of the spool: a run's records in order, the W&B steps given to them, the
confirmations that let them go, and the run's state as `relay status` shows it.

Invariants:
- The uploader gives each record a W&B step and commits that *before* handing it to the wandb SDK;
  `runs.steps_handed` keeps, per run, how many steps have been handed (it outlives the records).
  After a restart, the W&B run is resumed and reports its next step S: records whose step is below
  S are on the server (W&B stores history as a prefix) and are deleted; the rest are logged again.
  W&B counts rows seconds after they arrive, so S is taken only once the count can be trusted: it
  reached steps_handed, or no writer of the run's history has been alive for the counting lag
  (relay/settle.py).
- Records leave the spool only once W&B has confirmed them: the run finished (`run.finish()`
  returned), a resume or the periodic count reported a server step past them, or (a checkpoint)
  W&B committed its artifact; or, damaged, they are moved to the `quarantine` table (a body whose
  crc32 or decoding fails: logged, counted in the run's W&B summary as relay/records_set_aside).
- A checkpoint record's snapshot (`snapshots/`, relay/snapshots.py), and a media record's copies
  of its files (relay/mediafiles.py), are deleted right after the transaction that deleted the
  record; what a crash in between left is swept at the relay's start (relay/spool_recovery.py).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass

import msgpack

from relay import snapshots, spool_db
from relay.spool_db import transaction

log = logging.getLogger("relay.spool")


@dataclass
class Record:
    id: int
    run_id: str
    kind: str
    body: dict
    received: float
    step: int | None


def read_body(kind: str, body: bytes, crc: int | None) -> tuple[dict | None, str]:
    """(the record's message, '') if a stored body reads back as what was stored, else (None, what
    is wrong with it)."""
    if crc is not None and zlib.crc32(body) != crc:
        return None, "its checksum does not match (the bytes changed on disk)"
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        return None, "it does not decode (%s: %s)" % (type(exc).__name__, exc)
    if not isinstance(message, dict) or message.get("t") != kind:
        return None, "it decodes to something other than a %s record" % kind
    return message, ""


class Uploads:
    """What an uploader reads and writes of its run, on the spool's connection."""

    def __init__(self, conn: sqlite3.Connection, directory: str):
        self.conn = conn
        self.directory = directory
        self.path = os.path.join(directory, spool_db.FILENAME)

    def settings(self, run_id: str) -> dict | None:
        row = self.conn.execute("SELECT settings FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return msgpack.unpackb(row[0], raw=False) if row and row[0] is not None else None

    def set_state(self, run_id: str, state: str, error: str | None = None, location: str | None = None) -> None:
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE runs SET state = ?, state_since = CASE WHEN state = ? THEN state_since ELSE ? END, "
                "last_error = ?, location = coalesce(?, location) WHERE run_id = ?",
                (state, state, time.time(), error, location, run_id))

    # -- records and their steps --------------------------------------------------------------

    def records(self, run_id: str, after_id: int, limit: int) -> list[Record]:
        """The next records of a run. One whose body cannot be read (its checksum does not match, or
        it does not decode to a record of its kind) is set aside in the quarantine table, logged
        and counted (`losses`): the run goes on without it."""
        while True:
            records, unreadable = [], []
            for rid, stream, seq, kind, body, received, step, crc in self.conn.execute(
                    "SELECT r.id, r.stream, r.seq, r.kind, CAST(r.body AS BLOB), r.received, s.step, r.crc "
                    "FROM records r LEFT JOIN steps s ON s.id = r.id "
                    "WHERE r.run_id = ? AND r.id > ? ORDER BY r.id LIMIT ?", (run_id, after_id, limit)).fetchall():
                message, problem = read_body(kind, body, crc)
                if problem:
                    unreadable.append((rid, stream, seq, kind, problem))
                else:
                    records.append(Record(rid, run_id, kind, message, received, step))
            if unreadable:
                self._set_aside(run_id, unreadable)
            if records or not unreadable:
                return records

    def _set_aside(self, run_id: str, unreadable: list[tuple[int, str, int, str, str]]) -> None:
        with transaction(self.conn):
            for rid, _, _, _, problem in unreadable:
                self.conn.execute(
                    "INSERT OR REPLACE INTO quarantine (id, run_id, stream, seq, kind, body, received, reason, "
                    "set_aside) SELECT id, run_id, stream, seq, kind, body, received, ?, ? FROM records WHERE id = ?",
                    (problem, time.time(), rid))
                self.conn.execute("DELETE FROM records WHERE id = ?", (rid,))
                self.conn.execute("DELETE FROM steps WHERE id = ?", (rid,))
        for _, stream, seq, kind, problem in unreadable:
            log.error("run %s: record seq=%d of stream %s (%s) cannot be read: %s; set aside in the quarantine table "
                      "of spool %s, the run goes on without it", run_id, seq, stream, kind, problem, self.path)

    def losses(self, run_id: str) -> dict[str, int]:
        """What W&B's summary of the run says about records it will never get (only what is not 0):
        those set aside here, and the acked seqs the spool lost (relay/spool.py `give_up`)."""
        set_aside = self.conn.execute("SELECT count(*) FROM quarantine WHERE run_id = ?", (run_id,)).fetchone()[0]
        lost = self.conn.execute("SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM lost WHERE run_id = ?",
                                 (run_id,)).fetchone()[0]
        return {key: value for key, value in (("relay/records_set_aside", set_aside), ("relay/records_lost", lost))
                if value}

    def assign_steps(self, run_id: str, steps: list[tuple[int, int]], uploaded_id: int) -> None:
        """Persist (record id, step) pairs before the rows go to the SDK."""
        handed = max((step + 1 for _, step in steps), default=0)
        with transaction(self.conn):
            self.conn.executemany("INSERT OR REPLACE INTO steps (id, run_id, step) VALUES (?, ?, ?)",
                                  [(i, run_id, s) for i, s in steps])
            self.conn.execute("UPDATE runs SET uploaded_id = ?, steps_handed = max(steps_handed, ?) WHERE run_id = ?",
                              (uploaded_id, handed, run_id))

    def steps_handed(self, run_id: str) -> int:
        """How many W&B steps of this run have been handed to the wandb SDK, over all relay lives."""
        row = self.conn.execute(
            "SELECT max(coalesce((SELECT steps_handed FROM runs WHERE run_id = ?), 0), "
            "coalesce((SELECT max(step) + 1 FROM steps WHERE run_id = ?), 0))", (run_id, run_id)).fetchone()
        return row[0]

    # -- confirmations ------------------------------------------------------------------------

    def confirm_below_step(self, run_id: str, server_step: int) -> int:
        """A resume told us the server holds steps < server_step, and will hold no more (its count
        was trusted): those records are done, and the rest will be handed again from server_step."""
        with transaction(self.conn):
            media = self._media_below_step(run_id, server_step)
            cursor = self.conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM steps WHERE run_id = ? "
                                       "AND step < ?)", (run_id, server_step))
            self.conn.execute("DELETE FROM steps WHERE run_id = ?", (run_id,))
            self.conn.execute("UPDATE runs SET uploaded_id = 0, steps_handed = ? WHERE run_id = ?",
                              (server_step, run_id))
        self._delete_snapshots(media)
        return cursor.rowcount

    def confirm_console(self, run_id: str, server_step: int) -> int:
        """W&B holds the rows below server_step: the console records handed before the last of
        them are done too (they take no step, and wandb-core sends what it was handed in order).
        Called before those rows' own confirmation, which forgets their steps."""
        with transaction(self.conn):
            last = self.conn.execute("SELECT MAX(id) FROM steps WHERE run_id = ? AND step < ?",
                                     (run_id, server_step)).fetchone()[0]
            if last is None:
                return 0
            cursor = self.conn.execute("DELETE FROM records WHERE run_id = ? AND kind = 'console' AND id < ?",
                                       (run_id, last))
        return cursor.rowcount

    def confirm_logged(self, run_id: str, server_step: int) -> int:
        """Mid-run: W&B holds every row below server_step; those records are done."""
        with transaction(self.conn):
            media = self._media_below_step(run_id, server_step)
            cursor = self.conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM steps WHERE run_id = ? "
                                       "AND step < ?)", (run_id, server_step))
            self.conn.execute("DELETE FROM steps WHERE run_id = ? AND step < ?", (run_id, server_step))
        self._delete_snapshots(media)
        return cursor.rowcount

    def _media_below_step(self, run_id: str, server_step: int) -> list[tuple[str, int]]:
        """(stream, seq) of the media records of rows below server_step: their copies go with them."""
        return self.conn.execute(
            "SELECT stream, seq FROM records WHERE kind = 'media' AND id IN (SELECT id FROM steps WHERE run_id = ? "
            "AND step < ?)", (run_id, server_step)).fetchall()

    def confirm_through(self, run_id: str, record_id: int, exit_code: int | None = None,
                        finished: bool = False) -> int:
        """W&B confirmed everything of this run up to record_id (run.finish() returned)."""
        with transaction(self.conn):
            checkpoints = self.conn.execute(
                "SELECT stream, seq FROM records WHERE run_id = ? AND id <= ? AND kind IN ('checkpoint', 'media')",
                (run_id, record_id)).fetchall()
            cursor = self.conn.execute("DELETE FROM records WHERE run_id = ? AND id <= ?", (run_id, record_id))
            self.conn.execute("DELETE FROM steps WHERE run_id = ? AND id <= ?", (run_id, record_id))
            if finished:
                self.conn.execute("UPDATE runs SET finished = 1, exit_code = ? WHERE run_id = ?", (exit_code, run_id))
        self._delete_snapshots(checkpoints)
        return cursor.rowcount

    def confirm_checkpoint(self, run_id: str, record_id: int) -> None:
        """W&B committed the artifact of this checkpoint record (or can never take it): let it go,
        and its snapshot with it."""
        with transaction(self.conn):
            checkpoint = self.conn.execute(
                "SELECT stream, seq FROM records WHERE run_id = ? AND id = ? AND kind = 'checkpoint'",
                (run_id, record_id)).fetchall()
            self.conn.execute("DELETE FROM records WHERE run_id = ? AND id = ? AND kind = 'checkpoint'",
                              (run_id, record_id))
        self._delete_snapshots(checkpoint)

    def _delete_snapshots(self, checkpoints: list[tuple[str, int]]) -> None:
        for stream, seq in checkpoints:
            snapshots.remove(os.path.join(snapshots.directory(self.directory), snapshots.name(stream, seq)))
