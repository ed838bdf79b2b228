#!/usr/bin/env bash
# GPU check: tokenhsi/run.py on CUDA with 4096 envs, fps with reporting through the relay
# vs reporting disabled, alternating A B A B. Runs on the lent GPU machine (no internet there): the
# wheels it needs are carried in .gpuwheels (made with `pip download`, see the README).
# Usage: bash scripts/gpu_check.sh [device] [num_envs] [epochs]
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda:0}"; envs="${2:-4096}"; epochs="${3:-25}"
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
extra=""
if [ -d .gpuwheels ]; then  # beside the machine's own python3 (which holds a CUDA PyTorch)
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpusite .gpuwheels/*.whl
  py=python3; extra=":/tmp/gpusite"
else
  py=.venv/bin/python
fi
export PYTHONPATH="$PWD$extra" WANDB_SILENT=true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
endpoint="ipc:///tmp/gpu_check_relay.ipc"
$py -m relay serve --bind "$endpoint" --spool-dir "$out/spool" --mode offline --artifact-root "$out" \
    --log-level WARNING 2> "$out/relay.log" &
relay=$!
$py -c "import sys; from relay.cli import query_status; sys.exit(0 if any(query_status('$endpoint', 1.0) for _ in range(60)) else 1)"
train() {  # $1: label; the rest: environment
  label=$1; shift
  env "$@" RELAY_ENDPOINT="$endpoint" $py tokenhsi/run.py --task PointMultiTask --cfg_env cfg/env/point_multitask.yaml \
      --cfg_train cfg/train/amp_point_multitask.yaml --num_envs "$envs" --device "$device" --max_epochs "$epochs" \
      --output_path "$out/$label" > "$out/$label.log" 2>&1
  # mean "fps total" over the epochs after the first 5 (warm-up)
  $py - "$out/$label.log" "$label" <<'PY'
import re, sys
fps = [float(m) for m in re.findall(r"fps total: ([0-9.]+)", open(sys.argv[1]).read())][5:]
print("%-16s fps total mean %.0f over %d epochs" % (sys.argv[2], sum(fps) / len(fps), len(fps)))
PY
}
for round in 1 2; do
  train "disabled-$round" WANDB_MODE=disabled
  train "relay-$round"
done
$py -m relay status --endpoint "$endpoint" --json > "$out/status.json" || true
kill -TERM $relay; wait $relay || true
