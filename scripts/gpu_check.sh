#!/usr/bin/env bash
# The GPU check (issue 18): cit on a CUDA device in about five minutes, with only what the working tree carries
# (scripts/gpu_check.py says what it needs and prints). Pass --dtype float32 to check that precision instead.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L || { echo "no NVIDIA GPU visible: nothing to check"; exit 1; }
timeout 900 python scripts/gpu_check.py --device cuda "$@"
