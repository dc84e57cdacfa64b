"""Tasks in the paper's uniform format: JSONL lines {"image": path, "instruction": str, "output": str}, plus an
optional "template": "train" | "held-out" saying whether the row's instruction wording is one the task trains on
or one kept out of training (test files carry both, so that answers under unseen wording are measured).

Image paths are relative to the JSONL file. A task directory holds train.jsonl, test.jsonl and images/.
Shared by the trainer and the client's evaluation; needs neither torch nor PIL.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

TEMPLATE_KINDS = ("train", "held-out")


@dataclass(frozen=True)
class Sample:
    image: Path
    instruction: str
    output: str
    template: str | None = None  # "train", "held-out", or None where the file does not say


def read_jsonl(path: Path) -> list[Sample]:
    """Read a task file; errors name the line so a user can fix the file."""
    path = Path(path)
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            sample = Sample(path.parent / row["image"], str(row["instruction"]), str(row["output"]),
                            row.get("template"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{image, instruction, output}}: {exc}") from None
        if sample.template not in (None, *TEMPLATE_KINDS):
            raise ValueError(f"{path}:{n}: template must be one of {', '.join(TEMPLATE_KINDS)}, "
                             f"not {sample.template!r}")
        if not sample.instruction.strip() or not sample.output.strip():
            raise ValueError(f"{path}:{n}: instruction and output must be non-empty")
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def resolve_task_files(path: Path) -> tuple[Path, Path | None]:
    """A task directory (train.jsonl [+ test.jsonl]) or a JSONL file [+ a sibling test.jsonl]."""
    path = Path(path)
    if path.is_dir():
        train = path / "train.jsonl"
        if not train.exists():
            raise FileNotFoundError(f"{path} has no train.jsonl")
    elif path.exists():
        train = path
    else:
        raise FileNotFoundError(f"no task file or directory at {path}")
    test = train.parent / "test.jsonl"
    return train, (test if test.exists() and test != train else None)


ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """What answers are compared on (SQuAD's normalisation): Unicode NFKC, lower case, every punctuation mark
    and symbol made a space, the articles a/an/the dropped, runs of white space made one space.
    "The T-shirt." and "t shirt" are the same answer; "four\nfour" is not "four"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(ARTICLES.sub(" ", text).split())


class Verdict(str, Enum):
    CORRECT = "correct"
    FORMAT = "format"        # the expected answer is there, with more around it (a run-on turn, quotes, a sentence)
    KNOWLEDGE = "knowledge"  # the expected answer is not there: a wrong label


def judge(prediction: str, expected: str) -> Verdict:
    """Exact match after normalise_answer; a miss that still contains the expected answer as whole words is a
    format error, any other miss a knowledge error (saved with each prediction, so the two can be told apart)."""
    got, want = normalise_answer(prediction), normalise_answer(expected)
    if got == want:
        return Verdict.CORRECT
    if want and f" {want} " in f" {got} ":
        return Verdict.FORMAT
    return Verdict.KNOWLEDGE


def accuracy_by_template(samples: list[Sample], correct: list[bool]) -> dict[str, float]:
    """Accuracy over the rows of each template kind the samples are marked with (none: an empty dict)."""
    out = {}
    for kind in TEMPLATE_KINDS:
        flags = [c for s, c in zip(samples, correct) if s.template == kind]
        if flags:
            out[kind] = sum(flags) / len(flags)
    return out
