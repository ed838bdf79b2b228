"""The trainer side's one ZeroMQ socket to the relay, used only by the client's I/O thread.

A DEALER socket, made lazily in the process and thread that use it, from pyzmq's shared context
(one per process; pyzmq makes a new one in a forked child, as contexts do not survive fork; never
terminated here: a context of the client's own would be terminated when collected, and term()
waits for ever for a socket that was forgotten but not closed). Sends never wait: with IMMEDIATE, a
send finds no pipe while no relay is connected and fails at once (`send` returns False); the
records stay in the outbox.

While sends fail the connection says why, once the trouble has lasted STALL_WARNING seconds and
then at most once per `warn_every`: the relay refused the handshake (a Curve key it does not know,
or one side with Curve and the other without; read from the socket's monitor), or nothing answers.
ZeroMQ never retries a connection whose handshake the relay refused, so a socket whose sends have
failed for `reconnect_after` seconds is made anew (the caller then re-sends every unacked record):
a relay fixed meanwhile gets the records.

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import itertools
import time
from typing import Optional

import zmq

from relay.keys import ClientKeys
from relay.spill import Reporter

STALL_WARNING = 3.0    # seconds without a connection before the client warns
RECONNECT_AFTER = 30.0  # seconds of failed sends before the socket is made anew (see the module's text)
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused this client's Curve key (its <name>.key is not in the relay's "
                                     "authorized/ directory; `relay keys new DIR --client NAME` puts one there)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "and this client do not agree on encryption (a relay started with --curve "
                                         "needs RELAY_CLIENT_KEYS on the trainer; one without it needs none)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "broke off the connection handshake (a relay started with --curve needs "
                                          "RELAY_CLIENT_KEYS on the trainer, made for this relay: its relay.key)",
}

_MONITOR_NUMBERS = itertools.count()


class Connection:
    """The socket, its handshake monitor, and what to do while sends fail."""

    def __init__(self, endpoint: str, keys: Optional[ClientKeys], reporter: Reporter,
                 reconnect_after: float = RECONNECT_AFTER):
        self.endpoint = endpoint
        self.keys = keys
        self.report = reporter
        self.reconnect_after = reconnect_after
        self.fresh = False             # True once a socket was made, until the caller took note (`renewed`)
        self._socket = None            # type: Optional[zmq.Socket]
        self._monitor = None           # type: Optional[zmq.Socket]  (handshake failures of _socket)
        self._opened_at = 0.0
        self._stalled_since = 0.0      # when sends started failing, 0 while they do not
        self.handshake = ""            # why the relay last refused the handshake, "" if it did not

    @property
    def socket(self) -> zmq.Socket:
        if self._socket is None:
            context = zmq.Context.instance()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)       # no queueing into a pipe with no relay behind it
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.setsockopt(zmq.RCVHWM, 10000)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if self.keys is not None:
                self.keys.apply(sock)
            self._monitor = self._watch_handshakes(context, sock)
            sock.connect(self.endpoint)
            self._socket = sock
            self._opened_at = time.monotonic()
            self.fresh = True
        return self._socket

    def renewed(self) -> bool:
        """True once after each new socket: everything unacked must be sent again."""
        fresh, self.fresh = self.fresh, False
        return fresh

    def send(self, frame: bytes) -> bool:
        """Hand one frame to ZeroMQ without waiting; False when there is no connection now."""
        try:
            self.socket.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self._stalled_since = self._stalled_since or time.monotonic()
            return False
        self._stalled_since = 0.0
        self.handshake = ""
        return True

    def recv(self) -> Optional[bytes]:
        """One reply if one is there, else None."""
        try:
            return self.socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def stalled(self, pending: int) -> None:
        """Sends are failing: say why once it lasts, and make the socket anew now and then."""
        if not self._stalled_since:
            return
        now = time.monotonic()
        if now - self._stalled_since <= STALL_WARNING:
            return  # a connection being made
        if self.report.due("absent"):
            self._read_handshakes()
            if self.handshake:
                self.report.warn("absent", "%s; %d records pending (kept and re-sent)" % (self.handshake, pending))
            else:
                self.report.warn("absent", "relay at %s is not answering; %d records pending (kept and re-sent; "
                                 "start it with `relay serve`)" % (self.endpoint, pending))
        if now - self._opened_at > self.reconnect_after and now - self._stalled_since > self.reconnect_after:
            self._read_handshakes()
            self.close()  # the next send connects anew

    def close(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = self._monitor = None

    def _watch_handshakes(self, context: zmq.Context, sock: zmq.Socket) -> zmq.Socket:
        address = "inproc://relay-client-handshakes-%d" % next(_MONITOR_NUMBERS)  # never reused in a context
        sock.monitor(address, sum(HANDSHAKE_FAILURES))
        monitor = context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.setsockopt(zmq.RCVHWM, 0)  # never full: ZeroMQ's I/O thread must not wait on this pipe
        monitor.connect(address)
        return monitor

    def _read_handshakes(self) -> None:
        """Why the relay refused the connection, if it did (only looked at while sends fail)."""
        from zmq.utils.monitor import recv_monitor_message

        event = None
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
        if event is None:
            return
        reason = "relay at %s %s" % (self.endpoint, HANDSHAKE_FAILURES.get(event, "refused the connection"))
        if reason != self.handshake:
            self.handshake = reason
            self.report.error(reason)
