#!/usr/bin/env bash
# Fresh machine -> the whole default test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server,dev,train
# Trainer-side modules must run on Python 3.8 (IsaacGym environments).
trainer_side=""
for module in relay/client.py relay/protocol.py relay/rl_games.py relay/tensors.py relay/keys.py; do
  [ -f "$module" ] && trainer_side="$trainer_side $module"
done
.venv/bin/vermin -q --no-tips --violations --target=3.8- $trainer_side
echo "vermin: $trainer_side run on Python 3.8"
exec .venv/bin/python -m pytest "$@"
