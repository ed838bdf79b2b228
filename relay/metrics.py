"""Prometheus metrics of a running relay (`relay serve --metrics-bind HOST:PORT`).

Nothing is counted on the ingest path for this: a custom collector reads the relay's counters and
state (`RelayGauges`, from a callable the relay hands over) and the spool's status at scrape time,
from its own SQLite connection (WAL readers do not block the relay's writes). Exposed with
prometheus_client's HTTP server on a registry of its own, in a daemon thread of the relay process.

Per-run series (label `run`) exist for the runs not yet finished in W&B, as long as there are at
most MAX_RUN_LABELS of them; past that only the relay-wide totals are exposed, so a relay with
thousands of runs does not flood the metrics store.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import spool_db
from relay.config import parse_host_port
from relay.spool_db import Footprint
from relay.spool_report import SpoolReport
from relay.status import RecordTotals, RunCounts, RunStatus

log = logging.getLogger("relay.metrics")

MAX_RUN_LABELS = 100
SERVER_COUNTERS = {  # server counter -> (metric name without relay_ and _total, help)
    "received": ("received", "records stored in the spool (new, not duplicates)"),
    "acked": ("acked", "records acknowledged to trainers (new and duplicates)"),
    "duplicates": ("duplicates", "re-sent records recognised and acked again, not stored twice"),
    "refused": ("refused", "records refused with an error reply (e.g. a checkpoint outside the artifact roots)"),
    "malformed": ("malformed", "frames that could not be read at all"),
    "held": ("held", "records not taken while the spool was full or could not be written, or while their "
                     "stream waited for a checkpoint copy (each re-send counts again)"),
    "out_of_order": ("out_of_order", "records past a gap in their stream, re-sent by the client later"),
}


class SpoolReader:
    """A read-only view of a running relay's spool for another thread: its own connection, and the
    spool's report and footprint on it; no check, no recovery, no schema changes (the relay did
    those at start)."""

    def __init__(self, directory: str):
        self.conn = spool_db.connect_reader(os.path.join(directory, spool_db.FILENAME))
        self.report = SpoolReport(self.conn, directory)
        self.footprint = Footprint(self.conn, directory)

    def close(self) -> None:
        self.conn.close()


def error_kind(error: str | None) -> str:
    """The exception class named in an uploader's last_error ('CommError: …', 'asking W&B for the
    run failed: URLError: …'), or 'other'."""
    match = re.search(r"([A-Za-z_][A-Za-z0-9_.]*(?:Error|Exception|Timeout|Exit)[A-Za-z0-9_]*)\s*:", error or "")
    return match.group(1).rsplit(".", 1)[-1] if match else "other"


@dataclass
class RelayGauges:
    """The relay's own counters and state at one scrape (the spool's counts are read here)."""
    counters: Dict[str, int]
    wandb_errors: Dict[str, int]      # W&B failures by kind
    max_spool_bytes: int
    holding: bool                     # no room in the spool, or it cannot be written
    wandb_up: bool
    uploaders_running: int
    uptime: float                     # seconds since the relay started


class RelayCollector(Collector):
    def __init__(self, gauges: Callable[[], RelayGauges], spool_dir: str):
        self.gauges = gauges
        self.reader = SpoolReader(spool_dir)
        self.lock = threading.Lock()  # scrapes may come in on several threads; one connection

    def collect(self) -> Iterator[Metric]:
        relay = self.gauges()
        with self.lock:
            status = self.reader.report.status(max_bytes=None)  # every active run, when there are at most STATUS_RUNS
            live = self.reader.footprint.live_bytes()
        for key, (name, text) in SERVER_COUNTERS.items():
            yield CounterMetricFamily("relay_%s" % name, text, value=relay.counters.get(key, 0))
        errors = CounterMetricFamily("relay_wandb_errors", "W&B failures seen by the relay, by kind: a run "
                                     "entering the retrying state (kind: the exception) or an uploader process "
                                     "exiting with an error (kind: uploader_exit)", labels=["kind"])
        for kind, count in sorted(relay.wandb_errors.items()):
            errors.add_metric([kind], count)
        yield errors

        records, run_counts = RecordTotals.from_dict(status["records"]), RunCounts.from_dict(status["run_counts"])
        runs = [RunStatus.from_dict(run) for run in status["runs"]]
        active = [run for run in runs if not run.finished or run.pending]
        yield GaugeMetricFamily("relay_pending_records", "records W&B has not confirmed yet (unsent + unconfirmed), "
                                "all runs", value=records.pending)
        yield GaugeMetricFamily("relay_unsent_records", "records not yet handed to W&B, all runs",
                                value=records.unsent)
        yield GaugeMetricFamily("relay_unconfirmed_records", "records handed to W&B (the wandb SDK) that W&B has "
                                "not confirmed yet, all runs", value=records.unconfirmed)
        yield CounterMetricFamily("relay_uploaded_records", "records W&B confirmed, all runs (archived and deleted "
                                  "ones included)", value=records.uploaded)
        yield GaugeMetricFamily("relay_oldest_pending_age_seconds", "age of the oldest record W&B has not "
                                "confirmed, other than a run's open, summaries and checkpoints already handed "
                                "over (0 when none waits)", value=records.oldest_pending_age or 0.0)
        yield GaugeMetricFamily("relay_spool_bytes", "spool files on disk (database, WAL, shared memory)",
                                value=status["spool_bytes"])
        yield GaugeMetricFamily("relay_spool_live_bytes", "live data in the spool, compared to max_spool_bytes",
                                value=live)
        yield GaugeMetricFamily("relay_spool_max_bytes", "max_spool_bytes: past it the relay holds new records",
                                value=relay.max_spool_bytes)
        yield GaugeMetricFamily("relay_holding", "1 while the relay takes no new records (spool full or not "
                                "writable)", value=int(relay.holding))
        yield GaugeMetricFamily("relay_wandb_up", "0 while some run cannot reach W&B, else 1",
                                value=int(relay.wandb_up))
        yield GaugeMetricFamily("relay_uploaders_running", "runs with a live uploader",
                                value=relay.uploaders_running)
        states = GaugeMetricFamily("relay_runs", "runs not finished in W&B, by uploader state", labels=["state"])
        for state, count in sorted(run_counts.active_by_state.items()):
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily("relay_uptime_seconds", "seconds since the relay started", value=relay.uptime)
        if run_counts.active > MAX_RUN_LABELS or len(active) < run_counts.active:
            return
        pending = GaugeMetricFamily("relay_run_pending_records", "records of a run W&B has not confirmed yet",
                                    labels=["run"])
        uploaded = CounterMetricFamily("relay_run_uploaded_records", "records of a run W&B confirmed",
                                       labels=["run"])
        received = CounterMetricFamily("relay_run_received_records", "records of a run stored in the spool",
                                       labels=["run"])
        lag = GaugeMetricFamily("relay_run_oldest_pending_age_seconds", "age of the run's oldest record W&B "
                                "has not confirmed (0 when none waits)", labels=["run"])
        for run in active:
            pending.add_metric([run.run_id], run.pending)
            uploaded.add_metric([run.run_id], run.uploaded)
            received.add_metric([run.run_id], run.received)
            lag.add_metric([run.run_id], run.oldest_pending_age or 0.0)
        yield from (pending, uploaded, received, lag)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsEndpoint:
    """The HTTP server thread; `close()` stops it. `gauges` is called at each scrape, on the
    scrape's thread."""

    def __init__(self, bind: str, spool_dir: str, gauges: Callable[[], RelayGauges]):
        host, port = parse_host_port(bind)
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = RelayCollector(gauges, spool_dir)
        self.registry.register(self.collector)
        try:
            self.httpd, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            self.collector.reader.close()
            raise SystemExit("cannot serve metrics on %s: %s (is the port taken? choose another with "
                             "--metrics-bind)" % (bind, exc))
        if not is_loopback(host):
            log.warning("metrics endpoint on non-loopback address %s: anyone who can reach it sees run ids and "
                        "counts (no secrets); bind 127.0.0.1 unless a scraper elsewhere needs it (in a container: publish "
                        "the port on the host's loopback only)", bind)
        log.info("Prometheus metrics on http://%s/metrics", bind)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5.0)
        with self.collector.lock:
            self.collector.reader.close()
