"""`relay demo` (what `scripts/demo.sh` runs after setting up .venv) as a user runs it: a real
subprocess that starts a relay, trains a demo client through it and stops it; the offline W&B run
it names exists and holds the run's data."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from harness import ROOT, wandb_env

pytestmark = pytest.mark.timeout(240)


def test_demo_runs_a_client_through_a_relay_and_names_the_offline_run(tmp_path):
    env = wandb_env(None, str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "relay", "demo", "--dir", str(tmp_path / "demo"), "--steps", "30"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo: relay exited with code 0" in result.stdout, result.stdout
    named = re.search(r"demo: the offline W&B run is in (\S+)", result.stdout)
    assert named, result.stdout
    run_dir = named.group(1)
    assert run_dir.startswith(str(tmp_path / "demo" / "spool" / "wandb" / "offline-run-")), run_dir
    assert "    wandb sync %s\n" % run_dir in result.stdout
    assert len(glob.glob(os.path.join(run_dir, "run-*.wandb"))) == 1, os.listdir(run_dir)
    assert "left_in_spool=0 unsent=0 unconfirmed=0" in result.stderr
