"""Durable file writes: a file is replaced whole or not at all, and survives a crash once written.

Every file this package writes for someone else to read later (spill files, key files, a patched
run.py, checkpoints renamed into place) goes the same way:

    temp file in the target's directory -> write -> fsync -> chmod -> rename over the target
    -> fsync the directory

A reader sees the old file or the new one, never a half-written one. If anything fails before the
rename, the temp file is removed and the old file (if any) is left as it was; the error propagates.

Trainer side: standard library only, Python 3.8.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Optional, Union

Data = Union[bytes, Iterable[bytes]]


def fsync_path(path: str) -> None:
    """fsync a file (or a directory) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """fsync a directory, so that the renames and new entries in it survive a crash."""
    fsync_path(directory or ".")


def replace(source: str, target: str, sync_dir: bool = True) -> None:
    """Move a finished file over `target` durably: fsync it, rename it, fsync the target's directory
    (skip that with `sync_dir=False` when several files are moved into one directory: fsync it once
    after the last one)."""
    fsync_path(source)
    os.replace(source, target)
    if sync_dir:
        fsync_dir(os.path.dirname(target))


def write_bytes(path: str, data: Data, mode: int = 0o600, prefix: Optional[str] = None) -> None:
    """Replace `path` by `data` (bytes, or an iterable of byte chunks written in turn) with
    permissions `mode`, durably (see the module docstring). The temp file is `<prefix>XXXXXXXX` in
    the same directory (default prefix: `.<name>.`)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix or ".%s." % os.path.basename(path)[:64], dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                for chunk in data:
                    handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def write_text(path: str, text: str, mode: int = 0o600, encoding: str = "utf-8", prefix: Optional[str] = None) -> None:
    """write_bytes for text: `text` encoded as it is (no newline translation)."""
    write_bytes(path, text.encode(encoding), mode, prefix)
