"""The relay's durable spool: SQLite in WAL mode. This module holds the spool's core: opening it,
and taking records in (ingest, with dedupe and each stream's watermark).

Invariants:
- A record is acked to its client only after the transaction that inserted it has committed
  (synchronous=FULL: a commit survives the relay being killed, and the machine losing power).
- (stream, seq) is UNIQUE: a re-sent record is recognised and acked again, never stored twice.
  Per stream, `streams.upto` is the highest seq below which every seq is present (or was consumed
  by an error reply); a seq at or under it is a duplicate even after its row was compacted away.
- Acked seqs the spool lost (a damaged or cut WAL: relay/wal.py reports it at start) are given up
  only once the client has shown it no longer holds them (the server's GapWatch); each such range
  is written to the `lost` table and counted in the run's W&B summary as relay/records_lost.
- Policy 'hold' (the server): no record is acked while the spool is over max_spool_bytes or less
  than min_free_bytes would be left for it on its disk, so uploads always have room to write the
  steps, states and deletes that empty it.
- Finished runs leave `runs` for the archive, and idle streams' watermarks are let go of, after
  the retentions written at the top of relay/spool_retention.py; a record of a stream whose
  watermark was let go that may already have been uploaded is refused, never stored again.
- What happens to a record after that (its W&B step, the confirmations that let it go, the
  quarantine of one that cannot be read, its checkpoint snapshot) keeps the invariants written at
  the top of relay/spool_uploads.py.

The spool's other parts share the core's connection: `Spool.uploads` (relay/spool_uploads.py:
what an uploader reads and writes of its run), `Spool.report` (relay/spool_report.py: the status
and the runs the server follows) and `Spool.footprint` (relay/spool_db.py, with the schema and
transactions: the room the spool takes and has). relay/spool_recovery.py checks and recovers the
file when the server opens it, and sweeps what a crash left. `Spool.retention`
(relay/spool_retention.py) archives and deletes what uploads no longer need.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from relay import protocol, spool_db, spool_recovery, wal
from relay.errors import RelayError
from relay.spool_db import Footprint
from relay.spool_report import SpoolReport
from relay.spool_retention import CLOCK_MARGIN, Pass, Retention
from relay.spool_uploads import Uploads


class SpoolError(RelayError, RuntimeError):
    pass


EXPIRED = ("its stream's watermark was let go of (no record for watermark_retention) and it was logged before "
           "%s, so the relay cannot tell whether it was uploaded already; refused rather than risk logging it twice "
           "(replay spill files within watermark_retention, or raise it)")


def format_time(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when or 0.0))


@dataclass
class Outcome:
    """What ingest made of one message: stored ('new'), already there ('dup') or refused."""
    stream: str
    seq: int
    status: str          # new | dup | gap | error
    reason: str = ""


class Watermarks:
    """Per stream, the highest seq below which every seq is stored (`upto`), and the seqs stored
    above it, in memory: what ingest compares a seq with."""

    def __init__(self) -> None:
        self._upto: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}

    def load(self, conn: sqlite3.Connection) -> None:
        self._upto = dict(conn.execute("SELECT stream, upto FROM streams"))
        self._above = {}
        for stream, seq in conn.execute(
                "SELECT r.stream, r.seq FROM records r JOIN streams s ON s.stream = r.stream WHERE r.seq > s.upto"):
            self._above.setdefault(stream, set()).add(seq)

    def upto(self, stream: str) -> int:
        return self._upto.get(stream, 0)

    def known(self, stream: str) -> bool:
        return stream in self._upto

    def forget(self, streams: Iterable[str]) -> None:
        for stream in streams:
            self._upto.pop(stream, None)
            self._above.pop(stream, None)

    def advance(self, stream: str, seq: int) -> None:
        """`seq` of `stream` is stored: the watermark moves on over every seq stored after it."""
        upto = self._upto.get(stream, 0)
        above = self._above.setdefault(stream, set())
        above.add(seq)
        while upto + 1 in above:
            upto += 1
            above.discard(upto)
        self._upto[stream] = upto

    def past(self, stream: str, below: int) -> int:
        """Where the watermark would be if every seq under `below` were stored."""
        upto = below - 1
        above = self._above.get(stream, set())
        while upto + 1 in above:
            upto += 1
        return upto

    def move(self, stream: str, upto: int) -> None:
        self._upto[stream] = upto
        self._above[stream] = {seq for seq in self._above.get(stream, set()) if seq > upto}


class Spool:
    """One connection to the spool; make one per thread (sqlite3 connections are not shared)."""

    FILENAME = spool_db.FILENAME

    def __init__(self, directory: str, check: bool = True, clock: Callable[[], float] = time.time,
                 cache_kib: int | None = None):
        """`check`: look the WAL over before SQLite replays it, then the file, and recover it if
        damaged (relay/spool_recovery.py). The server does, once at start; its uploaders open the
        spool it checked. `clock`: the wall clock ingest stamps records, runs and watermarks with.
        `cache_kib`: the connection's page cache limit (relay/spool_db.py `connect`)."""
        self.directory = directory
        self.path = os.path.join(directory, self.FILENAME)
        self.recovery: str | None = None   # what happened if the spool was found damaged
        self.wal_damage: wal.WalReport | None = None  # what the WAL check found, if anything
        try:
            os.makedirs(directory, exist_ok=True)
            if check:
                self.wal_damage, self.recovery = spool_recovery.check_and_recover(self.path)
            self.conn = spool_db.connect(self.path, cache_kib)
            spool_db.create(self.conn)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError("cannot open spool %s: %s" % (self.path, exc)) from exc
        self.clock = clock
        self._marks = Watermarks()
        self._let_go_until: float | None = None   # see relay/spool_retention.py
        self._expired: set[str] = set()           # streams whose records are refused for it
        self.retention = Retention(self.conn)
        self.uploads = Uploads(self.conn, directory)
        self.report = SpoolReport(self.conn, directory)
        self.footprint = Footprint(self.conn, directory)

    def close(self) -> None:
        self.conn.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction on this connection (relay/spool_db.py)."""
        return spool_db.transaction(self.conn)

    # -- ingest (the server's thread, and `relay replay`) -------------------------------------

    def load_watermarks(self) -> None:
        self._marks.load(self.conn)
        self._let_go_until = self.retention.let_go_until()

    def apply_retention(self, retention: float, archive_retention: float, watermark_retention: float,
                        limit: int) -> Pass:
        """One bounded pass of relay/spool_retention.py (the server's scan); the watermarks let go
        of are forgotten here too."""
        done = self.retention.run(self.clock(), retention, archive_retention, watermark_retention, limit)
        if done.streams:
            self._marks.forget(done.streams)
            self._let_go_until = self.retention.let_go_until()
        return done

    def _expire(self, messages: list) -> None:
        """Streams with no watermark that have a record logged before a let-go watermark last
        moved (with the clock margin): their records are refused from here on (see
        relay/spool_retention.py)."""
        if self._let_go_until is None:
            return
        until = self._let_go_until + CLOCK_MARGIN
        for item in messages:
            message = item[0]
            stream, logged = message["stream"], message.get("time")
            if isinstance(logged, (int, float)) and logged < until and not self._marks.known(stream):
                self._expired.add(stream)

    def forget_refusals(self) -> int:
        """Delete the refused records that the watermarks have passed (a refusal is only stored
        when it came past a gap, to keep its seq used up until the gap is filled)."""
        with self.transaction():
            return self.conn.execute(
                "DELETE FROM records WHERE run_id = '' AND seq <= "
                "(SELECT upto FROM streams WHERE streams.stream = records.stream)").rowcount

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
        now = self.clock()
        messages = list(messages)
        self._expire(messages)
        touched: set[str] = set()
        runs: dict[str, list] = {}   # run -> [records stored, last open's settings, a record other than finish]
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for item in messages:
                message, refusal = item[0], item[1]
                stream, seq = message["stream"], message["seq"]
                if stream in self._expired and not refusal:
                    refusal = EXPIRED % format_time(self._let_go_until)
                upto = self._marks.upto(stream)
                if seq <= upto:
                    outcomes.append(Outcome(stream, seq, "dup"))
                    continue
                if seq > upto + 1 and not allow_gaps and not refusal:  # a refusal takes its seq anyway
                    outcomes.append(Outcome(stream, seq, "gap"))
                    continue
                if refusal and seq == upto + 1:  # the watermark alone makes a re-send a duplicate: keep nothing
                    self._marks.advance(stream, seq)
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
                self._marks.advance(stream, seq)
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
                self.retention.bring_back(run_id)   # an archived run that has records again
                self.conn.execute(
                    "INSERT INTO runs (run_id, settings, received, created, last_seen) VALUES (?,?,?,?,?) "
                    "ON CONFLICT (run_id) DO UPDATE SET received = received + excluded.received, "
                    "last_seen = excluded.last_seen, settings = coalesce(excluded.settings, settings), "
                    "finished = CASE WHEN ? THEN 0 ELSE finished END",
                    (run_id, settings, stored, now, now, goes_on))
            for stream in touched:
                self.conn.execute("INSERT INTO streams (stream, upto, moved) VALUES (?, ?, ?) ON CONFLICT (stream) "
                                  "DO UPDATE SET upto = excluded.upto, moved = excluded.moved",
                                  (stream, self._marks.upto(stream), now))
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            spool_db.rollback(self.conn)
            self.load_watermarks()
            raise SpoolError("cannot commit %d records to spool %s: %s" % (len(outcomes), self.path, exc)) from exc
        return outcomes

    def touch(self, run_ids: Iterable[str]) -> None:
        """A heartbeat: these runs' trainers are alive."""
        with self.transaction():
            self.conn.executemany("UPDATE runs SET last_seen = ? WHERE run_id = ?",
                                  [(self.clock(), run_id) for run_id in run_ids])

    def upto(self, stream: str) -> int:
        return self._marks.upto(stream)

    def has_record(self, stream: str, seq: int) -> bool:
        return self.conn.execute("SELECT 1 FROM records WHERE stream = ? AND seq = ?", (stream, seq)).fetchone() \
            is not None

    def give_up(self, stream: str, run_id: str, below: int) -> tuple[int, int]:
        """The stream's records from its watermark up to `below` are known lost (acked, then gone
        with a damaged spool): note them in the lost table and take the stream on from `below`.
        Returns the (first, last) seq given up."""
        first = self._marks.upto(stream) + 1
        upto = self._marks.past(stream, below)
        with self.transaction():
            self.conn.execute("INSERT INTO lost (run_id, stream, first_seq, last_seq, noticed) VALUES (?,?,?,?,?)",
                              (run_id, stream, first, below - 1, self.clock()))
            self.conn.execute("INSERT INTO streams (stream, upto, moved) VALUES (?, ?, ?) ON CONFLICT (stream) "
                              "DO UPDATE SET upto = excluded.upto, moved = excluded.moved", (stream, upto, self.clock()))
        self._marks.move(stream, upto)
        return first, below - 1

    def finish_silent_runs(self, run_ids: Iterable[str], exit_code: int) -> list[str]:
        """Spool a finish record for each of these runs (their trainers went silent) that is open:
        not finished, with settings, and no finish record waiting. Returns those runs."""
        now = self.clock()
        with self.transaction():
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
