"""`relay status` on a long-lived relay, under a flood of status requests, and what it counts.

A real relay subprocess on a real spool file; the spool's history is written with SQL into the
file the relay then opens (10,000 finished runs take a second that way instead of an hour of
uploads). The counts in the W&B test are checked against what the fake W&B holds.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from harness import ROOT, free_tcp_port
from test_e2e import assert_history
from test_ops import scrape, watch_rows
from workload import frame, row

from relay import protocol
from relay.cli import query_status
from relay.client import RelayClient
from relay.spool import Spool
from relay.spool_report import STATUS_BYTES, STATUS_PAGE_BYTES
from relay.status import RelayStatus, RunStatus

pytestmark = pytest.mark.timeout(240)

FRAME_LIMIT = protocol.MAX_FRAME_BYTES


def write_history(spool_dir: str, count: int, disabled: int = 0, name_chars: int = 0) -> list[str]:
    """`count` finished runs in the spool's runs table, as a relay leaves them after uploading
    (no records left), each finished one second after the one before; the first `disabled` of
    them in state 'disabled', the rest 'finished'. Returns their run ids in order."""
    spool = Spool(spool_dir)
    now = time.time()
    run_ids = ["hist%05d" % i for i in range(count)]
    rows = []
    for i, run_id in enumerate(run_ids):
        name = ("n%d-" % i).ljust(name_chars, "x") if name_chars else "traj-%d" % i
        settings = msgpack.packb({"project": "tokenHSI", "name": name, "config": {"lr": 2e-5, "seed": i}})
        rows.append((run_id, settings, 1000 + i, 1000 + i, "disabled" if i < disabled else "finished",
                     now - 2 * count + i, 0, "https://wandb.example/tokenhsi/tokenHSI/runs/%s" % run_id,
                     now - 3 * count + i, now - 2 * count + i))
    with spool.transaction():
        spool.conn.executemany(
            "INSERT INTO runs (run_id, settings, received, uploaded_id, state, state_since, exit_code, finished, "
            "location, created, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)", rows)
    spool.close()
    return run_ids


def relay_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", *args], env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS="220"),
                          capture_output=True, text=True, check=False, timeout=120, cwd=ROOT)


def timed_status(endpoint: str) -> tuple[dict, float]:
    started = time.monotonic()
    status = query_status(endpoint, 5.0)
    elapsed = time.monotonic() - started
    assert status is not None, "no status reply within 5 s"
    return status, elapsed


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


# -- a long history --------------------------------------------------------------------------


def test_status_of_ten_thousand_finished_runs_is_small_and_fast_and_all_lists_each_once(relay_factory, tmp_path):
    spool_dir = str(tmp_path / "spool")
    run_ids = write_history(spool_dir, 10_000, disabled=1_000)
    port = free_tcp_port()
    relay = relay_factory(None, ["--mode", "disabled", "--metrics-bind", "127.0.0.1:%d" % port], spool_dir=spool_dir)

    for _ in range(3):
        status, elapsed = timed_status(relay.endpoint)
        assert elapsed < 1.0, "status took %.2f s" % elapsed
    size = len(protocol.encode(status))
    assert size < 64 * 1024, "status reply of %d bytes" % size
    assert status["run_counts"] == {"total": 10_000, "active": 0, "listed": 10,
                                    "by_state": {"disabled": 1_000, "finished": 9_000}, "active_by_state": {}}
    assert [run["run_id"] for run in status["runs"]] == run_ids[-10:]   # the most recently finished
    assert status["records"] == {"received": sum(1000 + i for i in range(10_000)),
                                 "uploaded": sum(1000 + i for i in range(10_000)), "pending": 0, "unsent": 0,
                                 "unconfirmed": 0, "oldest_pending_age": None}

    table = relay_cli("status", "--endpoint", relay.endpoint)
    assert table.returncode == 0, table.stderr
    assert "10,000 runs in the spool, 0 active; records not yet confirmed by W&B: 0" in table.stdout
    assert ("9,990 more runs not listed (disabled 1,000, finished 8,990); `relay status --all` lists every run"
            in table.stdout), table.stdout
    assert [line.split()[0] for line in table.stdout.splitlines() if line.startswith("hist")] == run_ids[-10:]

    watch = relay_cli("status", "--endpoint", relay.endpoint, "--watch", "--count", "1")
    assert watch.returncode == 0, watch.stderr
    assert "9,990 more runs not listed (disabled 1,000, finished 8,990)" in watch.stdout, watch.stdout
    assert "10,000 runs in the spool, 0 active" in watch.stdout
    assert len(watch_rows(watch.stdout, "hist09999")) == 1 and not watch_rows(watch.stdout, "hist09989")

    metrics = scrape(port)
    assert metrics[("relay_uploaded_records_total", ())] == sum(1000 + i for i in range(10_000))
    assert metrics[("relay_pending_records", ())] == 0 and metrics[("relay_unconfirmed_records", ())] == 0
    assert not [key for key in metrics if key[0] == "relay_runs" or key[0].startswith("relay_run_")]

    every = relay_cli("status", "--endpoint", relay.endpoint, "--all", "--json")
    assert every.returncode == 0, every.stderr
    listed = json.loads(every.stdout)
    assert [run["run_id"] for run in listed["runs"]] == run_ids
    assert [run["received"] for run in listed["runs"]] == [1000 + i for i in range(10_000)]
    assert listed["run_counts"]["listed"] == listed["run_counts"]["total"] == 10_000 and "next" not in listed

    every_table = relay_cli("status", "--endpoint", relay.endpoint, "--all")
    assert every_table.returncode == 0, every_table.stderr
    assert [line.split()[0] for line in every_table.stdout.splitlines() if line.startswith("hist")] == run_ids
    assert "not listed" not in every_table.stdout


def test_a_relay_archives_its_finished_runs_off_the_hot_path_and_a_resumed_one_comes_back(relay_factory, tmp_path):
    """`retention` 0: the server's scan moves the history to the archive in passes of 500; the
    totals and `--all` still count and list every run, and a trainer resuming an archived run
    brings it back with its counts."""
    spool_dir = str(tmp_path / "spool")
    run_ids = write_history(spool_dir, 1_200, disabled=200)
    port = free_tcp_port()
    relay = relay_factory(None, ["--mode", "disabled", "--metrics-bind", "127.0.0.1:%d" % port], spool_dir=spool_dir,
                          env={"RELAY_RETENTION": "0"})
    status = relay.wait_status(lambda s: s["run_counts"]["listed"] == 0, 30, "the history archived")
    assert status["run_counts"] == {"total": 1_200, "active": 0, "listed": 0,
                                    "by_state": {"disabled": 200, "finished": 1_000}, "active_by_state": {}}
    received = sum(1000 + i for i in range(1_200))
    assert status["records"]["received"] == status["records"]["uploaded"] == received
    assert scrape(port)[("relay_uploaded_records_total", ())] == received
    assert re.findall(r"archived (\d+) finished runs", relay.log()) == ["500", "500", "200"]
    every = relay_cli("status", "--endpoint", relay.endpoint, "--all", "--json")
    assert every.returncode == 0, every.stderr
    assert [run["run_id"] for run in json.loads(every.stdout)["runs"]] == run_ids

    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    try:
        run = client.start_run(project="tokenHSI", run_id=run_ids[7])   # a trainer resumes a finished run
        run.log({"loss": 1.0})
        assert run.finish(exit_code=0, timeout=30.0)["delivered"] is True
    finally:
        client.close()
    back = relay.wait_status(lambda s: s["runs"] and s["runs"][0]["finished"], 30, "the resumed run finished")
    assert [(r["run_id"], r["received"], r["pending"]) for r in back["runs"]] == [(run_ids[7], 1007 + 3, 0)]
    assert back["run_counts"]["total"] == 1_200 and back["records"]["received"] == received + 3
    assert relay.stop() == 0


def test_status_pages_stay_under_their_byte_budget_whatever_the_runs_names(relay_factory, tmp_path):
    """Names as long as the protocol allows (65,536 characters): each run's entry is cut to a
    size limit, so a page, and the summary, stay far below the frame limit."""
    spool_dir = str(tmp_path / "spool")
    run_ids = write_history(spool_dir, 1_000, name_chars=protocol.MAX_STR_LEN)
    relay = relay_factory(None, ["--mode", "disabled"], spool_dir=spool_dir)
    status, _ = timed_status(relay.endpoint)
    assert len(protocol.encode(status)) < STATUS_BYTES + 4096
    assert all(len(run["name"]) == 256 and run["name"].endswith("…") for run in status["runs"])

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(relay.endpoint)
    page, pages, listed = 0, [], []
    try:
        while page is not None:
            sock.send(protocol.encode({"v": 1, "t": "status", "stream": "pager", "seq": 0, "page": page}))
            assert sock.poll(10_000), "no reply to page %d" % page
            raw = sock.recv()
            pages.append(len(raw))
            reply = protocol.decode_raw(raw)
            listed += [run["run_id"] for run in reply["runs"]]
            page = reply["next"]
    finally:
        sock.close()
    assert listed == run_ids
    assert len(pages) > 1 and max(pages) < STATUS_PAGE_BYTES + 4096 < FRAME_LIMIT, pages


# -- the typed status --------------------------------------------------------------------------


def ask(endpoint: str, request: dict) -> dict:
    """One status request on a socket of its own; the reply exactly as it came (msgpack)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(protocol.encode(dict({"v": 1, "t": "status", "stream": "typed", "seq": 0}, **request)))
        assert sock.poll(10_000), "no reply to %s" % request
        return protocol.decode_raw(sock.recv())
    finally:
        sock.close()


def test_typed_status_reads_a_real_reply_and_writes_it_back_exactly(relay_factory, tmp_path):
    spool_dir = str(tmp_path / "spool")
    run_ids = write_history(spool_dir, 30)
    relay = relay_factory(None, ["--mode", "disabled"], spool_dir=spool_dir)
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", name="live", run_id="typed-live")
    try:
        for step in range(20):
            run.log(row(7, step, 4), frame=frame(step), epoch=step + 1)
        assert client.flush(30.0)
        summary = ask(relay.endpoint, {})
        first_page = ask(relay.endpoint, {"page": 0})
    finally:
        client.close()
    for reply in (summary, first_page):
        status = RelayStatus.from_dict(reply)
        assert status.to_dict() == reply
        assert protocol.decode_raw(protocol.encode(status.to_dict())) == reply   # and through msgpack
    status = RelayStatus.from_dict(summary)
    assert (status.version, status.stream, status.paged, status.mode) == (1, "typed", False, "disabled")
    assert "next" not in summary and "next" in first_page and first_page["next"] is None
    assert status.run_counts.total == 31 and status.counters["received"] >= 21 and status.extra == {}
    live = [entry for entry in status.runs if entry.run_id == "typed-live"]
    assert len(live) == 1 and isinstance(live[0], RunStatus) and live[0].received == 21
    assert live[0].name == "live" and live[0].project == "tokenHSI" and live[0].extra == {}
    assert [entry.run_id for entry in RelayStatus.from_dict(first_page).runs] == run_ids + ["typed-live"]

    # a newer relay's keys are kept, and --json prints the reply as it came
    newer = dict(summary, queue_depth=3, runs=[dict(summary["runs"][0], gpu="h200")])
    assert RelayStatus.from_dict(newer).to_dict() == newer
    every = relay_cli("status", "--endpoint", relay.endpoint, "--json")
    assert every.returncode == 0, every.stderr
    printed = json.loads(every.stdout)
    assert RelayStatus.from_dict(printed).to_dict() == printed and printed["t"] == "status"
    assert relay.stop() == 0


def test_metrics_and_the_status_types_do_not_import_the_server():
    code = ("import sys, relay.metrics, relay.status, relay.watch, relay.intake, relay.supervisor; "
            "print(sorted(name for name in sys.modules if name == 'relay.server'))")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- a status flood --------------------------------------------------------------------------

FLOOD = 20_000
RSS_BOUND = 16 * 1024 * 1024   # what the relay may grow by while it takes the flood (measured: under 2 MB)


def test_status_flood_from_a_client_that_never_reads_leaves_the_relay_small_and_answering(relay_factory, tmp_path):
    spool_dir = str(tmp_path / "spool")
    write_history(spool_dir, 2_000)   # a status of every run would be ~0.5 MB
    relay = relay_factory(None, ["--mode", "disabled"], spool_dir=spool_dir)
    first, _ = timed_status(relay.endpoint)
    counted = first["counters"].get("status_requests", 0)
    baseline = rss_bytes(relay.proc.pid)

    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):   # the sampling period of the RSS watch
            try:
                peak[0] = max(peak[0], rss_bytes(relay.proc.pid))
            except (OSError, AssertionError):
                return

    context = zmq.Context()
    flooder = context.socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.setsockopt(zmq.RCVHWM, 1)   # replies pile up on the relay's side, not in this process
    flooder.connect(relay.endpoint)
    request = protocol.encode({"v": 1, "t": "status", "stream": "flood", "seq": 0})

    def flood() -> None:
        for _ in range(FLOOD):
            flooder.send(request)

    watcher = threading.Thread(target=sample, daemon=True)
    sender = threading.Thread(target=flood, daemon=True)
    watcher.start()
    sender.start()
    asked = 0
    slowest = 0.0
    try:
        deadline = time.monotonic() + 120
        while True:
            status, elapsed = timed_status(relay.endpoint)
            asked += 1
            slowest = max(slowest, elapsed)
            assert elapsed < 1.0, "a status took %.2f s during the flood" % elapsed
            assert peak[0] - baseline < RSS_BOUND, "relay RSS grew by %.0f MB" % ((peak[0] - baseline) / 1e6)
            if status["counters"].get("status_requests") == counted + FLOOD + asked:
                break
            assert time.monotonic() < deadline, "the relay did not read the flood within 120 s: %s" % status
        sender.join(30)
        assert not sender.is_alive()
        assert status["run_counts"]["total"] == 2_000 and len(protocol.encode(status)) < 64 * 1024
    finally:
        done.set()
        watcher.join()
        flooder.close()
        context.term()
    grown = peak[0] - baseline
    print("flood of %d status requests: relay RSS %.1f MB -> peak +%.1f MB; %d status queries meanwhile, "
          "slowest %.3f s" % (FLOOD, baseline / 1e6, grown / 1e6, asked, slowest))
    assert grown < RSS_BOUND
    assert relay.stop() == 0


# -- counts of what W&B has not confirmed ----------------------------------------------------

STOP_LINE = re.compile(r"relay stopped: .* left_in_spool=(\d+) unsent=(\d+) unconfirmed=(\d+)")


def test_stop_line_and_status_count_what_wandb_has_not_confirmed_and_the_next_start_delivers_it(
        fake_wandb, relay_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online", "--drain-timeout", "2"])
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), heartbeat_every=1.0,
                         provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="unconfirmed")
    try:
        for step in range(60):
            run.log(row(41, step, 4), frame=frame(step), epoch=step + 1)
        assert client.flush(30.0)
        # W&B confirms the 60 rows; the open record stays until the run's finish confirms it.
        relay.wait_status(lambda s: s["runs"] and s["runs"][0]["uploaded"] == 60, 60, "60 rows confirmed")
        assert len(fake_wandb.run("unconfirmed").history) == 60

        fake_wandb.set_fault("hang", "file_stream")   # W&B takes no more rows; the relay's queries still work
        for step in range(60, 150):
            run.log(row(41, step, 4), frame=frame(step), epoch=step + 1)
        assert client.flush(30.0)
        status = relay.wait_status(lambda s: s["runs"][0]["received"] == 151 and s["runs"][0]["unsent"] == 0,
                                   60, "every record handed to the wandb SDK")
        counts = {key: status["runs"][0][key] for key in ("received", "uploaded", "pending", "unsent", "unconfirmed")}
        assert counts == {"received": 151, "uploaded": 60, "pending": 91, "unsent": 0, "unconfirmed": 91}
        assert status["records"]["pending"] == 91 and status["records"]["unconfirmed"] == 91
        assert status["runs"][0]["oldest_pending_age"] is not None   # the rows W&B has not confirmed wait
        table = relay_cli("status", "--endpoint", relay.endpoint)
        assert "pending 91      (unsent 0, unconfirmed 91)" in table.stdout, table.stdout

        assert relay.stop(signal.SIGTERM) == 0
        assert "drain cut short" in relay.log()
        missing = 150 - len(fake_wandb.run("unconfirmed").history)
        assert missing == 90
        left, unsent, unconfirmed = map(int, STOP_LINE.search(relay.log()).groups())
        assert (left, unsent, unconfirmed) == (missing + 1, 0, missing + 1)   # + the run's open record

        fake_wandb.set_fault("ok")
        relay.start()
        report = run.finish(exit_code=0, timeout=60.0)
        assert report["delivered"] is True
        fake_wandb.wait_for(lambda: fake_wandb.complete("unconfirmed"), 120)
        assert_history(fake_wandb.run("unconfirmed").history, seed=41, steps=150, metrics=4)
        done = relay.wait_status(lambda s: s["runs"][0]["finished"], 60, "the run finished")
        assert {key: done["runs"][0][key] for key in ("received", "uploaded", "pending", "unsent", "unconfirmed")} \
            == {"received": 152, "uploaded": 152, "pending": 0, "unsent": 0, "unconfirmed": 0}
    finally:
        client.close()
    assert relay.stop() == 0
    assert STOP_LINE.findall(relay.log())[-1] == ("0", "0", "0")
