"""The continual-instruction-tuning benchmark of He et al. (arXiv 2311.16206) on real data, on a CPU.

Tasks are learned one after another; after each stage every task seen so far (and the next one, zero-shot) is
evaluated, giving each method an accuracy matrix acc[stage, task]. From it:

    A_t = mean over tasks j <= t of acc[t, j]                               (average accuracy)
    F_t = mean over tasks j < t of (max over stages l in [j, t-1] of acc[l, j]) - acc[t, j]   (forgetting)

EProj and LoRA (and the similarity-informed variant with a reuse threshold) route each test request through a FAISS
index of task keys exactly as the server does, so their accuracy includes routing mistakes.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cit_backbone.adapters import TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_registry.router import Router, background_questions, task_similarity
from cit_registry.store import TaskKey
from cit_registry.taskdata import read_jsonl

from .data import export_task
from .methods import METHODS, SHARED_METHODS, make_method
from .training import EmbeddedTask, embed_task, evaluate, train_connector

DEFAULT_ORDER = ("fashion-mnist", "digits", "easyvqa-shape", "easyvqa-color", "words")


@dataclass(frozen=True)
class Preset:
    train: int    # training samples per task
    test: int     # held-out samples per task
    epochs: int


# small: every method from one starting point in about 30 minutes on 2 cores (measured: docs/USAGE.md)
PRESETS = {"small": Preset(train=128, test=60, epochs=2), "full": Preset(train=1000, test=300, epochs=3)}


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
                 strength: float = 100.0, replay_fraction: float = 0.01) -> None:
        self.out, self.order, self.preset, self.seed, self.log = Path(out), order, preset, seed, log
        self.strength, self.replay_fraction = strength, replay_fraction  # λ; the replay buffer's share of a task
        self.backbone = Backbone()
        self.embedder = TextEmbedder()
        self.background = self.embedder.embed(background_questions())
        self.use_start("base")
        self.train: list[EmbeddedTask] = []
        self.test: list[EmbeddedTask] = []
        for name in order:
            task_dir, _ = export_task(name, self.out / "tasks", preset.train, preset.test, seed)
            self.train.append(embed_task(self.backbone, self.embedder, read_jsonl(task_dir / "train.jsonl"), f"{name} train"))
            self.test.append(embed_task(self.backbone, self.embedder, read_jsonl(task_dir / "test.jsonl"), f"{name} test"))
        self.keys = [t.key() for t in self.train]

    def use_start(self, start: str) -> None:
        """Every method from now on starts from clones of this starting connector (read once)."""
        self.start, self.base = start, self.backbone.base_connector(start)
        self._start_scores: dict[str, list[float]] = getattr(self, "_start_scores", {})
        self._routed: dict[tuple, MethodResult] = {}  # routed runs by (adapter of each task, lora, final only)

    def fit(self, adapter: TaskAdapter, task: EmbeddedTask, desc: str, method=None) -> None:
        train_connector(self.backbone, adapter.connector, task, self.preset.epochs, seed=self.seed, desc=desc,
                        method=method, lora=adapter.lora)

    def score(self, adapter: TaskAdapter, j: int) -> float:
        return evaluate(self.backbone, adapter, self.test[j], desc=f"evaluating {self.order[j]}").accuracy

    # ---------------------------------------------------------------------------------- one method

    def run(self, method: str) -> MethodResult:
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
        """The starting connector's accuracy on each task, measured once per start (FWT's reference)."""
        if self.start not in self._start_scores:
            self._start_scores[self.start] = [self.score(TaskAdapter(self.base), j) for j in range(len(self.order))]
        return self._start_scores[self.start]

    def _result(self, name: str, acc: np.ndarray, adapters: int, routing=None, lora_params: int = 0) -> MethodResult:
        average, forgetting = metrics(acc)
        start = self.start_accuracy()
        learning, backward, forward = transfer(acc, start)
        params = (sum(p.numel() for p in self.base.parameters()) + lora_params) * adapters
        rows = [[None if np.isnan(v) else float(v) for v in row] for row in acc]
        return MethodResult(name, self.start, rows, average, forgetting, routing or [], adapters, params,
                            learning_accuracy=learning, backward_transfer=backward, forward_transfer=forward,
                            start_accuracy=start)

    def _run_shared(self, name: str) -> MethodResult:
        adapter, acc = TaskAdapter(self.base.clone()), self._matrix()
        method = make_method(name, self.strength, self.replay_fraction)
        for t in range(len(self.order)):
            self.fit(adapter, self.train[t], f"{name}: {self.order[t]}", method)
            for j in range(min(t + 2, len(self.order))):  # seen tasks and the next one, zero-shot
                acc[t, j] = self.score(adapter, j)
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
                acc[t, j] = self.score(adapter, j)
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
                return replace(self._routed[done], method=name)
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
                    acc[t, j], share = self._routed_score(router, adapters, j, owner_of[j] if j <= t else None)
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
        self._routed[(tuple(owner_of), lora, final_only)] = result
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

    def _routed_score(self, router: Router, adapters: list[TaskAdapter], j: int, own: int | None) -> tuple[float, float]:
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
            correct[rows] = evaluate(self.backbone, adapter, subset, desc=f"evaluating {self.order[j]}").correct
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
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "tasks": list(order), "methods": [asdict(r) for r in results], "threshold_sweep": sweep}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")

    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = [f"Tasks, in order: {', '.join(order)}. Command: `{config['command']}`", "",
             "| start | method | A_T | F_T | learning acc. | BWT | FWT | routing (own adapter) | adapters | "
             "trainable params | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        routing = pct(r.routing_accuracy[-1]) if r.routing_accuracy else "–"
        lines.append(f"| {r.start} | {r.method} | {pct(r.average_accuracy[-1])} | {pct(r.forgetting[-1])} | "
                     f"{pct(r.learning_accuracy)} | {pct(r.backward_transfer)} | {pct(r.forward_transfer)} | {routing} | "
                     f"{r.adapters} | {r.trainable_parameters:,} | {r.seconds:.0f} s |")
    if sweep:
        lines += ["", f"Reuse threshold sweep (similarity-informed EProj, from {results[0].start}):", "",
                  "| threshold | adapters | A_T |", "|---|---|---|"]
        lines += [f"| {s['threshold']:g} | {s['adapters']} | {pct(s['final_average_accuracy'])} |" for s in sweep]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    for r in results:
        acc = np.array([[np.nan if v is None else 100 * v for v in row] for row in r.accuracy])
        fig, ax = plt.subplots(figsize=(6, 4.8))
        image = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_yticks(range(len(order)), [f"after {n}" for n in order])
        ax.set_title(f"{r.method} from {r.start}: accuracy (%) after each stage")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"heatmap-{r.start}-{r.method}.png", dpi=100)
        plt.close(fig)


def run_benchmark(out: Path, methods: list[str], order: tuple[str, ...], preset: str | Preset, seed: int,
                  thresholds: list[float], command: str, starts: tuple[str, ...] = ("base",),
                  log=print, strength: float = 100.0, replay_fraction: float = 0.01) -> list[MethodResult]:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(order)) != len(order) or len(order) < 2:
        raise ValueError("the task order needs at least two distinct tasks")
    random.seed(seed)
    np.random.seed(seed)
    from cit_backbone.paths import STARTING_CONNECTORS

    if not starts or any(s not in STARTING_CONNECTORS for s in starts):
        raise ValueError(f"starting points must be among {', '.join(STARTING_CONNECTORS)}, got {', '.join(starts)}")
    bench = Bench(out, order, preset, seed, log, strength, replay_fraction)
    results: list[MethodResult] = []
    sweep: list[dict] = []
    for start in starts:
        bench.use_start(start)
        results += [bench.run(m) for m in methods]
        if thresholds and not sweep:  # the sweep runs from the first starting point only
            sweep = bench.threshold_sweep(thresholds)
    config = {"command": command, **asdict(preset), "seed": seed, "methods": methods, "starts": list(starts),
              "strength": strength, "replay_fraction": replay_fraction}
    write_report(out, order, results, sweep, config)
    return results
