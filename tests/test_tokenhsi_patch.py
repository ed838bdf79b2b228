"""`relay tokenhsi patch` on copies of the TokenHSI-shaped run.py (tests/tokenhsi_shaped), as a user
runs it: the real command in a subprocess, the file's bytes compared and hashed."""
from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from harness import ROOT

pytestmark = pytest.mark.timeout(120)

SHAPED = os.path.join(ROOT, "tests", "tokenhsi_shaped")
INSERTED = [
    "    from relay.integrations.tokenhsi import TokenHSIRelay  # tokenhsi-relay\n",
    "    relay_session = TokenHSIRelay(args, cfg, cfg_train)  # tokenhsi-relay\n",
    "    algo_observer = relay_session.observer(algo_observer)  # tokenhsi-relay\n",
    "    relay_session.after_run()  # tokenhsi-relay\n",
]


def patch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "tokenhsi", "patch", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def sha(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture
def checkout(tmp_path):
    """A copy of the TokenHSI-shaped checkout's run.py in tmp_path/tokenhsi/run.py."""
    (tmp_path / "tokenhsi").mkdir()
    shutil.copy(os.path.join(SHAPED, "tokenhsi", "run.py"), tmp_path / "tokenhsi" / "run.py")
    return tmp_path


def test_check_apply_twice_and_revert_give_back_the_original_bytes(checkout):
    run_py = checkout / "tokenhsi" / "run.py"
    original, before = run_py.read_bytes(), sha(run_py)

    checked = patch(str(checkout), "--check")
    assert checked.returncode == 1, checked.stderr
    assert sha(run_py) == before, "--check wrote to the file"
    added = [line[1:] + "\n" for line in checked.stdout.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert added == INSERTED, checked.stdout
    assert not [line for line in checked.stdout.splitlines() if line.startswith("-") and not line.startswith("---")]

    applied = patch(str(checkout))
    assert applied.returncode == 0, applied.stderr
    patched = run_py.read_text()
    assert [line for line in patched.splitlines(True) if line.endswith("# tokenhsi-relay\n")] == INSERTED
    ast.parse(patched)
    lines = patched.splitlines()
    observer_at = lines.index("    algo_observer = RLGPUAlgoObserver()")
    assert lines[observer_at + 1:observer_at + 4] == [line.rstrip("\n") for line in INSERTED[:3]]
    assert lines[lines.index("    runner.run(vargs)") + 1] == INSERTED[3].rstrip("\n")
    assert patched.replace("".join(INSERTED[:3]), "").replace(INSERTED[3], "").encode() == original

    again = patch(str(checkout))
    assert again.returncode == 0 and again.stdout.endswith("already patched: nothing to do\n"), again.stdout
    assert run_py.read_text() == patched
    assert patch(str(checkout), "--check").returncode == 0

    reverted = patch(str(checkout), "--revert")
    assert reverted.returncode == 0 and reverted.stdout.endswith("reverted to the original\n"), reverted.stdout
    assert sha(run_py) == before
    assert patch(str(checkout), "--revert").stdout.endswith("not patched: nothing to revert\n")
    assert sha(run_py) == before


def test_a_fork_calling_wandb_init_and_finish_gets_them_switched_off_and_back(checkout):
    """Forks call wandb.init(..., sync_tensorboard=True) in main() and wandb.finish() at its end;
    CRLF line endings and a multi-line call come back byte for byte."""
    run_py = checkout / "tokenhsi" / "run.py"
    text = run_py.read_text()
    text = text.replace("import os\n", "import os\nimport wandb\n", 1)
    text = text.replace("    algo_observer = RLGPUAlgoObserver()\n",
                        "    if cfg_train.get('use_wandb'):\n"
                        "        run = wandb.init(project='tokenHSI',\n"
                        "                         sync_tensorboard=True)\n"
                        "    algo_observer = RLGPUAlgoObserver()\n", 1)
    text = text.replace("    runner.run(vargs)\n", "    runner.run(vargs)\n    wandb.log({'done': 1})\n    wandb.finish()\n", 1)
    run_py.write_bytes(text.replace("\n", "\r\n").encode())
    before = sha(run_py)

    applied = patch(str(checkout))
    assert applied.returncode == 0, applied.stderr
    init_line = text.splitlines().index("        run = wandb.init(project='tokenHSI',") + 1
    finish_line = text.splitlines().index("    wandb.finish()") + 1
    assert applied.stdout.splitlines()[:3] == [
        "%s: switched off wandb.init(...) at line %d (the relay reports instead)" % (run_py, init_line),
        "%s: switched off wandb.finish(...) at line %d (the relay reports instead)" % (run_py, finish_line),
        "%s: left as it is: wandb.log(...) at line %d; remove it by hand if the relay is to report in its place"
        % (run_py, finish_line - 1)]
    patched = run_py.read_bytes().decode()
    assert "\r\n" in patched and "\n" not in patched.replace("\r\n", "")
    assert ("        run = None  # tokenhsi-relay off:         run = wandb.init(project='tokenHSI',\r\n"
            "        # tokenhsi-relay off:                          sync_tensorboard=True)\r\n") in patched
    assert "    pass  # tokenhsi-relay off:     wandb.finish()\r\n" in patched
    tree = ast.parse(patched)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "wandb"]
    assert [call.func.attr for call in calls] == ["log"]

    assert patch(str(checkout)).stdout.endswith("already patched: nothing to do\n")
    assert patch(str(checkout), "--revert").returncode == 0
    assert sha(run_py) == before


@pytest.mark.parametrize("content, expected", [
    ("print('hello')\n", "has no top-level main()"),
    ("def main():\n    runner.run(vargs)\n", "does not look like TokenHSI's run.py: main() has no "
                                             "`cfg, cfg_train, logdir = load_cfg(args)` and no "
                                             "`algo_observer = RLGPUAlgoObserver()`"),
    ("def main(:\n", "is not valid Python"),
])
def test_a_foreign_file_is_left_unchanged_and_the_error_says_what_was_expected(tmp_path, content, expected):
    (tmp_path / "tokenhsi").mkdir()
    run_py = tmp_path / "tokenhsi" / "run.py"
    run_py.write_text(content)
    result = patch(str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert expected in result.stderr and result.stderr.rstrip().endswith("Nothing changed."), result.stderr
    assert "expected a TokenHSI tokenhsi/run.py" in result.stderr
    assert run_py.read_text() == content and os.listdir(tmp_path / "tokenhsi") == ["run.py"]


def test_a_directory_without_run_py_is_named(tmp_path):
    result = patch(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == ("relay tokenhsi patch: %s has no tokenhsi/run.py: give the root of a TokenHSI "
                             "checkout (or its run.py)\n" % tmp_path)
