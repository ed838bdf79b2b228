"""The relay's durable spool: SQLite in WAL mode.

Invariants:
- A record is acked to its client only after the transaction that inserted it has committed
  (synchronous=FULL: a commit survives the relay being killed, and the machine losing power).
- (stream, seq) is UNIQUE: a re-sent record is recognised and acked again, never stored twice.
  Per stream, `streams.upto` is the highest seq below which every seq is present (or was consumed
  by an error reply); a seq at or under it is a duplicate even after its row was compacted away.
- The uploader gives each record a W&B step and commits that *before* handing it to the wandb SDK;
  `runs.steps_handed` keeps, per run, how many steps have been handed (it outlives the records).
  After a restart, the W&B run is resumed and reports its next step S: records whose step is below
  S are on the server (W&B stores history as a prefix) and are deleted; the rest are logged again.
  W&B counts rows seconds after they arrive, so S is taken only once the count can be trusted: it
  reached steps_handed, or no writer of the run's history has been alive for the counting lag
  (relay/settle.py).
- Records leave the spool only once W&B has confirmed them: the run finished (`run.finish()`
  returned), a resume reported a server step past them, or (a checkpoint) W&B committed its
  artifact; or, damaged, they are moved to the
  `quarantine` table (a body whose crc32 or decoding fails: logged, counted in the run's W&B
  summary as relay/records_set_aside).
- Acked seqs the spool lost (a damaged or cut WAL: relay/wal.py reports it at start) are given up
  only once the client has shown it no longer holds them (the server's GapWatch); each such range
  is written to the `lost` table and counted in the run's W&B summary as relay/records_lost.
- Policy 'hold' (the server): no record is acked while the spool is over max_spool_bytes or less
  than min_free_bytes would be left for it on its disk, so uploads always have room to write the
  steps, states and deletes that empty it.
- A checkpoint record's snapshot (`snapshots/`, relay/snapshots.py) is deleted right after the
  transaction that deleted the record; what a crash in between left is swept at the relay's start.
"""
from __future__ import annotations

import contextlib
import heapq
import logging
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import msgpack

from relay import protocol, snapshots, wal
from relay.errors import RelayError

log = logging.getLogger("relay.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    upto   INTEGER NOT NULL
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
"""

# What one status lists, so that its reply stays far below the frame limit however many runs the
# spool has held: every active run up to STATUS_RUNS, and the most recently finished runs.
STATUS_RUNS = 100
STATUS_RECENT_FINISHED = 10
STATUS_BYTES = 64 * 1024           # packed size of a status's runs at most (at least one run is listed)
STATUS_PAGE_RUNS = 1000            # a page of every run (`relay status --all`): this many runs at most,
STATUS_PAGE_BYTES = 256 * 1024     # and about this many bytes
STATUS_TEXT = 256                  # characters of a run's project, name or last error that a status shows

# One row per run with its counts: pending (records not yet confirmed by W&B: all the run's records
# in the spool), unsent (not yet handed to the SDK) and the receive time of the oldest record that
# W&B has not confirmed and that only a row count can confirm, or that is not handed over yet (an
# `open`, summary or checkpoint handed over is confirmed only by the run's finish: it would make
# every live run look as old as itself). Each count is an index range of records_by_run.
_RUN_ROWS = """
SELECT rowid, run_id, received, uploaded_id, state, state_since, last_error, finished, exit_code, location, last_seen,
    (SELECT count(*) FROM records WHERE records.run_id = runs.run_id),
    (SELECT count(*) FROM records WHERE records.run_id = runs.run_id AND records.id > runs.uploaded_id),
    (SELECT received FROM records WHERE records.run_id = runs.run_id
        AND (records.id > runs.uploaded_id OR records.id IN (SELECT id FROM steps WHERE steps.run_id = runs.run_id))
        ORDER BY records.id LIMIT 1)
FROM runs ORDER BY rowid
"""


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= STATUS_TEXT else text[:STATUS_TEXT - 1] + "…"


class SpoolError(RelayError, RuntimeError):
    pass


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


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns added to the schema since a spool was made (CREATE TABLE IF NOT EXISTS adds none)."""
    if "steps_handed" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}:
        conn.execute("ALTER TABLE runs ADD COLUMN steps_handed INTEGER NOT NULL DEFAULT 0")


def _read_body(kind: str, body: bytes, crc: int | None) -> tuple[dict | None, str]:
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


@dataclass
class Record:
    id: int
    run_id: str
    kind: str
    body: dict
    received: float
    step: int | None


@dataclass
class Outcome:
    """What ingest made of one message: stored ('new'), already there ('dup') or refused."""
    stream: str
    seq: int
    status: str          # new | dup | gap | error
    reason: str = ""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Spool:
    """One connection to the spool; make one per thread (sqlite3 connections are not shared)."""

    FILENAME = "spool.sqlite"

    def __init__(self, directory: str, check: bool = True):
        """`check`: look the WAL over before SQLite replays it (relay/wal.py: committed transactions
        that SQLite would drop are found, and kept if only page contents are damaged), then the file
        (PRAGMA quick_check reads all of it), and recover it if damaged. The server does, once at
        start; its uploaders open the spool it checked."""
        self.directory = directory
        self.path = os.path.join(directory, self.FILENAME)
        self.recovery: str | None = None   # what happened if the spool was found damaged
        self.wal_damage: wal.WalReport | None = None  # what the WAL check found, if anything
        try:
            os.makedirs(directory, exist_ok=True)
            self.wal_damage = wal.inspect(self.path, repair=True) if check else None
            problem = self._check() if check else None
            if problem:
                self.recovery = self._recover(problem)
            self.conn = _connect(self.path)
            self.conn.executescript(SCHEMA)
            self._upgrade()
            _add_missing_columns(self.conn)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError("cannot open spool %s: %s" % (self.path, exc)) from exc
        self._upto: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}

    def _upgrade(self) -> None:
        """Bring a spool made by an earlier relay to this schema (PRAGMA user_version 1)."""
        if self.conn.execute("PRAGMA user_version").fetchone()[0] >= 1:
            return
        with self._transaction():
            if "crc" not in {row[1] for row in self.conn.execute("PRAGMA table_info(records)")}:
                self.conn.execute("ALTER TABLE records ADD COLUMN crc INTEGER")
            self.conn.execute("INSERT OR REPLACE INTO steps (id, run_id, step) "
                              "SELECT id, run_id, step FROM records WHERE step IS NOT NULL")
            self.conn.execute("UPDATE records SET step = NULL WHERE step IS NOT NULL")
            self.conn.execute("PRAGMA user_version = 1")

    def _check(self) -> str | None:
        """None if the spool file is sound (or new), else what SQLite says is wrong with it."""
        if not os.path.exists(self.path):
            return None
        try:
            conn = _connect(self.path)
            try:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        return None if result == "ok" else result

    def _recover(self, problem: str) -> str:
        """Set the damaged file aside and copy every row that can still be read into a new spool."""
        aside = "%s.damaged-%s" % (self.path, time.strftime("%Y%m%dT%H%M%S"))
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        new = _connect(self.path)
        new.executescript(SCHEMA)
        copied = {}
        try:
            old = sqlite3.connect("file:%s?mode=ro" % aside, uri=True)
        except sqlite3.Error:
            old = None
        for table, key in (("streams", "rowid"), ("runs", "rowid"), ("records", "id"), ("steps", "id"),
                           ("quarantine", "rowid"), ("lost", "rowid")):
            copied[table] = _salvage(old, new, table, key) if old is not None else 0
        if old is not None:
            old.close()
        new.close()
        return ("spool was damaged (%s); set aside as %s; recovered %d records of %d runs into a new spool"
                % (problem, aside, copied["records"], copied["runs"]))

    def close(self) -> None:
        self.conn.close()

    # -- ingest (the server's thread, and `relay replay`) -------------------------------------

    def forget_refusals(self) -> int:
        """Delete the refused records that the watermarks have passed (a refusal is only stored
        when it came past a gap, to keep its seq used up until the gap is filled)."""
        with self._transaction():
            return self.conn.execute(
                "DELETE FROM records WHERE run_id = '' AND seq <= "
                "(SELECT upto FROM streams WHERE streams.stream = records.stream)").rowcount

    def load_watermarks(self) -> None:
        self._upto = dict(self.conn.execute("SELECT stream, upto FROM streams"))
        self._above = {}
        for stream, seq in self.conn.execute(
                "SELECT r.stream, r.seq FROM records r JOIN streams s ON s.stream = r.stream WHERE r.seq > s.upto"):
            self._above.setdefault(stream, set()).add(seq)

    def ingest(self, messages: Iterable[tuple], allow_gaps: bool = False) -> list[Outcome]:
        """Store a batch in one transaction. Each item: (validated message, refusal reason or '') or
        (validated message, refusal, the frame it was decoded from): the frame is stored as it came,
        not packed again. The runs table gets one update per run per batch, not one per record.

        A refused message with a readable (stream, seq) consumes that seq, so the client stops
        re-sending it. Live traffic is taken in seq order only: a message past a gap (its
        predecessor was lost with a dead relay) is not stored ('gap'); the client re-sends from
        the gap. Spill files (`allow_gaps`) may start anywhere: their records fill holes.
        """
        outcomes = []
        now = time.time()
        touched: set[str] = set()
        runs: dict[str, list] = {}   # run -> [records stored, last open's settings, a record other than finish]
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for item in messages:
                message, refusal = item[0], item[1]
                stream, seq = message["stream"], message["seq"]
                upto = self._upto.get(stream, 0)
                if seq <= upto:
                    outcomes.append(Outcome(stream, seq, "dup"))
                    continue
                if seq > upto + 1 and not allow_gaps and not refusal:  # a refusal takes its seq anyway
                    outcomes.append(Outcome(stream, seq, "gap"))
                    continue
                if refusal and seq == upto + 1:  # the watermark alone makes a re-send a duplicate: keep nothing
                    self._advance(stream, seq)
                    touched.add(stream)
                    outcomes.append(Outcome(stream, seq, "error", refusal))
                    continue
                run_id = "" if refusal else message["run"]
                kind = "rejected" if refusal else message["t"]
                if refusal:
                    body = refusal.encode()
                else:
                    body = item[2] if len(item) > 2 else protocol.encode(message)
                cursor = self.conn.execute(
                    "INSERT OR IGNORE INTO records (run_id, stream, seq, kind, body, received, crc) "
                    "VALUES (?,?,?,?,?,?,?)", (run_id, stream, seq, kind, body, now, zlib.crc32(body)))
                if cursor.rowcount == 0:
                    outcomes.append(Outcome(stream, seq, "dup"))
                    continue
                self._advance(stream, seq)
                touched.add(stream)
                if refusal:
                    outcomes.append(Outcome(stream, seq, "error", refusal))
                    continue
                run = runs.get(run_id)
                if run is None:
                    run = runs[run_id] = [0, None, False]
                run[0] += 1
                if kind == "open":
                    run[1] = protocol.encode(message["settings"])
                if kind != "finish":
                    run[2] = True   # the run goes on: not finished (any more)
                outcomes.append(Outcome(stream, seq, "new"))
            for run_id, (stored, settings, goes_on) in runs.items():
                self.conn.execute(
                    "INSERT INTO runs (run_id, settings, received, created, last_seen) VALUES (?,?,?,?,?) "
                    "ON CONFLICT (run_id) DO UPDATE SET received = received + excluded.received, "
                    "last_seen = excluded.last_seen, settings = coalesce(excluded.settings, settings), "
                    "finished = CASE WHEN ? THEN 0 ELSE finished END",
                    (run_id, settings, stored, now, now, goes_on))
            for stream in touched:
                self.conn.execute("INSERT INTO streams (stream, upto) VALUES (?, ?) "
                                  "ON CONFLICT (stream) DO UPDATE SET upto = excluded.upto",
                                  (stream, self._upto[stream]))
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self.load_watermarks()
            raise SpoolError("cannot commit %d records to spool %s: %s" % (len(outcomes), self.path, exc)) from exc
        return outcomes

    def touch(self, run_ids: Iterable[str]) -> None:
        """A heartbeat: these runs' trainers are alive."""
        with self._transaction():
            self.conn.executemany("UPDATE runs SET last_seen = ? WHERE run_id = ?",
                                  [(time.time(), run_id) for run_id in run_ids])

    def unfinished_runs(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT run_id FROM runs WHERE finished = 0")]

    def finish_silent_runs(self, run_ids: Iterable[str], exit_code: int) -> list[str]:
        """Spool a finish record for each of these runs (their trainers went silent) that is open:
        not finished, with settings, and no finish record waiting. Returns those runs."""
        now = time.time()
        with self._transaction():
            runs = [run_id for run_id in run_ids if self.conn.execute(
                "SELECT 1 FROM runs WHERE run_id = ? AND finished = 0 AND settings IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM records WHERE records.run_id = runs.run_id AND kind = 'finish')",
                (run_id,)).fetchone()]
            for run_id in runs:
                body = protocol.encode({"v": protocol.VERSION, "t": "finish", "run": run_id, "exit_code": exit_code,
                                        "stream": "relay-silence", "seq": 0, "time": now, "silent": True})
                self.conn.execute(
                    "INSERT INTO records (run_id, stream, seq, kind, body, received, crc) VALUES (?, 'relay-silence', "
                    "(SELECT coalesce(max(seq), 0) + 1 FROM records WHERE stream = 'relay-silence'), 'finish', ?, ?, ?)",
                    (run_id, body, now, zlib.crc32(body)))
                self.conn.execute("UPDATE runs SET last_seen = ? WHERE run_id = ?", (now, run_id))
        return runs

    def give_up(self, stream: str, run_id: str, below: int) -> tuple[int, int]:
        """The stream's records from its watermark up to `below` are known lost (acked, then gone
        with a damaged spool): note them in the lost table and take the stream on from `below`.
        Returns the (first, last) seq given up."""
        first = self._upto.get(stream, 0) + 1
        upto = below - 1
        above = self._above.get(stream, set())
        while upto + 1 in above:
            upto += 1
        with self._transaction():
            self.conn.execute("INSERT INTO lost (run_id, stream, first_seq, last_seq, noticed) VALUES (?,?,?,?,?)",
                              (run_id, stream, first, below - 1, time.time()))
            self.conn.execute("INSERT INTO streams (stream, upto) VALUES (?, ?) "
                              "ON CONFLICT (stream) DO UPDATE SET upto = excluded.upto", (stream, upto))
        self._upto[stream] = upto
        self._above[stream] = {seq for seq in above if seq > upto}
        return first, below - 1

    def upto(self, stream: str) -> int:
        return self._upto.get(stream, 0)

    def _advance(self, stream: str, seq: int) -> None:
        upto = self._upto.get(stream, 0)
        above = self._above.setdefault(stream, set())
        above.add(seq)
        while upto + 1 in above:
            upto += 1
            above.discard(upto)
        self._upto[stream] = upto

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- upload side (one uploader thread per run) --------------------------------------------

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

    def settings(self, run_id: str) -> dict | None:
        row = self.conn.execute("SELECT settings FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return msgpack.unpackb(row[0], raw=False) if row and row[0] is not None else None

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
                message, problem = _read_body(kind, body, crc)
                if problem:
                    unreadable.append((rid, stream, seq, kind, problem))
                else:
                    records.append(Record(rid, run_id, kind, message, received, step))
            if unreadable:
                self._set_aside(run_id, unreadable)
            if records or not unreadable:
                return records

    def _set_aside(self, run_id: str, unreadable: list[tuple[int, str, int, str, str]]) -> None:
        with self._transaction():
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
        """What W&B's summary of the run says about records it will never get (only what is not 0)."""
        set_aside = self.conn.execute("SELECT count(*) FROM quarantine WHERE run_id = ?", (run_id,)).fetchone()[0]
        lost = self.conn.execute("SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM lost WHERE run_id = ?",
                                 (run_id,)).fetchone()[0]
        return {key: value for key, value in (("relay/records_set_aside", set_aside), ("relay/records_lost", lost))
                if value}

    def assign_steps(self, run_id: str, steps: list[tuple[int, int]], uploaded_id: int) -> None:
        """Persist (record id, step) pairs before the rows go to the SDK."""
        handed = max((step + 1 for _, step in steps), default=0)
        with self._transaction():
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

    def confirm_below_step(self, run_id: str, server_step: int) -> int:
        """A resume told us the server holds steps < server_step, and will hold no more (its count
        was trusted): those records are done, and the rest will be handed again from server_step."""
        with self._transaction():
            cursor = self.conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM steps WHERE run_id = ? "
                                       "AND step < ?)", (run_id, server_step))
            self.conn.execute("DELETE FROM steps WHERE run_id = ?", (run_id,))
            self.conn.execute("UPDATE runs SET uploaded_id = 0, steps_handed = ? WHERE run_id = ?",
                              (server_step, run_id))
        return cursor.rowcount

    def confirm_console(self, run_id: str, server_step: int) -> int:
        """W&B holds the rows below server_step: the console records handed before the last of
        them are done too (they take no step, and wandb-core sends what it was handed in order).
        Called before those rows' own confirmation, which forgets their steps."""
        with self._transaction():
            last = self.conn.execute("SELECT MAX(id) FROM steps WHERE run_id = ? AND step < ?",
                                     (run_id, server_step)).fetchone()[0]
            if last is None:
                return 0
            cursor = self.conn.execute("DELETE FROM records WHERE run_id = ? AND kind = 'console' AND id < ?",
                                       (run_id, last))
        return cursor.rowcount

    def confirm_logged(self, run_id: str, server_step: int) -> int:
        """Mid-run: W&B holds every row below server_step; those records are done."""
        with self._transaction():
            cursor = self.conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM steps WHERE run_id = ? "
                                       "AND step < ?)", (run_id, server_step))
            self.conn.execute("DELETE FROM steps WHERE run_id = ? AND step < ?", (run_id, server_step))
        return cursor.rowcount

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

    def confirm_through(self, run_id: str, record_id: int, exit_code: int | None = None,
                        finished: bool = False) -> int:
        """W&B confirmed everything of this run up to record_id (run.finish() returned)."""
        with self._transaction():
            checkpoints = self.conn.execute(
                "SELECT stream, seq FROM records WHERE run_id = ? AND id <= ? AND kind = 'checkpoint'",
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
        with self._transaction():
            checkpoint = self.conn.execute(
                "SELECT stream, seq FROM records WHERE run_id = ? AND id = ? AND kind = 'checkpoint'",
                (run_id, record_id)).fetchall()
            self.conn.execute("DELETE FROM records WHERE run_id = ? AND id = ? AND kind = 'checkpoint'",
                              (run_id, record_id))
        self._delete_snapshots(checkpoint)

    def has_record(self, stream: str, seq: int) -> bool:
        return self.conn.execute("SELECT 1 FROM records WHERE stream = ? AND seq = ?", (stream, seq)).fetchone() \
            is not None

    def sweep_snapshots(self) -> int:
        """At the relay's start: delete the snapshots no record holds (their record was deleted or
        never committed before a crash). Only names whose seq is at or under its stream's watermark
        (or a temporary name) are touched: a snapshot above it may belong to a `relay replay` that
        has not committed yet."""
        held = {snapshots.name(stream, seq) for stream, seq in self.conn.execute(
            "SELECT stream, seq FROM records WHERE kind = 'checkpoint'")}
        watermarks = {snapshots.name(stream, 0).rsplit("-", 1)[0]: upto
                      for stream, upto in self.conn.execute("SELECT stream, upto FROM streams")}
        swept = 0
        try:
            entries = os.listdir(snapshots.directory(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry in held:
                continue
            stream_hash, _, seq = entry.partition(snapshots.PARTIAL)[0].rpartition("-")
            if not entry.endswith(snapshots.PARTIAL) and not (seq.isdigit() and int(seq) <= watermarks.get(
                    stream_hash, -1)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(snapshots.directory(self.directory), entry))
                swept += 1
        return swept

    def _delete_snapshots(self, checkpoints: list[tuple[str, int]]) -> None:
        for stream, seq in checkpoints:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(snapshots.directory(self.directory), snapshots.name(stream, seq)))

    def set_state(self, run_id: str, state: str, error: str | None = None, location: str | None = None) -> None:
        with self._transaction():
            self.conn.execute(
                "UPDATE runs SET state = ?, state_since = CASE WHEN state = ? THEN state_since ELSE ? END, "
                "last_error = ?, location = coalesce(?, location) WHERE run_id = ?",
                (state, state, time.time(), error, location, run_id))

    @contextlib.contextmanager
    def _transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")

    # -- status -------------------------------------------------------------------------------

    def status(self, page: int | None = None, max_bytes: int | None = STATUS_BYTES) -> dict[str, Any]:
        """The spool's part of `relay status`, of a size that does not grow with the spool's history.

        `records`: totals over every run: received, uploaded (confirmed by W&B), pending (not yet
        confirmed) = unsent (not yet handed to the wandb SDK) + unconfirmed (handed to it, not yet
        confirmed), and `oldest_pending_age` (see _RUN_ROWS for which records count). `run_counts`: runs in the spool by
        state (`by_state`), those still active (not finished, or with records pending) by state,
        and how many `runs` lists.

        `runs` (see `_run` for one entry), in the order the runs came: without `page`, the active
        runs and then the STATUS_RECENT_FINISHED most recently finished ones, STATUS_RUNS and
        `max_bytes` of packed size at most (None: no size limit), taken in that order. With `page`
        (0 for the first), every run in turn: the runs after that cursor, STATUS_PAGE_RUNS and
        about STATUS_PAGE_BYTES of them at most, and `next`, the cursor of the next page (None
        after the last). At least one run is listed when there is one.
        """
        now = time.time()
        totals = {"received": 0, "pending": 0, "unsent": 0}
        oldest = None
        by_state: dict[str, int] = {}
        active_by_state: dict[str, int] = {}
        active: list[tuple] = []
        recent: list[tuple] = []      # (state_since, rowid, row) of the most recently finished runs
        listed: list[tuple] = []      # a page
        more = False
        for row in self.conn.execute(_RUN_ROWS):
            rowid, received, finished, state, since, pending, unsent, first = (
                row[0], row[2], row[7], row[4], row[5], row[11], row[12], row[13])
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
                if rowid > page:
                    if len(listed) < STATUS_PAGE_RUNS:
                        listed.append(row)
                    else:
                        more = True
            elif is_active:
                if len(active) < STATUS_RUNS:
                    active.append(row)
            else:
                heapq.heappush(recent, (since or 0.0, rowid, row))
                if len(recent) > STATUS_RECENT_FINISHED:
                    heapq.heappop(recent)
        if page is None:  # active runs first, then the most recently finished
            listed = active + [row for _, _, row in sorted(recent, reverse=True)]
            budget = max_bytes
        else:
            budget = STATUS_PAGE_BYTES
        runs, size = [], 0
        for row in listed[:STATUS_RUNS] if page is None else listed:
            run = self._run(row, now)
            if budget is not None:
                size += len(protocol.encode(run[0]))
                if runs and size > budget:
                    more = True
                    break
            runs.append(run)
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
            "spool_bytes": self.size_bytes(), "spool_path": self.path,
        }
        if page is not None:
            status["next"] = runs[-1][1] if more and runs else None
        return status

    def _run(self, row: tuple, now: float) -> tuple[dict[str, Any], int]:
        """One run of a status, and its cursor. Client-given names and error texts are cut to
        STATUS_TEXT characters, so that a run's entry has a size limit."""
        (rowid, run_id, received, uploaded_id, state, since, error, finished, exit_code, location, last_seen,
         pending, unsent, first) = row
        settings = self.conn.execute("SELECT settings FROM runs WHERE rowid = ?", (rowid,)).fetchone()[0]
        info = msgpack.unpackb(settings, raw=False) if settings else {}
        return {
            "run_id": run_id, "project": _cut(info.get("project")), "name": _cut(info.get("name")),
            "received": received, "uploaded": max(0, received - pending), "pending": pending,
            "unsent": unsent, "unconfirmed": pending - unsent,
            "oldest_pending_age": round(now - first, 3) if first is not None else None,
            "state": state, "state_since": since, "last_error": _cut(error),
            "exit_code": exit_code, "finished": bool(finished), "location": location, "last_seen": last_seen,
        }, rowid

    def offline_locations(self) -> list[tuple[str, str]]:
        """(run id, location) of the runs whose W&B location is not a URL: offline run directories."""
        return list(self.conn.execute(
            "SELECT run_id, location FROM runs WHERE location IS NOT NULL AND location NOT LIKE 'http%' "
            "ORDER BY rowid"))

    def pending_counts(self) -> dict[str, tuple[int, int]]:
        """Run id -> (received, records not yet handed to the SDK) for every unfinished run (what
        backlog progress follows)."""
        return {run_id: (received, pending) for run_id, received, pending in self.conn.execute(
            "SELECT run_id, received, (SELECT count(*) FROM records WHERE records.run_id = runs.run_id "
            "AND records.id > runs.uploaded_id) FROM runs WHERE finished = 0")}

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total


