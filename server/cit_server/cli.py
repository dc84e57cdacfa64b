"""cit-server: serve a registry over gRPC on the embedded backbone."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from cit_registry.router import ROUTING_THRESHOLD
from cit_registry.store import TaskNotFound

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def serve(
    registry: Annotated[Path, typer.Option("--registry", "-r", envvar="CIT_REGISTRY", help="registry directory")] = Path("cit-registry"),
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port")] = 50051,
    routing_threshold: Annotated[float, typer.Option(help="best cos(image)+cos(instruction) below this: base connector")] = ROUTING_THRESHOLD,
    adapter_cache_size: Annotated[int, typer.Option(help="task adapters kept resident (LRU); the registry is the cold tier")] = 16,
    adapter_cache_bytes: Annotated[Optional[int], typer.Option(help="also bound the resident adapters' weights, in bytes")] = None,
    pin: Annotated[Optional[list[str]], typer.Option(help="task id kept resident from the start, never evicted (repeatable)")] = None,
    workers: Annotated[int, typer.Option(help="gRPC threads: requests in flight at once (waiting ones queue)")] = 8,
    max_batch_size: Annotated[int, typer.Option(help="rows of the running batch, any mix of tasks (<= --adapter-cache-size)")] = 8,
    batch_window_ms: Annotated[float, typer.Option(help="an idle server waits this long after a request for others to join it")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="waiting requests beyond this are refused with RESOURCE_EXHAUSTED")] = 256,
    auth_token: Annotated[Optional[str], typer.Option(envvar="CIT_AUTH_TOKEN", help="require 'authorization: Bearer <token>' on every cit RPC (prefer the environment variable)")] = None,
    admin_token: Annotated[Optional[str], typer.Option(envvar="CIT_ADMIN_TOKEN", help="the bearer token of admin RPCs (ReloadRegistry); unset: they are off (prefer the environment variable)")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate chain: serve TLS only")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(help="PEM CA: clients must present a certificate it signed")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port)")] = None,
    grace_seconds: Annotated[float, typer.Option(help="on SIGTERM/SIGINT: time in-flight requests get to finish")] = 10.0,
    backbone: Annotated[Optional[Path], typer.Option(envvar="CIT_BACKBONE", help="a local LLaVA or BLIP-2 checkpoint directory as the backbone (default: cit's own); the registry's tasks must have been trained on it")] = None,
    engine: Annotated[str, typer.Option(help="where the LM decodes: 'embedded' (in this process) or 'vllm' (a vLLM worker process)")] = "embedded",
    vllm_worker: Annotated[Optional[str], typer.Option(help="with --engine vllm: HOST:PORT of a running `python -m cit_server.vllm_worker` (default: start one)")] = None,
    vllm_python: Annotated[Optional[str], typer.Option(help="with --engine vllm: the python of vLLM's environment (default: $CIT_VLLM_PYTHON, else ./.venv-vllm/bin/python)")] = None,
) -> None:
    """Start the server; it prints `cit-server listening on HOST:PORT` once it accepts requests."""
    from .config import ServerConfig
    from .engine import Engine
    from .service import build_server
    from .vllm_engine import WorkerError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(registry, host, port, routing_threshold, adapter_cache_size=adapter_cache_size,
                              adapter_cache_bytes=adapter_cache_bytes, pinned_tasks=tuple(pin or ()),
                              workers=workers, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                              max_queue=max_queue, auth_token=auth_token, admin_token=admin_token,
                              tls_cert=tls_cert, tls_key=tls_key,
                              tls_client_ca=tls_client_ca, grace_seconds=grace_seconds, engine=engine,
                              vllm_worker=vllm_worker, vllm_python=vllm_python)
        from cit_backbone.backbone import Backbone

        engine = Engine(config, backbone=Backbone.load(backbone))
    except (ValueError, FileNotFoundError, TaskNotFound, WorkerError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    server, bound, health = build_server(engine, config)
    server.start()
    metrics = f", metrics on {host}:{engine.metrics.serve(host, metrics_port)}" if metrics_port is not None else ""
    security = ("TLS" + (" + client certificates" if tls_client_ca else "") if tls_cert else "plaintext") + \
        (", bearer token" if auth_token else "") + (", admin token" if admin_token else "")
    typer.echo(f"cit-server listening on {host}:{bound} ({len(engine.router())} tasks, {security}{metrics})")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # Graceful stop, as vLLM's gRPC server does: health says NOT_SERVING first, new RPCs are refused, in-flight
    # ones get the grace period.
    health.enter_graceful_shutdown()
    logging.getLogger("cit.server").info("shutting down: in-flight requests have %.0f s", grace_seconds)
    server.stop(grace=grace_seconds).wait()
    engine.close()
    typer.echo("cit-server stopped")


if __name__ == "__main__":
    app()
