"""What logging 40 metrics costs the training loop: relay client vs in-process wandb vs tensorboardX.

All three are measured in one process, interleaved in blocks of 100 calls (this machine is shared
and noisy, so only side-by-side ratios mean anything): the relay client's `run.log` talks to a live
`relay serve` subprocess (offline mode, throwaway spool); wandb's `run.log` logs to an offline run
in-process; tensorboardX does `add_scalar` x 40 into an event file. Blocks, not single calls: a
call made right after a wandb call pays for wandb's cache and GIL footprint (`--block 1` shows
it), which a trainer that only has the relay client never sees.

    python bench/client_latency.py            # 20,000 calls each
    python bench/client_latency.py --quick    # 2,000 calls each
    python bench/client_latency.py --quick --dry-run   # 50 calls each: checks it still runs

Prints p50/p99/max for each and the ratios; the last line is a JSON summary.
Targets: the relay client >= 20x cheaper than wandb at p50 and >= 10x at p99.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relay.cli import query_status  # noqa: E402
from relay.client import RelayClient  # noqa: E402
from relay.demo import free_endpoint, wait_for  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metrics(rng: random.Random) -> dict:
    return {"group%d/metric%02d" % (i % 4, i): rng.random() for i in range(40)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="2,000 calls each")
    parser.add_argument("--dry-run", action="store_true", help="50 calls each, blocks of 10: does it still run")
    parser.add_argument("--block", type=int, default=100,
                        help="calls per turn: the two alternate in blocks of this many calls [100]")
    args = parser.parse_args()
    calls = 2000 if args.quick else args.calls
    if args.dry_run:
        calls, args.block = 50, 10
    workdir = tempfile.mkdtemp(prefix="relay-bench-")
    endpoint = free_endpoint()
    env = dict(os.environ, WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    relay = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--bind", endpoint, "--spool-dir",
                              os.path.join(workdir, "spool"), "--mode", "offline", "--log-level", "WARNING"], env=env)
    try:
        wait_for(lambda: query_status(endpoint, 1.0), 60, "the relay")
        import wandb

        client = RelayClient(endpoint, spill_dir=os.path.join(workdir, "spill"))
        relay_run = client.start_run(project="bench", run_id="bench-relay")
        os.environ["WANDB_SILENT"] = "true"
        wandb_run = wandb.init(project="bench", mode="offline", dir=workdir, id="bench-wandb",
                               settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True))
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        rng = random.Random(0)
        relay_times, wandb_times, tbx_times = [], [], []
        block = args.block
        rows = [metrics(rng) for _ in range(block)]
        warmup = 2 * block
        for start in range(-warmup, calls, block):  # warm-up calls each, not counted
            for i, row in enumerate(rows):
                started = time.perf_counter()
                relay_run.log(row, frame=start + i, epoch=start + i)
                if start >= 0:
                    relay_times.append(time.perf_counter() - started)
            for i, row in enumerate(rows):
                started = time.perf_counter()
                wandb_run.log(row, step=start + i + warmup)
                if start >= 0:
                    wandb_times.append(time.perf_counter() - started)
            for i, row in enumerate(rows):
                step = start + i + warmup
                started = time.perf_counter()
                for name, value in row.items():
                    writer.add_scalar(name, value, step)
                if start >= 0:
                    tbx_times.append(time.perf_counter() - started)
        report = relay_run.finish(timeout=60)
        wandb_run.finish()
        writer.close()
        client.close()
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=120)
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {"calls": calls, "relay_delivered": report["delivered"]}
    print("%-26s %10s %10s %10s" % ("40 metrics, one step", "p50 us", "p99 us", "max us"))
    for name, samples in (("relay client", relay_times), ("wandb in-process", wandb_times),
                          ("tensorboardX add_scalar x40", tbx_times)):
        p50, p99, worst = (percentile(samples, 0.5) * 1e6, percentile(samples, 0.99) * 1e6, max(samples) * 1e6)
        print("%-26s %10.1f %10.1f %10.1f" % (name, p50, p99, worst))
        key = name.split()[0].lower()
        summary.update({key + "_p50_us": round(p50, 2), key + "_p99_us": round(p99, 2),
                        key + "_max_us": round(worst, 1)})
    summary["ratio_p50"] = round(summary["wandb_p50_us"] / summary["relay_p50_us"], 1)
    summary["ratio_p99"] = round(summary["wandb_p99_us"] / summary["relay_p99_us"], 1)
    summary["tensorboardx_ratio_p50"] = round(summary["tensorboardx_p50_us"] / summary["relay_p50_us"], 1)
    summary["tensorboardx_ratio_p99"] = round(summary["tensorboardx_p99_us"] / summary["relay_p99_us"], 1)
    print("relay client is %.1fx cheaper than wandb at p50 (target >= 20x) and %.1fx at p99 (target >= 10x); "
          "%.1fx / %.1fx cheaper than tensorboardX" % (summary["ratio_p50"], summary["ratio_p99"],
                                                      summary["tensorboardx_ratio_p50"],
                                                      summary["tensorboardx_ratio_p99"]))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
