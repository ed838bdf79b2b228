#!/usr/bin/env bash
# Evaluate a trained PointTraj policy: bash scripts/test_amp_point_traj.sh --checkpoint output/amp_point_traj/nn/X.pth
# Reports eval/amp_point_traj/{success_rate,success_trials,fail_trials,num_trials} through the relay.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tokenhsi/run.py --task PointTraj --cfg_env cfg/env/point_traj.yaml \
    --cfg_train cfg/train/amp_point_traj.yaml --headless --test --output_path output "$@"
