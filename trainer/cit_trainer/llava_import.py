"""LLaVA / CoIN-style instruction data into cit's task format (`cit-trainer import-llava`).

Accepted records (a JSON list, or JSON lines), each with an image path relative to `images`:
- LLaVA's conversations, as LLaVA-1.5 and CoIN's training files write them:
  {"id": ..., "image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"},
   {"from": "gpt", "value": "A"}, ...]}
  Each human turn and the assistant turn after it become one row on the same image (cit serves one user turn; a
  later turn loses the earlier ones as context: counted and reported).
- flat question/answer records, as CoIN's evaluation files and most VQA sets write them:
  {"image": ..., "text"|"question"|"instruction": Q, "answer"|"output"|"gpt": A}.
The `<image>` placeholder is removed (cit puts the image before the instruction itself). Records without an
image (text-only turns), images that do not exist and image paths that leave `images` are skipped and counted.
Images are hard-linked into the task's images/ (copied across file systems). Without a separate test file, the
test split is drawn by image, so no image is in both.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_TOKEN = re.compile(r"\s*<image>\s*")
QUESTION_KEYS = ("text", "question", "instruction")
ANSWER_KEYS = ("answer", "output", "gpt")


@dataclass
class ImportReport:
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows written
    skipped: dict[str, int] = field(default_factory=dict)  # why -> records or turns

    def skip(self, why: str, n: int = 1) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + n


def _records(path: Path) -> list[dict]:
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of records (objects)")
    return data


def _pairs(record: dict, report: ImportReport) -> list[tuple[str, str]]:
    """(instruction, answer) pairs of one record."""
    if "conversations" in record:
        turns, pairs = record["conversations"], list[tuple[str, str]]()
        if not isinstance(turns, list):
            report.skip("conversations that are not a list")
            return []
        for human, gpt in zip(turns[::2], turns[1::2]):
            if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human"
                    and gpt.get("from") == "gpt"):
                report.skip("conversations not alternating human / gpt")
                return pairs
            pairs.append((str(human.get("value", "")), str(gpt.get("value", ""))))
        if len(pairs) > 1:  # not skipped: imported, and reported
            report.skip("later turns imported without the turns before them", len(pairs) - 1)
        return pairs
    question = next((record[k] for k in QUESTION_KEYS if k in record), None)
    answer = next((record[k] for k in ANSWER_KEYS if k in record), None)
    if question is None or answer is None:
        report.skip("records with neither conversations nor a question and an answer")
        return []
    return [(str(question), str(answer))]


def _rows(records: list[dict], images: Path, report: ImportReport) -> list[tuple[Path, str, str]]:
    rows = []
    for record in records:
        if not record.get("image"):
            report.skip("records without an image")
            continue
        image = (Path(images) / str(record["image"])).resolve()
        if not image.is_relative_to(Path(images).resolve()):  # "../../home/x/.ssh/id_rsa" would be linked in
            report.skip("records whose image path leaves --images")
            continue
        if not image.is_file():
            report.skip("records whose image does not exist")
            continue
        for question, answer in _pairs(record, report):
            question, answer = IMAGE_TOKEN.sub(" ", question).strip(), answer.strip()
            if not question or not answer:
                report.skip("turns with an empty question or answer")
                continue
            rows.append((image, question, answer))
    return rows


def import_llava(data: Path, images: Path, out: Path, test: Path | None = None, test_fraction: float = 0.1,
                 seed: int = 0) -> ImportReport:
    """Write <out>/{train,test}.jsonl and <out>/images/ from LLaVA / CoIN-style records (see the module)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    report = ImportReport()
    train_rows = _rows(_records(data), images, report)
    if test is not None:
        test_rows = _rows(_records(test), images, report)
    else:  # split by image: every row of an image goes to the same side
        distinct = sorted({r[0] for r in train_rows})
        random.Random(seed).shuffle(distinct)
        held = set(distinct[: round(test_fraction * len(distinct))])
        test_rows = [r for r in train_rows if r[0] in held]
        train_rows = [r for r in train_rows if r[0] not in held]
    if not train_rows:
        raise ValueError(f"{data}: no usable rows (skipped: {report.skipped})")
    out = Path(out)
    if out.resolve().is_relative_to(Path(images).resolve()):  # writing images/ there could replace a source image
        raise ValueError(f"--out {out} lies inside --images {images}: choose a directory outside it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    names: dict[Path, str] = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        if not rows:  # no file of an earlier import may stay, naming images this import renumbered
            (out / f"{split}.jsonl").unlink(missing_ok=True)
            continue
        lines = []
        for image, question, answer in rows:
            if image not in names:
                names[image] = f"images/{len(names):06d}{image.suffix.lower() or '.img'}"
                _place(image, out / names[image])
            lines.append(json.dumps({"image": names[image], "instruction": question, "output": answer}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        report.rows[split] = len(lines)
    return report


def _place(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)
