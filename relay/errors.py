"""The package's exceptions: one tree under RelayError.

Every exception class defined in `relay` derives from RelayError, and also from the built-in
exception its callers have always caught (so `except ValueError` still catches a ProtocolError):

    RelayError
    ├── CurveKeyError (ValueError)      a key file or directory missing or unreadable (relay.keys)
    ├── ProtocolError (ValueError)      a frame that can never be accepted; carries stream, seq (relay.protocol)
    ├── ForkedRunError (RuntimeError)   a Run used in a process forked from the one that started it (relay.client)
    ├── PatchError                      a run.py `relay tokenhsi patch` cannot patch or revert
    │                                   (relay.integrations.tokenhsi_patch)
    ├── MissingExtra (click.ClickException)  a command that needs the server extra (relay.cli)
    │   relay side, defined in their modules:
    ├── ConfigError (ValueError)        a bad relay.yaml, RELAY_* variable or flag (relay.yamlfile, relay.config)
    ├── RefusedPath (ValueError)        a checkpoint path the relay may not read (relay.artifacts)
    ├── SnapshotError (RuntimeError)    the relay could not take a checkpoint snapshot (relay.snapshots)
    ├── SpoolError (RuntimeError)       the spool cannot be opened or written (relay.spool)
    ├── BindRefused                     a bind address the security policy refuses (relay.security)
    └── Unreachable, Interrupted (ConnectionError)  an uploader's wait for W&B
                                        (relay.sinks.wandb_api, relay.rowcount)

The trainer-side ones are defined here and importable from their modules too (`from relay.keys
import CurveKeyError` keeps working). Trainer side: standard library only (Python 3.8).
"""
from __future__ import annotations

from typing import Optional


class RelayError(Exception):
    """The base of every exception this package defines."""


class CurveKeyError(RelayError, ValueError):
    """A key file or directory that is missing or unreadable; the message says what to do."""


class ProtocolError(RelayError, ValueError):
    """A frame that can never be accepted. `stream`/`seq` are set when they could be read."""

    def __init__(self, reason: str, stream: Optional[str] = None, seq: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.stream = stream
        self.seq = seq


class ForkedRunError(RelayError, RuntimeError):
    """A Run (or its id) used in a process forked from the one that started it."""


class PatchError(RelayError):
    """The file cannot be patched (or reverted); the message says why and what was expected."""
