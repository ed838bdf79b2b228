"""Which checkpoint and media files the relay may read: regular files inside a configured artifact root.

A client names a path; the relay resolves it on its own filesystem (symlinks and `..` included)
and refuses anything outside the roots, anything that is not a regular file, and anything over
the size limit. A client must not be able to make the relay upload ~/.netrc.

The relay checks the path when the record arrives (`resolve_checkpoint`, and refuses the
record), then opens it to take its snapshot (`open_checkpoint`, relay/snapshots.py): the file is
opened (never following a final symlink, never blocking on a FIFO) and what was actually opened is
checked against the same rules, so a directory swapped for a symlink in between gains nothing;
the snapshot is linked or copied from that open file. The uploader reads only the snapshot.
"""
from __future__ import annotations

import os
import stat

from relay.errors import RelayError


class RefusedPath(RelayError, ValueError):
    """A checkpoint or media path the relay may not read; the message says why."""


def resolve_checkpoint(path: str, roots: list[str], max_bytes: int, what: str = "checkpoint",
                       limit: str = "max_artifact_bytes") -> str:
    """Return the real path of an allowed checkpoint file, or raise RefusedPath saying why. Media
    files are checked the same way: `what` and `limit` name the file and its size limit."""
    if not roots:
        raise RefusedPath("%s %s refused: no artifact root is configured (give `relay serve` and "
                          "`relay replay` the directory holding checkpoints and media: --artifact-root DIR, "
                          "RELAY_ARTIFACT_ROOTS=DIR or artifact_roots in the --config file)" % (what, path))
    if not os.path.isabs(path):
        raise RefusedPath("%s path %s refused: it must be absolute" % (what, path))
    real = os.path.realpath(path)
    _check_inside(path, real, roots, what)
    try:
        info = os.stat(real)
    except OSError as exc:
        raise RefusedPath("%s %s refused: %s" % (what, path, exc.strerror)) from exc
    _check_file(path, info, max_bytes, what, limit)
    return real


def open_checkpoint(path: str, roots: list[str], max_bytes: int, what: str = "checkpoint",
                    limit: str = "max_artifact_bytes") -> int:
    """Open an allowed checkpoint for reading; returns a file descriptor the caller closes.

    Read the file through "/proc/self/fd/<fd>", the file that was checked, not by its name again.
    """
    real = resolve_checkpoint(path, roots, max_bytes, what, limit)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RefusedPath("%s %s refused: %s" % (what, path, exc.strerror)) from exc
    try:
        _check_file(path, os.fstat(fd), max_bytes, what, limit)
        _check_inside(path, _opened_name(path, fd), roots, what)
    except RefusedPath:
        os.close(fd)
        raise
    return fd


def _opened_name(path: str, fd: int) -> str:
    """The kernel's name for the file behind `fd` (Linux /proc)."""
    try:
        return os.readlink("/proc/self/fd/%d" % fd)
    except OSError as exc:
        raise RefusedPath("file %s refused: cannot tell which file was opened (%s; the relay needs "
                          "Linux /proc)" % (path, exc.strerror)) from exc


def _check_inside(path: str, real: str, roots: list[str], what: str) -> None:
    real_roots = [os.path.realpath(root) for root in roots]
    if not any(os.path.commonpath([real, root]) == root for root in real_roots):
        raise RefusedPath("%s %s refused: it resolves to %s, outside every artifact root (%s)"
                          % (what, path, real, ", ".join(real_roots)))


def _check_file(path: str, info: os.stat_result, max_bytes: int, what: str, limit: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise RefusedPath("%s %s refused: not a regular file" % (what, path))
    if info.st_size > max_bytes:
        raise RefusedPath("%s %s refused: %d bytes is over the %d-byte limit (%s)"
                          % (what, path, info.st_size, max_bytes, limit))
