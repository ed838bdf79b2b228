"""How fast the relay takes records in, and how fast it gets them into W&B (offline mode).

Ingest: N client processes (1, 8, 64) each log a share of the records into one relay as fast as
the relay acks them; messages/s = records acked / (last ack - first send). Two kinds of client:
`client` is the real RelayClient (`run.log` of 40 metrics, the trainer's path), `raw` is a DEALER
socket sending pre-encoded frames with a window of unacked ones (the relay alone, no client cost).
All clients log into one run opened in mode `disabled`, so a single uploader drops what is acked
(ingest is measured, not uploading; with a run per client, 64 uploader processes starting up
would be measured instead).

Upload: the spool is filled beforehand (open, rows of 40 metrics, finish) for R runs (1, 16, 64),
then a relay in offline mode is started and rows/s = rows / (relay started -> every run finished
in W&B), the relay's and the runs' start-up (processes, `wandb.init`) and `run.finish()` included. Next to it, in the
same invocation, the wandb SDK's own ceiling on this machine: one process doing `run.log` of the
same rows into an offline run, then `finish()`.

Decode: the relay's intake CPU per frame, no sockets: `protocol.decode` (msgpack, then the checks
of relay/protocol.py and relay/limits.py) and `intake.classify` (decode, plus the paths of a
checkpoint or media record) of a log record of 40 float metrics and of an open record with a
nested config, in a worker process per code tree: frames per second of CPU time, the best of a
few rounds, the trees taking turns; with `--compare`, the ratio of this tree's rate to the other's.

    python bench/throughput.py                 # 100,000 messages per ingest case, 100,000 rows per upload case
    python bench/throughput.py --quick         # 20,000 / 20,000
    python bench/throughput.py --quick --dry-run   # tiny sizes, 1 and 2 clients/runs: checks it still works
    python bench/throughput.py --compare /tmp/old  # each relay case also with the `relay` of /tmp/old
    python bench/throughput.py --only decode --compare /tmp/old   # decode and classify, side by side

The last line is a JSON summary. Targets: ingest >= 20,000 acked messages/s; upload
>= 5,000 rows/s of 40 metrics across 16 runs (>= 70 % of the SDK's ceiling).
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
sys.path.insert(0, HERE)

from common import ROOT, Relay, codes, descendants, metrics_row, pss_kib, ready_wait, rss_kib, run_workers  # noqa: E402

from relay import protocol  # noqa: E402

INGEST_RUN = "bench-ingest"
WINDOW = 1000  # raw clients: frames in flight at most


# -- workers (run as `throughput.py --worker KIND JSON` in their own processes) ------------------

def worker_client(args: dict) -> dict:
    """The trainer's path: RelayClient + run.log, kept under max_pending by waiting for acks."""
    from relay.client import RelayClient

    rng = random.Random(args["seed"])
    rows = [metrics_row(rng) for _ in range(100)]
    client = RelayClient(args["endpoint"], spill_dir=args["spill_dir"], heartbeat_every=0)
    client.submit({"t": "open", "run": INGEST_RUN, "settings": {"project": "bench", "mode": "disabled"}})
    run_log = _run(client)
    client.flush(30.0)
    ready_wait()
    started = time.monotonic()
    for i in range(args["messages"]):
        run_log(rows[i % 100], frame=i, epoch=i)
        if i % 256 == 255:
            while client.statistics()["pending"] > 4000:
                client.flush(0.005)
    delivered = client.flush(120.0)
    ended = time.monotonic()
    stats = client.statistics()
    client.close()
    return {"started": started, "ended": ended, "delivered": delivered, "acked": stats["acked"] - 1,
            "spilled": stats["spilled"], "resent": stats["resent"]}


def _run(client):
    from relay.client import Run

    return Run(client, INGEST_RUN, None).log


def worker_raw(args: dict) -> dict:
    """The relay alone: pre-encoded frames from a DEALER socket, at most WINDOW unacked."""
    import zmq

    rng = random.Random(args["seed"])
    rows = [metrics_row(rng) for _ in range(100)]
    stream = "raw-%d-%d" % (os.getpid(), args["seed"])
    frames = [protocol.encode({"v": protocol.VERSION, "t": "open", "stream": stream, "seq": 1, "run": INGEST_RUN,
                               "settings": {"project": "bench", "mode": "disabled"}})]
    for i in range(args["messages"]):
        frames.append(protocol.encode({"v": protocol.VERSION, "t": "log", "stream": stream, "seq": i + 2,
                                       "run": INGEST_RUN, "time": time.time(), "metrics": rows[i % 100],
                                       "frame": i, "epoch": i}))
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100000)
    sock.connect(args["endpoint"])
    acked = 0
    sent = 0
    last_progress = 0.0

    def pump(until: int, deadline: float) -> None:
        nonlocal acked, sent, last_progress
        while acked < until and time.monotonic() < deadline:
            while sent < until and sent - acked < WINDOW:
                sock.send(frames[sent])
                sent += 1
            if sock.poll(1000, zmq.POLLIN):
                while True:
                    try:
                        reply = protocol.decode_raw(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if reply.get("t") == "ack" and reply["upto"] > acked:
                        acked = reply["upto"]
                        last_progress = time.monotonic()
            elif time.monotonic() - last_progress > 1.0:
                sent = acked  # lost in a full queue: send again from the first unacked (the relay dedupes)

    pump(1, time.monotonic() + 30)
    ready_wait()
    started = time.monotonic()
    pump(len(frames), time.monotonic() + 120)
    ended = time.monotonic()
    sock.close(linger=0)
    context.term()
    return {"started": started, "ended": ended, "delivered": acked == len(frames), "acked": acked - 1,
            "spilled": 0, "resent": 0}


def worker_sdk(args: dict) -> dict:
    """The wandb SDK's own ceiling: run.log of the same rows into an offline run, then finish()."""
    import wandb

    rng = random.Random(args["seed"])
    rows = [metrics_row(rng) for _ in range(100)]
    run = wandb.init(project="bench", mode="offline", dir=args["dir"], id="sdk-ceiling",
                     settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True, silent=True,
                                             x_disable_machine_info=True, save_code=False))
    ready_wait()
    started = time.monotonic()
    for i in range(args["rows"]):
        row = dict(rows[i % 100])
        row["frame"] = i
        row["epoch"] = i
        run.log(row, step=i)
    logged = time.monotonic()
    run.finish()
    ended = time.monotonic()
    return {"started": started, "logged": logged, "ended": ended}


def decode_frames(seed: int = 0) -> dict:
    """The frames of the decode case: a log record of 40 float metrics, an open record whose config
    nests as a TokenHSI/rl_games one does (train.params.network.mlp.units; 17 maps and lists, 76
    entries in all)."""
    rng = random.Random(seed)
    header = {"v": protocol.VERSION, "stream": "bench-decode-1234", "seq": 123456, "run": "tokenhsi-run-0001"}
    log = dict(header, t="log", time=time.time(), metrics=metrics_row(rng), frame=1000, epoch=10)
    network = {"name": "actor_critic", "separate": True, "mlp": {"units": [1024, 1024, 512], "activation": "relu"},
               "mu_activation": "None", "sigma_init": {"name": "const", "val": -2.9}}
    algo = {"learning_rate": 2e-5, "gamma": 0.99, "tau": 0.95, "e_clip": 0.2, "horizon_length": 32,
            "minibatch_size": 16384, "mini_epochs": 6, "max_epochs": 100000, "normalize_input": True,
            "bounds_loss_coef": 10.0, "disc_coef": 5.0, "amp_obs_demo_buffer_size": 200000}
    env = {"numEnvs": 4096, "episodeLength": 300, "stateInit": "Random", "enableEarlyTermination": True,
           "keyBodies": ["right_hand", "left_hand", "right_foot", "left_foot", "sword", "shield"],
           "plane": {"staticFriction": 1.0, "dynamicFriction": 1.0, "restitution": 0.0},
           "sim": {"dt": 1 / 60, "substeps": 2, "up_axis": "z", "gravity": [0.0, 0.0, -9.81],
                   "physx": {"num_threads": 4, "solver_type": 1, "num_position_iterations": 4,
                             "contact_offset": 0.02, "rest_offset": 0.0, "bounce_threshold_velocity": 0.2}}}
    config = {"train": {"params": {"network": network, "config": algo, "seed": 42}}, "env": env,
              "task": "HumanoidComposite", "headless": True, "cfg_train": "cfg/train/rlg/amp.yaml"}
    settings = {"project": "tokenhsi", "name": "run-0001", "group": "composite", "tags": ["bench"],
                "config": config, "mode": "offline"}
    opened = dict(header, t="open", seq=1, settings=settings)
    return {"log, 40 float metrics": protocol.encode(log), "open, nested config": protocol.encode(opened)}


def worker_decode(args: dict) -> dict:
    """Frames decoded per second by protocol.decode and intake.classify of the `relay` package in
    args["code"]: this script imported this checkout's, so it is imported afresh from there."""
    import timeit

    sys.path.insert(0, args["code"])
    for name in [name for name in sys.modules if name.split(".")[0] == "relay"]:
        del sys.modules[name]
    from relay import protocol as measured
    from relay.config import RelayConfig
    from relay.intake import classify

    config = RelayConfig(spool_dir=os.path.join(tempfile.gettempdir(), "relay-bench-decode"))
    frames = decode_frames()
    for frame in frames.values():
        assert measured.decode(frame)["seq"] and classify(frame, config)[1] == ""
    ready_wait()
    results = {}
    for case, frame in frames.items():
        timings = {  # CPU seconds of this process: what the relay's server spends per frame
            "decode": min(timeit.repeat(lambda: measured.decode(frame), timer=time.process_time,
                                        number=args["frames"], repeat=5)),
            "classify": min(timeit.repeat(lambda: classify(frame, config), timer=time.process_time,
                                          number=args["frames"], repeat=5))}
        results[case] = {"bytes": len(frame), **{"%s_per_s" % what: round(args["frames"] / seconds)
                                                  for what, seconds in timings.items()}}
    return results


WORKERS = {"client": worker_client, "raw": worker_raw, "sdk": worker_sdk, "decode": worker_decode}


def start_workers(kind: str, jobs: list[dict]) -> list[dict]:
    return run_workers(os.path.abspath(__file__), kind, jobs)


# -- ingest -------------------------------------------------------------------------------------

def measure_ingest(kind: str, clients: int, messages: int, workdir: str, code: str = ROOT) -> dict:
    spool = os.path.join(workdir, "ingest-%s-%d" % (kind, clients))
    relay = Relay(os.path.join(spool, "spool"), mode="offline", code=code)
    try:
        relay.wait_ready()
        each = max(1, messages // clients)
        jobs = [{"endpoint": relay.endpoint, "messages": each, "seed": i, "spill_dir": os.path.join(spool, "spill")}
                for i in range(clients)]
        results = start_workers(kind, jobs)
        rss = rss_kib(relay.pid)
        counters = relay.status()["counters"]
    finally:
        relay.stop()
    acked = sum(r["acked"] for r in results)
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {"kind": kind, "clients": clients, "acked": acked, "seconds": round(seconds, 3),
            "messages_per_s": round(acked / seconds), "all_delivered": all(r["delivered"] for r in results),
            "spilled": sum(r["spilled"] for r in results), "resent": sum(r["resent"] for r in results),
            "relay_rss_mib": round(rss / 1024, 1), "relay_duplicates": counters.get("duplicates", 0)}


# -- decode -------------------------------------------------------------------------------------

def measure_decode(trees: list[tuple[str, str]], frames: int, rounds: int = 3) -> dict:
    """{tree name: {case: rates}}, each rate the best of `rounds` workers, the trees taking turns."""
    best: dict = {}
    for _ in range(rounds):
        for name, code in trees:
            result = run_workers(os.path.abspath(__file__), "decode", [{"code": code, "frames": frames}])[0]
            for case, rates in result.items():
                kept = best.setdefault(name, {}).setdefault(case, dict(rates))
                for what, rate in rates.items():
                    kept[what] = max(kept[what], rate)
    return best


def show_decode(best: dict) -> dict:
    """Print the decode table (and this tree's rate over the compared one's); return the summary."""
    print("%-8s %-22s %6s %11s %8s %11s %8s" % ("relay", "frame", "bytes", "decode/s", "µs", "classify/s", "µs"))
    for name, cases in best.items():
        for case, rates in cases.items():
            print("%-8s %-22s %6d %11d %8.1f %11d %8.1f" % (
                name, case, rates["bytes"], rates["decode_per_s"], 1e6 / rates["decode_per_s"],
                rates["classify_per_s"], 1e6 / rates["classify_per_s"]), flush=True)
    summary = {"rates": best}
    if len(best) == 2:
        summary["this_over_compare"] = {
            case: {what: round(rates[what] / best["compare"][case][what], 2) for what in ("decode_per_s", "classify_per_s")}
            for case, rates in best["this"].items() if case in best["compare"]}
        for case, ratios in summary["this_over_compare"].items():
            print("this / compare, %s: decode %.2fx, classify %.2fx"
                  % (case, ratios["decode_per_s"], ratios["classify_per_s"]), flush=True)
    return summary


# -- upload -------------------------------------------------------------------------------------

def fill_spool(spool_dir: str, runs: list[str], rows_per_run: int, seed: int = 0, finish: bool = True) -> int:
    """Spool `rows_per_run` rows of 40 metrics for each run (open first, finish last), as the relay's
    ingest would have, in batches of 500 per transaction. Returns the number of rows."""
    from relay.spool import Spool

    rng = random.Random(seed)
    rows = [metrics_row(rng) for _ in range(100)]
    spool = Spool(spool_dir)
    now = time.time()
    try:
        for run_id in runs:
            stream = "fill-" + run_id
            messages = [{"v": 1, "t": "open", "run": run_id, "stream": stream, "seq": 1,
                         "settings": {"project": "bench", "name": run_id, "mode": "offline"}}]
            for i in range(rows_per_run):
                messages.append({"v": 1, "t": "log", "run": run_id, "stream": stream, "seq": i + 2, "time": now,
                                 "metrics": rows[i % 100], "frame": i, "epoch": i})
            if finish:
                messages.append({"v": 1, "t": "finish", "run": run_id, "stream": stream, "seq": rows_per_run + 2,
                                 "exit_code": 0, "time": now})
            for low in range(0, len(messages), 500):
                spool.ingest([(m, "") for m in messages[low:low + 500]])
    finally:
        spool.close()
    return len(runs) * rows_per_run


def measure_upload(runs: int, total_rows: int, workdir: str, code: str = ROOT) -> dict:
    spool = os.path.join(workdir, "upload-%d-%d" % (runs, len(os.listdir(workdir))), "spool")
    run_ids = ["up%02d" % i for i in range(runs)]
    rows = fill_spool(spool, run_ids, max(1, total_rows // runs))
    ready = time.monotonic()  # from the relay's start: it starts the uploaders before it answers anyone
    relay = Relay(spool, mode="offline", code=code)
    samples = []  # (seconds since the relay started, rows handed to the SDK)
    peak_rss = 0
    try:
        relay.wait_ready()
        while True:
            status = relay.status(30.0)
            now = time.monotonic() - ready
            samples.append((now, status["records"]["received"] - status["records"]["unsent"]))
            peak_rss = max(peak_rss, pss_kib(relay.pid) + sum(pss_kib(c) for c in descendants(relay.pid)))
            if status["run_counts"]["active"] == 0 and status["run_counts"]["total"] > 0:
                break
            if now > 900:
                raise TimeoutError("upload of %d rows over %d runs not done after 900 s" % (rows, runs))
            time.sleep(1.0)
        seconds = time.monotonic() - ready
    finally:
        relay.stop()
    handed = samples[-1][1] or 1
    first = next(t for t, n in samples if n >= 0.1 * handed)
    last = next(t for t, n in samples if n >= 0.9 * handed)
    steady = 0.8 * handed / (last - first) if last > first else None
    return {"runs": runs, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "rows_per_s_10_to_90pct": round(steady) if steady else None,
            "peak_pss_mib_with_uploaders": round(peak_rss / 1024)}


def measure_sdk(rows: int, workdir: str) -> dict:
    result = start_workers("sdk", [{"rows": rows, "seed": 0, "dir": os.path.join(workdir, "sdk")}])[0]
    return {"rows": rows, "log_s": round(result["logged"] - result["started"], 2),
            "finish_s": round(result["ended"] - result["logged"], 2),
            "rows_per_s": round(rows / (result["ended"] - result["started"]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 messages / rows per case")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and 1-2 clients/runs: does it still run")
    parser.add_argument("--messages", type=int, default=100000, help="messages per ingest case")
    parser.add_argument("--rows", type=int, default=100000, help="rows per upload case")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--runs", default="1,16,64")
    parser.add_argument("--kinds", default="raw,client")
    parser.add_argument("--only", choices=("decode", "ingest", "upload"))
    parser.add_argument("--compare", metavar="DIR",
                        help="also run every relay case with the relay package of DIR (e.g. an export of the "
                             "previous commit), alternating with this one: before/after side by side")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(rest[0]))), flush=True)
        return 0
    if args.quick:
        args.messages, args.rows = 20000, 20000
    if args.dry_run:
        args.messages, args.rows, args.clients, args.runs = 200, 100, "1,2", "1,2"
    trees = codes(parser, args.compare)
    workdir = tempfile.mkdtemp(prefix="relay-throughput-")
    summary: dict = {"ingest": [], "upload": []}
    if args.compare:
        summary["compare"] = os.path.abspath(args.compare)
    try:
        if args.only in (None, "decode"):
            frames = 200 if args.dry_run else 5000 if args.quick else 20000
            summary["decode"] = show_decode(measure_decode(trees, frames, rounds=1 if args.dry_run else 3))
        if args.only in (None, "ingest"):
            print("%-8s %-7s %8s %10s %9s %14s %10s" % ("relay", "client", "clients", "acked", "seconds",
                                                      "messages/s", "relay RSS"))
            for kind in args.kinds.split(","):
                for clients in [int(n) for n in args.clients.split(",")]:
                    for name, code in trees:
                        result = dict(measure_ingest(kind, clients, args.messages, workdir, code), relay=name)
                        summary["ingest"].append(result)
                        print("%-8s %-7s %8d %10d %9.2f %14d %8.0f MiB%s" % (
                            name, kind, clients, result["acked"], result["seconds"], result["messages_per_s"],
                            result["relay_rss_mib"], "" if result["all_delivered"] else "  NOT ALL DELIVERED"),
                            flush=True)
        if args.only in (None, "upload"):
            sdk = measure_sdk(args.rows, workdir)
            summary["sdk_ceiling"] = sdk
            print("wandb SDK alone, one process: %d rows/s (%.1f s run.log + %.1f s finish)"
                  % (sdk["rows_per_s"], sdk["log_s"], sdk["finish_s"]), flush=True)
            print("%-8s %5s %8s %9s %9s %14s %10s" % ("relay", "runs", "rows", "seconds", "rows/s", "rows/s 10-90%",
                                                    "peak PSS"))
            for runs in [int(n) for n in args.runs.split(",")]:
                for name, code in trees:
                    try:
                        result = dict(measure_upload(runs, args.rows, workdir, code), relay=name)
                    except (TimeoutError, RuntimeError) as exc:  # say so, and go on with the other cases
                        summary["upload"].append({"runs": runs, "relay": name, "error": str(exc)})
                        print("%-8s %5d  failed: %s" % (name, runs, exc), flush=True)
                        continue
                    result["of_sdk_ceiling"] = round(result["rows_per_s"] / sdk["rows_per_s"], 2)
                    summary["upload"].append(result)
                    print("%-8s %5d %8d %9.2f %9d %14s %7d MiB  (%.0f%% of the SDK alone)" % (
                        name, runs, result["rows"], result["seconds"], result["rows_per_s"],
                        result["rows_per_s_10_to_90pct"], result["peak_pss_mib_with_uploaders"],
                        100 * result["of_sdk_ceiling"]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
