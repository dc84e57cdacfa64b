"""The continual-instruction-tuning benchmark of He et al. (arXiv 2311.16206) on real data, on a CPU.

Tasks are learned one after another; after each stage every task seen so far (and the next one, zero-shot) is
evaluated, giving each method an accuracy matrix acc[stage, task]. From it:

    A_t = mean over tasks j <= t of acc[t, j]                               (average accuracy)
    F_t = mean over tasks j < t of (max over stages l in [j, t-1] of acc[l, j]) - acc[t, j]   (forgetting)

EProj and LoRA (and the similarity-informed variant with a reuse threshold) route each test request through a FAISS
index of task keys exactly as the server does, so their accuracy includes routing mistakes.

A run is a grid of cells, start x order x training seed x method, over one data draw (`seed`: which samples, the
same test samples in every cell, so cells compare paired). Order 0 is the order given; order k > 0 that order
shuffled by random.Random(k). Each cell's result is written atomically to <out>/cells/ as it finishes; `resume`
skips the cells found there, and the report is built from whatever cells exist, saying which are missing.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cit_backbone.adapters import TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.numerics import CPU_FLOAT32, Numerics, cpu_flags
from cit_registry.router import Router, background_questions, task_similarity
from cit_registry.store import TaskKey, atomic_path
from cit_registry.taskdata import read_jsonl

from .data import export_task
from .intervals import bootstrap
from .methods import METHODS, SHARED_METHODS, make_method
from .training import EmbeddedTask, embed_task, evaluate, train_connector

BOOTSTRAP_ROUNDS = 2000  # resamples per interval (cells are few; the routing suite resamples rows 10,000 times)
DEFAULT_ORDER = ("fashion-mnist", "digits", "easyvqa-shape", "easyvqa-color", "words")


@dataclass(frozen=True)
class Preset:
    train: int    # training samples per task
    test: int     # held-out samples per task
    epochs: int


# small: every method from one starting point in about 30 minutes on 2 cores (measured: docs/USAGE.md); its tasks
# are not learnt. full: where EProj reaches >= 80 % of the default add-task recipe on every task, by measurement
# (docs/bench/budget/budget.txt: words needs 2,000 x 3; at 1,000 x 3 it reached 44 %)
PRESETS = {"small": Preset(train=128, test=60, epochs=2), "full": Preset(train=2000, test=300, epochs=3)}


@dataclass
class MethodResult:
    method: str
    start: str                           # starting connector: "base" (captions) or "instruct" (instruction-tuned)
    accuracy: list[list[float | None]]   # [stage][task]: None where not evaluated
    average_accuracy: list[float]        # A_t per stage
    forgetting: list[float]              # F_t per stage (0 at stage 1)
    routing_accuracy: list[float | None] = field(default_factory=list)  # per stage, routed methods only
    adapters: int = 1
    trainable_parameters: int = 0
    seconds: float = 0.0
    seed: int = 0                        # training seed of the cell
    order: int = 0                       # order seed of the cell (0: the order given)
    tasks: list[str] = field(default_factory=list)  # the cell's task order
    learning_accuracy: float = 0.0       # mean of each task's accuracy right after its own stage
    backward_transfer: float = 0.0       # BWT: mean over earlier tasks of (final - right after its stage)
    forward_transfer: float | None = None  # FWT: mean over later tasks of (zero-shot before its stage - start's)
    start_accuracy: list[float] = field(default_factory=list)  # the starting connector's accuracy per task


def metrics(acc: np.ndarray) -> tuple[list[float], list[float]]:
    """A_t and F_t from an accuracy matrix acc[stage, task] (NaN where not evaluated)."""
    stages = acc.shape[0]
    average = [float(np.mean(acc[t, : t + 1])) for t in range(stages)]
    forgetting = [0.0 if t == 0 else float(np.mean([acc[j:t, j].max() - acc[t, j] for j in range(t)]))
                  for t in range(stages)]
    return average, forgetting


def transfer(acc: np.ndarray, start: list[float] | None) -> tuple[float, float, float | None]:
    """Learning accuracy, BWT and FWT (Lopez-Paz & Ranzato 2017) from acc[stage, task], where acc[t - 1, t] is task
    t's zero-shot accuracy before its own stage and `start` the starting connector's accuracy on each task (None:
    not measured, no FWT)."""
    stages = acc.shape[0]
    learning = float(np.mean([acc[t, t] for t in range(stages)]))
    backward = float(np.mean([acc[-1, j] - acc[j, j] for j in range(stages - 1)])) if stages > 1 else 0.0
    forward = float(np.mean([acc[t - 1, t] - start[t] for t in range(1, stages)])) \
        if start is not None and stages > 1 else None
    return learning, backward, forward


class Bench:
    """Embedded tasks and the shared backbone, reused by every method of one run."""

    def __init__(self, out: Path, order: tuple[str, ...], preset: Preset, seed: int, log=print,
                 strength: float = 100.0, replay_fraction: float = 0.01, numerics: Numerics = CPU_FLOAT32) -> None:
        self.out, self.order, self.preset, self.seed, self.log = Path(out), order, preset, seed, log
        self.strength, self.replay_fraction = strength, replay_fraction  # λ; the replay buffer's share of a task
        self.backbone = Backbone(numerics=numerics)
        self.embedder = TextEmbedder(str(numerics.device))
        self.background = self.embedder.embed(background_questions())
        self.use_start("base")
        self.train: list[EmbeddedTask] = []
        self.test: list[EmbeddedTask] = []
        for name in order:
            task_dir, _ = export_task(name, self.out / "tasks", preset.train, preset.test, seed)
            self.train.append(embed_task(self.backbone, self.embedder, read_jsonl(task_dir / "train.jsonl"), f"{name} train"))
            self.test.append(embed_task(self.backbone, self.embedder, read_jsonl(task_dir / "test.jsonl"), f"{name} test"))
        self.keys = [t.key() for t in self.train]
        self._embedded = {name: (tr, te, k) for name, tr, te, k in zip(order, self.train, self.test, self.keys)}
        self.order_seed = 0

    def use_cell(self, order: int, seed: int) -> None:
        """Tasks in order seed `order` (0: as given), trained with seed `seed`; the embedded data is the same."""
        names = list(permuted(tuple(self._embedded), order))
        self.order, self.order_seed, self.seed = tuple(names), order, seed
        self.train = [self._embedded[n][0] for n in names]
        self.test = [self._embedded[n][1] for n in names]
        self.keys = [self._embedded[n][2] for n in names]
        self._routed.clear()

    def use_start(self, start: str) -> None:
        """Every method from now on starts from clones of this starting connector (read once)."""
        self.start, self.base = start, self.backbone.base_connector(start)
        self._start_scores: dict[tuple, list[float]] = getattr(self, "_start_scores", {})
        # routed runs, with their predictions, by (adapter of each task, lora, final only)
        self._routed: dict[tuple, tuple[MethodResult, list[dict]]] = {}
        self.predictions: list[dict] = []

    def fit(self, adapter: TaskAdapter, task: EmbeddedTask, desc: str, method=None) -> None:
        train_connector(self.backbone, adapter.connector, task, self.preset.epochs, seed=self.seed, desc=desc,
                        method=method, lora=adapter.lora)

    def score(self, adapter: TaskAdapter, j: int, stage: int | None = None) -> float:
        """Accuracy of task j; with `stage`, its predictions are kept for the cell."""
        evaluation = evaluate(self.backbone, adapter, self.test[j], desc=f"evaluating {self.order[j]}")
        if stage is not None:
            self._keep(stage, j, range(len(evaluation.correct)), evaluation)
        return evaluation.accuracy

    def _keep(self, stage: int, j: int, rows, evaluation, routed_to: int | None = None) -> None:
        """One evaluation's predictions, row by row (rows: indices into task j's test set)."""
        for row, prediction, verdict in zip(rows, evaluation.predictions, evaluation.verdicts):
            self.predictions.append({"stage": stage, "task": self.order[j], "row": row, "prediction": prediction,
                                     "verdict": verdict.value, **({"adapter": routed_to} if routed_to is not None else {})})

    # ---------------------------------------------------------------------------------- one method

    def run(self, method: str) -> MethodResult:
        """One method through the task order; its predictions at every stage are in self.predictions after."""
        self.predictions = []
        torch.manual_seed(self.seed)
        start = time.time()
        if method in ("eproj", "lora"):
            result = self._run_routed(threshold=math.inf, lora=method == "lora")
        elif method == "joint":
            result = self._run_joint()
        elif method in SHARED_METHODS:
            result = self._run_shared(method)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        result.seconds = round(time.time() - start, 1)
        self.log(f"{method} (from {self.start}): A_T {result.average_accuracy[-1]:.1%}, F_T {result.forgetting[-1]:.1%}, "
                 f"{result.adapters} adapter(s), {result.seconds:.0f} s")
        return result

    def _matrix(self) -> np.ndarray:
        return np.full((len(self.order), len(self.order)), np.nan)

    def start_accuracy(self) -> list[float]:
        """The starting connector's accuracy on each task in this order, measured once per start and order (FWT's
        reference)."""
        if (self.start, self.order) not in self._start_scores:
            self._start_scores[self.start, self.order] = [self.score(TaskAdapter(self.base), j)
                                                          for j in range(len(self.order))]
        return self._start_scores[self.start, self.order]

    def _result(self, name: str, acc: np.ndarray, adapters: int, routing=None, lora_params: int = 0) -> MethodResult:
        average, forgetting = metrics(acc)
        start = self.start_accuracy()
        learning, backward, forward = transfer(acc, start)
        params = (sum(p.numel() for p in self.base.parameters()) + lora_params) * adapters
        rows = [[None if np.isnan(v) else float(v) for v in row] for row in acc]
        return MethodResult(name, self.start, rows, average, forgetting, routing or [], adapters, params,
                            seed=self.seed, order=self.order_seed, tasks=list(self.order),
                            learning_accuracy=learning, backward_transfer=backward, forward_transfer=forward,
                            start_accuracy=start)

    def _run_shared(self, name: str) -> MethodResult:
        adapter, acc = TaskAdapter(self.base.clone()), self._matrix()
        method = make_method(name, self.strength, self.replay_fraction)
        for t in range(len(self.order)):
            self.fit(adapter, self.train[t], f"{name}: {self.order[t]}", method)
            for j in range(min(t + 2, len(self.order))):  # seen tasks and the next one, zero-shot
                acc[t, j] = self.score(adapter, j, t)
        return self._result(name, acc, adapters=1)

    def _run_joint(self) -> MethodResult:
        acc = self._matrix()
        for t in range(len(self.order)):
            seen = self.train[: t + 1]  # multi-task training from the start on every task so far: the upper bound
            mixed = EmbeddedTask([s for task in seen for s in task.samples], torch.cat([task.features for task in seen]),
                                 None, None)
            adapter = TaskAdapter(self.base.clone())
            self.fit(adapter, mixed, f"joint: {t + 1} task(s)")
            for j in range(min(t + 2, len(self.order))):
                acc[t, j] = self.score(adapter, j, t)
        return self._result("joint", acc, adapters=1)

    def _assign(self, threshold: float) -> list[int]:
        """Adapter of each task in order: the most similar earlier adapter at similarity >= threshold, else new."""
        owner_keys: list[TaskKey] = []
        owner_of: list[int] = []
        for key in self.keys:
            sims = [task_similarity(key, k)["score"] for k in owner_keys]
            best = int(np.argmax(sims)) if sims else None
            if best is not None and sims[best] >= threshold:
                owner_keys[best] = owner_keys[best].merged(key)
                owner_of.append(best)
            else:
                owner_keys.append(key)
                owner_of.append(len(owner_keys) - 1)
        return owner_of

    def _run_routed(self, threshold: float, lora: bool = False, final_only: bool = False) -> MethodResult:
        """EProj (or LoRA): an adapter per task, or the most similar task's, reused at similarity >= threshold.
        Thresholds that assign tasks to adapters alike train alike: such runs are done once."""
        owner_of = self._assign(threshold)
        name = ("lora" if lora else "eproj") + ("" if math.isinf(threshold) else f"@{threshold:g}")
        for done in ((tuple(owner_of), lora, False), (tuple(owner_of), lora, final_only)):
            if done in self._routed:
                result, self.predictions = self._routed[done]
                return replace(result, method=name)
        adapters: list[TaskAdapter] = []
        acc, routing = self._matrix(), []
        try:
            for t in range(len(self.order)):
                if owner_of[t] == len(adapters):
                    if lora:
                        self.backbone.lm.loras.add(f"bench-{t}")
                    adapters.append(TaskAdapter(self.base.clone(), f"bench-{t}" if lora else None))
                adapter = adapters[owner_of[t]]
                if adapter.lora:
                    self.backbone.lm.loras.set_trainable(adapter.lora, True)
                self.fit(adapter, self.train[t], f"{name}: {self.order[t]}")
                if adapter.lora:
                    self.backbone.lm.loras.set_trainable(adapter.lora, False)
                if final_only and t < len(self.order) - 1:
                    continue
                seen = sorted(set(owner_of[: t + 1]))
                keys = [self._owner_key(a, owner_of[: t + 1]) for a in seen]
                router = self._router(keys, seen)
                routed = []
                for j in range(min(t + 2, len(self.order))):
                    acc[t, j], share = self._routed_score(router, adapters, j, owner_of[j] if j <= t else None, t)
                    if j <= t:
                        routed.append(share)
                routing.append(float(np.mean(routed)))
            lora_params = 0
            if lora:  # every task's adapter carries a LoRA of the same shape
                assert adapters[0].lora is not None
                lora_params = sum(p.numel() for p in self.backbone.lm.loras.parameters(adapters[0].lora))
        finally:
            for adapter in adapters:
                self.backbone.unload_adapter(adapter)
        result = self._result(name, acc, adapters=len(adapters), routing=routing, lora_params=lora_params)
        self._routed[(tuple(owner_of), lora, final_only)] = (result, list(self.predictions))
        return result

    def _owner_key(self, adapter: int, owner_of: list[int]) -> TaskKey:
        """The routing key of an adapter: its tasks' keys merged, as a reused registry task keeps them."""
        keys = [self.keys[t] for t, a in enumerate(owner_of) if a == adapter]
        merged = keys[0]
        for k in keys[1:]:
            merged = merged.merged(k)
        return merged

    @staticmethod
    def _router(keys: list[TaskKey], ids: list[int]) -> Router:
        return Router.of_keys([(str(i), 1, k) for i, k in zip(ids, keys)])

    def _routed_score(self, router: Router, adapters: list[TaskAdapter], j: int, own: int | None,
                      stage: int) -> tuple[float, float]:
        """Accuracy of task j's test set when each request is routed as the server routes it, and the share of
        requests routed to the task's own adapter: over the rows asked with held-out wordings where the test file
        marks them (a training wording's cosine to its own key is near 1 by construction)."""
        test = self.test[j]
        assert test.instruction is not None  # test sets are embedded with their instructions
        query = self.backbone.routing_query(test.features, test.instruction)
        routings = router.route(query, self.background)
        routed_to = [int(r.chosen.task_id) if r.chosen else -1 for r in routings]  # -1: the base connector answers
        correct = np.zeros(len(routed_to), dtype=bool)
        for a in set(routed_to):
            rows = [i for i, x in enumerate(routed_to) if x == a]
            adapter = adapters[a] if a >= 0 else TaskAdapter(self.base)
            subset = EmbeddedTask([test.samples[i] for i in rows], test.features[rows], None, None)
            evaluation = evaluate(self.backbone, adapter, subset, desc=f"evaluating {self.order[j]}")
            correct[rows] = evaluation.correct
            self._keep(stage, j, rows, evaluation, routed_to=a)
        held_out = [i for i, s in enumerate(test.samples) if s.template == "held-out"] or range(len(routed_to))
        own_share = float(np.mean([routed_to[i] == own for i in held_out])) if own is not None else 0.0
        return float(correct.mean()), own_share

    def threshold_sweep(self, thresholds: list[float]) -> list[dict]:
        """Similarity-informed EProj: adapters created and final average accuracy as the reuse threshold moves."""
        out = []
        for threshold in thresholds:
            r = self._run_routed(threshold, final_only=True)
            out.append({"threshold": threshold, "adapters": r.adapters, "final_average_accuracy": r.average_accuracy[-1]})
            self.log(f"threshold {threshold:g}: {r.adapters} adapter(s), A_T {r.average_accuracy[-1]:.1%}")
        return out


# -------------------------------------------------------------------------------------- the report


def write_report(out: Path, order: tuple[str, ...], results: list[MethodResult], sweep: list[dict], config: dict) -> None:
    """results.json (every cell, the summary, the paired claims, the cells missing from the grid asked for),
    results.md and one heatmap per start and method (the mean matrix of its cells in the order given)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[MethodResult]] = {}
    for r in results:
        groups.setdefault((r.start, r.method), []).append(r)
    measures = {"A_T": lambda r: r.average_accuracy[-1], "F_T": lambda r: r.forgetting[-1],
                "learning": lambda r: r.learning_accuracy, "BWT": lambda r: r.backward_transfer,
                "FWT": lambda r: r.forward_transfer}
    stats = {group: {k: bootstrap([v for r in rs if (v := f(r)) is not None], BOOTSTRAP_ROUNDS) for k, f in measures.items()}
             for group, rs in groups.items()}
    summary = [{"start": st, "method": m, "cells": len(groups[st, m]), **stats[st, m]} for st, m in groups]
    grid = grid_cells(config)
    present = {cell_name(r.start, r.order, r.seed, r.method) for r in results}
    missing = [cell for cell in grid if cell not in present]
    claims = paired_differences(results)
    payload = {"config": config, "tasks": list(order), "summary": summary, "paired": claims, "missing": missing,
               "methods": [asdict(r) for r in results], "threshold_sweep": sweep}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")

    pct = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"  # noqa: E731

    def interval(m: tuple[float, float, float]) -> str:
        return pct(m[0]) if m[1] == m[2] else f"{pct(m[0])} [{pct(m[1])}, {pct(m[2])}]"

    lines = [f"Tasks, in order (order 0): {', '.join(order)}. Command: `{config['command']}`", "",
             "Per start and method, the mean over cells (orders x training seeds) with its 95 % bootstrap interval:", "",
             "| start | method | cells | A_T | F_T | learning acc. | BWT | FWT |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {st} | {m} | {len(groups[st, m])} | " + " | ".join(interval(stats[st, m][k]) for k in measures) + " |"
              for st, m in groups]
    if claims:
        lines += ["", "Paired claims (A_T difference over the cells both share: same start, order and seed):", "",
                  "| claim | cells | difference |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {c['cells']} | {interval((c['mean'], c['low'], c['high']))} |" for c in claims]
    lines += ["", "Cells:", "",
              "| start | order | seed | method | A_T | F_T | learning acc. | BWT | FWT | routing (own adapter) | adapters | "
              "trainable params | wall time |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        routing = pct(r.routing_accuracy[-1]) if r.routing_accuracy else "–"
        lines.append(f"| {r.start} | {r.order} | {r.seed} | {r.method} | {pct(r.average_accuracy[-1])} | "
                     f"{pct(r.forgetting[-1])} | {pct(r.learning_accuracy)} | {pct(r.backward_transfer)} | "
                     f"{pct(r.forward_transfer)} | {routing} | {r.adapters} | {r.trainable_parameters:,} | "
                     f"{r.seconds:.0f} s |")
    if missing:
        lines += ["", f"Missing cells ({len(missing)} of {len(grid)}; `--resume` runs them): {', '.join(missing)}"]
    if sweep:
        lines += ["", f"Reuse threshold sweep (similarity-informed EProj, from {config['starts'][0]}, first order and "
                  "seed):", "", "| threshold | adapters | A_T |", "|---|---|---|"]
        lines += [f"| {s['threshold']:g} | {s['adapters']} | {pct(s['final_average_accuracy'])} |" for s in sweep]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    for (start, method), rs in groups.items():
        given = [r for r in rs if r.order == 0] or rs[:1]  # matrices line up in one order only
        with warnings.catch_warnings():  # entries no cell evaluated stay NaN (blank)
            warnings.simplefilter("ignore", RuntimeWarning)
            acc = np.nanmean([[[np.nan if v is None else 100 * v for v in row] for row in r.accuracy] for r in given], 0)
        names = given[0].tasks or list(order)
        fig, ax = plt.subplots(figsize=(6, 4.8))
        image = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
        ax.set_title(f"{method} from {start}: accuracy (%), mean of {len(given)} cell(s)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"heatmap-{start}-{method}.png", dpi=100)
        plt.close(fig)


def run_benchmark(out: Path, methods: list[str], order: tuple[str, ...], preset: str | Preset, seed: int,
                  thresholds: list[float], command: str, starts: tuple[str, ...] = ("base",),
                  log=print, strength: float = 100.0, replay_fraction: float = 0.01,
                  seeds: tuple[int, ...] | None = None, orders: tuple[int, ...] = (0,),
                  resume: bool = False, numerics: Numerics = CPU_FLOAT32) -> list[MethodResult]:
    """Every cell start x order x training seed (`seeds`, default: `seed`) x method, over the data drawn with
    `seed`; each cell written to <out>/cells/ as it finishes (`resume`: cells found there are not run again)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(order)) != len(order) or len(order) < 2:
        raise ValueError("the task order needs at least two distinct tasks")
    seeds = tuple(seeds) if seeds else (seed,)
    if any(o < 0 for o in orders) or not orders:
        raise ValueError("order seeds are integers >= 0 (0: the order given)")
    orders = _distinct_orders(order, orders, log)
    random.seed(seed)
    np.random.seed(seed)
    from cit_backbone.paths import STARTING_CONNECTORS

    if not starts or any(s not in STARTING_CONNECTORS for s in starts):
        raise ValueError(f"starting points must be among {', '.join(STARTING_CONNECTORS)}, got {', '.join(starts)}")
    out = Path(out)
    settings = {**asdict(preset), "data_seed": seed, "tasks": list(order), "thresholds": list(thresholds),
                "strength": strength, "replay_fraction": replay_fraction, "dtype": numerics.dtype_name}
    cells_dir = out / "cells"
    if resume and (cells_dir / "settings.json").exists():
        made = json.loads((cells_dir / "settings.json").read_text())
        made.setdefault("dtype", "float32")  # cells made before cit had a --dtype were float32
        if made != settings:
            raise ValueError(f"the cells in {cells_dir} were made with other settings ({made}); use another --out "
                             "or run without --resume")
    elif cells_dir.exists():
        shutil.rmtree(cells_dir)  # a fresh run: no cell of an earlier one is mixed in
    cells_dir.mkdir(parents=True, exist_ok=True)
    _write_file(cells_dir / "settings.json", json.dumps(settings, indent=2) + "\n")
    config = {"command": command, **asdict(preset), "seed": seed, "seeds": list(seeds), "orders": list(orders),
              "methods": methods, "starts": list(starts), "strength": strength, "replay_fraction": replay_fraction,
              "tasks": list(order), "numerics": numerics.describe(), "environment": environment()}
    _write_file(cells_dir / "grid.json", json.dumps(config, indent=2) + "\n")  # what report_from_cells expects
    bench = Bench(out, order, preset, seed, log, strength, replay_fraction, numerics)
    results: list[MethodResult] = []
    for start in starts:
        bench.use_start(start)
        for o in orders:
            for s in seeds:
                bench.use_cell(o, s)
                for m in methods:
                    cell = cells_dir / f"{cell_name(start, o, s, m)}.json"
                    if resume and cell.exists():
                        results.append(MethodResult(**json.loads(cell.read_text())))
                        log(f"cell {cell.stem}: done before, kept")
                        continue
                    results.append(bench.run(m))
                    _write_file(cell.with_suffix(".predictions.jsonl"),  # first: a cell file means a whole cell
                                  "".join(json.dumps(p) + "\n" for p in bench.predictions))
                    _write_file(cell, json.dumps(asdict(results[-1]), indent=2) + "\n")
    sweep_file = cells_dir / "threshold-sweep.json"
    sweep: list[dict] = json.loads(sweep_file.read_text()) if resume and sweep_file.exists() else []
    if thresholds and not sweep:  # from the first start, order and seed only
        bench.use_start(starts[0])
        bench.use_cell(orders[0], seeds[0])
        sweep = bench.threshold_sweep(thresholds)
        _write_file(sweep_file, json.dumps(sweep, indent=2) + "\n")
    write_report(out, order, results, sweep, config)
    return results


def report_from_cells(out: Path) -> list[str]:
    """The report of whatever cells <out>/cells holds (a run stopped midway included); the cells missing."""
    cells_dir = Path(out) / "cells"
    if not (cells_dir / "grid.json").exists():
        raise ValueError(f"{cells_dir} holds no benchmark cells")
    config = json.loads((cells_dir / "grid.json").read_text())
    grid = set(grid_cells(config))  # cells of an earlier grid in the same directory are not this run's
    results = [MethodResult(**json.loads(f.read_text())) for f in sorted(cells_dir.glob("*-o*-s*-*.json"))
               if f.stem in grid]
    sweep_file = cells_dir / "threshold-sweep.json"
    sweep = json.loads(sweep_file.read_text()) if sweep_file.exists() else []
    write_report(Path(out), tuple(config["tasks"]), results, sweep, config)
    return json.loads((Path(out) / "results.json").read_text())["missing"]


def cell_name(start: str, order: int, seed: int, method: str) -> str:
    """A cell's name, and the stem of its files in <out>/cells."""
    return f"{start}-o{order}-s{seed}-{method}"


def grid_cells(config: dict) -> list[str]:
    """The names of every cell of a run's grid (grid.json), in the order they run."""
    return [cell_name(st, o, sd, m) for st in config["starts"] for o in config["orders"] for sd in config["seeds"]
            for m in config["methods"]]


def permuted(order: tuple[str, ...], order_seed: int) -> tuple[str, ...]:
    """The task order of an order seed: 0 the order given, k > 0 that order shuffled with random.Random(k)."""
    names = list(order)
    if order_seed:
        random.Random(order_seed).shuffle(names)
    return tuple(names)


def _distinct_orders(order: tuple[str, ...], orders: tuple[int, ...], log) -> tuple[int, ...]:
    """Order seeds that give distinct orders (two seeds giving one order would count one experiment twice)."""
    kept: dict[tuple[str, ...], int] = {}
    for o in orders:
        if (names := permuted(order, o)) in kept:
            log(f"order seed {o} gives the order of seed {kept[names]}: left out")
        else:
            kept[names] = o
    return tuple(kept.values())


def environment() -> dict:
    """What a result was measured with: package versions, Python, the CPU's vector flags, the commit."""
    import importlib.metadata
    import platform
    import subprocess

    packages: dict[str, str | None] = {}
    for name in ("cit", "torch", "transformers", "peft", "faiss-cpu", "numpy"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_flags": flags, "packages": packages, "commit": commit}


def _write_file(path: Path, text: str) -> None:
    """Whole or not at all (a cell file means a whole cell)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


PAIRED = [("tir-ewc", "ewc"), ("tir-mas", "mas"), ("tir-si", "si"), ("er", "seqft")]


def paired_differences(results: list[MethodResult]) -> list[dict]:
    """A_T of one method minus another's over the cells they share (same start, order and seed), for the claims
    the paper makes: TIR vs its plain regulariser, ER vs SeqFT, and each method from the instruct start vs base."""
    a_t = {((r.start, r.order, r.seed), r.method): r.average_accuracy[-1] for r in results}
    cells = sorted({cell for cell, _ in a_t})
    methods = list(dict.fromkeys(m for _, m in a_t))
    claims = [(f"{a} - {b}", [((c, a), (c, b)) for c in cells]) for a, b in PAIRED]
    claims += [(f"{m}: instruct - base", [((("instruct", o, sd), m), (("base", o, sd), m)) for _, o, sd in cells])
               for m in methods]
    out = []
    for name, pairs in claims:
        diffs = [a_t[x] - a_t[y] for x, y in dict.fromkeys(pairs) if x in a_t and y in a_t]
        if diffs:
            mean, low, high = bootstrap(diffs, BOOTSTRAP_ROUNDS)
            out.append({"claim": name, "cells": len(diffs), "mean": mean, "low": low, "high": high})
    return out
