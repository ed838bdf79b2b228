"""The package's shape: one exception tree, no import circles, each module on its side, wandb imported
by the W&B sink alone."""
from __future__ import annotations

import ast
import glob
import importlib
import inspect
import os

import pytest

from harness import ROOT
from relay.errors import RelayError

pytestmark = pytest.mark.timeout(120)

MODULES = sorted(
    os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").replace(".__init__", "")
    for path in glob.glob(os.path.join(ROOT, "relay", "**", "*.py"), recursive=True))


def test_every_exception_class_in_relay_derives_from_relay_error():
    outside = []
    for name in MODULES:
        if name == "relay.__main__":
            continue
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == name and issubclass(value, BaseException) and not issubclass(value, RelayError):
                outside.append("%s.%s" % (name, value.__qualname__))
    assert outside == [], "exception classes outside the tree of relay/errors.py: %s" % outside


def test_public_exception_import_paths_still_work():
    from relay.cli import MissingExtra
    from relay.client import ForkedRunError
    from relay.config import ConfigError
    from relay.integrations.tokenhsi_patch import PatchError
    from relay.keys import CurveKeyError
    from relay.protocol import ProtocolError
    from relay.snapshots import SnapshotError
    from relay.spool import SpoolError

    assert issubclass(ForkedRunError, RuntimeError) and issubclass(CurveKeyError, ValueError)
    assert issubclass(ProtocolError, ValueError) and issubclass(ConfigError, ValueError)
    assert all(issubclass(error, RelayError) for error in (MissingExtra, PatchError, SnapshotError, SpoolError))


def module_source(module: str) -> tuple[str, str]:
    """(path, source) of a relay module (a package's __init__.py for a package)."""
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    if not os.path.isfile(path):
        path = os.path.join(ROOT, *module.split("."), "__init__.py")
    with open(path, encoding="utf-8") as handle:
        return path, handle.read()


def module_tree(module: str) -> ast.Module:
    """The parsed source of a relay module."""
    path, source = module_source(module)
    return ast.parse(source, path)


def imports_of(module: str) -> set:
    """The relay modules `module` imports: its import statements anywhere in the file (those in
    functions too, but not those under `if TYPE_CHECKING:`), and the names it hands to
    importlib.import_module or relay.cli's relay_side()."""
    tree = module_tree(module)
    found = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update("%s.%s" % (node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "relay_side"):
                found.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
        todo.extend(ast.iter_child_nodes(node))
    return {name for name in found if name in MODULES and name != module}


def test_no_import_circles_in_relay():
    graph = {module: imports_of(module) for module in MODULES}
    circles = []
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                circles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert circles == [], "import circles:\n" + "\n".join(circles)


def test_only_the_sinks_import_wandb():
    """wandb is one adapter: relay/sinks/ holds every call into the SDK (wandb.py, and its siblings
    for what it logs: wandb_media.py)."""
    importing = sorted(module for module in MODULES
                       if any(name == "wandb" or name.startswith("wandb.") for name in wandb_imports_of(module)))
    assert "relay.sinks.wandb" in importing
    assert all(module.startswith("relay.sinks.") for module in importing), \
        "only relay/sinks/ may import wandb: %s" % importing


def wandb_imports_of(module: str) -> set:
    """The modules `module` imports by name (import statements anywhere in the file)."""
    tree = module_tree(module)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MAX_METHODS, MAX_CLASS_LINES, MAX_MODULE_LINES = 15, 210, 400


def test_no_class_or_module_in_relay_is_over_the_size_limits():
    """Each class one concern (at most MAX_METHODS methods and MAX_CLASS_LINES lines, nested classes
    counted on their own), each module at most MAX_MODULE_LINES lines: a part that outgrows them is
    split by what it does, not assembled from mixins."""
    over = []
    for name in MODULES:
        path, source = module_source(name)
        tree = ast.parse(source, path)
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            over.append("%s: %d lines" % (name, lines))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            methods = [item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
            length = node.end_lineno - node.lineno + 1
            if len(methods) > MAX_METHODS or length > MAX_CLASS_LINES:
                over.append("%s.%s: %d methods, %d lines" % (name, node.name, len(methods), length))
    assert over == [], "over the limits (%d methods, %d lines a class, %d lines a module):\n%s" % (
        MAX_METHODS, MAX_CLASS_LINES, MAX_MODULE_LINES, "\n".join(over))
