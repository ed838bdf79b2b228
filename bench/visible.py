"""How soon a logged row is visible in W&B: through the relay vs in-process `wandb.log`.

Trainers log one row of 40 metrics a second, each row carrying the wall time it was logged at
(`sent_at`). The suite's fake W&B backend (tests/fakewandb.py, online, in this process) notes when
each history line first arrives. Time to visible = arrival - sent_at. Also counted: file_stream
requests per run per second, and for all runs together (what the relay's upload budget bounds),
and the GraphQL requests besides (run starts, config, the relay's row-count queries).

- relay: `relay serve` with its defaults (upload_interval 2 s, upload_requests 20/s); the runs'
  clients live in a few worker processes (runs / 50, at least 1).
- wandb: one process per run calling `wandb.init` (online, defaults: wandb-core's 15 s file-stream
  interval) and `run.log`, as TokenHSI forks do; only for the run counts in --wandb-runs.

    python bench/visible.py                       # 1, 16 and 200 runs through the relay, 1 and 16 in-process; 60 s each
    python bench/visible.py --quick               # 1 and 16 runs, 30 s
    python bench/visible.py --quick --dry-run     # 1 run, 6 s: checks it still works
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from common import Relay, bench_env, metrics_row, percentile, ready_wait, run_workers  # noqa: E402

RUNS_PER_WORKER = 50


def relay_worker(job: dict) -> dict:
    """Log one row a second for each of job['runs'] runs through one RelayClient."""
    from relay.client import RelayClient

    client = RelayClient(job["endpoint"])
    runs = [client.start_run(project="visible", name=run_id, run_id=run_id) for run_id in job["run_ids"]]
    rng = random.Random(job["seed"])
    ready_wait()
    started = time.monotonic()
    for second in range(job["seconds"]):
        for run in runs:
            row = metrics_row(rng)
            row["sent_at"] = time.time()
            run.log(row, frame=second, epoch=second)
        time.sleep(max(0.0, started + second + 1 - time.monotonic()))
    reports = [run.finish(exit_code=0, timeout=60) for run in runs]
    client.close()
    return {"delivered": all(report["delivered"] for report in reports)}


def wandb_worker(job: dict) -> dict:
    """Log one row a second to one in-process wandb run (online, the SDK's defaults)."""
    import wandb

    run = wandb.init(project="visible", id=job["run_ids"][0], name=job["run_ids"][0], dir=job["dir"],
                     settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True,
                                             x_save_requirements=False))
    rng = random.Random(job["seed"])
    ready_wait()
    started = time.monotonic()
    for second in range(job["seconds"]):
        row = metrics_row(rng)
        row["sent_at"] = time.time()
        run.log(row)
        time.sleep(max(0.0, started + second + 1 - time.monotonic()))
    run.finish()
    return {"delivered": True}


def measure(fake, run_ids: list[str], seconds: float) -> dict:
    """Time to visible (s) over every row of `run_ids`, and file_stream requests per second: over
    the whole case (`seconds`: starts and finishes included) and in the steady middle (from the
    moment every run's first row was visible to the last row's logging)."""
    delays, sent_at, posts, times, first_seen, last_sent = [], [], 0, [], [], []
    for run_id in run_ids:
        run = fake.run(run_id)
        posts += run.file_stream_posts
        times.extend(run.post_times)
        rows = [(line, arrived) for line, arrived in zip(run.history, run.arrived)
                if line and arrived is not None and "sent_at" in line]
        for line, arrived in rows:
            delays.append(arrived - line["sent_at"])
            sent_at.append(line["sent_at"])
        if rows:
            first_seen.append(rows[0][1])
            last_sent.append(rows[-1][0]["sent_at"])
    if not delays:
        raise RuntimeError("no row of %d runs reached W&B" % len(run_ids))
    start, end = max(first_seen), min(last_sent)
    steady = (sum(1 for t in times if start <= t <= end) / (end - start)) if end - start >= 5 else None
    steady_delays = [delay for delay, sent in zip(delays, sent_at) if start <= sent <= end]
    return {"runs": len(run_ids), "rows": len(delays), "visible_p50_s": round(percentile(delays, 0.5), 2),
            "visible_p99_s": round(percentile(delays, 0.99), 2), "visible_max_s": round(max(delays), 2),
            "requests_per_s": round(posts / seconds, 2), "requests_per_run_per_s": round(posts / seconds / len(run_ids), 3),
            "steady_requests_per_s": None if steady is None else round(steady, 2),
            "steady_visible_p50_s": round(percentile(steady_delays, 0.5), 2) if steady_delays else None,
            "steady_visible_p99_s": round(percentile(steady_delays, 0.99), 2) if steady_delays else None,
            "steady_window_s": round(max(0.0, end - start), 1),
            "graphql_per_s": round(fake.requests_seen["graphql"] / seconds, 2)}


def run_case(kind: str, runs: int, seconds: int, workdir: str) -> dict:
    from fakewandb import FakeWandb

    fake = FakeWandb()
    fake.start()
    home = os.path.join(workdir, "home-%s-%d" % (kind, runs))
    os.makedirs(home, exist_ok=True)
    env = bench_env(dict(fake.env(), HOME=home, WANDB_CONFIG_DIR=os.path.join(home, ".config"),
                         WANDB_CACHE_DIR=os.path.join(home, ".cache"), WANDB_DATA_DIR=os.path.join(home, ".data")))
    run_ids = ["%s-%d-%03d" % (kind, runs, i) for i in range(runs)]
    relay = None
    try:
        if kind == "relay":
            relay = Relay(os.path.join(workdir, "spool-%d" % runs), mode="online", env=env,
                          log_path=os.path.join(workdir, "relay-%d.log" % runs))
            relay.wait_ready()
            groups = [run_ids[i:i + RUNS_PER_WORKER] for i in range(0, runs, RUNS_PER_WORKER)]
            jobs = [{"endpoint": relay.endpoint, "run_ids": group, "seconds": seconds, "seed": i}
                    for i, group in enumerate(groups)]
        else:
            jobs = [{"run_ids": [run_id], "seconds": seconds, "seed": i, "dir": os.path.join(workdir, run_id)}
                    for i, run_id in enumerate(run_ids)]
            for job in jobs:
                os.makedirs(job["dir"], exist_ok=True)
        started = time.monotonic()
        results = run_workers(os.path.abspath(__file__), kind, jobs, env=env)
        assert all(result["delivered"] for result in results), results
        fake.wait_for(lambda: all(fake.complete(run_id) for run_id in run_ids), 600)
        elapsed = time.monotonic() - started
        summary = measure(fake, run_ids, elapsed)
        summary["kind"] = kind
        return summary
    finally:
        if relay is not None:
            relay.stop()
        fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1,16,200", help="run counts through the relay")
    parser.add_argument("--wandb-runs", default="1,16", help="run counts with in-process wandb")
    parser.add_argument("--seconds", type=int, default=60, help="how long each trainer logs (one row a second)")
    parser.add_argument("--quick", action="store_true", help="1 and 16 runs, 30 s")
    parser.add_argument("--dry-run", action="store_true", help="with --quick: 1 run, 6 s (a check that it works)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, job = args.worker
        result = (relay_worker if kind == "relay" else wandb_worker)(json.loads(job))
        print(json.dumps(result), flush=True)
        return
    relay_runs = [int(n) for n in args.runs.split(",") if n]
    wandb_runs = [int(n) for n in args.wandb_runs.split(",") if n]
    seconds = args.seconds
    if args.quick:
        relay_runs, wandb_runs, seconds = [1, 16], [1, 16], 30
        if args.dry_run:
            relay_runs, wandb_runs, seconds = [1], [1], 6
    workdir = tempfile.mkdtemp(prefix="relay-visible-")
    cases = []
    try:
        for runs in sorted(set(relay_runs) | set(wandb_runs)):
            for kind in ("relay", "wandb"):
                if runs in (relay_runs if kind == "relay" else wandb_runs):
                    case = run_case(kind, runs, seconds, workdir)
                    print("%-6s %4d runs: visible after p50 %.2f s, p99 %.2f s, max %.2f s; file_stream requests "
                          "%.2f/s (%.3f per run); in the steady %.0f s: %s requests/s, visible after p50 %s s, "
                          "p99 %s s; GraphQL %.2f/s" % (
                              kind, runs, case["visible_p50_s"], case["visible_p99_s"], case["visible_max_s"],
                              case["requests_per_s"], case["requests_per_run_per_s"], case["steady_window_s"],
                              case["steady_requests_per_s"], case["steady_visible_p50_s"],
                              case["steady_visible_p99_s"], case["graphql_per_s"]), flush=True)
                    cases.append(case)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"bench": "visible", "seconds": seconds, "cases": cases}))


if __name__ == "__main__":
    main()
