"""The relay's durable spool: SQLite in WAL mode.

Invariants:
- A record is acked to its client only after the transaction that inserted it has committed
  (synchronous=FULL: a commit survives the relay being killed, and the machine losing power).
- (stream, seq) is UNIQUE: a re-sent record is recognised and acked again, never stored twice.
  Per stream, `streams.upto` is the highest seq below which every seq is present (or was consumed
  by an error reply); a seq at or under it is a duplicate even after its row was compacted away.
- The uploader gives each record a W&B step and commits that *before* handing it to the wandb SDK.
  After a restart, the W&B run is resumed and reports its next step S: records whose step is below
  S are on the server (W&B stores history as a prefix) and are deleted; the rest are logged again.
- Records leave the spool only once W&B has confirmed them: the run finished (`run.finish()`
  returned) or a resume reported a server step past them; or, damaged, they are moved to the
  `quarantine` table (a body whose crc32 or decoding fails: logged, counted in the run's W&B
  summary as relay/records_set_aside).
- Acked seqs the spool lost (a damaged or cut WAL: relay/wal.py reports it at start) are given up
  only once the client has shown it no longer holds them (the server's GapWatch); each such range
  is written to the `lost` table and counted in the run's W&B summary as relay/records_lost.
- Policy 'hold' (the server): no record is acked while the spool is over max_spool_bytes or less
  than min_free_bytes would be left for it on its disk, so uploads always have room to write the
  steps, states and deletes that empty it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import msgpack

from relay import protocol, wal

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


class SpoolError(RuntimeError):
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
        with self._transaction():
            self.conn.executemany("INSERT OR REPLACE INTO steps (id, run_id, step) VALUES (?, ?, ?)",
                                  [(i, run_id, s) for i, s in steps])
            self.conn.execute("UPDATE runs SET uploaded_id = ? WHERE run_id = ?", (uploaded_id, run_id))

    def confirm_below_step(self, run_id: str, server_step: int) -> int:
        """A resume told us the server holds steps < server_step: those records are done."""
        with self._transaction():
            cursor = self.conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM steps WHERE run_id = ? "
                                       "AND step < ?)", (run_id, server_step))
            self.conn.execute("DELETE FROM steps WHERE run_id = ?", (run_id,))
            self.conn.execute("UPDATE runs SET uploaded_id = 0 WHERE run_id = ?", (run_id,))
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
            cursor = self.conn.execute("DELETE FROM records WHERE run_id = ? AND id <= ?", (run_id, record_id))
            self.conn.execute("DELETE FROM steps WHERE run_id = ? AND id <= ?", (run_id, record_id))
            if finished:
                self.conn.execute("UPDATE runs SET finished = 1, exit_code = ? WHERE run_id = ?", (exit_code, run_id))
        return cursor.rowcount

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

    def status(self) -> dict[str, Any]:
        runs = []
        for (run_id, settings, received, uploaded_id, state, since, error, exit_code, finished,
             location, last_seen) in self.conn.execute(
                "SELECT run_id, settings, received, uploaded_id, state, state_since, last_error, exit_code, "
                "finished, location, last_seen FROM runs ORDER BY created"):
            pending, oldest = self.conn.execute(
                "SELECT count(*), min(received) FROM records WHERE run_id = ? AND id > ?",
                (run_id, uploaded_id)).fetchone()
            info = msgpack.unpackb(settings, raw=False) if settings else {}
            runs.append({
                "run_id": run_id, "project": info.get("project"), "name": info.get("name"),
                "received": received, "uploaded": received - pending, "pending": pending,
                "oldest_pending_age": round(time.time() - oldest, 3) if oldest else None,
                "state": state, "state_since": since, "last_error": error,
                "exit_code": exit_code, "finished": bool(finished), "location": location, "last_seen": last_seen,
            })
        return {"runs": runs, "spool_bytes": self.size_bytes(), "spool_path": self.path}

    def pending_counts(self) -> dict[str, tuple[int, int]]:
        """Run id -> (received, pending) for every unfinished run (what backlog progress follows)."""
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


