"""Tasks in the paper's uniform format: JSONL lines {"image": path, "instruction": str, "output": str}.

Image paths are relative to the JSONL file. A task directory holds train.jsonl, test.jsonl and images/.
Shared by the trainer and the client's evaluation; needs neither torch nor PIL.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    image: Path
    instruction: str
    output: str


def read_jsonl(path: Path) -> list[Sample]:
    """Read a task file; errors name the line so a user can fix the file."""
    path = Path(path)
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            sample = Sample(path.parent / row["image"], str(row["instruction"]), str(row["output"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{image, instruction, output}}: {exc}") from None
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


def normalise_answer(text: str) -> str:
    """Exact match after case, whitespace and trailing punctuation are set aside."""
    return " ".join(text.strip().lower().rstrip(".!").split())
