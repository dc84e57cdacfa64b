"""Learnable budgets (issue 16): how much of what the default `add-task` recipe reaches does an EProj adapter reach
on a task with fewer training samples or epochs?

    python bench/budget.py --work /tmp/budget [--tasks words digits] [--budgets 1000x3 2000x3 3000x3] [--test 300]

For each task: one export (the largest budget's training samples, `--test` images asked with a training and with a
held-out wording), the features embedded once; for each budget NxE an EProj projection trained from the base
connector on the first N training samples for E epochs with add-task's recipe (batch 16, one-cycle lr 1e-3, seed
0) and evaluated greedily on the whole test split. The last budget is the reference (default: 3,000 x 3, add-task's
own); each row prints its accuracy, its share of the reference's and a 95 % bootstrap interval of the difference
over the test rows (paired: the same rows). A benchmark preset is learnable for a task when its budget reaches at
least 80 % of the reference (issue 16's criterion).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cit_trainer.bench import DEFAULT_ORDER
from cit_trainer.data import export_task
from cit_trainer.intervals import bootstrap

CRITERION = 0.8  # share of the reference's accuracy a learnable budget reaches


def budget(text: str) -> tuple[int, int]:
    samples, epochs = text.lower().split("x")
    return int(samples), int(epochs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_ORDER))
    parser.add_argument("--budgets", nargs="+", type=budget, default=[(1000, 3), (2000, 3), (3000, 3)],
                        help="training samples x epochs; the last is the reference")
    parser.add_argument("--test", type=int, default=300)
    args = parser.parse_args()

    from cit_backbone.adapters import TaskAdapter
    from cit_backbone.backbone import Backbone
    from cit_backbone.embedder import TextEmbedder
    from cit_registry.taskdata import read_jsonl
    from cit_trainer.training import EmbeddedTask, embed_task, evaluate, train_connector

    backbone, embedder = Backbone(), TextEmbedder()
    most = max(n for n, _ in args.budgets)
    print(f"budgets {', '.join(f'{n}x{e}' for n, e in args.budgets)} (reference: the last); {args.test} test images "
          "per task, each asked with a training and a held-out wording; EProj from the base connector, seed 0")
    print(f"{'task':<15} {'budget':>8} {'steps':>6} {'accuracy':>9} {'of ref.':>8} {'diff [95 %]':>22} {'train s':>8}")
    for task in args.tasks:
        directory = args.work / task
        if not (directory / "train.jsonl").exists():
            export_task(task, args.work, most, args.test)
        train_rows, test_rows = read_jsonl(directory / "train.jsonl"), read_jsonl(directory / "test.jsonl")
        train = embed_task(backbone, embedder, train_rows, f"{task} train")
        test = embed_task(backbone, embedder, test_rows, f"{task} test")
        results = []
        for n, epochs in args.budgets:
            # the first n training rows; no task key is needed here
            subset = EmbeddedTask(train.samples[:n], train.features[:n], None, None)
            adapter = backbone.base_connector().clone()
            start = time.time()
            losses = train_connector(backbone, adapter, subset, epochs, seed=0, desc=f"{task} {n}x{epochs}")
            seconds = time.time() - start
            result = evaluate(backbone, TaskAdapter(adapter.eval()), test, desc=f"evaluating {task}")
            results.append((n, epochs, len(losses), np.array(result.correct, dtype=float), seconds))
        reference = results[-1][3]
        for n, epochs, steps, correct, seconds in results:
            _, low, high = bootstrap(correct - reference)
            share = correct.mean() / reference.mean() if reference.mean() else float("nan")
            flag = "" if share >= CRITERION else "  < 80 %"
            print(f"{task:<15} {f'{n}x{epochs}':>8} {steps:>6} {100 * correct.mean():>8.1f}% {share:>7.0%} "
                  f"{100 * (correct - reference).mean():>+7.1f} [{100 * low:+.1f}, {100 * high:+.1f}] {seconds:>8.0f}"
                  + flag, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
