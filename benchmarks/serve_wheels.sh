#!/usr/bin/env bash
# Wheels that benchmarks/serve.py needs on the GPU machine, which has Python 3.12 and torch but
# neither the server's web stack nor a load generator, and no network: fastapi, uvicorn,
# pydantic, click (the berth CLI), kubernetes (the node agent parses memory quantities and
# publishes its GPUs with it) and locust with their dependencies, about 20 MB, into
# benchmarks/wheels/ (keep it out of git; hand it to the device run as a carried path).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-pip}"
"$PIP" download -q --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d wheels fastapi uvicorn pydantic click pyyaml locust kubernetes
du -sh wheels
