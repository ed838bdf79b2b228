"""Policy 'hold': whether the spool has room for more records (Room), and the clients whose records
were held for want of it, told to re-send once the relay takes records again (HeldClients).

A held record is not acked: its client keeps it and re-sends it after its backoff (relay/outbox.py:
`resend_after`, doubled after each re-send no ack follows, at most 30 s). Without being told, a
client whose records were held for long would send them again up to 30 s after the relay has room.
"""
from __future__ import annotations

import logging
import sqlite3
from typing import Callable

from relay import snapshots
from relay.config import RelayConfig
from relay.spool_db import Footprint

log = logging.getLogger("relay.server")

COMMIT_COST = 2  # disk bytes a commit may take per byte of frames: the WAL's copy, then the database's
ROOM_HYSTERESIS = 1.25  # holding for want of disk ends once min_free_bytes times this is free
MAX_HELD_CLIENTS = 10_000  # clients remembered to be told; past that the others wait for their backoff


class Room:
    """Policy 'hold': whether the spool has room for more records (`holds`), and its WAL kept small."""

    def __init__(self, config: RelayConfig, footprint: Footprint):
        self.config = config
        self.footprint = footprint
        self.holding = False   # no room in the spool: records are not taken
        self.hold_reason: str | None = None
        self.held_bytes = 0    # frame bytes of the last batch held
        self.wal_full = False  # the WAL was too big at the last look (`wal_too_big`)

    def scan(self) -> bool:
        """The periodic look: keep the WAL small, look again at a WAL that was too big, measure the
        room. Whether the relay takes records now."""
        self.relieve_wal()
        if self.wal_full:
            self.wal_too_big()
        return not self.holds() and not self.wal_full

    def relieve_wal(self) -> None:
        """While the spool's room is short (under twice min_free_bytes), checkpoint and truncate its
        WAL once a scan: a WAL that readers keep from being reused grows with every write (uploads
        rewrite rows when they assign steps), which would eat the reserve that lets them go on."""
        try:
            if self.footprint.room_bytes() < 2 * self.config.min_free_bytes:
                self.footprint.truncate_wal()
        except (OSError, sqlite3.Error) as exc:
            log.debug("cannot truncate the spool's WAL: %s", exc)

    def wal_too_big(self) -> bool:
        """Records that reuse the spool's free pages are written to its WAL first, and the WAL gives
        its space back only when truncated: past a quarter of min_free_bytes it is checkpointed and
        truncated now, and while that cannot be done the batch waits (a pause, not a hold: it is
        counted as held but not logged), so that the WAL never eats the reserve."""
        limit = self.config.min_free_bytes // 4
        self.wal_full = bool(limit) and self.footprint.wal_bytes() > limit
        if not self.wal_full:
            return False
        try:
            self.footprint.truncate_wal()
        except sqlite3.Error as exc:
            log.debug("cannot truncate the spool's WAL: %s", exc)
        self.wal_full = self.footprint.wal_bytes() > limit
        return self.wal_full

    def holds(self, incoming: int = 0) -> bool:
        """Take no new records while the spool holds more than max_spool_bytes, or while less than
        min_free_bytes would be left for it on its disk (free space plus the spool's free pages)
        after storing `incoming` bytes of frames, until uploads make room. Checked before every
        commit, so a burst cannot eat the reserve: the reserve is what lets uploaders write to the
        spool (steps, states, deletes) and so empty a spool whose backlog filled the disk. Nothing
        is dropped: unacked records stay with their clients, which spill them to disk. Returns
        whether the relay holds.

        Once holding, the relay takes records again only when a quarter more than the reserve
        would be left after the last batch it held (not at every batch that just fits)."""
        if self.holding and not incoming:
            incoming = self.held_bytes  # a scan: would the batch it last held fit now?
        try:
            live = self.footprint.live_bytes() + snapshots.held_bytes(self.config.spool_dir)
            room = self.footprint.room_bytes()
        except (OSError, sqlite3.Error) as exc:
            log.debug("cannot measure the spool's room (%s); holding stays %s", exc, self.holding)
            return self.holding
        reserve = self.config.min_free_bytes * (ROOM_HYSTERESIS if self.holding else 1.0)
        if live > self.config.max_spool_bytes:
            reason = "spool full (%.1f MB of max_spool_bytes %.1f MB)" % (live / 1e6, self.config.max_spool_bytes / 1e6)
        elif room - COMMIT_COST * incoming < reserve:
            reason = ("%.1f MB free for the spool on its disk: storing %.1f MB more would leave less than "
                      "min_free_bytes (%.1f MB)" % (room / 1e6, incoming / 1e6, self.config.min_free_bytes / 1e6))
        else:
            reason = None
        if reason:
            self.held_bytes = incoming
        if reason and not self.holding:
            log.warning("%s: holding new records until W&B uploads make room (or disk is freed); trainers keep "
                        "them and spill them to disk if it lasts", reason)
        elif self.holding and not reason:
            log.info("spool has room again (%.1f MB live, %.1f MB free for it): taking records",
                     live / 1e6, room / 1e6)
        self.holding, self.hold_reason = reason is not None, reason
        return self.holding


class HeldClients:
    """The ZeroMQ identities of the clients whose records were held for want of room (the spool
    full, its disk's reserve reached, its WAL too big, a failed spool write), at most
    MAX_HELD_CLIENTS. `tell` sends each a `resend` reply (relay/protocol.py) through `reply`, which
    says whether ZeroMQ took it (NOBLOCK: a client gone or with a full queue is not told), and
    forgets them all. Records held while a checkpoint is copied or snapshotted are not noted: that
    wait ends by itself in milliseconds."""

    def __init__(self, reply: Callable[[bytes, dict], bool]):
        self.reply = reply
        self.identities: set[bytes] = set()
        self.past_bound = False  # a held client was not noted (the bound): it waits for its backoff

    def __len__(self) -> int:
        return len(self.identities)

    def note(self, identity: bytes) -> None:
        if len(self.identities) < MAX_HELD_CLIENTS:
            self.identities.add(identity)
        elif identity not in self.identities:
            self.past_bound = True

    def tell(self, skip: frozenset[bytes] = frozenset()) -> None:
        """The relay takes records again: tell every held client but those in `skip` (whose records
        it is taking right now) to re-send now, and forget them."""
        told = sum(1 for identity in self.identities - skip if self.reply(identity, {"t": "resend"}))
        if told or self.past_bound:
            log.info("taking records again: told %d held clients to re-send%s", told,
                     " (more were held: they re-send after their backoff)" if self.past_bound else "")
        self.identities.clear()
        self.past_bound = False
