"""How often a run's rows go to W&B, so that all live runs together stay within
`upload_requests` file-stream requests a second. Pure: the live-run count and the clock are given.

What wandb-core does (0.31, pinned): each run's file stream sends what it has collected at most
once per transmit interval, a setting read once, at `wandb.init`, in whole seconds (a fraction is
cut off: 0.5 would mean its default of 15 s). A run's wandb-core interval is therefore fixed for
the life of the W&B run; the relay sets it to `upload_interval`. Rows that arrive steadily go out
once per interval, one request each time. Rows handed over in one burst after a quiet spell go
out as two requests: the run's summary at once (it is updated before each row), the rows one
interval later.

What the relay does: a run's uploader asks `Cadence.wait()` before it hands rows to the SDK. While
`upload_interval` keeps the live runs within the budget (N runs x 1 / upload_interval <=
upload_requests), it hands rows over as they come and wandb-core sets the pace. With more live runs
it hands them over in bursts, one burst (at most HAND_OVER seconds long) every 2 x N /
upload_requests seconds: two requests per burst, so 1 / (N / upload_requests) a second per run.
The count of live runs is read again before each burst, so a run's pace follows the load as runs
come and go, whenever it started. A run's first burst is the one that hands its first rows, at once
(until then nothing waits); the next one after a fraction of the gap, its phase, which its run id
gives (`phase`), and the following ones a whole gap apart (the same once the live runs first need a
gap): runs opened together (a sweep, a relay restarted under load) spread their bursts over the gap
instead of all bursting at once every gap. Offline runs make no requests but keep the same pace: an
uploader's fixed cost per hand-over (reading the run's records, committing their steps to the
spool) is then paid once per burst, not once per row.
"""
from __future__ import annotations

import time
import zlib
from typing import Callable

from relay.config import RelayConfig

HAND_OVER = 0.5  # seconds an uploader goes on handing rows once a burst began (shorter than any wandb-core interval)
REQUESTS_PER_BURST = 2  # the summary at once, the rows one wandb-core interval later


def upload_interval(config: RelayConfig, live_runs: int) -> float:
    """Seconds between a run's file-stream requests now: `upload_interval`, stretched so that the
    live runs together make at most `upload_requests` requests a second."""
    return max(config.upload_interval, max(1, live_runs) / config.upload_requests)


def phase(run_id: str) -> float:
    """The run's phase, in (0, 1]: evenly spread over run ids, the same for a run every time."""
    return (zlib.crc32(run_id.encode("utf-8")) % 1000 + 1) / 1000.0


class Cadence:
    """When one run's uploader may hand rows to the SDK (see the module docstring)."""

    def __init__(self, config: RelayConfig, live_runs: Callable[[], int], clock: Callable[[], float] = time.monotonic,
                 phase: float = 1.0):
        self.config = config
        self.live_runs = live_runs
        self.clock = clock
        self.phase = phase
        self.burst_began: float | None = None  # when the last burst began (None: no rows handed yet)
        self.paced = False  # the last burst began after a gap (the next waits a whole gap, not its phase of one)

    def handed_rows(self, rows: bool = True) -> None:
        """The uploader handed records to the SDK, `rows` among them: the first time it handed rows
        was the run's first burst."""
        if rows and self.burst_began is None:
            self.burst_began = self.clock()

    def gap(self) -> float:
        """Seconds from one burst to the next now; 0 while rows may go over as they come."""
        interval = upload_interval(self.config, self.live_runs())
        return 0.0 if interval <= self.config.upload_interval else REQUESTS_PER_BURST * interval

    def wait(self) -> float:
        """Seconds until rows may be handed over (0: now; a burst begins if none is going on)."""
        now = self.clock()
        if self.burst_began is None or now - self.burst_began < HAND_OVER:
            return 0.0  # nothing waits for a run's first rows (its open, config, meta), nor within a burst
        gap = self.gap()
        if gap:
            due = self.burst_began + gap * (1.0 if self.paced else self.phase)
            if now < due:
                return due - now
        self.paced = bool(gap)  # this burst waited for its turn
        self.burst_began = now
        return 0.0
