"""Many live runs on one relay: memory, processes, CPU, time to rows in W&B, status latency, lag.

N runs (50, 200, 1,000) each log one row of 40 metrics a second for `--seconds`, all opened at
once (or `--wave N`: N at once, `--wave-gap` seconds apart, so that the last wave opens on a relay
that carries the others), from worker processes of 50 runs each (one RelayClient per worker). The relay runs in W&B
offline mode, or `--online` against the suite's fake W&B (tests/fakewandb.py, in this process),
with `/metrics` on. Per N:

- PSS of the relay and every process below it (fork server, uploaders, wandb-core), summed, and
  their number, sampled every 3 s (every second while the runs finish): the maximum, also over the
  finishes, and the mean over the steady window (from when
  every run had rows, a third into the logging at the earliest, to its end; at least the last
  quarter); cores: their CPU time (/proc/<pid>/stat utime + stime) over that window / its length;
- time to first rows, per run, from its `open` (trainer's clock) to its first rows in W&B: online,
  the fake's first history line of the run; offline, the first status (asked each second for this
  case's runs) showing a row of the run handed to the wandb SDK, which writes it to the offline run.
  p50, max (and the max of each wave), and whether every run had rows within 30 s;
- status and /metrics latency, 20 of each over the logging (`query_status`'s round trip: the
  `relay status` command adds its interpreter's start); lag at the end of the logging, from the last
  status: records not handed to the SDK (`unsent`), not confirmed by W&B (`pending`; offline, at the
  run's finish) and the age of the oldest one that only a row count confirms; `finished`: seconds
  from the end of the logging until every run is finished in W&B (the relay says so; online, the
  fake W&B too).

`--history N`: before the relay starts, its spool gets N finished, fully uploaded runs (rows of
`runs` and their streams' watermarks, written with sqlite3 in the schema of the relay measured),
finished `--history-age` days ago and before (8: past the default `retention` of 7 days, so a
relay that archives moves them out of `runs` itself; the trainers start once it has,
`history_archived_s` saying how long it took; 0: all finished within the last 7 days, one a
minute, which such a relay keeps in `runs`).

    python bench/many_runs.py                       # 50, 200 and 1,000 runs, 90 s each (--online, --runs 50,200)
    python bench/many_runs.py --history 10000 --runs 5 --seconds 20
    python bench/many_runs.py --compare /tmp/old    # each case also with the `relay` of /tmp/old, side by side
    python bench/many_runs.py --set runs_per_uploader=200   # a relay setting (RELAY_<KEY>) for this relay
    python bench/many_runs.py --online --runs 1000 --seconds 150 --wave 200 --wave-gap 20   # 200 open at once, 5 times
    python bench/many_runs.py --quick [--dry-run]   # 50 and 200 runs, 45 s [5 runs, 10 s, a 100-run history]

A case too big for the memory available (at the per-run PSS of smaller cases of the same relay) is
skipped, saying so. The last line is a JSON summary (also written to `--json PATH`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import msgpack
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from common import (Relay, available_mib, bench_env, codes, cpu_seconds, descendants, metrics_row,  # noqa: E402
                    percentile, pss_kib, ready_wait, run_workers)

from fakewandb import FakeWandb  # noqa: E402
from relay import protocol  # noqa: E402
from relay.spool_report import HOT_CURSOR  # noqa: E402
from relay.status import query_status  # noqa: E402
from relay.testing import free_tcp_port  # noqa: E402

RUNS_PER_WORKER = 50
SAMPLE_EVERY = 3.0      # seconds between PSS / CPU samples
QUERIES = 20            # status and /metrics queries over the logging
WITHIN = 30.0           # every run should have rows this soon after its open


def worker(job: dict) -> dict:
    """At the go: open every run of job['run_ids'], then log one row a second to each; finish."""
    from relay.client import RelayClient

    client = RelayClient(job["endpoint"])
    rng = random.Random(job["seed"])
    ready_wait()
    time.sleep(job["delay"])  # its wave's turn (--wave)
    runs, opened = [], {}
    for run_id in job["run_ids"]:
        runs.append(client.start_run(project="many", name=run_id, run_id=run_id))
        opened[run_id] = time.time()
    started = time.monotonic()
    for second in range(job["seconds"]):
        for run in runs:
            run.log(metrics_row(rng), frame=second, epoch=second)
        time.sleep(max(0.0, started + second + 1 - time.monotonic()))
    reports = [run.finish(exit_code=0, timeout=120) for run in runs]
    client.close()
    return {"opened": opened, "delivered": all(report["delivered"] for report in reports)}


# -- the spool's history ----------------------------------------------------------------------

def fill_history(spool_dir: str, count: int, mode: str, code: str, age: float, rows: int = 3600) -> bool:
    """`count` finished runs, every row confirmed by W&B (no records left), in a new spool: what
    a relay keeps of the runs it has uploaded, in the schema of `code`'s spool (an older relay's in relay.spool).
    The newest finished `age` seconds ago. Whether that relay archives finished runs (its schema has
    `runs_done`)."""
    schema = subprocess.run([sys.executable, "-c", "try:\n from relay.spool_db import SCHEMA\nexcept ImportError:\n"
                             " from relay.spool import SCHEMA\nprint(SCHEMA)"],
                            env=bench_env(code=code), cwd=code, capture_output=True, text=True, check=True).stdout
    os.makedirs(spool_dir, exist_ok=True)
    conn = sqlite3.connect(os.path.join(spool_dir, "spool.sqlite"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(schema)
        now = time.time()
        conn.execute("BEGIN")
        for i in range(count):
            run_id, ended = "history-%06d" % i, now - age - (count - i) * 60.0
            location = (os.path.join(spool_dir, "wandb", "offline-run-history-" + run_id) if mode == "offline"
                        else "https://wandb.example/many/history/runs/" + run_id)
            settings = msgpack.packb({"project": "history", "name": run_id, "mode": mode})
            conn.execute("INSERT INTO runs (run_id, settings, received, uploaded_id, steps_handed, state, state_since, "
                         "exit_code, finished, location, created, last_seen) VALUES (?, ?, ?, ?, ?, 'finished', ?, 0, "
                         "1, ?, ?, ?)", (run_id, settings, rows + 2, (i + 1) * (rows + 2), rows, ended, location,
                                         ended - rows, ended))
            conn.execute("INSERT INTO streams (stream, upto) VALUES (?, ?)", ("history-stream-%06d" % i, rows + 2))
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (count * (rows + 2),))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return "runs_done" in schema


def wait_archived(relay: Relay, timeout: float = 120.0) -> float | None:
    """Seconds until the relay's status lists no run (its history archived), None past `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if relay.status(30.0)["run_counts"]["listed"] == 0:
            return round(time.monotonic() - started, 1)
        time.sleep(0.5)
    return None


def sample(relay_pid: int) -> dict:
    """The relay and every process below it: PSS summed, how many, the CPU time of each."""
    pids = [relay_pid] + descendants(relay_pid)
    return {"t": time.time(), "pss_kib": sum(pss_kib(pid) for pid in pids), "processes": len(pids),
            "cpu": {pid: cpu_seconds(pid) for pid in pids}}


def runs_after(endpoint: str, cursor: int, timeout: float = 30.0) -> list[dict]:
    """Every run of the relay's status pages after `cursor` (the runs the spool got after it)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    runs: list[dict] = []
    try:
        page = cursor
        while page is not None:
            sock.send(protocol.encode({"v": protocol.VERSION, "t": "status", "stream": "many-%d" % os.getpid(),
                                       "seq": 0, "page": page}))
            if not sock.poll(int(timeout * 1000), zmq.POLLIN):
                raise TimeoutError("the relay did not answer a status page within %.0f s" % timeout)
            reply = protocol.decode_raw(sock.recv())
            runs += reply["runs"]
            page = reply["next"]
    finally:
        sock.close(linger=0)
    return runs


# -- one case -----------------------------------------------------------------------------------

class Watch:
    """What the main thread notes while the trainers log: samples, first rows, query latencies."""

    def __init__(self, relay: Relay, metrics_port: int, run_ids: list[str], cursor: int, poll_rows: bool):
        self.relay, self.metrics_port, self.cursor = relay, metrics_port, cursor
        self.unseen = set(run_ids) if poll_rows else set()
        self.first_rows: dict[str, float] = {}   # run id -> wall time its rows were first seen handed over
        self.samples: list[dict] = []
        self.status_ms: list[float] = []
        self.metrics_ms: list[float] = []
        self.last_status: dict | None = None
        self.go: float | None = None

    def follow(self, trainers: threading.Thread, seconds: int) -> None:
        """Until the trainers are done: sample every SAMPLE_EVERY s, look for first rows every
        second (offline), and ask status and /metrics QUERIES times over the logging."""
        next_sample = next_look = 0.0
        queries = 0
        while trainers.is_alive():
            query_at = self.go + (queries + 0.5) * seconds / QUERIES if self.go and queries < QUERIES else math.inf
            now = time.time()
            if now >= next_sample:
                self.samples.append(sample(self.relay.pid))
                next_sample = now + SAMPLE_EVERY
            if now >= next_look:
                self.look_for_rows()
                next_look = time.time() + 1.0
            if now >= query_at:
                self.query()
                queries += 1
                continue
            wake = min(next_sample, next_look if self.unseen else math.inf, query_at, now + 1.0)
            trainers.join(max(0.0, wake - time.time()))

    def look_for_rows(self) -> None:
        if not self.unseen:
            return
        now = time.time()
        for run in runs_after(self.relay.endpoint, self.cursor):
            if run["run_id"] in self.unseen and run["received"] - run["unsent"] >= 2:  # the open, then a row
                self.unseen.discard(run["run_id"])
                self.first_rows[run["run_id"]] = now

    def wait_finished(self, fake, run_ids: list[str], timeout: float) -> bool:
        """Whether every run finished in W&B in time (online, in the fake too); still looks for rows."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.samples.append(sample(self.relay.pid))  # the finishes count toward the PSS maximum too
            self.look_for_rows()
            if self.relay.status(30.0)["run_counts"]["active"] == 0 and (
                    fake is None or all(fake.complete(run_id) for run_id in run_ids)):
                return True
            time.sleep(1.0)
        return False

    def query(self) -> None:
        """One status request and one /metrics scrape, each timed."""
        started = time.monotonic()
        self.last_status = query_status(self.relay.endpoint, 30.0)
        if self.last_status is None:
            raise TimeoutError("the relay did not answer a status request within 30 s")
        self.status_ms.append(1000.0 * (time.monotonic() - started))
        started = time.monotonic()
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port, timeout=30) as response:
            response.read()
        self.metrics_ms.append(1000.0 * (time.monotonic() - started))


def steady(watch: Watch, go: float, seconds: int, all_rows_at: float | None, last_wave: float = 0.0) -> dict:
    """PSS, processes and cores over the steady window (see the module's docstring); `last_wave`:
    seconds from the go to the last wave's open (--wave)."""
    end = go + seconds
    start = min(max(go + max(seconds / 3.0, last_wave), all_rows_at or end), end - seconds / 4.0)
    first = next((s for s in reversed(watch.samples) if s["t"] <= start), watch.samples[0])  # bracketing it
    last = next((s for s in reversed(watch.samples) if first["t"] < s["t"] <= end),
                next((s for s in watch.samples if s["t"] > end), first))
    inside = [s for s in watch.samples if first["t"] <= s["t"] <= last["t"]]
    span = last["t"] - first["t"]
    used = sum(spent - first["cpu"].get(pid, 0.0) for pid, spent in last["cpu"].items())
    return {"steady_window_s": round(span, 1),
            "pss_steady_mib": round(sum(s["pss_kib"] for s in inside) / len(inside) / 1024),
            "processes_steady": max(s["processes"] for s in inside),
            "cores": round(used / span, 2) if span > 0 else None}


def run_case(runs: int, seconds: int, workdir: str, online: bool, history: int, name: str, code: str,
             history_age: float = 8 * 86400.0, settings: dict | None = None, wave: int = 0,
             wave_gap: float = 20.0) -> dict:
    tag = "%s-%d" % (name, runs)
    home = os.path.join(workdir, "home-" + tag)
    extra = {"HOME": home, "WANDB_CONFIG_DIR": os.path.join(home, ".config"),
             "WANDB_CACHE_DIR": os.path.join(home, ".cache"), "WANDB_DATA_DIR": os.path.join(home, ".data")}
    extra.update(settings or {})
    fake = FakeWandb() if online else None
    if fake:
        fake.start()
        extra.update(fake.env())
    mode, spool = "online" if online else "offline", os.path.join(workdir, "spool-" + tag)
    keeps_archive = fill_history(spool, history, mode, code, history_age) if history else False
    archives = keeps_archive and history_age > 7 * 86400.0   # past the default retention
    # The page cursor after the history: a relay with an archive pages through it first, then its
    # hot runs at HOT_CURSOR + rowid (the history archived: only the new runs are hot).
    cursor = (HOT_CURSOR + (0 if archives else history)) if keeps_archive else history
    port = free_tcp_port()
    relay = Relay(spool, mode=mode, env=bench_env(extra, code=code), args=["--metrics-bind", "127.0.0.1:%d" % port],
                  log_path=os.path.join(workdir, "relay-%s.log" % tag), code=code)
    run_ids = ["many-%d-%04d" % (runs, i) for i in range(runs)]
    watch = Watch(relay, port, run_ids, cursor=cursor, poll_rows=not online)
    try:
        relay.wait_ready()
        archived_s = wait_archived(relay) if archives else None
        jobs = [{"endpoint": relay.endpoint, "run_ids": run_ids[i:i + RUNS_PER_WORKER], "seconds": seconds, "seed": i,
                 "delay": (i // wave) * wave_gap if wave else 0.0} for i in range(0, runs, RUNS_PER_WORKER)]
        results: list[dict] = []
        trainers = threading.Thread(target=lambda: results.extend(run_workers(
            os.path.abspath(__file__), "trainer", jobs, on_go=lambda: setattr(watch, "go", time.time()))))
        trainers.start()
        watch.follow(trainers, seconds)
        if len(results) != len(jobs):
            raise RuntimeError("the trainers failed (above); the relay's log ends:\n%s" % relay.log()[-4000:])
        finishing = time.monotonic()
        finished = watch.wait_finished(fake, run_ids, timeout=300.0)
        finish_s = time.monotonic() - finishing
        if fake:
            for run_id in run_ids:
                arrived = [t for t in fake.run(run_id).arrived if t is not None]
                if arrived:
                    watch.first_rows[run_id] = min(arrived)
    finally:
        relay.stop()
        if fake:
            fake.stop()
    opened = {run_id: t for result in results for run_id, t in result["opened"].items()}
    delays = [watch.first_rows[run_id] - opened[run_id] for run_id in run_ids if run_id in watch.first_rows]
    waves = [run_ids[i:i + wave] for i in range(0, runs, wave)] if wave else [run_ids]
    wave_max = [round(max(watch.first_rows[r] - opened[r] for r in ids if r in watch.first_rows), 1)
                for ids in waves if any(r in watch.first_rows for r in ids)]
    all_rows_at = max(watch.first_rows.values()) if len(watch.first_rows) == runs else None
    status = watch.last_status or {}
    records = status.get("records", {})
    case = {"relay": name, "mode": mode, "runs": runs, "history": history, "history_archived_s": archived_s,
            "seconds": seconds,
            "pss_max_mib": round(max(s["pss_kib"] for s in watch.samples) / 1024),
            "processes_max": max(s["processes"] for s in watch.samples),
            **steady(watch, watch.go, seconds, all_rows_at, (len(waves) - 1) * wave_gap if wave else 0.0),
            "runs_with_rows": len(delays), "wave": wave, "wave_gap_s": wave_gap if wave else None,
            "first_rows_max_by_wave_s": wave_max,
            "first_rows_p50_s": round(percentile(delays, 0.5), 1) if delays else None,
            "first_rows_max_s": round(max(delays), 1) if delays else None,
            "first_rows_slowest": sorted(([r, round(watch.first_rows[r] - opened[r], 1)] for r in run_ids
                                          if r in watch.first_rows), key=lambda item: -item[1])[:3],
            "all_within_30s": len(delays) == runs and max(delays) <= WITHIN,
            **{"%s_%s_ms" % (what, q): round(percentile(ms, 0.5) if q == "p50" else max(ms), 1)
               for what, ms in (("status", watch.status_ms), ("metrics", watch.metrics_ms)) for q in ("p50", "max")},
            "lag_unsent": records.get("unsent"), "lag_pending": records.get("pending"),
            "lag_oldest_pending_s": records.get("oldest_pending_age"),
            "delivered": all(result["delivered"] for result in results), "finished": finished,
            "finished_in_s": round(finish_s, 1)}
    case["pss_per_run_mib"] = round(case["pss_steady_mib"] / runs, 1)
    return case


# -- the sweep ----------------------------------------------------------------------------------

def too_big(runs: int, measured: list[tuple[int, int]]) -> str:
    """Why a case of `runs` runs would not fit in memory ('' if it would, or if nothing tells), from
    the (runs, max PSS MiB) of the smaller cases of the same relay: the two largest give the cost
    of a run, one alone its PSS over its runs."""
    smaller = sorted(m for m in measured if m[0] < runs)[-2:]
    if not smaller:
        return ""
    (n0, pss0), (n1, pss1) = smaller[0], smaller[-1]
    per_run = (pss1 - pss0) / (n1 - n0) if n1 > n0 else pss1 / n1
    needed, available = 1.2 * (pss1 + per_run * (runs - n1)), available_mib()
    if needed <= available:
        return ""
    return ("skipped: at %.1f MiB per run (measured with fewer runs) it would need about %.1f GiB PSS and %.1f GiB "
            "is available; run it on a larger machine" % (per_run, needed / 1024, available / 1024))


HEADER = ("%-8s %5s %5s %9s %9s %8s %6s %14s %7s %16s %16s %8s %9s %9s" % (
    "relay", "runs", "procs", "PSS max", "PSS std", "per run", "cores", "rows p50/max", "<=30s", "status p50/max",
    "metrics p50/max", "unsent", "oldest", "finished"))


def line(case: dict) -> str:
    if "skipped" in case:
        return "%-8s %5d  %s" % (case["relay"], case["runs"], case["skipped"])
    rows = "%.1f/%.1f s" % (case["first_rows_p50_s"], case["first_rows_max_s"]) if case["runs_with_rows"] else "none"
    oldest = case["lag_oldest_pending_s"]
    text = "%-8s %5d %5d %5d MiB %5d MiB %4.1f MiB %6s %14s %7s %10.0f/%.0f ms %10.0f/%.0f ms %8s %9s %7.0f s" % (
        case["relay"], case["runs"], case["processes_steady"], case["pss_max_mib"], case["pss_steady_mib"],
        case["pss_per_run_mib"], case["cores"], rows, "yes" if case["all_within_30s"] else "NO", case["status_p50_ms"],
        case["status_max_ms"], case["metrics_p50_ms"], case["metrics_max_ms"], case["lag_unsent"],
        "-" if oldest is None else "%.0f s" % oldest, case["finished_in_s"])
    if case.get("wave"):
        text += "  (waves of %d runs %.0f s apart; first rows max by wave %s s)" % (
            case["wave"], case["wave_gap_s"], "/".join("%.1f" % m for m in case["first_rows_max_by_wave_s"]))
    if case["history_archived_s"] is not None:
        text += "  (history archived in %.1f s first)" % case["history_archived_s"]
    if case["runs_with_rows"] < case["runs"]:
        text += "  (%d of %d runs had rows)" % (case["runs_with_rows"], case["runs"])
    if not (case["delivered"] and case["finished"]):
        text += "  NOT ALL %s" % ("FINISHED IN W&B" if case["delivered"] else "DELIVERED")
    return text


RATIOS = ("pss_steady_mib", "processes_steady", "cores", "first_rows_p50_s", "status_p50_ms", "metrics_p50_ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="50,200,1000", help="run counts, comma-separated")
    parser.add_argument("--seconds", type=int, default=90, help="how long each run logs (one row a second)")
    parser.add_argument("--online", action="store_true", help="W&B online against the fake W&B (default: offline)")
    parser.add_argument("--history", type=int, default=None, metavar="N",
                        help="finished, fully uploaded runs in the spool before the relay starts")
    parser.add_argument("--history-age", type=float, default=8.0, metavar="DAYS",
                        help="the history's newest run finished this many days ago [8: past the default retention]")
    parser.add_argument("--compare", metavar="DIR", help="also run every case with the relay package of DIR")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a relay setting for the relay measured (not the --compare one), e.g. runs_per_uploader=200")
    parser.add_argument("--wave", type=int, default=0, metavar="N",
                        help="open the runs in waves of N (a multiple of %d), --wave-gap apart [0: all at once]"
                        % RUNS_PER_WORKER)
    parser.add_argument("--wave-gap", type=float, default=20.0, metavar="S", help="seconds between two waves")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (spools, relay logs)")
    parser.add_argument("--json", metavar="PATH", help="write the JSON summary there too")
    parser.add_argument("--quick", action="store_true", help="50 and 200 runs, 45 s")
    parser.add_argument("--dry-run", action="store_true", help="5 runs, 10 s, a 100-run history: checks it works")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker[1]))), flush=True)
        return 0
    runs_list, seconds, history = [int(n) for n in args.runs.split(",") if n], args.seconds, args.history or 0
    if args.quick:
        runs_list, seconds = [50, 200], 45
    if args.dry_run:
        runs_list, seconds, history = [5], 10, 100 if args.history is None else history
    if args.wave < 0 or args.wave % RUNS_PER_WORKER:
        parser.error("--wave takes a multiple of %d (the runs of one trainer worker), got %d" % (RUNS_PER_WORKER,
                                                                                                 args.wave))
    last_wave = max(0, (max(runs_list) - 1) // args.wave) * args.wave_gap if args.wave else 0.0
    if last_wave >= seconds * 0.75:
        parser.error("--seconds %d leaves no steady window after the last wave opens (%.0f s after the first): give "
                     "more than %.0f" % (seconds, last_wave, last_wave / 0.75))
    trees = codes(parser, args.compare)
    try:
        settings = {"RELAY_" + key.strip().upper(): value for key, value in (item.split("=", 1) for item in args.set)}
    except ValueError:
        parser.error("--set takes KEY=VALUE (a key of cfg/relay.yaml), got %s" % args.set)
    summary: dict = {"bench": "many_runs", "mode": "online" if args.online else "offline", "seconds": seconds,
                     "history": history, "settings": args.set, "cpus": os.cpu_count(), "wave": args.wave,
                     "wave_gap_s": args.wave_gap, "cases": []}
    if args.compare:
        summary.update(compare=os.path.abspath(args.compare), ratios=[])
    measured: dict[str, list[tuple[int, int]]] = {name: [] for name, _ in trees}
    workdir = tempfile.mkdtemp(prefix="relay-many-")
    try:
        print("%s, %d s of one row a second per run, %s; history %d runs; %d CPUs, %.1f GiB available" % (
            summary["mode"], seconds, "runs " + ",".join(map(str, runs_list)), history, os.cpu_count(),
            available_mib() / 1024), flush=True)
        print(HEADER, flush=True)
        for runs in runs_list:
            done = {}
            for name, code in trees:
                skipped = too_big(runs, measured[name])
                case = ({"relay": name, "runs": runs, "skipped": skipped} if skipped else
                        run_case(runs, seconds, workdir, args.online, history, name, code,
                                 args.history_age * 86400.0, settings if name == "this" else None, args.wave,
                                 args.wave_gap))
                if not skipped:
                    measured[name].append((runs, case["pss_max_mib"]))
                    done[name] = case
                summary["cases"].append(case)
                print(line(case), flush=True)
            if len(done) == 2:  # this / compare, for the figures both have
                ratio = {key: round(done["this"][key] / done["compare"][key], 2) for key in RATIOS
                         if done["this"].get(key) and done["compare"].get(key)}
                summary["ratios"].append(dict(ratio, runs=runs))
                print("%-8s %5d  this/compare: %s" % ("ratio", runs, ", ".join("%s %.2f" % kv for kv in ratio.items())),
                      flush=True)
    finally:
        if args.keep:
            print("kept: %s (each case's spool and relay log)" % workdir, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(summary)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
