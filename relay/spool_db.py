"""The spool's SQLite file: its schema, how it is opened (WAL, synchronous=FULL), transactions,
bringing a spool made by an earlier relay to this schema, and how much room it takes and has.

What the tables hold, and the invariants that keep them, are written at the top of relay/spool.py
(ingest, streams, acks), relay/spool_uploads.py (steps, confirmations, quarantine) and
relay/spool_retention.py (the archive `runs_done`, `tallies`, how long watermarks are kept).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from typing import Iterator

FILENAME = "spool.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    upto   INTEGER NOT NULL,
    moved  REAL                              -- when upto last moved (older spools: when they were upgraded)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    settings    BLOB,                        -- msgpack of the `open` settings, NULL until one arrives
    received    INTEGER NOT NULL DEFAULT 0,  -- records ever stored for this run
    uploaded_id INTEGER NOT NULL DEFAULT 0,  -- highest record id handed to the wandb SDK
    steps_handed INTEGER NOT NULL DEFAULT 0, -- W&B steps handed to the wandb SDK (every row below it)
    state       TEXT NOT NULL DEFAULT 'waiting',
    state_since REAL,
    last_error  TEXT,
    exit_code   INTEGER,
    finished    INTEGER NOT NULL DEFAULT 0,  -- 1 once W&B confirmed the finish
    location    TEXT,                        -- W&B URL, or the offline run directory
    created     REAL NOT NULL,
    last_seen   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id   TEXT NOT NULL,
    stream   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    body     BLOB NOT NULL,
    received REAL NOT NULL,
    step     INTEGER,                        -- NULL (steps live in the steps table; opening moves any here)
    crc      INTEGER,                        -- zlib.crc32 of body (NULL in spools older than the column)
    UNIQUE (stream, seq)
);
CREATE TABLE IF NOT EXISTS quarantine (      -- records whose body cannot be read, set aside by the uploader
    id       INTEGER PRIMARY KEY,            -- the id it had in records
    run_id   TEXT NOT NULL,
    stream   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    body     BLOB,
    received REAL,
    reason   TEXT NOT NULL,
    set_aside REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lost (            -- acked records found missing: seqs the spool gave up waiting for
    run_id    TEXT NOT NULL,
    stream    TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    noticed   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_run ON records (run_id, id);
CREATE TABLE IF NOT EXISTS steps (           -- W&B step of a record, assigned just before upload; a table
    id     INTEGER PRIMARY KEY,              -- of its own, so that assigning one does not rewrite the
    run_id TEXT NOT NULL,                    -- record (that grew every full page of a backlog into two)
    step   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_by_run ON steps (run_id, step);
CREATE TABLE IF NOT EXISTS runs_done (       -- the archive: finished, confirmed runs past `retention`, as
    run_id      TEXT PRIMARY KEY,            -- they were in runs (relay/spool_retention.py)
    settings    BLOB,
    received    INTEGER NOT NULL DEFAULT 0,
    uploaded_id INTEGER NOT NULL DEFAULT 0,
    steps_handed INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL,
    state_since REAL,
    last_error  TEXT,
    exit_code   INTEGER,
    finished    INTEGER NOT NULL,
    location    TEXT,
    created     REAL NOT NULL,
    last_seen   REAL NOT NULL,
    archived    REAL NOT NULL                -- when it left runs
);
CREATE INDEX IF NOT EXISTS runs_done_by_time ON runs_done (archived);
CREATE INDEX IF NOT EXISTS runs_done_by_state ON runs_done (state);
CREATE TABLE IF NOT EXISTS tallies (         -- relay-wide numbers kept as one row each (relay/spool_retention.py)
    name  TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""

# The columns a run has in runs and in runs_done (archiving and bringing back copy these).
RUN_COLUMNS = ("run_id", "settings", "received", "uploaded_id", "steps_handed", "state", "state_since", "last_error",
               "exit_code", "finished", "location", "created", "last_seen")


def connect(path: str, cache_kib: int | None = None) -> sqlite3.Connection:
    """A connection for this thread: WAL, and a commit is durable when COMMIT returns.
    `cache_kib`: the most memory its page cache may hold (None: SQLite's default, 2 MiB)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if cache_kib is not None:
        conn.execute("PRAGMA cache_size = -%d" % cache_kib)
    return conn


def connect_reader(path: str) -> sqlite3.Connection:
    """A read-only connection to a running relay's spool, for another thread (the relay checked,
    recovered and upgraded the file at its start; a WAL reader does not block its writes)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


def create(conn: sqlite3.Connection) -> None:
    """The tables, and what a spool made by an earlier relay lacks of them."""
    conn.executescript(SCHEMA)
    _upgrade(conn)
    _add_missing_columns(conn)
    _upgrade_watermark_times(conn)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a spool made by an earlier relay to this schema (PRAGMA user_version 1)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= 1:
        return
    with transaction(conn):
        if "crc" not in {row[1] for row in conn.execute("PRAGMA table_info(records)")}:
            conn.execute("ALTER TABLE records ADD COLUMN crc INTEGER")
        conn.execute("INSERT OR REPLACE INTO steps (id, run_id, step) "
                     "SELECT id, run_id, step FROM records WHERE step IS NOT NULL")
        conn.execute("UPDATE records SET step = NULL WHERE step IS NOT NULL")
        conn.execute("PRAGMA user_version = 1")


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns added to the schema since a spool was made (CREATE TABLE IF NOT EXISTS adds none)."""
    if "steps_handed" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}:
        conn.execute("ALTER TABLE runs ADD COLUMN steps_handed INTEGER NOT NULL DEFAULT 0")


def _upgrade_watermark_times(conn: sqlite3.Connection) -> None:
    """PRAGMA user_version 2: each stream's watermark has the time it last moved (its retention
    counts from there); a spool made without it gives every watermark the upgrade's time, so its
    watermarks are kept a full `watermark_retention` from now."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= 2:
        return
    with transaction(conn):
        if "moved" not in {row[1] for row in conn.execute("PRAGMA table_info(streams)")}:
            conn.execute("ALTER TABLE streams ADD COLUMN moved REAL")
        conn.execute("UPDATE streams SET moved = ? WHERE moved IS NULL", (time.time(),))
        conn.execute("CREATE INDEX IF NOT EXISTS streams_by_time ON streams (moved)")
        conn.execute("PRAGMA user_version = 2")


# One write transaction at a time per process: the threads of an uploader host (a run each) queue
# here, not in SQLite's busy handler, whose sleeps of up to 100 ms let a crowd of writers keep the
# write lock from the server's intake for seconds.
WRITERS = threading.Lock()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    with WRITERS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            rollback(conn)
            raise
        conn.execute("COMMIT")


def rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def files_bytes(path: str) -> int:
    """Bytes of the spool's files on disk: the database, its WAL and its shared memory."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(path + suffix)
        except OSError:
            pass
    return total


class Footprint:
    """How much the spool holds and how much room it has left, and its WAL kept short (what the
    hold policy and `/metrics` measure)."""

    def __init__(self, conn: sqlite3.Connection, directory: str):
        self.conn = conn
        self.directory = directory
        self.path = os.path.join(directory, FILENAME)

    def live_bytes(self) -> int:
        """Bytes of live data in the spool (deleted rows' pages are reused, so this can shrink)."""
        pages, free, size = (self.conn.execute("PRAGMA %s" % name).fetchone()[0]
                             for name in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def wal_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def truncate_wal(self) -> None:
        """Copy the WAL into the database and cut it to nothing, if no reader or writer is in the way
        within a moment (else leave it: SQLite's own checkpoints go on). A WAL that readers keep from
        being reused grows with every write, which a disk with little room cannot afford."""
        self.conn.execute("PRAGMA busy_timeout = 200")
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self.conn.execute("PRAGMA busy_timeout = 30000")

    def room_bytes(self) -> int:
        """Bytes the spool can still take: what its filesystem has free, plus the spool's own free
        pages (deleted rows' pages, which SQLite reuses before the file grows)."""
        disk = os.statvfs(self.directory)
        free_pages, page_size = (self.conn.execute("PRAGMA %s" % name).fetchone()[0]
                                 for name in ("freelist_count", "page_size"))
        return disk.f_bavail * disk.f_frsize + free_pages * page_size
