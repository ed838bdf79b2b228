"""A backlog built up during a W&B outage, and how fast it drains once W&B is back.

W&B is the suite's fake backend (tests/fakewandb.py), answering 503 to everything at first. The
relay runs online (retry waits capped at 2 s, as an operator who expects outages would set). 16
trainer processes (RelayClient, one run each) log rows of 40 metrics as fast as the relay acks
them, and finish; everything is acked into the spool while W&B is down. Then W&B comes back and
the drain is timed: rows/s = backlog / (W&B back -> every row of every run in W&B and every run
finished). The relay's memory is sampled throughout: the server process's RSS, and the PSS of
the server, its uploader fork server, uploaders and their wandb-core together (PSS counts the
pages the uploaders share with their fork server once).

Then the memory part: the same, but with a small and a large backlog (1,000 and 1,000,000 rows)
and the server's RSS compared once each backlog is spooled and while it drains for a while: the
backlog lives on disk, so the relay's memory must not grow with it. (The highest RSS while the
large backlog is being taken in is printed too: that is intake, not the backlog.)

    python bench/drain.py                  # 100,000-row drain; RSS at 1,000 vs 1,000,000 rows
    python bench/drain.py --quick          # 20,000-row drain; RSS at 1,000 vs 100,000 rows
    python bench/drain.py --quick --dry-run    # 2 runs, a few hundred rows: checks it still runs
    python bench/drain.py --compare /tmp/old   # the drain also with the `relay` of /tmp/old, side by side
    python bench/drain.py --compare /tmp/old --rounds 3   # three drains each, alternating; ratios of medians

With --compare DIR (DIR: e.g. `git archive REV | tar -x -C DIR`), the drain runs twice, this relay
and then DIR's, with the same trainers, rows and outage, and a line of this/compare ratios
follows (RELAY_ settings DIR's relay does not have are left out of its environment). With
--rounds N each relay drains N times, this one first in odd rounds and DIR's first in even ones,
and the ratios are of the medians: one drain varies by 10-15 % on a shared machine. The memory
part is skipped then: it concerns this relay alone.

Writes bench/drain.png (rows in W&B and relay memory over time, both relays' with --compare)
unless --dry-run; the last line is a JSON summary. Targets: >= 5,000 rows/s; server RSS within
+-20 % between the backlogs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from common import (ROOT, Relay, bench_env, codes, descendants, known_variables, metrics_row, pss_kib,  # noqa: E402
                    ready_wait, rss_kib, run_workers)

WINDOW = 500   # records in flight per trainer at most: the relay's socket buffers hold 16 x this, whatever the backlog
ONLINE = {"RELAY_BACKOFF_MAX": "2", "RELAY_INIT_TIMEOUT": "10", "RELAY_REQUEST_TIMEOUT": "10",
          "RELAY_CONFIRM_EVERY": "5"}


def worker_trainer(args: dict) -> dict:
    """One trainer: a run of `rows` rows of 40 metrics, as fast as the relay acks, then finish."""
    from relay.client import RelayClient

    rng = random.Random(args["seed"])
    rows = [metrics_row(rng) for _ in range(100)]
    # Rows only, no provenance or system metrics: the same records to any relay (an older one takes neither).
    client = RelayClient(args["endpoint"], spill_dir=args["spill_dir"], heartbeat_every=0, provenance=False,
                         system_metrics=0)
    run = client.start_run(project="drain", run_id=args["run_id"], mode="online")
    client.flush(30.0)
    ready_wait()
    started = time.monotonic()
    for i in range(args["rows"]):
        run.log(rows[i % 100], frame=i, epoch=i)
        if i % 64 == 63:
            while client.statistics()["pending"] > WINDOW:
                client.flush(0.005)
    report = run.finish(timeout=300.0)
    client.close()
    return {"started": started, "ended": time.monotonic(), "delivered": report["delivered"]}


class Sampler(threading.Thread):
    """Every 0.5 s: (seconds, rows of `run_ids` in W&B, server RSS KiB, PSS of server + uploaders +
    wandb-core KiB)."""

    def __init__(self, relay: Relay, fake, started: float, run_ids: list[str]):
        super().__init__(daemon=True)
        self.relay, self.fake, self.started, self.run_ids = relay, fake, started, run_ids
        self.samples: list[tuple[float, int, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            server = rss_kib(self.relay.pid)
            total = pss_kib(self.relay.pid) + sum(pss_kib(pid) for pid in descendants(self.relay.pid))
            history = self.fake.history_rows()
            rows = sum(history.get(run_id, 0) for run_id in self.run_ids)
            self.samples.append((time.monotonic() - self.started, rows, server, total))
            if self.stop.wait(0.5):
                return


def backlog(fake, workdir: str, name: str, runs: int, rows: int, drain_for: float | None, code: str = ROOT) -> dict:
    """Spool `rows` rows over `runs` runs (named after `name`) while W&B is down, then bring it
    back; drain everything (drain_for None) or for `drain_for` seconds; the relay is `code`'s.
    Returns timings, RSS samples and counts."""
    fake.set_fault("503")
    env = bench_env(fake.env(), code=code)
    env.update(ONLINE)
    env["HOME"] = os.path.join(workdir, name, "home")
    if code != ROOT:
        env, dropped = known_variables(env, code)
        if dropped:
            print("%s: its relay has no %s; left out" % (code, ", ".join(dropped)), flush=True)
    relay = Relay(os.path.join(workdir, name, "spool"), mode="online", env=env,
                  log_path=os.path.join(workdir, name + ".log"), code=code)
    started = time.monotonic()
    run_ids = ["%s%02d" % (name, i) for i in range(runs)]
    sampler = Sampler(relay, fake, started, run_ids)
    try:
        relay.wait_ready()
        sampler.start()
        jobs = [{"endpoint": relay.endpoint, "run_id": run_id, "rows": max(1, rows // runs), "seed": i,
                 "spill_dir": os.path.join(workdir, name, "spill")} for i, run_id in enumerate(run_ids)]
        results = run_workers(os.path.abspath(__file__), "trainer", jobs, env=bench_env())
        spooled = time.monotonic()
        spooled_rss = rss_kib(relay.pid)
        status = relay.status()
        pending = status["records"]["pending"]
        duplicates = status["counters"].get("duplicates", 0)  # re-sent by trainers whose acks were late
        fake.set_fault("ok")
        back = time.monotonic()
        deadline = back + (drain_for if drain_for is not None else 1800)
        while time.monotonic() < deadline:
            if drain_for is None and all(fake.complete(run_id) for run_id in run_ids):
                break
            time.sleep(0.2)
        done = time.monotonic()
    finally:
        sampler.stop.set()
        sampler.join()
        fake.set_fault("ok")
        relay.stop()
    delivered = sum(fake.history_rows().get(run_id, 0) for run_id in run_ids)
    during = [s for s in sampler.samples if s[0] >= back - started]
    return {"runs": runs, "rows": sum(job["rows"] for job in jobs), "spooled_rows": pending,
            "all_acked": all(r["delivered"] for r in results), "fill_s": round(spooled - started, 1),
            "duplicates_during_fill": duplicates,
            "drain_s": round(done - back, 2), "delivered": delivered,
            "rows_per_s": round(delivered / (done - back)),
            "server_rss_mib_spooled": round(spooled_rss / 1024, 1),
            "server_rss_mib_max": round(max(s[2] for s in sampler.samples) / 1024, 1),
            "server_rss_mib_max_draining": round(max((s[2] for s in during), default=0) / 1024, 1),
            "total_pss_mib_max": round(max(s[3] for s in sampler.samples) / 1024),
            "back_at_s": round(back - started, 2), "samples": sampler.samples}


def plot(drains: dict[str, dict], path: str) -> None:
    """Rows in W&B and relay memory around W&B's return, one pair of curves per relay (dashed: compare)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    this = drains["this"]
    figure, (rows_axis, rss_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    earliest = min(s[0] - result["back_at_s"] for result in drains.values() for s in result["samples"])
    rows_axis.axvspan(earliest, 0, color="0.9", label="W&B down (503)")
    for name, result in drains.items():
        times = [s[0] - result["back_at_s"] for s in result["samples"]]
        style, label = ("-", "") if name == "this" else ("--", " (%s)" % name)
        rows_axis.plot(times, [s[1] for s in result["samples"]], style, color="C0", label="rows in W&B" + label)
        rss_axis.plot(times, [s[2] / 1024 for s in result["samples"]], style, color="C1", label="relay server" + label)
        rss_axis.plot(times, [s[3] / 1024 for s in result["samples"]], style, color="C2",
                      label="with uploaders + wandb-core (PSS)" + label)
    rows_axis.axhline(this["rows"], color="0.5", linestyle=":", label="rows logged")
    rows_axis.set_ylabel("rows")
    title = "%d runs: %d rows spooled during the outage, drained at %d rows/s once W&B is back" % (
        this["runs"], this["rows"], this["rows_per_s"])
    if "compare" in drains:
        title += "\n(%d rows/s with the compare relay, dashed)" % drains["compare"]["rows_per_s"]
    rows_axis.set_title(title)
    rows_axis.legend(loc="upper left")
    rss_axis.set_ylabel("memory (MiB)")
    rss_axis.set_xlabel("seconds since W&B came back")
    rss_axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


DRAIN_KEYS = ("rows", "runs", "delivered", "fill_s", "drain_s", "rows_per_s", "server_rss_mib_max",
              "total_pss_mib_max")
RATIOS = ("rows_per_s", "drain_s", "total_pss_mib_max", "server_rss_mib_max", "fill_s")
HEADER = "%-8s %8s %5s %7s %8s %8s %9s %11s %9s" % ("relay", "rows", "runs", "fill s", "drain s", "rows/s", "in W&B",
                                                   "server RSS", "PSS max")


def line(name: str, drain: dict) -> str:
    """One row of the drain table: fill s is the outage (rows acked into the spool), drain s from
    W&B back to every row in W&B; the memory columns are maxima over both."""
    return "%-8s %8d %5d %7.1f %8.1f %8d %9d %7.0f MiB %5d MiB%s" % (
        name, drain["rows"], drain["runs"], drain["fill_s"], drain["drain_s"], drain["rows_per_s"], drain["delivered"],
        drain["server_rss_mib_max"], drain["total_pss_mib_max"],
        "" if drain["delivered"] == drain["rows"] else "  NOT ALL IN W&B")


def memory_part(fake, workdir: str, runs: int, sizes: list[int], drain_for: float) -> dict:
    """The server's RSS holding a small and a large backlog: the summary's part for it."""
    memory = []
    for size in sizes:
        result = backlog(fake, workdir, "rss%d" % size, runs, size, drain_for)
        memory.append(result)
        print("backlog of %d rows: server RSS %.1f MiB once spooled, at most %.1f MiB while draining "
              "(%d rows drained in %.0f s); PSS with uploaders at most %d MiB" % (
                  result["rows"], result["server_rss_mib_spooled"], result["server_rss_mib_max_draining"],
                  result["delivered"], result["drain_s"], result["total_pss_mib_max"]), flush=True)
    small, large = memory[0], memory[-1]

    def held(result: dict) -> float:  # the server's RSS while it holds the backlog: spooled, and draining
        return max(result["server_rss_mib_spooled"], result["server_rss_mib_max_draining"])

    growth = held(large) / held(small) - 1
    print("server RSS %+.0f %% from a %d-row to a %d-row backlog, spooled and draining (target within +-20 %%); "
          "highest while the large one was being taken in: %.0f MiB" % (100 * growth, small["rows"], large["rows"],
                                                                        large["server_rss_mib_max"]), flush=True)
    return {"rss_backlogs": [{k: v for k, v in m.items() if k != "samples"} for m in memory],
            "server_rss_growth_small_to_large": round(growth, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000-row drain; RSS at 1,000 vs 100,000 rows")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: does it still run")
    parser.add_argument("--rows", type=int, default=100000, help="backlog drained, rows over all runs")
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--rss-rows", default="1000,1000000", help="small and large backlog for the RSS check")
    parser.add_argument("--rss-drain-seconds", type=float, default=20.0,
                        help="how long the RSS backlogs drain before the relay is stopped")
    parser.add_argument("--compare", metavar="DIR",
                        help="also drain with the relay package of DIR (e.g. an export of an older commit), after "
                             "this one: side by side, with this/compare ratios; skips the RSS part")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare: drain this many times with each relay, alternating which goes first; "
                             "the ratios are of the medians")
    parser.add_argument("--png", default=os.path.join(HERE, "drain.png"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        print(json.dumps(worker_trainer(json.loads(rest[0]))), flush=True)
        return 0
    if args.quick:
        args.rows, args.rss_rows = 20000, "1000,100000"
    if args.dry_run:
        args.rows, args.runs, args.rss_rows, args.rss_drain_seconds = 200, 2, "100,400", 2.0
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more (got %d)" % args.rounds)
    trees = codes(parser, args.compare)
    from fakewandb import FakeWandb

    workdir = tempfile.mkdtemp(prefix="relay-drain-")
    fake = FakeWandb()
    fake.start()
    drains: dict[str, dict] = {}
    summary: dict = {}
    try:
        print("%d rows over %d runs, acked into the spool while W&B answered 503 (fill), then drained once it is "
              "back:" % (args.rows, args.runs), flush=True)
        print(HEADER, flush=True)
        rounds: dict[str, list[dict]] = {name: [] for name, _ in trees}
        for number in range(args.rounds):
            # ABBA: this relay first in odd rounds, last in even ones, so that neither always goes first
            for name, code in trees if number % 2 == 0 else trees[::-1]:
                label = name if args.rounds == 1 else "%s %d" % (name, number + 1)
                result = backlog(fake, workdir, "drain%s%d" % ("" if name == "this" else "-" + name, number),
                                 args.runs, args.rows, None, code)
                rounds[name].append(result)
                print(line(label, result), flush=True)
        drains = {name: results[0] for name, results in rounds.items()}
        if args.compare:
            this, other = ({key: statistics.median(result[key] for result in rounds[name]) for key in RATIOS}
                           for name in ("this", "compare"))
            ratio = {key: round(this[key] / other[key], 2) for key in RATIOS if this[key] and other[key]}
            of = " (medians of %d rounds)" % args.rounds if args.rounds > 1 else ""
            print("%-8s this/compare%s: %s" % ("ratio", of, ", ".join("%s %.2f" % kv for kv in ratio.items())),
                  flush=True)

            def by_round(key: str) -> dict:
                return {name: [result[key] for result in results] for name, results in rounds.items()}

            summary.update(compare=os.path.abspath(args.compare), rounds=args.rounds,
                           compare_drain={key: drains["compare"][key] for key in DRAIN_KEYS}, ratio=ratio,
                           rows_per_s_by_round=by_round("rows_per_s"), delivered_by_round=by_round("delivered"))
            print("RSS part skipped with --compare (it concerns this relay alone: run without --compare for it)",
                  flush=True)
        else:
            summary.update(memory_part(fake, workdir, args.runs, [int(n) for n in args.rss_rows.split(",")],
                                       args.rss_drain_seconds))
    finally:
        fake.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.dry_run:
        plot(drains, args.png)
        print("plot written to %s" % args.png)
    this = drains["this"]
    summary = {"drain_rows": this["rows"], "drain_runs": this["runs"], "drain_delivered": this["delivered"],
               "drain_fill_s": this["fill_s"], "drain_s": this["drain_s"], "drain_rows_per_s": this["rows_per_s"],
               "drain_server_rss_mib_max": this["server_rss_mib_max"],
               "drain_total_pss_mib_max": this["total_pss_mib_max"], **summary}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
