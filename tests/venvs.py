"""Fixtures for the extra interpreters the suite runs code in: venvs built by scripts/venvs.sh.

scripts/test.sh builds them before pytest starts (once; again only when their recipe changes). A
test that asks for a venv that is not built fails and says how to build it; the Python 3.8 one is
skipped instead only where neither CI is set nor a Python 3.8 exists on the machine.
Each fixture is the absolute path of the venv's `bin/python`; its `bin/` also holds the `relay`
command of that install. The package is installed editable: the venvs run this checkout's code.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from harness import ROOT


def venv_python(name: str) -> str:
    """The interpreter of .venv-NAME, or a test failure saying how to build it."""
    directory = os.path.join(ROOT, ".venv-" + name)
    python = os.path.join(directory, "bin", "python")
    if not (os.path.isfile(os.path.join(directory, ".stamp")) and os.access(python, os.X_OK)):
        pytest.fail("%s is not built: run scripts/venvs.sh %s (scripts/test.sh builds every test venv)"
                    % (directory, name), pytrace=False)
    return python


def python38_found() -> bool:
    """Whether scripts/venvs.sh would find a Python 3.8 here (same places, same order)."""
    candidates = [os.environ.get("RELAY_PYTHON38"), shutil.which("python3.8")]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.join(os.path.expanduser("~"), ".pyenv")
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.8*", "bin", "python3.8")))
    for candidate in filter(None, candidates):
        try:
            if subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 8)"],
                              capture_output=True, timeout=30).returncode == 0:
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="session")
def py38_python() -> str:
    """Python 3.8 (IsaacGym's) with the base install only (`pip install -e .`: pyzmq, msgpack, click)
    and numpy: what a TokenHSI GPU node runs. Skipped only where CI is unset and no Python 3.8 exists."""
    if not os.path.isdir(os.path.join(ROOT, ".venv-py38")) and not os.environ.get("CI") and not python38_found():
        pytest.skip("no Python 3.8 on this machine (python3.8, pyenv's 3.8 or RELAY_PYTHON38); CI has one")
    return venv_python("py38")


@pytest.fixture(scope="session")
def base_python() -> str:
    """Python 3.11 with the base install only (no extras): the `relay` command on a trainer-only install."""
    return venv_python("base")


@pytest.fixture(scope="session")
def rlg114_python() -> str:
    """Python 3.11 with TokenHSI's pinned rl-games 1.1.4 and what its modules import: torch 2.13.0 (CPU),
    numpy<1.24, gym 0.26.2, ray, tensorboard, tensorboardX, pyyaml; and this package without extras
    (the `train` extra would bring rl-games 1.6.5). `from rl_games.torch_runner import Runner` works
    there, and relay.rl_games' observer is a real rl_games AlgoObserver. No wandb, no server extra:
    run the relay with this (pytest's) interpreter, e.g. through relay_factory, and the rl_games
    code in a subprocess of this interpreter, with PYTHONPATH including the checkout if it needs tests/."""
    return venv_python("rlg114")
