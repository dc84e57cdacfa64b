"""The frozen vision tower: EfficientNet-Lite0 (ImageNet) -> one pooled 1280-d feature per image."""
from __future__ import annotations

import torch
from PIL import Image

from .images import preprocess
from .numerics import CPU
from .paths import vision_weights_path

FEATURE_DIM = 1280


class VisionTower:
    def __init__(self, device: torch.device = CPU) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        self.device = device  # float32 whatever the LM's dtype: features are routing keys (numerics.py)
        self.model = EfficientNet.from_name("efficientnet-lite0")
        # weights_only: a plain state_dict; no pickled code may run.
        state = torch.load(vision_weights_path(), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.model.eval().requires_grad_(False).to(device)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Images -> [B, 1280] globally pooled features of the last 7x7 map (float32, on the CPU: they are cached
        and routed with; Backbone.project moves them)."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(preprocess(images[i : i + batch_size])).to(self.device)
            out.append(self.model.extract_features(x).mean(dim=(2, 3)).cpu())
        return torch.cat(out) if out else torch.empty(0, FEATURE_DIM)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Routing's image vector: the feature is one pooled vector already."""
        return features
