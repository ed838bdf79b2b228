"""Asking a running relay for its status, and the lines that sum a status reply up.

`relay status`, `relay status --watch`, `relay demo` and the test and benchmark harnesses
(relay.testing) all ask through `query_status`. Trainer side: pyzmq and relay.protocol only
(Python 3.8).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import zmq

from relay import keys as curve_keys
from relay import protocol


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
            runs += reply["runs"]
            page = reply.pop("next", None)
        reply["runs"] = runs
        reply["run_counts"]["listed"] = len(runs)
        return reply
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


def not_listed(status: dict) -> str:
    """'' when `runs` lists every run of the spool, else a line that counts the others by state."""
    counts = status["run_counts"]
    left = counts["total"] - counts["listed"]
    if left <= 0:
        return ""
    by_state = dict(counts["by_state"])
    for run in status["runs"]:
        by_state[run["state"]] = by_state.get(run["state"], 0) - 1
    states = ", ".join("%s %s" % (state, format(n, ",")) for state, n in sorted(by_state.items()) if n > 0)
    return "%s more runs not listed (%s); `relay status --all` lists every run" % (format(left, ","), states)


def totals_line(status: dict) -> str:
    records = status["records"]
    return ("%s runs in the spool, %d active; records not yet confirmed by W&B: %d (%d not handed to W&B yet, "
            "%d handed over and unconfirmed)" % (format(status["run_counts"]["total"], ","),
                                                  status["run_counts"]["active"], records["pending"],
                                                  records["unsent"], records["unconfirmed"]))
