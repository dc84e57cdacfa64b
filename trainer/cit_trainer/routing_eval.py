"""`cit-trainer routing-eval`: the routing suite. Does a request find its task however it is worded, fall back when
no task asks it, and does reuse cost the tasks an adapter already serves nothing?

Steps, each kept in the work directory and skipped when it is already there (a stopped run resumes):
1. export the suite's tasks (eleven real-data tasks, pairs of them sharing images or questions);
2. add them, one after the other, to one registry with `add-task`, each as a task of its own;
3. serve that registry with `cit-server` and send every test row over gRPC (`cit evaluate`'s own code):
   routing and answers per task and per wording kind, false fall-backs, the confusion matrix;
4. leave each task out in turn and route its test rows to the others (the server's Router, in process);
5. the reuse study: pairs of graded similarity, each second task added once reusing the first's adapter and once
   as a task of its own: how similar they score, whether the default threshold reuses, the paired drop of the first
   data set's accuracy, and the second's accuracy either way; then adapters saved against accuracy lost as the
   threshold moves.
The report goes to report.json and report.md in the work directory.
"""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.numerics import CPU_FLOAT32, Numerics
from cit_registry.router import REUSE_IMAGE_SHARE, REUSE_THRESHOLD, Router, Routing, background_questions
from cit_registry.store import Registry
from cit_registry.taskdata import TEMPLATE_KINDS, read_jsonl
from cit_server.process import ServerProcess

from .add_task import AddTaskOptions, add_task
from .data import PARAPHRASES, export_task
from .intervals import bootstrap
from .training import embed_task

SUITE_TASKS = ("fashion-mnist", "digits", "words", "easyvqa-shape", "easyvqa-color", "fashion-footwear",
               "digits-parity", "words-first-letter", "printed-digits", "words-large", "drawn-shapes")
ALL_ROWS = 10**6  # re-measure and evaluate whole test splits


class Grade(Enum):
    """How a second task relates to the first (issue 13's grades of similarity)."""

    REDRAW = "redraw"                                # the same task, new samples
    PARAPHRASE = "paraphrase"                        # the same task, new samples asked in new wordings
    NEW_QUESTION = "same images, new question"
    NEW_IMAGES = "same question, new images"
    UNRELATED = "unrelated"

    @property
    def should_reuse(self) -> bool:
        return self in (Grade.REDRAW, Grade.PARAPHRASE)


@dataclass(frozen=True)
class ReusePair:
    grade: Grade
    first: str   # a suite task
    second: str  # a suite task, or `first` drawn anew (redraw, paraphrase)

    @property
    def name(self) -> str:
        return f"{self.grade.name.lower()}-{self.first}-{self.second}"

    @property
    def second_dataset(self) -> str:
        """The second data set's name in the registry (a redrawn copy needs a name of its own)."""
        return f"{self.first}-{self.grade.value}" if self.second == self.first else self.second


REUSE_PAIRS = (
    *(ReusePair(Grade.REDRAW, t, t) for t in ("fashion-mnist", "digits", "words")),
    *(ReusePair(Grade.PARAPHRASE, t, t) for t in ("fashion-mnist", "digits", "words")),
    ReusePair(Grade.NEW_QUESTION, "fashion-mnist", "fashion-footwear"),
    ReusePair(Grade.NEW_QUESTION, "digits", "digits-parity"),
    ReusePair(Grade.NEW_QUESTION, "words", "words-first-letter"),
    ReusePair(Grade.NEW_QUESTION, "easyvqa-shape", "easyvqa-color"),
    ReusePair(Grade.NEW_IMAGES, "digits", "printed-digits"),
    ReusePair(Grade.NEW_IMAGES, "words", "words-large"),
    ReusePair(Grade.NEW_IMAGES, "easyvqa-shape", "drawn-shapes"),
    ReusePair(Grade.UNRELATED, "fashion-mnist", "words"),
    ReusePair(Grade.UNRELATED, "digits", "easyvqa-color"),
    ReusePair(Grade.UNRELATED, "easyvqa-shape", "words-first-letter"),
)
SWEEP = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # thresholds of the adapters-saved / accuracy-lost table
# The goals, checked in the report
HELD_OUT_ROUTING, HELD_OUT_GAP, LOTO_FALL_BACK, SEEN_FALL_BACK, REUSE_DROP = 0.98, 5.0, 0.90, 0.02, 2.0


@dataclass(frozen=True)
class SuiteOptions:
    train: int = 3000          # exported training samples per task (the export default)
    test: int = 300            # test images per task, each asked with a training and a held-out wording
    seed: int = 0
    epochs: int = 3            # add-task's default recipe otherwise
    tasks: tuple[str, ...] = SUITE_TASKS
    pairs: tuple[ReusePair, ...] = REUSE_PAIRS
    server_timeout: float = 600.0  # seconds for cit-server to start
    numerics: Numerics = CPU_FLOAT32  # add-task's and the server's alike


def paraphrased(task_dir: Path, wordings: list[str], seed: int) -> None:
    """Ask every row written with a training wording in one of `wordings` instead (held-out rows stay)."""
    rng = random.Random(seed)
    for split in ("train.jsonl", "test.jsonl"):
        path = task_dir / split
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "instruction": rng.choice(wordings)} if r.get("template") == "train"
                                           else r) + "\n" for r in rows))


def _exported(out: Path, name: str, opts: SuiteOptions, seed: int) -> Path:
    task_dir = out / name
    if not (task_dir / "test.jsonl").is_file():  # test.jsonl is written last
        export_task(name, out, opts.train, opts.test, seed)
    return task_dir


def _fell_back(routing: Routing) -> str:
    """Why a routing that chose no task fell back, as the report names it."""
    assert routing.fell_back is not None  # a routing chooses a task or says why not
    return routing.fell_back.name.lower()


def _quiet(*args, **kwargs) -> None:  # add-task's own log lines: the suite reports its steps itself
    pass


def _options(opts: SuiteOptions, threshold: float, **kw) -> AddTaskOptions:
    return AddTaskOptions(threshold=threshold, epochs=opts.epochs, seed=opts.seed, max_eval=None, **kw)


# ------------------------------------------------------------------ steps 1-2: the registry of every suite task

def build_registry(work: Path, opts: SuiteOptions, backbone: Backbone, embedder: TextEmbedder, log) -> Registry:
    registry = Registry.open(work / "registry", create=True)
    for name in opts.tasks:
        task_dir = _exported(work / "tasks", name, opts, opts.seed)
        if name not in registry.task_ids():
            log(f"[routing-eval] adding {name}")
            # a task of its own whatever it resembles (threshold 1): routing is judged task by task; the reuse
            # study measures what the threshold would have done. Expanded adapters leave earlier tasks as they were.
            add_task(registry.root, task_dir, name, _options(opts, 1.0, forgetting_samples=0), backbone, embedder,
                     log=_quiet)
    return registry


# ------------------------------------------------------------------ step 3: over gRPC

def evaluate_over_grpc(work: Path, opts: SuiteOptions, log) -> Path:
    from cit_client import CitClient
    from cit_client.evaluate import dataset_owners, evaluate_dataset

    predictions = work / "predictions.jsonl"
    if (work / "predictions.done").is_file():
        return predictions
    with ServerProcess(work / "registry", "--device", str(opts.numerics.device), "--dtype", opts.numerics.dtype_name,
                       timeout=opts.server_timeout) as server, CitClient(server.target) as client, \
            open(predictions, "w") as out:
        owners = dataset_owners(client)
        for name in opts.tasks:
            s = evaluate_dataset(client, work / "tasks" / name, None, owners, out)
            log(f"[routing-eval] {name}: routed {s.routing_accuracy:.1%}, answers {s.answer_accuracy:.1%} over gRPC")
    (work / "predictions.done").write_text("")
    return predictions


def routing_report(predictions: Path, tasks: tuple[str, ...]) -> dict:
    """Per data set and wording kind: routed to its own task, answered right, fell back; and the confusion matrix
    (rows: data sets, columns: the task that served, "(base)" where the request fell back)."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    per_task, confusion = {}, {}
    for name in tasks:
        own = [r for r in rows if r["dataset"] == name]
        confusion[name] = dict(Counter(r["task"] or "(base)" for r in own))
        kinds = {}
        for kind in TEMPLATE_KINDS:
            part = [r for r in own if r["template"] == kind]
            if part:
                kinds[kind] = {"requests": len(part),
                               "routed": sum(r["task"] == name for r in part) / len(part),
                               "correct": sum(r["verdict"] == "correct" for r in part) / len(part),
                               "fell_back": sum(r["task"] is None for r in part) / len(part),
                               "format_errors": sum(r["verdict"] == "format" for r in part)}
        per_task[name] = kinds
    return {"per_task": per_task, "confusion": confusion}


# ------------------------------------------------------------------ step 4: tasks not yet added

def leave_one_out(registry: Registry, opts: SuiteOptions, work: Path, backbone: Backbone,
                  embedder: TextEmbedder) -> dict:
    """Each task's test rows (both wording kinds) routed over the other tasks' keys: all should fall back."""
    keyed = [(t.task_id, t.version, t.key()) for t in registry.serving()]
    background = embedder.embed(background_questions())
    out = {}
    for name in opts.tasks:
        test = embed_task(backbone, embedder, read_jsonl(work / "tasks" / name / "test.jsonl"), f"{name} test")
        assert test.instruction is not None  # embedded with its instructions
        queries = backbone.routing_query(test.features, test.instruction)
        routings = Router.of_keys([k for k in keyed if k[0] != name]).route(queries, background)
        outcomes = Counter(f"-> {r.chosen.task_id}" if r.chosen else _fell_back(r) for r in routings)
        out[name] = {"requests": len(routings), "fell_back": sum(r.chosen is None for r in routings) / len(routings),
                     "outcomes": dict(outcomes.most_common())}
    return out


# ------------------------------------------------------------------ step 5: reuse

@dataclass
class ReuseOutcome:
    pair: str
    grade: str
    first: str
    second: str
    similarity: float
    image_share: float            # the second's training images inside the first's image floor
    default_action: str           # what add-task's defaults (REUSE_THRESHOLD, REUSE_IMAGE_SHARE) do with this pair
    expected_action: str          # what the grade calls for
    first_then: float             # the first data set, its whole test split: when trained
    first_now: float              # ... after the reuse
    drop: float                   # points, paired on the same rows
    drop_interval: tuple[float, float]
    second_reused: float          # the second data set's accuracy: trained into the reused adapter
    second_expanded: float        # ... trained as a task of its own
    rows: int = 0
    replayed: dict = field(default_factory=dict)


def _first_registry(work: Path, suite: Registry, first: str) -> Path:
    """A registry holding only the suite's own version of `first` (moved with export/import bundles)."""
    root = work / "reuse" / f"first-{first}"
    if not (root / "tasks" / first).is_dir():
        shutil.rmtree(root, ignore_errors=True)
        bundle = work / "reuse" / f"{first}.cit.tar"
        suite.export_bundle(first, bundle)
        Registry.open(root, create=True).import_bundle(bundle)
    return root


def _second_data(work: Path, pair: ReusePair, opts: SuiteOptions) -> Path:
    if pair.second != pair.first:
        return work / "tasks" / pair.second
    out = work / "reuse" / pair.name / "data"
    if pair.grade is Grade.REDRAW:
        return _exported(out, pair.first, opts, opts.seed + 100)
    task_dir = out / pair.first
    if not (task_dir / "paraphrased").is_file():
        export_task(pair.first, out, opts.train, opts.test, opts.seed + 200)
        paraphrased(task_dir, PARAPHRASES[pair.first], opts.seed)
        (task_dir / "paraphrased").write_text("")
    return task_dir


def reuse_pair(work: Path, pair: ReusePair, suite: Registry, opts: SuiteOptions, backbone: Backbone,
               embedder: TextEmbedder, log) -> ReuseOutcome:
    data = _second_data(work, pair, opts)
    reused = work / "reuse" / pair.name / "reused"
    if not (reused / "tasks" / pair.first / "v0002").is_dir():
        log(f"[routing-eval] reuse study {pair.name}: reusing")
        shutil.rmtree(reused, ignore_errors=True)
        shutil.copytree(_first_registry(work, suite, pair.first), reused)
        add_task(reused, data, pair.second_dataset, _options(opts, 0.0, image_share=0.0, forgetting_samples=ALL_ROWS),
                 backbone, embedder, log=_quiet)  # threshold 0, any images: always reuse
    card = Registry.open(reused).get(pair.first).card
    if pair.second in suite.task_ids():  # the suite trained it as a task of its own on the same data
        expanded = suite.get(pair.second).card.metrics["accuracy_after"]
    else:
        alone = work / "reuse" / pair.name / "expanded"
        if not Registry.open(alone, create=True).task_ids():
            log(f"[routing-eval] reuse study {pair.name}: a task of its own")
            add_task(alone, data, pair.second_dataset, _options(opts, 1.0), backbone, embedder, log=_quiet)
        expanded = Registry.open(alone).get(pair.second_dataset).card.metrics["accuracy_after"]
    measured = card.metrics["forgetting"][pair.first]
    then = np.array([c == "1" for c in card.datasets[0]["eval_correct"]], float)
    now = np.array([c == "1" for c in measured["now_correct"]], float)
    diffs = (then[: len(now)] - now) * 100
    similarity, share = card.decision["similarity"], card.decision["image_share"]
    return ReuseOutcome(
        pair.name, pair.grade.value, pair.first, pair.second_dataset, similarity, share,
        "reuse" if _reuses(similarity, share, REUSE_THRESHOLD) else "expand",
        "reuse" if pair.grade.should_reuse else "expand",
        float(then[: len(now)].mean()), float(now.mean()), float(diffs.mean()), bootstrap(diffs)[1:],
        card.metrics["accuracy_after"], expanded, len(now), card.training.get("replayed", {}))


def _reuses(similarity: float, share: float, threshold: float) -> bool:
    return similarity >= threshold and share >= REUSE_IMAGE_SHARE


def threshold_sweep(outcomes: list[ReuseOutcome]) -> list[dict]:
    """Adapters saved and accuracy lost if the threshold were t: a pair reuses when its similarity reaches t (and
    its images share reaches REUSE_IMAGE_SHARE), and
    then loses the first data set's drop and the second's shortfall against a task of its own (points, the mean of
    the two data sets; 0 for a pair that expands), averaged over all pairs."""
    table = []
    for t in SWEEP:
        reused = [o for o in outcomes if _reuses(o.similarity, o.image_share, t)]
        lost = [(o.drop + (o.second_expanded - o.second_reused) * 100) / 2 if o in reused else 0.0
                for o in outcomes]
        table.append({"threshold": t, "adapters_saved": len(reused), "pairs": len(outcomes),
                      "accuracy_lost": float(np.mean(lost)) if lost else 0.0,
                      "worst_drop_upper": max((o.drop_interval[1] for o in reused), default=None),
                      "wrong_decisions": sum((o in reused) != (o.expected_action == "reuse") for o in outcomes)})
    return table


# ------------------------------------------------------------------ the whole suite

def run_suite(work: Path, opts: SuiteOptions, backbone: Backbone | None = None, embedder: TextEmbedder | None = None,
              command: str = "cit-trainer routing-eval", log=print) -> dict:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    unknown = [t for t in opts.tasks if t not in SUITE_TASKS]
    if unknown:
        raise ValueError(f"unknown suite tasks {unknown}; choose from {', '.join(SUITE_TASKS)}")
    settings = work / "settings.json"
    mine = {"train": opts.train, "test": opts.test, "seed": opts.seed, "epochs": opts.epochs,
            "dtype": opts.numerics.dtype_name}
    # a run made before cit had a --dtype was float32
    if settings.is_file() and {"dtype": "float32", **json.loads(settings.read_text())} != mine:
        raise ValueError(f"{work} holds a run with other settings ({settings.read_text().strip()}): resume it with "
                         "those, or choose another --work")
    settings.write_text(json.dumps(mine) + "\n")
    backbone = backbone or Backbone(numerics=opts.numerics)
    embedder = embedder or TextEmbedder(str(opts.numerics.device))

    registry = build_registry(work, opts, backbone, embedder, log)
    report = {"command": command, "settings": mine, "tasks": list(opts.tasks),
              "similarities": {t.task_id: t.card.similarities for t in registry.serving()},
              **routing_report(evaluate_over_grpc(work, opts, log), opts.tasks),
              "leave_one_out": leave_one_out(registry, opts, work, backbone, embedder)}
    outcomes = [reuse_pair(work, p, registry, opts, backbone, embedder, log) for p in opts.pairs
                if p.first in opts.tasks and (p.second == p.first or p.second in opts.tasks)]
    report["reuse"] = [asdict(o) for o in outcomes]
    report["sweep"] = threshold_sweep(outcomes)
    report["goals"] = goals(report)
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (work / "report.md").write_text(render(report))
    return report


def goals(report: dict) -> dict[str, bool]:
    per_task = report["per_task"]
    both = [k for k, v in per_task.items() if {"train", "held-out"} <= set(v)]
    reused = [o for o in report["reuse"] if o["default_action"] == "reuse"]
    return {
        f"held-out wordings routed >= {HELD_OUT_ROUTING:.0%}, every task":
            all(per_task[t]["held-out"]["routed"] >= HELD_OUT_ROUTING for t in both),
        f"held-out answers within {HELD_OUT_GAP:g} points of training wordings, every task":
            all((per_task[t]["train"]["correct"] - per_task[t]["held-out"]["correct"]) * 100 <= HELD_OUT_GAP
                for t in both),
        f"tasks not yet added fall back >= {LOTO_FALL_BACK:.0%} (pooled)":
            _pooled(report["leave_one_out"].values(), "fell_back") >= LOTO_FALL_BACK,
        f"seen tasks fall back <= {SEEN_FALL_BACK:.0%} (pooled)":
            _pooled([k for v in per_task.values() for k in v.values()], "fell_back") <= SEEN_FALL_BACK,
        "the default threshold reuses redraw and paraphrase pairs, expands the rest":
            all(o["default_action"] == o["expected_action"] for o in report["reuse"]),
        f"where it reuses, the first data set's drop has an upper 95 % bound <= {REUSE_DROP:g} points":
            all(o["drop_interval"][1] <= REUSE_DROP for o in reused),
    }


def _pooled(parts, key: str) -> float:
    parts = list(parts)
    total = sum(p["requests"] for p in parts)
    return sum(p[key] * p["requests"] for p in parts) / total if total else 0.0


def render(report: dict) -> str:
    s = report["settings"]
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    lines = [f"# Routing suite: `{report['command']}`", "",
             f"{len(report['tasks'])} tasks, {s['train']} exported training samples and {s['test']} test images per "
             f"task (each asked with a training and a held-out wording), seed {s['seed']}, {s['epochs']} epochs, "
             "add-task's defaults otherwise. One seed: intervals below hold the test rows' noise only.", "",
             "## Routing and answers over gRPC, per task and wording kind", "",
             "| task | train: routed | answers | fell back | held-out: routed | answers | fell back | "
             "answer gap (points) | format misses (train / held-out) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, kinds in report["per_task"].items():
        tr, ho = kinds.get("train"), kinds.get("held-out")
        if not (tr and ho):
            continue
        lines.append(f"| {name} | {pct(tr['routed'])} | {pct(tr['correct'])} | {pct(tr['fell_back'])} | "
                     f"{pct(ho['routed'])} | {pct(ho['correct'])} | {pct(ho['fell_back'])} | "
                     f"{(tr['correct'] - ho['correct']) * 100:+.1f} | {tr['format_errors']} / {ho['format_errors']} |")
    for kind in TEMPLATE_KINDS:
        parts = [v[kind] for v in report["per_task"].values() if kind in v]
        lines.append(f"\n{kind} wordings, pooled: routed {pct(_pooled(parts, 'routed'))}, answers "
                     f"{pct(_pooled(parts, 'correct'))}, fell back {pct(_pooled(parts, 'fell_back'))}")
    served = sorted({t for row in report["confusion"].values() for t in row} - {"(base)"}) + ["(base)"]
    lines += ["", "## Confusion matrix (rows: test rows of a task, both wordings; columns: the task that served)", "",
              "| data set | " + " | ".join(served) + " |", "|---|" + "---|" * len(served)]
    for name, row in report["confusion"].items():
        lines.append(f"| {name} | " + " | ".join(str(row.get(t, "")) for t in served) + " |")
    lines += ["", "## Tasks not yet added (each left out in turn, its test rows routed over the other tasks' keys)",
              "", "| task left out | fell back | what happened |", "|---|---|---|"]
    for name, v in report["leave_one_out"].items():
        lines.append(f"| {name} | {pct(v['fell_back'])} | {', '.join(f'{k} {n}' for k, n in v['outcomes'].items())} |")
    lines.append(f"\npooled: {pct(_pooled(report['leave_one_out'].values(), 'fell_back'))} fell back")
    lines += ["", f"## Reuse study (default: similarity >= {REUSE_THRESHOLD} and >= {REUSE_IMAGE_SHARE:.0%} of the "
              "second's images inside the first's image floor)", "",
              "Each second task added twice: into the first's adapter (forced reuse, with the default replay of what "
              "it serves) and as a task of its own. Drop: the first data set's accuracy when trained minus after the "
              "reuse, paired on its whole test split, with a 95 % bootstrap interval over those rows.", "",
              "| grade | first | second | similarity | images inside | default | should | first: then | now | "
              "drop [95 %] | second: reused | own task |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in report["reuse"]:
        lo, hi = o["drop_interval"]
        lines.append(f"| {o['grade']} | {o['first']} | {o['second']} | {o['similarity']:.3f} | "
                     f"{pct(o['image_share'])} | {o['default_action']} "
                     f"| {o['expected_action']} | {pct(o['first_then'])} | {pct(o['first_now'])} | "
                     f"{o['drop']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {pct(o['second_reused'])} | "
                     f"{pct(o['second_expanded'])} |")
    lines += ["", "Adapters saved against accuracy lost as the threshold moves (lost: points, the mean of the pair's "
              "two data sets, 0 where it expands, averaged over all pairs):", "",
              "| threshold | adapters saved | accuracy lost | worst drop, upper bound | decisions against the grade |",
              "|---|---|---|---|---|"]
    for row in report["sweep"]:
        worst = "-" if row["worst_drop_upper"] is None else f"{row['worst_drop_upper']:+.1f}"
        lines.append(f"| {row['threshold']:g} | {row['adapters_saved']} of {row['pairs']} | "
                     f"{row['accuracy_lost']:.1f} | {worst} | {row['wrong_decisions']} |")
    lines += ["", "## Goals", ""] + [f"- {'met' if ok else 'MISSED'}: {goal}" for goal, ok in report["goals"].items()]
    return "\n".join(lines) + "\n"
