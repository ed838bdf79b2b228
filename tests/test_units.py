"""Unit tests of the pure parts: protocol validation, spool dedupe, config, artifact paths."""
from __future__ import annotations

import math
import os

import msgpack
import pytest

from relay import config as relay_config
from relay import protocol
from relay.artifacts import RefusedPath, resolve_checkpoint
from relay.spool import Spool

pytestmark = pytest.mark.timeout(60)


def message(**fields):
    base = {"v": 1, "t": "log", "stream": "s1", "seq": 1, "run": "r1", "metrics": {"a": 1.0}}
    base.update(fields)
    return base


# -- protocol ---------------------------------------------------------------------------------

def test_floats_nan_and_inf_round_trip_bit_exact():
    values = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "tiny": 5e-324, "third": 1 / 3, "int": 7}
    decoded = protocol.decode(protocol.encode(message(metrics=values)))
    assert math.isnan(decoded["metrics"]["nan"])
    assert decoded["metrics"]["inf"] == math.inf and decoded["metrics"]["-inf"] == -math.inf
    assert decoded["metrics"]["tiny"] == 5e-324 and decoded["metrics"]["third"] == 1 / 3
    assert type(decoded["metrics"]["int"]) is int


@pytest.mark.parametrize("fields, reason", [
    ({"v": 2}, "unsupported protocol version 2"),
    ({"t": "nope"}, "unknown message kind 'nope'"),
    ({"seq": 0}, "field 'seq' must be >= 1"),
    ({"seq": True}, "field 'seq' must be int"),
    ({"run": "../x"}, "run id '../x'"),
    ({"metrics": {"a": None}}, "metrics['a'] must be int, float, bool or str"),
    ({"metrics": {"a": {"b": 1}}}, "metrics['a'] must be int, float, bool or str"),
    ({"frame": 1.5}, "field 'frame' must be int"),
    ({"t": "checkpoint", "path": ""}, "field 'path' is empty"),
    ({"t": "checkpoint", "path": "/a", "aliases": [""]}, "field 'aliases'"),
    ({"t": "open", "settings": {"project": "p", "colour": "red"}}, "unknown run setting 'colour'"),
    ({"t": "open", "settings": {"name": "n"}}, "run setting 'project' is required"),
    ({"t": "open", "settings": {"project": "p", "mode": "fast"}}, "run setting 'mode' must be one of"),
    ({"t": "finish", "exit_code": "0"}, "field 'exit_code' must be int"),
    ({"t": "console", "lines": "text", "dropped": 0}, "field 'lines' must be a list of at most 1000"),
    ({"t": "console", "lines": [["out", "a"]] * 1001, "dropped": 0}, "field 'lines' must be a list of at most 1000"),
    ({"t": "console", "lines": [["tty", "a"]], "dropped": 0}, "lines[0] must be [stream, text] with stream 'out'"),
    ({"t": "console", "lines": [["err", 5]], "dropped": 0}, "lines[0] must be [stream, text]"),
    ({"t": "console", "lines": [], "dropped": -1}, "field 'dropped' must be an int >= 0, got -1"),
    ({"t": "console", "lines": [], "dropped": 0, "time": "now"}, "field 'time' must be a number"),
    ({"deep": [[[[[[[[[[1]]]]]]]]]]}, "nested deeper than 8"),
    ({"metrics": {"k" * 300: 1}}, "key that is not a 1..256 character string"),
    ({"t": "meta"}, "field 'provenance' must be dict"),
    ({"t": "meta", "provenance": {"host": 7}}, "field provenance.host must be str, got int"),
    ({"t": "meta", "provenance": {"args": ["a", 1]}}, "field provenance.args must be a list of strings"),
    ({"t": "meta", "provenance": {"git": {"dirty": "yes"}}}, "field provenance.git.dirty must be bool"),
    ({"t": "meta", "provenance": {"gpus": [{"name": 1}]}}, "field provenance.gpus must be a list of"),
    ({"t": "meta", "provenance": {}, "diff": 3}, "field 'diff' must be str"),
    ({"t": "system", "values": {"cpu": "high"}}, "values['cpu'] must be a number, got str"),
    ({"t": "system", "values": {"cpu": True}}, "values['cpu'] must be a number, got bool"),
])
def test_invalid_messages_are_refused_with_the_reason_and_their_seq(fields, reason):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode(protocol.encode(message(**fields)))
    assert reason in caught.value.reason
    assert caught.value.stream == "s1"


def test_unreadable_frames_name_the_problem():
    with pytest.raises(protocol.ProtocolError, match="not valid msgpack"):
        protocol.decode(b"\xc1")
    with pytest.raises(protocol.ProtocolError, match="not a map"):
        protocol.decode(msgpack.packb("hello"))
    with pytest.raises(protocol.ProtocolError, match="over the 100-byte limit"):
        protocol.decode(b"x" * 101, max_bytes=100)


def test_to_scalar_converts_numpy_like_zero_d_values_and_refuses_arrays():
    class ZeroD:
        ndim = 0

        def item(self):
            return 2.5

    class Vector:
        ndim = 1

        def item(self):
            raise AssertionError("never called")

    assert protocol.to_scalar(ZeroD()) == 2.5
    with pytest.raises(TypeError, match="not a number"):
        protocol.to_scalar(Vector())
    assert protocol.ranges([1, 2, 3, 7, 8, 10]) == [[1, 3], [7, 8], [10, 10]]


# -- spool ------------------------------------------------------------------------------------

def _log(seq, stream="s1", run="r1"):
    return message(seq=seq, stream=stream, run=run, metrics={"seq": seq}), ""


def test_spool_takes_live_streams_in_order_only(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    outcomes = spool.ingest([_log(1), _log(3), _log(2), _log(3)])
    assert [o.status for o in outcomes] == ["new", "gap", "new", "new"]
    assert [r.body["seq"] for r in spool.uploads.records("r1", 0, 10)] == [1, 2, 3]


def test_spool_dedupes_by_stream_and_seq_across_reopen(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    first = spool.ingest([_log(1), _log(2), _log(4)], allow_gaps=True)   # as from a spill file
    assert [o.status for o in first] == ["new", "new", "new"]
    assert spool.upto("s1") == 2  # 3 is missing: 4 is stored but not under the watermark
    again = spool.ingest([_log(2), _log(4), _log(3), _log(1, stream="s2")], allow_gaps=True)
    assert [o.status for o in again] == ["dup", "dup", "new", "new"]
    assert spool.upto("s1") == 4 and spool.upto("s2") == 1
    spool.close()
    reopened = Spool(str(tmp_path))
    reopened.load_watermarks()
    assert [o.status for o in reopened.ingest([_log(3), _log(5)], allow_gaps=True)] == ["dup", "new"]
    rows = reopened.uploads.records("r1", 0, 100)
    assert [(r.body["stream"], r.body["seq"]) for r in rows] == [("s1", 1), ("s1", 2), ("s1", 4), ("s1", 3), ("s2", 1), ("s1", 5)]
    assert reopened.report.status()["runs"][0]["received"] == 6


def test_spool_refusal_consumes_the_seq(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    outcomes = spool.ingest([_log(1), ({"stream": "s1", "seq": 2}, "bad path"), _log(3)])
    assert [(o.status, o.reason) for o in outcomes] == [("new", ""), ("error", "bad path"), ("new", "")]
    assert spool.upto("s1") == 3
    assert [r.body["seq"] for r in spool.uploads.records("r1", 0, 10)] == [1, 3]


def _stored(spool, stream="s1"):
    return [seq for (seq,) in spool.conn.execute("SELECT seq FROM records WHERE stream = ? ORDER BY seq", (stream,))]


def test_spool_keeps_nothing_of_refusals_the_watermark_passes(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    refused = [({"stream": "s1", "seq": seq}, "bad metric") for seq in range(1, 101)]
    assert [o.status for o in spool.ingest(refused)] == ["error"] * 100
    assert spool.upto("s1") == 100 and _stored(spool) == []   # a misbehaving client grows nothing but one row
    assert [o.status for o in spool.ingest([refused[0], _log(101)])] == ["dup", "new"]
    # A refusal past a gap (the seqs before it died with a relay) is kept until the gap is filled ...
    outcomes = spool.ingest([({"stream": "s1", "seq": 104}, "bad metric")])
    assert [o.status for o in outcomes] == ["error"] and _stored(spool) == [101, 104]
    spool.close()
    reopened = Spool(str(tmp_path))
    reopened.load_watermarks()
    assert reopened.forget_refusals() == 0 and _stored(reopened) == [101, 104]
    assert [o.status for o in reopened.ingest([_log(102), _log(103), ({"stream": "s1", "seq": 104}, "x")])] == \
        ["new", "new", "dup"]
    assert reopened.upto("s1") == 104
    # ... and let go of at the next start.
    assert reopened.forget_refusals() == 1 and _stored(reopened) == [101, 102, 103]
    assert [r.body["seq"] for r in reopened.uploads.records("r1", 0, 10)] == [101, 102, 103]


def test_spool_confirms_by_step_and_by_finish(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    spool.ingest([_log(seq) for seq in range(1, 11)])
    records = spool.uploads.records("r1", 0, 100)
    spool.uploads.assign_steps("r1", [(r.id, i) for i, r in enumerate(records)], records[-1].id)
    assert spool.uploads.confirm_below_step("r1", 6) == 6  # the server holds steps 0..5
    left = spool.uploads.records("r1", 0, 100)
    assert [r.body["seq"] for r in left] == [7, 8, 9, 10] and all(r.step is None for r in left)
    assert spool.uploads.confirm_through("r1", left[1].id) == 2
    assert [r.body["seq"] for r in spool.uploads.records("r1", 0, 100)] == [9, 10]


def test_spool_lets_console_records_go_with_the_rows_wandb_holds_after_them(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    console = [message(t="console", seq=seq, lines=[["out", "line %d" % seq]], dropped=0) for seq in (1, 3, 5, 7)]
    spool.ingest([(console[0], ""), _log(2), (console[1], ""), _log(4), (console[2], ""), _log(6), (console[3], "")])
    uploads = spool.uploads
    records = uploads.records("r1", 0, 100)
    rows = [r for r in records if r.kind == "log"]
    uploads.assign_steps("r1", [(r.id, i) for i, r in enumerate(rows)], records[-1].id)
    assert uploads.confirm_console("r1", 0) == 0   # W&B holds no row: any console line may be missing there
    assert uploads.confirm_console("r1", 2) == 2   # rows 0 and 1 (seqs 2, 4) are there: the lines before them too
    assert uploads.confirm_logged("r1", 2) == 2
    assert [(r.kind, r.body["seq"]) for r in uploads.records("r1", 0, 100)] == [("console", 5), ("log", 6),
                                                                                ("console", 7)]


def test_spool_keeps_the_steps_handed_to_wandb_after_their_records_are_gone(tmp_path):
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    spool.ingest([_log(seq) for seq in range(1, 11)])
    assert spool.uploads.steps_handed("r1") == 0
    records = spool.uploads.records("r1", 0, 100)
    spool.uploads.assign_steps("r1", [(r.id, i) for i, r in enumerate(records[:8])], records[7].id)
    assert spool.uploads.steps_handed("r1") == 8
    spool.uploads.confirm_through("r1", records[-1].id)  # a finish: every record let go, the count of steps kept
    spool.close()
    spool = Spool(str(tmp_path))
    assert spool.uploads.steps_handed("r1") == 8
    spool.uploads.confirm_below_step("r1", 5)  # a resume on a trusted count: steps 5.. are handed again
    assert spool.uploads.steps_handed("r1") == 5


def test_spool_connection_page_cache_is_bounded_when_asked(tmp_path):
    """An uploader's connection (one per live run) keeps a small page cache, not SQLite's 2 MiB."""
    from relay.uploader import UPLOADER_CACHE_KIB

    assert Spool(str(tmp_path)).conn.execute("PRAGMA cache_size").fetchone()[0] == -2000
    small = Spool(str(tmp_path), check=False, cache_kib=UPLOADER_CACHE_KIB)
    assert small.conn.execute("PRAGMA cache_size").fetchone()[0] == -UPLOADER_CACHE_KIB == -64


def test_spool_made_before_steps_handed_gets_the_column(tmp_path):
    import sqlite3

    old = sqlite3.connect(str(tmp_path / Spool.FILENAME))
    old.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, settings BLOB, received INTEGER NOT NULL DEFAULT 0, "
                "uploaded_id INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'waiting', state_since REAL, "
                "last_error TEXT, exit_code INTEGER, finished INTEGER NOT NULL DEFAULT 0, location TEXT, "
                "created REAL NOT NULL, last_seen REAL NOT NULL)")
    old.execute("INSERT INTO runs (run_id, created, last_seen) VALUES ('r1', 0, 0)")
    old.commit()
    old.close()
    spool = Spool(str(tmp_path))
    spool.load_watermarks()
    spool.ingest([_log(1)])
    records = spool.uploads.records("r1", 0, 10)
    spool.uploads.assign_steps("r1", [(records[0].id, 3)], records[0].id)
    assert spool.uploads.steps_handed("r1") == 4


def test_garbage_spool_file_is_set_aside_and_a_new_one_started(tmp_path):
    path = tmp_path / Spool.FILENAME
    path.write_bytes(b"this is not a database" * 100)
    spool = Spool(str(tmp_path))
    assert "spool was damaged" in spool.recovery and "recovered 0 records of 0 runs" in spool.recovery
    aside = [p for p in os.listdir(tmp_path) if ".damaged-" in p]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == b"this is not a database" * 100
    spool.load_watermarks()
    assert [o.status for o in spool.ingest([_log(1)])] == ["new"]


# -- config -----------------------------------------------------------------------------------

def test_config_layers_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text("bind: tcp://127.0.0.1:6000\ndrain_timeout: 5\nartifact_roots: [/a]\n")
    cfg = relay_config.load(str(path), {"drain_timeout": 9.0}, environ={"RELAY_INIT_TIMEOUT": "12",
                                                                         "RELAY_ENDPOINT": "ignored"})
    assert cfg.bind == "tcp://127.0.0.1:6000" and cfg.drain_timeout == 9.0 and cfg.init_timeout == 12.0
    assert cfg.artifact_roots == ["/a"]


@pytest.mark.parametrize("text, expected", [
    ("bind: a\nbind: b\n", "duplicate key 'bind' at line 2"),
    ("bnid: tcp://x\n", "bnid (from"),
    ("init_timeout: '2e-5'\n", "init_timeout (from"),
    ("drain_timeout: 2e-5\n", "drain_timeout (from"),  # YAML 1.1 reads this as a string: refused, not guessed
    ("mode: fast\n", "mode (from"),
    ("wandb_count_lag: -1\n", "greater than or equal to 0"),
    ("upload_interval: 2.5\n", "2.5 is not a whole number of seconds: wandb-core counts its file-stream interval in "
                              "whole seconds (it would cut 2.5 to 2); use 2 or 3"),
    ("upload_interval: 0.5\n", "greater than or equal to 1"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_bad_config_files_name_the_key(tmp_path, text, expected):
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    with pytest.raises(relay_config.ConfigError) as caught:
        relay_config.load(str(path), environ={})
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_unknown_relay_variable_is_named(tmp_path):
    with pytest.raises(relay_config.ConfigError, match="unknown variable RELAY_SPOOLDIR"):
        relay_config.load(None, environ={"RELAY_SPOOLDIR": "/x"})
    with pytest.raises(relay_config.ConfigError, match="RELAY_BATCH_MAX='many'"):
        relay_config.load(None, environ={"RELAY_BATCH_MAX": "many"})


# -- artifact paths ---------------------------------------------------------------------------

def test_checkpoint_paths_must_resolve_to_regular_files_inside_a_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    good = root / "a.pth"
    good.write_bytes(b"12345")
    (tmp_path / "netrc").write_text("machine x password y")
    os.symlink(tmp_path / "netrc", root / "link.pth")
    os.mkfifo(root / "fifo.pth")
    (root / "dir.pth").mkdir()
    roots = [str(root)]
    assert resolve_checkpoint(str(good), roots, 100) == str(good)
    cases = {
        str(root / ".." / "netrc"): "outside every artifact root",
        str(root / "link.pth"): "outside every artifact root",
        str(root / "fifo.pth"): "not a regular file",
        str(root / "dir.pth"): "not a regular file",
        str(root / "missing.pth"): "No such file",
        "relative.pth": "must be absolute",
    }
    for path, reason in cases.items():
        with pytest.raises(RefusedPath, match=reason):
            resolve_checkpoint(path, roots, 100)
    with pytest.raises(RefusedPath, match="over the 4-byte limit"):
        resolve_checkpoint(str(good), roots, 4)
    with pytest.raises(RefusedPath, match="no artifact root is configured.*--artifact-root DIR, RELAY_ARTIFACT_ROOTS"):
        resolve_checkpoint(str(good), [], 100)


def test_shipped_relay_yaml_is_valid_and_matches_the_defaults():
    shipped = relay_config.load(os.path.join(os.path.dirname(__file__), "..", "cfg", "relay.yaml"), environ={})
    assert shipped == relay_config.load(None, environ={})
