"""The rl-games 1.1.4 venv (TokenHSI's pin): what TokenHSI imports from rl_games imports there."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness import ROOT

pytestmark = pytest.mark.timeout(120)

IMPORTS = """
import json, importlib.metadata as metadata
import rl_games
from rl_games.torch_runner import Runner
from rl_games.algos_torch import a2c_continuous, players
from rl_games.common import a2c_common, vecenv, env_configurations
from rl_games.common.algo_observer import AlgoObserver
import torch
import relay
from relay.rl_games import RelayAlgoObserver
print(json.dumps({name: metadata.version(name) for name in ("rl-games", "torch", "numpy", "gym", "tokenhsi-relay")}
                 | {"observer": issubclass(RelayAlgoObserver, AlgoObserver), "relay": relay.__file__,
                    "cuda_build": torch.version.cuda}))
"""


def test_tokenhsi_rl_games_imports_with_torch_2_13(rlg114_python):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([rlg114_python, "-W", "ignore", "-c", IMPORTS], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    assert got["rl-games"] == "1.1.4" and got["torch"].startswith("2.13.0") and got["gym"] == "0.26.2"
    assert tuple(int(part) for part in got["numpy"].split(".")[:2]) < (1, 24)
    assert got["cuda_build"] is None, "a CUDA build of torch: pin the CPU wheel (torch==2.13.0)"
    assert got["observer"] is True, "relay.rl_games must subclass rl_games' AlgoObserver where rl_games imports"
    assert got["relay"] == os.path.join(ROOT, "relay", "__init__.py")
