"""Routing under new wording: do held-out wordings of a task route to it, and new questions and unrelated images fall back?

    python bench/routing_scores.py [--images 60]

The five exported tasks are keyed as `add-task` keys them (centroids and floors from the training rows, training
wordings only). Then five kinds of request, on test images:
  - held-out: the task's own images, asked with its held-out wordings (must route to it);
  - paraphrase: the same images asked with wordings written apart from the templates (must route to it);
  - new question: the same images asked something no task was trained on (must fall back), including the
    shape task's images asked for their colour with the colour task left out, and the other way round;
  - unrelated: photos (scikit-learn's sample images, random crops) with questions of their own (must fall back);
  - photo, a task's question: the same photos asked a task's held-out wording (must fall back: new images).
First the routing rule itself (Router.route at the default margin, with the background questions), then, for
several ways of forming one score, the spread of the own-task score of held-out requests and of the best score of
the requests that must fall back, and the best single threshold (an optimistic bound: chosen on these requests).

Score forms compared:
  centroid       cos(image key) + cos(instruction key)          (what FAISS ranks by)
  per-wording    cos(image key) + max over training wordings of cos(wording)
  instruction    cos(instruction key) alone                      (the image part left out)
  per-wording-i  max over training wordings of cos(wording) alone
  image          cos(image key) alone
The new questions and the photo questions below are probes kept out of every training wording.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_registry.router import Router, background_questions
from cit_registry.store import routing_query
from cit_registry.taskdata import read_jsonl
from cit_trainer.data import PARAPHRASES, TEMPLATES, export_task, load_images
from cit_trainer.training import embed_task

TASKS = ("fashion-mnist", "digits", "words", "easyvqa-shape", "easyvqa-color")
NEW_QUESTIONS = {
    "fashion-mnist": ["Is this item worn on the feet?", "What colour is this garment?",
                      "How many sleeves does it have?", "Would you wear this in winter?",
                      "Is this item for men or women?", "What material is this made of?", "How much would this cost?",
                      "Is the image blurry?", "What brand is this?"],
    "digits": ["Is the number even or odd?", "What is this number plus one?", "How many loops does the digit have?",
               "Is the digit written with a thick stroke?", "Is this digit greater than five?",
               "Who wrote this digit?", "What is the square of this number?", "Is the image upside down?",
               "How many pixels wide is the image?"],
    "words": ["How many letters does the word have?", "What colour is the background?",
              "What is the first letter of the word?", "Is the text written in capitals?",
              "What language is the word in?", "Translate the word into French.", "What font is used?",
              "Is the word a noun?", "What is the last letter?"],
    "easyvqa-shape": [*TEMPLATES["easyvqa-color"].held_out, "Is the shape large or small?", "How big is the shape?",
                      "Is there more than one shape?", "Is the background white?"],
    "easyvqa-color": [*TEMPLATES["easyvqa-shape"].held_out, "Where in the image is the shape?",
                      "How many corners does the shape have?", "Is the shape on the left?", "Is the shape large?"],
}
# Leave one task out: the shape task's images asked for their colour must fall back while the colour task is not
# registered (and route to it once it is: not measured here).
LEFT_OUT = {"easyvqa-shape": "easyvqa-color", "easyvqa-color": "easyvqa-shape"}
PHOTO_QUESTIONS = ["What animal is in this photo?", "Describe the scene.", "What is the weather like?",
                   "How many people are there?", "What is the colour of the roof?", "Is this photo taken indoors?"]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def photos(n: int, rng: random.Random) -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    out = []
    for _ in range(n):
        img = Image.fromarray(rng.choice(load_sample_images().images))
        w, h = img.size
        s = rng.randint(min(w, h) // 4, min(w, h))
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        out.append(img.crop((x, y, x + s, y + s)))
    return out


def spread(x) -> str:
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return "min {:.2f}  p5 {:.2f}  p50 {:.2f}  p95 {:.2f}  max {:.2f}".format(*q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="test images per task (and photos)")
    parser.add_argument("--train", type=int, default=300, help="training rows per task key")
    args = parser.parse_args()
    backbone, embedder, rng = Backbone(), TextEmbedder(), random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        keys, images = {}, {}
        for name in TASKS:
            task_dir, _ = export_task(name, Path(tmp), args.train, args.images)
            train = read_jsonl(task_dir / "train.jsonl")
            key = embed_task(backbone, embedder, train, f"{name} train").key()  # add-task's own key
            keys[name] = (key.image[0], key.instruction[0], embedder.embed(sorted({s.instruction for s in train})), key)
            test = [s for s in read_jsonl(task_dir / "test.jsonl") if s.template == "held-out"]
            images[name] = (unit(backbone.routing_features(backbone.encode_images(load_images(test))).numpy()),
                            [s.instruction for s in test])
        requests = []  # (kind, own task or None, image vectors, instructions)
        for name in TASKS:
            img, held_out = images[name]
            requests.append(("held-out", name, img, held_out, None))
            requests.append(("paraphrase", name, img, [rng.choice(PARAPHRASES[name]) for _ in held_out], None))
            requests.append(("new question", None, img, [rng.choice(NEW_QUESTIONS[name]) for _ in held_out],
                             LEFT_OUT.get(name)))
        pics = photos(args.images, rng)
        pic_features = unit(backbone.routing_features(backbone.encode_images(pics)).numpy())
        requests.append(("unrelated", None, pic_features, [rng.choice(PHOTO_QUESTIONS) for _ in pics], None))
        requests.append(("photo, a task's question", None, pic_features,  # the same question of new images
                         [rng.choice(TEMPLATES[rng.choice(TASKS)].held_out) for _ in pics], None))

    forms = {
        "centroid": lambda ci, ti, tw: ci + ti,
        "per-wording": lambda ci, ti, tw: ci + tw,
        "instruction": lambda ci, ti, tw: ti,
        "per-wording-i": lambda ci, ti, tw: tw,
        "image": lambda ci, ti, tw: ci,
    }
    print(f"{args.images} test images per task, keys from {args.train} training rows (5 training wordings each)")
    background = embedder.embed(background_questions())
    print(f"\nthe routing rule (Router.route, margin 0; {len(background)} background questions):")
    print("  floors (image, instruction): " + ", ".join(
        f"{t} ({keys[t][3].routing_floors[0, 0]:.2f}, {keys[t][3].routing_floors[0, 1]:.2f})" for t in TASKS))
    for kind in ("held-out", "paraphrase", "new question", "unrelated", "photo, a task's question"):
        ok, total, reasons = 0, 0, Counter()
        for k, task, img, instructions, left_out in requests:
            if k != kind:
                continue
            router = Router.of_keys([(t, 1, keys[t][3]) for t in TASKS if t != left_out])
            for r in router.route(routing_query(img, embedder.embed(instructions)), background):
                total += 1
                ok += (r.chosen is not None and r.chosen.task_id == task) if task else r.chosen is None
                reasons[r.fell_back.name.lower() if r.fell_back else f"-> {r.chosen.task_id}"] += 1
        goal = "routed to its own task" if kind in ("held-out", "paraphrase") else "fell back"
        print(f"  {kind + ':':<26} {ok / total:6.1%} {goal} (of {total}); {dict(reasons.most_common(4))}")
    for form, score_of in forms.items():
        own, unknown, wrong = [], {"new question": [], "unrelated": [], "photo, a task's question": []}, 0
        for kind, task, img, instructions, left_out in requests:
            if kind == "paraphrase":
                continue
            text = embedder.embed(instructions)
            scores = np.stack([score_of(img @ keys[t][0], text @ keys[t][1], (text @ keys[t][2].T).max(1))
                               if t != left_out else np.full(len(img), -np.inf) for t in TASKS], axis=1)
            if task is None:
                unknown[kind] += list(scores.max(1))
            else:
                own += list(scores[:, TASKS.index(task)])
                wrong += int((scores.argmax(1) != TASKS.index(task)).sum())
        must_fall = np.array(unknown["new question"] + unknown["unrelated"])
        own = np.array(own)
        cuts = np.unique(np.concatenate([own, must_fall]))
        balanced = [((own >= c).mean() + (must_fall < c).mean()) / 2 for c in cuts]
        best = cuts[int(np.argmax(balanced))]
        print(f"\n{form}:")
        print(f"  held-out wordings, own task          {spread(own)}   (not the best task: {wrong} of {len(own)})")
        for kind, vals in unknown.items():
            print(f"  {kind + ', best task':<36} {spread(vals)}")
        print(f"  best single threshold {best:.2f} (chosen on these requests): held-out routed {(own >= best).mean():.1%}, "
              f"must-fall-back fell back {(must_fall < best).mean():.1%}")


if __name__ == "__main__":
    main()
