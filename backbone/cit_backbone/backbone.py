"""The composed backbone: frozen vision tower -> per-row connector (EProj) -> frozen language model."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from .adapters import Connector, ConnectorConfig
from .language_model import LanguageModel, RowState, Sampling
from .paths import BASE_CONNECTOR_DIR
from .vision import FEATURE_DIM, VisionTower


class Backbone:
    """One shared backbone. It knows nothing of tasks or caching: callers hand it a connector per row."""

    def __init__(self, vision: VisionTower | None = None, lm: LanguageModel | None = None) -> None:
        self.vision = vision or VisionTower()
        self.lm = lm or LanguageModel()

    def connector_config(self, num_tokens: int = 1) -> ConnectorConfig:
        return ConnectorConfig(feature_dim=FEATURE_DIM, hidden_size=self.lm.hidden_size, num_tokens=num_tokens)

    def base_connector(self) -> Connector:
        """The connector trained once on the base mixture (`cit-trainer train-base`), shipped with the package."""
        if not (BASE_CONNECTOR_DIR / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"no base connector at {BASE_CONNECTOR_DIR}; run `cit-trainer train-base`")
        return Connector.load(BASE_CONNECTOR_DIR)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.vision.encode(images)

    @staticmethod
    def project(features: torch.Tensor, connectors: Sequence[Connector]) -> torch.Tensor:
        """Per-row projection: rows sharing a connector are projected together."""
        out = torch.empty(features.shape[0], connectors[0].config.num_tokens, connectors[0].config.hidden_size)
        groups: dict[int, list[int]] = {}
        for row, connector in enumerate(connectors):
            groups.setdefault(id(connector), []).append(row)
        with torch.inference_mode():
            for rows in groups.values():
                out[rows] = connectors[rows[0]](features[rows])
        return out

    def stream(
        self,
        features: torch.Tensor,
        connectors: Sequence[Connector],
        instructions: Sequence[str],
        sampling: Sequence[Sampling],
    ) -> Iterator[list[RowState]]:
        return self.lm.decode(self.project(features, connectors), instructions, sampling)

    def generate(
        self,
        features: torch.Tensor,
        connectors: Sequence[Connector],
        instructions: Sequence[str],
        sampling: Sequence[Sampling],
    ) -> list[RowState]:
        return self.lm.generate(self.project(features, connectors), instructions, sampling)
