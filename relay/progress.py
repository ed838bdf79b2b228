"""Progress of large upload backlogs, for the relay's log.

After a W&B outage, or once `relay replay` put a spill file's records into the spool, a run can
have tens of thousands of records waiting to go to W&B. The server feeds this tracker each run's
(received, pending) counts from the spool once per scan; a run whose pending count reaches the
`progress_backlog` threshold is followed until nothing of it is pending, with a log line every
`progress_every` seconds:

    run R: uploaded 12,000 of 100,000 backlog records (2,400 records/s, ETA 36 s)

The backlog's total is what was pending when it was noticed plus whatever the trainer sent
since, so `uploaded` and `of` always add up. Pure bookkeeping: no I/O, no clock of its own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backlog:
    started: float          # monotonic time the backlog was noticed
    base_uploaded: int      # the run's uploaded count (received - pending) at that time
    last_report: float
    last_uploaded: int      # uploaded since `started`, at the last report (for the rate)
    received: int = 0       # the run's received count at the last update


def _eta(seconds: float) -> str:
    if seconds < 90:
        return "%.0f s" % seconds
    if seconds < 5400:
        return "%.0f min" % (seconds / 60)
    return "%.1f h" % (seconds / 3600)


class BacklogProgress:
    def __init__(self, threshold: int, every: float):
        self.threshold = threshold
        self.every = every
        self.backlogs: dict[str, Backlog] = {}

    def update(self, now: float, counts: dict[str, tuple[int, int]]) -> list[str]:
        """`counts`: run id -> (received, pending) of the unfinished runs. A followed run missing
        from `counts` finished: nothing of it is pending any more. Returns the lines to log now."""
        lines = []
        gone = {run_id: (backlog.received, 0) for run_id, backlog in self.backlogs.items() if run_id not in counts}
        for run_id, (received, pending) in list(counts.items()) + list(gone.items()):
            uploaded = received - pending
            backlog = self.backlogs.get(run_id)
            if backlog is None:
                if pending >= self.threshold:
                    self.backlogs[run_id] = Backlog(now, uploaded, now, 0, received)
                    lines.append("run %s: %s records waiting to upload to W&B; progress every %.0f s"
                                 % (run_id, format(pending, ","), self.every))
                continue
            backlog.received = received
            done = max(0, uploaded - backlog.base_uploaded)
            total = done + pending
            elapsed = now - backlog.started
            if pending == 0:
                del self.backlogs[run_id]
                lines.append("run %s: backlog of %s records uploaded in %.0f s (%s records/s)"
                             % (run_id, format(total, ","), elapsed, format(round(done / max(elapsed, 1e-9)), ",")))
            elif now - backlog.last_report >= self.every:
                rate = max(0, done - backlog.last_uploaded) / (now - backlog.last_report)
                eta = "ETA %s" % _eta(pending / rate) if rate > 0 else "no progress: is W&B reachable?"
                lines.append("run %s: uploaded %s of %s backlog records (%s records/s, %s)"
                             % (run_id, format(done, ","), format(total, ","), format(round(rate), ","), eta))
                backlog.last_report = now
                backlog.last_uploaded = done
        return lines
