"""The wandb SDK made ready for uploaders that start many runs at once, and what it does on its own
for each run off (relay/sinks/wandb_quiet.py): runs started together from many threads all reach
W&B; no status-checker thread per run, no analytics of the SDK itself. The real sink, SDK and
wandb-core, in a process of their own, against the fake W&B."""
from __future__ import annotations

import json
import subprocess
import sys

from harness import ROOT, wandb_env

PROBE = r"""
import json, sys, threading
from relay.config import RelayConfig
from relay.sinks.wandb import WandbSink
from wandb.analytics.opentelemetry import opentelemetry_proxy

def threads():
    return sorted(t.name for t in threading.enumerate() if t.name == "NetStatThr")

sinks = [WandbSink("quiet-%d" % i, RelayConfig(spool_dir=sys.argv[1]), alone=True) for i in range(2)]
for sink in sinks:
    sink.open({"project": "p"}, "online", lambda: None)
    sink.log({"loss": 0.5}, 0)
open_threads = threads()
checkers = [sink._run._run_status_checker is not None for sink in sinks]
proxy = opentelemetry_proxy.get_open_telemetry_proxy()
for sink in sinks:
    sink.finish(0)
print(json.dumps({"threads": open_threads, "proxy": repr(proxy), "after": threads(),
                  "checkers": checkers}))
"""


def test_runs_have_no_status_checker_thread_and_the_sdk_no_analytics(fake_wandb, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT, env=wandb_env(fake_wandb, str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # Both online runs had a checker, and its thread had ended by the time they logged.
    assert report == {"threads": [], "proxy": "None", "after": [], "checkers": [True, True]}
    for run_id in ("quiet-0", "quiet-1"):
        assert fake_wandb.complete(run_id)
        assert [row["loss"] for row in fake_wandb.run(run_id).history] == [0.5]


CONCURRENT = r"""
import json, os, sys, threading
from relay.config import RelayConfig
from relay.sinks.wandb import SharedCore, WandbSink

core = SharedCore()
core.start()
os.environ["WANDB_SERVICE"] = core.token
config = RelayConfig(spool_dir=sys.argv[1], init_timeout=8)
sinks = [WandbSink("together-%02d" % i, config, alone=False) for i in range(64)]
go = threading.Barrier(len(sinks))
failed = {}

def start(sink):
    go.wait()
    try:
        sink.open({"project": "p"}, "online", lambda: None)
        sink.log({"loss": 0.5}, 0)
        sink.finish(0)
    except Exception as exc:
        failed[sink.run_id] = "%s: %s" % (type(exc).__name__, str(exc)[:200])

threads = [threading.Thread(target=start, args=(sink,)) for sink in sinks]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
core.stop()
print(json.dumps(failed))
"""


def test_runs_started_together_from_many_threads_all_reach_w_and_b(fake_wandb, tmp_path):
    # The SDK loads its settings lazily and without a lock at the first wandb.init: without the
    # relay's wandb.setup() first, some of 64 runs started at once saw the default W&B URL.
    out = subprocess.run([sys.executable, "-c", CONCURRENT, str(tmp_path)], cwd=ROOT,
                         env=wandb_env(fake_wandb, str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
    for i in range(64):
        assert fake_wandb.complete("together-%02d" % i)
        assert [row["loss"] for row in fake_wandb.run("together-%02d" % i).history] == [0.5]
