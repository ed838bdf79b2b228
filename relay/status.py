"""The status reply of a running relay, typed (`RelayStatus`, the `RunStatus` of each run), and
`query_status`, which asks a relay for one.

The reply travels as one msgpack map (relay/protocol.py), and `relay status --json` prints that
map as JSON; `to_dict()` gives exactly that map and `from_dict()` reads it back:
`RelayStatus.from_dict(reply).to_dict() == reply`. Keys this version does not know (a newer relay)
are kept in `extra` and written back as they came, so an older `relay status --json` loses none.

The relay builds the status from its spool (relay/spool_report.py `SpoolReport.status`: the runs and the
totals) and its own state (counters, holding, W&B reachability). `relay status` (table, `--all`,
`--json`), `--watch`, `relay demo` and the test and benchmark harnesses (relay.testing) ask
through `query_status`, which returns the reply as it came (a dict); they read it through these
types, and so does the Prometheus endpoint.

Trainer side (relay/sides.py): pyzmq and relay.protocol only; the `relay status` of a base
install runs it on Python 3.8.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import zmq

from relay import keys as curve_keys
from relay import protocol

REPLY_TYPE = "status"


def _split(cls: type, data: dict) -> tuple[dict, dict]:
    """(the keys that are fields of `cls`, the others)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {key: value for key, value in data.items() if key in names}
    return known, {key: value for key, value in data.items() if key not in names}


class _Flat:
    """A map of the wire whose fields are plain values: each key a field, unknown keys in `extra`."""
    extra: Dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data.update(self.extra)
        return data


@dataclass
class RunStatus(_Flat):
    """One run of the spool. Counts of records: `received` = `uploaded` (confirmed by W&B) +
    `pending`; `pending` = `unsent` (not yet handed to the wandb SDK) + `unconfirmed` (handed over,
    not yet confirmed). `project`, `name` and `last_error` are cut to a size limit by the spool."""
    run_id: str
    received: int
    uploaded: int
    pending: int
    unsent: int
    unconfirmed: int
    state: str
    finished: bool
    project: Optional[str] = None
    name: Optional[str] = None
    oldest_pending_age: Optional[float] = None  # seconds the run's oldest pending record has waited
    state_since: Optional[float] = None         # wall clock
    last_error: Optional[str] = None            # for a run settling, why it waits
    exit_code: Optional[int] = None
    location: Optional[str] = None              # the W&B run's URL, or its offline directory
    last_seen: Optional[float] = None           # wall clock of the trainer's last record or heartbeat
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def handed_over(self) -> int:
        """Records handed to the wandb SDK (confirmed or not)."""
        return self.received - self.unsent


@dataclass
class RecordTotals(_Flat):
    """Record counts over every run of the spool (the same counts as a run's)."""
    received: int
    uploaded: int
    pending: int
    unsent: int
    unconfirmed: int
    oldest_pending_age: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunCounts(_Flat):
    """Runs in the spool (`total`), those active (not finished, or with records pending), how
    many the status lists, and both by state."""
    total: int
    active: int
    listed: int
    by_state: Dict[str, int] = field(default_factory=dict)
    active_by_state: Dict[str, int] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RelayStatus:
    """A relay's status: the spool's part (runs, totals, size) and the relay's own state.

    `runs` lists the active runs and the latest finished ones, or, for a page of every run
    (`paged`), the runs after the page's cursor, with `next` the cursor of the page after (None
    after the last). A reply carries its envelope: `t` ("status"), `v` (`version`) and the
    `stream` of the request it answers; a status not sent has `version` and `stream` None."""
    runs: List[RunStatus]
    records: RecordTotals
    run_counts: RunCounts
    spool_bytes: int
    spool_path: str
    mode: str
    bind: str
    uptime: float                          # seconds, on the relay's monotonic clock
    max_spool_bytes: int
    counters: Dict[str, int] = field(default_factory=dict)
    wandb_down_since: Optional[float] = None  # wall clock; None while W&B is reachable
    holding: bool = False                  # no room in the spool: records are not taken
    hold_reason: Optional[str] = None
    spool_error: Optional[str] = None      # the last failed spool write, until one succeeds
    paged: bool = False                    # a page of every run: the reply has `next`
    next: Optional[int] = None
    version: Optional[int] = None          # the reply's `v`
    stream: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    NOT_WIRE = ("paged", "next", "version", "stream", "extra")   # fields written by to_dict's own rules

    @classmethod
    def from_dict(cls, data: dict) -> RelayStatus:
        """Read a reply (or a status built from a spool's status and the relay's state)."""
        known, extra = _split(cls, data)
        for name in ("paged", "version", "extra"):
            if name in known:  # not keys of the wire: a newer relay's, kept as they came
                extra[name] = known.pop(name)
        for key in ("t", "v"):
            extra.pop(key, None)
        if data.get("t", REPLY_TYPE) != REPLY_TYPE:
            extra["t"] = data["t"]
        known.update(runs=[RunStatus.from_dict(run) for run in known.get("runs", [])],
                     records=RecordTotals.from_dict(known["records"]),
                     run_counts=RunCounts.from_dict(known["run_counts"]))
        return cls(**known, paged="next" in data, version=data.get("v"), extra=extra)

    def to_dict(self) -> dict:
        """The reply as it goes on the wire (and as `relay status --json` prints it)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.NOT_WIRE}
        data.update(runs=[run.to_dict() for run in self.runs], records=self.records.to_dict(),
                    run_counts=self.run_counts.to_dict())
        if self.paged:
            data["next"] = self.next
        if self.version is not None:
            data.update(t=REPLY_TYPE, v=self.version)
        if self.stream is not None:
            data["stream"] = self.stream
        data.update(self.extra)
        return data

    def not_listed(self) -> str:
        """'' when `runs` lists every run of the spool, else a line that counts the others by state."""
        left = self.run_counts.total - self.run_counts.listed
        if left <= 0:
            return ""
        by_state = dict(self.run_counts.by_state)
        for run in self.runs:
            by_state[run.state] = by_state.get(run.state, 0) - 1
        states = ", ".join("%s %s" % (state, format(n, ",")) for state, n in sorted(by_state.items()) if n > 0)
        return "%s more runs not listed (%s); `relay status --all` lists every run" % (format(left, ","), states)

    def totals_line(self) -> str:
        records = self.records
        return ("%s runs in the spool, %d active; records not yet confirmed by W&B: %d (%d not handed to W&B yet, "
                "%d handed over and unconfirmed)" % (format(self.run_counts.total, ","), self.run_counts.active,
                                                      records.pending, records.unsent, records.unconfirmed))

    def holding_line(self) -> str:
        """'' while the relay takes records, else why it holds them."""
        if not (self.holding or self.spool_error):
            return ""
        return "HOLDING new records (not acked): %s" % (self.spool_error or self.hold_reason
                                                         or "spool over max_spool_bytes")


def query_status(endpoint: str, timeout: float, keys: Optional[str] = None, every_run: bool = False) -> Optional[dict]:
    """Ask a running relay for its status; None if nothing answers within `timeout`.
    `keys`: a client key directory of `relay keys new`, for a relay started with --curve.
    `every_run`: ask page after page (each within `timeout`) and return the last page's status
    with `runs` holding every run of the spool."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        curve_keys.load_client_keys(keys).apply(sock)
    try:
        sock.connect(endpoint)
        request = {"v": protocol.VERSION, "t": "status", "stream": "status-%d" % os.getpid(), "seq": 0}
        if not every_run:
            return _ask(sock, request, timeout)
        runs = []  # type: list
        page = 0  # type: Optional[int]
        while page is not None:
            reply = _ask(sock, dict(request, page=page), timeout)
            if reply is None:
                return None
            status = RelayStatus.from_dict(reply)
            runs += status.runs
            page = status.next
        status.runs, status.run_counts.listed = runs, len(runs)
        status.paged, status.next = False, None
        return status.to_dict()
    finally:
        sock.close(linger=0)


def _ask(sock: zmq.Socket, request: dict, timeout: float) -> Optional[dict]:
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline:
        if not sent:
            try:
                sock.send(protocol.encode(request), zmq.NOBLOCK)
                sent = True
            except zmq.Again:
                pass
        if sock.poll(100, zmq.POLLIN):
            reply = protocol.decode_raw(sock.recv())
            if reply.get("t") == "status":
                return reply
    return None
