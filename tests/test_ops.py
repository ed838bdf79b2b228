"""Ops visibility: `relay status --watch`, the Prometheus endpoint, backlog progress in the log.

A real relay subprocess, real trainers, the real wandb SDK against the fake W&B server; the
numbers asserted are the exact record counts the trainers sent.
"""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from harness import ROOT, wandb_env
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from test_e2e import assert_history

from relay.client import RelayClient
from relay.metrics import error_kind, is_loopback
from relay.progress import BacklogProgress
from relay.watch import render, upload_rates

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed with prometheus_client's own parser."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def wait_metrics(port: int, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    metrics = {}
    while time.monotonic() < deadline:
        metrics = scrape(port)
        if predicate(metrics):
            return metrics
        time.sleep(0.2)  # the poll period of a scrape loop
    raise AssertionError("timed out waiting for %s; last scrape %s" % (what, metrics))


def watch_rows(output: str, run_id: str) -> list[list[str]]:
    """The cells of every table row of `run_id` that `relay status --watch` printed."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines()
            if line.startswith("│ %s " % run_id)]


# -- status --watch ----------------------------------------------------------------------------


def test_status_watch_draws_every_refresh_with_the_exact_counts(fake_wandb, relay_factory, trainer_factory):
    fake_wandb.set_fault("hang")  # W&B holds everything: pending stays exactly what was sent
    relay = relay_factory(fake_wandb, ["--mode", "online", "--init-timeout", "3"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "watched", "steps": 200, "metrics": 6,
                               "seed": 31, "project": "tokenHSI", "name": "traj"})
    assert trainer.event("finished")["report"]["delivered"] is True
    relay.wait_status(lambda s: s["wandb_down_since"] and s["runs"][0]["state"] == "retrying", 60, "a retrying run")
    env = dict(os.environ, COLUMNS="220", PYTHONPATH=ROOT)
    watch = subprocess.run([sys.executable, "-m", "relay", "status", "--endpoint", relay.endpoint, "--watch",
                            "--count", "3", "--interval", "0.3"], env=env, capture_output=True, text=True, check=False,
                           timeout=60, cwd=ROOT)
    assert watch.returncode == 0, watch.stderr
    out = watch.stdout
    assert out.count("runs (from %s" % relay.endpoint) == 3, out   # one table per refresh, then it stops
    rows = watch_rows(out, "watched")
    assert len(rows) == 3, out
    for cells in rows:
        run, name, state, _since, received, uploaded, pending, unconfirmed, lag, _rate, error = cells
        assert (run, name, state, received, uploaded, pending, unconfirmed) == (
            "watched", "tokenHSI/traj", "retrying", "202", "0", "202", "0")
        assert lag.endswith(" s") and error
    assert [cells[9] for cells in rows] == ["-", "0.0/s", "0.0/s"]  # no rate before a second poll
    assert out.count("W&B unreachable since") == 3
    assert "received 202  acked 202  duplicates 0" in out
    fake_wandb.set_fault("ok")
    fake_wandb.wait_for(lambda: fake_wandb.complete("watched"), 120)


def test_status_watch_without_a_relay_says_so_and_fails(short_dir):
    endpoint = "ipc://%s/nobody.ipc" % short_dir
    watch = subprocess.run([sys.executable, "-m", "relay", "status", "--endpoint", endpoint, "--watch",
                            "--timeout", "0.5"], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, check=False,
                           text=True, timeout=60, cwd=ROOT)
    assert watch.returncode == 1
    assert "no relay answered at %s" % endpoint in watch.stderr


def _status(uploaded: int, pending: int, unconfirmed: int = 0, **extra) -> dict:
    run = {"run_id": "r1", "project": "p", "name": "n", "received": uploaded + pending, "uploaded": uploaded,
           "pending": pending, "unsent": pending - unconfirmed, "unconfirmed": unconfirmed,
           "oldest_pending_age": 12.0 if pending else None, "state": "uploading",
           "state_since": None, "last_error": None, "exit_code": None, "finished": False}
    status = {"bind": "tcp://127.0.0.1:5555", "mode": "online", "uptime": 60.0, "spool_bytes": 3_000_000,
              "max_spool_bytes": 20_000_000, "spool_path": "/s/spool.sqlite", "runs": [run],
              "records": {"received": uploaded + pending, "uploaded": uploaded, "pending": pending,
                          "unsent": pending - unconfirmed, "unconfirmed": unconfirmed, "oldest_pending_age": None},
              "run_counts": {"total": 1, "active": 1, "listed": 1, "by_state": {"uploading": 1},
                             "active_by_state": {"uploading": 1}},
              "counters": {"received": 7}, "wandb_down_since": None, "holding": False, "spool_error": None}
    status.update(extra)
    return status


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_watch_header_says_offline_not_reachable_when_nothing_goes_to_wandb(mode):
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(render(_status(10, 0, mode=mode), {}, "tcp://x:5555"))
    header = console.file.getvalue().splitlines()[0]
    assert "mode %s" % mode in header and header.rstrip().endswith(mode) and "W&B reachable" not in header, header


def test_upload_rate_comes_from_two_polls_and_the_header_shows_spool_and_holding():
    first, second = _status(1000, 500), _status(1100, 400, holding=True)
    assert upload_rates(None, first, 0.0) == {"r1": None}
    assert upload_rates(first, second, 2.0) == {"r1": 50.0}
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(render(second, upload_rates(first, second, 2.0), "tcp://x:5555"))
    out = console.file.getvalue()
    assert "50.0/s" in out and "spool 3.0 MB of 20.0 MB" in out and "W&B reachable" in out
    assert "HOLDING new records (not acked): spool over max_spool_bytes" in out
    assert watch_rows(out, "r1")[0][4:9] == ["1500", "1100", "400", "0", "12 s"]


# -- Prometheus --------------------------------------------------------------------------------


def test_metrics_endpoint_counts_exactly_through_an_outage_and_after(fake_wandb, relay_factory, trainer_factory):
    port = free_port()
    fake_wandb.set_fault("hang")
    relay = relay_factory(fake_wandb, ["--mode", "online", "--init-timeout", "3",
                                       "--metrics-bind", "127.0.0.1:%d" % port])
    assert "Prometheus metrics on http://127.0.0.1:%d/metrics" % port in relay.log()
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "scraped", "steps": 150, "metrics": 5,
                               "seed": 32})
    assert trainer.event("finished")["report"]["delivered"] is True
    status = relay.wait_status(lambda s: s["wandb_down_since"], 60, "the relay to see W&B down")
    kind = error_kind(status["runs"][0]["last_error"])
    assert kind != "other", status["runs"][0]["last_error"]
    down = wait_metrics(port, lambda m: m[("relay_wandb_up", ())] == 0, 30, "relay_wandb_up 0")
    assert down[("relay_received_total", ())] == 152           # open + 150 logs + finish
    assert down[("relay_acked_total", ())] == 152
    assert down[("relay_duplicates_total", ())] == 0 and down[("relay_refused_total", ())] == 0
    assert down[("relay_malformed_total", ())] == 0
    assert down[("relay_pending_records", ())] == 152
    assert down[("relay_unsent_records", ())] == 152 and down[("relay_unconfirmed_records", ())] == 0
    assert down[("relay_uploaded_records_total", ())] == 0
    assert down[("relay_run_pending_records", (("run", "scraped"),))] == 152
    assert down[("relay_run_received_records_total", (("run", "scraped"),))] == 152
    assert down[("relay_runs", (("state", "retrying"),))] == 1
    assert down[("relay_wandb_errors_total", (("kind", kind),))] == 1
    assert down[("relay_oldest_pending_age_seconds", ())] > 0
    assert down[("relay_uploaders_running", ())] == 1 and down[("relay_holding", ())] == 0
    assert 0 < down[("relay_spool_live_bytes", ())] <= down[("relay_spool_bytes", ())]

    fake_wandb.set_fault("ok")
    fake_wandb.wait_for(lambda: fake_wandb.complete("scraped"), 120)
    assert_history(fake_wandb.run("scraped").history, seed=32, steps=150, metrics=5)
    after = wait_metrics(port, lambda m: m[("relay_wandb_up", ())] == 1 and m[("relay_uploaders_running", ())] == 0
                         and m[("relay_pending_records", ())] == 0, 60, "the run uploaded and its uploader gone")
    assert after[("relay_uploaded_records_total", ())] == 152
    assert after[("relay_unsent_records", ())] == 0 and after[("relay_unconfirmed_records", ())] == 0
    assert after[("relay_received_total", ())] == 152 and after[("relay_oldest_pending_age_seconds", ())] == 0
    assert not [key for key in after if key[0].startswith("relay_run_")]  # finished runs leave the labels
    assert after[("relay_wandb_errors_total", (("kind", kind),))] == 1
    assert relay.stop() == 0
    with pytest.raises(OSError):
        scrape(port)


def test_metrics_bind_that_is_not_host_port_stops_the_relay_with_the_key_named(relay_factory):
    relay = relay_factory(None, ["--metrics-bind", "9464"], start=False)
    relay.start(wait=False)
    assert relay.proc.wait(timeout=60) == 1
    assert "metrics_bind (from command line)" in relay.log() and "'9464' is not HOST:PORT" in relay.log()


def test_error_kinds_and_loopback():
    assert error_kind("CommError: Run initialization has timed out after 3.0 sec.") == "CommError"
    assert error_kind("asking W&B for the run failed: URLError: <urlopen error timed out>") == "URLError"
    assert error_kind("asking W&B for the run failed: TimeoutError: timed out") == "TimeoutError"
    assert error_kind("something odd") == "other" and error_kind(None) == "other"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("head-node")


# -- backlog progress --------------------------------------------------------------------------


def test_backlog_progress_counts_rate_eta_and_records_that_arrive_meanwhile():
    progress = BacklogProgress(threshold=1000, every=10.0)
    assert progress.update(0.0, {"small": (999, 999)}) == []
    assert progress.update(0.0, {"r": (100_000, 100_000)}) == [
        "run r: 100,000 records waiting to upload to W&B; progress every 10 s"]
    assert progress.update(5.0, {"r": (100_000, 90_000)}) == []   # not yet time for a line
    assert progress.update(10.0, {"r": (100_000, 76_000)}) == [
        "run r: uploaded 24,000 of 100,000 backlog records (2,400 records/s, ETA 32 s)"]
    assert progress.update(20.0, {"r": (101_000, 53_000)}) == [   # 1,000 more came in meanwhile
        "run r: uploaded 48,000 of 101,000 backlog records (2,400 records/s, ETA 22 s)"]
    assert progress.update(30.0, {"r": (101_000, 53_000)}) == [
        "run r: uploaded 48,000 of 101,000 backlog records (0 records/s, no progress: is W&B reachable?)"]
    assert progress.update(35.0, {}) == [                          # finished: its records left the spool
        "run r: backlog of 101,000 records uploaded in 35 s (2,886 records/s)"]
    assert progress.update(40.0, {"r": (101_000, 0)}) == []


def test_relay_logs_backlog_progress_through_an_outage_until_drained(fake_wandb, relay_factory, trainer_factory):
    fake_wandb.set_fault("hang")
    relay = relay_factory(fake_wandb, ["--mode", "online", "--init-timeout", "3"],
                          env={"RELAY_PROGRESS_BACKLOG": "100", "RELAY_PROGRESS_EVERY": "1"})
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "backlog", "steps": 300, "metrics": 4,
                               "seed": 33})
    assert trainer.event("finished")["report"]["delivered"] is True
    relay.wait_log("run backlog: uploaded 0 of 302 backlog records (0 records/s, no progress: is W&B reachable?)",
                   30)
    assert "records waiting to upload to W&B; progress every 1 s" in relay.log()
    fake_wandb.set_fault("ok")
    relay.wait_log("run backlog: backlog of 302 records uploaded in", 120)
    fake_wandb.wait_for(lambda: fake_wandb.complete("backlog"), 120)
    assert_history(fake_wandb.run("backlog").history, seed=33, steps=300, metrics=4)


def test_replayed_spill_file_is_followed_by_progress_until_uploaded(fake_wandb, relay_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"], start=False,
                          env={"RELAY_PROGRESS_BACKLOG": "100", "RELAY_PROGRESS_EVERY": "1"})
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="replayed")
    for step in range(400):
        run.log({"step": step, "loss": 1.0 / (step + 1)}, frame=step + 1)
    report = run.finish(exit_code=0, timeout=0.5)   # no relay yet: everything is spilled
    client.close()
    assert report["spilled"] == 402
    relay.start()
    replay = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", relay.spool_dir,
                             report["spill_file"]], env=wandb_env(fake_wandb, str(tmp_path / "home")),
                            capture_output=True, text=True, check=False, timeout=60, cwd=ROOT)
    assert replay.returncode == 0 and "402 records new" in replay.stdout, replay.stdout + replay.stderr
    relay.wait_log("run replayed: 402 records waiting to upload to W&B", 30)
    relay.wait_log("run replayed: backlog of 402 records uploaded in", 120)
    fake_wandb.wait_for(lambda: fake_wandb.complete("replayed"), 120)
    assert [row["step"] for row in fake_wandb.run("replayed").history] == list(range(400))


def test_status_watch_on_a_terminal_redraws_in_place_and_reports_a_relay_that_stops():
    from relay.watch import watch

    replies = iter([_status(1000, 500), _status(1300, 200), None])
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    assert watch(lambda: next(replies), "tcp://x:5555", 0.1, None, console) is False
    out = console.file.getvalue()
    assert "\x1b[" in out, "a terminal gets cursor control codes (rich.live), not one table per refresh"
    assert "1300" in out and re.search(r"│\s+\d+\.\d/s\s+│", out), out  # the second poll has a rate
    assert "relay at tcp://x:5555 stopped answering" in out


def test_metrics_port_taken_stops_the_relay_and_a_wildcard_bind_is_warned_about(relay_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = relay_factory(None, ["--mode", "disabled", "--metrics-bind", "127.0.0.1:%d" % port], start=False)
        relay.start(wait=False)
        assert relay.proc.wait(timeout=60) == 1
        assert "cannot serve metrics on 127.0.0.1:%d" % port in relay.log() and "is the port taken?" in relay.log()
    port = free_port()
    relay = relay_factory(None, ["--mode", "disabled", "--metrics-bind", "0.0.0.0:%d" % port], name="wildcard")
    assert "metrics endpoint on non-loopback address 0.0.0.0:%d" % port in relay.log()
    assert scrape(port)[("relay_received_total", ())] == 0
    assert relay.stop() == 0
