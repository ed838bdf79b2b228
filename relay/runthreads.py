"""The threads a run starts beside the training loop: its provenance (relay.provenance) and its
system metrics sampler (relay.sysmetrics).

What they hand over goes through `RunThreads.submit`, under the client's lock, like any record of
the trainer's: never after the run's finish record (`finish` stops them first, under that lock)
nor after the client's close. Neither thread is ever waited for by a trainer call except `finish`,
which gives the provenance at most its `timeout` to arrive first.

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from relay.provenance import GIT_TIMEOUT, Provenance
from relay.sysmetrics import Sampler


class RunThreads:
    """A run's provenance thread (when `provenance`) and sampler (every `system_metrics` seconds)."""

    def __init__(self, client: Any, run_id: str, provenance: Optional[bool], system_metrics: Optional[float]):
        """`provenance`, `system_metrics` (seconds, 0: none): the client's when None."""
        self.client = client
        self.run_id = run_id
        self.stopped = False
        provenance = client.provenance if provenance is None else bool(provenance)
        every = client.system_metrics if system_metrics is None else float(system_metrics or 0)
        self.provenance = Provenance(run_id, self.submit) if provenance else None
        self.sampler = Sampler(run_id, every, self.submit) if every else None

    def open(self, settings: Dict[str, Any]) -> "RunThreads":
        """Send the run's `open` record (its `meta` says a `meta` record follows: the relay waits a
        little for it before wandb.init, where the run's host, program and commit are set), then
        start the threads."""
        record = {"t": "open", "run": self.run_id, "settings": settings}
        if self.provenance is not None:
            record["meta"] = True
        self.client.submit(record)
        return self.start()

    def start(self) -> "RunThreads":
        try:
            for thread in (self.provenance, self.sampler):
                if thread is not None:
                    thread.start()
        except RuntimeError as exc:  # no thread to be had: the run goes on without them
            self.client._report.warn("threads", "no provenance or system metrics for this run: %s" % exc)
        return self

    def submit(self, message: Dict[str, Any]) -> bool:
        """Hand a record to the client; False (and dropped) once the run's finish or close has come."""
        with self.client._lock:
            if self.stopped or self.client._closed:
                return False
            self.client.submit(message)
            return True

    def finish(self, timeout: float) -> None:
        """Before the run's finish record: wait at most `timeout` (and GIT_TIMEOUT) for the
        provenance, then take nothing more."""
        if self.provenance is not None and self.provenance.is_alive():
            self.provenance.join(max(0.0, min(timeout, GIT_TIMEOUT + 1.0)))
        self.stop()

    def stop(self) -> None:
        with self.client._lock:
            self.stopped = True
        if self.sampler is not None:
            self.sampler.stop()
