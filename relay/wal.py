"""The spool's write-ahead log, read without SQLite: would opening the spool drop committed data?

SQLite replays a WAL up to the last commit before the first frame whose checksum fails, and drops
the rest without a word; a WAL whose tail is gone looks like one that simply ended there. The
records in those transactions were acked to trainers, which no longer hold them. So before SQLite
opens the spool (its recovery would then checkpoint, and a restart overwrite, the evidence), the
relay reads the WAL itself (https://www.sqlite.org/fileformat2.html#walformat):

- every frame's checksum chain, to find what SQLite will replay;
- frames after a failed checksum that still carry the WAL's salts and end a transaction (commit
  frames): transactions that were committed but would be dropped;
- the wal-index header in the `-shm` file, which records how many frames were committed
  (`mxFrame`) as of the last commit, and how many of them a checkpoint already copied into the
  database (`nBackfill`): committed frames past both that the file does not hold were cut off.

Frames after a failed checksum that are intact otherwise can be kept: `inspect(repair=True)` first
copies the WAL aside as found, then rewrites the checksums of the frames through the last commit,
so that SQLite replays them. The page whose bytes changed is then replayed as it is: the spool's
per-record checksums and `quick_check` find what it damaged.

Limits: without the `-shm` file (a machine that lost power, or a file deleted), a WAL cut at a
frame boundary cannot be told from one that ended there; the server's per-stream sequence check
finds such losses when the trainers re-send.
"""
from __future__ import annotations

import array
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass

HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24
MAGIC_LITTLE, MAGIC_BIG = 0x377F0682, 0x377F0683   # checksums in little- / big-endian words
INDEX_HEADER_BYTES = 48                              # the wal-index header, stored twice at the start of -shm


def checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing from (s0, s1)."""
    words = array.array("I", data)
    if big_endian != (sys.byteorder == "big"):
        words.byteswap()
    pairs = iter(words)
    for first in pairs:
        second = next(pairs)
        s0 = (s0 + first + s1) & 0xFFFFFFFF
        s1 = (s1 + second + s0) & 0xFFFFFFFF
    return s0, s1


@dataclass
class WalReport:
    path: str
    frames: int              # whole frames in the file
    replayable: int          # frames SQLite replays: through the last commit frame before a bad checksum
    committed: int           # frames known to have been committed (last commit frame found, or the index's count)
    first_bad: int | None    # index of the first frame whose checksum fails, if any
    cut: bool                # the index counts more committed frames than the file holds
    backfilled: int = 0      # frames a checkpoint already copied into the database (safe whatever the WAL)
    repaired: bool = False   # checksums rewritten: SQLite replays every committed frame
    kept_as: str | None = None  # where the WAL as found was copied

    @property
    def lost_frames(self) -> int:
        """Committed frames that SQLite will not replay."""
        return 0 if self.repaired else max(0, self.committed - max(self.replayable, self.backfilled))

    def describe(self) -> str:
        what = []
        if self.first_bad is not None:
            what.append("frame %d of %d fails its checksum" % (self.first_bad + 1, self.frames))
        if self.cut:
            what.append("the file holds %d frames but its index recorded %d committed ones (its end was cut off)"
                        % (self.frames, self.committed))
        text = "spool WAL %s is damaged: %s" % (self.path, "; ".join(what))
        if self.repaired:
            text += ("; the checksums of frames %d..%d were rewritten so that these %d committed frames are "
                     "replayed (the WAL as found is kept as %s); records on the damaged page are "
                     "checked one by one" % (self.first_bad + 1, self.committed, self.committed - self.replayable,
                                             self.kept_as))
        else:
            text += ("; the transactions in frames %d..%d were committed (their records acked) and cannot be "
                     "replayed: their records are lost%s" % (max(self.replayable, self.backfilled) + 1, self.committed,
                                                              " (the WAL as found is kept as %s)" % self.kept_as
                                                              if self.kept_as else ""))
        return text


def _index_header(shm_path: str) -> tuple[int, bytes, int] | None:
    """(committed frames, salts, frames already checkpointed) from the wal-index, if both copies of
    its header agree and its checksum holds."""
    try:
        with open(shm_path, "rb") as handle:
            head = handle.read(2 * INDEX_HEADER_BYTES + 4)
    except OSError:
        return None
    if len(head) < 2 * INDEX_HEADER_BYTES + 4 or head[:INDEX_HEADER_BYTES] != head[INDEX_HEADER_BYTES:2 * INDEX_HEADER_BYTES]:
        return None
    is_init, max_frame = head[12], struct.unpack("=I", head[16:20])[0]
    stored = struct.unpack("=2I", head[40:48])
    if not is_init or checksum(head[:40], 0, 0, sys.byteorder == "big") != stored:
        return None
    return max_frame, head[32:40], struct.unpack("=I", head[96:100])[0]


def inspect(db_path: str, repair: bool = False) -> WalReport | None:
    """Look at `<db_path>-wal` before SQLite opens the database. None when nothing committed would
    be dropped (no WAL, or every committed frame replays); else what would be (and, with
    `repair`, what was done about it)."""
    path = db_path + "-wal"
    index = _index_header(db_path + "-shm")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        data = b""
    header_ok = False
    if len(data) >= HEADER_BYTES:
        magic, _, page_size = struct.unpack(">3I", data[:12])
        big_endian = magic == MAGIC_BIG
        header_ok = (magic in (MAGIC_LITTLE, MAGIC_BIG) and page_size >= 512 and page_size & (page_size - 1) == 0
                     and checksum(data[:24], 0, 0, big_endian) == struct.unpack(">2I", data[24:32]))
    if not header_ok:
        if index is not None and index[0] > index[2]:  # committed frames that only the WAL held
            return WalReport(path, 0, 0, index[0], None, cut=True, backfilled=index[2])
        return None  # an empty or never-used WAL: SQLite starts it afresh
    salts = data[16:24]
    frame_bytes = FRAME_HEADER_BYTES + page_size
    frames = (len(data) - HEADER_BYTES) // frame_bytes
    sums = struct.unpack(">2I", data[24:32])
    replayable, first_bad = 0, None
    for number in range(frames):
        start = HEADER_BYTES + number * frame_bytes
        frame = data[start:start + frame_bytes]
        sums = checksum(frame[:8], *sums, big_endian)
        sums = checksum(frame[FRAME_HEADER_BYTES:], *sums, big_endian)
        if frame[8:16] != salts or struct.unpack(">2I", frame[16:24]) != sums:
            first_bad = number
            break
        if struct.unpack(">I", frame[4:8])[0]:   # a commit frame: the database's size after the transaction
            replayable = number + 1
    committed = replayable
    if first_bad is not None:
        for number in range(first_bad + 1, frames):
            start = HEADER_BYTES + number * frame_bytes
            if data[start + 8:start + 16] == salts and struct.unpack(">I", data[start + 4:start + 8])[0]:
                committed = number + 1   # a later transaction of this WAL's generation was committed
    cut = index is not None and index[1] == salts and index[0] > max(committed, frames)
    if cut:
        committed = index[0]
    elif index is not None and index[1] == salts:
        committed = max(committed, index[0])
    backfilled = index[2] if index is not None and index[1] == salts else 0
    if committed <= max(replayable, backfilled):
        return None  # what fails its checksum was never committed (a transaction cut short by a crash)
    report = WalReport(path, frames, replayable, committed, first_bad, cut, backfilled)
    if repair and not cut and _repairable(data, first_bad, committed, salts, frame_bytes):
        report.kept_as = "%s.as-found-%s" % (path, time.strftime("%Y%m%dT%H%M%S"))
        shutil.copyfile(path, report.kept_as)
        _rewrite_checksums(path, data, first_bad, committed, frame_bytes, big_endian)
        report.repaired = True
    elif repair:
        report.kept_as = "%s.as-found-%s" % (path, time.strftime("%Y%m%dT%H%M%S"))
        shutil.copyfile(path, report.kept_as)
    return report


def _repairable(data: bytes, first_bad: int | None, committed: int, salts: bytes, frame_bytes: int) -> bool:
    """Only page contents may be damaged: every frame up to the last commit carries this WAL's salts
    and a plausible page number (a damaged frame header could put a page in the wrong place)."""
    if first_bad is None:
        return False
    for number in range(first_bad, committed):
        start = HEADER_BYTES + number * frame_bytes
        page = struct.unpack(">I", data[start:start + 4])[0]
        if data[start + 8:start + 16] != salts or not 0 < page < 1 << 31:
            return False
    return True


def _rewrite_checksums(path: str, data: bytes, first_bad: int, committed: int, frame_bytes: int,
                       big_endian: bool) -> None:
    if first_bad == 0:
        sums = struct.unpack(">2I", data[24:32])
    else:
        previous = HEADER_BYTES + (first_bad - 1) * frame_bytes
        sums = struct.unpack(">2I", data[previous + 16:previous + 24])
    with open(path, "r+b") as handle:
        for number in range(first_bad, committed):
            start = HEADER_BYTES + number * frame_bytes
            frame = data[start:start + frame_bytes]
            sums = checksum(frame[:8], *sums, big_endian)
            sums = checksum(frame[FRAME_HEADER_BYTES:], *sums, big_endian)
            handle.seek(start + 16)
            handle.write(struct.pack(">2I", *sums))
        handle.flush()
        os.fsync(handle.fileno())
