"""Reuse without forgetting: a task is added, then a copy of it that add-task reuses the adapter for; how much of
the first data set's accuracy does the reused adapter keep, with and without replaying the data stored in the
registry (issue 13, item 3)?

    python bench/reuse.py --work /tmp/reuse [--task fashion-mnist] [--train 600] [--test 150] [--seeds 0 1 2]

Pairs: *redraw* (new samples of the same task, the same wordings) and *paraphrase* (new samples, asked in wordings
written apart from the task's templates). Each seed exports its own data and trains its own first version; both
replay settings then reuse that same version, so their drops are paired on the very same test rows (the whole test
split, both wording kinds). Resumable: a run whose registry already holds the copy is read back, not retrained.
Prints each run, then per pair and setting the drop (then - now, points) with a 95 % bootstrap interval over the
test rows of all seeds.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from cit_registry.store import Registry
from cit_trainer.add_task import AddTaskOptions, add_task
from cit_trainer.data import PARAPHRASES, export_task
from cit_trainer.intervals import bootstrap
from cit_trainer.routing_eval import paraphrased

GOAL = 2.0  # points: the upper 95 % bound of the drop where the default threshold reuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--task", default="fashion-mnist", choices=sorted(PARAPHRASES))
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replay", type=int, nargs="+", default=[0, AddTaskOptions.replay_samples],
                        help="--replay-samples settings compared (0: no replay)")
    args = parser.parse_args()

    from cit_backbone.backbone import Backbone
    from cit_backbone.embedder import TextEmbedder
    backbone, embedder = Backbone(), TextEmbedder()
    quiet = lambda *a, **k: None  # noqa: E731
    drops: dict[tuple[str, int], list[np.ndarray]] = {}
    print(f"task {args.task}: {args.train} training / {args.test} test images per data set, seeds {args.seeds}")
    print(f"{'seed':>4} {'pair':<11} {'replay':>6} {'similarity':>10} {'action':<8} {'first: then':>11} "
          f"{'now':>6} {'drop':>6} {'copy':>6}")
    for seed in args.seeds:
        root = args.work / f"seed{seed}"
        base_reg = root / "registry-first"
        if not (root / "tasks" / args.task).is_dir():
            export_task(args.task, root / "tasks", args.train, args.test, seed)
        if not Registry.open(base_reg, create=True).task_ids():
            add_task(base_reg, root / "tasks" / args.task, "first", AddTaskOptions(
                seed=seed, max_eval=None, forgetting_samples=10**6), backbone, embedder, log=quiet)
        for pair in ("redraw", "paraphrase"):
            copy = root / pair / args.task
            if not copy.is_dir():
                export_task(args.task, root / pair, args.train, args.test, seed + 100)
                if pair == "paraphrase":
                    paraphrased(copy, PARAPHRASES[args.task], seed)
            for replay in args.replay:
                reg = root / f"registry-{pair}-replay{replay}"
                if not (reg / "tasks" / "first" / "v0002").is_dir():
                    shutil.rmtree(reg, ignore_errors=True)
                    shutil.copytree(base_reg, reg)
                    add_task(reg, copy, "copy", AddTaskOptions(seed=seed, max_eval=None, forgetting_samples=10**6,
                                                               replay_samples=replay), backbone, embedder, log=quiet)
                card = Registry.open(reg).get("first").card if (reg / "tasks" / "first" / "v0002").is_dir() \
                    else Registry.open(reg).get("copy").card
                if card.decision["action"] != "reused":
                    print(f"{seed:>4} {pair:<11} {replay:>6} {card.decision['similarity']:>10.3f} expanded: "
                          "nothing reused, no drop to measure")
                    continue
                first = card.metrics["forgetting"]["first"]
                then = np.array([c == "1" for c in card.datasets[0]["eval_correct"]], float)
                now = np.array([c == "1" for c in first["now_correct"]], float)
                diff = (then[: len(now)] - now) * 100
                drops.setdefault((pair, replay), []).append(diff)
                print(f"{seed:>4} {pair:<11} {replay:>6} {card.decision['similarity']:>10.3f} {'reused':<8} "
                      f"{then.mean():>11.1%} {now.mean():>6.1%} {diff.mean():>6.1f} "
                      f"{card.metrics['accuracy_after']:>6.1%}")
    print(f"\ndrop of the first data set's accuracy (points, then - now, paired on the same rows; "
          f"goal: upper 95 % bound <= {GOAL})")
    for (pair, replay), diffs in sorted(drops.items()):
        d = np.concatenate(diffs)
        _, lo, hi = bootstrap(d)
        print(f"  {pair:<11} replay {replay:>4}: {d.mean():5.1f}  [{lo:5.1f}, {hi:5.1f}]  over {len(d)} rows "
              f"({len(diffs)} seeds)  {'goal met' if hi <= GOAL else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
