"""W&B's count of a run's history rows, as an uploader uses it: the wait before a resume until the
count can be trusted (the rule is relay/settle.py's), and, while the run is open, the periodic
question that lets the spool go of what W&B holds and notices an outage (the SDK retries quietly;
this question does not).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from relay.config import RelayConfig
from relay.errors import RelayError
from relay.settle import Settling
from relay.sinks.wandb_api import COUNT_ERRORS, probe, short_error
from relay.spool_uploads import Uploads

log = logging.getLogger("relay.uploader")  # part of the uploader's log, as operators read it


class Interrupted(RelayError, ConnectionError):
    """The uploader was told to stop while the run waited for W&B's count to settle."""


class RowCount:
    """One run's count in W&B, for its uploader. `wait(seconds, wake_on)` is the uploader's wait
    (cut short by the server's bytes in `wake_on`, or by `interrupt`)."""

    def __init__(self, run_id: str, config: RelayConfig, uploads: Uploads, count: Callable[[], int],
                 wait: Callable[[float, bytes], None], interrupt: threading.Event):
        self.run_id = run_id
        self.config = config
        self._uploads = uploads
        self._count = count                # the open run's count (raises one of COUNT_ERRORS)
        self._wait = wait
        self._interrupt = interrupt
        self.confirmed_step = 0            # W&B holds every row below this step
        self.unreachable = False           # the last question went unanswered
        self._next_confirm = 0.0           # monotonic time of the next question
        # No earlier writer of this run's history is alive since this moment (monotonic): an
        # uploader that had the run before is gone (we hold its lock), and its wandb-core with it.
        self.writers_gone = time.monotonic()

    # -- before a resume ----------------------------------------------------------------------

    def settle(self, settings: dict) -> None:
        """Return once W&B's count of the run's history rows can be trusted; raise Unreachable
        (relay/sinks/wandb_api.py) if W&B does not answer, Interrupted if told to stop."""
        settling = Settling(self._uploads.steps_handed(self.run_id), self.config.wandb_count_lag,
                            self.writers_gone, time.monotonic())
        waited = False
        while True:
            count = probe(settings.get("entity"), settings["project"], self.run_id, self.config.request_timeout)
            why = settling.look(count, time.monotonic())
            if why is None:
                break
            self._uploads.set_state(self.run_id, "settling", why)
            waited = True
            self._wait(settling.wait, b"")
            if self._interrupt.is_set():
                raise Interrupted("stopped while W&B's count of run %s settled" % self.run_id)
        if count is not None and count != settling.handed:
            log.info("run %s: W&B counts %d rows (the relay handed %d) and nothing more can arrive: resuming "
                     "there", self.run_id, count, settling.handed)
        if waited:
            self._uploads.set_state(self.run_id, "initialising")

    # -- while the run is open ----------------------------------------------------------------

    def started(self, server_step: int) -> None:
        """The run is open, and W&B holds every row below `server_step`."""
        self.confirmed_step = server_step
        self._next_confirm = time.monotonic() + self.config.confirm_every

    def due(self, next_step: int) -> bool:
        """Time to ask again, with rows handed that W&B has not confirmed."""
        return time.monotonic() >= self._next_confirm and next_step > self.confirmed_step

    def backlog_full(self, next_step: int) -> bool:
        """As many rows handed beyond W&B's count as wandb-core may hold (`max_unconfirmed_rows`)."""
        return next_step - self.confirmed_step >= self.config.max_unconfirmed_rows

    def confirm(self) -> None:
        """Ask W&B how many history rows it holds; the spool lets go of those rows."""
        self._next_confirm = time.monotonic() + self.config.confirm_every
        try:
            server_step = self._count()
        except COUNT_ERRORS as exc:
            self.unreachable = True
            self._uploads.set_state(self.run_id, "retrying", "asking W&B for the run failed: %s" % short_error(exc))
            return
        self.unreachable = False
        self._uploads.set_state(self.run_id, "uploading")
        if server_step > self.confirmed_step:
            self._uploads.confirm_console(self.run_id, server_step)
            confirmed = self._uploads.confirm_logged(self.run_id, server_step)
            log.debug("run %s: W&B holds %d rows; %d spooled records let go", self.run_id, server_step, confirmed)
            self.confirmed_step = server_step

    def wait_until_reachable(self, retry_now: bytes) -> None:
        """Ask until W&B answers (or the uploader is told to stop), waiting `backoff_max` between
        tries unless the server sends `retry_now` (W&B answers another uploader again)."""
        self.confirm()
        while self.unreachable and not self._interrupt.is_set():
            self._wait(self.config.backoff_max, retry_now)
            self.confirm()

