"""Retention on a real SQLite spool with an injected clock (relay/spool_retention.py): finished,
confirmed runs move to the archive and back, late spill replays stay exactly once, watermarks and
archived runs are let go of after their retentions, and the status reads no archived run."""
from __future__ import annotations

import sqlite3
import time

import pytest

from relay import spool_db
from relay.spool import EXPIRED, Spool
from relay.spool_report import HOT_CURSOR

pytestmark = pytest.mark.timeout(60)

DAY = 86400.0
WEEK, QUARTER = 7 * DAY, 90 * DAY


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def spool_at(tmp_path, clock: Clock) -> Spool:
    spool = Spool(str(tmp_path), clock=clock)
    spool.load_watermarks()
    return spool


def run_records(run_id: str, stream: str, first_seq: int, logs: int, clock: Clock, finish: bool = True) -> list:
    """An open (at `first_seq`), `logs` log records and a finish, as a trainer sends them."""
    base = {"v": 1, "stream": stream, "run": run_id}
    items = [dict(base, t="open", seq=first_seq, settings={"project": "p", "name": run_id})]
    items += [dict(base, t="log", seq=first_seq + 1 + i, metrics={"i": i}, time=clock.now) for i in range(logs)]
    if finish:
        items.append(dict(base, t="finish", seq=first_seq + 1 + logs, exit_code=0, time=clock.now))
    return [(item, "") for item in items]


def upload(spool: Spool, run_id: str, through: int | None = None, finished: bool = True) -> int:
    """What an uploader does with the run's records: steps first, then W&B's confirmation of the
    finish (or of the records up to `through`). Returns the steps handed."""
    records = spool.uploads.records(run_id, 0, 1000)
    steps = [(record.id, step) for step, record in enumerate(r for r in records if r.kind == "log")]
    spool.uploads.assign_steps(run_id, steps, records[-1].id)
    spool.uploads.confirm_through(run_id, records[-1].id if through is None else through, 0, finished=finished)
    spool.uploads.set_state(run_id, "finished" if finished else "uploading")
    return len(steps)


def retain(spool: Spool, limit: int = 500):
    return spool.apply_retention(WEEK, QUARTER, QUARTER, limit)


def hot(spool: Spool) -> list[str]:
    return [row[0] for row in spool.conn.execute("SELECT run_id FROM runs ORDER BY rowid")]


def archived(spool: Spool) -> list[str]:
    return [row[0] for row in spool.conn.execute("SELECT run_id FROM runs_done ORDER BY rowid")]


def test_finished_confirmed_runs_move_to_the_archive_after_retention_and_no_other_run_does(tmp_path):
    clock = Clock()
    spool = spool_at(tmp_path, clock)
    spool.ingest(run_records("done", "s-done", 1, 5, clock))
    spool.ingest(run_records("live", "s-live", 1, 3, clock, finish=False))
    spool.ingest(run_records("tail", "s-tail", 1, 4, clock))
    upload(spool, "done")
    upload(spool, "live", finished=False)       # confirmed so far, not finished
    first_tail = spool.uploads.records("tail", 0, 1)[0].id
    upload(spool, "tail", through=first_tail)   # finished in W&B, but records of it still wait for confirmation
    spool.conn.execute("UPDATE runs SET finished = 1 WHERE run_id = 'tail'")

    clock.now += WEEK - 60
    assert retain(spool).archived == 0 and hot(spool) == ["done", "live", "tail"]
    clock.now += 120
    done = retain(spool)
    assert (done.archived, done.deleted, done.streams) == (1, 0, ())
    assert hot(spool) == ["live", "tail"] and archived(spool) == ["done"]
    row = spool.conn.execute("SELECT received, steps_handed, state, finished, archived FROM runs_done").fetchone()
    assert row == (7, 5, "finished", 1, clock.now)

    summary = spool.report.status()
    assert [run["run_id"] for run in summary["runs"]] == ["live", "tail"]   # the default status: hot runs only
    assert summary["run_counts"]["total"] == 3 and summary["run_counts"]["by_state"] == {"finished": 2, "uploading": 1}
    assert summary["records"]["received"] == 7 + 4 + 6 and summary["records"]["pending"] == 5   # tail's 5 left
    page = spool.report.status(page=0)
    assert [run["run_id"] for run in page["runs"]] == ["done", "live", "tail"] and page["next"] is None
    assert page["runs"][0]["name"] == "done" and page["runs"][0]["received"] == 7

    clock.now += 10 * WEEK   # unfinished, or with records left: never archived, however old
    assert retain(spool).archived == 0 and hot(spool) == ["live", "tail"]
    upload(spool, "tail")
    assert retain(spool).archived == 1 and archived(spool) == ["done", "tail"]


def test_an_archived_run_that_resumes_comes_back_with_its_steps(tmp_path):
    clock = Clock()
    spool = spool_at(tmp_path, clock)
    spool.ingest(run_records("r1", "s-a", 1, 8, clock))
    upload(spool, "r1")
    clock.now += WEEK + 1
    assert retain(spool).archived == 1 and hot(spool) == []
    before = spool.report.status()["records"]

    # The trainer resumes the finished run from a checkpoint: a new client stream, the same run id.
    outcomes = spool.ingest(run_records("r1", "s-b", 1, 3, clock, finish=False))
    assert [o.status for o in outcomes] == ["new"] * 4
    assert hot(spool) == ["r1"] and archived(spool) == []
    assert spool.conn.execute("SELECT received, steps_handed, finished FROM runs").fetchone() == (10 + 4, 8, 0)
    assert spool.uploads.steps_handed("r1") == 8   # its next rows go on at W&B step 8
    after = spool.report.status()["records"]
    assert (after["received"], after["pending"]) == (before["received"] + 4, 4)
    assert spool.report.status()["run_counts"]["total"] == 1


def test_a_late_replay_of_an_archived_runs_records_is_deduplicated_exactly(tmp_path):
    clock = Clock()
    spool = spool_at(tmp_path, clock)
    spilled = run_records("r1", "s1", 1, 20, clock)
    spool.ingest(spilled[:15])        # 1..15 reached the relay; the client also spilled 1..22 to a file
    spool.ingest(spilled[15:])
    upload(spool, "r1")
    clock.now += WEEK + 1
    assert retain(spool).archived == 1

    replay = Spool(str(tmp_path), clock=clock)   # `relay replay`, in its own process
    replay.load_watermarks()
    outcomes = replay.ingest(spilled, allow_gaps=True)
    assert [(o.seq, o.status) for o in outcomes] == [(seq, "dup") for seq in range(1, 23)]
    assert archived(replay) == ["r1"] and hot(replay) == []   # nothing of it came back
    assert replay.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 0
    # Records above the watermark (never delivered) are new: the run comes back for them only.
    more = [(dict(item, seq=item["seq"] + 22), "") for item, _ in spilled[1:3]]
    assert [o.status for o in replay.ingest(spilled + more, allow_gaps=True)] == ["dup"] * 22 + ["new"] * 2
    assert hot(replay) == ["r1"] and [r.body["seq"] for r in replay.uploads.records("r1", 0, 100)] == [24, 25]
    assert replay.uploads.steps_handed("r1") == 20


def test_after_watermark_retention_a_replay_is_refused_never_doubled_and_old_archives_go(tmp_path):
    clock = Clock()
    spool = spool_at(tmp_path, clock)
    logged = clock.now
    spilled = run_records("r1", "s1", 1, 10, clock)
    spool.ingest(spilled)
    spool.conn.execute(   # lost and quarantine rows live as long as their run's row
"INSERT INTO lost (run_id, stream, first_seq, last_seq, noticed) VALUES ('r1', 's1', 3, 4, 0)")
    spool.conn.execute("INSERT INTO quarantine (id, run_id, stream, seq, kind, reason, set_aside) "
                       "VALUES (999, 'r1', 's1', 99, 'log', 'test', 0)")
    upload(spool, "r1")
    clock.now += WEEK + 1
    assert retain(spool).archived == 1
    clock.now += QUARTER - WEEK   # the run was archived less than 90 days ago; the stream moved more than that
    done = retain(spool)
    assert (done.archived, done.deleted, done.streams) == (0, 0, ("s1",))
    assert spool.upto("s1") == 0 and spool.conn.execute("SELECT count(*) FROM streams").fetchone()[0] == 0

    replay = Spool(str(tmp_path), clock=clock)   # `relay replay`, in its own process
    replay.load_watermarks()
    outcomes = replay.ingest(spilled, allow_gaps=True)
    assert [o.status for o in outcomes] == ["error"] * 12   # the open (no time of its own) with its stream
    assert outcomes[0].reason == EXPIRED % time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(logged))
    # The server's own spool refuses them too; a second replay finds the seqs used up: duplicates.
    assert [o.status for o in spool.ingest(spilled[:3])] == ["error"] * 3
    assert [o.status for o in replay.ingest(spilled, allow_gaps=True)] == ["dup"] * 12
    assert spool.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 0
    assert archived(spool) == ["r1"] and hot(spool) == []
    fresh = run_records("r2", "s2", 1, 2, clock)   # a stream logging now is taken as ever
    assert [o.status for o in spool.ingest(fresh)] == ["new"] * 4

    clock.now += WEEK
    done = retain(spool)
    assert done.deleted == 1 and archived(spool) == []
    assert [spool.conn.execute("SELECT count(*) FROM %s" % table).fetchone()[0]
            for table in ("lost", "quarantine")] == [0, 0]
    status = spool.report.status()
    assert status["records"]["received"] == 12 + 4 and status["run_counts"]["total"] == 1   # totals never go back


def test_status_with_ten_thousand_archived_runs_reads_no_archived_row_and_counts_in_grouped_queries(tmp_path):
    clock = Clock()
    spool = spool_at(tmp_path, clock)
    with spool.transaction():
        spool.conn.executemany(
            "INSERT INTO runs (run_id, received, uploaded_id, state, state_since, finished, created, last_seen) "
            "VALUES (?, 100, 0, 'finished', ?, 1, ?, ?)",
            [("old%05d" % i, clock.now, clock.now, clock.now) for i in range(10_000)])
    clock.now += WEEK + 1
    passes = 0
    while retain(spool, limit=5_000).full(5_000):
        passes += 1
    assert passes == 2 and len(archived(spool)) == 10_000 and hot(spool) == []
    for run in range(30):
        spool.ingest(run_records("live%02d" % run, "s%02d" % run, 1, 50, clock, finish=False))

    statements: list[str] = []
    spool.conn.set_trace_callback(statements.append)
    started = time.monotonic()
    status = spool.report.status()
    elapsed = time.monotonic() - started
    spool.conn.set_trace_callback(None)
    assert elapsed < 1.0, "status took %.2f s" % elapsed
    assert len(statements) == 7, statements   # counts, first handed, receive times, archive by state, tally, runs, settings
    assert [s for s in statements if "runs_done" in s] == ["SELECT state, count(*) FROM runs_done GROUP BY state"]
    plan = " ".join(row[3] for row in spool.conn.execute(
        "EXPLAIN QUERY PLAN SELECT state, count(*) FROM runs_done GROUP BY state"))
    assert "COVERING INDEX runs_done_by_state" in plan, plan
    assert status["run_counts"]["total"] == 10_030 and status["run_counts"]["active"] == 30
    assert status["records"]["received"] == 10_000 * 100 + 30 * 51 and status["records"]["pending"] == 30 * 51
    assert [run["pending"] for run in status["runs"]] == [51] * 30
    assert spool.report.pending_counts() == {"live%02d" % run: (51, 51) for run in range(30)}

    every, page = [], 0
    while page is not None:
        reply = spool.report.status(page=page)
        every += [run["run_id"] for run in reply["runs"]]
        page = reply["next"]
    assert every == ["old%05d" % i for i in range(10_000)] + ["live%02d" % run for run in range(30)]
    assert page is None and reply["runs"][-1]["pending"] == 51


def test_an_older_spool_is_upgraded_with_the_archive_and_watermark_times(tmp_path):
    clock = Clock()
    spool = spool_at(tmp_path, clock)
    spool.ingest(run_records("r1", "s1", 1, 2, clock))
    conn = spool.conn
    conn.executescript("DROP TABLE runs_done; DROP TABLE tallies; DROP INDEX streams_by_time; "
                       "ALTER TABLE streams DROP COLUMN moved; PRAGMA user_version = 1;")
    spool.close()
    upgraded = Spool(str(tmp_path), clock=clock)
    upgraded.load_watermarks()
    tables = {row[0] for row in upgraded.conn.execute("SELECT name FROM sqlite_master")}
    assert {"runs_done", "tallies", "streams_by_time", "runs_done_by_time"} <= tables
    (moved,) = upgraded.conn.execute("SELECT moved FROM streams WHERE stream = 's1'").fetchone()
    assert time.time() - 60 < moved <= time.time()   # kept a full watermark_retention from the upgrade
    assert upgraded.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert upgraded.upto("s1") == 4 and [o.status for o in upgraded.ingest(run_records("r1", "s1", 1, 2, clock))] \
        == ["dup"] * 4
    with pytest.raises(sqlite3.OperationalError):   # a reader of the running relay's spool writes nothing
        spool_db.connect_reader(upgraded.path).execute("DELETE FROM runs_done")
    assert HOT_CURSOR > 2 ** 32
