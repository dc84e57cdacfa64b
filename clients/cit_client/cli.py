"""cit: talk to a running cit-server."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer

from cit_proto import cit_pb2

from .client import CitClient, fell_back_reason
from .evaluate import EVALUATION_CONCURRENCY

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
SERVER = Annotated[str, typer.Option("--server", "-s", envvar="CIT_SERVER", help="host:port of cit-server")]
DEFAULT_SERVER = "127.0.0.1:50051"


_channel: dict = {}  # how to reach the server, from the options before the command


@app.callback()
def connection(
    token: Annotated[str | None, typer.Option(envvar="CIT_TOKEN", help="bearer token the server requires (prefer the environment variable)")] = None,
    tls_ca: Annotated[Path | None, typer.Option(envvar="CIT_TLS_CA", help="PEM CA or self-signed certificate of a TLS server")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM client certificate, when the server asks for one")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert")] = None,
) -> None:
    """Talk to a running cit-server."""
    _channel.update(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


def _client(server: str) -> CitClient:
    return CitClient(server, **_channel)


def _fail(exc: grpc.RpcError) -> None:
    typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
    raise typer.Exit(1)


def _route_line(route) -> str:
    served = f"{route.task_id} v{route.version}" if route.task_id else "base connector"
    why = "forced" if route.forced else (f"fell back: {fell_back_reason(route)}" if route.fell_back else "routed")
    return f"[{served}, {why}, score {route.score:.3f}]"


@app.command()
def generate(
    image: Path,
    instruction: str,
    server: SERVER = DEFAULT_SERVER,
    task: Annotated[str | None, typer.Option(help="skip routing and use this task")] = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    stream: Annotated[bool, typer.Option(help="print tokens as they arrive")] = False,
) -> None:
    """Generate an answer for IMAGE and INSTRUCTION; the server picks the task."""
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=stop)
    with _client(server) as client:
        try:
            if stream:
                for msg in client.generate_stream(image, instruction, task, **sampling):
                    if msg.HasField("route"):
                        typer.echo(_route_line(msg.route), err=True)
                    sys.stdout.write(msg.delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                r = client.generate(image, instruction, task, **sampling)
                typer.echo(_route_line(r.route), err=True)
                typer.echo(r.text)
        except grpc.RpcError as exc:
            _fail(exc)


@app.command()
def route(image: Path, instruction: str, server: SERVER = DEFAULT_SERVER, top_k: int = 5) -> None:
    """Show where the server would route a request, with the top candidates."""
    with _client(server) as client:
        try:
            r = client.route(image, instruction, top_k).route
        except grpc.RpcError as exc:
            _fail(exc)
    typer.echo(_route_line(r))
    for c in r.candidates:
        typer.echo(f"  {c.task_id:<24} v{c.version:<4} {c.score:.3f}")


@app.command()
def tasks(server: SERVER = DEFAULT_SERVER, task: Annotated[str | None, typer.Argument()] = None) -> None:
    """List the server's tasks, or print one task's card."""
    with _client(server) as client:
        try:
            if task:
                typer.echo(json.dumps(json.loads(client.get_task(task).card_json), indent=2))
                return
            for t in client.list_tasks():
                residency = cit_pb2.Residency.Name(t.residency).removeprefix("RESIDENCY_").lower()
                typer.echo(f"{t.task_id:<24} v{t.version:<4} {t.adapter_kind:<6} {t.decision:<9} {residency:<9} "
                           f"{t.created_at}")
        except grpc.RpcError as exc:
            _fail(exc)


@app.command("reload-registry")
def reload_registry(server: SERVER = DEFAULT_SERVER) -> None:
    """Admin: make the server read its registry now (pass the admin token as --token)."""
    with _client(server) as client:
        try:
            r = client.reload_registry()
        except grpc.RpcError as exc:
            _fail(exc)
    typer.echo(f"{r.tasks} tasks routable" + (" (the registry had changed)" if r.changed else ""))


@app.command("change-task")
def change_task(
    task: str,
    change: Annotated[str, typer.Argument(help="retire, restore, rollback, promote or reject")],
    server: SERVER = DEFAULT_SERVER,
    version: Annotated[int | None, typer.Option(help="rollback: the version to serve (unset: the newest again); "
                                                     "promote: the candidate (unset: the newest); reject: required")] = None,
) -> None:
    """Admin: change which version of a task the server's registry serves (as cit-registry does on its machine)."""
    with _client(server) as client:
        try:
            r = client.change_task(task, change, version)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except grpc.RpcError as exc:
            _fail(exc)
    serving = f"v{r.serving_version}" if r.serving_version else "no version"
    typer.echo(f"{task}: {change} recorded; {serving} serves" if r.changed else f"{task}: nothing to change; {serving} serves")


@app.command()
def history(server: SERVER = DEFAULT_SERVER, task: Annotated[str | None, typer.Argument()] = None,
            limit: Annotated[int, typer.Option(help="the newest this many (0: all)")] = 0) -> None:
    """Admin: the server registry's history, oldest first, one JSON object a line."""
    with _client(server) as client:
        try:
            entries = client.history(task, limit)
        except grpc.RpcError as exc:
            _fail(exc)
    for e in entries:
        typer.echo(json.dumps({"at": e.at, "who": e.who, "action": e.action, "task": e.task_id or None,
                               "version": e.version if e.HasField("version") else None,
                               "detail": json.loads(e.detail_json or "{}")}))


@app.command()
def evaluate(
    task_dirs: Annotated[list[Path], typer.Argument(help="task directories with a test.jsonl")],
    server: SERVER = DEFAULT_SERVER,
    limit: Annotated[int | None, typer.Option(help="at most N test rows per task")] = None,
    predictions: Annotated[Path | None, typer.Option(help="write every request, answer, verdict and route "
                                                             "to this JSONL file")] = None,
    concurrency: Annotated[int, typer.Option(
        min=1, help="requests in flight (the server batches them)")] = EVALUATION_CONCURRENCY,
) -> None:
    """Send every held-out test row over gRPC; report routing and answer accuracy per task, and per instruction
    wording where the test file marks it (training wordings vs held-out ones)."""
    from contextlib import nullcontext

    from .evaluate import dataset_owners, evaluate_dataset

    with _client(server) as client, (open(predictions, "w") if predictions else nullcontext()) as out:
        try:
            owners = dataset_owners(client)
            for task_dir in task_dirs:
                s = evaluate_dataset(client, task_dir, limit, owners, out, concurrency)
                typer.echo(f"{s.dataset:<16} {s.requests:>4} requests  routed to {s.expected_task}: "
                           f"{s.routing_accuracy:6.1%}  answers correct: {s.answer_accuracy:6.1%}  served by {s.served_by}")
                for kind, t in s.by_template.items():
                    typer.echo(f"  {kind + ' wordings':<18} {t.requests:>4} requests  routed: {t.routing_accuracy:6.1%}  "
                               f"answers correct: {t.answer_accuracy:6.1%}")
                typer.echo(f"  misses: {s.errors['format']} format (the answer with more around it), "
                           f"{s.errors['knowledge']} knowledge (another answer)")
        except grpc.RpcError as exc:
            _fail(exc)


if __name__ == "__main__":
    app()
