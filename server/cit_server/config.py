"""Every limit and default of the server, in one validated place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cit_registry.router import ROUTING_THRESHOLD


@dataclass(frozen=True)
class ServerConfig:
    registry: Path
    host: str = "127.0.0.1"
    port: int = 50051
    routing_threshold: float = ROUTING_THRESHOLD  # best cos(image)+cos(instruction) below: the base connector answers
    default_max_new_tokens: int = 32
    max_instruction_chars: int = 2000
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    adapter_cache_size: int = 16       # resident task adapters (LRU); the registry on disk is the cold tier
    workers: int = 8                   # gRPC worker threads; the backbone itself runs one batch at a time
    refresh_seconds: float = 1.0       # how often the registry is checked for new task versions

    def __post_init__(self) -> None:
        if not -2.0 <= self.routing_threshold <= 2.0:
            raise ValueError("routing_threshold is a sum of two cosines: it must lie in [-2, 2]")
        if self.adapter_cache_size < 1 or self.workers < 1:
            raise ValueError("adapter_cache_size and workers must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")

    @property
    def max_message_bytes(self) -> int:
        return self.max_image_bytes + 64 * 1024  # room for the instruction and the other fields
