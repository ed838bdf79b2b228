"""The wandb SDK (0.31, pinned) made ready for the relay's uploaders, which start many runs at once
from the threads of one process, and what it does on its own for each run turned off (those
processes are no user's training script; the costs: docs/performance.md):

- The SDK's process-wide settings are loaded by `wandb.setup()` before a run starts
  (`prepare_process`). The SDK would load them lazily at the first `wandb.init`, without a lock:
  defaults first, then the environment, so a `wandb.init` in another thread meanwhile could see the
  default W&B URL instead of `WANDB_BASE_URL` and fail after `init_timeout`.
- The SDK's analytics of itself (`prepare_process`): OpenTelemetry metrics, such as how long each
  `run.log` took to encode, exported to W&B, and a proxy built per wandb.init.
- Each online run's status checker (`quiet_run`): a thread per run asks wandb-core every 5 s for its
  network status, to print "retrying" lines (an uploader is silent), and every 15 s whether the run
  was stopped in the W&B UI, to interrupt the main thread (an uploader ignores SIGINT). It costs
  CPU in the SDK and in wandb-core for every open run, idle or not.

The analytics switch and the checker are private SDK state: a missing attribute (another wandb
version) leaves the SDK as it is.
"""
from __future__ import annotations

import logging
from typing import Any

import wandb

log = logging.getLogger("relay.uploader")


def prepare_process() -> None:
    """Before each wandb.init: the SDK's analytics of itself off for this process, and its settings
    loaded (once a process; again after a `wandb.teardown()`)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
        opentelemetry_proxy.disable()
    except (ImportError, AttributeError) as exc:
        log.debug("wandb analytics left on: %s", exc)
    wandb.setup()


def quiet_run(run: Any) -> None:
    """Stop the status checker of a run just started: its thread ends; its stop poll ends soon."""
    checker = getattr(run, "_run_status_checker", None)
    if checker is None:  # an offline run has none
        return
    try:
        checker.join()
    except AttributeError as exc:
        log.debug("wandb status checker left on: %s", exc)
