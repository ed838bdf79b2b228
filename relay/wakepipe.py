"""An uploader's waits on the relay server: its wake pipe (a byte cuts a wait short, end of file
means the server is gone) and its stop flag. Part of relay/uploader.py's process.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time

log = logging.getLogger("relay.uploader")

WAKE, RETRY_NOW = b"w", b"r"  # what the server writes to an uploader's wake pipe


class WakePipe:
    """The server's side of an uploader's waits: a byte on the wake pipe cuts a wait short, end of
    file there means the server is gone (the uploader exits at once), `interrupt` means stop."""

    def __init__(self, run_id: str, fd: int | None, interrupt: threading.Event):
        self.run_id = run_id
        self.fd = fd                # readable when the server has news; EOF when it is gone
        self.interrupt = interrupt

    def wait(self, seconds: float, wake_on: bytes) -> None:
        """Wait `seconds`, less if the server sends one of the bytes in `wake_on` (WAKE: records
        came; RETRY_NOW: W&B answers another uploader again) or we are told to stop."""
        if self.fd is None:
            self.interrupt.wait(seconds)
            return
        deadline = time.monotonic() + seconds
        while not self.interrupt.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                readable, _, _ = select.select([self.fd], [], [], min(left, 1.0))
                if not readable:
                    continue
                news = os.read(self.fd, 4096)
            except InterruptedError:
                continue
            if not news:
                log.warning("run %s: the relay server is gone; uploader exits (records stay in the spool)",
                            self.run_id)
                os._exit(3)
            if any(byte in wake_on for byte in news):
                return

    def idle(self) -> None:
        """Wait up to a second for the server's wake-up byte."""
        self.wait(1.0, RETRY_NOW + WAKE)
