"""Every benchmark still runs: `bench/X.py --quick --dry-run` exits 0 and ends with its JSON summary.

Not a speed test: the dry runs use tiny sizes, and only what they did is checked (everything
delivered, the keys the README's table is filled from). The scripts run side by side (most of their
time is spent waiting on relays and sockets), so the whole module takes about a minute.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from harness import ROOT

SCRIPTS = {
    "client_latency": ["relay_p50_us", "relay_p99_us", "wandb_p50_us", "tensorboardx_p50_us", "ratio_p50", "ratio_p99"],
    "throughput": ["decode", "ingest", "upload", "sdk_ceiling"],
    "drain": ["drain_rows_per_s", "drain_s", "rss_backlogs", "server_rss_growth_small_to_large"],
    "drain_compare": ["drain_rows_per_s", "compare", "compare_drain", "ratio"],
    "gpu_overhead": ["overhead_item", "overhead_relay", "step_ms"],
    "outage": ["relay_max_step_stall_ms", "wandb_max_step_stall_ms"],
    "soak": ["sent", "delivered", "lost", "duplicated"],
    "learning_curve": ["epochs"],
    "visible": ["cases", "seconds"],
    "many_runs": ["cases", "seconds", "history"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every script at once; each test waits for its own. drain_compare is drain.py with
    --compare (two rounds) against a copy of this tree's relay package (a tree of its own, as an older one would be)."""
    other = tmp_path_factory.mktemp("compare")
    shutil.copytree(os.path.join(ROOT, "relay"), str(other / "relay"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    extra = {"drain_compare": ("drain", ["--compare", str(other), "--rounds", "2"])}
    started = {}
    for name in SCRIPTS:
        script, args = extra.get(name, (name, []))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
        env.update(PYTHONPATH=ROOT, HOME=str(tmp_path_factory.mktemp("home-" + name)), WANDB_SILENT="true",
                   MPLBACKEND="Agg")
        started[name] = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", script + ".py"), "--quick",
                                          "--dry-run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, env=env, cwd=ROOT, start_new_session=True)
    yield started
    for proc in started.values():  # a script not waited for (-k, a failure) goes with its relays and workers
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bench_script_runs(runs, name):
    output, _ = runs[name].communicate(timeout=230)
    assert runs[name].returncode == 0, "bench/%s.py --quick --dry-run failed:\n%s" % (name, output[-4000:])
    summary = json.loads(output.strip().splitlines()[-1])
    missing = [key for key in SCRIPTS[name] if key not in summary]
    assert not missing, "bench/%s.py's JSON summary lacks %s:\n%s" % (name, missing, summary)
    if name == "throughput":
        assert all(case["all_delivered"] for case in summary["ingest"])
        assert summary["upload"] and all(case["rows"] > 0 for case in summary["upload"])
        decoded = summary["decode"]["rates"]["this"]
        assert sorted(decoded) == ["log, 40 float metrics", "open, nested config"], decoded
        assert all(rates["decode_per_s"] > 0 and rates["classify_per_s"] > 0 for rates in decoded.values()), decoded
    elif name == "drain":
        assert summary["drain_delivered"] == summary["drain_rows"]
        assert all(backlog["all_acked"] for backlog in summary["rss_backlogs"])
    elif name == "drain_compare":
        compare = summary["compare_drain"]
        assert summary["drain_delivered"] == summary["drain_rows"] == compare["delivered"] == compare["rows"] == 200
        assert sorted(summary["ratio"]) == sorted(["rows_per_s", "drain_s", "total_pss_mib_max",
                                                   "server_rss_mib_max", "fill_s"]), summary
        assert "rss_backlogs" not in summary, summary
        assert summary["rounds"] == 2 and summary["delivered_by_round"] == {"this": [200, 200], "compare": [200, 200]}
        assert [len(rates) for rates in summary["rows_per_s_by_round"].values()] == [2, 2], summary
    elif name in ("client_latency", "gpu_overhead"):
        assert summary["relay_delivered"] is True
    elif name == "visible":
        assert sorted(case["kind"] for case in summary["cases"]) == ["relay", "wandb"]
        assert all(case["rows"] == summary["seconds"] * case["runs"] for case in summary["cases"]), summary
    elif name == "many_runs":
        assert [(case["runs"], case["history"]) for case in summary["cases"]] == [(5, 100)], summary
        case = summary["cases"][0]
        assert case["delivered"] is True and case["finished"] is True, case
        assert case["runs_with_rows"] == 5 and case["first_rows_max_s"] > 0, case
        assert case["processes_max"] >= 3 and case["pss_max_mib"] > 0 and case["cores"] is not None, case
    elif name == "soak":
        assert summary["delivered"] == summary["sent"] and summary["lost"] == summary["duplicated"] == 0
