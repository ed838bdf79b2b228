"""What logging 40 metrics costs the training loop: relay client vs in-process wandb vs tensorboardX,
and what one trainer call costs while a restarted relay takes a backlog.

interleaved  The relay client's `run.log` (to a live `relay serve` subprocess, offline mode,
             throwaway spool), wandb's `run.log` (an offline run, in-process) and tensorboardX's
             `add_scalar` x 40 are called in turn, call by call (`--block N`: N calls each per
             turn), so that each call meets caches the others have just used, as a trainer's call
             follows a training step. This machine is shared and noisy: only side-by-side ratios
             mean anything.
backlog      A trainer logs 5,000 rows while its relay is frozen (SIGSTOP: connected, acking
             nothing; the client sends and re-sends), then the relay is SIGKILLed and started again
             on the same endpoint and spool, and the trainer goes on logging a row per simulated
             1 ms step (plus `statistics()` every 50 steps) until the backlog is acked. Each
             call's wall time and the trainer thread's own CPU time (`time.thread_time()`) are
             measured: the socket work must not land on that thread.
overflow     No relay at all, a small `max_pending` (`--max-pending`, default a tenth of the calls):
             the trainer logs a row per call, pausing a simulated 1 ms step every 10 calls, so that
             `max_pending` overflows about ten times, each one spilling a file. Each call's wall time
             and trainer-thread CPU time are measured, as in backlog: the spill file's packing,
             write and fsync must not land on that thread (before the spill thread, the call that
             overflowed did all of it). Afterwards: files written, records spilled and dropped.

Each measurement runs in a worker subprocess whose `relay` package (the client) comes from a
checkout: this one, and with `--compare DIR` another one (say, main's), one after the other; the
relay side always comes from this checkout.

    python bench/client_latency.py                    # 20,000 calls each
    python bench/client_latency.py --quick            # 2,000 calls each
    python bench/client_latency.py --quick --compare /path/to/other/checkout
    python bench/client_latency.py --quick --dry-run  # 50 calls, a 200-row backlog: does it still run
    python bench/client_latency.py --quick --only overflow --compare /tmp/before   # before/after side by side

Prints a table per checkout; the last line is a JSON summary (`compare` holds the other checkout's).
Targets: the relay client >= 20x cheaper than wandb at p50 and >= 10x at p99, interleaved call by
call; during the backlog, no call over 2 ms of the trainer thread's CPU or 20 ms of wall time.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CODE = os.environ.get("RELAY_BENCH_CODE") or ROOT   # whose relay.client a worker measures
sys.path.insert(0, CODE)

from relay.cli import query_status  # noqa: E402
from relay.demo import free_endpoint, wait_for  # noqa: E402

STEP = 0.001          # the simulated training step of the backlog measurement, in seconds


def percentile(samples: list, q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metrics(rng: random.Random) -> dict:
    return {"group%d/metric%02d" % (i % 4, i): rng.random() for i in range(40)}


def start_relay(endpoint: str, spool: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env.update(WANDB_SILENT="true", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "relay", "serve", "--bind", endpoint, "--spool-dir", spool,
                             "--mode", "offline", "--log-level", "WARNING"], env=env, cwd=ROOT)


def stop_relay(relay: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    if relay.poll() is None:
        relay.send_signal(how)
        relay.wait(timeout=120)


# -- workers (run as `client_latency.py --worker KIND JSON`, with RELAY_BENCH_CODE naming the checkout) --

def worker_interleaved(job: dict) -> dict:
    from relay.client import RelayClient

    workdir = job["workdir"]
    endpoint = free_endpoint()
    relay = start_relay(endpoint, os.path.join(workdir, "spool"))
    try:
        wait_for(lambda: query_status(endpoint, 1.0), 60, "the relay")
        import wandb
        from tensorboardX import SummaryWriter

        client = RelayClient(endpoint, spill_dir=os.path.join(workdir, "spill"))
        relay_run = client.start_run(project="bench", run_id="bench-relay")
        wandb_run = wandb.init(project="bench", mode="offline", dir=workdir, id="bench-wandb",
                               settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True))
        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        rng = random.Random(0)
        block = job["block"]
        rows = [metrics(rng) for _ in range(block)]
        times = {"relay": [], "wandb": [], "tensorboardx": []}
        warmup = max(2 * block, 100)
        for start in range(-warmup, job["calls"], block):  # warm-up calls each, not counted
            for i, row in enumerate(rows):
                started = time.perf_counter()
                relay_run.log(row, frame=start + i, epoch=start + i)
                if start >= 0:
                    times["relay"].append(time.perf_counter() - started)
            for i, row in enumerate(rows):
                started = time.perf_counter()
                wandb_run.log(row, step=start + i + warmup)
                if start >= 0:
                    times["wandb"].append(time.perf_counter() - started)
            for i, row in enumerate(rows):
                step = start + i + warmup
                started = time.perf_counter()
                for name, value in row.items():
                    writer.add_scalar(name, value, step)
                if start >= 0:
                    times["tensorboardx"].append(time.perf_counter() - started)
        report = relay_run.finish(timeout=60)
        wandb_run.finish()
        writer.close()
        client.close()
    finally:
        stop_relay(relay)
    result = {"relay_delivered": report["delivered"]}
    for name, samples in times.items():
        result.update({name + "_p50_us": round(percentile(samples, 0.5) * 1e6, 2),
                       name + "_p99_us": round(percentile(samples, 0.99) * 1e6, 2),
                       name + "_max_us": round(max(samples) * 1e6, 1)})
    return result


def _timed(call, samples: list) -> object:
    cpu, wall = time.thread_time(), time.perf_counter()
    value = call()
    samples.append((time.thread_time() - cpu, time.perf_counter() - wall))
    return value


def worker_backlog(job: dict) -> dict:
    from relay.client import RelayClient

    workdir, backlog = job["workdir"], job["backlog"]
    endpoint, spool = free_endpoint(), os.path.join(workdir, "spool-backlog")
    relay = start_relay(endpoint, spool)
    rng = random.Random(1)
    rows = [metrics(rng) for _ in range(100)]
    absent, during = [], []
    try:
        wait_for(lambda: query_status(endpoint, 1.0), 60, "the relay")
        client = RelayClient(endpoint, spill_dir=os.path.join(workdir, "spill-backlog"), max_pending=backlog + 100000)
        run = client.start_run(project="bench", run_id="bench-backlog")
        for step in range(10):
            run.log(rows[step % 100], frame=step)
        assert client.flush(30.0), "the relay did not ack the first rows"
        relay.send_signal(signal.SIGSTOP)  # connected, taking frames into its buffers, acking none
        for step in range(10, 10 + backlog):
            _timed(lambda: run.log(rows[step % 100], frame=step), absent)
            if step % 10 == 0:
                time.sleep(STEP)
        stop_relay(relay, signal.SIGKILL)
        restarted = time.monotonic()
        relay = start_relay(endpoint, spool)
        step = 10 + backlog
        acked, everything = 0, 11 + backlog  # the open, the first rows and the backlog
        while acked < everything and time.monotonic() - restarted < 300:
            _timed(lambda: run.log(rows[step % 100], frame=step), during)
            step += 1
            if step % 50 == 0:
                acked = _timed(client.statistics, during)["acked"]
            time.sleep(STEP)
        drained = time.monotonic() - restarted
        report = run.finish(timeout=60)
        client.close()
    finally:
        stop_relay(relay)
    result = {"backlog": backlog, "backlog_drained": acked >= everything, "backlog_drain_s": round(drained, 2),
              "backlog_calls": len(during), "backlog_delivered": report["delivered"]}
    for name, samples in (("frozen", absent), ("backlog", during)):
        cpu, wall = [s[0] for s in samples], [s[1] for s in samples]
        result.update({name + "_max_cpu_ms": round(max(cpu) * 1e3, 3), name + "_max_wall_ms": round(max(wall) * 1e3, 3),
                       name + "_p99_cpu_ms": round(percentile(cpu, 0.99) * 1e3, 3),
                       name + "_p99_wall_ms": round(percentile(wall, 0.99) * 1e3, 3)})
    return result


def worker_overflow(job: dict) -> dict:
    from relay.client import RelayClient

    workdir, calls, max_pending = job["workdir"], job["calls"], job["max_pending"]
    rng = random.Random(2)
    rows = [metrics(rng) for _ in range(100)]
    spill_dir = os.path.join(workdir, "spill-overflow")
    client = RelayClient(free_endpoint(), spill_dir=spill_dir, max_pending=max_pending, heartbeat_every=0)
    run = client.start_run(project="bench", run_id="bench-overflow")
    for step in range(max_pending // 2):  # warm-up, not counted: the I/O thread and the socket exist
        run.log(rows[step % 100], frame=step)
    samples = []
    for step in range(max_pending // 2, max_pending // 2 + calls):
        _timed(lambda: run.log(rows[step % 100], frame=step), samples)
        if step % 10 == 0:
            time.sleep(STEP)
    stats = client.statistics()
    run.finish(timeout=0.0)
    client.close()
    final = client.statistics()
    cpu, wall = [s[0] for s in samples], [s[1] for s in samples]
    return {"overflow_calls": calls, "overflow_max_pending": max_pending,
            "overflow_files_during": len(stats["spill_files"]), "overflow_files": len(final["spill_files"]),
            "overflow_spilled": final["spilled"], "overflow_dropped": final["dropped"], "overflow_lost": final["lost"],
            "overflow_max_cpu_ms": round(max(cpu) * 1e3, 3), "overflow_p99_cpu_ms": round(percentile(cpu, 0.99) * 1e3, 3),
            "overflow_max_wall_ms": round(max(wall) * 1e3, 3),
            "overflow_p99_wall_ms": round(percentile(wall, 0.99) * 1e3, 3),
            "overflow_calls_over_2ms_cpu": sum(1 for value in cpu if value > 0.002)}


# -- the measurement ----------------------------------------------------------------------------

def measure(kind: str, job: dict, code: str) -> dict:
    env = dict(os.environ, RELAY_BENCH_CODE=code, WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(job)], env=env,
                          stdout=subprocess.PIPE, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError("the %s worker for %s failed with exit code %d" % (kind, code, done.returncode))
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(result: dict) -> dict:
    result = dict(result)
    if "relay_p50_us" not in result:
        return result
    result["ratio_p50"] = round(result["wandb_p50_us"] / result["relay_p50_us"], 1)
    result["ratio_p99"] = round(result["wandb_p99_us"] / result["relay_p99_us"], 1)
    result["tensorboardx_ratio_p50"] = round(result["tensorboardx_p50_us"] / result["relay_p50_us"], 1)
    result["tensorboardx_ratio_p99"] = round(result["tensorboardx_p99_us"] / result["relay_p99_us"], 1)
    return result


def show(label: str, code: str, result: dict, block: int) -> None:
    print("== %s (%s)" % (label, code))
    if "relay_p50_us" in result:
        show_interleaved(result, block)
    if "backlog" in result:
        show_backlog(result)
    if "overflow_calls" in result:
        show_overflow(result)


def show_interleaved(result: dict, block: int) -> None:
    print("40 metrics, interleaved %s" % ("call by call" if block == 1 else "in blocks of %d calls" % block))
    print("%-28s %10s %10s %10s" % ("", "p50 us", "p99 us", "max us"))
    for name, key in (("relay client run.log", "relay"), ("wandb in-process run.log", "wandb"),
                      ("tensorboardX add_scalar x40", "tensorboardx")):
        print("%-28s %10.1f %10.1f %10.1f" % (name, result[key + "_p50_us"], result[key + "_p99_us"],
                                             result[key + "_max_us"]))
    print("relay client is %.1fx cheaper than wandb at p50 (target >= 20x) and %.1fx at p99 (target >= 10x); "
          "%.1fx / %.1fx cheaper than tensorboardX" % (result["ratio_p50"], result["ratio_p99"],
                                                      result["tensorboardx_ratio_p50"],
                                                      result["tensorboardx_ratio_p99"]))


def show_backlog(result: dict) -> None:
    print("backlog of %d rows handed to a restarted relay in %.1f s over %d calls (drained: %s):"
          % (result["backlog"], result["backlog_drain_s"], result["backlog_calls"], result["backlog_drained"]))
    for phase in ("frozen", "backlog"):
        print("  %-8s one call: max %.3f ms CPU of the trainer's thread (p99 %.3f), max %.3f ms wall (p99 %.3f)"
              % (phase, result[phase + "_max_cpu_ms"], result[phase + "_p99_cpu_ms"], result[phase + "_max_wall_ms"],
                 result[phase + "_p99_wall_ms"]))
    print("  targets: <= 2 ms CPU, <= 20 ms wall during the backlog")


def show_overflow(result: dict) -> None:
    print("overflow, no relay: %d calls with max_pending=%d; %d spill files while logging, %d in all; "
          "%d records spilled, %d dropped, %d lost:"
          % (result["overflow_calls"], result["overflow_max_pending"], result["overflow_files_during"],
             result["overflow_files"], result["overflow_spilled"], result["overflow_dropped"], result["overflow_lost"]))
    print("  one call: max %.3f ms CPU of the trainer's thread (p99 %.3f), max %.3f ms wall (p99 %.3f); "
          "%d calls over 2 ms CPU" % (result["overflow_max_cpu_ms"], result["overflow_p99_cpu_ms"],
                                      result["overflow_max_wall_ms"], result["overflow_p99_wall_ms"],
                                      result["overflow_calls_over_2ms_cpu"]))
    print("  targets: <= 2 ms CPU, <= 20 ms wall")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="2,000 calls each")
    parser.add_argument("--dry-run", action="store_true", help="50 calls each, a 200-row backlog: does it still run")
    parser.add_argument("--block", type=int, default=1, help="calls per turn in the interleaving [1]")
    parser.add_argument("--backlog", type=int, default=5000, help="rows logged while the relay is down [5000]")
    parser.add_argument("--compare", metavar="DIR", help="also measure the client of this checkout")
    parser.add_argument("--max-pending", type=int, help="max_pending of the overflow measurement [calls / 10]")
    parser.add_argument("--only", choices=("interleaved", "backlog", "overflow"), help="one of the measurements")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, job = args.worker
        workers = {"interleaved": worker_interleaved, "backlog": worker_backlog, "overflow": worker_overflow}
        print(json.dumps(workers[kind](json.loads(job))))
        return 0
    calls = 2000 if args.quick else args.calls
    if args.dry_run:
        calls, args.backlog = 50, 200
    checkouts = [("this checkout", ROOT)] + ([("compared", os.path.abspath(args.compare))] if args.compare else [])
    results = []
    for label, code in checkouts:
        workdir = tempfile.mkdtemp(prefix="relay-bench-")
        try:
            job = {"workdir": workdir, "calls": calls, "block": args.block, "backlog": args.backlog,
                   "max_pending": args.max_pending or max(10, calls // 10)}
            result = {}
            for kind in ("interleaved", "backlog", "overflow"):
                if args.only in (None, kind):
                    result.update(measure(kind, job, code))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result = summarize(result)
        show(label, code, result, args.block)
        results.append(result)
    summary = dict(results[0], calls=calls, block=args.block)
    if args.compare:
        summary["compare"] = dict(results[1], code=os.path.abspath(args.compare))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
