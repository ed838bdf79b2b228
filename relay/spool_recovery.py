"""A spool found damaged, and what a crash left behind, dealt with when the relay starts.

- The WAL is read before SQLite replays it (relay/wal.py): committed transactions that SQLite
  would drop are found, and kept if only page contents are damaged.
- The file is then read whole (PRAGMA quick_check). A damaged one is set aside as
  `spool.sqlite.damaged-<time>` and every row that can still be read is copied into a new spool;
  what could not be read is lost, and said so in the relay's log.
- Checkpoint snapshots and media copies that no record holds any more (their record was deleted,
  or never committed, before a crash) are deleted (`sweep_snapshots`).

Damage found later, while the relay runs, is handled where it is met: an unreadable record body
by the uploader (relay/spool_uploads.py: the quarantine table), acked seqs the spool lost by the
intake (relay/spool.py `give_up`: the lost table).
"""
from __future__ import annotations

import os
import sqlite3
import time

from relay import snapshots, spool_db, wal


def check_and_recover(path: str) -> tuple[wal.WalReport | None, str | None]:
    """Look the spool at `path` over before it is opened, and recover it if damaged. Returns what
    the WAL check found (None: nothing) and what recovery did (None: the file was sound, or new).
    Raises OSError or sqlite3.Error when the file cannot be looked at or replaced."""
    wal_damage = wal.inspect(path, repair=True)
    problem = _check(path)
    return wal_damage, _recover(path, problem) if problem else None


def _check(path: str) -> str | None:
    """None if the spool file is sound (or new), else what SQLite says is wrong with it."""
    if not os.path.exists(path):
        return None
    try:
        conn = spool_db.connect(path)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if result == "ok" else result


def _recover(path: str, problem: str) -> str:
    """Set the damaged file aside and copy every row that can still be read into a new spool."""
    aside = "%s.damaged-%s" % (path, time.strftime("%Y%m%dT%H%M%S"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    new = spool_db.connect(path)
    new.executescript(spool_db.SCHEMA)
    copied = {}
    try:
        old = sqlite3.connect("file:%s?mode=ro" % aside, uri=True)
    except sqlite3.Error:
        old = None
    for table, key in (("streams", "rowid"), ("runs", "rowid"), ("records", "id"), ("steps", "id"),
                       ("quarantine", "rowid"), ("lost", "rowid"), ("runs_done", "rowid"),
                       ("tallies", "rowid")):
        copied[table] = _salvage(old, new, table, key) if old is not None else 0
    if old is not None:
        old.close()
    new.close()
    return ("spool was damaged (%s); set aside as %s; recovered %d records of %d runs into a new spool"
            % (problem, aside, copied["records"], copied["runs"]))


def _salvage(old: sqlite3.Connection, new: sqlite3.Connection, table: str, key: str, chunk: int = 64) -> int:
    """Copy the readable rows of `table`, stepping over damaged pages chunk by chunk."""
    try:
        highest = old.execute("SELECT max(%s) FROM %s" % (key, table)).fetchone()[0] or 0
        columns = [row[1] for row in old.execute("PRAGMA table_info(%s)" % table)]
    except sqlite3.DatabaseError:
        return 0
    select = "SELECT %s, %s FROM %s WHERE %s > ? AND %s <= ? ORDER BY %s" % (
        key, ", ".join(columns), table, key, key, key)
    insert = "INSERT OR IGNORE INTO %s (%s) VALUES (%s)" % (table, ", ".join(columns), ", ".join("?" * len(columns)))
    copied = 0
    for low in range(0, highest, chunk):
        try:
            rows = old.execute(select, (low, low + chunk)).fetchall()
        except sqlite3.DatabaseError:
            rows = []
            for one in range(low + 1, low + chunk + 1):
                try:
                    rows += old.execute(select, (one - 1, one)).fetchall()
                except sqlite3.DatabaseError:
                    continue
        new.executemany(insert, [row[1:] for row in rows])
        copied += len(rows)
    return copied


def sweep_snapshots(conn: sqlite3.Connection, directory: str) -> int:
    """At the relay's start: delete the snapshots no record holds (their record was deleted or
    never committed before a crash). Only names whose seq is at or under its stream's watermark
    (or a temporary name) are touched: a snapshot above it may belong to a `relay replay` that
    has not committed yet. Returns how many were deleted."""
    held = {snapshots.name(stream, seq) for stream, seq in conn.execute(
        "SELECT stream, seq FROM records WHERE kind IN ('checkpoint', 'media')")}
    watermarks = {snapshots.name(stream, 0).rsplit("-", 1)[0]: upto
                  for stream, upto in conn.execute("SELECT stream, upto FROM streams")}
    swept = 0
    try:
        entries = os.listdir(snapshots.directory(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry in held:
            continue
        stream_hash, _, seq = entry.partition(snapshots.PARTIAL)[0].rpartition("-")
        if not entry.endswith(snapshots.PARTIAL) and not (seq.isdigit() and int(seq) <= watermarks.get(
                stream_hash, -1)):
            continue
        snapshots.remove(os.path.join(snapshots.directory(directory), entry))
        swept += 1
    return swept
