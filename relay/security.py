"""Who may talk to the relay: the bind policy and CurveZMQ client authentication.

The relay holds the W&B API key and reads files on its host, so a socket anyone on the network
can reach is a way into both. The policy:

- A loopback bind (127.0.0.0/8, ::1, localhost, ipc://, inproc://) needs nothing.
- Any other bind needs `--curve DIR` (CurveZMQ: encrypted, and only the client public keys in
  DIR/authorized are let in, checked by pyzmq's ZAP authenticator in a thread), or `--insecure`,
  which the relay warns about at start.
- DIR/authorized is read again when it changes (checked every second): adding a client needs no
  restart.
- A client refused by ZAP (unknown key) is logged once per address and key. A client without
  Curve at all fails the handshake before ZAP is asked; those are counted and logged rate-limited.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from relay import keys
from relay.errors import RelayError
from relay.config import RelayConfig

log = logging.getLogger("relay.security")
auth_log = logging.getLogger("zmq.auth")

LOCAL_TRANSPORTS = ("ipc", "inproc")
REMEMBER_REFUSED = 10000  # (address, key) pairs already logged as refused


class BindRefused(RelayError):
    """A bind address the policy refuses (non-loopback without --curve or --insecure)."""


def is_loopback(endpoint: str) -> bool:
    """True when only processes on this host can reach `endpoint`."""
    transport, _, address = endpoint.partition("://")
    if transport in LOCAL_TRANSPORTS:
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: assume the network can reach it


def check_bind(config: RelayConfig) -> None:
    """Refuse a non-loopback bind that has neither Curve keys nor an explicit --insecure."""
    if config.curve_dir or is_loopback(config.bind):
        return
    if config.insecure:
        log.warning("INSECURE: listening on %s without CurveZMQ (--insecure): anyone who can reach this "
                    "address can send runs to W&B under this relay's API key and name files for it to "
                    "read under its artifact roots; use `relay keys new DIR` and --curve DIR instead",
                    config.bind)
        return
    raise BindRefused(
        "refusing to listen on %s: it is not a loopback address, and without CurveZMQ anyone on that network "
        "could send runs to W&B under this relay's API key. Either create keys with `relay keys new DIR` and "
        "start with --curve DIR (trainers set RELAY_CLIENT_KEYS to the DIR/<client> directory), or, on a "
        "network you trust, pass --insecure (config `insecure: true`, RELAY_INSECURE=1); or bind a loopback "
        "address such as tcp://127.0.0.1:5555" % config.bind)


class RelayAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP authenticator, saying once per (address, key) which client it refused and why."""

    def __init__(self, context: zmq.Context, curve_dir: str):
        super().__init__(context, log=auth_log)
        self.authorized = os.path.join(curve_dir, keys.AUTHORIZED)
        self._address = ""
        self._refused: set = set()
        self._listing: tuple | None = None

    def load_authorized(self) -> None:
        """(Re)read the allowed client keys when DIR/authorized changed: a key added there lets that
        client in at its next connection, without a restart. Removing one refuses new connections
        (one already made stays until it drops or the relay restarts)."""
        listing = self._list_keys()
        if listing == self._listing:
            return
        first = self._listing is None
        self._listing = listing
        self.configure_curve(domain="*", location=self.authorized)  # a bad file: logged, old keys kept
        if not first:
            log.info("authorized client keys changed in %s: %d let in now", self.authorized, len(listing))

    def _list_keys(self) -> tuple:
        try:
            names = sorted(name for name in os.listdir(self.authorized) if name.endswith(".key"))
            return tuple((name, os.stat(os.path.join(self.authorized, name)).st_mtime_ns) for name in names)
        except OSError:
            return ()

    async def handle_zap_message(self, msg: list) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        peer = (self._address, client_key)
        if not allowed and peer not in self._refused:
            if len(self._refused) >= REMEMBER_REFUSED:
                self._refused.clear()  # bounded memory against a peer that makes a new key per attempt
            self._refused.add(peer)
            auth_log.warning("refused a client at %s: its Curve public key %s is not in %s (%s); to let it in, "
                             "put its <name>.key there (`relay keys new DIR --client NAME` makes one)",
                             self._address or "?", z85.encode(client_key).decode(), self.authorized,
                             reason.decode("utf-8", "replace"))
        return allowed, reason


class HandshakeWatch:
    """Logs clients that fail the Curve handshake before ZAP is asked (no Curve, wrong relay key).

    The bind side of ZeroMQ does not know the peer's address for these, so they are counted and
    logged at most once a minute."""

    EVERY = 60.0

    def __init__(self, sock: zmq.Socket):
        self.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.failed = 0
        self._logged_at: float | None = None
        self._logged_count = 0

    def read(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            recv_monitor_message(self.monitor)
            self.failed += 1
        now = time.monotonic()
        due = self._logged_at is None or now - self._logged_at >= self.EVERY
        if self.failed > self._logged_count and due:
            log.warning("refused %d connection attempts that failed the Curve handshake (a client without "
                        "RELAY_CLIENT_KEYS, or with keys made for another relay)", self.failed - self._logged_count)
            self._logged_at, self._logged_count = now, self.failed

    def close(self, sock: zmq.Socket) -> None:
        sock.disable_monitor()
        self.monitor.close(linger=0)


def secure(sock: zmq.Socket, context: zmq.Context, curve_dir: str) -> RelayAuthenticator:
    """Make `sock` a Curve server that lets in only the keys in curve_dir/authorized."""
    public, secret, clients = keys.load_relay_keys(curve_dir)
    authenticator = RelayAuthenticator(context, curve_dir)
    authenticator.start()
    authenticator.load_authorized()
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    log.info("CurveZMQ on: relay key %s, %d authorized client keys in %s", os.path.join(curve_dir, "relay.key"),
             len(clients), authenticator.authorized)
    return authenticator
