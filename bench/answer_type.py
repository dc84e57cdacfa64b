"""Does the shared LM tell a task's question from a new question over the same images, where MiniLM cannot?

    python bench/answer_type.py

Routing misses its fall-back goal on new questions over familiar images (docs/USAGE.md, "Routing under wording a
task never saw"): all-MiniLM-L6-v2 places "Is the digit even or odd?" as close to the digits task's wordings as the
task's own held-out ones. A question says what kind of answer it wants, and the LM that answers it knows: its state
at the answer position (text only: the chat prompt with the instruction and no image) is an embedding of the
expected answer. Compared, per task (keys and floors from its five training wordings, as add-task forms them):
  minilm       cos(MiniLM(instruction), centroid) vs the leave-one-wording-out floor (the router's instruction floor)
  lm-answer    the same with the LM's final hidden state at the answer position in place of MiniLM
  lm-mid       the same with the middle layer's state at the answer position
  lm-*-c       the same states centred on the mean state of the 107 background questions (the raw states share
               one large direction: every cosine is near 1)
  both         minilm and lm-answer-c floors both cleared
  label-mass   log P(answer is one of the task's labels | instruction) against the lowest over training wordings,
               less log 10
Must route (pass): held-out templates, PARAPHRASES, and PROBE_SAME below. Must fall back (fail): the other suite
tasks' wordings over the same images, bench/routing_scores.py's NEW_QUESTIONS, and PROBE_NEW below.
PROBE_SAME / PROBE_NEW were written on 2026-12-07 before anything here was measured and are not used to choose
anything: they are the clean hold-out (the others were looked at when the current rule was chosen).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from routing_scores import NEW_QUESTIONS, unit

from cit_backbone.embedder import TextEmbedder
from cit_backbone.language_model import LanguageModel
from cit_registry.router import background_questions
from cit_registry.store import instruction_floor
from cit_trainer.data import DIGIT_WORDS, FASHION_CLASSES, PARAPHRASES, TEMPLATES, WORDS

LABELS = {
    "fashion-mnist": FASHION_CLASSES, "digits": DIGIT_WORDS, "words": WORDS,
    "easyvqa-shape": ["circle", "rectangle", "triangle"],
    "easyvqa-color": ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"],
    "fashion-footwear": ["yes", "no"], "digits-parity": ["even", "odd"],
    "words-first-letter": sorted({w[0] for w in WORDS if w[0] != "a"}),
}
# Tasks over the same images (the routing suite's "same images, new question" pairs, both ways)
SAME_IMAGES = {"fashion-mnist": ["fashion-footwear"], "fashion-footwear": ["fashion-mnist"],
               "digits": ["digits-parity"], "digits-parity": ["digits"], "words": ["words-first-letter"],
               "words-first-letter": ["words"], "easyvqa-shape": ["easyvqa-color"], "easyvqa-color": ["easyvqa-shape"]}
PROBE_SAME = {
    "fashion-mnist": ["What is this garment called?", "Tell me the clothing category.",
                      "Which kind of apparel is in the photo?", "What sort of clothes are these?"],
    "digits": ["What digit is this, in words?", "Spell the number you see.",
               "Which number between zero and nine was written? Use a word.", "Write the digit shown as an English word."],
    "words": ["What is the word in the picture?", "Read out the word.", "Which word is shown?",
              "Tell me what the text says."],
    "easyvqa-shape": ["Which shape is this?", "What geometric shape can you see?", "Name the shape.",
                      "Is the object round, rectangular or triangular?"],
    "easyvqa-color": ["What colour is it?", "Tell me the color of the object.", "Which color is the figure painted in?",
                      "What is the shape's color?"],
    "fashion-footwear": ["Is this a shoe? yes or no", "Does this go on your feet?",
                         "Is the pictured item a piece of footwear?", "Answer yes or no: is this footwear?"],
    "digits-parity": ["Odd or even?", "Is this number odd?", "Tell me if the digit is even or odd.",
                      "Parity of the handwritten number?"],
    "words-first-letter": ["What letter does this word begin with?", "Starting letter of the word?",
                           "Give me the word's first character.", "Which letter opens the word?"],
}
PROBE_NEW = {
    "fashion-mnist": ["Is this garment suitable for a formal event?", "What season is this item for?",
                      "Does this have long sleeves?", "Is the clothing item folded?"],
    "digits": ["Is the digit a prime number?", "How many strokes were used to write this?",
               "Was this written by a child?", "Is this digit larger than three?"],
    "words": ["How many vowels are in the word?", "Is the word written in bold?",
              "What is the word spelled backwards?", "Does the word rhyme with 'cat'?"],
    "easyvqa-shape": ["How many sides does the shape have?", "Is the shape filled in?",
                      "What is the area of the shape?", "Is the shape centred?"],
    "easyvqa-color": ["Is the shape bright or dark?", "How wide is the shape?", "Is the shape touching the edge?",
                      "What shape is the coloured object?"],
    "fashion-footwear": ["Is this item worn on the head? Answer yes or no.", "Is this a top? Answer yes or no.",
                         "What is this item made of?", "What size is this?"],
    "digits-parity": ["Is the digit bigger than five? yes or no", "Which digit is it?",
                      "How tall is the digit?", "Is the ink dark?"],
    "words-first-letter": ["What is the last letter of the word?", "How many letters are in the word?",
                           "Which vowel appears first in the word?", "What word is it?"],
}


class AnswerSide:
    """The LM, text only: its states at the answer position and the log-probability of a label set."""

    def __init__(self) -> None:
        self.lm = LanguageModel()
        self.model = self.lm.model
        self._states: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # each space asks again for the same wordings

    def prompt(self, instruction: str) -> list[int]:
        before, after = self.lm.prompt.texts(instruction)
        return self.lm.encode(before) + self.lm.encode(after)

    @torch.no_grad()
    def states(self, instructions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        for q in instructions:
            if q not in self._states:
                out = self.model.model(input_ids=torch.tensor([self.prompt(q)]), output_hidden_states=True)
                hs = out.hidden_states
                self._states[q] = (out.last_hidden_state[0, -1].float().numpy(), hs[len(hs) // 2][0, -1].float().numpy())
        last, mid = zip(*(self._states[q] for q in instructions))
        return unit(np.stack(last)), unit(np.stack(mid))

    @torch.no_grad()
    def label_mass(self, instruction: str, labels: list[str]) -> float:
        """log sum over labels of P(label, then end of turn | prompt)."""
        prompt = self.prompt(instruction)
        rows = [prompt + self.lm.answer_ids(lab) for lab in labels]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        logp = torch.log_softmax(self.model(input_ids=ids).logits.float(), -1)
        total = []
        for i, r in enumerate(rows):
            pos = torch.arange(len(prompt) - 1, len(r) - 1)
            total.append(logp[i, pos, torch.tensor(r[len(prompt):])].sum())
        return float(torch.logsumexp(torch.stack(total), 0))


def floor_of(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """Centroid and the router's instruction floor (store.instruction_floor), whatever the space."""
    return unit(vectors.mean(0)), instruction_floor(vectors)


def main() -> None:
    side, embedder = AnswerSide(), TextEmbedder()
    # The LM's states share a large common direction (every cosine is near 1): centre them on the background
    # questions' mean (questions of all kinds, router.background_questions) before comparing.
    bg_last, bg_mid = side.states(background_questions())
    centre_last, centre_mid = bg_last.mean(0), bg_mid.mean(0)
    spaces = {"minilm": lambda qs: unit(embedder.embed(qs)), "lm-answer": lambda qs: side.states(qs)[0],
              "lm-mid": lambda qs: side.states(qs)[1],
              "lm-answer-c": lambda qs: unit(side.states(qs)[0] - centre_last),
              "lm-mid-c": lambda qs: unit(side.states(qs)[1] - centre_mid)}
    groups: dict[str, list[tuple[str, str, bool]]] = {}  # kind -> (task, instruction, must pass)
    for task in LABELS:
        t = TEMPLATES[task]
        groups.setdefault("held-out template", []).extend((task, q, True) for q in t.held_out)
        groups.setdefault("paraphrase (looked at)", []).extend((task, q, True) for q in PARAPHRASES.get(task, []))
        groups.setdefault("probe paraphrase (clean)", []).extend((task, q, True) for q in PROBE_SAME[task])
        groups.setdefault("other task, same images", []).extend(
            (task, q, False) for other in SAME_IMAGES[task] for q in TEMPLATES[other].train + TEMPLATES[other].held_out)
        groups.setdefault("new question (looked at)", []).extend((task, q, False) for q in NEW_QUESTIONS.get(task, []))
        groups.setdefault("probe new question (clean)", []).extend((task, q, False) for q in PROBE_NEW[task])
    passes: dict[str, dict[str, list[bool]]] = {}
    for name, space in spaces.items():
        keys = {task: floor_of(space(list(TEMPLATES[task].train))) for task in LABELS}
        above: dict[bool, list[float]] = {True: [], False: []}
        for kind, rows in groups.items():
            vec = space([q for _, q, _ in rows])
            over = [float(v @ keys[task][0]) - keys[task][1] for (task, _, _), v in zip(rows, vec)]
            passes.setdefault(name, {})[kind] = [o >= 0 for o in over]
            above[rows[0][2]] += over
        pos, neg = np.array(above[True]), np.array(above[False])
        auc = float((pos[:, None] > neg[None, :]).mean())
        print(f"{name}: cosine - floor, must route p5 {np.percentile(pos, 5):+.2f} p50 {np.median(pos):+.2f}; "
              f"must fall back p50 {np.median(neg):+.2f} p95 {np.percentile(neg, 95):+.2f}; AUC {auc:.3f}")
    mass_floor = {task: min(side.label_mass(q, LABELS[task]) for q in TEMPLATES[task].train) - np.log(10)
                  for task in LABELS}
    passes["label-mass"] = {kind: [side.label_mass(q, LABELS[task]) >= mass_floor[task] for task, q, _ in rows]
                            for kind, rows in groups.items()}
    passes["both"] = {kind: [a and b for a, b in zip(passes["minilm"][kind], passes["lm-answer-c"][kind])]
                      for kind in groups}
    print("per kind: the share that clears the task's floor (must pass: routed; must fail: fell back = 1 - share)\n")
    print(f"{'kind':<28}{'n':>4}  " + "".join(f"{n:>12}" for n in passes))
    for kind, rows in groups.items():
        must = rows[0][2]
        cells = "".join(f"{(np.mean(p[kind]) if must else 1 - np.mean(p[kind])):>12.1%}" for p in passes.values())
        print(f"{kind + (' [route]' if must else ' [fall]'):<28}{len(rows):>4}  {cells}")
    print("\nper task, clean probes: routed paraphrases / fallen-back new questions")
    for name, p in passes.items():
        per_task = []
        for task in LABELS:
            same = [ok for (t, _, _), ok in zip(groups["probe paraphrase (clean)"], p["probe paraphrase (clean)"]) if t == task]
            new = [not ok for (t, _, _), ok in zip(groups["probe new question (clean)"], p["probe new question (clean)"]) if t == task]
            per_task.append(f"{task.split('-')[-1][:6]} {sum(same)}/{len(same)} {sum(new)}/{len(new)}")
        print(f"  {name:<11} " + " | ".join(per_task))
    print("\nmissed (both): " + "; ".join(
        f"{task}: {q!r}" for kind, rows in groups.items() for (task, q, must), ok in zip(rows, passes["both"][kind])
        if ok != must))


if __name__ == "__main__":
    main()
