"""The relay's intake: a batch read from the ROUTER socket, each frame classified, checkpoints
and media files snapshotted, records committed to the spool and only then acked; refusals
answered, heartbeats noted, status requests answered.

An ack means the record is committed to the spool (relay/spool.py). A record that is not taken
(the spool has no room, cannot be written, or the record's checkpoint cannot be snapshotted now)
is not acked: its client keeps it, sends it again and spills it to disk if that lasts. A client
whose records were held for want of room is told to send them again once the relay takes records
again (relay/room.py).
"""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections import Counter
from typing import Callable

import zmq

from relay import mediafiles, protocol, snapshots
from relay.artifacts import RefusedPath, resolve_checkpoint
from relay.config import RelayConfig
from relay.room import HeldClients, Room
from relay.snapshots import CopyThread, SnapshotDir, SnapshotError
from relay.spool import Spool, SpoolError
from relay.status import RelayStatus
from relay.watches import GapWatch, RefusalLog, SilenceWatch

log = logging.getLogger("relay.server")

BATCH_BYTES_FRAMES = 8  # one batch reads at most this many max_frame_bytes of frames


def classify(frame: bytes, config: RelayConfig) -> tuple[dict, str]:
    """Decode a frame into (message, refusal reason or '').

    A frame whose (stream, seq) can be read but which can never be accepted comes back as a
    refusal, so that its seq is consumed and the client stops re-sending it. A frame without a
    readable (stream, seq) raises ProtocolError.
    """
    try:
        message = protocol.decode(frame, config.max_frame_bytes)
    except protocol.ProtocolError as exc:
        if exc.stream is None or not exc.seq:
            raise
        return {"stream": exc.stream, "seq": exc.seq, "t": "invalid"}, exc.reason
    if message["t"] == "checkpoint":
        try:
            resolve_checkpoint(message["path"], config.artifact_roots, config.max_artifact_bytes)
        except RefusedPath as exc:
            return message, str(exc)
    return message, mediafiles.check_paths(message, config.artifact_roots, config.max_media_bytes)


class Commits:
    """Records committed to the spool in one transaction, then acked (`upto` and the ranges
    committed); a record past a gap is answered with `upto`, and acked records that no one holds
    any more are given up as lost (GapWatch). The clients of a batch the spool could not take are
    noted in `held`, and told to re-send at the first commit that succeeds again."""

    def __init__(self, spool: Spool, snapshot_dir: SnapshotDir, counters: Counter,
                 reply: Callable[[bytes, dict], bool], new_records: Callable[[str], None], held: HeldClients):
        self.spool = spool
        self.snapshots = snapshot_dir
        self.counters = counters
        self.reply = reply
        self.held = held
        self.new_records = new_records   # told each run that got new records
        self.gaps = GapWatch()
        self.spool_error: str | None = None  # the last failed spool write, until one succeeds

    def commit(self, items: list[tuple[dict, str, bytes]], senders: dict[str, bytes]) -> None:
        try:
            outcomes = self.spool.ingest(items)
        except SpoolError as exc:  # disk full, I/O error: nothing acked, clients keep and re-send
            self.discard_snapshots(items, ["error"] * len(items))
            self.counters["held"] += len(items)
            for identity in senders.values():
                self.held.note(identity)
            if self.spool_error is None:
                log.error("%s; holding records (not acked: trainers keep them, spill them if it lasts) "
                          "until the spool can be written again", exc)
            self.spool_error = str(exc)
            return
        if self.spool_error is not None:
            log.info("spool writable again: taking records")
            self.spool_error = None
            self.held.tell(skip=frozenset(senders.values()))
        self.discard_snapshots(items, [outcome.status for outcome in outcomes])
        committed: dict[str, list[int]] = {}
        runs = set()
        for (message, _, _), outcome in zip(items, outcomes):
            if outcome.status == "gap":
                self.counters["out_of_order"] += 1
                committed.setdefault(outcome.stream, [])  # answer with `upto`: the client re-sends from there
                below = self.gaps.past_gap(outcome.stream, outcome.seq)
                if below is not None:
                    self.give_up(outcome.stream, message["run"], below)
                continue
            if outcome.status == "new":
                self.gaps.filled(outcome.stream)
            committed.setdefault(outcome.stream, []).append(outcome.seq)
            if outcome.status == "new":
                self.counters["received"] += 1
                runs.add(message["run"])
            elif outcome.status == "dup":
                self.counters["duplicates"] += 1
            else:
                self.counters["refused"] += 1
                self.reply(senders[outcome.stream], {"t": "error", "stream": outcome.stream, "seq": outcome.seq,
                                                     "reason": outcome.reason})
        for stream, seqs in committed.items():
            self.counters["acked"] += len(seqs)
            self.reply(senders[stream], {"t": "ack", "stream": stream, "upto": self.spool.upto(stream),
                                         "seqs": protocol.ranges(sorted(seqs))})
        for run_id in runs:
            self.new_records(run_id)

    def discard_snapshots(self, items: list[tuple[dict, str, bytes]], statuses: list[str]) -> None:
        """Delete the snapshots taken for checkpoint and media records not stored after all (a gap,
        a failed commit), unless a stored record holds that name (an earlier copy of the record)."""
        for (message, refusal, _), status in zip(items, statuses):
            if message["t"] not in ("checkpoint", "media") or refusal or status == "new":
                continue
            try:
                if not self.spool.has_record(message["stream"], message["seq"]):
                    self.snapshots.discard(message)
            except sqlite3.Error:
                pass  # the spool cannot be read now: the next start sweeps what no record holds

    def give_up(self, stream: str, run_id: str, below: int) -> None:
        """The stream's client holds nothing below `below`, the spool nothing between: lost."""
        try:
            first, last = self.spool.give_up(stream, run_id, below)
        except sqlite3.Error as exc:  # the watch starts over; the next passes try again
            log.warning("cannot note lost records of stream %s in spool %s: %s", stream, self.spool.path, exc)
            return
        self.counters["lost"] += last - first + 1
        log.error("run %s: %d records of stream %s (seq=%d..%d) were acked but are not in the spool, and the trainer no "
                  "longer holds them: lost (a damaged or cut spool WAL; see the start of this log); the stream goes "
                  "on from seq=%d and the run's W&B summary counts them in relay/records_lost",
                  run_id, last - first + 1, stream, first, last, below)


class Intake:
    """Reads batches from the ROUTER socket and answers them: acks (through `commits`), refusals,
    status replies (built by `status_of`, one per page asked for). Checkpoints whose snapshot must
    be copied wait for `copier`; their stream's later records wait with them."""

    def __init__(self, config: RelayConfig, socket: zmq.Socket, spool: Spool, snapshot_dir: SnapshotDir,
                 copier: CopyThread, silence: SilenceWatch, new_records: Callable[[str], None],
                 status_of: Callable[[int | None], RelayStatus]):
        self.config = config
        self.socket = socket
        self.spool = spool
        self.snapshots = snapshot_dir
        self.copier = copier
        self.silence = silence
        self.status_of = status_of
        self.counters: Counter = Counter()
        self.refusals = RefusalLog()
        self.room = Room(config, spool.footprint)
        self.held = HeldClients(self.reply)
        self.commits = Commits(spool, snapshot_dir, self.counters, self.reply, new_records, self.held)
        self.copying: dict[str, int] = {}  # stream -> seq of its checkpoint being copied: the stream waits
        self.touch_error: str | None = None  # the last failed heartbeat write, until one succeeds

    def receive_batch(self) -> list[tuple[bytes, bytes]]:
        """Up to batch_max messages, and at most BATCH_BYTES_FRAMES frames' worth of bytes, so that
        a burst of large frames does not pile up in memory. A message of several frames is answered
        with an error; its extra frames are read one by one and let go."""
        batch = []
        budget = self.config.max_frame_bytes * BATCH_BYTES_FRAMES
        while len(batch) < self.config.batch_max and budget > 0:
            try:
                identity = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            frames = 0
            frame = b""
            while self.socket.getsockopt(zmq.RCVMORE):
                part = self.socket.recv()  # the rest of a message is already here: never blocks
                frames += 1
                if frames == 1:
                    frame = part
            if frames != 1:
                self.refuse(identity, protocol.ProtocolError(
                    "message of %d frames refused: send each message as exactly one frame" % frames))
                continue
            budget -= len(frame)
            batch.append((identity, frame))
        return batch

    def handle_batch(self, batch: list[tuple[bytes, bytes]]) -> None:
        items = []             # (message, refusal, frame) for the spool
        senders = {}           # stream -> ROUTER identity to answer
        status_requests = {}   # ROUTER identity -> its last status request (one answer each)
        alive = set()          # runs whose trainers sent a heartbeat
        heard = set()          # runs whose trainers sent anything
        unsnapped = set()      # streams whose checkpoint could not be snapshotted in this batch
        for identity, frame in batch:
            try:
                message, refusal = classify(frame, self.config)
            except protocol.ProtocolError as exc:
                self.refuse(identity, exc)
                continue
            except Exception:  # a bug in our validation must not stop the relay for every other client
                if not self.counters["unreadable"]:
                    log.exception("could not read a frame from client %s (a relay bug: please report it with "
                                  "this traceback); it is refused", identity.hex()[:16])
                self.counters["unreadable"] += 1
                self.refuse(identity, protocol.ProtocolError("the relay could not read this frame (a relay bug, "
                                                             "logged there)"))
                continue
            if message["t"] == "status":
                self.counters["status_requests"] += 1
                status_requests[identity] = message
                continue
            if message["t"] == "heartbeat":
                alive.update(message["runs"])
                continue
            if not refusal:
                heard.add(message["run"])  # held or not, a record from the trainer says it is alive
            if self.room.holding:
                self.held.note(identity)
            if self.room.holding or message["stream"] in self.copying or message["stream"] in unsnapped:
                self.counters["held"] += 1  # not acked: the client keeps it, re-sends it, spills it
                continue
            if message["t"] in ("checkpoint", "media") and not refusal:
                try:
                    refusal, opened = self.snapshot(message)
                except SnapshotError as exc:
                    self.counters["held"] += 1
                    self.refusals.warn("%s; not acking the record (its client sends it again)", exc)
                    unsnapped.add(message["stream"])  # what the stream sent after it waits too
                    continue
                if opened is not None:  # copied off this thread; the record is committed when the copy is done
                    self.copying[message["stream"]] = message["seq"]
                    self.copier.submit(opened, (message, frame, identity, opened.size, time.monotonic()))
                    continue
            if refusal:
                self.refusals.warn("refused record seq=%d of stream %s: %s", message["seq"], message["stream"],
                                   refusal)
            items.append((message, refusal, frame))
            senders[message["stream"]] = identity
        if items and (self.room.holds(incoming=sum(len(frame) for _, _, frame in items)) or self.room.wal_too_big()):
            self.commits.discard_snapshots(items, ["held"] * len(items))
            self.counters["held"] += len(items)  # not acked: the clients keep them, re-send them, spill them
            for identity in senders.values():
                self.held.note(identity)
        elif items:
            self.commits.commit(items, senders)
        if alive or heard:
            self.silence.heard(alive | heard, time.monotonic())
        if alive:
            self.touch(alive)
        self.answer_status(status_requests)

    def snapshot(self, message: dict) -> tuple[str, snapshots.Opened | None]:
        """Snapshot a checkpoint or copy a media record's files (relay/mediafiles.py) before the commit:
        (refusal reason or '', the opened checkpoint to copy); SnapshotError: the relay's own trouble."""
        if message["seq"] <= self.spool.upto(message["stream"]):
            return "", None  # a re-sent record already spooled: its snapshot was taken then
        try:
            if message["t"] == "media":
                return mediafiles.take(self.snapshots, message, self.config.max_media_bytes), None
            return "", self.snapshots.take(message)
        except RefusedPath as exc:
            return str(exc), None

    def finish_copies(self) -> None:
        """Commit (and ack) the checkpoint records whose copies are done; their streams go on."""
        for (message, frame, identity, size, started), error in self.copier.finished():
            self.copying.pop(message["stream"], None)
            if isinstance(error, SnapshotError):
                self.counters["held"] += 1
                self.refusals.warn("%s; not acking the record (its client sends it again)", error)
                continue
            refusal = str(error) if error else ""
            if refusal:
                self.refusals.warn("refused record seq=%d of stream %s: %s", message["seq"], message["stream"],
                                   refusal)
            else:
                log.info("copied checkpoint %s into the spool (%d bytes in %.0f ms: it is on another filesystem than "
                         "the spool, so it cannot be linked)", message["path"], size,
                         (time.monotonic() - started) * 1e3)
            if self.room.holding or self.room.holds(incoming=len(frame)):  # no room now: not acked (it is re-sent)
                self.snapshots.discard(message)
                self.counters["held"] += 1
                self.held.note(identity)
                continue
            self.commits.commit([(message, refusal, frame)], {message["stream"]: identity})

    def scan(self) -> None:
        """The periodic look at the spool's room (Room.scan); once the relay takes records again,
        the clients held for want of room are told to re-send now (after a failed spool write, the
        first commit that succeeds tells them: Commits)."""
        if self.room.scan() and self.commits.spool_error is None:
            self.held.tell()

    def touch(self, runs: set[str]) -> None:
        """Note the heartbeats in the spool (`last_seen`, shown by `relay status`). A failed write
        (disk full) is logged once and otherwise let go: the next heartbeat writes it again."""
        try:
            self.spool.touch(runs)
        except (SpoolError, sqlite3.Error) as exc:
            if self.touch_error is None:
                log.warning("cannot note heartbeats of %d runs in spool %s: %s; the relay goes on (they are noted "
                            "again once the spool can be written)", len(runs), self.spool.path, exc)
            self.touch_error = str(exc)
            return
        self.touch_error = None

    def refuse(self, identity: bytes, error: protocol.ProtocolError) -> None:
        """A frame without a readable (stream, seq): nothing to store or ack, only an answer."""
        self.counters["malformed"] += 1
        self.refusals.warn("refused a frame from client %s: %s", identity.hex()[:16], error.reason)
        self.reply(identity, {"t": "error", "seq": None, "reason": error.reason})

    def answer_status(self, requests: dict[bytes, dict]) -> None:
        """One reply per client that asked in this batch, however often it asked: to its last
        request, whose stream the reply carries. Each status (the summary, or a page) is read from
        the spool once for all who asked for it."""
        statuses: dict[int | None, dict] = {}
        for identity, request in requests.items():
            page = request.get("page")
            if page not in statuses:
                statuses[page] = dataclasses.replace(self.status_of(page), version=protocol.VERSION).to_dict()
            self.send(identity, protocol.encode(dict(statuses[page], stream=request["stream"])))

    def reply(self, identity: bytes, message: dict) -> bool:
        message.setdefault("v", protocol.VERSION)
        return self.send(identity, protocol.encode(message))

    def send(self, identity: bytes, frame: bytes) -> bool:
        """Whether ZeroMQ took the frame (never waits)."""
        try:
            self.socket.send_multipart([identity, frame], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # client gone or its queue full: it will re-send and be re-acked
            log.debug("could not reply to %s: %s", identity.hex()[:16], exc)
            return False
