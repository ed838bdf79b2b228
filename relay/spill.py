"""The trainer side's spill files, and how the client says what went wrong.

A spill file holds records the relay has not acked, as they would have been sent (one msgpack bin
per frame, in seq order); `relay replay FILE...` delivers them later, checkpoints included. A file
is written durably (temp file -> fsync -> rename -> fsync the directory) or not at all: a spill
that fails (disk full, no permission) leaves no file behind, is said (rate-limited) and counted by
the caller, and the records stay where they were. File names sort in the order they were written,
so `relay replay DIR/*` keeps each run's order: the time in them never goes back within a client,
even when the wall clock is set back.

Reporter keeps the last few errors (statistics()'s `last_error`) and logs warnings, at most one of
a kind per `warn_every` seconds unless forced; they reach the terminal but not a run's captured
console (relay.console).

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Dict, List, Optional

import msgpack

from relay import durable
from relay.console_lines import quiet

log = logging.getLogger("relay.client")

SPILL_FIX = "free space there, or point RELAY_SPILL_DIR or the client's spill_dir at a directory with room"


def default_spill_dir() -> str:
    explicit = os.environ.get("RELAY_SPILL_DIR")
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "tokenhsi-relay", "spill")


class Reporter:
    """The client's errors (the last 20) and its rate-limited warnings; safe from any thread."""

    def __init__(self, warn_every: float = 30.0):
        self.warn_every = warn_every
        self.errors = []               # type: List[str]
        self._warned_at = {}           # type: Dict[str, float]
        self._lock = threading.Lock()

    def error(self, text: str) -> None:
        with self._lock:
            self.errors = (self.errors + [text])[-20:]
        self.warn("error", text)

    def note(self, text: str) -> None:
        """Keep `text` as the last error without logging it (the caller logs it its own way)."""
        with self._lock:
            self.errors = (self.errors + [text])[-20:]

    def last(self) -> Optional[str]:
        errors = self.errors
        return errors[-1] if errors else None

    def due(self, kind: str) -> bool:
        return time.monotonic() - self._warned_at.get(kind, -1e9) >= self.warn_every

    def warn(self, kind: str, text: str, force: bool = False) -> None:
        if force or self.due(kind):
            self._warned_at[kind] = time.monotonic()
            with quiet():  # to the terminal, not into a captured console (relay.console)
                log.warning(text)


class Spiller:
    """Writes records into new spill files in one directory; remembers the files it wrote."""

    def __init__(self, directory: str, reporter: Reporter):
        self.directory = directory
        self.report = reporter
        self.files = []                # type: List[str]
        self.last_error = ""           # why the last spill failed
        self._stamp = 0                # the time in the last file's name, in microseconds (never goes back)

    def __call__(self, stream: str, frames: "Dict[int, bytes]") -> Optional[str]:
        """Write `frames` (seq -> frame, in seq order) to a new file; its path, or None if it failed."""
        first, last = next(iter(frames)), next(reversed(frames))
        self._stamp = max(int(time.time() * 1e6), self._stamp + 1)
        name = "relay-spill-%s-%06d-%s-%d-%d.msgpack" % (
            time.strftime("%Y%m%dT%H%M%S", time.localtime(self._stamp // 1000000)),
            self._stamp % 1000000, stream[:12], first, last)
        path = os.path.join(self.directory, name)
        try:
            self._write(path, frames.values())
        except OSError as exc:
            code = " (%s)" % errno.errorcode[exc.errno] if exc.errno in errno.errorcode else ""
            self.last_error = "cannot write spill file in %s: %s%s" % (self.directory, exc, code)
            self.report.error("%s; %d records kept in memory (%s)" % (self.last_error, len(frames), SPILL_FIX))
            return None
        self.files.append(path)
        self.report.warn("spill", "%d records spilled to %s; deliver them with: relay replay %s (with the relay's "
                         "--config or --artifact-root, so that its checkpoints are taken too)"
                         % (len(frames), path, path), force=True)
        return path

    def _write(self, path: str, frames) -> None:
        """A durable write (relay.durable); on failure nothing is left on disk."""
        packer = msgpack.Packer(use_bin_type=True)
        try:
            os.makedirs(self.directory, exist_ok=True)
            durable.write_bytes(path, (packer.pack(frame) for frame in frames), prefix=".spill-")
        except OSError:
            try:
                os.unlink(path)  # renamed into place, but its directory could not be synced
            except OSError:
                pass
            raise
