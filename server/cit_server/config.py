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
    max_batch_size: int = 8            # requests decoded together (any mix of tasks); <= adapter_cache_size
    batch_window_ms: float = 5.0       # after the first waiting request, how long to wait for more to batch
    max_queue: int = 256               # waiting requests beyond this get RESOURCE_EXHAUSTED
    auth_token: str | None = None      # set: every cit RPC needs `authorization: Bearer <token>`
    tls_cert: Path | None = None       # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate this CA signed
    grace_seconds: float = 10.0        # on SIGTERM: in-flight requests get this long to finish

    def __post_init__(self) -> None:
        if not -2.0 <= self.routing_threshold <= 2.0:
            raise ValueError("routing_threshold is a sum of two cosines: it must lie in [-2, 2]")
        if self.adapter_cache_size < 1 or self.workers < 1:
            raise ValueError("adapter_cache_size and workers must be at least 1")
        if not 1 <= self.max_batch_size <= self.adapter_cache_size:
            raise ValueError("max_batch_size must lie in 1..adapter_cache_size: a batch holds all its adapters")
        if self.batch_window_ms < 0 or self.max_queue < 1:
            raise ValueError("batch_window_ms must be >= 0 and max_queue >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if self.auth_token is not None and len(self.auth_token) < 16:
            raise ValueError("the auth token must have at least 16 characters")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client certificates need the server to speak TLS: give a certificate and key")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"no such file: {path}")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")

    @property
    def max_message_bytes(self) -> int:
        return self.max_image_bytes + 64 * 1024  # room for the instruction and the other fields
