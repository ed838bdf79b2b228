"""`relay tokenhsi patch`: make a TokenHSI checkout's `tokenhsi/run.py` report through the relay.

The edit is made of lines, each marked, so that it can be recognised, repeated without change and
taken back to the exact bytes it started from:

- after `algo_observer = RLGPUAlgoObserver()` in `main()`, three lines ending in `# tokenhsi-relay`
  build a `TokenHSIRelay` from the names `load_cfg` returned and put the relay's observer first;
- after `runner.run(...)`, one such line reports `--test --eval` results;
- each `wandb.init(...)`/`wandb.finish(...)` statement (forks call them with `sync_tensorboard=True`)
  is switched off: its first line becomes `pass  # tokenhsi-relay off: <the line as it was>` (or
  `<target> = None  # ...` for an assignment) and its other lines `# tokenhsi-relay off: <line>`.

Reverting removes the marked lines and restores the switched-off ones; a file with no marks is
left as it is. A file that does not have TokenHSI's run.py shape is not changed, and the error
says what was expected. Standard library only (Python 3.8).
"""
from __future__ import annotations

import ast
import difflib
import os
import re
from typing import List, Optional, Tuple  # noqa: F401 (in type comments)

from relay import durable
from relay.errors import PatchError  # noqa: F401 (part of this module's API)

MARK = "  # tokenhsi-relay"
OFF = "# tokenhsi-relay off: "
RUN_PY = os.path.join("tokenhsi", "run.py")
SHAPE = ("a TokenHSI tokenhsi/run.py: a main() with `cfg, cfg_train, logdir = load_cfg(args)`, "
         "`algo_observer = RLGPUAlgoObserver()` and `runner.run(vargs)`")


def locate(path):
    # type: (str) -> str
    """The run.py of a checkout: PATH/tokenhsi/run.py, or PATH itself when it is a file."""
    if os.path.isdir(path):
        candidate = os.path.join(path, RUN_PY)
        if not os.path.isfile(candidate):
            raise PatchError("%s has no %s: give the root of a TokenHSI checkout (or its run.py)" % (path, RUN_PY))
        return candidate
    if not os.path.isfile(path):
        raise PatchError("%s does not exist: give the root of a TokenHSI checkout (or its run.py)" % path)
    return path


def revert(text):
    # type: (str) -> str
    """`text` without the patch (unchanged when it holds none)."""
    out = []
    for line in text.splitlines(True):
        body = line.rstrip("\r\n")
        if body.endswith(MARK):
            continue
        index = body.find(OFF)
        if index >= 0 and _is_off_line(body[:index]):
            out.append(body[index + len(OFF):] + line[len(body):])
            continue
        out.append(line)
    return "".join(out)


def _is_off_line(prefix):
    # type: (str) -> bool
    """What precedes the OFF mark on a line the patch wrote: indentation, then nothing, `pass  `
    or `<target> = None  `."""
    rest = prefix.strip()
    return rest == "" or rest == "pass" or re.match(r"^[\w.\[\]'\", ()]+= None$", rest) is not None


def apply(text, where="run.py"):
    # type: (str, str) -> Tuple[str, List[str]]
    """(the patched text, notes for the user) for the original or already patched `text`."""
    original = revert(text)
    try:
        tree = ast.parse(original)
    except SyntaxError as exc:
        raise PatchError("%s is not valid Python (%s); expected %s. Nothing changed." % (where, exc, SHAPE))
    main = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"), None)
    if main is None:
        raise PatchError("%s has no top-level main(); expected %s. Nothing changed." % (where, SHAPE))
    names = _load_cfg_names(main)
    observer_line = _statement_line(main, _is_observer_assignment)
    run_line = _statement_line(main, _is_runner_run)
    missing = [what for what, found in (("`cfg, cfg_train, logdir = load_cfg(args)`", names),
                                        ("`algo_observer = RLGPUAlgoObserver()`", observer_line),
                                        ("`runner.run(vargs)`", run_line)) if not found]
    if missing:
        raise PatchError("%s does not look like TokenHSI's run.py: main() has no %s; expected %s. Nothing changed."
                         % (where, " and no ".join(missing), SHAPE))
    args_name, cfg_name, cfg_train_name = names  # type: ignore[misc]
    lines = original.splitlines(True)
    newline = _newline(lines)
    notes = []
    off = {}  # line number (1-based) -> replacement
    for statement, call in _wandb_statements(tree):
        first, last = statement.lineno, statement.end_lineno
        for number in range(first, last + 1):
            line = lines[number - 1]
            body = line.rstrip("\r\n")
            indent = body[:len(body) - len(body.lstrip())]
            if number == first:
                keep = "pass"
                if isinstance(statement, ast.Assign):
                    keep = "%s = None" % " = ".join(ast.get_source_segment(original, t) or "_" for t in statement.targets)
                off[number] = indent + keep + "  " + OFF + body + line[len(body):]
            else:
                off[number] = _indent_of(lines[first - 1]) + OFF + body + line[len(body):]
        notes.append("switched off wandb.%s(...) at line %d (the relay reports instead)" % (call, first))
    for number, call in _other_wandb_calls(tree):
        notes.append("left as it is: wandb.%s(...) at line %d; remove it by hand if the relay is to report "
                     "in its place" % (call, number))
    out = []
    for number, line in enumerate(lines, 1):
        out.append(off.get(number, line))
        indent = _indent_of(line)
        if number == observer_line:
            out.append("%sfrom relay.integrations.tokenhsi import TokenHSIRelay%s%s" % (indent, MARK, newline))
            out.append("%srelay_session = TokenHSIRelay(%s, %s, %s)%s%s"
                       % (indent, args_name, cfg_name, cfg_train_name, MARK, newline))
            out.append("%salgo_observer = relay_session.observer(algo_observer)%s%s" % (indent, MARK, newline))
        elif number == run_line:
            out.append("%srelay_session.after_run()%s%s" % (indent, MARK, newline))
    return "".join(out), notes


def _newline(lines):
    # type: (List[str]) -> str
    for line in lines:
        if line.endswith("\r\n"):
            return "\r\n"
        if line.endswith("\n"):
            return "\n"
    return "\n"


def _indent_of(line):
    # type: (str) -> str
    return line[:len(line) - len(line.lstrip(" \t"))]


def _load_cfg_names(main):
    # type: (ast.FunctionDef) -> Optional[Tuple[str, str, str]]
    """(args, cfg, cfg_train) from `cfg, cfg_train, logdir = load_cfg(args)` in main()."""
    for node in main.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Tuple)
                and isinstance(node.value, ast.Call) and _call_name(node.value) == "load_cfg"
                and len(node.value.args) == 1 and isinstance(node.value.args[0], ast.Name)):
            targets = node.targets[0].elts
            if len(targets) >= 2 and all(isinstance(t, ast.Name) for t in targets[:2]):
                return node.value.args[0].id, targets[0].id, targets[1].id  # type: ignore[attr-defined]
    return None


def _statement_line(main, test):
    # type: (ast.FunctionDef, object) -> Optional[int]
    """The last line of the first top-level statement of main() that passes `test`."""
    for node in main.body:
        if test(node):  # type: ignore[operator]
            return node.end_lineno
    return None


def _is_observer_assignment(node):
    # type: (ast.stmt) -> bool
    return (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "algo_observer" and isinstance(node.value, ast.Call)
            and _call_name(node.value) == "RLGPUAlgoObserver")


def _is_runner_run(node):
    # type: (ast.stmt) -> bool
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "run"
            and isinstance(node.value.func.value, ast.Name) and node.value.func.value.id == "runner")


def _call_name(call):
    # type: (ast.Call) -> Optional[str]
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _wandb_call(node):
    # type: (ast.AST) -> Optional[str]
    """'init' or 'finish' for a call `wandb.init(...)`/`wandb.finish(...)`, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "wandb"
            and node.func.attr in ("init", "finish")):
        return node.func.attr
    return None


def _wandb_statements(tree):
    # type: (ast.Module) -> List[Tuple[ast.stmt, str]]
    """Statements that are a wandb.init/finish call, or assign one to simple targets."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and _wandb_call(node.value):
            found.append((node, _wandb_call(node.value)))
        elif isinstance(node, ast.Assign) and _wandb_call(node.value):
            found.append((node, _wandb_call(node.value)))
    return sorted(found, key=lambda item: item[0].lineno)  # type: ignore[arg-type,return-value]


def _other_wandb_calls(tree):
    # type: (ast.Module) -> List[Tuple[int, str]]
    """Other wandb.<name>(...) calls (wandb.log, wandb.config.update, ...), by line."""
    handled = {id(statement.value) for statement, _ in _wandb_statements(tree)}  # type: ignore[attr-defined]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in handled:
            continue
        func, parts = node.func, []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if isinstance(func, ast.Name) and func.id == "wandb" and parts:
            found.append((node.lineno, ".".join(reversed(parts))))
    return sorted(found)


def diff(before, after, path):
    # type: (str, str, str) -> str
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        "a/" + path.lstrip("/"), "b/" + path.lstrip("/")))


def write_atomically(path, text):
    # type: (str, str) -> None
    """Replace `path` by `text` (UTF-8, same mode), durably (relay.durable)."""
    durable.write_text(path, text, mode=os.stat(path).st_mode & 0o7777, prefix=".run.py.")
