"""Does AMP on the built-in tasks visibly learn on a CPU within minutes? Train, then plot.

Runs tokenhsi/run.py (reporting disabled) on PointMultiTask for `--epochs` epochs, reads the
TensorBoard scalars rl_games wrote, and plots the per-task rewards and the discriminator's
accuracy on agent transitions against epoch. Prints the first and last values as JSON.

    python bench/learning_curve.py --epochs 100      # about a minute on 2 CPU cores
    python bench/learning_curve.py --quick           # 20 epochs
    python bench/learning_curve.py --quick --dry-run # 2 epochs, no plot: checks it still runs
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--png", default=os.path.join(HERE, "learning_curve.png"))
    parser.add_argument("--quick", action="store_true", help="20 epochs")
    parser.add_argument("--dry-run", action="store_true", help="2 epochs, no plot")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 20
    if args.dry_run:
        args.epochs, args.png = 2, None
    output = tempfile.mkdtemp(prefix="relay-learning-")
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=ROOT)
    started = time.monotonic()
    subprocess.run([sys.executable, os.path.join(ROOT, "tokenhsi", "run.py"), "--task", "PointMultiTask",
                    "--cfg_env", os.path.join(ROOT, "cfg", "env", "point_multitask.yaml"),
                    "--cfg_train", os.path.join(ROOT, "cfg", "train", "amp_point_multitask.yaml"),
                    "--max_epochs", str(args.epochs), "--output_path", output, "--seed", "0"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(os.path.join(output, "*", "summaries", "*"))[0])
    events.Reload()
    curves = {tag: [(s.step, s.value) for s in events.Scalars(tag)]
              for tag in ("rewards/traj", "rewards/carry", "info/disc_agent_acc")}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for tag, points in curves.items():
        axis.plot([step for step, _ in points], [value for _, value in points], label=tag)
    axis.set_xlabel("frame")
    axis.set_ylabel("mean per step")
    axis.set_title("AMP on PointMultiTask, CPU, %d epochs in %.0f s" % (args.epochs, seconds))
    axis.legend()
    figure.tight_layout()
    if args.png:
        figure.savefig(args.png, dpi=110)
        print("plot written to %s" % args.png)
    print(json.dumps({"epochs": args.epochs, "seconds": round(seconds),
                      **{tag: [round(points[0][1], 3), round(points[-1][1], 3)] for tag, points in curves.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
