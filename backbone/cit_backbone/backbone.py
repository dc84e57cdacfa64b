"""The composed backbone: frozen vision tower -> per-row connector (EProj) -> frozen language model."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .adapters import AdapterFiles, Connector, ConnectorConfig, TaskAdapter
from .decode_batch import DecodeBatch, RunningBatch, generate
from .hf import HfVision, checkpoint_identity, load_checkpoint
from .language_model import LanguageModel
from .numerics import CPU_FLOAT32, Numerics
from .paths import STARTING_CONNECTORS
from .sampling import RowState, Sampling
from .vision import FEATURE_DIM, VisionTower

DEFAULT_IDENTITY = "cit:efficientnet-lite0+smollm2-135m-instruct"


class Backbone:
    """One shared backbone. It knows nothing of tasks or caching: callers hand it an adapter per row.

    The default is cit's own (EfficientNet-Lite0 -> one visual token -> SmolLM2-135M-Instruct); `Backbone.load(DIR)`
    builds one from a Hugging Face checkpoint directory instead (hf.py), whose projection is the base connector.
    Everything it builds lives on `numerics.device`; the LM computes in `numerics.dtype` (numerics.py)."""

    def __init__(self, vision: VisionTower | HfVision | None = None, lm: LanguageModel | None = None,
                 base: Connector | None = None, identity: str = DEFAULT_IDENTITY,
                 numerics: Numerics = CPU_FLOAT32) -> None:
        self.numerics = numerics
        self.vision = vision or VisionTower(numerics.device)
        self.lm = lm or LanguageModel(numerics=numerics)
        # a checkpoint's own projection; None: the shipped starting connectors
        self._base = base.to(numerics.device) if base is not None else None
        self.identity = identity  # recorded by a registry at its first commit; a server checks it

    @classmethod
    def load(cls, checkpoint: Path | None = None, numerics: Numerics = CPU_FLOAT32) -> Backbone:
        """cit's default backbone, or one from a local checkpoint directory (hf.py lists the families)."""
        if checkpoint is None:
            return cls(numerics=numerics)
        loaded = load_checkpoint(Path(checkpoint))
        return cls(HfVision(loaded.model, loaded.kind, numerics.device, loaded.normalisation),
                   LanguageModel(loaded.lm_dir, numerics, loaded.prompt, loaded.layout), loaded.base,
                   checkpoint_identity(loaded.directory, loaded.kind), numerics)

    @property
    def routing_dim(self) -> int:
        """Width of the image part of task keys and routing queries."""
        return self.vision.dim if isinstance(self.vision, HfVision) else FEATURE_DIM

    def connector_config(self, num_tokens: int = 1) -> ConnectorConfig:
        if self._base is not None:
            return self._base.config
        return ConnectorConfig(feature_dim=FEATURE_DIM, hidden_size=self.lm.hidden_size, num_tokens=num_tokens)

    def routing_features(self, features: torch.Tensor) -> torch.Tensor:
        """The image part of task keys and routing queries: one vector per image (vision tokens pooled)."""
        return self.vision.pooled(features)

    def routing_query(self, features: torch.Tensor, instruction_embeddings: np.ndarray) -> np.ndarray:
        """The FAISS query of requests from their vision features (encode_images) and instruction embeddings:
        the one query the server routes with and `cit-registry route` shows."""
        from cit_registry.store import routing_query

        return routing_query(self.routing_features(features).numpy(), instruction_embeddings)

    def base_connector(self, start: str = "base") -> Connector:
        """A starting connector shipped with the package: "base" (captions only, what new tasks start from and
        unrouted requests use) or "instruct" (instruction-tuned), made by `cit-trainer train-base`. A checkpoint's
        backbone has one starting point, its own projection."""
        if self._base is not None:
            if start != "base":
                raise ValueError("a checkpoint's backbone has one starting point, 'base' (its own projection)")
            return self._base.clone()
        if start not in STARTING_CONNECTORS:
            raise ValueError(f"unknown starting point {start!r}; choose from {', '.join(STARTING_CONNECTORS)}")
        directory = STARTING_CONNECTORS[start]
        if not (directory / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"no {start} connector at {directory}; run `cit-trainer train-base`")
        return self.load_connector(directory)

    def load_connector(self, directory: Path) -> Connector:
        """A saved connector, on this backbone's device."""
        return Connector.load(directory).to(self.numerics.device)

    def load_adapter(self, name: str, connector_dir: Path, lora_dir: Path | None = None,
                     trainable: bool = False) -> TaskAdapter:
        """A task's adapter from disk; its LoRA (if any) is loaded into the LM under `name`."""
        return self.install_adapter(name, self.read_adapter(connector_dir, lora_dir), trainable)

    def read_adapter(self, connector_dir: Path, lora_dir: Path | None = None) -> AdapterFiles:
        """A task's adapter read from disk but not yet in the LM; touches no shared state, so a loader thread can
        do it while the LM decodes."""
        weights = self.lm.loras.read(lora_dir) if lora_dir is not None else None
        return AdapterFiles(self.load_connector(connector_dir), Path(connector_dir), lora_dir, weights)

    def install_adapter(self, name: str, files: AdapterFiles, trainable: bool = False) -> TaskAdapter:
        """Put an adapter that was read into service; its LoRA (if any) goes into the LM under `name`."""
        if files.lora_dir is None:
            return TaskAdapter(files.connector)
        self.lm.loras.load(name, files.lora_dir, trainable=trainable, weights=files.lora_weights)
        return TaskAdapter(files.connector, name)

    def unload_adapter(self, adapter: TaskAdapter) -> None:
        if adapter.lora is not None:
            self.lm.loras.unload(adapter.lora)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.vision.encode(images)

    def project(self, features: torch.Tensor, adapters: Sequence[TaskAdapter]) -> torch.Tensor:
        """Per-row projection, in the LM's dtype on its device: rows sharing a connector are projected together."""
        first = adapters[0].connector.config
        out = torch.empty(features.shape[0], first.output_tokens, first.hidden_size, dtype=self.lm.dtype,
                          device=self.lm.device)
        features = features.to(self.lm.device)
        groups: dict[int, list[int]] = {}
        for row, adapter in enumerate(adapters):
            groups.setdefault(id(adapter.connector), []).append(row)
        with torch.inference_mode():
            for rows in groups.values():
                out[rows] = adapters[rows[0]].connector(features[rows]).to(out.dtype)
        return out

    def decode_batch(self) -> RunningBatch:
        """An empty running batch for continuous batching (see `join`)."""
        return DecodeBatch(self.lm)

    def join(self, batch: RunningBatch, features: torch.Tensor, adapters: Sequence[TaskAdapter],
             instructions: Sequence[str], sampling: Sequence[Sampling]) -> list[RowState]:
        """New rows join a running batch, each with its own adapter; their states advance with `batch.step()`."""
        return batch.join(self.project(features, adapters), instructions, sampling, [a.lora for a in adapters])

    def generate(
        self,
        features: torch.Tensor,
        adapters: Sequence[TaskAdapter],
        instructions: Sequence[str],
        sampling: Sequence[Sampling],
    ) -> list[RowState]:
        return generate(self.lm, self.project(features, adapters), instructions, sampling, [a.lora for a in adapters])
