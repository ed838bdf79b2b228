"""Atomic rl_games checkpoint saves.

Checkpoints: the wrapped `algo.save(fn, ...)` calls the agent's own `save` with a temporary name in
the same directory (`.<name>.relay-tmp-<pid>-<hex>`), so `torch_ext.save_checkpoint` writes
`<tmp>.pth`; each file the save produced (`<tmp>` + suffix, normally `.pth`) is fsynced and
`os.replace`d onto `fn` + suffix, the directory is fsynced, the current row is sent, and each
final file is reported with `run.log_checkpoint(path, metadata={"epoch": E, "frame": F},
aliases=["latest"])`, where (F, E) are the frame and epoch of the epoch's row (rl_games and
TokenHSI add the epoch's frames to `algo.frame` before they save; `algo.frame`/`algo.epoch_num`
only when no row was logged yet), so the checkpoint sits on the chart where its row is. A reader
therefore never sees a half-written `fn.pth`, and the relay never uploads one. If the save raises,
the temporary files are removed and the exception propagates. A process killed inside `save` can
leave a `.<name>.relay-tmp-*` file behind; the previous `fn.pth` is untouched.

`atomic_save` does the saving part; the observer (relay.integrations.rl_games) sends the row and
reports the files. Standard library only (Python 3.8).
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any, Callable, List, Tuple

from relay import durable


def atomic_save(save: Callable[..., Any], fn: Any, *args: Any, **kwargs: Any) -> Tuple[Any, List[str]]:
    """Call the agent's `save(tmp, *args, **kwargs)` with a temporary name beside `fn`, then move
    each file it produced onto `fn` + its suffix, durably (relay.durable). Returns what `save`
    returned and the final paths (what a save that ignored the name wrote, when it can be told)."""
    target = os.fspath(fn)
    directory, base = os.path.split(target)
    tmp_base = ".%s.relay-tmp-%d-%s" % (base[:80], os.getpid(), uuid.uuid4().hex[:8])
    tmp = os.path.join(directory, tmp_base)
    started = time.time()
    stdout = sys.stdout
    sys.stdout = _Renaming(stdout, tmp, target)  # "=> saving checkpoint '<target>.pth'" on the console
    try:
        result = save(tmp, *args, **kwargs)
    except BaseException:
        for name in _produced(directory, tmp_base):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        raise
    finally:
        if isinstance(sys.stdout, _Renaming) and sys.stdout.stream is stdout:
            sys.stdout = stdout
    finals = []
    for name in _produced(directory, tmp_base):
        final = target + name[len(tmp_base):]
        durable.replace(os.path.join(directory, name), final, sync_dir=False)
        finals.append(final)
    if finals:
        durable.fsync_dir(directory)
    else:  # a save that ignored the name it was given: report what it wrote, if we can tell
        finals = [p for p in (target + ".pth", target)
                  if os.path.isfile(p) and os.path.getmtime(p) >= started - 1.0][:1]
    return result, finals


class _Renaming(object):
    """A text stream that writes to `stream` with `old` replaced by `new` (the temporary checkpoint
    name by the final one, while the agent's own save prints what it writes)."""

    def __init__(self, stream, old, new):
        # type: (Any, str, str) -> None
        self.stream = stream
        self._old = old
        self._new = new

    def write(self, text):
        # type: (str) -> int
        if isinstance(text, str):
            text = text.replace(self._old, self._new)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _produced(directory: str, prefix: str) -> List[str]:
    try:
        return sorted(name for name in os.listdir(directory or ".") if name.startswith(prefix))
    except OSError:
        return []
