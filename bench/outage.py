"""What a 60-second W&B outage does to a training loop: in-process wandb vs through the relay.

A trainer-like loop (5 ms of "work" per step, 40 metrics logged every step, a 256 KiB checkpoint
artifact every 2 s, finish at the end) runs twice against the suite's fake W&B backend
(tests/fakewandb.py): once calling the wandb SDK in-process (online), once through the relay.
W&B hangs (requests held open, never answered) from 5 s in for `--hang` seconds. Writes a PNG of
step time over wall time for both and prints the longest stall of each.

    python bench/outage.py                 # 60 s hang, ~3 minutes, writes bench/outage.png
    python bench/outage.py --quick         # 10 s hang
    python bench/outage.py --quick --dry-run   # a 1 s hang 1 s in, no plot: checks it still runs
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, os.path.dirname(HERE))

from fakewandb import FakeWandb  # noqa: E402
from harness import FAST_RETRIES, RelayProcess, wandb_env  # noqa: E402

WORK = 0.005
CHECKPOINT_EVERY = 2.0


def training_loop(log_row, log_checkpoint, finish, seconds: float, workdir: str) -> list[tuple[float, float]]:
    """Returns (wall time since start, step duration) per step, the finish included as a last step."""
    rng = random.Random(0)
    checkpoint = os.path.join(workdir, "nn", "model.pth")
    os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
    samples = []
    started = time.monotonic()
    next_checkpoint = started + CHECKPOINT_EVERY
    step = 0
    while time.monotonic() - started < seconds:
        begin = time.monotonic()
        time.sleep(WORK)
        log_row({"m%02d" % i: rng.random() for i in range(40)}, step)
        if begin >= next_checkpoint:
            with open(checkpoint + ".tmp", "wb") as handle:
                handle.write(os.urandom(256 * 1024))
            os.replace(checkpoint + ".tmp", checkpoint)
            log_checkpoint(checkpoint, step)
            next_checkpoint = begin + CHECKPOINT_EVERY
        samples.append((begin - started, time.monotonic() - begin))
        step += 1
    begin = time.monotonic()
    finish()
    samples.append((begin - started, time.monotonic() - begin))
    return samples


def schedule_hang(fake: FakeWandb, start: float, length: float) -> threading.Timer:
    def begin():
        fake.set_fault("hang")
        threading.Timer(length, fake.set_fault, args=("ok",)).start()
    timer = threading.Timer(start, begin)
    timer.start()
    return timer


def in_process(fake: FakeWandb, workdir: str, seconds: float, hang_at: float, hang: float) -> list:
    import wandb

    os.environ.update(fake.env())
    os.environ["WANDB_SILENT"] = "true"
    run = wandb.init(project="outage", id="inprocess", dir=workdir,
                     settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True))
    schedule_hang(fake, hang_at, hang)

    def checkpoint(path, step):
        artifact = wandb.Artifact("model-inprocess", type="model", metadata={"step": step})
        artifact.add_file(path)
        run.log_artifact(artifact)

    return training_loop(lambda row, step: run.log(row, step=step), checkpoint, run.finish, seconds, workdir)


def through_relay(fake: FakeWandb, workdir: str, seconds: float, hang_at: float, hang: float) -> list:
    from relay.client import RelayClient

    env = wandb_env(fake, os.path.join(workdir, "home"))
    env.update(FAST_RETRIES)
    relay = RelayProcess("ipc://%s/relay.ipc" % workdir, os.path.join(workdir, "spool"), env,
                         ["--mode", "online", "--artifact-root", workdir, "--log-level", "WARNING"],
                         os.path.join(workdir, "relay.log"))
    relay.start()
    client = RelayClient(relay.endpoint, spill_dir=os.path.join(workdir, "spill"))
    run = client.start_run(project="outage", run_id="relayed")
    schedule_hang(fake, hang_at, hang)
    try:
        return training_loop(lambda row, step: run.log(row, frame=step, epoch=step),
                             lambda path, step: run.log_checkpoint(path, metadata={"step": step}),
                             lambda: run.finish(timeout=10.0), seconds, workdir)
    finally:
        client.close()
        relay.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hang", type=float, default=60.0, help="seconds W&B hangs, starting 5 s in")
    parser.add_argument("--quick", action="store_true", help="a 10 s hang")
    parser.add_argument("--png", default=os.path.join(HERE, "outage.png"))
    parser.add_argument("--dry-run", action="store_true", help="a 1 s hang 1 s in, 3 s loops, no plot")
    args = parser.parse_args()
    hang_at, hang = 5.0, 10.0 if args.quick else args.hang
    seconds = hang_at + hang + 15.0
    if args.dry_run:
        hang_at, hang, seconds = 1.0, 1.0, 3.0
    results = {}
    for name, function in (("relay client", through_relay), ("wandb in-process", in_process)):
        fake = FakeWandb()
        fake.start()
        workdir = tempfile.mkdtemp(prefix="relay-outage-")
        try:
            results[name] = function(fake, workdir, seconds, hang_at, hang)
        finally:
            fake.set_fault("ok")
            fake.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        steps, finish = results[name][:-1], results[name][-1][1]
        worst = max(steps, key=lambda sample: sample[1])
        print("%-17s %6d steps, longest step stall %8.1f ms at t=%.1f s, finish took %.1f s"
              % (name, len(steps), worst[1] * 1e3, worst[0], finish), flush=True)
    if args.dry_run:
        args.png = None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.axvspan(hang_at, hang_at + hang, color="0.9", label="W&B hangs")
    for name, samples in results.items():
        axis.plot([t for t, _ in samples], [d * 1e3 for _, d in samples], ".", markersize=2, label=name)
    axis.set_yscale("log")
    axis.set_xlabel("wall time (s)")
    axis.set_ylabel("step time incl. logging (ms, log scale)")
    axis.set_title("Training step time through a %.0f s W&B outage (5 ms of work per step)" % hang)
    axis.legend(loc="upper right")
    figure.tight_layout()
    if args.png:
        figure.savefig(args.png, dpi=110)
        print("plot written to %s" % args.png)
    summary = {}
    for name, samples in results.items():
        key = name.split()[0]
        summary[key + "_max_step_stall_ms"] = round(max(d for _, d in samples[:-1]) * 1e3, 1)
        summary[key + "_finish_s"] = round(samples[-1][1], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
