"""The trainer's console in the run's Logs: a real trainer process (relay.console), a real relay,
the real wandb SDK and wandb-core, the fake W&B's `output.log`; and the capture's bounds, driven
with an injected clock."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys

import msgpack
import pytest

from harness import ROOT, free_tcp_port
from relay import console
from relay.console import ConsoleBuffer, ConsoleCapture, ConsoleLimits

pytestmark = pytest.mark.timeout(240)

# wandb-core's output.log line: "ERROR " for stderr, the time it took the line, the line.
LOG_LINE = re.compile(r"^(ERROR )?\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6} (.*)$")
DROPPED = re.compile(r"^\[relay: ([\d,]+) console lines dropped: ")


def logs(run) -> list[tuple[str, str]]:
    """The run's output.log as (stream, text) pairs."""
    lines = []
    for line in run.console:
        match = LOG_LINE.match(line)
        assert match, "not an output.log line: %r" % line
        lines.append(("err" if match.group(1) else "out", match.group(2)))
    return lines


def console_trainer(python: str, args: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_", "PYTHON"))}
    env["PYTHONPATH"] = ROOT
    args = dict(args, spill_dir=str(tmp_path / "spill"), report=str(tmp_path / ("%s.json" % args["run_id"])))
    return subprocess.run([python, os.path.join(ROOT, "tests", "console_trainer.py"), json.dumps(args)], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)


def report(tmp_path, run_id: str) -> dict:
    with open(tmp_path / ("%s.json" % run_id)) as handle:
        return json.load(handle)


def test_stdout_stderr_and_the_crash_traceback_reach_the_logs_in_order(py38_python, fake_wandb, relay_factory,
                                                                        tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    crashed = console_trainer(py38_python, {"endpoint": relay.endpoint, "run_id": "console1", "lines": 6,
                                            "crash": True}, tmp_path)
    assert crashed.returncode == 1, crashed.stderr
    printed = ["line %d of stdout" % i for i in range(6)]
    assert crashed.stdout.splitlines() == printed  # the terminal still sees everything
    errors = crashed.stderr.splitlines()
    assert errors[:6] == ["line %d of stderr" % i for i in range(6)]
    traceback = errors[6:]
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "RuntimeError: the trainer crashed on purpose (console1)"
    expected = [line for i in range(6) for line in (("out", printed[i]), ("err", errors[i]))]
    expected += [("err", line) for line in traceback]
    fake_wandb.wait_for(lambda: "console1" in fake_wandb.runs() and len(fake_wandb.run("console1").console)
                        >= len(expected), 90)
    assert logs(fake_wandb.run("console1")) == expected
    assert [row["loss"] for row in fake_wandb.run("console1").history] == [0.5]

    quiet = console_trainer(sys.executable, {"endpoint": relay.endpoint, "run_id": "console2", "lines": 3,
                                             "console": False}, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    fake_wandb.wait_for(lambda: fake_wandb.complete("console2"), 90)
    assert fake_wandb.run("console2").console == [] and len(fake_wandb.run("console2").history) == 1
    assert logs(fake_wandb.run("console1")) == expected  # and nothing more came


def test_a_flood_is_dropped_counted_exactly_and_costs_the_trainer_little(fake_wandb, relay_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    limits = {"max_lines": 500, "lines_per_second": 2000, "burst": 1000}
    done = console_trainer(sys.executable, {"endpoint": relay.endpoint, "run_id": "flood", "flood": 200000,
                                            "limits": limits}, tmp_path)
    assert done.returncode == 0, done.stderr
    measured = report(tmp_path, "flood")
    assert measured["finish"]["delivered"] is True and measured["errors"] == []
    assert measured["per_print"] < 40e-6, "a print took %.1f us on average" % (measured["per_print"] * 1e6)
    fake_wandb.wait_for(lambda: fake_wandb.complete("flood"), 120)
    lines = logs(fake_wandb.run("flood"))
    told = [int(DROPPED.match(text).group(1).replace(",", "")) for stream, text in lines if DROPPED.match(text)]
    delivered = [int(text.split()[1]) for stream, text in lines if not DROPPED.match(text)]
    assert all(stream == "out" for stream, text in lines if not DROPPED.match(text))
    assert delivered == sorted(set(delivered)) and set(delivered) <= set(range(200000))
    assert told and sum(told) == 200000 - len(delivered), "dropped lines told: %s, delivered %d" % (
        told, len(delivered))
    assert 100 <= len(delivered) < 200000 // 4, "the limits let %d lines through" % len(delivered)


def test_a_relay_killed_mid_run_writes_no_console_line_twice(fake_wandb, relay_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_", "PYTHON"))}
    env["PYTHONPATH"] = ROOT
    args = {"endpoint": relay.endpoint, "run_id": "killed", "phases": [[5, 3], [4, 2]],
            "spill_dir": str(tmp_path / "spill"), "report": str(tmp_path / "killed.json")}
    trainer = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "console_trainer.py"), json.dumps(args)],
                               env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        trainer.stdin.write("\n")
        trainer.stdin.flush()
        fake_wandb.wait_for(lambda: "killed" in fake_wandb.runs() and len(fake_wandb.run("killed").history) == 4, 90)
        # W&B's count confirmed the rows (the open record alone is left): the console lines before them too
        relay.wait_status(lambda status: status["runs"][0]["pending"] == 1, 60, "the rows confirmed")
        relay.stop(signal.SIGKILL)
        relay.start()
        trainer.stdin.write("\n")
        trainer.stdin.close()
        assert trainer.wait(timeout=120) == 0
    finally:
        trainer.kill()
    fake_wandb.wait_for(lambda: fake_wandb.complete("killed"), 120)
    assert logs(fake_wandb.run("killed")) == [("out", "phase %d line %d" % (phase, index))
                                              for phase, lines in ((0, 5), (1, 4)) for index in range(lines)]
    assert len(fake_wandb.run("killed").history) == 6


# -- the capture, unit-sized ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def taken(buffer: ConsoleBuffer, final: bool = False) -> tuple[list, int]:
    batches = buffer.take(final)
    return [line for lines, _ in batches for line in lines], sum(dropped for _, dropped in batches)


def test_lines_are_cut_redrawn_and_kept_per_stream():
    buffer = ConsoleBuffer(ConsoleLimits(max_line_length=8), Clock())
    for index, text in [(0, "a"), (1, "err "), (0, "bc\n"), (0, "0%\r"), (0, "50%\r100%\n"), (1, "x\r\n"),
                        (0, "0123456789\nlast"), (0, "\r\n"), (1, "never ended")]:
        buffer.write(index, text)
    assert taken(buffer) == ([["out", "abc"], ["out", "100%"], ["err", "err x"], ["out", "01234567"],
                              ["out", "last"]], 0)
    assert taken(buffer, final=True) == ([["err", "never en"]], 0)
    assert buffer.totals == {"lines": 6, "dropped": 0, "cut": 2}


def test_bounds_and_rate_drop_whole_lines_and_count_them_exactly():
    clock = Clock()
    buffer = ConsoleBuffer(ConsoleLimits(max_lines=5, max_bytes=1000, lines_per_second=10, burst=3), clock)
    for i in range(10):
        buffer.write(0, "line %d\n" % i)        # the burst: 3 lines, then none until tokens come
    clock.now += 0.25                             # 2.5 lines' worth of tokens
    for i in range(10, 14):
        buffer.write(1, "line %d\n" % i)
    lines, dropped = taken(buffer)
    assert lines == [["out", "line 0"], ["out", "line 1"], ["out", "line 2"], ["err", "line 10"], ["err", "line 11"]]
    assert dropped == 9 and buffer.totals["dropped"] == 9
    clock.now += 100
    small = ConsoleBuffer(ConsoleLimits(max_lines=100, max_bytes=10), clock)
    for text in ("12345\n", "123456\n", "1234\n", "xy\n"):
        small.write(0, text)
    assert taken(small) == ([["out", "12345"], ["out", "1234"]], 2)  # 5 + 6 > 10; the queue is full after 9
    assert taken(small, final=True) == ([], 0)


def test_a_record_is_due_after_a_second_or_a_full_batch_and_batches_stay_small():
    clock = Clock()
    buffer = ConsoleBuffer(ConsoleLimits(), clock)
    assert not buffer.due()
    assert buffer.write(0, "one\n") is False and not buffer.due()
    clock.now += console.BATCH_EVERY
    assert buffer.due()
    assert buffer.write(0, "".join("%d\n" % i for i in range(console.BATCH_LINES * 2))) is True
    batches = buffer.take()
    assert [len(lines) for lines, _ in batches] == [console.BATCH_LINES, console.BATCH_LINES, 1]
    long_lines = ConsoleBuffer(ConsoleLimits(), clock)
    long_lines.write(1, ("y" * 4000 + "\n") * 100)
    assert all(sum(len(text) for _, text in lines) <= console.BATCH_BYTES for lines, _ in long_lines.take())


def test_capture_tees_first_stays_quiet_for_the_clients_own_warnings_and_puts_the_streams_back(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    records = []
    capture = ConsoleCapture("run1", lambda record: records.append(record) or True, lambda: None)
    assert capture.start()
    print("kept")
    with console.quiet():
        print("a warning of the client's own", file=sys.stderr)
    print("an error", file=sys.stderr)
    capture.exception(ValueError("bad"))   # a traceback queued, not written
    sys.stdout.write("unfinished")
    capture.stop()
    assert "write" not in vars(out) and "write" not in vars(err)
    print("after stop")
    assert out.getvalue() == "kept\nunfinishedafter stop\n"
    assert err.getvalue() == "a warning of the client's own\nan error\n"
    assert [(r["run"], r["dropped"]) for r in records] == [("run1", 0)]
    assert records[0]["lines"] == [["out", "kept"], ["err", "an error"], ["err", "ValueError: bad"],
                                   ["out", "unfinished"]]


def test_a_forked_child_passes_writes_through_and_sends_nothing(monkeypatch):
    records = []
    read, write = os.pipe()
    stream = io.TextIOWrapper(io.FileIO(write, "w"), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", stream)
    capture = ConsoleCapture("run1", lambda record: records.append(record) or True, lambda: None)
    capture.start()
    print("parent before")
    pid = os.fork()
    if pid == 0:  # the child: its line reaches the pipe, and its capture queues nothing
        print("child")
        code = 0 if capture.buffer.take(final=True) == [] and not capture.active else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("parent after")
    capture.stop()
    stream.close()
    with os.fdopen(read) as pipe:
        assert pipe.read() == "parent before\nchild\nparent after\n"
    assert os.waitstatus_to_exitcode(status) == 0
    assert [line for record in records for line in record["lines"]] == [["out", "parent before"],
                                                                        ["out", "parent after"]]


def test_the_observer_puts_a_failed_trainings_traceback_in_the_logs_before_the_finish(tmp_path):
    from relay.client import RelayClient
    from relay.rl_games import RelayAlgoObserver
    from test_rl_games import FakeAlgo, ListWriter

    free = "tcp://127.0.0.1:%d" % free_tcp_port()  # no relay: finish() spills what it holds
    client = RelayClient(free, spill_dir=str(tmp_path / "spill"), heartbeat_every=0, provenance=False, system_metrics=0)
    observer = RelayAlgoObserver(client=client, run_id="crash", finish_timeout=0.2)
    algo = FakeAlgo(ListWriter(), str(tmp_path))

    def train():
        print("epoch 1")
        raise RuntimeError("simulation exploded")

    algo.train = train
    observer.before_init("run", {"name": "unit"}, "unit")
    observer.after_init(algo)
    with pytest.raises(RuntimeError, match="simulation exploded"):
        algo.train()
    client.close()
    with open(observer.report["spill_file"], "rb") as handle:
        records = [msgpack.unpackb(frame, raw=False) for frame in msgpack.Unpacker(handle, raw=False)]
    assert [record["t"] for record in records] == ["open", "console", "finish"]
    lines = records[1]["lines"]
    assert lines[:2] == [["out", "epoch 1"], ["err", "Traceback (most recent call last):"]]
    assert lines[-1] == ["err", "RuntimeError: simulation exploded"] and records[2]["exit_code"] == 1
    assert not client._console.active and client._console._installed == []  # the streams put back at the finish


def test_a_signal_handler_printing_inside_a_write_does_not_wait_for_itself():
    buffer = ConsoleBuffer(ConsoleLimits(), Clock())
    with buffer._lock:  # what the handler's thread holds while it is inside write()
        buffer.write(0, "from the handler\n")
    assert taken(buffer) == ([["out", "from the handler"]], 0)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_lines must be an int >= 1, got 0"):
        ConsoleLimits(max_lines=0)
    with pytest.raises(ValueError, match="lines_per_second must be a number > 0"):
        ConsoleLimits(lines_per_second=0)
