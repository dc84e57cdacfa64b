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


PROJECTORS = ("linear", "token_mlp", "token_linear", "merger")


@dataclass(frozen=True)
class ConnectorConfig:
    feature_dim: int = 1280   # the pooled vision feature ("linear"), or one vision token's width (token_*)
    hidden_size: int = 576    # the LM's embedding width
    num_tokens: int = 1       # visual tokens put into the prompt; one suffices at this data scale (STACK.md)
    adapter_type: str = "eproj"
    # "linear": one Linear from the pooled feature to all visual tokens (cit's default backbone);
    # "token_mlp": LLaVA's multi_modal_projector, Linear-GELU-Linear on each vision token;
    # "token_linear": BLIP-2's language_projection, one Linear on each Q-Former output token (Idefics3's
    # modality_projection, without a bias, on each pixel-shuffled vision token);
    # "merger": Qwen2-VL's visual.merger, a LayerNorm (Qwen2.5-VL: an RMSNorm, `norm`) on each of the
    # `merged_patches` patches a token folds, then Linear-GELU-Linear on the token.
    projector: str = "linear"
    bias: bool = True         # the Linear layers have biases (Idefics3's projection has none)
    # LLaVA-NeXT / OneVision's image_newline: the last grid_rows x grid_columns tokens are the tiled image's grid,
    # row by row (the base view's tokens come before it), and a learned embedding follows each row of the grid
    grid_rows: int = 0
    grid_columns: int = 0
    merged_patches: int = 1   # "merger": patches folded into one vision token (feature_dim = merged_patches x width)
    norm: str = "layer"       # "merger": "layer" (LayerNorm) or "rms" (RMSNorm) on each patch

    @classmethod
    def read(cls, directory: Path) -> ConnectorConfig:
        raw = json.loads((Path(directory) / CONFIG_FILE).read_text())
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def __post_init__(self) -> None:
        if self.adapter_type != "eproj":
            raise ValueError(f"not an EProj adapter: adapter_type={self.adapter_type!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; choose from {', '.join(PROJECTORS)}")
        if min(self.feature_dim, self.hidden_size, self.num_tokens) < 1:
            raise ValueError(f"connector dimensions must be positive: {self}")
        grid = self.grid_rows * self.grid_columns
        if (self.grid_rows > 0) != (self.grid_columns > 0) or min(self.grid_rows, self.grid_columns) < 0 \
                or grid > self.num_tokens or (grid and self.projector not in ("token_mlp", "token_linear")):
            raise ValueError(f"a newline grid is rows x columns of a token_mlp or token_linear projector's tokens: {self}")
        if self.merged_patches < 1 or self.feature_dim % self.merged_patches:
            raise ValueError(f"a merged token's width is a whole number of patches: {self}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"unknown norm {self.norm!r}; choose from layer, rms")
        if self.projector != "merger" and (self.merged_patches != 1 or self.norm != "layer"):
            raise ValueError(f"merged_patches and norm belong to the merger projector: {self}")

    @property
    def output_tokens(self) -> int:
        """Visual tokens the projection puts into the prompt: the tokens it reads and a newline per grid row."""
        return self.num_tokens + self.grid_rows


class Connector(nn.Module):
    """Vision features [B, feature_dim] ("linear") or [B, num_tokens * feature_dim] (token_*) -> visual token
    embeddings [B, output_tokens, hidden_size]. Parameter names follow the checkpoints the projectors come from."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.projector == "linear":
            self.proj = nn.Linear(c.feature_dim, c.hidden_size * c.num_tokens, bias=c.bias)
        elif c.projector == "token_linear":
            self.proj = nn.Linear(c.feature_dim, c.hidden_size, bias=c.bias)
        elif c.projector == "merger":  # Qwen2-VL's names: ln_q, mlp.0, mlp.2
            norm = nn.LayerNorm if c.norm == "layer" else nn.RMSNorm
            self.ln_q = norm(c.feature_dim // c.merged_patches, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(c.feature_dim, c.feature_dim, bias=c.bias), nn.GELU(),
                                     nn.Linear(c.feature_dim, c.hidden_size, bias=c.bias))
        else:
            self.linear_1 = nn.Linear(c.feature_dim, c.hidden_size, bias=c.bias)
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)
        if c.grid_rows:
            self.image_newline = nn.Parameter(torch.zeros(c.hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        c, rows = self.config, features.shape[0]
        if c.projector == "linear":
            return self.proj(features).view(rows, c.num_tokens, c.hidden_size)
        tokens = features.view(rows, c.num_tokens, c.feature_dim)
        if c.projector == "merger":
            patches = self.ln_q(tokens.view(rows, c.num_tokens, c.merged_patches, -1))
            return self.mlp(patches.view(rows, c.num_tokens, c.feature_dim))
        out = self.proj(tokens) if c.projector == "token_linear" else self.linear_2(self.act(self.linear_1(tokens)))
        if not c.grid_rows:
            return out
        # as LLaVA-NeXT's pack_image_features writes it: the base view's tokens, then each grid row and a newline
        base, grid = out.split([c.num_tokens - c.grid_rows * c.grid_columns, c.grid_rows * c.grid_columns], dim=1)
        newline = self.image_newline.to(out.dtype).expand(rows, c.grid_rows, 1, c.hidden_size)
        grid = torch.cat((grid.reshape(rows, c.grid_rows, c.grid_columns, c.hidden_size), newline), dim=2)
        return torch.cat((base, grid.flatten(1, 2)), dim=1)

    def clone(self) -> Connector:
        twin = Connector(self.config).to(next(self.parameters()).device)
        twin.load_state_dict(self.state_dict())
        return twin

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: Path) -> Connector:
        directory = Path(directory)
        connector = cls(ConnectorConfig.read(directory))
        connector.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return connector.eval()


@dataclass(frozen=True)
class AdapterFiles:
    """A task adapter read from disk, not yet in service (Backbone.read_adapter, then install_adapter)."""

    connector: Connector
    connector_dir: Path
    lora_dir: Path | None = None
    lora_weights: dict[str, torch.Tensor] | None = None  # read ahead when the LoRA fits the LM's slots


@dataclass(frozen=True)
class TaskAdapter:
    """What one row is generated with: a projection and, for a LoRA task, the name of a LoRA loaded in the LM."""

    connector: Connector
    lora: str | None = None
