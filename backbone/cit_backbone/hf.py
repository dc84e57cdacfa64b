"""Backbones from Hugging Face multimodal checkpoints in a local directory.

LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower -> multi_modal_projector -> LM), LLaVA-NeXT and
LLaVA-OneVision (the same, on tiles), Qwen2-VL / Qwen2.5-VL and PaliGemma (each below), BLIP-2
(`Blip2ForConditionalGeneration`: ViT -> Q-Former -> language_projection -> LM) and Idefics3 / SmolVLM
(`Idefics3ForConditionalGeneration`: SigLIP tower -> pixel shuffle -> connector.modality_projection -> LM; one global
image, no splitting into tiles). The checkpoint's projection becomes the base connector and the shape of every
task's projection (EProj: `token_mlp`, `token_linear` or `merger`); the vision side (with Idefics3's pixel shuffle,
which has no weights) and the LM stay frozen. The LM is written once into
the local cache as a plain causal LM, so that LanguageModel (decode loop, LoRAs, prefix cache) runs it like the
default one.

LLaVA-NeXT / OneVision ("anyres") give an image as many visual tokens as its size asks. cit gives every image the
same number, so that rows of any image batch and a task's projection has one shape: the image is resized to the
smallest square of the checkpoint's `image_grid_pinpoints` larger than the tower's input (LLaVA-NeXT's 672 x 672,
OneVision's 768 x 768: 2 x 2 tiles) and to the tower's input for the base view, which is what the family's own
processor and `pack_image_features` do with a square image of that size (no padding to unpad; at most 9 tiles, so
OneVision does not interpolate). The projection is the checkpoint's multi_modal_projector with its image_newline
(trained with it per task, as the family trains them together).

Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`: a vision
transformer on flat patches -> visual.merger -> a Qwen2 LM with multimodal RoPE) take images of any size; cit
resizes every image to QWEN2_VL_SIDE x QWEN2_VL_SIDE merged tokens (448 x 448 pixels at the released 14-pixel
patches), patches it as the family's processor does, and keeps the tower's states before the merger as vision
tokens, in the image's order (Qwen2.5-VL's tower runs them in window order and puts the merger's output back); the
merger (a LayerNorm per patch, Qwen2.5-VL's an RMSNorm, then Linear-GELU-Linear on 2 x 2 patches) is the
projection. Its LM is written as Qwen2 with the RoPE sections kept: LanguageModel gives the visual tokens their
(0, row, column) positions and the text after them positions from the grid's side on, as Qwen2-VL's
get_rope_index does. The vLLM engine cannot take such positions and refuses the backbone.

PaliGemma (`PaliGemmaForConditionalGeneration`: SigLIP -> multi_modal_projector, one Linear -> Gemma) has no chat
template: its prompt is what its processor writes, the image, then BOS, the instruction and a line break, and the
answer ends with EOS. The image and that text attend to each other both ways (a prefix LM; the answer causally:
VisualLayout); with nothing before the image, there is no prefix to cache.

Image normalisation is the checkpoint's `preprocessor_config.json` where it has one, else the family's default.
Other prompts are what the checkpoint's own chat template writes, the image first in the user turn (prompt.py).
Limits, checked with clear errors: the tokenizer must have a chat template that keeps the user's text as given;
InstructBLIP's Q-Former reads the instruction too, which cit's instruction-independent image features cannot give
it, so InstructBLIP checkpoints are refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .adapters import Connector, ConnectorConfig
from .conversion import save_to_cache
from .language_model import VisualLayout
from .numerics import CPU
from .paths import cache_dir
from .prompt import INSTRUCTION, PromptFormat

# CLIP's image normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD); SigLIP's (Idefics3, PaliGemma) 0.5, 0.5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISATION = {"llava": (CLIP_MEAN, CLIP_STD), "llava_next": (CLIP_MEAN, CLIP_STD),
                 "llava_onevision": (CLIP_MEAN, CLIP_STD), "blip2": (CLIP_MEAN, CLIP_STD),
                 "idefics3": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "qwen2_vl": (CLIP_MEAN, CLIP_STD),
                 "paligemma": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
ANYRES = ("llava_next", "llava_onevision")  # base view + tiles, multi_modal_projector, image_newline
# Qwen2-VL's merged tokens per side of the square cit resizes every image to (16 x 16 = 256 visual tokens: 448 x 448
# pixels for the released checkpoints' 14-pixel patches merged 2 x 2)
QWEN2_VL_SIDE = 16
# Idefics3 / SmolVLM wrap a global image's tokens in these (their processor writes them), tokens before and after;
# used when the tokenizer has them
AROUND_IMAGE = {"idefics3": (("<fake_token_around_image>", "<global-img>"), ("<fake_token_around_image>",)),
                "qwen2_vl": (("<|vision_start|>",), ("<|vision_end|>",))}


Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


def pixel_values(images: list[Image.Image], size: int, normalisation: Normalisation) -> torch.Tensor:
    """Images -> [B, 3, size, size]: RGB, bicubic resize to a square, normalised by (mean, std)."""
    mean, std = normalisation
    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
              for img in images]
    x = (np.stack(arrays) - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


class HfVision:
    """The frozen vision side of a checkpoint: images -> vision tokens flattened [B, tokens * dim]. Routing uses
    their mean over tokens (`pooled`), generation the tokens themselves."""

    def __init__(self, model, kind: str, device: torch.device = CPU, normalisation: Normalisation | None = None) -> None:
        """`model`: the checkpoint's model, whose vision side this takes over (`vision_tower`)."""
        config = model.config
        self.device = device  # float32, features returned on the CPU, as VisionTower's
        self.kind, self.size = kind, square_size(config, kind)
        self.normalisation = normalisation or NORMALISATION[kind]
        self.tokens, self.dim = vision_tokens(config, kind)
        self.side = anyres_side(config, kind) if kind in ANYRES else 0  # tiles per side of the tiled view
        self.tower = vision_tower(model, kind, self.size).eval().requires_grad_(False).to(device)

    @property
    def feature_dim(self) -> int:
        return self.tokens * self.dim

    def views(self, images: list[Image.Image]) -> torch.Tensor:
        """The pixels the tower sees of each image, [B, views, 3, size, size]: one view; anyres: the base view, then
        the tiles of the image at side x size, row by row (as the family's processor cuts them)."""
        base = pixel_values(images, self.size, self.normalisation)[:, None]
        if not self.side:
            return base
        rows, n, s = len(images), self.side, self.size
        tiled = pixel_values(images, n * s, self.normalisation).view(rows, 3, n, s, n, s)
        return torch.cat((base, tiled.permute(0, 2, 4, 1, 3, 5).reshape(rows, n * n, 3, s, s)), dim=1)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        out = [self.encode_pixels(self.views(images[i : i + batch_size]).to(self.device)).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    @torch.inference_mode()
    def encode_pixels(self, views: torch.Tensor) -> torch.Tensor:
        """[B, views, 3, size, size] (`views`) -> [B, tokens * dim]."""
        rows, tokens = views.shape[0], self.tower(views.flatten(0, 1))
        if self.side:
            tokens = self._base_then_grid(tokens.view(rows, 1 + self.side ** 2, -1, self.dim))
        return tokens.reshape(rows, -1)

    def _base_then_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1 + side^2 views, patches, dim] -> [B, tokens, dim]: the base view's patches, then the tiles' patches
        as one grid, row by row (pack_image_features' order; the projection is per token, so ordering the vision
        tokens before it equals ordering the projected ones after it)."""
        rows, n, dim = tokens.shape[0], self.side, self.dim
        h = round(tokens.shape[2] ** 0.5)  # patches a side of one view
        grid = tokens[:, 1:].reshape(rows, n, n, h, h, dim).permute(0, 1, 3, 2, 4, 5).reshape(rows, -1, dim)
        return torch.cat((tokens[:, 0], grid), dim=1)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return features.view(features.shape[0], self.tokens, self.dim).mean(dim=1)


def vision_tower(model, kind: str, size: int) -> torch.nn.Module:
    """A family's vision side up to its projection: views [N, 3, size, size] (`size`: square_size's) -> vision
    tokens [N, tokens, dim] (Qwen2-VL: [N * tokens, dim])."""
    config = model.config
    if kind == "qwen2_vl":
        return MergerTower(model.model.visual, model.model.visual.merger, config.vision_config, size)
    if kind == "idefics3":
        return ShuffledTower(model.model.vision_model, model.model.connector, config.vision_config.patch_size)
    if kind == "blip2":
        return QFormerTower(model.vision_model, model.qformer, model.query_tokens)
    if kind == "paligemma":
        return HiddenStateTower(model.model.vision_tower)
    return HiddenStateTower(model.model.vision_tower, config.vision_feature_layer,
                            config.vision_feature_select_strategy)


class HiddenStateTower(torch.nn.Module):
    """LLaVA, NeXT, OneVision: the tower's hidden states at `layer` ("default" selection: the first, CLS, dropped);
    PaliGemma: its last hidden state."""

    def __init__(self, tower: torch.nn.Module, layer: int | None = None, strategy: str = "full") -> None:
        super().__init__()
        self.tower, self.layer, self.strategy = tower, layer, strategy

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.tower(pixels).last_hidden_state
        hidden = self.tower(pixels, output_hidden_states=True).hidden_states[self.layer]
        return hidden[:, 1:] if self.strategy == "default" else hidden


class ShuffledTower(torch.nn.Module):
    """Idefics3 / SmolVLM: the SigLIP tower's last hidden state after the connector's pixel shuffle (no weights)."""

    def __init__(self, tower: torch.nn.Module, connector, patch: int) -> None:
        super().__init__()
        self.tower, self.scale, self.patch = tower, connector.scale_factor, patch
        self.shuffle = connector.pixel_shuffle  # a method of the connector, not a module of this tower

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        side = pixels.shape[-1] // self.patch  # every patch is image: no padding to mask
        mask = torch.ones(pixels.shape[0], side, side, dtype=torch.bool, device=pixels.device)
        return self.shuffle(self.tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state, self.scale)


class QFormerTower(torch.nn.Module):
    """BLIP-2: the Q-Former's query outputs over the ViT's last hidden state."""

    def __init__(self, tower: torch.nn.Module, qformer: torch.nn.Module, query: torch.Tensor) -> None:
        super().__init__()
        self.tower, self.qformer, self.query = tower, qformer, query

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.tower(pixel_values=pixels).last_hidden_state
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.qformer(query_embeds=self.query.expand(image.shape[0], -1, -1), encoder_hidden_states=image,
                            encoder_attention_mask=mask).last_hidden_state


class MergerTower(torch.nn.Module):
    """Qwen2-VL / Qwen2.5-VL: the tower on flat patches, its states before visual.merger as vision tokens, each
    token the merge x merge patches the merger would fold. They come from the tower's own output path, the merger
    folding its input instead of projecting it (a hook): grouped and ordered as the merger's output is (Qwen2.5-VL
    runs patches in window order and puts the merger's output back)."""

    def __init__(self, tower: torch.nn.Module, merger: torch.nn.Module, vision, size: int) -> None:
        super().__init__()
        self.tower, self.patch, self.merge, self.temporal = (tower, vision.patch_size, vision.spatial_merge_size,
                                                             vision.temporal_patch_size)
        self.per_side = size // self.patch  # patches a side of the square
        merger.register_forward_hook(lambda module, args, out: args[0].reshape(out.shape[0], -1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = torch.tensor([[1, self.per_side, self.per_side]] * pixels.shape[0], device=pixels.device)
        return self.tower(self.patches(pixels), grid_thw=grid).pooler_output

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, size, size] -> the family's flat patches [B * patches, 3 * temporal * patch^2]: merge x merge
        blocks of patches in a row, each patch repeated over the temporal patch (an image is a one-frame video), as
        its image processor lays them out."""
        rows, m, p, g = pixels.shape[0], self.merge, self.patch, self.per_side // self.merge
        blocks = pixels.reshape(rows, 3, g, m, p, g, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        return blocks.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1).reshape(rows * self.per_side ** 2, -1)


def square_size(config, kind: str) -> int:
    """The side in pixels of the square every image is resized to: the tower's input; Qwen2-VL's tower takes any
    size, cit gives it QWEN2_VL_SIDE merged tokens a side."""
    vision = config.vision_config
    if kind == "qwen2_vl":
        return QWEN2_VL_SIDE * vision.spatial_merge_size * vision.patch_size
    return vision.image_size


def anyres_side(config, kind: str) -> int:
    """Tiles per side of the view LLaVA-NeXT / OneVision checkpoints get from cit: the smallest square of
    image_grid_pinpoints larger than the tower's input (module docstring)."""
    from transformers.image_processing_utils import select_best_resolution

    size, pinpoints = config.vision_config.image_size, [tuple(p) for p in config.image_grid_pinpoints]
    squares = sorted(h for h, w in pinpoints if h == w and h > size and h % size == 0)
    if not squares:
        raise ValueError(f"image_grid_pinpoints {pinpoints} has no square resolution that is a multiple of the "
                         f"tower's {size}: cit gives every image one tiled view of a fixed size")
    side = squares[0] // size
    assert tuple(select_best_resolution((squares[0], squares[0]), pinpoints)) == (squares[0], squares[0])
    if kind == "llava_onevision":  # more tiles than anyres_max_N allows are interpolated down: not cit's layout
        limit = int(str(config.vision_aspect_ratio).removeprefix("anyres_max_"))
        if side / limit ** 0.5 > 1.1:
            raise ValueError(f"{side} x {side} tiles exceed the checkpoint's {config.vision_aspect_ratio}")
    return side


def _kind(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type in ("llava", "qwen2_vl", "paligemma") + ANYRES:
        return model_type
    if model_type == "qwen2_5_vl":  # Qwen2-VL's path; the config says where the two differ
        return "qwen2_vl"
    if model_type == "blip-2":
        return "blip2"
    if model_type in ("idefics3", "smolvlm"):
        return "idefics3"
    if model_type == "instructblip":
        raise ValueError("InstructBLIP's Q-Former reads the instruction; cit's image features do not depend on it "
                         "(use a BLIP-2 or LLaVA checkpoint)")
    raise ValueError(f"{directory}: model_type {model_type!r} is not a LLaVA, LLaVA-NeXT, LLaVA-OneVision, BLIP-2, "
                     "Idefics3 / SmolVLM, Qwen2-VL, Qwen2.5-VL or PaliGemma checkpoint")


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint loaded for Backbone.load: its family, the model, its projection as the base connector,
    its LM in the local cache, its prompt and its image normalisation."""

    directory: Path
    kind: str
    model: Any
    base: Connector
    lm_dir: Path
    prompt: PromptFormat
    normalisation: Normalisation
    layout: VisualLayout


def load_checkpoint(directory: Path) -> Checkpoint:
    """A local LLaVA, LLaVA-NeXT, LLaVA-OneVision, BLIP-2, Idefics3 / SmolVLM, Qwen2-VL, Qwen2.5-VL or PaliGemma
    checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    directory = Path(directory)
    kind = _kind(directory)
    classes: dict[str, Any] = {"llava": LlavaForConditionalGeneration, "blip2": Blip2ForConditionalGeneration}
    cls = classes.get(kind, AutoModelForImageTextToText)  # the others by the config's model_type
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    layout = VisualLayout()
    if kind == "paligemma":  # its processor's prompt (module docstring)
        prompt = PromptFormat("", f"{tokenizer.bos_token}{INSTRUCTION}\n", tokenizer.eos_token)
        layout = VisualLayout(prefix_lm=True)
    else:
        before, after = AROUND_IMAGE.get(kind, ((), ()))
        if not set(before + after) <= tokenizer.get_vocab().keys():
            before, after = (), ()  # a tokenizer without the family's image markup (a test checkpoint's)
        try:
            prompt = PromptFormat.from_chat_template(tokenizer, ("".join(before), "".join(after)),
                                                     separator="" if kind == "qwen2_vl" else "\n")
        except ValueError as exc:
            raise ValueError(f"{directory}: {exc}") from None
        if kind == "qwen2_vl":
            layout = VisualLayout(visual_grid=(QWEN2_VL_SIDE, QWEN2_VL_SIDE))
    return Checkpoint(directory, kind, model, base_connector(model, kind), _cached_lm(directory, model, tokenizer),
                      prompt, _normalisation(directory, kind), layout)


def _normalisation(directory: Path, kind: str) -> Normalisation:
    """The checkpoint's image processor's mean and std (preprocessor_config.json), else the family's default."""
    path = directory / "preprocessor_config.json"
    processor = json.loads(path.read_text()) if path.exists() else {}
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean is None or std is None:
        return NORMALISATION[kind]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{path}: image_mean and image_std need one value per RGB channel")
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


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
    if kind == "paligemma":  # SigLIP: one token per patch, no CLS
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2, config.vision_config.hidden_size
    if kind == "qwen2_vl":  # merge x merge patches folded into one token; a patch's width is Qwen2.5-VL's hidden_size
        vision = config.vision_config
        width = vision.embed_dim if config.model_type == "qwen2_vl" else vision.hidden_size
        return QWEN2_VL_SIDE ** 2, width * vision.spatial_merge_size ** 2
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if kind == "idefics3":  # the pixel shuffle folds scale x scale patches into one token
        return patches // config.scale_factor ** 2, config.vision_config.hidden_size * config.scale_factor ** 2
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or strategy not in ("default", "full"):
        raise ValueError("only one vision feature layer and the 'default' or 'full' selection are supported")
    # a CLIP tower puts a CLS token first, a SigLIP tower none; "default" drops the first token
    per_view = patches + (config.vision_config.model_type != "siglip_vision_model") - (strategy == "default")
    if kind in ANYRES:
        if per_view != patches:
            raise ValueError(f"a view gives {per_view} tokens for {patches} patches: tiles cannot form a grid")
        return patches * (1 + anyres_side(config, kind) ** 2), config.vision_config.hidden_size
    return per_view, config.vision_config.hidden_size


def base_connector(model, kind: str) -> Connector:
    """The checkpoint's own projection as a connector: every task's projection has its shape."""
    config, hidden = model.config, model.config.text_config.hidden_size
    tokens, width = vision_tokens(config, kind)
    if kind == "llava" or kind in ANYRES:
        if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
            raise ValueError("only LLaVA projectors with GELU and biases are supported")
        grid = 0 if kind == "llava" else \
            anyres_side(config, kind) * config.vision_config.image_size // config.vision_config.patch_size
        connector = Connector(ConnectorConfig(width, hidden, tokens, projector="token_mlp", grid_rows=grid,
                                              grid_columns=grid))
        state = dict(model.model.multi_modal_projector.state_dict())  # linear_1.*, linear_2.*: the connector's names
        if grid:
            state["image_newline"] = model.model.image_newline.detach()
    elif kind == "qwen2_vl":
        connector = Connector(ConnectorConfig(width, hidden, tokens, projector="merger",
                                              merged_patches=config.vision_config.spatial_merge_size ** 2,
                                              norm="layer" if config.model_type == "qwen2_vl" else "rms"))
        state = model.model.visual.merger.state_dict()  # ln_q.*, mlp.0.*, mlp.2.*: the connector's names
    elif kind == "paligemma":
        connector = Connector(ConnectorConfig(width, hidden, tokens, projector="token_linear"))
        state = {f"proj.{k}": v for k, v in model.model.multi_modal_projector.linear.state_dict().items()}
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
    if hasattr(model, "model"):  # all but BLIP-2: the decoder and the head sit apart
        lm = AutoModelForCausalLM.from_config(_causal_lm_config(model.config.text_config), dtype=torch.float32)
        decoder = model.model.text_model if hasattr(model.model, "text_model") else model.model.language_model
        state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
        lm.load_state_dict({**state, "lm_head.weight": model.lm_head.weight}, strict=True)
    else:  # BLIP-2: a whole causal LM already
        lm = model.language_model
    return save_to_cache(lm, tokenizer, target)


def _causal_lm_config(text_config):
    """The config of the checkpoint's LM as a plain causal LM. Qwen2(.5)-VL's LM is Qwen2 with multimodal RoPE: written as
    Qwen2 with its sections kept as `cit_mrope_section` (LanguageModel rotates with them where positions are 3-D;
    text-only positions are plain RoPE)."""
    if text_config.model_type not in ("qwen2_vl_text", "qwen2_5_vl_text"):
        return text_config
    from transformers import Qwen2Config

    fields = {k: v for k, v in text_config.to_dict().items() if k not in ("model_type", "architectures")}
    rope = dict(fields.pop("rope_parameters"))
    sections = list(rope.pop("mrope_section"))
    return Qwen2Config(**fields, rope_parameters=rope, cit_mrope_section=sections)
