"""cit-registry: inspect a registry's tasks, their similarities and routes. Listing never imports torch."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .lifecycle import Change, diff_versions
from .router import ROUTING_MARGIN, Router, background_questions, task_similarity, verify_index
from .store import BundleError, Registry, RegistryLocked, TaskNotFound, TaskStatus
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
    """One line per task: the version that serves (and why, when it is not the newest), adapter kind, decision,
    and each data set it serves with its accuracy when trained and now (re-measured by a later add-task on the
    same test samples), creation time. Retired tasks are listed with the version they would serve."""
    table = Table("task", "serving", "adapter", "decision", "data sets: accuracy when trained -> now", "created")
    reg = _open(registry)
    shown = []
    for task_id in reg.task_ids():
        try:
            status = reg.status(task_id)
            version = reg.serving_version(task_id, retired_too=True)
            shown.append((status, reg.get(task_id, version) if version is not None else reg.newest(task_id)))
        except (OSError, ValueError) as exc:
            console.print(f"[red]{task_id}: cannot be read ({exc})[/red]")
    remeasured = _remeasured([t for _, t in shown])
    for status, t in shown:
        c = t.card
        decision = c.decision.get("action", "")
        if decision == "reused":
            decision += f" ({c.decision.get('similarity', 0):.2f})"
        table.add_row(t.task_id, _serving(status, t.version), c.adapter_kind, decision,
                      "\n".join(f"{name} {_pct(then)} -> {_pct(now)}" for name, then, now in _accuracies(t, remeasured)),
                      c.created_at)
    console.print(table)


def _serving(status: TaskStatus, shown: int) -> str:
    """The serving column: "v2", "v1 (rolled back; newest v3)", "retired (v2)", "none (candidate v1)"."""
    if status.retired:
        text = f"retired (v{shown})"
    elif status.serving is None:
        text = "none"
    else:
        text = f"v{status.serving}" + (f" (rolled back; newest v{status.versions[-1]})" if status.rolled_back else "")
    if status.candidates:
        text += f"\ncandidate v{', v'.join(map(str, status.candidates))}"
    return text


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
    reg = _open(registry)
    try:  # a retired task shows the version it would serve; one with only candidates, its newest
        version = version or reg.serving_version(task, retired_too=True)
        t = reg.get(task, version) if version is not None else reg.newest(task)
    except TaskNotFound as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    typer.echo(t.card.to_json(), nl=False)  # plain JSON, never re-wrapped: scripts can parse it
    typer.echo(f"files: {t.path}")


@app.command()
def similarity(registry: REGISTRY = DEFAULT_REGISTRY, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The task-by-task similarity matrix (product of image, instruction and output key cosines)."""
    tasks = _open(registry).serving()
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


def _changed(reg: Registry, change: Change | None, unchanged: str) -> None:
    if change is None:
        console.print(unchanged)
        return
    console.print(change.to_json(), markup=False, highlight=False)
    _rebuild_index(reg)


def _lifecycle_call(call):
    try:
        return call()
    except TaskNotFound as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except (ValueError, RegistryLocked) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def retire(task: str, registry: REGISTRY = DEFAULT_REGISTRY) -> None:
    """Take a task out of routing, deleting nothing (`restore` brings it back). A running server stops routing to
    it within its refresh interval."""
    reg = _open(registry)
    _changed(reg, _lifecycle_call(lambda: reg.retire(task)), f"{task} is retired already")


@app.command()
def restore(task: str, registry: REGISTRY = DEFAULT_REGISTRY) -> None:
    """Bring a retired task back into routing, at the version it served."""
    reg = _open(registry)
    _changed(reg, _lifecycle_call(lambda: reg.restore(task)), f"{task} is not retired")


@app.command()
def rollback(
    task: str,
    to: Annotated[str, typer.Option("--to", help="the version to serve, or 'latest' for the newest again")],
    registry: REGISTRY = DEFAULT_REGISTRY,
) -> None:
    """Serve an earlier version of a task until a newer version is committed or promoted (`--to latest`: the
    newest again)."""
    if to != "latest" and not to.isdigit():
        console.print(f"[red]error:[/red] --to takes a version number or 'latest', not {to!r}")
        raise typer.Exit(2)
    reg = _open(registry)
    version = None if to == "latest" else int(to)
    _changed(reg, _lifecycle_call(lambda: reg.rollback(task, version)),
             f"{task} serves {'its newest version' if version is None else f'v{version}'} already")


@app.command()
def promote(
    task: str,
    registry: REGISTRY = DEFAULT_REGISTRY,
    version: Annotated[int | None, typer.Option(help="the candidate to promote (default: the newest)")] = None,
) -> None:
    """Let a candidate version (committed by `add-task --max-forgetting`, gate not passed) serve."""
    reg = _open(registry)
    _changed(reg, _lifecycle_call(lambda: reg.promote(task, version)), "")


@app.command()
def reject(
    task: str,
    version: Annotated[int, typer.Option(help="the candidate to turn down")],
    registry: REGISTRY = DEFAULT_REGISTRY,
) -> None:
    """Turn a candidate version down for good: it never serves, and `gc` may remove it."""
    reg = _open(registry)
    _changed(reg, _lifecycle_call(lambda: reg.reject(task, version)), "")


@app.command()
def history(
    registry: REGISTRY = DEFAULT_REGISTRY,
    task: Annotated[str | None, typer.Option(help="only this task's changes")] = None,
) -> None:
    """Every change to the registry, oldest first, one JSON object a line: at, who, action, task, version, detail."""
    for change in _open(registry).history():
        if task is None or change.task == task:
            typer.echo(change.to_json())


@app.command()
def diff(
    task: str,
    from_version: Annotated[int, typer.Option("--from", help="the older version")],
    to_version: Annotated[int | None, typer.Option("--to", help="the newer version (default: the serving one, or the one a retired task would serve)")] = None,
    registry: REGISTRY = DEFAULT_REGISTRY,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What changed between two versions of a task: data sets, metrics, similarities, decision, training and
    adapter size."""
    reg = _open(registry)
    if to_version is None:  # the serving version, the one a retired task would serve, else its newest
        to_version = reg.serving_version(task, retired_too=True) or max(reg.versions(task), default=None)
    old, new = _lifecycle_call(lambda: (reg.get(task, from_version), reg.get(task, to_version)))
    changes = diff_versions(old, new)
    if as_json:
        typer.echo(json.dumps({"task": task, "from": old.version, "to": new.version, "changes": changes}, indent=2))
        return
    if not changes:
        console.print(f"{task} v{old.version} and v{new.version}: no differences")
        return
    table = Table("", f"v{old.version}", f"v{new.version}")
    for name, change in changes.items():
        table.add_row(name, *(_fact(change[side]) for side in ("from", "to")))
    console.print(table)


def _fact(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


@app.command()
def gc(
    keep: Annotated[int, typer.Option(help="newest versions of each task kept whole, serving or not")] = 3,
    registry: REGISTRY = DEFAULT_REGISTRY,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be removed, remove nothing")] = False,
) -> None:
    """Remove the task versions nothing needs: all but each task's --keep newest, its serving version and its
    candidates (adapters, replay and evaluation data go with their version). Recorded in the history."""
    reg = _open(registry)
    collected = _lifecycle_call(lambda: reg.gc(keep, dry_run))
    verb = "would remove" if dry_run else "removed"
    for task_id, versions in collected.removed.items():
        console.print(f"{task_id}: {verb} v{', v'.join(map(str, versions))}")
    console.print(f"{verb} {sum(map(len, collected.removed.values()))} versions, {collected.bytes} bytes")


@app.command("export")
def export_task(
    task: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle file to write (a tar)")],
    registry: REGISTRY = DEFAULT_REGISTRY,
    version: Annotated[int | None, typer.Option(help="version to export (default: the serving one)")] = None,
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
