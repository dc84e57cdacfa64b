"""Every limit and default of the server, in one validated place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cit_backbone.language_model import PREFIX_CACHE_BYTES
from cit_registry.router import ROUTING_MARGIN


@dataclass(frozen=True)
class ServerConfig:
    registry: Path
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None       # set: the OpenAI-compatible HTTP API on host:http_port too (0: a free port)
    routing_margin: float = ROUTING_MARGIN  # how far above each of its task's floors a request must be to route
    default_max_new_tokens: int = 32
    max_instruction_chars: int = 2000
    max_prompt_tokens: int = 512       # chat markup + instruction + visual tokens, in the LM's tokens
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES  # keys/values of prompt prefixes kept for reuse
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    adapter_cache_size: int = 16       # resident task adapters (LRU); the registry on disk is the cold tier
    adapter_cache_bytes: int | None = None  # set: resident adapter weights stay within this many bytes too
    pinned_tasks: tuple[str, ...] = ()  # loaded at start and never evicted
    workers: int = 4                   # threads that decode images and read the registry for requests
    refresh_seconds: float = 1.0       # how often the registry is checked for new task versions
    max_batch_size: int = 8            # rows of the running batch (any mix of tasks); <= adapter_cache_size
    batch_window_ms: float = 5.0       # an idle server waits this long after a request for others to join it
    max_requests: int = 64             # requests inside the server at once (waiting + running); more: RESOURCE_EXHAUSTED
    auth_token: str | None = None      # set: every cit RPC needs `authorization: Bearer <token>`
    admin_token: str | None = None     # set: admin RPCs (ReloadRegistry, ChangeTask, GetHistory) take it; unset: they are off
    tls_cert: Path | None = None       # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate this CA signed
    metrics_host: str = "127.0.0.1"   # the metrics carry no auth: loopback unless an operator says otherwise
    metrics_port: int | None = None    # set: Prometheus metrics at http://metrics_host:metrics_port/metrics
    metrics_top_tasks: int = 20        # tasks with per-task series (the busiest); the others count as "other"
    grace_seconds: float = 10.0        # on SIGTERM: in-flight requests get this long to finish
    device: str = "auto"               # where the backbone runs (numerics.Numerics.resolve)
    dtype: str = "float32"             # the LM's precision; tasks are best served in the one they were trained in
    engine: str = "embedded"           # "vllm": the LM decodes in a vLLM worker process (vllm_engine.py)
    vllm_worker: str | None = None     # HOST:PORT of a running worker; unset: the server starts its own
    vllm_python: str | None = None     # the interpreter of vLLM's environment for that worker
    vllm_max_model_len: int = 2048     # the worker's context length (prompt + generated tokens)
    vllm_tensor_parallel_size: int = 1  # GPUs the worker shards the LM over (vLLM's tensor parallelism)
    vllm_data_parallel_size: int = 1   # replicas of the LM in the worker, each on its own GPUs; vLLM balances rows
    vllm_gpu_memory_utilization: float = 0.9  # share of each GPU's memory the worker may take (vLLM's default)

    def __post_init__(self) -> None:
        if not -1.0 <= self.routing_margin <= 1.0:
            raise ValueError("routing_margin is added to cosine floors: it must lie in [-1, 1]")
        if self.adapter_cache_size < 1 or self.workers < 1:
            raise ValueError("adapter_cache_size and workers must be at least 1")
        if self.max_batch_size < 1 or self.max_batch_size + len(self.pinned_tasks) > self.adapter_cache_size:
            raise ValueError(f"--max-batch-size ({self.max_batch_size}) plus pinned tasks ({len(self.pinned_tasks)}) "
                             f"must fit --adapter-cache-size ({self.adapter_cache_size}): a batch of distinct "
                             "tasks holds all its adapters resident beside the pinned ones")
        if self.adapter_cache_bytes is not None and self.adapter_cache_bytes < 1:
            raise ValueError("adapter_cache_bytes must be positive")
        if self.batch_window_ms < 0 or self.max_requests < 1:
            raise ValueError("batch_window_ms must be >= 0 and max_requests >= 1")
        if self.max_prompt_tokens < 8 or self.prefix_cache_bytes < 0:
            raise ValueError("max_prompt_tokens must be >= 8 and prefix_cache_bytes >= 0")
        for name, port in (("port", self.port), ("http_port", self.http_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} {port} is out of range")
        for name, token in (("auth", self.auth_token), ("admin", self.admin_token)):
            if token is not None and len(token) < 16:
                raise ValueError(f"the {name} token must have at least 16 characters")
        if self.admin_token is not None and self.admin_token == self.auth_token:
            raise ValueError("the admin token must differ from the auth token")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client certificates need the server to speak TLS: give a certificate and key")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"no such file: {path}")
        if self.engine not in ("embedded", "vllm"):
            raise ValueError(f"engine must be 'embedded' or 'vllm', got {self.engine!r}")
        if min(self.vllm_tensor_parallel_size, self.vllm_data_parallel_size) < 1 \
                or not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError("vllm_tensor_parallel_size and vllm_data_parallel_size must be >= 1 and "
                             "vllm_gpu_memory_utilization in (0, 1]")
        if not 0 <= self.metrics_top_tasks <= 1000:
            raise ValueError("metrics_top_tasks must be in 0..1000 (each task adds a dozen series)")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")

    @property
    def max_message_bytes(self) -> int:
        return self.max_image_bytes + 64 * 1024  # room for the instruction and the other fields
