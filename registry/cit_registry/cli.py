"""cit-registry: inspect a registry's tasks, their similarities and routes. Listing never imports torch."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .router import ROUTING_MARGIN, Router, background_questions, task_similarity, verify_index
from .store import BundleError, Registry, RegistryLocked, TaskNotFound
from .store import migrate as migrate_registry

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 200)  # piped output: no truncated tables
REGISTRY = Annotated[Path, typer.Option("--registry", "-r", envvar="CIT_REGISTRY", help="registry directory")]
DEFAULT_REGISTRY = Path("cit-registry")


def _open(path: Path) -> Registry:
    try:
        return Registry.open(path)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _rebuild_index(reg: Registry) -> None:
    """The routing index after a change, when nobody else is writing (else the next reader rebuilds it)."""
    with reg.writing_if_free() as free:
        if free:
            Router.build(reg).save(reg)
            console.print("routing index rebuilt")


@app.command("list")
def list_tasks(registry: REGISTRY = DEFAULT_REGISTRY) -> None:
    """One line per task: version, adapter kind, decision, and each data set it serves with its accuracy when
    trained and now (re-measured by a later add-task on the same test samples), creation time."""
    table = Table("task", "version", "adapter", "decision", "data sets: accuracy when trained -> now", "created")
    tasks = _open(registry).latest()
    remeasured = _remeasured(tasks)
    for t in tasks:
        c = t.card
        decision = c.decision.get("action", "")
        if decision == "reused":
            decision += f" ({c.decision.get('similarity', 0):.2f})"
        table.add_row(t.task_id, str(t.version), c.adapter_kind, decision,
                      "\n".join(f"{name} {_pct(then)} -> {_pct(now)}" for name, then, now in _accuracies(t, remeasured)),
                      c.created_at)
    console.print(table)


def _remeasured(tasks) -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """(task id, data set) -> every re-measurement of it written in a card, (card's creation time, measurement),
    oldest first: read once for the whole listing."""
    out: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for card in sorted((t.card for t in tasks), key=lambda c: c.created_at):
        for name, measured in card.metrics.get("forgetting", {}).items():
            if isinstance(measured, dict) and "task" in measured:
                out.setdefault((measured["task"], name), []).append((card.created_at, measured))
    return out


def _accuracies(task, remeasured) -> list[tuple[str, float | None, float | None]]:
    """(data set, accuracy when trained, accuracy now) for each data set the task's newest version serves. "Now" is
    the newest re-measurement of it with this version's adapter: the version's own (a reused adapter re-measures
    what it served before), or a later task's (a shared connector moves under every task of its method); each
    re-measurement is compared with the accuracy it had when trained on the same test samples. An earlier data
    set of a reused version that was not re-measured shows no "now"."""
    out = []
    for i, dataset in enumerate(task.card.datasets):
        name, then = dataset["name"], dataset.get("accuracy_after")
        now = then if i == len(task.card.datasets) - 1 else None  # trained in this version; else unmeasured so far
        for created, measured in remeasured.get((task.task_id, name), []):
            if created >= task.card.created_at:  # an older one measured an earlier version's adapter
                then, now = measured["when_trained"], measured["now"]
        out.append((name, then, now))
    return out


@app.command()
def show(task: str, registry: REGISTRY = DEFAULT_REGISTRY, version: int | None = None) -> None:
    """Print a task's card (task.json) and where its files are."""
    try:
        t = _open(registry).get(task, version)
    except TaskNotFound as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    typer.echo(t.card.to_json(), nl=False)  # plain JSON, never re-wrapped: scripts can parse it
    typer.echo(f"files: {t.path}")


@app.command()
def similarity(registry: REGISTRY = DEFAULT_REGISTRY, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The task-by-task similarity matrix (product of image, instruction and output key cosines)."""
    tasks = _open(registry).latest()
    keys = {t.task_id: t.key() for t in tasks}
    matrix = {a: {b: task_similarity(keys[a], keys[b])["score"] for b in keys} for a in keys}
    if as_json:
        typer.echo(json.dumps(matrix, indent=2))
        return
    table = Table("", *keys)
    for a in keys:
        table.add_row(a, *(f"{matrix[a][b]:.3f}" for b in keys))
    console.print(table)


@app.command()
def route(
    image: Path,
    instruction: str,
    registry: REGISTRY = DEFAULT_REGISTRY,
    top_k: int = 5,
    routing_margin: float = ROUTING_MARGIN,
    backbone: Annotated[Path | None, typer.Option(
        envvar="CIT_BACKBONE", help="the checkpoint directory the server runs with (default: cit's own)")] = None,
) -> None:
    """Route one request offline (no server): the server's own query (Backbone.routing_query) and rule (Router.route)."""
    from cit_backbone.backbone import Backbone
    from cit_backbone.embedder import TextEmbedder
    from cit_backbone.images import decode_image

    reg = _open(registry)
    img = decode_image(image.read_bytes())
    model, embedder = Backbone.load(backbone), TextEmbedder()
    query = model.routing_query(model.encode_images([img]), embedder.embed([instruction]))
    routing = Router.load(reg).route(query, embedder.embed(background_questions()), routing_margin, top_k)[0]
    if routing.chosen:
        console.print(f"-> {routing.chosen.task_id} v{routing.chosen.version}")
    else:
        nearer = f" ({routing.nearer})" if routing.nearer else ""
        assert routing.fell_back is not None  # a routing that chose no task says why
        console.print(f"-> base connector: {routing.fell_back.value}{nearer}")
    console.print(f"  {'task':<24} {'version':<5} {'score':>6}  image (floor)  instruction (floor)")
    for c in routing.candidates:
        console.print(f"  {c.task_id:<24} v{c.version:<4} {c.score:6.3f}  {c.image:.3f} ({c.image_floor:.2f})   "
                      f"{c.instruction:.3f} ({c.instruction_floor:.2f})")


@app.command()
def verify(registry: REGISTRY = DEFAULT_REGISTRY) -> None:
    """Check that every task version is whole (its manifest's hashes, its card, its fit to the registry's backbone)
    and that the routing index agrees with the store."""
    reg = _open(registry)
    problems = list(reg.verify()) + verify_index(reg)
    for p in problems:
        console.print(f"[red]problem:[/red] {p}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {len(reg.task_ids())} tasks, store and index agree")


@app.command()
def migrate(
    registry: REGISTRY = DEFAULT_REGISTRY,
    backbone_identity: Annotated[str | None, typer.Option(help="the backbone the tasks were trained on, recorded "
                                                           "(default: none; widths are recorded and checked anyway)")] = None,
) -> None:
    """Upgrade a registry written by an older cit to this cit's format, in place (see the format notes in
    docs/USAGE.md). Safe to run twice."""
    try:
        changed = migrate_registry(registry, backbone_identity, log=console.print)
    except (FileNotFoundError, ValueError, RegistryLocked) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    reg = Registry.open(registry)
    _rebuild_index(reg)
    console.print("migrated" if changed else f"{registry} is at the current format already")


@app.command("export")
def export_task(
    task: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle file to write (a tar)")],
    registry: REGISTRY = DEFAULT_REGISTRY,
    version: Annotated[int | None, typer.Option(help="version to export (default: the newest)")] = None,
) -> None:
    """Write one task version as a single bundle: adapter, key, card (metrics, lineage) and their sha256."""
    try:
        path = _open(registry).export_bundle(task, out, version)
    except TaskNotFound as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {path}")


@app.command("import")
def import_task(
    bundle: Path,
    registry: REGISTRY = DEFAULT_REGISTRY,
    name: Annotated[str | None, typer.Option(help="task id to import as (default: the bundle's)")] = None,
) -> None:
    """Add a bundle's task to this registry as the next version of its task id, after checking every hash."""
    reg = Registry.open(registry, create=True)
    try:
        t = reg.import_bundle(bundle, name)
    except (BundleError, RegistryLocked, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _rebuild_index(reg)
    console.print(f"imported {t.task_id} v{t.version} ({t.card.adapter_kind}) into {reg.root}")


if __name__ == "__main__":
    app()
