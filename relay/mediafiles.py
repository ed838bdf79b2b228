"""Media files of `media` records (relay/media.py): checked like checkpoints, copied into the spool.

A media record names files by path (images, videos, audio, HTML) that the trainer may write over
at its next evaluation, and whose upload may come hours later. So before the relay acks the
record it copies them into a directory of the record's own under `<spool>/snapshots/`, named as a
checkpoint's snapshot is (relay/snapshots.py `name`: the record's stream and seq), one file per
item: `<index><extension>` (the item's place in the record's `values`, the extension of its path,
which wandb needs to tell the format). The uploader reads only those copies.

- Each path is checked as a checkpoint's is (relay/artifacts.py: inside an artifact root, no `..`
  or symlink out, a regular file, opened without following a final symlink), with the limit
  `max_media_bytes`; a file that changed since the trainer logged it (its `stat`) is refused.
- Always a copy, never a hard link: media are small, and a trainer that rewrites its picture in
  place would change a linked snapshot too. The copy is made on the intake thread (at most
  `max_media_bytes` per file), refused if the file changed while it was copied.
- Durable before the ack: the files are written and fsynced in `<name>.partial/`, which is
  fsynced, renamed to `<name>`, and the snapshot directory fsynced.
- The directory lives as long as its record: the spool deletes it with the record;
  what a crash left is swept at the relay's start, like checkpoint snapshots.
"""
from __future__ import annotations

import os
import string

from relay import media
from relay.artifacts import RefusedPath, open_checkpoint, resolve_checkpoint
from relay.snapshots import PARTIAL, SnapshotDir, SnapshotError, directory, name, remove

WHAT, LIMIT = "media file", "max_media_bytes"
EXTENSION_CHARACTERS = set(string.ascii_lowercase + string.digits)


def file_items(message: dict) -> list[tuple[int, dict]]:
    """(index, item) of the record's items that are files, index being the item's place in `values`."""
    return [(index, item) for index, item in enumerate(message["values"].values())
            if item["type"] in media.FILE_TYPES]


def check_paths(message: dict, roots: list[str], max_bytes: int) -> str:
    """The refusal of a media record whose files the relay may not read ('' if none, and for a
    record of another kind)."""
    if message["t"] != "media":
        return ""
    for _, item in file_items(message):
        try:
            resolve_checkpoint(item["path"], roots, max_bytes, WHAT, LIMIT)
        except RefusedPath as exc:
            return str(exc)
    return ""


def item_file(index: int, item: dict) -> str:
    """The copy's name in the record's directory: its index and the path's extension (lower case)."""
    extension = os.path.splitext(item["path"])[1][1:].lower()
    if not extension or len(extension) > 8 or not set(extension) <= EXTENSION_CHARACTERS:
        return str(index)
    return "%d.%s" % (index, extension)


def item_path(spool_dir: str, body: dict, index: int, item: dict) -> str:
    """Where the uploader reads item `index` of a spooled media record."""
    return os.path.join(directory(spool_dir), name(body["stream"], body["seq"]), item_file(index, item))


def take(snapshots: SnapshotDir, message: dict, max_bytes: int) -> str:
    """Copy the record's files into its directory, durably; returns '' (a record without files has
    no directory). Raises RefusedPath for what the trainer should hear about, SnapshotError for the
    relay's own trouble (its disk)."""
    if not file_items(message):
        return ""
    final = name(message["stream"], message["seq"])
    partial = final + PARTIAL
    remove(os.path.join(snapshots.path, partial))
    try:
        os.mkdir(partial, 0o700, dir_fd=snapshots.fd)
        out_dir = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=snapshots.fd)
    except OSError as exc:
        raise SnapshotError("cannot make a media directory in %s: %s" % (snapshots.path, exc.strerror)) from exc
    try:
        for index, item in file_items(message):
            _copy(snapshots, item, out_dir, item_file(index, item), max_bytes)
        os.fsync(out_dir)
        remove(os.path.join(snapshots.path, final))  # a record taken again before its first copy was committed
        os.replace(partial, final, src_dir_fd=snapshots.fd, dst_dir_fd=snapshots.fd)
        os.fsync(snapshots.fd)
    except OSError as exc:
        remove(os.path.join(snapshots.path, partial))
        raise SnapshotError("cannot copy media of record seq=%d into %s: %s"
                            % (message["seq"], snapshots.path, exc.strerror)) from exc
    except BaseException:
        remove(os.path.join(snapshots.path, partial))
        raise
    finally:
        os.close(out_dir)
    return ""


def _copy(snapshots: SnapshotDir, item: dict, out_dir: int, entry: str, max_bytes: int) -> None:
    path = item["path"]
    fd = open_checkpoint(path, snapshots.roots, max_bytes, WHAT, LIMIT)
    try:
        info = os.fstat(fd)
        seen = item["stat"]
        if (seen["size"], seen["mtime_ns"]) != (info.st_size, info.st_mtime_ns):
            raise RefusedPath("media file %s refused: it changed after it was logged (then %d bytes, now %d): write "
                              "each evaluation's media to a new path, or write over a path only once the record "
                              "is acked (client.flush)" % (path, seen["size"], info.st_size))
        out = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=out_dir)
        try:
            copied = 0
            while copied < info.st_size:
                sent = os.sendfile(out, fd, copied, info.st_size - copied)
                if sent == 0:
                    break
                copied += sent
            after = os.fstat(fd)
            if copied != info.st_size or (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
                raise RefusedPath("media file %s refused: it changed while the relay copied it" % path)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)
