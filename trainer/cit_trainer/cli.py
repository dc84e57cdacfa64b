"""cit-trainer: export real tasks, train the base connector, add tasks to a registry."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cit_backbone.options import DEVICE_HELP, DTYPE_HELP
from cit_registry.router import REUSE_IMAGE_SHARE, REUSE_THRESHOLD
from cit_registry.snapshots import REPLAY_SAMPLES

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 200)  # piped output: no truncated tables
REGISTRY = Annotated[Path, typer.Option("--registry", "-r", envvar="CIT_REGISTRY", help="registry directory")]
DEFAULT_REGISTRY = Path("cit-registry")
DEVICE = Annotated[str, typer.Option(envvar="CIT_DEVICE", help=DEVICE_HELP)]
DTYPE = Annotated[str, typer.Option(envvar="CIT_DTYPE", help=DTYPE_HELP + " (recorded in the task card)")]


def _numerics(device: str, dtype: str):
    """--device / --dtype resolved, or a clear error and exit code 2."""
    from cit_backbone.numerics import Numerics

    try:
        return Numerics.resolve(device, dtype)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def prepare() -> None:
    """Convert the packaged LM to safetensors in the cache (once) and check every shipped weight loads."""
    from cit_backbone.backbone import Backbone
    from cit_backbone.embedder import TextEmbedder

    backbone = Backbone()
    backbone.base_connector()
    TextEmbedder()
    console.print("[green]backbone ready[/green]: vision tower, base connector, language model, text embedder")


@app.command()
def export(
    names: Annotated[list[str], typer.Argument(help="data sets: fashion-mnist digits easyvqa-shape easyvqa-color words fashion-footwear digits-parity words-first-letter printed-digits words-large drawn-shapes")],
    out: Annotated[Path, typer.Option(help="directory to write <name>/{train,test}.jsonl into")] = Path("tasks"),
    train: Annotated[int, typer.Option(help="training samples per task (fewer where the source has fewer)")] = 3000,
    test: Annotated[int, typer.Option(help="held-out test images per task, each written twice: with a training "
                                           "wording and a held-out one")] = 300,
    seed: int = 0,
) -> None:
    """Write real-data tasks in the uniform image-instruction-output JSONL format, with several instruction
    wordings per task: training rows use the training ones, test rows both (marked "template")."""
    from .data import export_task

    for name in names:
        try:
            path, written = export_task(name, out, train, test, seed)
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from None
        console.print(f"wrote {path}/train.jsonl ({written['train']} rows) and test.jsonl ({written['test']} rows)")


@app.command("import-llava")
def import_llava_cmd(
    data: Annotated[Path, typer.Argument(help="LLaVA / CoIN-style JSON (a list, or JSON lines): conversations, or image + question + answer")],
    images: Annotated[Path, typer.Option(help="the directory the records' image paths are relative to")],
    out: Annotated[Path, typer.Option(help="the task directory to write (train.jsonl, test.jsonl, images/)")],
    test: Annotated[Path | None, typer.Option(help="a separate test file in the same format (default: --test-fraction of the images)")] = None,
    test_fraction: Annotated[float, typer.Option(help="share of the images held out for test.jsonl when no --test is given")] = 0.1,
    seed: int = 0,
) -> None:
    """Turn LLaVA / CoIN-style instruction data into a cit task directory that add-task and bench read."""
    from .llava_import import import_llava

    try:
        report = import_llava(data, images, out, test, test_fraction, seed)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"wrote {out}: " + ", ".join(f"{split}.jsonl {n} rows" for split, n in report.rows.items()))
    for why, n in report.skipped.items():
        console.print(f"  {n} {why}")


@app.command("add-task")
def add_task_cmd(
    data: Annotated[Path, typer.Argument(help="task directory with train.jsonl [test.jsonl], or a JSONL file")],
    registry: REGISTRY = DEFAULT_REGISTRY,
    name: Annotated[str | None, typer.Option(help="task id; default: the data directory's name")] = None,
    threshold: Annotated[float, typer.Option(help="reuse the most similar task's adapter at this similarity or above")] = REUSE_THRESHOLD,
    image_share: Annotated[float, typer.Option(help="... and only when this share of the new training images clear that task's image floor (0: whatever the images)")] = REUSE_IMAGE_SHARE,
    method: Annotated[str, typer.Option(help="eproj (a projection per task), lora (projection + LoRA on the LM), or a method training one connector shared by all its tasks: seqft, ewc, mas, si, tir-ewc, tir-mas, tir-si, er, agem")] = "eproj",
    strength: Annotated[float, typer.Option(help="λ of ewc, mas, si and tir-*")] = 100.0,
    replay_fraction: Annotated[float, typer.Option(help="share of each task's samples kept in the registry for er and agem")] = 0.01,
    replay_samples: Annotated[int, typer.Option(help="training samples of this data set kept in the registry; when add-task reuses an adapter it trains on those of every data set the adapter serves beside the new data (0: keep and replay none)")] = REPLAY_SAMPLES,
    epochs: int = 3,
    batch_size: int = 16,
    lr: Annotated[float, typer.Option(help="peak learning rate of the one-cycle schedule")] = 1e-3,
    seed: int = 0,
    max_train: Annotated[int | None, typer.Option(help="use at most N training samples")] = None,
    max_eval: Annotated[int | None, typer.Option(help="evaluate on at most N test samples")] = 300,
    backbone: Annotated[Path | None, typer.Option(envvar="CIT_BACKBONE", help="a local Hugging Face checkpoint directory as the backbone (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, PaliGemma, BLIP-2, Idefics3 / SmolVLM) (default: cit's own); the server must use the same")] = None,
    max_forgetting: Annotated[float | None, typer.Option(help="points of accuracy the new version may lose on any data set its adapter already served (re-measured); more, and it is committed as a candidate that serves nothing until `cit-registry promote` (default: no gate)")] = None,
    device: DEVICE = "auto",
    dtype: DTYPE = "float32",
) -> None:
    """Add a task: reuse the most similar task's adapter, or expand with a new one; train it; report.

    Data-parallel: `accelerate launch --multi_gpu --num_processes N -m cit_trainer.cli add-task ...` (or torchrun)
    trains each step's rows across N processes, on N GPUs or, with --device cpu, CPU processes over gloo."""
    from cit_backbone.backbone import Backbone

    from .add_task import AddTaskOptions, add_task

    opts = AddTaskOptions(
        threshold=threshold, image_share=image_share, method=method, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, max_train=max_train, max_eval=max_eval, strength=strength, replay_fraction=replay_fraction,
        replay_samples=replay_samples, max_forgetting=max_forgetting,
    )
    from cit_registry.store import RegistryLocked

    from .parallel import launched

    try:
        ranks, numerics = launched(_numerics(device, dtype))
        result = add_task(registry, data, name, opts, backbone=Backbone.load(backbone, numerics), log=console.print,
                          ranks=ranks)
    except (ValueError, FileNotFoundError, RegistryLocked) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if result is None:  # a launched process other than the main one: its share of the training is done
        return
    t = result.task
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    console.print(f"\n[bold]{t.task_id} v{t.version}[/bold] ({result.action}): test accuracy "
                  f"{pct(result.accuracy_before)} before -> {pct(result.accuracy_after)} after training")
    for dataset, f in result.forgetting.items():
        console.print(f"  earlier data set {dataset}: {pct(f['when_trained'])} when trained, {pct(f['now'])} now")
    console.print(f"adapter written to {t.adapter_dir}" + (f", LoRA (PEFT format) to {t.lora_dir}" if t.lora_dir else ""))
    if t.candidate:
        console.print(f"[yellow]{t.task_id} v{t.version} is a candidate[/yellow] (forgetting {result.gate['forgetting']} "
                      f"points > {result.gate['max_forgetting']:g}): it serves nothing until "
                      f"`cit-registry promote {t.task_id} --version {t.version}`")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="directory for results.json, results.md, heatmaps and the task data")] = Path("bench-results"),
    preset: Annotated[str, typer.Option(help="small (all methods from one start in about 30 min on 2 cores; tasks not learnt) or full (2,000 samples x 3 epochs: every task learnt; hours)")] = "small",
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "seqft,ewc,tir-ewc,mas,tir-mas,si,tir-si,er,agem,eproj,lora,joint",
    tasks: Annotated[str, typer.Option(help="comma-separated task order")] = "fashion-mnist,digits,easyvqa-shape,easyvqa-color,words",
    shuffle: Annotated[bool, typer.Option(help="shuffle the task order with --seed")] = False,
    seed: int = 0,
    thresholds: Annotated[str, typer.Option(help="reuse thresholds to sweep for similarity-informed EProj ('' skips)")] = "0.1,0.2,0.4,0.6",
    starts: Annotated[str, typer.Option(help="starting connectors to run every method from: base (captions only), instruct (instruction-tuned); each adds the preset's time")] = "base",
    strength: Annotated[float, typer.Option(help="λ of ewc, mas, si and tir-* (importance in units of the first task's mean)")] = 100.0,
    replay_fraction: Annotated[float, typer.Option(help="share of each task's training samples er and agem keep (at least 8)")] = 0.01,
    seeds: Annotated[str, typer.Option(help="training seeds, comma-separated: one cell each (default: --seed); the data drawn is --seed's in every cell")] = "",
    orders: Annotated[str, typer.Option(help="order seeds, comma-separated: 0 is the order given, k > 0 that order shuffled with k")] = "0",
    resume: Annotated[bool, typer.Option(help="keep the cells already in --out/cells (same settings) and run the rest")] = False,
    device: DEVICE = "auto",
    dtype: DTYPE = "float32",
) -> None:
    """Run the continual-instruction-tuning benchmark: accuracy matrices, A_t, F_t, routing, a threshold sweep."""
    import random

    from .bench import run_benchmark

    order = _csv(tasks)
    if shuffle:
        random.Random(seed).shuffle(order)
    command = " ".join(["cit-trainer", "bench", *sys.argv[2:]]) if len(sys.argv) > 2 else "cit-trainer bench"
    try:
        run_benchmark(out, _csv(methods), tuple(order), preset, seed, [float(t) for t in _csv(thresholds)], command,
                      tuple(_csv(starts)), log=console.print, strength=strength, replay_fraction=replay_fraction,
                      seeds=tuple(int(s) for s in _csv(seeds)), orders=tuple(int(o) for o in _csv(orders)), resume=resume,
                      numerics=_numerics(device, dtype))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print((out / "results.md").read_text())
    console.print(f"written: {out}/results.json, results.md, heatmap-<start>-<method>.png")


@app.command("bench-report")
def bench_report(
    out: Annotated[Path, typer.Option(help="the --out of a benchmark run, finished or not")] = Path("bench-results"),
) -> None:
    """Build a benchmark's report from the cells it has written so far, and say which are missing."""
    from .bench import report_from_cells

    try:
        missing = report_from_cells(out)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print((out / "results.md").read_text())
    if missing:
        console.print(f"{len(missing)} cells missing: `cit-trainer bench --resume` with the same options runs them")


@app.command("routing-eval")
def routing_eval_cmd(
    work: Annotated[Path, typer.Option(help="directory for the tasks, registries, predictions and report (a stopped run resumes from it)")] = Path("routing-suite"),
    train: Annotated[int, typer.Option(help="exported training samples per task")] = 3000,
    test: Annotated[int, typer.Option(help="test images per task, each asked with a training and a held-out wording")] = 300,
    seed: int = 0,
    epochs: int = 3,
    tasks: Annotated[str, typer.Option(help="comma-separated suite tasks (default: all eleven)")] = "",
    reuse: Annotated[bool, typer.Option(help="run the reuse study (the longest part)")] = True,
    device: DEVICE = "auto",
    dtype: DTYPE = "float32",
) -> None:
    """The routing suite: routing and answers per task and wording over gRPC, fall-back for tasks not yet added,
    the confusion matrix, and the reuse study over pairs of graded similarity. Hours at the default sizes."""
    from .routing_eval import REUSE_PAIRS, SUITE_TASKS, SuiteOptions, run_suite

    opts = SuiteOptions(train=train, test=test, seed=seed, epochs=epochs,
                        tasks=tuple(_csv(tasks)) or SUITE_TASKS, pairs=REUSE_PAIRS if reuse else (),
                        numerics=_numerics(device, dtype))
    command = " ".join(["cit-trainer", "routing-eval", *sys.argv[2:]])
    try:
        run_suite(work, opts, command=command, log=console.print)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print((work / "report.md").read_text())
    console.print(f"written: {work}/report.json, report.md")


@app.command("train-base")
def train_base_cmd(
    mixture: Annotated[str, typer.Option(help="caption (the base connector) or instruct (the instruction-tuned one)")] = "caption",
    out: Annotated[Path | None, typer.Option(help="where to write the connector (default: the packaged one)")] = None,
    samples: int = 1000,
    epochs: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    device: DEVICE = "auto",
    dtype: DTYPE = "float32",
) -> None:
    """Train a starting connector: on easy-VQA captions (base) or captions + yes/no questions (instruct)."""
    from cit_backbone.paths import STARTING_CONNECTORS

    from .base import train_base
    from .data import MIXTURES

    if mixture not in MIXTURES:
        raise typer.BadParameter(f"unknown mixture {mixture!r}; choose from {', '.join(MIXTURES)}")
    default_out = STARTING_CONNECTORS["base" if mixture == "caption" else "instruct"]
    card = train_base(out or default_out, samples, epochs, lr, seed, mixture, _numerics(device, dtype))
    console.print(card)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
