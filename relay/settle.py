"""The settle rule: when W&B's count of a run's history rows can be trusted, so that the run may
be resumed on it. Pure: the counts and the (monotonic) times are given.

W&B counts a run's history rows seconds after they arrive (up to `wandb_count_lag`), and a resume
goes on from that count: wandb-core continues its file stream at that line, the relay its steps.
Resumed on a count that trails what W&B holds, the next rows would land on lines already taken,
over rows W&B had. A count is trusted when it is
- equal to the steps the relay handed to the SDK for the run (every row arrived and is counted);
- smaller, once no writer of the run has been alive for the lag (what arrived is counted; the rest
  never arrives, and is handed again);
- larger (rows the relay did not hand, e.g. a spool made anew), once it has held still for the lag;
- absent (W&B answered without one): wandb.init decides.
The uploader knows when the last writer stopped: when it took the run's lock (the uploader before
it is gone, and that uploader's wandb-core with it), or when it closed a stream left open for the
run in the shared wandb-core.
"""
from __future__ import annotations

SETTLE_POLL = 0.5  # seconds between looks at W&B's count of a run's rows while it settles


class Settling:
    """One wait for a run's count to be trusted: `look` at each count W&B gives until it says so."""

    def __init__(self, handed: int, lag: float, writers_gone: float, now: float):
        self.handed = handed              # steps handed to the SDK for the run, over all relay lives
        self.lag = lag                    # wandb_count_lag
        self.writers_gone = writers_gone  # no writer of the run's history is alive since then
        self.count: int | None = None     # the last count looked at
        self.wait = 0.0                   # seconds until the next look, once `look` said why not yet
        self._changed = now               # when the count last changed

    def look(self, count: int | None, now: float) -> str | None:
        """Look at W&B's count at `now`: None if it can be trusted, else why the run still waits
        (what `relay status` shows)."""
        if count != self.count:
            self.count, self._changed = count, now
        if count is None or count == self.handed:
            return None
        ready_at = (self.writers_gone if count < self.handed else self._changed) + self.lag
        if now >= ready_at:
            return None
        self.wait = min(SETTLE_POLL, ready_at - now)
        if count < self.handed:
            return ("W&B counts %d of the %d rows handed to it; resuming when it counts them all, or in %.0f s "
                    "at most" % (count, self.handed, ready_at - now))
        return ("W&B counts %d rows, more than the %d handed to it; resuming when the count has held for "
                "%.0f s" % (count, self.handed, self.lag))
