"""Which checkpoint files the relay may read: regular files inside a configured artifact root.

A client names a path; the relay resolves it on its own filesystem (symlinks and `..` included)
and refuses anything outside the roots, anything that is not a regular file, and anything over
the size limit. A client must not be able to make the relay upload ~/.netrc.
"""
from __future__ import annotations

import os
import stat


class RefusedPath(ValueError):
    pass


def resolve_checkpoint(path: str, roots: list[str], max_bytes: int) -> str:
    """Return the real path of an allowed checkpoint file, or raise RefusedPath saying why."""
    if not roots:
        raise RefusedPath("checkpoint %s refused: the relay has no --artifact-root configured "
                          "(start it with --artifact-root DIR for the directory holding checkpoints)" % path)
    if not os.path.isabs(path):
        raise RefusedPath("checkpoint path %s refused: it must be absolute" % path)
    real = os.path.realpath(path)
    real_roots = [os.path.realpath(root) for root in roots]
    if not any(os.path.commonpath([real, root]) == root for root in real_roots):
        raise RefusedPath("checkpoint %s refused: it resolves to %s, outside every artifact root (%s)"
                          % (path, real, ", ".join(real_roots)))
    try:
        info = os.stat(real)
    except OSError as exc:
        raise RefusedPath("checkpoint %s refused: %s" % (path, exc.strerror)) from exc
    if not stat.S_ISREG(info.st_mode):
        raise RefusedPath("checkpoint %s refused: not a regular file" % path)
    if info.st_size > max_bytes:
        raise RefusedPath("checkpoint %s refused: %d bytes is over the %d-byte limit (max_artifact_bytes)"
                          % (path, info.st_size, max_bytes))
    return real
