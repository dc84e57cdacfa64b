"""The composed backbone: frozen vision tower -> per-row connector (EProj) -> frozen language model."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from .adapters import Connector, ConnectorConfig, TaskAdapter
from .language_model import DecodeBatch, LanguageModel, RowState, Sampling
from .paths import STARTING_CONNECTORS
from .vision import FEATURE_DIM, VisionTower


class Backbone:
    """One shared backbone. It knows nothing of tasks or caching: callers hand it an adapter per row."""

    def __init__(self, vision: VisionTower | None = None, lm: LanguageModel | None = None) -> None:
        self.vision = vision or VisionTower()
        self.lm = lm or LanguageModel()

    def connector_config(self, num_tokens: int = 1) -> ConnectorConfig:
        return ConnectorConfig(feature_dim=FEATURE_DIM, hidden_size=self.lm.hidden_size, num_tokens=num_tokens)

    def base_connector(self, start: str = "base") -> Connector:
        """A starting connector shipped with the package: "base" (captions only, what new tasks start from and
        unrouted requests use) or "instruct" (instruction-tuned), made by `cit-trainer train-base`."""
        if start not in STARTING_CONNECTORS:
            raise ValueError(f"unknown starting point {start!r}; choose from {', '.join(STARTING_CONNECTORS)}")
        directory = STARTING_CONNECTORS[start]
        if not (directory / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"no {start} connector at {directory}; run `cit-trainer train-base`")
        return Connector.load(directory)

    def load_adapter(self, name: str, connector_dir: Path, lora_dir: Path | None = None,
                     trainable: bool = False) -> TaskAdapter:
        """A task's adapter from disk; its LoRA (if any) is loaded into the LM under `name`."""
        connector = Connector.load(connector_dir)
        if lora_dir is None:
            return TaskAdapter(connector)
        self.lm.load_lora(name, lora_dir, trainable=trainable)
        return TaskAdapter(connector, name)

    def unload_adapter(self, adapter: TaskAdapter) -> None:
        if adapter.lora is not None:
            self.lm.unload_lora(adapter.lora)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.vision.encode(images)

    @staticmethod
    def project(features: torch.Tensor, adapters: Sequence[TaskAdapter]) -> torch.Tensor:
        """Per-row projection: rows sharing a connector are projected together."""
        first = adapters[0].connector.config
        out = torch.empty(features.shape[0], first.num_tokens, first.hidden_size)
        groups: dict[int, list[int]] = {}
        for row, adapter in enumerate(adapters):
            groups.setdefault(id(adapter.connector), []).append(row)
        with torch.inference_mode():
            for rows in groups.values():
                out[rows] = adapters[rows[0]].connector(features[rows])
        return out

    def decode_batch(self) -> DecodeBatch:
        """An empty running batch for continuous batching (see `join`)."""
        return DecodeBatch(self.lm)

    def join(self, batch: DecodeBatch, features: torch.Tensor, adapters: Sequence[TaskAdapter],
             instructions: Sequence[str], sampling: Sequence[Sampling]) -> list[RowState]:
        """New rows join a running batch, each with its own adapter; their states advance with `batch.step()`."""
        return batch.join(self.project(features, adapters), instructions, sampling, [a.lora for a in adapters])

    def stream(
        self,
        features: torch.Tensor,
        adapters: Sequence[TaskAdapter],
        instructions: Sequence[str],
        sampling: Sequence[Sampling],
    ) -> Iterator[list[RowState]]:
        return self.lm.decode(self.project(features, adapters), instructions, sampling, [a.lora for a in adapters])

    def generate(
        self,
        features: torch.Tensor,
        adapters: Sequence[TaskAdapter],
        instructions: Sequence[str],
        sampling: Sequence[Sampling],
    ) -> list[RowState]:
        return self.lm.generate(self.project(features, adapters), instructions, sampling, [a.lora for a in adapters])
