"""The LM's weights as safetensors in the local cache: converted once from the packaged GGUF file (or written from
a checkpoint's language model by hf.py), so later loads take seconds instead of a dequantisation."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .paths import LM_GGUF_FILE, cache_dir, lm_gguf_dir

LM_CACHE_NAME = "smollm2-135m-instruct"


def converted_lm_dir(progress: bool = True) -> Path:
    """The LM as safetensors in the local cache, converted from the packaged GGUF on first use (~30 s)."""
    target = cache_dir() / LM_CACHE_NAME
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {LM_GGUF_FILE} to safetensors in {target} (once, ~30 s)", flush=True)
    src = lm_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=LM_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=LM_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantised to fp32 already; drop the GGUF quantizer so transformers lets us save them.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as a module attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_to_cache(model, tokenizer, target)


def save_to_cache(model, tokenizer, target: Path) -> Path:
    """Write a model and its tokenizer to `target` atomically: a concurrent writer either wins or finds the
    finished copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
