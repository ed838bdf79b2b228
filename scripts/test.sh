#!/usr/bin/env bash
# Fresh machine -> the whole default test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server,dev,train
# libfaketime: tests that set a real process's wall clock back or forward (Debian package faketime).
if ! compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q faketime >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q faketime >/dev/null; }
  else
    echo "test.sh: libfaketime is missing and cannot be installed here (apt-get install faketime); the wall-clock tests will skip" >&2
  fi
fi
# The suite's other interpreters: Python 3.8 and 3.11 base installs, rl-games 1.1.4 (tests/venvs.py).
scripts/venvs.sh
# Trainer-side modules (relay/sides.py) must run on Python 3.8 (IsaacGym environments): vermin reads
# them here; tests/test_py38.py imports and runs them on a real 3.8.
trainer_side=$(.venv/bin/python -c 'from relay import sides
print(" ".join(map(sides.source_file, sides.TRAINER_SIDE)))')
.venv/bin/vermin -q --no-tips --violations --target=3.8- $trainer_side
echo "vermin: $trainer_side run on Python 3.8"
exec .venv/bin/python -m pytest "$@"
