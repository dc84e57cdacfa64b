"""Reuse threshold on pairs the routing suite never saw: where do task similarities of each grade fall?

    python bench/reuse_threshold.py [--train 200] [--threshold 0.6]

`add-task` reuses the most similar task's adapter when router.task_similarity reaches the threshold and at least
REUSE_IMAGE_SHARE of the new task's training images clear that task's image floor (router.image_share). The routing
suite (`cit-trainer routing-eval`) measures what reuse costs on its 15 pairs (REUSE_PAIRS); the image gate was added
after its similarities showed the same question over other images reused (0.62-0.80 >= 0.6), so those pairs can no
longer test it. This script keys, as `add-task` keys them (training rows only, no training), pairs of every grade
and marks which were in the suite:
  - redraw: every suite task against a new draw of itself (seed + 100);
  - paraphrase: a new draw asked in wordings written apart from the templates (cit_trainer.data.PARAPHRASES, and
    HELD_OUT_PARAPHRASES below, written for this check before it was first run);
  - same images, new question / same question, new images: the suite's pairs, and two composed here (parity of
    printed digits; the first letter of large words) that no suite step uses;
  - unrelated: tasks of different images and questions.
Printed: each pair's similarity and parts, the share of the second task's training images that clear the first's
image floor (those the router would send to the first task's adapter on their image), per grade the range, and
the decisions at the threshold (wrong ones marked) for the held-out pairs alone and for all.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_registry.router import REUSE_IMAGE_SHARE, REUSE_THRESHOLD, image_share, task_similarity
from cit_registry.taskdata import read_jsonl
from cit_trainer.data import DIGIT_WORDS, PARAPHRASES, TEMPLATES, export_task
from cit_trainer.routing_eval import REUSE_PAIRS, SUITE_TASKS, Grade, paraphrased
from cit_trainer.training import embed_task

# Wordings for the suite's newer tasks, in the style of PARAPHRASES: written for this check, not tuned on it.
HELD_OUT_PARAPHRASES = {
    "fashion-footwear": ["would you put this on your feet?", "Shoe or not shoe? yes/no", "footwear? answer yes or no",
                         "Is the pictured item something worn on the feet?", "Does this count as a shoe, boot or "
                         "sandal?", "Tell me yes if this is footwear, otherwise no"],
    "digits-parity": ["odd or even number?", "Is the handwritten number even, or is it odd?", "parity of this?",
                      "Would this number divide evenly by 2? Say even or odd.", "even/odd", "Decide: odd or even."],
    "words-first-letter": ["first letter?", "What does the written word start with?", "initial letter of the word",
                           "Which letter comes first in this word?", "Give me just the opening letter.",
                           "The word begins with which character?"],
    "printed-digits": ["which number is printed here, in words?", "Spell the digit you can see.", "digit as word",
                       "Read the typed number and answer with its name.", "What's the figure? Write it out.",
                       "Say the number shown, in letters."],
    "words-large": ["what's written?", "Read the big text out.", "word in the image?", "Transcribe the caption.",
                    "What word is displayed in capitals?", "Please read the text."],
    "drawn-shapes": ["circle, rectangle or triangle?", "which figure is outlined?", "shape?",
                     "What geometric form has been drawn here?", "Name the outline's shape.",
                     "Say what shape the lines make."],
}


def rewrite(task_dir: Path, out: Path, templates: str, label) -> Path:
    """A copy of `task_dir` asking another task's question (its training wordings) with `label(output)` as the
    answer (None: leave the row out)."""
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").symlink_to((task_dir / "images").resolve())
    rows = []
    for row in (json.loads(line) for line in (task_dir / "train.jsonl").read_text().splitlines()):
        answer = label(row["output"])
        if answer is not None:
            rows.append(json.dumps({**row, "instruction": rng.choice(TEMPLATES[templates].train), "output": answer}))
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200, help="training rows keyed per task")
    parser.add_argument("--threshold", type=float, default=REUSE_THRESHOLD)
    args = parser.parse_args()
    backbone, embedder = Backbone(), TextEmbedder()
    keys, images = {}, {}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def key(name: str, task_dir: Path):
            if name not in keys:
                embedded = embed_task(backbone, embedder, read_jsonl(task_dir / "train.jsonl"), name)
                keys[name], images[name] = embedded.key(), embedded.routing_image
            return keys[name]

        dirs = {t: export_task(t, root / "first", args.train, 1, seed=0)[0] for t in SUITE_TASKS}
        for t, d in dirs.items():
            key(t, d)
            key(f"{t}-redraw", export_task(t, root / "redraw", args.train, 1, seed=100)[0])
            wordings = PARAPHRASES.get(t) or HELD_OUT_PARAPHRASES[t]
            para = export_task(t, root / "paraphrase", args.train, 1, seed=200)[0]
            paraphrased(para, wordings, 0)
            key(f"{t}-paraphrase", para)
        key("printed-digits-parity", rewrite(dirs["printed-digits"], root / "printed-digits-parity", "digits-parity",
                                             lambda w: "even" if DIGIT_WORDS.index(w) % 2 == 0 else "odd"))
        key("words-large-first-letter", rewrite(dirs["words-large"], root / "words-large-first-letter",
                                                "words-first-letter", lambda w: None if w[0] == "a" else w[0]))

    suite = {(p.first, p.second_dataset) for p in REUSE_PAIRS}
    pairs = [*((Grade.REDRAW, t, f"{t}-redraw") for t in SUITE_TASKS),
             *((Grade.PARAPHRASE, t, f"{t}-paraphrase") for t in SUITE_TASKS),
             *((p.grade, p.first, p.second_dataset) for p in REUSE_PAIRS
               if p.grade in (Grade.NEW_QUESTION, Grade.NEW_IMAGES, Grade.UNRELATED)),
             (Grade.NEW_QUESTION, "printed-digits", "printed-digits-parity"),
             (Grade.NEW_QUESTION, "words-large", "words-large-first-letter"),
             (Grade.NEW_IMAGES, "digits-parity", "printed-digits-parity"),
             (Grade.NEW_IMAGES, "words-first-letter", "words-large-first-letter"),
             (Grade.UNRELATED, "printed-digits", "fashion-mnist"), (Grade.UNRELATED, "words-large", "drawn-shapes"),
             (Grade.UNRELATED, "fashion-footwear", "digits-parity"), (Grade.UNRELATED, "drawn-shapes", "digits")]
    print(f"{args.train} training rows keyed per task; threshold {args.threshold}\n")
    print(f"{'grade':<26} {'first':<19} {'second':<25} {'in suite':>8} {'score':>6} {'image':>6} {'instr':>6} "
          f"{'output':>6} {'images':>6}  decision")
    rows = []
    for grade, a, b in pairs:
        s = task_similarity(keys[a], keys[b])
        inside = image_share(keys[a], images[b])  # the second's training images inside the first's image floor
        similar = s["score"] >= args.threshold
        reuse = similar and inside >= REUSE_IMAGE_SHARE
        wrong = reuse != grade.should_reuse
        rows.append((grade, (a, b) in suite, s["score"], similar != grade.should_reuse, wrong))
        print(f"{grade.value:<26} {a:<19} {b:<25} {'yes' if (a, b) in suite else 'no':>8} {s['score']:6.3f} "
              f"{s['image']:6.3f} {s['instruction']:6.3f} {s['output']:6.3f} {inside:6.1%}  "
              f"{'reuse' if reuse else 'expand'}{'  WRONG' if wrong else ''}")
    print("\nper grade: similarity min - max (held-out pairs only | all pairs)")
    for grade in Grade:
        held = [r[2] for r in rows if r[0] is grade and not r[1]]
        every = [r[2] for r in rows if r[0] is grade]
        span = f"{min(held):.3f} - {max(held):.3f} ({len(held)})" if held else "-"
        print(f"  {grade.value:<26} {span:<24} | {min(every):.3f} - {max(every):.3f} ({len(every)})")
    for label, chosen in (("held-out pairs", [r for r in rows if not r[1]]), ("all pairs", rows)):
        print(f"decisions against the grade, {label} ({len(chosen)}): similarity >= {args.threshold} alone "
              f"{sum(r[3] for r in chosen)}, with >= {REUSE_IMAGE_SHARE:.0%} of the images inside the floor "
              f"{sum(r[4] for r in chosen)}")


if __name__ == "__main__":
    main()
