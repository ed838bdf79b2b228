"""`relay demo`: the whole path on one machine, no W&B account needed.

Starts `relay serve --mode offline` as a subprocess, runs a short fake training run through it
from a second process (metrics with frame/epoch axes, a checkpoint, a summary), waits until the
relay reports the run finished, stops the relay with SIGTERM and prints where the offline W&B run
is and the `wandb sync` command that uploads it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

from relay import durable
from relay.status import RelayStatus, RunStatus, query_status
from relay.testing import RelayProcess, free_endpoint, wait_for

PROJECT = "tokenhsi-relay-demo"


def run_demo(directory: str, steps: int) -> int:
    spool_dir = os.path.join(directory, "spool")
    checkpoints = os.path.join(directory, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    relay = RelayProcess(free_endpoint(), spool_dir, ["--mode", "offline", "--artifact-root", checkpoints,
                                                      "--drain-timeout", "60"])
    print("demo: starting the relay on %s (offline mode, spool %s)" % (relay.endpoint, spool_dir), flush=True)
    relay.start(wait=False)
    try:
        relay.wait_ready(60)
        print("demo: relay is up; running a %d-step training client in another process" % steps, flush=True)
        client = subprocess.run([sys.executable, "-m", "relay.demo", relay.endpoint, checkpoints, str(steps)],
                                timeout=300)
        if client.returncode != 0:
            print("demo: the client failed with exit code %d" % client.returncode, file=sys.stderr)
            return 1

        def finished() -> RunStatus | None:
            reply = query_status(relay.endpoint, 1.0)
            runs = [run for run in (RelayStatus.from_dict(reply).runs if reply else []) if run.finished
                    and run.pending == 0]
            return runs[0] if runs else None

        run = wait_for(finished, 120, "the relay to upload the run")
        print("demo: the relay uploaded %d records; stopping it with SIGTERM" % run.received, flush=True)
    finally:
        code = relay.stop(timeout=120, must_exit=False)
    print()
    print("demo: relay exited with code %d" % code)
    print("demo: the offline W&B run is in %s" % run.location)
    print("demo: upload it to W&B (needs `wandb login` or WANDB_API_KEY) with:")
    print("    wandb sync %s" % run.location)
    return code


def client_main(endpoint: str, checkpoints: str, steps: int) -> int:
    """The 'trainer': what a TokenHSI run does through relay.client."""
    from relay.client import RelayClient

    client = RelayClient(endpoint)
    run = client.start_run(project=PROJECT, name="demo-traj-amp", group="demo", tags=["amp", "demo"],
                           notes="relay demo run", config={"lr": 2e-5, "horizon_length": 32, "num_envs": 4096})
    frames_per_epoch = 4096 * 32
    worst = 0.0
    for epoch in range(1, steps + 1):
        metrics = {"rewards/mean": 1.0 - math.exp(-epoch / 50.0), "losses/a_loss": 0.5 * math.exp(-epoch / 80.0),
                   "losses/c_loss": 1.0 / epoch, "info/kl": 0.01, "performance/total_fps": 50000.0 + epoch}
        started = time.perf_counter()
        run.log(metrics, frame=epoch * frames_per_epoch, epoch=epoch)
        worst = max(worst, time.perf_counter() - started)
        if epoch % 100 == 0 or epoch == steps:
            path = os.path.join(checkpoints, "demo_%05d.pth" % epoch)
            durable.write_bytes(path, os.urandom(64 * 1024), mode=0o644)
            run.log_checkpoint(path, metadata={"epoch": epoch, "frame": epoch * frames_per_epoch}, aliases=["latest"])
    run.summary({"best/reward": 1.0 - math.exp(-steps / 50.0)})
    report = run.finish(exit_code=0, timeout=30.0)
    client.close()
    print("demo client: logged %d steps, slowest run.log %.0f us, finish report %s"
          % (steps, worst * 1e6, report), flush=True)
    return 0 if report["delivered"] else 1


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
