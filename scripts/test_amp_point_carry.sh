#!/usr/bin/env bash
# Evaluate a trained PointCarry policy: bash scripts/test_amp_point_carry.sh --checkpoint output/amp_point_carry/nn/X.pth
# Reports eval/amp_point_carry/{success_rate,success_trials,fail_trials,num_trials} through the relay.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tokenhsi/run.py --task PointCarry --cfg_env cfg/env/point_carry.yaml \
    --cfg_train cfg/train/amp_point_carry.yaml --headless --test --output_path output "$@"
