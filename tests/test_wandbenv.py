"""`relay serve` refuses a WANDB_* environment the wandb SDK would refuse in every uploader."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness import ROOT, wandb_env
from relay.wandbenv import problem

pytestmark = pytest.mark.timeout(120)

BAD = [("WANDB_MODE", ""), ("WANDB_MODE", "sometimes"), ("WANDB_BASE_URL", "not a url"), ("WANDB_BASE_URL", ""),
       ("WANDB_BASE_URL", "ftp://api.wandb.ai"), ("WANDB_CONSOLE", "loud"), ("WANDB_RESUME", "maybe"),
       ("WANDB_SILENT", "maybe"), ("WANDB_API_KEY", " key-with-a-space")]
GOOD = [("WANDB_MODE", "offline"), ("WANDB_MODE", "online"), ("WANDB_MODE", "disabled"),
        ("WANDB_BASE_URL", "http://127.0.0.1:8080"), ("WANDB_BASE_URL", "https://api.wandb.ai/"),
        ("WANDB_CONSOLE", "off"), ("WANDB_RESUME", "allow"), ("WANDB_SILENT", "TRUE"), ("WANDB_API_KEY", "k" * 40)]


@pytest.mark.parametrize("name, value", BAD + GOOD)
def test_the_check_refuses_what_the_wandb_sdk_refuses(name, value):
    from wandb.sdk.wandb_settings import Settings

    try:
        Settings().update_from_env_vars({name: value})
        sdk_refuses = False
    except Exception:
        sdk_refuses = True
    assert sdk_refuses == ((name, value) in BAD)
    said = problem({name: value})
    assert (said is not None) == sdk_refuses, said
    if said:
        assert name in said and "\n" not in said


@pytest.mark.parametrize("name, value, allowed", [
    ("WANDB_MODE", "", "online, offline, disabled"), ("WANDB_MODE", "sometimes", "online, offline, disabled"),
    ("WANDB_BASE_URL", "api.wandb.ai", "http(s)://HOST"),
])
def test_relay_serve_refuses_a_bad_wandb_environment_in_one_line(tmp_path, name, value, allowed):
    env = wandb_env(None, str(tmp_path / "home"))
    env.update({name: value, "PYTHONPATH": ROOT})
    served = subprocess.run([sys.executable, "-m", "relay", "serve", "--bind", "ipc://%s/r.ipc" % tmp_path,
                             "--spool-dir", str(tmp_path / "spool"), "--mode", "offline"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 2, served.stderr
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and allowed in lines[0] and repr(value) in lines[0], served.stderr
    assert not (tmp_path / "spool").exists()  # refused before anything was started or made
