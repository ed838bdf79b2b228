"""The relay's shape: wandb is one adapter. No module outside relay/sinks/ imports wandb."""
from __future__ import annotations

import ast
import glob
import os

import pytest

from harness import ROOT

pytestmark = pytest.mark.timeout(30)


def wandb_imports(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "wandb" or name.startswith("wandb.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_the_sinks_import_wandb():
    files = glob.glob(os.path.join(ROOT, "relay", "**", "*.py"), recursive=True)
    assert os.path.join(ROOT, "relay", "sinks", "wandb.py") in files
    outside = {os.path.relpath(path, ROOT): lines for path in files
               if os.path.relpath(path, ROOT).split(os.sep)[:2] != ["relay", "sinks"]
               and (lines := wandb_imports(path))}
    assert outside == {}, "only relay/sinks/ may import wandb: %s" % outside
    assert wandb_imports(os.path.join(ROOT, "relay", "sinks", "wandb.py")), "the checker finds no import at all"
