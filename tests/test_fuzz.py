"""Property-based fuzzing of the decoder (no processes): relay.protocol.decode and
relay.server.classify on random bytes, random msgpack structures, and valid frames broken byte
by byte and field by field. Whatever comes in, the answer is a validated message or a
ProtocolError with a printable reason; never another exception. Valid messages round-trip bit
for bit, through the wire and through the spool. Strategies: tests/fuzzing.py.
"""
from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile

import msgpack
import pytest
from fuzzing import (
    FLOATS,
    INT64,
    fuzz_settings,
    hostile_values,
    mutated_frames,
    mutated_messages,
    pack,
    same,
    valid_messages,
)
from hypothesis import example, given
from hypothesis import strategies as st

from relay import limits, protocol
from relay.config import RelayConfig
from relay.server import classify
from relay.spool import Spool

pytestmark = pytest.mark.timeout(300)

ROOT = tempfile.mkdtemp(prefix="relay-fuzz-")
CHECKPOINT = os.path.join(ROOT, "artifacts", "model.pth")
os.makedirs(os.path.dirname(CHECKPOINT))
with open(CHECKPOINT, "wb") as handle:
    handle.write(b"weights")
SECRET = os.path.join(ROOT, "secret.netrc")  # outside the artifact root, reachable by a symlink inside it
with open(SECRET, "wb") as handle:
    handle.write(b"machine api.wandb.ai password hunter2")
os.symlink(SECRET, os.path.join(os.path.dirname(CHECKPOINT), "escape"))
os.symlink(ROOT, os.path.join(os.path.dirname(CHECKPOINT), "up"))
CONFIG = RelayConfig(spool_dir=os.path.join(ROOT, "spool"), artifact_roots=[os.path.dirname(CHECKPOINT)])


def teardown_module():
    shutil.rmtree(ROOT, ignore_errors=True)


def check_frame(frame: bytes):
    """The decoder's contract for one frame; returns the message, or None if it was refused."""
    try:
        message = protocol.decode(frame, CONFIG.max_frame_bytes)
    except protocol.ProtocolError as error:
        assert error.reason and error.reason.isprintable() and len(error.reason) < 4096, error.reason
        readable = error.stream is not None and bool(error.seq)
        if readable:
            assert isinstance(error.stream, str) and 0 < len(error.stream) <= protocol.MAX_KEY_LEN
            assert type(error.seq) is int and 0 < error.seq <= protocol.INT_MAX  # fits the spool's INTEGER
            refused, reason = classify(frame, CONFIG)
            assert (refused, reason) == ({"stream": error.stream, "seq": error.seq, "t": "invalid"}, error.reason)
        else:
            with pytest.raises(protocol.ProtocolError):
                classify(frame, CONFIG)
        return None
    assert isinstance(message, dict)
    protocol.validate(message)                       # what decode returns is valid
    again = protocol.decode(protocol.encode(message))  # and survives re-encoding (the spool does that)
    assert same(again, message)
    classified, refusal = classify(frame, CONFIG)
    assert same(classified, message)
    assert refusal == "" or (message["t"] in ("checkpoint", "media") and "refused" in refusal)
    return message


@fuzz_settings(0.6)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_or_valid(frame):
    check_frame(frame)


@fuzz_settings(0.6)
@given(hostile_values(max_leaves=30))
def test_random_msgpack_structures_are_refused_or_valid(value):
    check_frame(pack(value))


@fuzz_settings(1.0)
@given(mutated_frames())
def test_byte_mutations_of_valid_frames_are_refused_or_valid(frame):
    check_frame(frame)


@fuzz_settings(0.7)
@given(mutated_messages())
def test_field_mutations_of_valid_messages_are_refused_or_valid(message):
    check_frame(pack(message))


@fuzz_settings(0.6)
@given(valid_messages())
def test_valid_messages_round_trip_bit_exact(message):
    frame = protocol.encode(message)
    assert same(protocol.decode(frame), message)
    assert check_frame(frame) is not None


def below(value, levels: list):
    """`value` under one level of array (True) or map (False) per entry of `levels`."""
    for is_array in levels:
        value = [value] if is_array else {"k": value}
    return value


ODD_KEYS = st.sampled_from(["", "k" * protocol.MAX_KEY_LEN, "k" * (protocol.MAX_KEY_LEN + 1), "\x00", 7, b"k", None])
EDGES = st.sampled_from([protocol.INT_MIN - 1, protocol.INT_MIN, protocol.INT_MAX, protocol.INT_MAX + 1])


@fuzz_settings(0.4)
@given(st.one_of(hostile_values(max_leaves=30),
                 st.builds(below, hostile_values(max_leaves=3), st.lists(st.booleans(), min_size=5, max_size=9)),
                 st.dictionaries(ODD_KEYS | st.text(max_size=3), EDGES | hostile_values(max_leaves=3), max_size=3)))
@example({"a": "s" * protocol.MAX_STR_LEN})
@example({"a": "s" * (protocol.MAX_STR_LEN + 1)})
def test_the_quick_pass_over_the_limits_accepts_exactly_what_the_walk_naming_faults_accepts(value):
    """limits.check skips the walk that builds each value's path when its quick pass accepts the
    message, so the two must agree on every message (nesting around MAX_DEPTH included)."""
    message = {"v": 1, "t": "log", "stream": "s", "seq": 1, "run": "r", "metrics": {"a": 1.0}, "x": value}
    try:
        limits._find_fault(message, "message", 0, [limits.MAX_ITEMS])
    except protocol.ProtocolError:
        assert not limits._within(message)
    else:
        assert limits._within(message)


@fuzz_settings(0.2)
@given(st.lists(FLOATS, min_size=1, max_size=8), st.lists(INT64, max_size=4))
def test_nan_inf_and_negative_zero_are_kept_bit_for_bit(floats, ints):
    metrics = {"f%d" % i: value for i, value in enumerate(floats)}
    metrics.update({"i%d" % i: value for i, value in enumerate(ints)})
    message = {"v": 1, "t": "log", "stream": "s", "seq": 1, "run": "r", "metrics": metrics}
    decoded = protocol.decode(protocol.encode(message))["metrics"]
    for name, value in metrics.items():
        assert type(decoded[name]) is type(value)
        if isinstance(value, float):
            assert struct.pack("<d", decoded[name]) == struct.pack("<d", value), name
        else:
            assert decoded[name] == value


@fuzz_settings(0.3)
@given(st.lists(st.sampled_from(["model.pth", "escape", "up", "..", ".", "", "secret.netrc", "artifacts", "/",
                                 "model.pth\x00", "model.pth\n"]) | st.text(max_size=12), max_size=5))
def test_a_checkpoint_is_taken_only_if_it_resolves_to_a_regular_file_inside_a_root(parts):
    path = os.path.join(os.path.dirname(CHECKPOINT), *parts) if parts else os.path.dirname(CHECKPOINT)
    _, refusal = classify(pack({"v": 1, "t": "checkpoint", "stream": "s", "seq": 1, "run": "r",
                                "path": path}), CONFIG)
    if refusal:
        assert "refused" in refusal or refusal == "field 'path' contains a control character", refusal
    else:
        assert os.path.realpath(path) == os.path.realpath(CHECKPOINT)  # the one regular file in the root


def test_whatever_classify_returns_the_spool_can_store(tmp_path):
    """Live intake stores refusals (their seq is consumed) and valid records; spill-file replay
    stores records past gaps. Neither may raise for any frame classify lets through."""
    spool = Spool(str(tmp_path / "spool"))
    spool.load_watermarks()
    frames = st.one_of(mutated_frames(), mutated_messages().map(pack), valid_messages().map(pack))

    @fuzz_settings(0.15)
    @given(frames, st.booleans())
    def store(frame, replay):
        try:
            message, refusal = classify(frame, CONFIG)
        except protocol.ProtocolError:
            return
        if message["t"] in protocol.UNSPOOLED_KINDS:
            return
        outcome, = spool.ingest([(message, refusal)], allow_gaps=replay)
        assert outcome.status in ("new", "dup", "gap", "error")
        if outcome.status == "new":
            stored = spool.conn.execute("SELECT body FROM records WHERE stream = ? AND seq = ?",
                                        (message["stream"], message["seq"])).fetchone()[0]
            assert same(msgpack.unpackb(stored, raw=False), message)

    try:
        store()
    finally:
        spool.close()


def test_what_the_relay_accepts_the_wandb_sdk_accepts():
    """Settings, aliases, artifact metadata and exit codes the relay takes must not make wandb
    raise in the uploader (which would then fail on that record for ever)."""
    wandb = pytest.importorskip("wandb")
    from wandb.proto.wandb_internal_pb2 import RunExitRecord
    from wandb.sdk.artifacts._validators import validate_aliases, validate_metadata

    kinds = ("open", "checkpoint", "finish")

    @fuzz_settings(0.3)
    @given(st.one_of(valid_messages(kinds=kinds), mutated_messages(kinds=kinds)))
    def check(message):
        try:
            message = protocol.decode(pack(message))
        except protocol.ProtocolError:
            return
        if message["t"] == "open":
            settings = message["settings"]
            wandb.Settings(project=settings["project"], run_tags=tuple(settings.get("tags") or ()))
        elif message["t"] == "checkpoint":
            validate_metadata(message.get("metadata") or {})
            validate_aliases(message.get("aliases") or [])
        else:
            RunExitRecord().exit_code = message["exit_code"]

    check()


# -- regressions: each of these once crashed the relay or an uploader ------------------------------

def message(**fields):
    base = {"v": 1, "t": "log", "stream": "s1", "seq": 1, "run": "r1", "metrics": {"a": 1.0}}
    base.update(fields)
    return base


@pytest.mark.parametrize("fields, reason", [
    ({"metrics": {"a": 1 << 63}}, "message.metrics.a is an integer outside the signed 64-bit range"),
    ({"frame": (1 << 64) - 1}, "message.frame is an integer outside the signed 64-bit range"),
    ({"t": "finish", "exit_code": 1 << 31}, "field 'exit_code' 2147483648 is outside the 32-bit range"),
    ({"t": "checkpoint", "path": "/ckpt/a\x00b.pth"}, "field 'path' contains a control character"),
    ({"t": "checkpoint", "path": "/a.pth", "aliases": ["best/1"]}, "alias 'best/1' contains '/'"),
    ({"t": "checkpoint", "path": "/a.pth", "metadata": {"best": -math.inf}},
     "checkpoint metadata 'best' is -inf; W&B artifact metadata cannot hold infinities"),
    ({"t": "checkpoint", "path": "/a.pth", "metadata": {"k%d" % i: i for i in range(101)}},
     "checkpoint metadata has 101 keys; W&B allows at most 100"),
    ({"t": "open", "settings": {"project": "p", "tags": ["t" * 65]}}, "W&B tags are 1..64"),
    ({"t": "open", "settings": {"project": "team/proj"}}, "contains '/', which W&B forbids in project names"),
    ({"t": "open", "settings": {"project": "p" * 129}}, "'project' is 129 characters; W&B allows at most 128"),
    ({"t": "open", "settings": {"project": "p", "config": {"blob": b"\x00"}}},
     "message.settings.config.blob is a msgpack bin"),
    ({"t": "open", "settings": {"project": "p", "config": {"when": msgpack.ExtType(1, b"x")}}},
     "message.settings.config.when is a msgpack ext (ExtType)"),
    ({"v": True}, "unsupported protocol version True"),
    ({"v": 1.0}, "unsupported protocol version 1.0"),
    ({"metrics": {"a": [0] * 20}, "extra": [[0] * 10000, [0] * 10000]},
     "message has more than 20000 map entries and array items in all"),
])
def test_values_that_broke_the_relay_or_an_uploader_are_refused_with_the_reason(fields, reason):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode(pack(message(**fields)))
    assert reason in caught.value.reason, caught.value.reason
    assert (caught.value.stream, caught.value.seq) == ("s1", 1)


def test_status_and_heartbeat_get_the_same_nesting_and_size_limits():
    deep = [[[[[[[[[[1]]]]]]]]]]
    for kind, extra in (("status", {}), ("heartbeat", {"runs": []})):
        with pytest.raises(protocol.ProtocolError, match="nested deeper than 8"):
            protocol.decode(pack(dict(extra, v=1, t=kind, stream="s", seq=0, junk=deep)))


@pytest.mark.parametrize("fields, reason", [
    ({"x": [1, {"a\x00": b"\x01"}]},
     "message.x[1].'a\\x00' is a msgpack bin; only nil, bool, int, float, str, arrays and maps are accepted"),
    ({"x": [[[[[[[[1]]]]]]]]}, "message.x[0][0][0][0][0][0][0][0] is nested deeper than 8 levels"),
    ({"x": [(1 << 64) - 1, b"b"], "y": {"": 1}}, "message.x[0] is an integer outside the signed 64-bit range"),
    ({"x": {"ok": None, "k" * 257: 1}},
     "message.x has a key that is not a 1..256 character string: '%s...(259 characters)" % ("k" * 79)),
    ({"x": [[0] * 9995, [0] * 9996]}, "message has more than 20000 map entries and array items in all (at message.x[1])"),
    ({"x": [[0] * 9995, [0] * 9995]}, None),  # 20000 entries in all: the limit itself
])
def test_a_value_over_a_limit_is_named_by_its_path(fields, reason):
    frame = pack(message(**fields))
    if reason is None:
        assert protocol.decode(frame)["x"] == fields["x"]
        return
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode(frame)
    assert (caught.value.reason, caught.value.stream, caught.value.seq) == (reason, "s1", 1)


def test_a_seq_beyond_64_bits_makes_a_frame_unreadable_not_a_crash(tmp_path):
    """seq 2^63 used to be consumed by a refusal: its INSERT raised OverflowError (not a
    sqlite3.Error) out of Spool.ingest and killed the relay."""
    frame = pack(message(seq=1 << 63, metrics={"a": None}))
    with pytest.raises(protocol.ProtocolError) as caught:
        classify(frame, CONFIG)
    assert caught.value.seq is None and "message.seq is an integer outside the signed 64-bit range" in (
        caught.value.reason)
    highest = pack(message(seq=protocol.INT_MAX, metrics={"a": None}))
    refused, reason = classify(highest, CONFIG)
    spool = Spool(str(tmp_path / "spool"))
    spool.load_watermarks()
    assert [o.status for o in spool.ingest([(refused, reason)])] == ["error"]
    spool.close()


def test_a_checkpoint_path_with_a_nul_is_refused_before_it_reaches_the_filesystem():
    """resolve_checkpoint raised ValueError ('embedded null byte') out of classify()."""
    frame = pack(message(t="checkpoint", path=os.path.dirname(CHECKPOINT) + "/\x00x", aliases=[]))
    refused, reason = classify(frame, CONFIG)
    assert refused["t"] == "invalid" and reason == "field 'path' contains a control character"


def test_unreadable_stream_ids_are_not_echoed(tmp_path):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode(pack(message(stream="evil\nFORGED log line")))
    assert caught.value.stream is None and caught.value.reason == "field 'stream' must be 1..256 printable characters"


def test_msgpack_errors_are_named():
    with pytest.raises(protocol.ProtocolError, match=r"nested deeper than the unpacker's stack"):
        protocol.decode(b"\x91" * 3000 + b"\x00")
    with pytest.raises(protocol.ProtocolError, match=r"bytes after the end of the first value"):
        protocol.decode(pack(message()) + b"\x00")


def test_encode_names_an_integer_beyond_64_bits():
    with pytest.raises(TypeError, match="integer metric value 18446744073709551616 is outside the 64-bit range"):
        protocol.encode(message(metrics={"a": 1 << 64}))


def test_client_keeps_its_sequence_after_an_integer_too_big_for_the_wire(tmp_path):
    """A refused value must give back the seq it took, or every later record sits behind a gap."""
    from relay.client import RelayClient

    client = RelayClient("ipc://%s/none.ipc" % tmp_path, spill_dir=str(tmp_path / "spill"), heartbeat_every=0,
                         provenance=False, system_metrics=0)
    run = client.start_run(project="p", run_id="r")
    with pytest.raises(TypeError, match="64-bit range"):
        run.log({"a": 1 << 64})
    run.log({"a": 1})
    spill = client.close(timeout=0)  # nothing answers: both records go to the spill file
    with open(spill, "rb") as handle:
        seqs = [protocol.decode(frame)["seq"] for frame in msgpack.Unpacker(handle, raw=False)]
    assert seqs == [1, 2]  # open, then the log: no hole where the refused value was
