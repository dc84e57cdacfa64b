"""Snapshots of samples kept inside a task version: eval/<data set>/ holds the held-out samples a data set was
measured on when it was trained, so that a later re-measurement reads the registry itself, covered by the version's
manifest, and never a path written in a card; replay/<data set>/ holds training samples that a reused adapter
trains on again beside its new data. No torch, no PIL: images are copied as the bytes they are."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .store import SNAPSHOT_IMAGE_SUFFIXES, TASK_ID
from .taskdata import Sample, read_jsonl

SAMPLES = "samples.jsonl"
REPLAY_SAMPLES = 500  # training samples of each data set a version keeps, replayed when its adapter is reused
IMAGE = re.compile(r"images/\d{5}\.[a-z]{3,4}")  # the only image paths a snapshot may name


def snapshot_dir(snapshots: Path, dataset: str) -> Path:
    """eval/<data set> or replay/<data set> of a version; the name (from a card) must be a plain task-id-like name."""
    if not isinstance(dataset, str) or not TASK_ID.fullmatch(dataset) or ".." in dataset:
        raise ValueError(f"data set name {dataset!r} cannot name a snapshot")
    return snapshots / dataset


def write_snapshot(directory: Path, samples: list[Sample]) -> None:
    """Copy the samples' images into directory/images/ and list them in directory/samples.jsonl."""
    (directory / "images").mkdir(parents=True)
    rows = []
    for i, sample in enumerate(samples):
        suffix = Path(sample.image).suffix.lower()
        name = f"images/{i:05d}{suffix if suffix in SNAPSHOT_IMAGE_SUFFIXES else '.img'}"
        shutil.copyfile(sample.image, directory / name)
        rows.append({"image": name, "instruction": sample.instruction, "output": sample.output,
                     **({"template": sample.template} if sample.template else {})})
    (directory / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))


def copy_snapshot(source: Path, directory: Path) -> None:
    """A snapshot carried into a newer version (a reused adapter keeps re-measuring and replaying its earlier data
    sets)."""
    read_snapshot(source)  # refuse to carry a malformed one forward
    shutil.copytree(source, directory)


def read_snapshot(directory: Path) -> list[Sample]:
    """The samples of a snapshot; ValueError when it names any file outside its own images/."""
    samples = read_jsonl(directory / SAMPLES)
    for sample in samples:
        rel = sample.image.relative_to(directory).as_posix() if sample.image.is_relative_to(directory) else ""
        if not IMAGE.fullmatch(rel):
            raise ValueError(f"{directory}: a snapshot names {str(sample.image)!r}, not one of its own images")
    return samples
