#!/usr/bin/env bash
# Evaluate a trained PointMultiTask policy: bash scripts/test_amp_point_multitask.sh --checkpoint output/amp_point_multitask/nn/X.pth
# Reports eval/amp_point_multitask/{success_rate,success_trials,fail_trials,num_trials} through the relay.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tokenhsi/run.py --task PointMultiTask --cfg_env cfg/env/point_multitask.yaml \
    --cfg_train cfg/train/amp_point_multitask.yaml --headless --test --output_path output "$@"
