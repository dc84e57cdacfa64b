"""cit-server: serve a registry over gRPC on the embedded backbone."""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from cit_backbone.options import DEVICE_HELP, DTYPE_HELP

app = typer.Typer(add_completion=False, help=__doc__)
log = logging.getLogger("cit.server")


def _default(name: str):
    """ServerConfig owns every default; the options only show them."""
    from .config import ServerConfig

    return ServerConfig.__dataclass_fields__[name].default


@app.command()
def serve(
    registry: Annotated[Path, typer.Option("--registry", "-r", envvar="CIT_REGISTRY", help="registry directory")] = Path("cit-registry"),
    host: Annotated[str, typer.Option(help="address gRPC listens on")] = _default("host"),
    port: Annotated[int, typer.Option(help="0 picks a free port")] = _default("port"),
    http_port: Annotated[int | None, typer.Option(help="also serve the OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health) on --host at this port (0: a free port); same engine, tokens, TLS and limits as gRPC")] = None,
    routing_margin: Annotated[float, typer.Option(help="a request routes to a task when its image and instruction clear the task's own floors by this much (and no other known question is nearer); else the base connector answers. Higher: fewer wrong routes, more fall-backs")] = _default("routing_margin"),
    adapter_cache_size: Annotated[int, typer.Option(help="task adapters kept resident (LRU); the registry is the cold tier")] = _default("adapter_cache_size"),
    adapter_cache_bytes: Annotated[int | None, typer.Option(help="also bound the resident adapters' weights, in bytes")] = None,
    pin: Annotated[list[str] | None, typer.Option(help="task id whose serving version stays resident from the start, never evicted (repeatable)")] = None,
    workers: Annotated[int, typer.Option(help="threads that decode request images and read the registry (generation runs on one scheduler thread)")] = _default("workers"),
    max_batch_size: Annotated[int, typer.Option(help="rows of the running batch, any mix of tasks (plus pinned tasks <= --adapter-cache-size)")] = _default("max_batch_size"),
    batch_window_ms: Annotated[float, typer.Option(help="an idle server waits this long after a request for others to join it")] = _default("batch_window_ms"),
    max_requests: Annotated[int, typer.Option(help="requests inside the server at once (running + waiting); more are refused at once with RESOURCE_EXHAUSTED")] = _default("max_requests"),
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt (chat markup + instruction + visual tokens) in LM tokens; longer: INVALID_ARGUMENT")] = _default("max_prompt_tokens"),
    max_instruction_chars: Annotated[int, typer.Option(help="longest instruction in characters (checked before tokenising)")] = _default("max_instruction_chars"),
    prefix_cache_bytes: Annotated[int, typer.Option(help="bytes of prompt-prefix keys/values kept for reuse (LRU)")] = _default("prefix_cache_bytes"),
    auth_token: Annotated[str | None, typer.Option(envvar="CIT_AUTH_TOKEN", help="require 'authorization: Bearer <token>' on every cit RPC (prefer the environment variable)")] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="CIT_ADMIN_TOKEN", help="the bearer token of admin RPCs (ReloadRegistry, ChangeTask, GetHistory) and of data paths in GetTask; unset: admin RPCs are off (prefer the environment variable)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve TLS only")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="PEM CA: clients must present a certificate it signed")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0: a free port)")] = None,
    metrics_top_tasks: Annotated[int, typer.Option(help="the busiest tasks get per-task metrics (requests, latency, tokens, fall-backs by task and version); the rest count as 'other'")] = _default("metrics_top_tasks"),
    metrics_host: Annotated[str, typer.Option(help="address the unauthenticated metrics listen on (loopback unless you mean it)")] = _default("metrics_host"),
    grace_seconds: Annotated[float, typer.Option(help="on SIGTERM/SIGINT: time in-flight requests get to finish")] = _default("grace_seconds"),
    backbone: Annotated[Path | None, typer.Option(envvar="CIT_BACKBONE", help="a local Hugging Face checkpoint directory as the backbone (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, PaliGemma, BLIP-2, Idefics3 / SmolVLM) (default: cit's own); the registry's tasks must have been trained on it")] = None,
    device: Annotated[str, typer.Option(envvar="CIT_DEVICE", help=DEVICE_HELP)] = _default("device"),
    dtype: Annotated[str, typer.Option(envvar="CIT_DTYPE", help=DTYPE_HELP)] = _default("dtype"),
    engine: Annotated[str, typer.Option(help="where the LM decodes: 'embedded' (in this process) or 'vllm' (a vLLM worker process)")] = _default("engine"),
    vllm_worker: Annotated[str | None, typer.Option(help="with --engine vllm: HOST:PORT of a running `python -m cit_server.vllm_worker` (default: start one)")] = None,
    vllm_python: Annotated[str | None, typer.Option(help="with --engine vllm: the python of vLLM's environment (default: $CIT_VLLM_PYTHON, else ./.venv-vllm/bin/python)")] = None,
    vllm_max_model_len: Annotated[int, typer.Option(help="with --engine vllm: the worker's context length (prompt + generated tokens)")] = _default("vllm_max_model_len"),
    vllm_tensor_parallel_size: Annotated[int, typer.Option(help="with --engine vllm on GPUs: how many GPUs the worker shards the LM over")] = _default("vllm_tensor_parallel_size"),
    vllm_data_parallel_size: Annotated[int, typer.Option(help="with --engine vllm: replicas of the LM in the worker (vLLM's data parallelism, each with --vllm-tensor-parallel-size GPUs); vLLM spreads the rows over them")] = _default("vllm_data_parallel_size"),
    vllm_gpu_memory_utilization: Annotated[float, typer.Option(help="with --engine vllm on GPUs: the share of each GPU's memory the worker may take")] = _default("vllm_gpu_memory_utilization"),
) -> None:
    """Start the server; it prints `cit-server listening on HOST:PORT` once it accepts requests."""
    from cit_registry.store import TaskNotFound

    from .config import ServerConfig
    from .engine import Engine
    from .vllm_engine import WorkerError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = {k: v for k, v in locals().items() if k in ServerConfig.__dataclass_fields__}
    try:
        config = ServerConfig(**{**settings, "pinned_tasks": tuple(pin or ())})
        from cit_backbone.backbone import Backbone
        from cit_backbone.numerics import Numerics

        numerics = Numerics.resolve(config.device, config.dtype)
        log.info("backbone on %s", numerics)
        engine_ = Engine(config, backbone=Backbone.load(backbone, numerics))
    except (ValueError, FileNotFoundError, TaskNotFound, WorkerError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:  # every way out stops the engine, and with it a vLLM worker it started
        asyncio.run(_serve(engine_, config))
    except OSError as exc:  # e.g. the port is taken
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        engine_.close()
    typer.echo("cit-server stopped")


async def _serve(engine, config) -> None:
    from .service import CitServer

    server = CitServer(engine, config)
    await server.start()
    http = None
    if config.http_port is not None:
        from .openai_api import HttpServer

        http = HttpServer(engine, config, server.auth)
        await http.start()
    metrics = (f", metrics on {config.metrics_host}:{engine.metrics.serve(config.metrics_host, config.metrics_port)}"
               if config.metrics_port is not None else "")
    security = ("TLS" + (" + client certificates" if config.tls_client_ca else "") if config.tls_cert
                else "plaintext") + (", bearer token" if config.auth_token else "") + \
        (", admin token" if config.admin_token else "")
    openai = f", OpenAI HTTP API on {config.host}:{http.port}" if http is not None else ""
    typer.echo(f"cit-server listening on {config.host}:{server.port} ({len(engine.front.router())} tasks, "
               f"{security}{metrics}{openai})")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: in-flight requests have %.0f s", config.grace_seconds)
    if http is not None:
        await asyncio.gather(server.stop(config.grace_seconds), http.stop())
    else:
        await server.stop(config.grace_seconds)


if __name__ == "__main__":
    app()
