"""`relay status --watch`: a live terminal view of a running relay.

Polls the relay's `status` request every `interval` seconds and draws one table of runs (state,
received, uploaded, pending, unconfirmed, lag, upload rate, last error) under a header with the
W&B state, the spool's size against its limit, the holding flag, the relay's counters and its
totals (runs, records not yet confirmed by W&B); a last line counts the runs the status did not
list (finished long ago), by state. The upload rate of a run is computed here, from the records
handed to W&B (received - unsent) at two successive polls.

On a terminal the view is redrawn in place (rich.live); when the output is not a terminal (a
pipe, a log file) each refresh is printed once, one after the other.
"""
from __future__ import annotations

import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from relay.status import RelayStatus

COUNTERS = ("received", "acked", "duplicates", "refused", "malformed", "held")


def _clock(timestamp: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _megabytes(value: float) -> str:
    return "%.1f MB" % (value / 1e6)


def upload_rates(previous: dict | None, current: dict, elapsed: float) -> dict[str, float | None]:
    """Run id -> records handed to W&B per second between two polls of status replies (None on
    the first poll)."""
    before = {run.run_id: run.handed_over for run in RelayStatus.from_dict(previous).runs} if previous else {}
    rates: dict[str, float | None] = {}
    for run in RelayStatus.from_dict(current).runs:
        if run.run_id not in before or elapsed <= 0:
            rates[run.run_id] = None
        else:
            rates[run.run_id] = max(0, run.handed_over - before[run.run_id]) / elapsed
    return rates


def render(reply: dict, rates: dict[str, float | None], endpoint: str) -> Group:
    """The view of one status reply."""
    status = RelayStatus.from_dict(reply)
    down = status.wandb_down_since
    wandb = Text("W&B unreachable since %s" % _clock(down), style="bold red") if down else \
        Text("W&B reachable", style="green") if status.mode == "online" else Text(status.mode, style="yellow")
    header = Text.assemble(
        ("relay %s" % status.bind, "bold"), "  mode %s  up %.0f s  " % (status.mode, status.uptime), wandb,
        "\nspool %s of %s (%s)" % (_megabytes(status.spool_bytes), _megabytes(status.max_spool_bytes),
                                   status.spool_path))
    if status.holding_line():
        header.append("\n" + status.holding_line(), style="bold red")
    header.append("\n" + "  ".join("%s %d" % (name, status.counters.get(name, 0)) for name in COUNTERS))
    header.append("\n" + status.totals_line())
    table = Table(title="runs (from %s at %s)" % (endpoint, time.strftime("%H:%M:%S")), title_justify="left",
                  expand=False)
    for column, justify in (("run", "left"), ("project/name", "left"), ("state", "left"), ("since", "left"),
                            ("received", "right"), ("uploaded", "right"), ("pending", "right"),
                            ("unconfirmed", "right"), ("lag", "right"), ("upload rate", "right"),
                            ("last error", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for run in status.runs:
        rate = rates.get(run.run_id)
        lag = run.oldest_pending_age
        table.add_row(
            run.run_id, "%s/%s" % (run.project or "", run.name or ""),
            run.state + (" (exit %s)" % run.exit_code if run.finished else ""), _clock(run.state_since),
            str(run.received), str(run.uploaded), str(run.pending), str(run.unconfirmed),
            "%.0f s" % lag if lag is not None else "-", "%.1f/s" % rate if rate is not None else "-",
            Text(run.last_error or "", style="red"))
    if not status.runs:
        table.add_row("(no runs yet)", *[""] * 10)
    if status.not_listed():
        return Group(header, table, Text(status.not_listed()))
    return Group(header, table)


def watch(query: Callable[[], dict | None], endpoint: str, interval: float, count: int | None,
          console: Console) -> bool:
    """Poll and draw until `count` refreshes were drawn (None: until Ctrl-C). False when the relay
    stopped answering (the last view stays on screen with a note)."""
    previous, previous_at = None, 0.0
    drawn = 0

    def next_view() -> Group | Text | None:
        nonlocal previous, previous_at
        status = query()
        now = time.monotonic()
        if status is None:
            return None
        rates = upload_rates(previous, status, now - previous_at)
        previous, previous_at = status, now
        return render(status, rates, endpoint)

    view = next_view()
    if view is None:
        return False
    live = Live(view, console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start(refresh=True)
        else:
            console.print(view)
        drawn = 1
        while count is None or drawn < count:
            time.sleep(interval)  # the poll period of a watch, not a wait for readiness
            view = next_view()
            if view is None:
                console.print(Text("relay at %s stopped answering" % endpoint, style="bold red"))
                return False
            if live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
            drawn += 1
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return True
