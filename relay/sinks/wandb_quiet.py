"""What the wandb SDK (0.31, pinned) does on its own for each run, turned off in the relay's
uploaders, which serve many runs and are no user's training script. Measured with 100 online runs
in one process on the shared wandb-core (the figures: docs/performance.md):

- Each online run's status checker (`quiet_run`): a thread per run asks wandb-core every 5 s for its
  network status, to print "retrying" lines (an uploader is silent), and every 15 s whether the run
  was stopped in the W&B UI, to interrupt the main thread (in an uploader, which ignores SIGINT:
  nothing). Idle, that was 0.2 ms of SDK and 0.1 ms of wandb-core CPU per run per second: 0.3 cores
  for 1,000 open runs.
- The SDK's analytics of itself (`quiet_process`): OpenTelemetry metrics, such as how long each
  `run.log` took to encode, exported to W&B; ~70 us of CPU per row, and a proxy built per wandb.init.

Both are private SDK state: a missing attribute (another wandb version) leaves the SDK as it is.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("relay.uploader")


def quiet_process() -> None:
    """The SDK's analytics of itself off for this process (before wandb.init: it builds a proxy)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
        opentelemetry_proxy.disable()
    except (ImportError, AttributeError) as exc:
        log.debug("wandb analytics left on: %s", exc)


def quiet_run(run: Any) -> None:
    """Stop the status checker of a run just started: its thread ends; its stop poll ends soon."""
    checker = getattr(run, "_run_status_checker", None)
    if checker is None:  # an offline run has none
        return
    try:
        checker.join()
    except AttributeError as exc:
        log.debug("wandb status checker left on: %s", exc)
