r"""Coverage-guided fuzzing of the relay's decoder with atheris (libFuzzer), outside CI.

Every input goes through relay.protocol.decode and relay.intake.classify, as a frame from a
client would. The contract: a validated message (which re-encodes to the same message) or a
ProtocolError; any other exception is a crash that libFuzzer reports with the input that made
it. Half the mutations are libFuzzer's own byte edits; the other half decode the input as
msgpack and edit it as a structure (replace, drop or add a field anywhere, change a value's
type), so that inputs get past the msgpack layer into the schema checks.

    .venv/bin/pip install atheris
    nice -n 10 .venv/bin/python fuzz/atheris_decoder.py -max_total_time=480 -print_final_stats=1 \
        /tmp/relay-corpus fuzz/corpus

The seed corpus (fuzz/corpus/) holds one valid frame of each kind; `--write-seeds DIR` writes it.
`--line-coverage DIR...` runs a corpus once and says which lines of the decoder it reached.
Only relay.protocol, relay.limits, relay.intake and relay.artifacts are instrumented: msgpack's C extension
is exercised, not measured.
"""
from __future__ import annotations

import math
import os
import random
import sys
import types

import atheris
import msgpack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["relay.protocol", "relay.limits", "relay.intake", "relay.artifacts"]):
    from relay import limits, protocol
    from relay.config import RelayConfig
    from relay.intake import classify

CONFIG = RelayConfig(spool_dir="/tmp/relay-atheris-spool", artifact_roots=["/tmp"])

SEEDS = {
    "open": {"t": "open", "run": "run-1", "settings": {
        "project": "tokenHSI", "entity": "lab", "name": "traj-amp", "group": "ablation", "tags": ["amp"],
        "notes": "seed", "config": {"lr": 2e-5, "network": {"mlp": [1024, 512]}, "ok": True, "none": None},
        "mode": "offline", "job_type": "train"}},
    "log": {"t": "log", "run": "run-1", "metrics": {"losses/a_loss": 0.12, "nan": math.nan, "inf": -math.inf,
                                                    "zero": -0.0, "steps": 7, "flag": False, "text": "x"},
            "frame": 1048576, "epoch": 16, "ns": "eval", "time": 1.5},
    "checkpoint": {"t": "checkpoint", "run": "run-1", "path": "/tmp/nn/traj.pth",
                   "metadata": {"epoch": 16, "frame": 1048576}, "aliases": ["latest", "best"], "time": 2.5},
    "summary": {"t": "summary", "run": "run-1", "values": {"best/reward": 3.1}},
    "finish": {"t": "finish", "run": "run-1", "exit_code": 0, "time": 3.5},
    "status": {"t": "status"},
    "heartbeat": {"t": "heartbeat", "runs": ["run-1", "run-2"]},
}


def seed_frames() -> dict:
    frames = {}
    for seq, (kind, fields) in enumerate(sorted(SEEDS.items()), start=1):
        message = dict(fields, v=protocol.VERSION, stream="seed-stream",
                       seq=0 if kind in protocol.UNSPOOLED_KINDS else seq)
        frames[kind] = protocol.encode(message)
    return frames


def TestOneInput(data: bytes) -> None:
    try:
        message = protocol.decode(data, CONFIG.max_frame_bytes)
    except protocol.ProtocolError as error:
        assert error.reason.isprintable(), error.reason
        message = None
    if message is not None:
        protocol.validate(message)
        again = protocol.decode(protocol.encode(message))
        assert msgpack.packb(again) == msgpack.packb(message), (again, message)
    try:
        classify(data, CONFIG)
    except protocol.ProtocolError:
        pass


ODD_VALUES = [None, True, 0, -1, 1 << 31, 1 << 63, (1 << 64) - 1, -(1 << 63), math.nan, math.inf, -0.0, "",
              "\x00", "/\x00", "x" * 300, "a/b:c", b"bytes", msgpack.ExtType(1, b"e"), [], {}, [[[[[[[[[1]]]]]]]]],
              {"k%d" % i: i for i in range(101)}, [{"t": 1}], ["x" * 65]]


def _mutate_structure(value, rng: random.Random, depth: int = 0):
    if isinstance(value, dict) and value and (depth < 4 and rng.random() < 0.6):
        key = rng.choice(list(value))
        action = rng.random()
        if action < 0.5:
            value[key] = _mutate_structure(value[key], rng, depth + 1)
        elif action < 0.7:
            del value[key]
        elif action < 0.85:
            value[rng.choice(["v", "t", "stream", "seq", "run", "extra", key + "_"])] = rng.choice(ODD_VALUES)
        else:
            value[key] = rng.choice(ODD_VALUES)
        return value
    if isinstance(value, list) and value and rng.random() < 0.6:
        index = rng.randrange(len(value))
        value[index] = _mutate_structure(value[index], rng, depth + 1)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return rng.choice([value + 1, value - 1, -value, value << 32, rng.choice(ODD_VALUES)])
    if isinstance(value, str):
        return rng.choice([value * 2, value[:-1], value + rng.choice(["\x00", "/", ":", "\n", "é"]),
                           rng.choice(ODD_VALUES)])
    return rng.choice(ODD_VALUES)


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001  msgpack raises a zoo of types; not msgpack yet: byte-mutate it
        return atheris.Mutate(data, max_size)
    try:
        out = msgpack.packb(_mutate_structure(value, rng), use_bin_type=True)
    except (OverflowError, TypeError, ValueError):  # 1 << 64 and friends do not pack
        return atheris.Mutate(data, max_size)
    return out[:max_size]


SERVER_SIDE = {  # the decoding functions, by module
    protocol: ("decode_raw", "decode", "validate", "validate_settings", "valid_run_id", "_is_int", "_valid_stream",
               "_require", "_check_scalars", "_check_metadata"),
    limits: ("check", "show", "_within", "_find_fault"),
}


def line_coverage(directories: list) -> None:
    """Run every input in `directories` once and print which lines of the decoding functions
    (SERVER_SIDE) they reached (coverage.py is not a dependency; sys.settrace is enough here)."""
    lines = {}  # "module.function" -> {(file, line)}
    for module, names in SERVER_SIDE.items():
        with open(module.__file__) as handle:
            compiled = compile(handle.read(), module.__file__, "exec")
        for code in compiled.co_consts:
            if isinstance(code, types.CodeType) and code.co_name in names:
                lines["%s.%s" % (module.__name__, code.co_name)] = {
                    (module.__file__, line) for _, _, line in code.co_lines() if line}
    targets = {module.__file__ for module in SERVER_SIDE}
    hit = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename not in targets:
            return None
        hit.add((frame.f_code.co_filename, frame.f_lineno))
        return tracer

    inputs = [os.path.join(d, name) for d in directories for name in sorted(os.listdir(d))]
    sys.settrace(tracer)
    for path in inputs:
        with open(path, "rb") as handle:
            TestOneInput(handle.read())
    sys.settrace(None)
    total = set().union(*lines.values())
    print("%d inputs reach %d of %d lines (%.0f %%) of the decoding functions"
          % (len(inputs), len(total & hit), len(total), 100.0 * len(total & hit) / len(total)))
    for name, own in sorted(lines.items()):
        missed = sorted(line for _, line in own - hit)
        if missed:
            print("  %s: lines %s not reached" % (name, ", ".join(map(str, missed))))


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--line-coverage":
        line_coverage(sys.argv[2:])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        os.makedirs(sys.argv[2], exist_ok=True)
        for kind, frame in seed_frames().items():
            with open(os.path.join(sys.argv[2], "seed-%s.msgpack" % kind), "wb") as handle:
                handle.write(frame)
        return
    for frame in seed_frames().values():  # the seeds themselves must be accepted
        assert protocol.decode(frame)
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
