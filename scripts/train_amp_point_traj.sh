#!/usr/bin/env bash
# Train AMP on the built-in PointTraj task (CPU by default; pass --device cuda:0 for a GPU).
# Reporting goes through the relay at $RELAY_ENDPOINT (default tcp://127.0.0.1:5555); start one with
# `relay serve`, or set WANDB_MODE=disabled to train without reporting.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tokenhsi/run.py --task PointTraj --cfg_env cfg/env/point_traj.yaml \
    --cfg_train cfg/train/amp_point_traj.yaml --headless --output_path output "$@"
