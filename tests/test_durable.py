"""relay.durable: a file is replaced whole or not at all; and every writer of the package uses it."""
from __future__ import annotations

import os
import stat

import pytest

from relay import durable, keys

pytestmark = pytest.mark.timeout(60)


def test_write_bytes_replaces_the_file_with_the_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    durable.write_bytes(str(target), [b"new ", b"bytes"], mode=0o640)
    assert target.read_bytes() == b"new bytes"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["file.bin"]
    durable.write_text(str(target), "é\r\n", mode=0o600)
    assert target.read_bytes() == "é\r\n".encode() and stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def chunks():
        yield b"half of the new"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        durable.write_bytes(str(target), chunks())
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_a_failed_fsync_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        durable.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


def test_replace_syncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    source, target = tmp_path / ".tmp", tmp_path / "final"
    source.write_bytes(b"x")
    durable.replace(str(source), str(target))
    assert target.read_bytes() == b"x" and not source.exists()
    assert synced == [str(source), str(tmp_path)]


def test_key_files_are_fsynced_with_their_directories(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    directory = tmp_path / "keys"
    keys.create_keys(str(directory), ["node1"])
    files = keys.planned_files(str(directory), ["node1"], relay_keypair=True) + [str(directory / "node1" / "relay.key")]
    for path in files:
        assert os.path.isfile(path)
        assert _synced_before_rename(path, synced), "%s was not fsynced before its rename: %s" % (path, synced)
        assert os.path.dirname(path) in synced, "the directory of %s was not fsynced" % path
    assert str(tmp_path) in synced  # the new key directory's own entry
    assert not [name for _, _, names in os.walk(directory) for name in names if name.startswith(".")]


def _synced_before_rename(path: str, synced: list) -> bool:
    """Whether the file now at `path` was fsynced under its temporary name: in a `.keys-*` staging
    directory beside it (a new keypair), or as `.<name>.*` beside it (a copied public key)."""
    directory, name = os.path.split(path)
    for seen in synced:
        folder, seen_name = os.path.split(seen)
        if folder == directory and seen_name.startswith("." + name + "."):
            return True
        if os.path.dirname(folder) == directory and os.path.basename(folder).startswith(".keys-") and seen_name == name:
            return True
    return False


def _record_fsyncs(monkeypatch) -> list:
    """Every path os.fsync is called on from now on (read from /proc/self/fd)."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink("/proc/self/fd/%d" % fd))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced
