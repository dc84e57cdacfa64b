"""Image floors: does a task's image floor take its own new images and refuse other tasks' images of the same kind?

    python bench/image_floors.py [--train 300 --test 100 --draws 5]

The routing suite's tasks (cit_trainer.routing_eval.SUITE_TASKS; tasks that only ask a new question of another
task's images are left out: their images are that task's) are exported and their images encoded as `add-task`
encodes them (Backbone.routing_features). For several training sizes, `--draws` random subsets of the training
images give a centroid and a floor (store.image_floor, and the rule it replaced: 1st percentile less 0.1, capped at
0.5); then, on the test images:
  own:   the share of the task's own held-out images at or above its floor (must be near 100 %: a seen task whose
         image falls below its floor falls back);
  cross: for each pair asking the same question of different images, the share of the other task's images at or
         above this task's floor (a task not yet added whose images pass go to the task that asks its question).
Baseline, from outside the rule: the median cosine of each pair's images to each other's centroid and to their own.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from cit_backbone.backbone import Backbone
from cit_registry.store import _unit, image_floor
from cit_registry.taskdata import read_jsonl
from cit_trainer.data import export_task, load_images
from cit_trainer.routing_eval import SUITE_TASKS

SAME_IMAGES_AS = ("fashion-footwear", "digits-parity", "words-first-letter", "easyvqa-color")
SAME_QUESTION = (("digits", "printed-digits"), ("words", "words-large"), ("easyvqa-shape", "drawn-shapes"))
SIZES = (20, 50, 100, 300)


def old_floor(image: np.ndarray) -> float:
    image = _unit(image)
    return float(min(np.percentile(image @ _unit(image.mean(0)), 1) - 0.1, 0.5))


RULES = {"image_floor": image_floor, "old (p1-0.1, cap 0.5)": old_floor}


def encode(backbone: Backbone, task_dir: Path, split: str) -> np.ndarray:
    samples = read_jsonl(task_dir / f"{split}.jsonl")
    if split == "test":
        samples = samples[::2]  # each test image is written twice (training and held-out wording)
    out = [backbone.routing_features(backbone.encode_images(load_images(samples[i:i + 64]))).numpy()
           for i in range(0, len(samples), 64)]
    return _unit(np.concatenate(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    tasks = [t for t in SUITE_TASKS if t not in SAME_IMAGES_AS]
    backbone = Backbone()
    with tempfile.TemporaryDirectory() as tmp:
        feats = {}
        for name in tasks:
            task_dir, _ = export_task(name, Path(tmp), args.train, args.test, seed=0)
            feats[name] = {split: encode(backbone, task_dir, split) for split in ("train", "test")}
    pairs = [p for a, b in SAME_QUESTION for p in ((a, b), (b, a))]  # (task, the other task whose images come)
    print(f"tasks: {', '.join(tasks)}; {args.train} training / {args.test} test images each, {args.draws} draws\n")
    print("median cosine of test images to a centroid (all training images):")
    cent = {t: _unit(feats[t]["train"].mean(0)) for t in tasks}
    for a, b in pairs:
        print(f"  {b:>15} images -> {a:<15} {np.median(feats[b]['test'] @ cent[a]):.3f}"
              f"   (its own images {np.median(feats[a]['test'] @ cent[a]):.3f})")
    rng = np.random.default_rng(0)
    for rule_name, rule in RULES.items():
        print(f"\n{rule_name}: own = share of a task's held-out images at or above its floor, min / mean over tasks;"
              f" cross = share of the other task's images at or above it, per pair (mean of draws)")
        print(f"  {'train':>5}  {'own min':>7}  {'own mean':>8}  " + "  ".join(f"{b[:7]}->{a[:7]}" for a, b in pairs))
        for n in SIZES:
            own, cross = np.zeros((args.draws, len(tasks))), np.zeros((args.draws, len(pairs)))
            for d in range(args.draws):
                centroid, floor = {}, {}
                for t in tasks:
                    train = feats[t]["train"][rng.choice(len(feats[t]["train"]), min(n, len(feats[t]["train"])),
                                                         replace=False)]
                    centroid[t], floor[t] = _unit(train.mean(0)), rule(train)
                own[d] = [np.mean(feats[t]["test"] @ centroid[t] >= floor[t]) for t in tasks]
                cross[d] = [np.mean(feats[b]["test"] @ centroid[a] >= floor[a]) for a, b in pairs]
            o, c = own.mean(0), cross.mean(0)
            print(f"  {n:>5}  {o.min():>7.1%}  {o.mean():>8.1%}  " + "  ".join(f"{x:>16.1%}" for x in c))


if __name__ == "__main__":
    main()
