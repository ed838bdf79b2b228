#!/usr/bin/env bash
# Download (here, with internet) the wheels scripts/gpu_check.sh installs on a GPU machine that has
# none: Python 3.12 x86_64 wheels of what the relay and rl_games need beyond that machine's image
# (which has PyTorch, msgpack, PyYAML, click, requests, protobuf, tensorboard).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpuwheels && mkdir .gpuwheels
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .gpuwheels \
  pyzmq pydantic pydantic-core annotated-types typing-inspection tenacity wandb==0.31.0 cwevals \
  opentelemetry-api opentelemetry-exporter-otlp-proto-http opentelemetry-sdk opentelemetry-proto \
  opentelemetry-exporter-otlp-proto-common opentelemetry-semantic-conventions googleapis-common-protos \
  importlib-metadata zipp platformdirs xxhash tensorboardX gymnasium cloudpickle farama-notifications \
  rl-games==1.6.5 setproctitle watchdog
du -sh .gpuwheels
