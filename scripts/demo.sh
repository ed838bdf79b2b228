#!/usr/bin/env bash
# Fresh machine -> a relay in offline mode, a demo training run through it, the W&B run on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server
exec .venv/bin/relay demo "$@"
