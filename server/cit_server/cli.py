"""cit-server: serve a registry over gRPC on the embedded backbone."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from cit_registry.router import ROUTING_THRESHOLD

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def serve(
    registry: Annotated[Path, typer.Option("--registry", "-r", envvar="CIT_REGISTRY", help="registry directory")] = Path("cit-registry"),
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port")] = 50051,
    routing_threshold: Annotated[float, typer.Option(help="best cos(image)+cos(instruction) below this: base connector")] = ROUTING_THRESHOLD,
    adapter_cache_size: int = 16,
    workers: int = 8,
) -> None:
    """Start the server; it prints `cit-server listening on HOST:PORT` once it accepts requests."""
    from .config import ServerConfig
    from .engine import Engine
    from .service import build_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(registry, host, port, routing_threshold, adapter_cache_size=adapter_cache_size,
                              workers=workers)
        engine = Engine(config)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    server, bound = build_server(engine, config)
    server.start()
    typer.echo(f"cit-server listening on {host}:{bound} ({len(engine.router())} tasks)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()


if __name__ == "__main__":
    app()
