#!/usr/bin/env bash
# Fresh machine -> the whole default test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server,dev,train
# The suite's other interpreters: Python 3.8 and 3.11 base installs, rl-games 1.1.4 (tests/venvs.py).
scripts/venvs.sh
# Trainer-side modules (relay/sides.py) must run on Python 3.8 (IsaacGym environments): vermin reads
# them here; tests/test_py38.py imports and runs them on a real 3.8.
trainer_side=$(.venv/bin/python -c 'from relay import sides
print(" ".join(map(sides.source_file, sides.TRAINER_SIDE)))')
.venv/bin/vermin -q --no-tips --violations --target=3.8- $trainer_side
echo "vermin: $trainer_side run on Python 3.8"
exec .venv/bin/python -m pytest "$@"
