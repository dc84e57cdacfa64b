"""Adapters: the per-task projection (EProj connector), its on-disk format, and what a row is generated with.

The connector's format follows PEFT's habit: a directory with `adapter_config.json` and
`adapter_model.safetensors`, holding only the adapter's own weights. A LoRA task adds a LoRA on the language model,
saved in PEFT's own format (language_model.py). Nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class ConnectorConfig:
    feature_dim: int = 1280   # pooled vision feature
    hidden_size: int = 576    # the LM's embedding width
    num_tokens: int = 1       # visual tokens put into the prompt; one suffices at this data scale (STACK.md)
    adapter_type: str = "eproj"

    def __post_init__(self) -> None:
        if self.adapter_type != "eproj":
            raise ValueError(f"not an EProj adapter: adapter_type={self.adapter_type!r}")
        if min(self.feature_dim, self.hidden_size, self.num_tokens) < 1:
            raise ValueError(f"connector dimensions must be positive: {self}")


class Connector(nn.Module):
    """Vision feature [B, feature_dim] -> visual token embeddings [B, num_tokens, hidden_size]."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.feature_dim, config.hidden_size * config.num_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).view(features.shape[0], self.config.num_tokens, self.config.hidden_size)

    def clone(self) -> "Connector":
        twin = Connector(self.config)
        twin.load_state_dict(self.state_dict())
        return twin

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: Path) -> "Connector":
        directory = Path(directory)
        raw = json.loads((directory / CONFIG_FILE).read_text())
        known = set(ConnectorConfig.__dataclass_fields__)
        config = ConnectorConfig(**{k: v for k, v in raw.items() if k in known})
        connector = cls(config)
        connector.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return connector.eval()


@dataclass(frozen=True)
class TaskAdapter:
    """What one row is generated with: a projection and, for a LoRA task, the name of a LoRA loaded in the LM."""

    connector: Connector
    lora: str | None = None
