"""Backbones from Hugging Face multimodal checkpoints in a local directory.

LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower -> multi_modal_projector -> LM), BLIP-2
(`Blip2ForConditionalGeneration`: ViT -> Q-Former -> language_projection -> LM) and Idefics3 / SmolVLM
(`Idefics3ForConditionalGeneration`: SigLIP tower -> pixel shuffle -> connector.modality_projection -> LM; one
global image, no splitting into tiles). The checkpoint's projection becomes the base connector and the shape of
every task's projection (EProj: `token_mlp` or `token_linear`); the vision side (with Idefics3's pixel shuffle, which
has no weights) and the LM stay frozen. The LM is written once into the local cache as a plain causal LM, so that
LanguageModel (decode loop, LoRAs, prefix cache) runs it like the default one.

Prompts are what the checkpoint's own chat template writes, the image first in the user turn (prompt.py).
Limits, checked with clear errors: the tokenizer must have a chat template that keeps the user's text as given;
InstructBLIP's Q-Former reads the instruction too, which cit's instruction-independent image features cannot give
it, so InstructBLIP checkpoints are refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .adapters import Connector, ConnectorConfig
from .conversion import save_to_cache
from .numerics import CPU
from .paths import cache_dir
from .prompt import PromptFormat

# CLIP's and BLIP-2's image normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD); Idefics3's (0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISATION = {"llava": (CLIP_MEAN, CLIP_STD), "blip2": (CLIP_MEAN, CLIP_STD),
                 "idefics3": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# Idefics3 / SmolVLM wrap a global image's tokens in these (their processor writes them), tokens before and after;
# used when the tokenizer has them
AROUND_IMAGE = {"idefics3": (("<fake_token_around_image>", "<global-img>"), ("<fake_token_around_image>",))}


def pixel_values(images: list[Image.Image], size: int, kind: str = "llava") -> torch.Tensor:
    """Images -> [B, 3, size, size]: RGB, bicubic resize to a square, the family's normalisation."""
    mean, std = NORMALISATION[kind]
    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
              for img in images]
    x = (np.stack(arrays) - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


class HfVision:
    """The frozen vision side of a checkpoint: images -> vision tokens flattened [B, tokens * dim]. Routing uses
    their mean over tokens (`pooled`), generation the tokens themselves."""

    def __init__(self, model, kind: str, device: torch.device = CPU) -> None:
        config = model.config
        self.device = device  # float32, features returned on the CPU, as VisionTower's
        self.kind, self.size = kind, config.vision_config.image_size
        self.tokens, self.dim = vision_tokens(config, kind)
        if kind == "llava":
            self.tower = model.model.vision_tower
            self.layer, self.strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        elif kind == "idefics3":
            self.tower, self.patch = model.model.vision_model, config.vision_config.patch_size
            connector = model.model.connector
            self.shuffle = lambda hidden: connector.pixel_shuffle(hidden, connector.scale_factor)
        else:
            self.tower, self.qformer, self.query = model.vision_model, model.qformer, model.query_tokens
        for module in [self.tower] + ([self.qformer] if kind == "blip2" else []):
            module.eval().requires_grad_(False).to(device)
        if kind == "blip2":
            self.query = self.query.to(device)

    @property
    def feature_dim(self) -> int:
        return self.tokens * self.dim

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        out = [self.encode_pixels(pixel_values(images[i : i + batch_size], self.size, self.kind).to(self.device)).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "llava":
            hidden = self.tower(pixels, output_hidden_states=True).hidden_states[self.layer]
            tokens = hidden[:, 1:] if self.strategy == "default" else hidden  # "default" drops CLS
        elif self.kind == "idefics3":
            side = self.size // self.patch  # every patch is image: no padding to mask
            mask = torch.ones(pixels.shape[0], side, side, dtype=torch.bool, device=pixels.device)
            tokens = self.shuffle(self.tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state)
        else:
            image = self.tower(pixel_values=pixels).last_hidden_state
            mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
            tokens = self.qformer(query_embeds=self.query.expand(image.shape[0], -1, -1), encoder_hidden_states=image,
                                  encoder_attention_mask=mask).last_hidden_state
        return tokens.flatten(1)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return features.view(features.shape[0], self.tokens, self.dim).mean(dim=1)


def _kind(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type == "llava":
        return "llava"
    if model_type == "blip-2":
        return "blip2"
    if model_type in ("idefics3", "smolvlm"):
        return "idefics3"
    if model_type == "instructblip":
        raise ValueError("InstructBLIP's Q-Former reads the instruction; cit's image features do not depend on it "
                         "(use a BLIP-2 or LLaVA checkpoint)")
    raise ValueError(f"{directory}: model_type {model_type!r} is not a LLaVA, BLIP-2 or Idefics3 / SmolVLM checkpoint")


def load_checkpoint(directory: Path):
    """(kind, model, base connector, cached LM directory, prompt format) of a local LLaVA, BLIP-2 or Idefics3 /
    SmolVLM checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    directory = Path(directory)
    kind = _kind(directory)
    classes: dict[str, Any] = {"llava": LlavaForConditionalGeneration, "blip2": Blip2ForConditionalGeneration}
    cls = classes.get(kind, AutoModelForImageTextToText)  # Idefics3 or SmolVLM, by the config's model_type
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    before, after = AROUND_IMAGE.get(kind, ((), ()))
    if not set(before + after) <= tokenizer.get_vocab().keys():
        before, after = (), ()  # a tokenizer without the family's image markup (a test checkpoint's)
    try:
        prompt = PromptFormat.from_chat_template(tokenizer, ("".join(before), "".join(after)))
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from None
    return kind, model, base_connector(model, kind), _cached_lm(directory, model, tokenizer), prompt


def checkpoint_identity(directory: Path, kind: str) -> str:
    """A checkpoint's identity for registries: its family, a digest of its config and weights' names/sizes, and the
    prompt ("chat-template": the checkpoint's own, image first; registries of checkpoint backbones written before
    it were trained on cit's ChatML prompt and are refused by name, not served with another prompt)."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"hf:{kind}:{digest.hexdigest()[:16]}:chat-template"


def vision_tokens(config, kind: str) -> tuple[int, int]:
    """(tokens, width) of the vision features a checkpoint's projection reads."""
    if kind == "blip2":
        return config.num_query_tokens, config.qformer_config.hidden_size
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if kind == "idefics3":  # the pixel shuffle folds scale x scale patches into one token
        return patches // config.scale_factor ** 2, config.vision_config.hidden_size * config.scale_factor ** 2
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or strategy not in ("default", "full"):
        raise ValueError("only one vision feature layer and the 'default' or 'full' selection are supported")
    return patches + (strategy == "full"), config.vision_config.hidden_size  # "default" drops the CLS token


def base_connector(model, kind: str) -> Connector:
    """The checkpoint's own projection as a connector: every task's projection has its shape."""
    config, hidden = model.config, model.config.text_config.hidden_size
    tokens, width = vision_tokens(config, kind)
    if kind == "llava":
        if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
            raise ValueError("only LLaVA projectors with GELU and biases are supported")
        connector = Connector(ConnectorConfig(width, hidden, tokens, projector="token_mlp"))
        state = model.model.multi_modal_projector.state_dict()  # linear_1.*, linear_2.*: the connector's names
    elif kind == "idefics3":
        connector = Connector(ConnectorConfig(width, hidden, tokens, projector="token_linear", bias=False))
        state = model.model.connector.modality_projection.state_dict()  # proj.weight: the connector's name
    else:
        connector = Connector(ConnectorConfig(width, hidden, tokens, projector="token_linear"))
        state = {f"proj.{k}": v for k, v in model.language_projection.state_dict().items()}
    connector.load_state_dict(state, strict=True)
    return connector.eval()


def _cached_lm(directory: Path, model, tokenizer) -> Path:
    """The checkpoint's LM as a plain causal LM in the local cache, written once per checkpoint content."""
    from transformers import AutoModelForCausalLM

    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights (pickled checkpoints are not loaded)")
    digest = hashlib.sha256()
    for f in weights + [directory / "config.json"]:
        digest.update(f.name.encode())
        digest.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))  # the header and first weights name the content well enough
    target = cache_dir() / f"hf-lm-{digest.hexdigest()[:16]}"
    if (target / "config.json").exists():
        return target
    if hasattr(model, "model"):  # LLaVA, Idefics3: the decoder and the head sit apart
        lm = AutoModelForCausalLM.from_config(model.config.text_config, dtype=torch.float32)
        decoder = model.model.text_model if hasattr(model.model, "text_model") else model.model.language_model
        state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
        lm.load_state_dict({**state, "lm_head.weight": model.lm_head.weight}, strict=True)
    else:  # BLIP-2: a whole causal LM already
        lm = model.language_model
    return save_to_cache(lm, tokenizer, target)
