"""CurveZMQ key files: made by `relay keys new`, read by the relay and by trainers.

One directory made by `relay keys new DIR` holds everything; each part goes to one place:

    DIR/relay.key, DIR/relay.key_secret   the relay's keypair (the secret never leaves the relay host)
    DIR/authorized/<name>.key             client public keys the relay accepts (`relay serve --curve DIR`)
    DIR/<name>/                           what trainer node <name> needs: <name>.key, <name>.key_secret
                                          and a copy of relay.key (RELAY_CLIENT_KEYS=<that directory>)

Files use pyzmq's certificate format (zmq.auth). Secret files are mode 0600, directories 0700.
Needs only pyzmq, and stays importable on Python 3.8: the trainer side reads its keys with it.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from typing import List, NamedTuple, Optional, Tuple

import zmq
from zmq.utils import z85

from relay import durable
from relay.errors import CurveKeyError  # noqa: F401 (part of this module's API)

CLIENT_KEYS_VARIABLE = "RELAY_CLIENT_KEYS"
RELAY_NAME = "relay"
AUTHORIZED = "authorized"
DEFAULT_CLIENT = "client"


class ClientKeys(NamedTuple):
    """What a client socket needs: its own keypair and the relay's public key (z85 bytes)."""
    public: bytes
    secret: bytes
    server: bytes
    directory: str

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveKeyError("this pyzmq (libzmq %s) was built without CURVE support; install pyzmq from its "
                            "wheels (`pip install --force-reinstall pyzmq`), which include it" % zmq.zmq_version())


def _valid_key(key: Optional[bytes]) -> bool:
    if key is None or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        return False


def read_key_file(path: str, secret: bool) -> Tuple[bytes, Optional[bytes]]:
    """(public, secret) from a certificate file; CurveKeyError naming the file when it is not one."""
    import zmq.auth  # imported here: only Curve users pay for it

    hint = "(make keys with `relay keys new DIR` on the relay host)"
    if not os.path.isfile(path):
        raise CurveKeyError("Curve key file %s is missing %s" % (path, hint))
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError("Curve key file %s is unreadable: %s %s" % (path, exc, hint)) from None
    if not _valid_key(public) or (secret and not _valid_key(secret_key)):
        raise CurveKeyError("Curve key file %s holds no valid %s key %s"
                            % (path, "secret" if secret else "public", hint))
    return public, secret_key


def load_client_keys(directory: str) -> ClientKeys:
    """A trainer's keys: the one <name>.key_secret in `directory` and the relay's relay.key."""
    require_curve()
    if not os.path.isdir(directory):
        raise CurveKeyError("relay client keys: %s is not a directory (copy DIR/<name>/ made by "
                            "`relay keys new DIR` on the relay host, and point %s or `keys` at it)"
                            % (directory, CLIENT_KEYS_VARIABLE))
    secrets = sorted(path for path in glob.glob(os.path.join(directory, "*.key_secret"))
                     if os.path.basename(path) != RELAY_NAME + ".key_secret")
    if len(secrets) != 1:
        found = "none" if not secrets else ", ".join(os.path.basename(path) for path in secrets)
        raise CurveKeyError("relay client keys: %s must hold exactly one client <name>.key_secret (found %s); "
                            "use the DIR/<name>/ directory made by `relay keys new DIR`, not DIR itself"
                            % (directory, found))
    public, secret = read_key_file(secrets[0], secret=True)
    server, _ = read_key_file(os.path.join(directory, RELAY_NAME + ".key"), secret=False)
    return ClientKeys(public, secret, server, directory)


def load_relay_keys(directory: str) -> Tuple[bytes, bytes, List[str]]:
    """The relay's keypair and the authorized client key files, checked before the relay listens."""
    require_curve()
    public, secret = read_key_file(os.path.join(directory, RELAY_NAME + ".key_secret"), secret=True)
    authorized = os.path.join(directory, AUTHORIZED)
    clients = sorted(glob.glob(os.path.join(authorized, "*.key")))
    if not clients:
        raise CurveKeyError("no client keys in %s: no trainer could connect (add one with "
                            "`relay keys new %s --client NAME`)" % (authorized, directory))
    for path in clients:
        read_key_file(path, secret=False)
    return public, secret, clients


# -- making keys (`relay keys new`) -----------------------------------------------------------------

def _make_keypair(directory: str, name: str) -> Tuple[str, str]:
    """Write <name>.key and <name>.key_secret into `directory`, never half-written: both are made
    in a private temporary directory beside them, then fsynced and renamed into place, and the
    directory fsynced (relay.durable)."""
    import zmq.auth

    staging = tempfile.mkdtemp(prefix=".keys-", dir=directory)  # mode 0700
    try:
        public, secret = zmq.auth.create_certificates(staging, name)
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
        targets = (os.path.join(directory, name + ".key"), os.path.join(directory, name + ".key_secret"))
        durable.replace(secret, targets[1], sync_dir=False)
        durable.replace(public, targets[0], sync_dir=False)
        durable.fsync_dir(directory)
        return targets
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy(source: str, target: str) -> None:
    """Copy a public key file durably (relay.durable: never a half-written key file)."""
    with open(source, "rb") as handle:
        durable.write_bytes(target, handle.read(), mode=0o644)


def _private_dir(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    durable.fsync_dir(os.path.dirname(os.path.abspath(path)))  # its entry in the parent, durable too
    return path


def planned_files(directory: str, clients: List[str], relay_keypair: bool) -> List[str]:
    files = [os.path.join(directory, RELAY_NAME + suffix) for suffix in (".key", ".key_secret")] if relay_keypair else []
    for name in clients:
        files.append(os.path.join(directory, AUTHORIZED, name + ".key"))
        files += [os.path.join(directory, name, name + suffix) for suffix in (".key", ".key_secret")]
    return files


def valid_client_name(name: str) -> bool:
    return bool(name) and name != RELAY_NAME and name != AUTHORIZED and not name.startswith(".") and \
        all(c.isalnum() or c in "-_." for c in name)


def create_keys(directory: str, clients: List[str], force: bool = False) -> dict:
    """Make the relay keypair (kept if one is there, unless `force`) and a keypair per client.

    Refuses, before writing anything, to replace an existing key file unless `force`.
    Returns {"relay": (public, secret) paths, "relay_created": bool, "clients": {name: dir}}.
    """
    require_curve()
    bad = [name for name in clients if not valid_client_name(name)]
    if bad:
        raise CurveKeyError("client name(s) %s: use letters, digits, '-', '_' or '.', not 'relay' or 'authorized'"
                            % ", ".join(repr(name) for name in bad))
    if len(set(clients)) != len(clients):
        raise CurveKeyError("client names repeat: %s" % ", ".join(clients))
    relay_files = (os.path.join(directory, RELAY_NAME + ".key"), os.path.join(directory, RELAY_NAME + ".key_secret"))
    relay_exists = all(os.path.exists(path) for path in relay_files)
    make_relay = force or not relay_exists
    existing = [path for path in planned_files(directory, clients, make_relay) if os.path.lexists(path)]
    if existing and not force:
        raise CurveKeyError("refusing to overwrite existing key files: %s (pass --force to replace them; "
                            "trainers holding the old keys are then refused)" % ", ".join(existing))
    if not make_relay:
        read_key_file(relay_files[1], secret=True)  # reuse only a readable relay keypair
    _private_dir(directory)
    if make_relay:
        _make_keypair(directory, RELAY_NAME)
    authorized = _private_dir(os.path.join(directory, AUTHORIZED))
    made = {}
    for name in clients:
        client_dir = _private_dir(os.path.join(directory, name))
        public, _ = _make_keypair(client_dir, name)
        _copy(public, os.path.join(authorized, name + ".key"))
        _copy(relay_files[0], os.path.join(client_dir, RELAY_NAME + ".key"))
        made[name] = client_dir
    return {"relay": relay_files, "relay_created": make_relay, "clients": made}
