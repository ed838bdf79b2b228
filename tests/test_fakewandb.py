"""The fake W&B backend (tests/fakewandb.py) against the real wandb SDK 0.31 and its wandb-core."""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakewandb import FakeWandb  # noqa: E402

wandb = pytest.importorskip("wandb")

WANDB_CLI = os.path.join(os.path.dirname(sys.executable), "wandb")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A started fake, with this process's WANDB_* environment pointing at it and at tmp_path."""
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    server = FakeWandb()
    server.start()
    env = dict(server.env(), WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
               WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_CACHE_DIR=str(tmp_path / "cache"),
               WANDB_DATA_DIR=str(tmp_path / "data"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield server
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()   # a fresh wandb-core and settings singleton for the next test
    server.stop()


def bits(value) -> bytes:
    return struct.pack("<d", float(value))


def rows(n0: int, n1: int) -> list[dict]:
    """Rows with awkward floats. (Integral floats and -0.0 are left out: the SDK itself sends 1.0 as
    `1` and -0.0 as `0`, so their float-ness / sign never reach any server.)"""
    out = []
    for i in range(n0, n1):
        out.append({"loss": 1.0 / (i + 3), "sum": 0.1 + 0.2 * i if i else 0.1 + 0.2, "nan": math.nan,
                    "inf": math.inf, "ninf": -math.inf, "tiny": 5e-324 * (i + 1), "big": 1.7976931348623157e308,
                    "third": (i + 1) / 3 + 1e-17 * i})
    return out


def assert_rows_equal(recorded: list[dict], expected: list[dict], first_step: int) -> None:
    assert len(recorded) == len(expected)
    for offset, (got, want) in enumerate(zip(recorded, expected)):
        assert got["_step"] == first_step + offset
        for key, value in want.items():
            assert bits(got[key]) == bits(value), (first_step + offset, key, got[key], value)


@pytest.mark.timeout(120)
def test_online_run_history_config_summary(fake, tmp_path):
    expected = rows(0, 50)
    run = wandb.init(project="proj", entity="ent", name="nice-name", group="grp", tags=["a", "b"],
                     notes="some notes", config={"lr": 0.001, "layers": [64, 64], "opt": {"name": "adam"}},
                     dir=str(tmp_path))
    run.define_metric("loss", summary="min")
    for step, row in enumerate(expected):
        run.log(row, step=step)
    run.summary["best_reward"] = 12.5
    run.finish(exit_code=0)

    recorded = fake.run(run.id)
    assert (recorded.entity, recorded.project, recorded.display_name) == ("ent", "proj", "nice-name")
    assert (recorded.group, recorded.tags, recorded.notes) == ("grp", ["a", "b"], "some notes")
    assert recorded.config == {"lr": 0.001, "layers": [64, 64], "opt": {"name": "adam"}}
    assert_rows_equal(recorded.history, expected, 0)
    assert recorded.summary["best_reward"] == 12.5
    assert recorded.summary["loss"] == {"min": min(r["loss"] for r in expected)}
    assert (recorded.exit_code, recorded.complete, recorded.preempting) == (0, True, False)
    assert fake.anomalies == []


@pytest.mark.timeout(120)
def test_resume_continues_at_next_step(fake, tmp_path):
    first = wandb.init(project="proj", entity="ent", id="resumeme", config={"seed": 1}, dir=str(tmp_path))
    for step, row in enumerate(rows(0, 50)):
        first.log(row, step=step)
    first.finish(exit_code=1)   # e.g. a crash
    assert fake.run("resumeme").exit_code == 1

    run = wandb.init(project="proj", entity="ent", id="resumeme", resume="allow", dir=str(tmp_path))
    assert run.resumed
    resumed = fake.run("resumeme")  # running again, as W&B shows a resumed run, until its next finish
    assert (resumed.exit_code, resumed.complete, resumed.preempting) == (None, False, False)
    # wandb-core sets the starting step to historyTail[-1]["_step"] + 1 = 50 (see RunResumeStatus
    # in fakewandb). run.step reads wandb-core's "next step", which it only initialises from the
    # starting step on the first log() after init, so until then it reads 0.
    assert run.starting_step == 50
    assert run.step == 0
    assert dict(run.config) == {"seed": 1}
    run.mark_preempting()
    for step, row in enumerate(rows(50, 60), start=50):
        run.log(row, step=step)
    # log(row, step=59) leaves step 59 open (more keys may still arrive for it): it is sent when a
    # later step is logged or at finish(), and run.step still reads 59.
    assert run.step == 59
    run.finish(exit_code=0)

    recorded = fake.run("resumeme")
    assert [r["_step"] for r in recorded.history] == list(range(60))
    assert_rows_equal(recorded.history, rows(0, 60), 0)
    assert (recorded.exit_code, recorded.complete, recorded.preempting) == (0, True, True)
    assert fake.anomalies == []


@pytest.mark.timeout(120)
def test_model_artifact_bytes_metadata_aliases(fake, tmp_path):
    payload = os.urandom(300_000)
    path = tmp_path / "model.pt"
    path.write_bytes(payload)
    run = wandb.init(project="proj", entity="ent", dir=str(tmp_path))
    artifact = wandb.Artifact("model-%s" % run.id, type="model", metadata={"epoch": 16, "frame": 1048576})
    artifact.add_file(str(path), name="model.pt")
    artifact.add_file(str(path), name="copy/model.pt")   # same content twice: stored once by W&B
    run.log_artifact(artifact, aliases=["latest", "best"]).wait()
    run.finish()

    [recorded] = fake.artifacts()
    assert (recorded.name, recorded.type, recorded.run_id) == ("model-%s" % run.id, "model", run.id)
    assert recorded.metadata == {"epoch": 16, "frame": 1048576}
    assert sorted(recorded.aliases) == ["best", "latest"]
    assert sorted(recorded.files) == ["copy/model.pt", "model.pt"]
    for data in recorded.files.values():
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.timeout(120)
def test_offline_run_then_wandb_sync(fake, tmp_path):
    run = wandb.init(project="proj", entity="ent", id="offline1", config={"k": "v"}, mode="offline",
                     dir=str(tmp_path))
    for step, row in enumerate(rows(0, 40)):
        run.log(row, step=step)
    run.summary["done"] = True
    run_dir = os.path.dirname(run.dir.rstrip("/"))   # .../wandb/offline-run-<time>-offline1
    run.finish(exit_code=0)
    assert fake.runs() == {}   # nothing went online

    result = subprocess.run([WANDB_CLI, "sync", run_dir], env=dict(os.environ), capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr

    recorded = fake.run("offline1")
    assert_rows_equal(recorded.history, rows(0, 40), 0)
    assert recorded.config == {"k": "v"} and recorded.summary["done"] is True
    assert (recorded.exit_code, recorded.complete) == (0, True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["hang", "503"])
def test_graphql_fault_fails_init_then_recovers(fake, tmp_path, mode):
    fake.set_fault(mode, "graphql")
    started = time.monotonic()
    with pytest.raises(wandb.errors.CommError):
        wandb.init(project="proj", entity="ent", id="faulty", dir=str(tmp_path),
                   settings=wandb.Settings(init_timeout=5))
    assert time.monotonic() - started < 15
    assert fake.requests_seen["fault:" + mode] >= 1 and "faulty" not in fake.runs()

    fake.set_fault("ok")
    # 0.31 keeps the failed run's stream in wandb-core: the same id is refused in this process ...
    with pytest.raises(Exception, match="in use"):
        wandb.init(project="proj", entity="ent", id="faulty", dir=str(tmp_path))
    # ... until wandb.teardown() stops wandb-core (a new id works at once).
    wandb.teardown()
    run = wandb.init(project="proj", entity="ent", id="faulty", dir=str(tmp_path),
                     settings=wandb.Settings(init_timeout=30))
    run.log({"x": 1.5}, step=0)
    run.finish()
    assert [r["x"] for r in fake.run("faulty").history] == [1.5]


@pytest.mark.timeout(120)
def test_file_stream_lost_replies_do_not_duplicate_rows(fake, tmp_path):
    # A request a second, and a retry a second after a lost reply (the defaults: 15 s, 2 s).
    run = wandb.init(project="proj", entity="ent", id="lossy", dir=str(tmp_path),
                     settings=wandb.Settings(x_file_stream_transmit_interval=1, x_file_stream_retry_wait_min_seconds=1))
    fake.set_fault("lost_reply", "file_stream")   # recorded, then the connection is reset
    for step, row in enumerate(rows(0, 30)):
        run.log(row, step=step)
    fake.wait_for(lambda f: f.requests_seen["fault:lost_reply"] >= 2, timeout=30)
    fake.set_fault("ok")
    run.finish()
    assert_rows_equal(fake.run("lossy").history, rows(0, 30), 0)
    assert fake.anomalies == []


# ---------------------------------------------------------------- the fake itself, over plain HTTP
def _post(url: str, body: dict, timeout: float = 10) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@pytest.mark.timeout(60)
def test_file_stream_offsets_place_lines():
    fake = FakeWandb()
    base = fake.start()
    try:
        _post(base + "/graphql", {"operationName": "UpsertBucket",
                                  "variables": {"name": "r1", "project": "p", "entity": "e"}})
        url = base + "/files/e/p/r1/file_stream"
        chunk = {"files": {"wandb-history.jsonl": {"offset": 0, "content": ['{"_step":0,"x":NaN}',
                                                                            '{"_step":1,"x":0.30000000000000004}']}}}
        _post(url, chunk)
        _post(url, chunk)   # a resend: same lines again, not new ones
        _post(url, {"files": {"wandb-history.jsonl": {"offset": 2, "content": ['{"_step":2,"x":Infinity}']},
                              "wandb-summary.json": {"offset": 0, "content": ['{"x":1}']}},
                    "complete": True, "exitcode": 3})
        run = fake.run("r1")
        assert [r["_step"] for r in run.history] == [0, 1, 2]
        assert math.isnan(run.history[0]["x"]) and run.history[1]["x"] == 0.1 + 0.2
        assert run.summary == {"x": 1} and (run.complete, run.exit_code) == (True, 3)
        assert fake.anomalies == []
        _post(url, {"files": {"wandb-history.jsonl": {"offset": 5, "content": ['{"_step":5}']}}})
        assert fake.run("r1").history[3:5] == [None, None] and "offset 5" in fake.anomalies[0]
        # resume status reflects the stored run
        status = _post(base + "/graphql", {"operationName": "RunResumeStatus",
                                           "variables": {"name": "r1", "project": "p", "entity": "e"}})
        bucket = status["data"]["model"]["bucket"]
        assert bucket["historyLineCount"] == 6 and json.loads(json.loads(bucket["historyTail"])[-1]) == {"_step": 5}
    finally:
        fake.stop()


@pytest.mark.timeout(60)
def test_faults_over_http():
    fake = FakeWandb()
    base = fake.start()
    try:
        fake.set_fault("503", "graphql")
        with pytest.raises(urllib.error.HTTPError) as error:
            _post(base + "/graphql", {"query": "query Viewer { viewer { id } }"})
        assert error.value.code == 503

        fake.set_fault("reset", "all")
        with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
            _post(base + "/graphql", {"query": "query Viewer { viewer { id } }"})

        fake.set_fault("hang", "upload")
        result = {}

        def upload():
            try:
                request = urllib.request.Request(base + "/upload/x", data=b"abc", method="PUT")
                result["status"] = urllib.request.urlopen(request, timeout=30).status
            except Exception as exc:   # the connection is closed unanswered
                result["error"] = exc
        thread = threading.Thread(target=upload)
        thread.start()
        fake.wait_for(lambda f: f.requests_seen["fault:hang"] == 1, timeout=10)
        thread.join(0.5)
        assert thread.is_alive()   # still held
        assert _post(base + "/graphql", {"operationName": "Viewer"})["data"]["viewer"]   # other kinds answer
        fake.set_fault("ok")
        thread.join(10)
        assert "status" not in result and "error" in result

        with pytest.raises(AssertionError, match="not met within"):
            fake.wait_for(lambda: False, timeout=0.2)
    finally:
        fake.stop()
    # the listening socket is gone after stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=1).close()


def _history_count(base: str, run_id: str) -> int:
    answer = _post(base + "/graphql", {"operationName": "RelayServerStep",
                                       "variables": {"name": run_id, "project": "proj", "entity": "ent"}})
    return answer["data"]["model"]["bucket"]["historyLineCount"]


def _wait_count(base: str, run_id: str, count: int, timeout: float) -> float:
    """Poll W&B's count of a run's history lines until it reads `count`; return when that was."""
    deadline = time.monotonic() + timeout
    while _history_count(base, run_id) != count:
        assert time.monotonic() < deadline, "count of %s never reached %d" % (run_id, count)
        time.sleep(0.05)   # the count changes with time alone: nothing to wait on
    return time.monotonic()


@pytest.mark.timeout(60)
def test_lagging_count_shows_lines_late_and_overwrites_are_counted():
    fake = FakeWandb(lag=1.5)
    base = fake.start()
    try:
        _post(base + "/graphql", {"operationName": "UpsertBucket",
                                  "variables": {"name": "lagged", "project": "proj", "entity": "ent"}})
        url = base + "/files/ent/proj/lagged/file_stream"
        chunk = {"files": {"wandb-history.jsonl": {"offset": 0, "content": ['{"_step":0,"x":1}', '{"_step":1,"x":2}']}}}
        sent = time.monotonic()
        _post(url, chunk)
        _post(url, chunk)   # a resend overwrites nothing
        assert len(fake.run("lagged").history) == 2   # arrived at once ...
        assert _history_count(base, "lagged") == 0    # ... counted later
        status = _post(base + "/graphql", {"operationName": "RunResumeStatus",
                                           "variables": {"name": "lagged", "project": "proj", "entity": "ent"}})
        bucket = status["data"]["model"]["bucket"]
        assert (bucket["historyLineCount"], json.loads(bucket["historyTail"])) == (0, [])
        assert 1.5 <= _wait_count(base, "lagged", 2, 10) - sent < 1.5 + 1.0
        assert fake.overwrites() == 0
        # A writer that trusted the stale count: the lines at offsets 0 and 1 are replaced.
        _post(url, {"files": {"wandb-history.jsonl": {"offset": 1, "content": ['{"_step":1,"x":3}',
                                                                              '{"_step":2,"x":4}']}}})
        assert [r["x"] for r in fake.run("lagged").history] == [1, 3, 4]
        assert fake.overwrites() == 1 and fake.run("lagged").overwrites == 1
        assert _history_count(base, "lagged") == 2
        _wait_count(base, "lagged", 3, 10)
    finally:
        fake.stop()


@pytest.mark.timeout(120)
def test_resume_inside_the_counting_lag_writes_over_rows(fake, tmp_path):
    """What the relay must avoid, shown with the SDK alone: resumed on a count that trails what W&B
    received, wandb-core continues at a stale offset and step, over rows the server holds."""
    fake.lag = 4.0
    first = wandb.init(project="proj", entity="ent", id="tooearly", dir=str(tmp_path))
    for step, row in enumerate(rows(0, 20)):
        first.log(row, step=step)
    first.finish()
    assert len(fake.run("tooearly").history) == 20
    run = wandb.init(project="proj", entity="ent", id="tooearly", resume="allow", dir=str(tmp_path))
    # W&B has counted none of the 20 rows yet: the file stream goes on at line 0, while the step
    # goes on from the summary's _step (no history tail to read it from), which is current.
    assert run.starting_step == 20
    for step, row in enumerate(rows(20, 25), start=20):
        run.log(row, step=step)
    run.finish()
    history = fake.run("tooearly").history
    assert len(history) == 20 and fake.run("tooearly").overwrites == 5
    assert_rows_equal(history[:5], rows(20, 25), 20)   # steps 0-4 are gone
    assert_rows_equal(history[5:], rows(5, 20), 5)
