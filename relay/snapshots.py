"""Checkpoint snapshots: a checkpoint is uploaded as it was when the relay took its record.

A checkpoint record names a file that the trainer rewrites at its next save (TokenHSI rewrites
`nn/Humanoid.pth` every time) or deletes, and its upload may come hours later (a W&B outage). So
before the relay acks the record it takes a snapshot of the file into `<spool>/snapshots/`, under a
name made of the record's stream and seq, and the uploader reads the snapshot, never the path:

- **link**: when the spool is on the checkpoint's filesystem, a hard link to the very file the relay
  opened and checked (`open_checkpoint`, through `/proc/self/fd`): no bytes copied. A writer that
  replaces the file (a temp file renamed over it, as rl_games' saves through our observer and
  TokenHSI's do) leaves the linked file as it was. One that rewrites the file in place changes the
  snapshot too: a hard link is no snapshot for such a writer.
- **copy**: on another filesystem (or where the kernel refuses the link, `fs.protected_hardlinks`
  for a file the relay does not own), a copy of the opened file, refused if the file changed while
  it was copied. A copy costs time and disk: the server makes it off its intake thread (the
  record is acked once the copy is durable) and counts it against `max_spool_bytes`.

If the trainer sent what it saw when it logged the checkpoint (`stat`: size and mtime), a file
that has changed since then (rewritten while the record waited in the client for a relay that was
down) is refused rather than uploaded under the wrong metadata.

Invariants:
- A checkpoint record in the spool has its snapshot, durable before the ack: the link or copy is
  fsynced under a temporary name, renamed to its final name, and the directory fsynced.
- A snapshot lives as long as its record: the spool deletes it with the record (when W&B confirmed
  the artifact, or the run's finish); what a crash left behind is swept at the relay's start.
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import stat
import threading
from dataclasses import dataclass
from typing import Any

from relay.artifacts import RefusedPath, open_checkpoint
from relay.errors import RelayError

DIRECTORY = "snapshots"
PARTIAL = ".partial"
LINK_REFUSED = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK)  # take a copy instead
COPY_CHUNK = 1 << 30


class SnapshotError(RelayError, RuntimeError):
    """The relay could not take a snapshot for a reason of its own (its disk): not the trainer's
    fault, so the record is not refused but left unacked; the client sends it again."""


def name(stream: str, seq: int) -> str:
    """The snapshot's file name for record (stream, seq): stream ids are any printable text."""
    return "%s-%d" % (hashlib.sha256(stream.encode()).hexdigest()[:32], seq)


def directory(spool_dir: str) -> str:
    return os.path.join(spool_dir, DIRECTORY)


@dataclass
class Opened:
    """A checked checkpoint, open, that could not be linked: the caller copies it (copy_file)."""
    message: dict
    fd: int
    size: int
    mtime_ns: int

    def close(self) -> None:
        os.close(self.fd)


class SnapshotDir:
    """The snapshot directory of one spool, for the server and `relay replay`."""

    def __init__(self, spool_dir: str, roots: list[str], max_bytes: int, max_copy_bytes: int):
        self.path = directory(spool_dir)
        self.roots = roots
        self.max_bytes = max_bytes
        self.max_copy_bytes = max_copy_bytes
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def take(self, message: dict) -> Opened | None:
        """Link the checkpoint of a `checkpoint` message into the directory (None), or return it
        opened and checked when it must be copied instead (the caller copies, then closes it).

        Raises RefusedPath for what the trainer should hear about (the path is not allowed, the
        file is missing, changed or too big to copy) and SnapshotError for the relay's own trouble."""
        path = message["path"]
        fd = open_checkpoint(path, self.roots, self.max_bytes)
        try:
            info = os.fstat(fd)
            self._check_unchanged(message, info)
            if self._link(fd, name(message["stream"], message["seq"])):
                os.close(fd)
                return None
            if info.st_size > self.max_copy_bytes:
                raise RefusedPath(
                    "checkpoint %s refused: it is on another filesystem than the relay's spool, so the relay "
                    "would copy it, and %d bytes are over max_spool_bytes (%d): put --spool-dir on the "
                    "checkpoints' filesystem or raise max_spool_bytes" % (path, info.st_size, self.max_copy_bytes))
        except BaseException:
            os.close(fd)
            raise
        return Opened(message, fd, info.st_size, info.st_mtime_ns)

    def copy(self, opened: Opened) -> None:
        """Copy an opened checkpoint into the directory, durably; refuse it if it changed meanwhile.
        Slow (the file's size in bytes written): the server calls it from its copy thread."""
        path = opened.message["path"]
        final = name(opened.message["stream"], opened.message["seq"])
        free = os.statvfs(self.path)
        if free.f_bavail * free.f_frsize < opened.size:
            raise SnapshotError("no room on the spool's disk for a %d-byte copy of checkpoint %s (%d bytes free in "
                                "%s)" % (opened.size, path, free.f_bavail * free.f_frsize, self.path))
        partial = final + PARTIAL
        try:
            out = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=self.fd)
        except OSError as exc:
            raise SnapshotError("cannot copy checkpoint %s into %s: %s" % (path, self.path, exc.strerror)) from exc
        try:
            copied = 0
            while copied < opened.size:
                sent = os.sendfile(out, opened.fd, copied, min(opened.size - copied, COPY_CHUNK))
                if sent == 0:
                    break  # the file got shorter
                copied += sent
            after = os.fstat(opened.fd)
            if copied != opened.size or (after.st_size, after.st_mtime_ns) != (opened.size, opened.mtime_ns):
                raise RefusedPath("checkpoint %s refused: it changed while the relay copied it (written in place?): "
                                  "save checkpoints to a temporary file and rename it over the old one" % path)
            os.fsync(out)
        except OSError as exc:
            self._discard(partial)
            raise SnapshotError("cannot copy checkpoint %s into %s: %s" % (path, self.path, exc.strerror)) from exc
        except BaseException:
            self._discard(partial)
            raise
        finally:
            os.close(out)
        self._publish(partial, final)

    def discard(self, message: dict) -> None:
        """Delete the snapshot of a record that was not stored after all."""
        self._discard(name(message["stream"], message["seq"]))

    def _check_unchanged(self, message: dict, info: os.stat_result) -> None:
        seen = message.get("stat")
        if not isinstance(seen, dict):
            return
        if (seen.get("size"), seen.get("mtime_ns")) != (info.st_size, info.st_mtime_ns):
            raise RefusedPath("checkpoint %s refused: it changed after it was logged (then %s bytes, now %d; "
                              "a later save replaced it before the relay took the record): the later "
                              "checkpoint's own record uploads that one" % (message["path"], seen.get("size"),
                                                                             info.st_size))

    def _link(self, fd: int, final: str) -> bool:
        partial = final + PARTIAL
        self._discard(partial)
        try:
            os.link("/proc/self/fd/%d" % fd, partial, dst_dir_fd=self.fd, follow_symlinks=True)
        except OSError as exc:
            if exc.errno in LINK_REFUSED:
                return False
            raise SnapshotError("cannot link checkpoint into %s: %s" % (self.path, exc.strerror)) from exc
        try:
            os.fsync(fd)  # the trainer's bytes on disk before the ack (at no cost when its save synced them)
        except OSError as exc:
            self._discard(partial)
            raise SnapshotError("cannot sync checkpoint linked into %s: %s" % (self.path, exc.strerror)) from exc
        self._publish(partial, final)
        return True

    def _publish(self, partial: str, final: str) -> None:
        try:
            os.replace(partial, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            # A record taken twice (re-sent before its first copy was committed) links the same
            # file again: rename(2) between two links of one file does nothing and leaves `partial`.
            self._discard(partial)
            os.fsync(self.fd)
        except OSError as exc:
            self._discard(partial)
            raise SnapshotError("cannot store a checkpoint snapshot in %s: %s" % (self.path, exc.strerror)) from exc

    def _discard(self, entry: str) -> None:
        remove(os.path.join(self.path, entry))


def remove(path: str) -> None:
    """Delete a snapshot: a checkpoint's file, or a media record's directory of copies
    (relay/mediafiles.py); one already gone is fine."""
    try:
        os.unlink(path)
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)
    except FileNotFoundError:
        pass


def open_snapshot(spool_dir: str, body: dict) -> int:
    """Open the snapshot of a spooled checkpoint record for reading (the uploader); a file
    descriptor the caller closes. Raises OSError when it is not there."""
    path = os.path.join(directory(spool_dir), name(body["stream"], body["seq"]))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def held_bytes(spool_dir: str) -> int:
    """Disk the snapshots hold on their own: copies, and links to files the trainer has since
    replaced or deleted (a link to a file still in place costs nothing)."""
    total = 0
    try:
        entries = os.scandir(directory(spool_dir))
    except OSError:
        return 0
    with entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_nlink == 1:
                total += info.st_blocks * 512
            elif stat.S_ISDIR(info.st_mode):  # a media record's copies
                total += media_bytes(entry.path)
    return total


def media_bytes(path: str) -> int:
    """Disk the files of a media record's directory hold (relay/mediafiles.py)."""
    try:
        with os.scandir(path) as entries:
            return sum(entry.stat(follow_symlinks=False).st_blocks * 512 for entry in entries)
    except OSError:
        return 0


class CopyThread:
    """Copies checkpoints off the server's intake thread. The server hands it an opened file with
    what it needs to commit the record later (`context`); when a copy is done the thread writes a
    byte to `wake_fd` (which the server polls) and the server collects it with `finished()`."""

    def __init__(self, snapshots: SnapshotDir):
        self.snapshots = snapshots
        self._jobs: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._stopping = False
        self.wake_fd, self._wake_writer = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_writer, False)
        self._thread = threading.Thread(target=self._work, name="relay-checkpoint-copy", daemon=True)
        self._thread.start()

    def submit(self, opened: Opened, context: Any) -> None:
        self._jobs.put((opened, context))

    def finished(self) -> list[tuple[Any, BaseException | None]]:
        """(context, None) for each copy done since the last call, (context, error) for each failed."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def stop(self) -> None:
        """Stop after the copy under way; copies not begun are not made. Their records are not
        acked: the clients send them again (to the next relay)."""
        self._stopping = True
        self._jobs.put(None)
        self._thread.join()
        os.close(self.wake_fd)
        os.close(self._wake_writer)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            opened, context = job
            if self._stopping:
                opened.close()
                continue
            error: BaseException | None = None
            try:
                self.snapshots.copy(opened)
            except (RefusedPath, SnapshotError) as exc:
                error = exc
            except Exception as exc:  # a bug: the server logs it; the record stays unacked
                error = SnapshotError("copying checkpoint %s failed: %r" % (opened.message["path"], exc))
            finally:
                opened.close()
            self._done.put((context, error))
            try:
                os.write(self._wake_writer, b"c")
            except BlockingIOError:
                pass  # the server has bytes to read already
