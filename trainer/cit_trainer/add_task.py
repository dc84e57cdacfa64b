"""`cit-trainer add-task`: embed a task, compare it with every registered task, reuse or expand, train, report."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cit_backbone.adapters import TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_registry.router import REUSE_IMAGE_SHARE, REUSE_THRESHOLD, Router, image_share, task_similarity
from cit_registry.snapshots import REPLAY_SAMPLES, copy_snapshot, read_snapshot, snapshot_dir, write_snapshot
from cit_registry.store import Registry, TaskCard, TaskVersion, validate_task_id
from cit_registry.taskdata import read_jsonl, resolve_task_files

from .methods import SHARED_METHODS, make_method
from .parallel import ALONE, Ranks
from .training import embed_task, evaluate, train_connector

ADAPTER_METHODS = ("eproj", "lora")  # a projection per task, or a projection plus a LoRA on the LM
ADD_TASK_METHODS = (*ADAPTER_METHODS, *SHARED_METHODS)  # joint training is the benchmark's upper bound only
TRAINING = "add-task"                 # the LM's name for the LoRA being trained


@dataclass
class AddTaskOptions:
    threshold: float = REUSE_THRESHOLD  # reuse the most similar task's adapter when its similarity reaches this
    image_share: float = REUSE_IMAGE_SHARE  # ... and this share of the new images clear its image floor (0: any)
    method: str = "eproj"
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    max_train: int | None = None          # use at most this many training samples (None: all)
    max_eval: int | None = 300            # test samples evaluated before/after (None: all)
    forgetting_samples: int = 100         # test samples re-measured for each earlier task
    strength: float = 100.0               # λ of ewc, mas, si and their tir- variants
    replay_fraction: float = 0.01         # share of each task's samples kept for er and agem
    replay_samples: int = REPLAY_SAMPLES  # training samples of each data set kept in its version, that a reused
                                          # adapter trains on again beside its new data (0: none kept or replayed)
    max_forgetting: float | None = None   # points: a version whose adapter forgets more of what it served is
                                          # committed as a candidate (None: no gate, it serves at once)


@dataclass
class AddTaskResult:
    task: TaskVersion
    action: str                           # "expanded" or "reused"
    similarities: dict = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    forgetting: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)


def _subset(samples: list, n: int | None) -> list:
    return samples if n is None else samples[:n]


def add_task(
    registry_root: Path,
    data: Path,
    task_id: str | None = None,
    options: AddTaskOptions | None = None,
    backbone: Backbone | None = None,
    embedder: TextEmbedder | None = None,
    log=print,
    ranks: Ranks = ALONE,
) -> AddTaskResult | None:
    """Add a task from `data`. Under a launcher (`ranks`: parallel.py) every process trains its share of each step;
    the main process alone holds the write lock, evaluates, commits and returns the result (the others: None)."""
    opts = options or AddTaskOptions()
    if opts.method not in ADD_TASK_METHODS:
        raise ValueError(f"unknown method {opts.method!r}; add-task trains {', '.join(ADD_TASK_METHODS)}"
                         + (" (joint training is the benchmark's upper bound)" if opts.method == "joint" else ""))
    if not 0.0 <= opts.threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {opts.threshold}")
    if opts.replay_samples < 0:
        raise ValueError(f"replay_samples must be >= 0, got {opts.replay_samples}")
    if opts.max_forgetting is not None and (opts.max_forgetting < 0 or opts.forgetting_samples <= 0):
        raise ValueError("max_forgetting needs a limit >= 0 points and forgetting_samples > 0 (it is judged on the "
                         "re-measurement)")
    train_file, test_file = resolve_task_files(data)
    name = validate_task_id(task_id or train_file.parent.name.lower())
    if not ranks.main:  # reads the registry once the main process holds its write lock
        ranks.barrier()
        return _add(Registry.open(registry_root), name, train_file, test_file, opts, backbone, embedder,
                    lambda *_: None, ranks)
    registry = Registry.open(registry_root, create=True)
    with registry.writing():  # one writer at a time: a second add-task fails at once, clearly
        ranks.barrier()
        return _add(registry, name, train_file, test_file, opts, backbone, embedder, log, ranks)


def _why_not(sims: dict, task_id: str, inside: float, opts: AddTaskOptions) -> str:
    """Why the data does not reuse the adapter of `task_id`, the most similar task, in words."""
    score = sims[task_id]["score"]
    if score < opts.threshold:
        return f"best similarity {score:.3f} < threshold {opts.threshold}"
    return (f"similarity {score:.3f} >= {opts.threshold}, but only {inside:.0%} of its images clear {task_id!r}'s "
            f"image floor (< {opts.image_share:.0%}): the same question of other images is a task of its own")


def _add(registry: Registry, name: str, train_file: Path, test_file: Path | None, opts: AddTaskOptions,
         backbone: Backbone | None, embedder: TextEmbedder | None, log, ranks: Ranks) -> AddTaskResult | None:
    train_samples = _subset(read_jsonl(train_file), opts.max_train)
    test_samples = _subset(read_jsonl(test_file), opts.max_eval) if test_file else []

    backbone = backbone or Backbone()
    embedder = embedder or TextEmbedder(str(backbone.numerics.device))
    torch.manual_seed(opts.seed)
    train = embed_task(backbone, embedder, train_samples, f"{name} train", ranks=ranks)
    # the test split is evaluated by the main process alone: the others do not encode it
    test = embed_task(backbone, embedder, test_samples, f"{name} test") if test_samples and ranks.main else None
    key = train.key()

    # Compare with every registered task; the most similar one decides reuse or expansion.
    registered = registry.serving()
    sims = {t.task_id: task_similarity(key, t.key()) for t in registered}
    for other, s in sorted(sims.items(), key=lambda kv: -kv[1]["score"]):
        log(f"  similarity to {other:<24} {s['score']:.3f}  (image {s['image']:.3f}, instruction "
            f"{s['instruction']:.3f}, output {s['output']:.3f})")
    best = max(sims, key=lambda t: sims[t]["score"], default=None)
    inside = image_share(registry.get(best).key(), train.routing_image) if best is not None else 0.0
    similar = best is not None and sims[best]["score"] >= opts.threshold
    reuse = similar and inside >= opts.image_share

    previous = registry.get(best) if reuse and best is not None else None  # its serving version
    if previous is not None:  # numbered after its newest version (a rolled-back task serves an older one)
        target_id, version, key = previous.task_id, registry.versions(previous.task_id)[-1] + 1, previous.key().merged(key)
        datasets = list(previous.card.datasets)
    else:
        if name in sims:
            assert best is not None  # sims holds a task at least
            why = _why_not(sims, name, inside, opts) if name == best else \
                f"the most similar task is {best!r}, {sims[best]['score']:.3f}"
            raise ValueError(f"task {name!r} exists, but this data is not similar enough to reuse it ({why}); "
                             "choose another --name")
        if registry.versions(name):
            status = registry.status(name)
            why = "it is retired" if status.retired else f"it has no serving version (candidates v{status.candidates})"
            raise ValueError(f"task {name!r} exists but does not serve ({why}): restore or promote it, or choose "
                             "another --name")
        target_id, version, datasets = name, 1, []

    method, sequence = None, None
    if opts.method in SHARED_METHODS:
        # One connector for every task of this method: it starts where the method's newest task left it.
        if previous is not None and previous.shared_method != opts.method:
            raise ValueError(f"the most similar task {best!r} ({previous.card.adapter_kind}) is not trained with "
                             f"{opts.method!r}, so it cannot be reused by it; use --threshold 1 to add a new task")
        pending = [f"{t.task_id} v{v}" for t in map(registry.status, registry.task_ids()) for v in t.candidates
                   if registry.get(t.task_id, v).shared_method == opts.method]
        if pending:  # the method's connector is one line of versions: a candidate must be settled first
            raise ValueError(f"a candidate of method {opts.method!r} awaits a decision ({', '.join(pending)}): "
                             "`cit-registry promote` or `reject` it first")
        head = registry.shared_head(opts.method)
        method = make_method(opts.method, opts.strength, opts.replay_fraction)
        if head is not None:
            method.load(head.path / "method")
        # numbered after every version of the method on disk: one trained from a rolled-back head never ties
        kind, sequence = "shared", registry.shared_sequence(opts.method) + 1
        adapter = TaskAdapter(backbone.load_connector(head.adapter_dir) if head else backbone.base_connector().clone())
    elif previous is not None:
        if previous.shared_method:
            raise ValueError(f"the most similar task {best!r} is trained with {previous.shared_method!r}; reuse it "
                             f"with --method {previous.shared_method}, or use --threshold 1 to add a new task")
        # A reused task keeps what its adapter has: a LoRA task's LoRA trains further with its projection.
        kind = "lora" if previous.card.adapter_kind == "lora" else opts.method
        adapter = backbone.load_adapter(TRAINING, previous.adapter_dir, previous.lora_dir, trainable=True)
    else:
        kind, adapter = opts.method, TaskAdapter(backbone.base_connector().clone())
    grown_from = _grown_from(registry, target_id, opts.method if method else None)
    if previous is not None:
        log(f"reusing task {best!r} (similarity {sims[previous.task_id]['score']:.3f} >= {opts.threshold}, {inside:.0%} of "
            f"the images inside its image floor); its {kind} adapter is trained further as version {version}")
    else:
        why = _why_not(sims, best, inside, opts) if best else "the registry is empty"
        log(f"expanding with a new {kind} adapter for task {name!r} ({why})")
    if kind == "lora" and adapter.lora is None:
        backbone.lm.loras.add(TRAINING)
        adapter = TaskAdapter(adapter.connector, TRAINING)
    # A reused adapter of its own trains on the new data together with what it already serves: the training
    # samples its version keeps of each data set (a shared connector's method keeps and replays in its own way).
    replayed = _replayed(previous, name, opts.replay_samples, log) if previous and method is None else {}
    keep = 0 if method else min(opts.replay_samples, len(train_samples))
    kept = random.Random(opts.seed).sample(train_samples, keep)

    try:
        before = evaluate(backbone, adapter, test, desc="accuracy before") if test else None
        training = train.joined(embed_task(backbone, embedder, [s for r in replayed.values() for s in r], "replay",
                                           ranks=ranks)) if replayed else train
        start = time.time()
        losses = train_connector(backbone, adapter.connector, training, opts.epochs, opts.batch_size, opts.lr,
                                 opts.seed, desc=f"training {target_id} v{version}", method=method, lora=adapter.lora,
                                 ranks=ranks)
        seconds = time.time() - start
        if not ranks.main:
            return None
        if adapter.lora:
            backbone.lm.loras.set_trainable(adapter.lora, False)
        after = evaluate(backbone, adapter, test, desc="accuracy after") if test else None
        accuracy_before, accuracy_after = (before.accuracy, after.accuracy) if before and after else (None, None)
        correct, measured = (after.correct, _by_wording(after, test_samples, log)) if after else ([], {})
        datasets.append({
            "name": name, "train": str(train_file.resolve()), "test": str(test_file.resolve()) if test_file else None,
            "samples": len(train_samples), "accuracy_after": accuracy_after, **measured,
            # which test samples were right, in file order: later re-measurements compare on the very same samples
            "eval_correct": "".join("1" if c else "0" for c in correct),
        })
        forgetting = _remeasure(backbone, embedder, registry, target_id, adapter, datasets[:-1], opts, log,
                                previous)
        gate = _gate(forgetting, datasets[:-1], registry, target_id, opts, log) if opts.max_forgetting is not None else {}
        if (now := _grown_from(registry, target_id, opts.method if method else None)) != grown_from:
            # an operator rolled back or retired what this version grows from while it trained: it must not
            # silently serve over that decision
            gate = {**gate, "passed": False, "changed_while_training": {"then": grown_from, "now": now}}
            log(f"  {target_id} changed while this version trained ({grown_from} -> {now}): committed as a candidate; "
                f"`cit-registry promote {target_id}` lets it serve")
        card = TaskCard(
            task_id=target_id,
            version=version,
            adapter_kind=kind,
            decision={"action": "reused" if reuse else "expanded", "dataset": name, "most_similar": best,
                      "similarity": sims[best]["score"] if best else None, "threshold": opts.threshold,
                      "image_share": inside if best else None, "image_share_needed": opts.image_share},
            similarities=sims,
            metrics={"accuracy_before": accuracy_before, "accuracy_after": accuracy_after,
                     "eval_samples": len(test_samples), "forgetting": forgetting},
            training={"method": opts.method, "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr,
                      "seed": opts.seed, "samples": len(train_samples), "steps": len(losses),
                      "final_loss": losses[-1] if losses else None, "seconds": round(seconds, 1),
                      "replayed": {n: len(r) for n, r in replayed.items()},
                      "numerics": backbone.numerics.describe(),  # the server warns when it serves in others
                      **({"sequence": sequence, "strength": opts.strength, "replay_fraction": opts.replay_fraction}
                         if method else {})},
            datasets=datasets,
            gate=gate,
        )
        parts = {"adapter": adapter.connector.save,
                 "eval": lambda d: _write_snapshots(d, name, test_samples, previous, "eval_dir"),
                 **({} if method else {"replay": lambda d: _write_snapshots(d, name, kept, previous, "replay_dir")})}
        if (lora := adapter.lora) is not None:
            parts["lora"] = lambda d: backbone.lm.loras.save(lora, d)
        if method is not None:
            parts["method"] = method.save
        written = registry.commit(card, key, parts, backbone=backbone.identity)
    finally:
        backbone.unload_adapter(adapter)
    Router.build(registry).save(registry)
    return AddTaskResult(written, card.decision["action"], sims, accuracy_before, accuracy_after, forgetting, gate)


def _grown_from(registry: Registry, target_id: str, method: str | None) -> list:
    """What a new version of `target_id` grows from: the version the task serves (or would, retired) and whether it
    is retired; for a shared-connector method also the method's head."""
    state: list = [registry.serving_version(target_id, retired_too=True),
                   bool(registry.versions(target_id)) and registry.status(target_id).retired]
    if method is not None:
        head = registry.shared_head(method)
        state.append([head.task_id, head.version] if head else None)
    return state


def _gate(forgetting: dict, reused: list, registry: Registry, target_id: str, opts: AddTaskOptions, log) -> dict:
    """The forgetting gate: the most points the new adapter lost on any data set it already served (a reused
    adapter's earlier data sets; for a shared connector, every task of its method), against opts.max_forgetting.
    A data set it serves that could not be re-measured fails the gate: what was not measured is not known to be
    kept."""
    assert opts.max_forgetting is not None
    served = [d["name"] for d in reused]
    if opts.method in SHARED_METHODS:
        served += [d["name"] for t in registry.serving() if t.task_id != target_id and t.shared_method == opts.method
                   for d in t.card.datasets]
    measured = {n: (forgetting[n]["when_trained"] - forgetting[n]["now"]) * 100 for n in served if n in forgetting}
    unmeasured = sorted(set(served) - set(measured))
    worst = round(max(measured.values(), default=0.0), 6)  # 1 of 10 samples lost is 10 points, not 10.000000000000002
    passed = worst <= opts.max_forgetting and not unmeasured
    log(f"  forgetting gate: {worst:.1f} points at most on {len(measured)} data sets it served (limit "
        f"{opts.max_forgetting:g})" + (f", {len(unmeasured)} not re-measured ({', '.join(unmeasured)})" if unmeasured else "")
        + (": it serves" if passed else f": committed as a candidate; `cit-registry promote {target_id}` lets it serve"))
    return {"max_forgetting": opts.max_forgetting, "forgetting": round(worst, 2), "passed": passed,
            "measured": sorted(measured), "unmeasured": unmeasured}


def _by_wording(after, test_samples: list, log) -> dict:
    """A data set's accuracy per wording kind (training / held-out) and its misses by kind, for its card."""
    by_template, errors = after.by_template(test_samples), after.errors()
    if by_template:
        log("  accuracy after, by wording: " + ", ".join(f"{k} {a:.1%}" for k, a in by_template.items()))
    log(f"  misses: {errors['format']} format (the answer with more around it), {errors['knowledge']} knowledge")
    return {"accuracy_by_template": by_template, "errors": errors}


def _write_snapshots(directory: Path, name: str, samples: list, previous: TaskVersion | None, part: str) -> None:
    """eval/ or replay/ of the new version: this data set's held-out (or kept training) samples, and those of the
    data sets a reused adapter served before (carried from the previous version's `part`), so that every later
    re-measurement and replay reads the registry."""
    directory.mkdir()
    if samples:
        write_snapshot(snapshot_dir(directory, name), samples)
    if previous is not None:
        for dataset in previous.card.datasets:
            source = snapshot_dir(getattr(previous, part), dataset["name"])
            if source.is_dir() and dataset["name"] != name:
                copy_snapshot(source, snapshot_dir(directory, dataset["name"]))


def _replayed(previous: TaskVersion, name: str, limit: int, log) -> dict[str, list]:
    """Up to `limit` kept training samples of every data set the reused version serves (a data set of the same
    name is replaced by the new data, not replayed)."""
    out = {}
    for dataset in previous.card.datasets:
        source = snapshot_dir(previous.replay_dir, dataset["name"])
        if dataset["name"] == name or limit == 0:
            continue
        if not source.is_dir():
            log(f"  {dataset['name']:<24} not replayed: its version keeps no training samples")
            continue
        out[dataset["name"]] = read_snapshot(source)[:limit]
        log(f"  {dataset['name']:<24} replayed: {len(out[dataset['name']])} of its training samples")
    return out


def _remeasure(backbone, embedder, registry, target_id, new_adapter, reused_datasets, opts, log, previous=None) -> dict:
    """Accuracy of every earlier data set now, against what it reached when trained: forgetting, measured on the
    held-out snapshot the registry keeps in each version (never on files a card points to). forgetting_samples 0:
    nothing re-measured."""
    if opts.forgetting_samples <= 0:
        return {}
    jobs = [(t, t, d) for t in registry.serving() if t.task_id != target_id for d in t.card.datasets]
    jobs += [(None, previous, d) for d in reused_datasets]  # a reused adapter may forget its old data: measured too
    lineage = opts.method if opts.method in SHARED_METHODS else None
    out = {}
    for version, holder, dataset in jobs:
        flags = dataset.get("eval_correct", "")
        try:
            snapshot = snapshot_dir(holder.eval_dir, dataset["name"]) if holder is not None else None
        except ValueError:
            snapshot = None
        if not flags or snapshot is None or not snapshot.is_dir():
            log(f"  {dataset['name']:<24} not re-measured: its version holds no evaluation snapshot")
            continue
        samples = read_snapshot(snapshot)[: min(opts.forgetting_samples, len(flags))]
        then = flags[: len(samples)].count("1") / len(samples)
        task = embed_task(backbone, embedder, samples, dataset["name"])
        task_id = version.task_id if version else target_id
        # the new adapter serves this data set now when it is the same task, or a task of the same shared connector
        own = version is None or (lineage is not None and version.shared_method == lineage)
        adapter = new_adapter if own else backbone.load_adapter(
            f"{task_id}@v{version.version}", version.adapter_dir, version.lora_dir)
        try:
            now = evaluate(backbone, adapter, task, desc=f"re-measuring {dataset['name']}")
        finally:
            if not own:
                backbone.unload_adapter(adapter)
        out[dataset["name"]] = {"task": task_id, "when_trained": then, "now": now.accuracy, "samples": len(samples),
                                "now_correct": "".join("1" if c else "0" for c in now.correct)}
        log(f"  {dataset['name']:<24} (task {task_id}): {now.accuracy:.1%} now, {then:.1%} when trained "
            f"(same {len(samples)} test samples)")
    return out
