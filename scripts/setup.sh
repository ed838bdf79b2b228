#!/usr/bin/env bash
# Create .venv (if missing) and install the relay with the given extras. Idempotent.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh server,dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "the relay needs Python >= 3.10 (trainer-side modules alone run on 3.8)" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
