"""The registry on disk.

    <root>/registry.json                         marks the directory as a registry
    <root>/tasks/<task_id>/v0001/task.json       the task card of version 1
                               /key.safetensors  the task key (centroids)
                               /adapter/         the projection: adapter_config.json + adapter_model.safetensors
                               /lora/            LoRA tasks only: a LoRA on the LM in PEFT's own format
    <root>/index/                                derived routing index (see router.py)
    <root>/.staging/                             versions being written

A version is written whole into .staging, fsynced, then renamed into place: rename is atomic, so a reader sees
a complete version or none. Versions are never modified afterwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
VERSION_DIR = re.compile(r"^v(\d{4,})$")


class TaskNotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


def validate_task_id(task_id: str) -> str:
    if not TASK_ID.match(task_id) or ".." in task_id:
        raise ValueError(
            f"invalid task id {task_id!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )
    return task_id


@dataclass(frozen=True)
class TaskKey:
    """What a task looks like: one row per centroid, L2-normalised. Routing uses image + instruction."""

    image: np.ndarray        # [C, image_dim]
    instruction: np.ndarray  # [C, text_dim]
    output: np.ndarray       # [C, text_dim]
    counts: np.ndarray       # [C] samples behind each centroid

    @staticmethod
    def from_embeddings(image: np.ndarray, instruction: np.ndarray, output: np.ndarray) -> "TaskKey":
        """One centroid: the mean of the normalised per-sample embeddings, normalised again."""
        return TaskKey(
            _unit(_unit(image).mean(0, keepdims=True)),
            _unit(_unit(instruction).mean(0, keepdims=True)),
            _unit(_unit(output).mean(0, keepdims=True)),
            np.array([len(image)], dtype=np.int64),
        )

    def merged(self, other: "TaskKey") -> "TaskKey":
        """This key with other's centroids appended: a reused task keeps routing its earlier data too."""
        return TaskKey(*(np.concatenate([a, b]) for a, b in zip(self._parts(), other._parts())))

    @property
    def routing_vectors(self) -> np.ndarray:
        """[C, image_dim + text_dim]: inner product with a query built the same way = cos(image) + cos(instruction)."""
        return np.ascontiguousarray(np.concatenate([self.image, self.instruction], axis=1), dtype=np.float32)

    def _parts(self) -> tuple[np.ndarray, ...]:
        return self.image, self.instruction, self.output, self.counts

    def save(self, path: Path) -> None:
        names = ("image", "instruction", "output", "counts")
        save_file({n: np.ascontiguousarray(p) for n, p in zip(names, self._parts())}, str(path))

    @staticmethod
    def load(path: Path) -> "TaskKey":
        t = load_file(str(path))
        return TaskKey(t["image"], t["instruction"], t["output"], t["counts"])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def routing_query(image: np.ndarray, instruction: np.ndarray) -> np.ndarray:
    """[B, image_dim + text_dim] from raw image features and instruction embeddings."""
    return np.ascontiguousarray(np.concatenate([_unit(image), _unit(instruction)], axis=1), dtype=np.float32)


@dataclass
class TaskCard:
    """task.json: everything an operator needs to know about one task version."""

    task_id: str
    version: int
    adapter_kind: str                       # "eproj" (per-task projection) or "lora"
    decision: dict                          # {"action": "expanded"|"reused", "most_similar", "similarity", "threshold"}
    similarities: dict = field(default_factory=dict)   # {other task: {"image","instruction","output","score"}}
    metrics: dict = field(default_factory=dict)        # accuracy before/after, earlier tasks re-measured
    training: dict = field(default_factory=dict)       # method, hyper-parameters, wall time
    datasets: list = field(default_factory=list)       # every data set this task's adapter was trained on
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @staticmethod
    def from_json(text: str) -> "TaskCard":
        raw = json.loads(text)
        return TaskCard(**{k: v for k, v in raw.items() if k in TaskCard.__dataclass_fields__})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class TaskVersion:
    """A committed task version on disk."""

    card: TaskCard
    path: Path

    @property
    def task_id(self) -> str:
        return self.card.task_id

    @property
    def version(self) -> int:
        return self.card.version

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def lora_dir(self) -> Path | None:
        """The LoRA directory (PEFT's format) of a LoRA task; None for an EProj task."""
        return self.path / "lora" if self.card.adapter_kind == "lora" else None

    def key(self) -> TaskKey:
        return TaskKey.load(self.path / "key.safetensors")


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def open(cls, root: Path, create: bool = False) -> "Registry":
        root = Path(root)
        marker = root / "registry.json"
        if not marker.exists():
            if not create:
                raise FileNotFoundError(f"no registry at {root} (create one with `cit-trainer add-task`)")
            root.mkdir(parents=True, exist_ok=True)
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps({"format": FORMAT_VERSION}, indent=2) + "\n")
        fmt = json.loads(marker.read_text()).get("format")
        if fmt != FORMAT_VERSION:
            raise ValueError(f"registry {root} has format {fmt}; this cit reads format {FORMAT_VERSION}")
        return cls(root)

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    def task_ids(self) -> list[str]:
        if not self.tasks_dir.exists():
            return []
        return sorted(p.name for p in self.tasks_dir.iterdir() if p.is_dir() and self._versions(p.name))

    def _versions(self, task_id: str) -> list[int]:
        d = self.tasks_dir / task_id
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := VERSION_DIR.match(p.name)))

    def get(self, task_id: str, version: int | None = None) -> TaskVersion:
        versions = self._versions(task_id) if TASK_ID.match(task_id) else []
        if not versions or (version is not None and version not in versions):
            raise TaskNotFound(f"no task {task_id!r}" + (f" version {version}" if version else "") + " in the registry")
        version = version or versions[-1]
        path = self.tasks_dir / task_id / f"v{version:04d}"
        return TaskVersion(TaskCard.from_json((path / "task.json").read_text()), path)

    def latest(self) -> list[TaskVersion]:
        """The newest version of every task: what the router serves."""
        return [self.get(t) for t in self.task_ids()]

    def fingerprint(self) -> list[list]:
        """(task id, version) of every served task: the routing index is stale when this changes."""
        return [[t, self._versions(t)[-1]] for t in self.task_ids()]

    def commit(self, card: TaskCard, key: TaskKey, write_adapter: Callable[[Path], None],
               write_lora: Callable[[Path], None] | None = None) -> TaskVersion:
        """Write a new task version atomically. card.version must be the next version of card.task_id.
        write_adapter(dir) writes the projection; write_lora(dir) the LoRA, which a "lora" card must have."""
        if (card.adapter_kind == "lora") != (write_lora is not None):
            raise ValueError(f"a {card.adapter_kind!r} task {'needs' if card.adapter_kind == 'lora' else 'has no'} LoRA")
        validate_task_id(card.task_id)
        expected = (self._versions(card.task_id) or [0])[-1] + 1
        if card.version != expected:
            raise ValueError(f"task {card.task_id!r}: next version is {expected}, not {card.version}")
        staging = self.root / ".staging" / f"{card.task_id}-v{card.version:04d}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            write_adapter(staging / "adapter")
            if write_lora is not None:
                write_lora(staging / "lora")
            key.save(staging / "key.safetensors")
            (staging / "task.json").write_text(card.to_json())
            for f in staging.rglob("*"):
                if f.is_file():
                    _fsync(f)
            for d in [*(p for p in staging.rglob("*") if p.is_dir()), staging]:
                _fsync(d)
            final = self.tasks_dir / card.task_id / f"v{card.version:04d}"
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)  # fails if another writer took this version first: nothing is overwritten
            _fsync(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(card.task_id, card.version)

    def verify(self) -> Iterator[str]:
        """Problems found in the store, one line each (none: the store is sound)."""
        for task_id in self.task_ids():
            for v in self._versions(task_id):
                path = self.tasks_dir / task_id / f"v{v:04d}"
                files = ["task.json", "key.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
                for rel in files:
                    if not (path / rel).is_file():
                        yield f"{task_id} v{v}: missing {rel}"
                try:
                    card = TaskCard.from_json((path / "task.json").read_text())
                    if card.adapter_kind == "lora":
                        for rel in ("lora/adapter_config.json", "lora/adapter_model.safetensors"):
                            if not (path / rel).is_file():
                                yield f"{task_id} v{v}: missing {rel}"
                    if (card.task_id, card.version) != (task_id, v):
                        yield f"{task_id} v{v}: card says {card.task_id} v{card.version}"
                    key = TaskKey.load(path / "key.safetensors")
                    if not (len(key.image) == len(key.instruction) == len(key.output) == len(key.counts) > 0):
                        yield f"{task_id} v{v}: key parts disagree in centroid count"
                except Exception as exc:  # any unreadable file is a finding, not a crash
                    yield f"{task_id} v{v}: unreadable: {exc}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
