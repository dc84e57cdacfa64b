"""The registry on disk.

    <root>/registry.json                         format, and the backbone its tasks fit (recorded at the first
                                                 commit: identity, widths of keys, projections and LoRAs)
    <root>/generation                            a counter bumped by every change: change detection is one read
    <root>/history.jsonl                         every change, one JSON line each: which version of each task
                                                 serves follows from it (lifecycle.py)
    <root>/tasks/<task_id>/v0001/task.json       the task card of version 1
                               /key.safetensors  the task key (centroids)
                               /adapter/         the projection: adapter_config.json + adapter_model.safetensors
                               /lora/            LoRA tasks only: a LoRA on the LM in PEFT's own format
                               /method/          shared-connector tasks only: the method's memory
                               /eval/            optional: held-out evaluation snapshots, one folder a data set
                               /manifest.json    sha256 of every other file of the version
    <root>/index/                                derived routing index (see router.py)
    <root>/.staging/                             versions being written
    <root>/.lock                                 held (flock) by the one process writing versions
    <root>/.history.lock                         held (flock) briefly by whoever appends to the history: a task
                                                 can be retired or rolled back while add-task trains

A version is written whole into .staging, fsynced, then renamed into place and the directories that gained an
entry are fsynced: rename is atomic, so a reader sees a complete version or none, and a version is durable once
commit returns (power loss included: scripts/crash_states.py checks the crash states POSIX allows that differ from
"everything kept" or "only what was fsynced kept" in one file or directory). Versions are never modified afterwards
(migrate only adds a manifest to a version that has none); the manifest lets `verify` prove it. One writer at a
time: a second gets RegistryLocked at once, with the holder's pid. A writer that was killed leaves at most a
directory in .staging, which the next writer removes. Names read from a card or a bundle become paths only after a
check that they stay inside (`_stays_inside`, `snapshots.snapshot_dir`); no path written in a card is ever opened.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import IO

import jsonschema
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from .lifecycle import HISTORY, Action, Change, Lifecycle, append_change, history_problems, read_history

log = logging.getLogger("cit.registry")
# 2: registry.json records the backbone; the generation counter. 3: history.jsonl decides which version serves
# (a format-2 reader would serve retired tasks and candidates). Older formats: `cit-registry migrate`.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
GENERATION = "generation"
BUNDLE_FORMAT = 2   # 2: bundle.json carries its registry's backbone record; format 1 bundles still import
# A bundle is refused beyond these (a tar can claim any size; sparse members claim it for free).
MAX_BUNDLE_MEMBERS = 20_000
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_BUNDLE_BYTES = 1024 * 1024 * 1024
# What each adapter kind's version holds besides task.json and key.safetensors, and each part's files.
# "shared": a task trained with a shared-connector method (seqft, ewc, ...): adapter/ is the one connector all
# tasks of that method share, as it stood after this task; the newest such version serves them all.
PARTS = {"eproj": ("adapter",), "lora": ("adapter", "lora"), "shared": ("adapter", "method")}
# held-out evaluation snapshots and replayed training samples (cit_registry.snapshots), any adapter kind
OPTIONAL_PARTS = ("eval", "replay")
# a snapshot's images keep their bytes and suffix (".img": a suffix not listed here); PIL reads them by content
SNAPSHOT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".img")
PART_FILES = {"adapter": ("adapter_config.json", "adapter_model.safetensors"),
              "lora": ("adapter_config.json", "adapter_model.safetensors"),
              "method": ("state.json", "state.safetensors")}
TASK_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # used with fullmatch: "$" would let a trailing newline in
VERSION_DIR = re.compile(r"v(\d{4,})")


class TaskNotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


class RegistryLocked(RuntimeError):
    """Another process is writing the registry."""


class LockNotExclusive(RegistryLocked):
    """The registry's file system takes flock without excluding other processes: two writers could interleave."""


# What a process that tries the write lock while this one holds it runs: exit 3 when it could take it too.
_LOCK_PROBE = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\ntry:\n"
               "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(0)\nsys.exit(3)")
_EXCLUSIVE_LOCKS: set[Path] = set()  # registry directories whose write lock was seen to keep another process out


class LifecycleError(ValueError):
    """A lifecycle change that does not apply to the task as it stands (FAILED_PRECONDITION over gRPC)."""


class BundleError(ValueError):
    """A task bundle is malformed, tampered with, or does not fit the registry."""


class InvalidCard(ValueError):
    """A task card does not match the card schema."""


class BackboneMismatch(ValueError):
    """A task's key or adapter does not fit the backbone this registry's tasks were trained on."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def validate_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id) or ".." in task_id:
        raise ValueError(
            f"invalid task id {task_id!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )
    return task_id


# A task's floors: how like its own training data a request must be to be routed to it (router.Router.route).
# image: the 1st percentile of its training images' cosines to their centroid, less IMAGE_SLACK. The vision tower's
# pooled features are non-negative, so unrelated images still score 0.3-0.7; a floor only tells a task's images from
# others' of the same kind (printed digits from handwritten ones) when it sits just below the task's own spread
# (docs/routing/image-floors.txt: a task's own held-out images pass >= 98 % from 100 training images on, 97 % at
# 50, 89 % at 20; the images of the suite's tasks asking the same question of other images pass 0-17 %).
# instruction: leave one wording out — the lowest cosine of a training wording to the centroid of the others, less
# INSTRUCTION_SLACK: how far a wording the task never saw may be expected to fall. A task trained on a single
# wording has no such estimate and gets DEFAULT_INSTRUCTION_FLOOR, as do keys written before floors existed (both
# floors default then).
IMAGE_SLACK, DEFAULT_IMAGE_FLOOR = 0.03, 0.5
INSTRUCTION_SLACK, DEFAULT_INSTRUCTION_FLOOR = 0.1, 0.5


def default_floors(centroids: int) -> np.ndarray:
    """[C, 2] floors for centroids whose key was written without any."""
    return np.tile(np.array([[DEFAULT_IMAGE_FLOOR, DEFAULT_INSTRUCTION_FLOOR]], np.float32), (centroids, 1))


def image_floor(image: np.ndarray) -> float:
    """The image floor of one centroid from its samples' normalised features [N, d]."""
    image = _unit(image)
    cos = image @ _unit(image.mean(0))
    return float(np.percentile(cos, 1) - IMAGE_SLACK)


def instruction_floor(instruction: np.ndarray) -> float:
    """The instruction floor of one centroid from its samples' instruction embeddings [N, d] (repeats allowed)."""
    wordings = np.unique(_unit(instruction), axis=0)
    if len(wordings) < 2:
        return DEFAULT_INSTRUCTION_FLOOR
    total = wordings.sum(0)
    left_out = [float(w @ _unit(total - w)) for w in wordings]  # each wording against the mean of the others
    return min(left_out) - INSTRUCTION_SLACK


@dataclass(frozen=True)
class TaskKey:
    """What a task looks like: one row per centroid, L2-normalised, with the floors a request must reach on each
    routing part (see image_floor, instruction_floor). Routing uses image + instruction."""

    image: np.ndarray        # [C, image_dim]
    instruction: np.ndarray  # [C, text_dim]
    output: np.ndarray       # [C, text_dim]
    counts: np.ndarray       # [C] samples behind each centroid
    floors: np.ndarray | None = None  # [C, 2] (image, instruction); None: written before floors, defaults apply

    @staticmethod
    def from_embeddings(image: np.ndarray, instruction: np.ndarray, output: np.ndarray) -> TaskKey:
        """One centroid: the mean of the normalised per-sample embeddings, normalised again, and its floors."""
        return TaskKey(
            _unit(_unit(image).mean(0, keepdims=True)),
            _unit(_unit(instruction).mean(0, keepdims=True)),
            _unit(_unit(output).mean(0, keepdims=True)),
            np.array([len(image)], dtype=np.int64),
            np.array([[image_floor(image), instruction_floor(instruction)]], dtype=np.float32),
        )

    def merged(self, other: TaskKey) -> TaskKey:
        """This key with other's centroids appended: a reused task keeps routing its earlier data too."""
        image, instruction, output, counts = (np.concatenate([a, b]) for a, b in zip(self._parts(), other._parts()))
        return TaskKey(image, instruction, output, counts, np.concatenate([self.routing_floors, other.routing_floors]))

    @property
    def routing_vectors(self) -> np.ndarray:
        """[C, image_dim + text_dim]: inner product with a query built the same way = cos(image) + cos(instruction)."""
        return np.ascontiguousarray(np.concatenate([self.image, self.instruction], axis=1), dtype=np.float32)

    @property
    def routing_floors(self) -> np.ndarray:
        """[C, 2] (image floor, instruction floor) of each centroid; the defaults for a key written without."""
        if self.floors is not None:
            return np.asarray(self.floors, dtype=np.float32)
        return default_floors(len(self.image))

    def _parts(self) -> tuple[np.ndarray, ...]:
        return self.image, self.instruction, self.output, self.counts

    def save(self, path: Path) -> None:
        names = ("image", "instruction", "output", "counts", "floors")
        save_file({n: np.ascontiguousarray(p) for n, p in zip(names, (*self._parts(), self.routing_floors))},
                  str(path))

    @staticmethod
    def load(path: Path) -> TaskKey:
        t = load_file(str(path))
        return TaskKey(t["image"], t["instruction"], t["output"], t["counts"], t.get("floors"))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def routing_query(image: np.ndarray, instruction: np.ndarray) -> np.ndarray:
    """[B, image_dim + text_dim] from raw image features and instruction embeddings."""
    return np.ascontiguousarray(np.concatenate([_unit(image), _unit(instruction)], axis=1), dtype=np.float32)


NUMBER = {"type": ["number", "null"]}
# What every reader of a card relies on (the server's ListTasks and GetTask, `cit-registry list`, add-task's
# re-measurement): checked when a card is written, imported and read. Other fields may be added freely.
CARD_SCHEMA = {
    "type": "object",
    "required": ["task_id", "version", "adapter_kind", "decision"],
    "properties": {
        "task_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "version": {"type": "integer", "minimum": 1},
        "adapter_kind": {"enum": sorted(PARTS)},
        "decision": {"type": "object", "properties": {
            "action": {"type": "string"}, "similarity": NUMBER, "threshold": NUMBER,
            "most_similar": {"type": ["string", "null"]}, "dataset": {"type": ["string", "null"]}}},
        "similarities": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": NUMBER}},
        "metrics": {"type": "object", "properties": {
            "accuracy_before": NUMBER, "accuracy_after": NUMBER, "forgetting": {"type": "object"}}},
        "training": {"type": "object", "properties": {"method": {"type": "string"}, "sequence": {"type": "integer"}}},
        "datasets": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}, "samples": {"type": "integer"},
                           "accuracy_after": NUMBER, "eval_correct": {"type": "string", "pattern": "^[01]*$"},
                           "train": {"type": ["string", "null"]}, "test": {"type": ["string", "null"]}}}},
        "created_at": {"type": "string"},
        # a version committed behind a forgetting gate: {"max_forgetting", "forgetting" (points), "passed"}
        "gate": {"type": "object", "properties": {"passed": {"type": "boolean"}, "max_forgetting": NUMBER,
                                                  "forgetting": NUMBER}},
    },
}
_CARD_VALIDATOR = jsonschema.Draft202012Validator(CARD_SCHEMA)


@dataclass
class TaskCard:
    """task.json: everything an operator needs to know about one task version."""

    task_id: str
    version: int
    adapter_kind: str                       # "eproj" (per-task projection), "lora" or "shared" (see PARTS)
    decision: dict                          # {"action": "expanded"|"reused", "most_similar", "similarity", "threshold"}
    similarities: dict = field(default_factory=dict)   # {other task: {"image","instruction","output","score"}}
    metrics: dict = field(default_factory=dict)        # accuracy before/after, earlier tasks re-measured
    training: dict = field(default_factory=dict)       # method, hyper-parameters, wall time
    datasets: list = field(default_factory=list)       # every data set this task's adapter was trained on
    gate: dict = field(default_factory=dict)           # add-task --max-forgetting: failed -> a candidate
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @staticmethod
    def from_json(text: str) -> TaskCard:
        """A card read from text, checked against CARD_SCHEMA (InvalidCard when it does not match)."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidCard(f"the task card is not JSON: {exc}") from None
        return TaskCard.from_dict(raw)

    @staticmethod
    def from_dict(raw) -> TaskCard:
        error = next(iter(sorted(_CARD_VALIDATOR.iter_errors(raw), key=lambda e: list(e.path))), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the card"
            raise InvalidCard(f"the task card does not match its schema at {where}: {error.message}")
        try:
            validate_task_id(raw["task_id"])
        except ValueError as exc:
            raise InvalidCard(f"the task card's {exc}") from None
        return TaskCard(**{k: v for k, v in raw.items() if k in TaskCard.__dataclass_fields__})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def failed_gate(gate) -> bool:
    """Whether a card's gate makes its version a candidate: a gate was set and not passed."""
    return isinstance(gate, dict) and bool(gate) and not gate.get("passed", False)


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
        """The LoRA directory (PEFT's format) of a LoRA task; None for other kinds."""
        return self.path / "lora" if self.card.adapter_kind == "lora" else None

    @property
    def eval_dir(self) -> Path:
        """Held-out evaluation snapshots of the data sets this version serves (may be absent)."""
        return self.path / "eval"

    @property
    def replay_dir(self) -> Path:
        """Training samples of each data set this version serves, replayed when its adapter is reused (may be
        absent: versions written before replay)."""
        return self.path / "replay"

    @property
    def candidate(self) -> bool:
        """Committed behind a forgetting gate it did not pass: it serves only once promoted."""
        return failed_gate(self.card.gate)

    @property
    def shared_method(self) -> str | None:
        """The shared-connector method whose lineage this version belongs to (None: the task owns its adapter)."""
        return self.card.training.get("method") if self.card.adapter_kind == "shared" else None

    def key(self) -> TaskKey:
        return TaskKey.load(self.path / "key.safetensors")

    def centroids(self) -> int:
        """Routing centroids in the task key, read from the file's header (no tensor is loaded)."""
        with safe_open(str(self.path / "key.safetensors"), "np") as f:
            return f.get_slice("counts").get_shape()[0]


def version_shapes(path: Path) -> dict:
    """The widths a version's files commit it to: its key's parts, its projection and, for a LoRA, the LM sizes
    its matrices act on. Read from JSON and safetensors headers only."""
    shapes: dict = {}
    with safe_open(str(path / "key.safetensors"), "np") as f:
        shapes["key"] = {part: f.get_slice(part).get_shape()[1] for part in ("image", "instruction", "output")}
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    shapes["adapter"] = {k: config.get(k) for k in ("feature_dim", "hidden_size", "num_tokens", "projector")}
    if (path / "lora").is_dir():
        lora = json.loads((path / "lora" / "adapter_config.json").read_text())
        modules: dict[str, list[int]] = {}
        with safe_open(str(path / "lora" / "adapter_model.safetensors"), "np") as f:
            for name in f.keys():
                module = next((p for p in name.split(".") if p.endswith("_proj")), name)
                in_out, shape = modules.setdefault(module, [0, 0]), f.get_slice(name).get_shape()
                if ".lora_A." in name:  # [rank, in]
                    in_out[0] = shape[1]
                elif ".lora_B." in name:  # [out, rank]
                    in_out[1] = shape[0]
        shapes["lora"] = {"base_model": lora.get("base_model_name_or_path"), "modules": modules}
    return shapes


def _fit_problems(record: dict, shapes: dict) -> list[str]:
    """How a version's shapes differ from a registry's backbone record (none: it fits)."""
    problems = []
    for section in ("key", "adapter"):
        for name, want in record.get(section, {}).items():
            if shapes[section].get(name) != want:
                problems.append(f"{section} {name} is {shapes[section].get(name)!r}, the registry's is {want!r}")
    if "lora" in shapes and "lora" in record:
        want, have = record["lora"], shapes["lora"]
        if have["base_model"] != want["base_model"]:
            problems.append(f"the LoRA is for {have['base_model']!r}, the registry's LM is {want['base_model']!r}")
        for module, sizes in have["modules"].items():
            if module in want["modules"] and sizes != want["modules"][module]:
                problems.append(f"LoRA on {module} acts on {sizes}, the registry's LM has {want['modules'][module]}")
    return problems


def _record_of(shapes: dict, identity: str | None) -> dict:
    return {"identity": identity, **shapes}


@dataclass(frozen=True)
class Collected:
    """What gc removed (or would remove): versions per task, and their bytes."""

    removed: dict[str, tuple[int, ...]]
    bytes: int


@dataclass(frozen=True)
class TaskStatus:
    """Where a task stands: its versions on disk and which of them serves."""

    task_id: str
    versions: tuple[int, ...]
    serving: int | None         # None: retired, or no version may serve (only candidates)
    retired: bool
    rolled_back: bool           # a rollback chose the serving version
    candidates: tuple[int, ...]  # committed behind a forgetting gate, neither promoted nor rejected


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._threads = threading.RLock()  # the flock is per process: threads of one process take turns here
        self._history_threads = threading.Lock()
        self._candidates: dict[tuple[str, int], bool] = {}  # a version's card never changes: read once
        self._lifecycle: tuple[tuple, Lifecycle] | None = None  # (the history file's stat, its fold)

    @classmethod
    def open(cls, root: Path, create: bool = False) -> Registry:
        root = Path(root)
        marker = root / "registry.json"
        if not marker.exists():
            if not create:
                raise FileNotFoundError(f"no registry at {root} (create one with `cit-trainer add-task`)")
            _make_dirs(root / "tasks")  # the layout exists before any commit: a commit makes no directory but its task's
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps({"format": FORMAT_VERSION, "backbone": None}, indent=2) + "\n")
        fmt = json.loads(marker.read_text()).get("format")
        if fmt in (1, 2):
            raise ValueError(f"registry {root} has format {fmt} (written by an older cit); this cit reads format "
                             f"{FORMAT_VERSION}: upgrade it with `cit-registry migrate --registry {root}`")
        if fmt != FORMAT_VERSION:
            raise ValueError(f"registry {root} has format {fmt}; this cit reads format {FORMAT_VERSION}")
        return cls(root)

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    # -- what the registry says about itself
    def meta(self) -> dict:
        return json.loads((self.root / "registry.json").read_text())

    def backbone(self) -> dict | None:
        """The backbone record: identity and the widths every task's key, projection and LoRA must have (None
        until the first commit)."""
        return self.meta().get("backbone")

    def generation(self) -> int:
        """Bumped by every commit: a reader that saw the same generation has seen every commit (one small read)."""
        try:
            return int((self.root / GENERATION).read_text())
        except FileNotFoundError:
            return 0

    def task_ids(self) -> list[str]:
        if not self.tasks_dir.exists():
            return []
        return sorted(p.name for p in self.tasks_dir.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, task_id: str) -> list[int]:
        """The versions of a task on disk, oldest first."""
        d = self.tasks_dir / task_id
        if not TASK_ID.fullmatch(task_id) or not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := VERSION_DIR.fullmatch(p.name)))

    def _version_path(self, task_id: str, version: int) -> Path:
        return self.tasks_dir / task_id / f"v{version:04d}"

    def get(self, task_id: str, version: int | None = None) -> TaskVersion:
        """A version of a task; `version` None: the one that serves (TaskNotFound says why none does)."""
        versions = self.versions(task_id)
        if not versions or (version is not None and version not in versions):
            raise TaskNotFound(f"no task {task_id!r}" + (f" version {version}" if version else "") + " in the registry")
        if version is None:
            version = self.serving_version(task_id)
            if version is None:
                status = self.status(task_id)
                raise TaskNotFound(
                    f"task {task_id!r} is retired (`cit-registry restore {task_id}` brings it back)" if status.retired
                    else f"task {task_id!r} has no serving version: v{', v'.join(map(str, status.candidates))} "
                         f"await promotion (`cit-registry promote {task_id}`)")
        path = self._version_path(task_id, version)
        return TaskVersion(TaskCard.from_json((path / "task.json").read_text()), path)

    def newest(self, task_id: str) -> TaskVersion:
        """The newest version on disk, whether it serves or not."""
        versions = self.versions(task_id)
        if not versions:
            raise TaskNotFound(f"no task {task_id!r} in the registry")
        return self.get(task_id, versions[-1])

    def serving(self) -> list[TaskVersion]:
        """The serving version of every task that has one: what the router routes to. A version whose card cannot
        be read is left out (and logged; `verify` reports it): one damaged task never breaks the others."""
        out = []
        for task_id in self.task_ids():
            try:
                if (version := self.serving_version(task_id)) is not None:
                    out.append(self.get(task_id, version))
            except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, not the schema
                log.warning("task %s is left out: its serving version cannot be read (%s)", task_id, exc)
        return out

    def fingerprint(self) -> list[list]:
        """(task id, serving version) of every served task: the routing index is stale when this changes."""
        return [[t, v] for t in self.task_ids() if (v := self.serving_version(t)) is not None]

    # -- the lifecycle (lifecycle.py): which version serves
    def lifecycle(self) -> Lifecycle:
        """The history folded, re-read only when the history file changed."""
        try:
            st = (self.root / HISTORY).stat()
            seen: tuple = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = ()
        cached = self._lifecycle
        if cached is None or cached[0] != seen:
            cached = self._lifecycle = (seen, Lifecycle.of(read_history(self.root)))
        return cached[1]

    def history(self) -> list[Change]:
        return read_history(self.root)

    def is_candidate(self, task_id: str, version: int) -> bool:
        """Whether a version was committed behind a forgetting gate it did not pass (its card's gate; unreadable
        cards count as none: the version is left out elsewhere)."""
        key = (task_id, version)
        if key not in self._candidates:
            try:
                gate = json.loads((self._version_path(task_id, version) / "task.json").read_text()).get("gate")
            except (OSError, ValueError):
                return False
            self._candidates[key] = failed_gate(gate)
        return self._candidates[key]

    def serving_version(self, task_id: str, retired_too: bool = False) -> int | None:
        """The version of a task that serves (see lifecycle.py); `retired_too`: the one that would if restored."""
        return self.lifecycle().serving(task_id, self.versions(task_id), partial(self.is_candidate, task_id),
                                        retired_too)

    def status(self, task_id: str) -> TaskStatus:
        versions = self.versions(task_id)
        if not versions:
            raise TaskNotFound(f"no task {task_id!r} in the registry")
        life, serving = self.lifecycle(), self.serving_version(task_id, retired_too=True)
        state = life.state(task_id)
        pending = tuple(v for v in versions if self.is_candidate(task_id, v)
                        and v not in state.promoted and v not in state.rejected)
        return TaskStatus(task_id, tuple(versions), None if state.retired else serving, state.retired,
                          state.rollback is not None and serving == state.rollback[0], pending)

    @contextmanager
    def _history_lock(self) -> Iterator[None]:
        """The lock every history append and generation bump holds: short, so it is waited for (unlike the write
        lock, which add-task holds while it trains)."""
        with self._history_threads:
            fd = os.open(self.root / ".history.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _record(self, change: Change) -> Change:
        """One change: its history line, durable, then the generation bump that tells readers. The caller holds
        the history lock."""
        append_change(self.root, change)
        self._bump_generation()
        return change

    # -- lifecycle changes: each is one history line (None: nothing to change)
    def retire(self, task_id: str, who: str | None = None) -> Change | None:
        """Take a task out of routing (nothing is deleted; restore brings it back)."""
        with self._history_lock():
            if self.status(task_id).retired:
                return None
            return self._record(Change(Action.RETIRE, task_id, self.serving_version(task_id), **_who(who)))

    def restore(self, task_id: str, who: str | None = None) -> Change | None:
        with self._history_lock():
            if not self.status(task_id).retired:
                return None
            return self._record(Change(Action.RESTORE, task_id, self.serving_version(task_id, retired_too=True),
                                       **_who(who)))

    def rollback(self, task_id: str, to: int | None, who: str | None = None) -> Change | None:
        """Serve version `to` of a task (None: its newest again) until a newer version is committed or promoted."""
        with self._history_lock():
            status, life, candidate = self.status(task_id), self.lifecycle(), partial(self.is_candidate, task_id)
            if to is not None and to not in status.versions:
                raise TaskNotFound(f"task {task_id!r} has no version {to} (versions: "
                                   f"{', '.join(map(str, status.versions))})")
            if to is not None and not life.may_serve(task_id, to, candidate):
                raise LifecycleError(f"{task_id} v{to} is a candidate that was not promoted: promote it instead")
            current = self.serving_version(task_id, retired_too=True)
            newest = life.newest(task_id, list(status.versions), candidate)
            if (newest if to is None else to) == current:
                return None
            return self._record(Change(Action.ROLLBACK, task_id, to, {"from": current, "newest": newest},
                                       **_who(who)))

    def promote(self, task_id: str, version: int | None = None, who: str | None = None) -> Change:
        """Let a candidate serve (default: the task's newest candidate); it serves unless a rollback chose
        another version newer than it."""
        with self._history_lock():
            status, state = self.status(task_id), self.lifecycle().state(task_id)
            if version is not None and version not in status.versions:
                raise TaskNotFound(f"task {task_id!r} has no version {version}")
            # a rejected candidate is promoted only when named: the default is the newest pending one
            choices = [v for v in status.versions if self.is_candidate(task_id, v) and v not in state.promoted]
            version = version if version is not None else max(status.candidates, default=None)
            if version is None or version not in choices:
                raise LifecycleError(f"task {task_id!r} has no candidate to promote" if version is None else
                                     f"{task_id} v{version} is not a candidate awaiting promotion "
                                     f"(candidates: {', '.join(map(str, status.candidates)) or 'none'})")
            gate = self.get(task_id, version).card.gate
            return self._record(Change(Action.PROMOTE, task_id, version, {"gate": gate}, **_who(who)))

    def reject(self, task_id: str, version: int, who: str | None = None) -> Change:
        """Turn a candidate down for good: it never serves; gc may remove it."""
        with self._history_lock():
            status = self.status(task_id)
            if version not in status.versions:
                raise TaskNotFound(f"task {task_id!r} has no version {version}")
            if version not in status.candidates:
                raise LifecycleError(f"{task_id} v{version} is not a candidate awaiting promotion")
            return self._record(Change(Action.REJECT, task_id, version, **_who(who)))

    @contextmanager
    def writing(self, wait_for_threads: bool = True) -> Iterator[Registry]:
        """Hold the registry's write lock (re-entrant within a thread). Another process holding it: RegistryLocked
        at once; another thread of this process: wait for it (or RegistryLocked when not `wait_for_threads`).
        Orphans of killed writers are removed."""
        if not self._threads.acquire(blocking=wait_for_threads):
            raise RegistryLocked(f"registry {self.root} is being written by another thread of this process")
        try:
            if self._lock_depth == 0:
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise RegistryLocked(f"registry {self.root} is being written by another process (pid {holder}); "
                                         "run again when it has finished") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                if self.root.resolve() not in _EXCLUSIVE_LOCKS:
                    self._check_lock_excludes()
                shutil.rmtree(self.root / ".staging", ignore_errors=True)  # only a dead writer can have left these
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None
        finally:
            self._threads.release()

    def _check_lock_excludes(self) -> None:
        """Once per process and registry directory, while holding the write lock: another process must fail to take
        it. Some network and FUSE file systems accept flock and exclude nobody; two writers there could take one
        version number, so nothing is written (the lock is released by the caller's exit)."""
        import subprocess
        import sys

        probe = subprocess.run([sys.executable, "-c", _LOCK_PROBE, str(self.root / ".lock")], capture_output=True,
                               timeout=60)
        if probe.returncode != 0:
            assert self._lock_fd is not None  # held by the caller
            os.close(self._lock_fd)
            self._lock_fd = None
            why = "another process could take it too" if probe.returncode == 3 else \
                f"the check failed ({probe.stderr.decode(errors='replace').strip()[-200:]})"
            raise LockNotExclusive(
                f"registry {self.root}: its write lock (flock on .lock) does not keep other processes out here "
                f"({why}); write to it from a file system with working flock, e.g. a local disk or an NFS v4 mount "
                "(USAGE.md, 'Replicas')")
        _EXCLUSIVE_LOCKS.add(self.root.resolve())

    @contextmanager
    def writing_if_free(self) -> Iterator[bool]:
        """The write lock if nobody else holds it (True), else nothing (False): for derived state a reader may
        write, never waiting."""
        try:
            with self.writing(wait_for_threads=False):
                yield True
        except RegistryLocked:
            yield False

    def shared_head(self, method: str) -> TaskVersion | None:
        """The newest serving version trained with a shared-connector method (by training sequence): its connector
        serves every task of it. A retired task's version counts (retiring takes a task out of routing, not its
        training out of the connector); a rolled-back one counts as the version it serves."""
        lineage = []
        for task_id in self.task_ids():
            version = self.serving_version(task_id, retired_too=True)
            try:
                t = self.get(task_id, version) if version is not None else None
            except (OSError, ValueError):
                continue
            if t is not None and t.shared_method == method:
                lineage.append(t)
        # ties (two versions trained from one head) go to the later commit, deterministically
        return max(lineage, key=lambda t: (t.card.training.get("sequence", 0), t.card.created_at, t.task_id),
                   default=None)

    def shared_sequence(self, method: str) -> int:
        """The highest training sequence of any version of a shared-connector method on disk (0: none): the next
        task of the method is numbered after it, whatever serves now."""
        top = 0
        for task_id in self.task_ids():
            for v in self.versions(task_id):
                try:
                    t = self.get(task_id, v)
                except (OSError, ValueError):
                    continue
                if t.shared_method == method:
                    top = max(top, int(t.card.training.get("sequence", 0)))
        return top

    def commit(self, card: TaskCard, key: TaskKey, parts: dict[str, Callable[[Path], None]],
               backbone: str | None = None) -> TaskVersion:
        """Write a new task version atomically. card.version must be the next version of card.task_id; parts maps
        each directory of the card's adapter kind (PARTS, plus any OPTIONAL_PARTS) to a function that writes it.
        `backbone`: the identity of the backbone it was trained on, recorded by the registry's first commit and
        checked by every later one, as are the widths of keys, projections and LoRAs (BackboneMismatch)."""
        required = set(PARTS.get(card.adapter_kind, ()))
        if card.adapter_kind not in PARTS or not required <= set(parts) <= required | set(OPTIONAL_PARTS):
            raise ValueError(f"a {card.adapter_kind!r} task is written as parts "
                             f"{', '.join(PARTS.get(card.adapter_kind, ()))}, not {', '.join(parts)}")
        TaskCard.from_dict(asdict(card))  # a card nobody could read back is refused before anything is written
        expected = (self.versions(card.task_id) or [0])[-1] + 1
        if card.version != expected:
            raise ValueError(f"task {card.task_id!r}: next version is {expected}, not {card.version}")
        with self.writing():
            return self._commit(card, key, parts, backbone)

    def _commit(self, card: TaskCard, key: TaskKey, parts: dict[str, Callable[[Path], None]],
                identity: str | None, record: dict | None = None) -> TaskVersion:
        # .staging is scratch space: its own entry needs no fsync (a version in it is renamed out, then durable)
        (self.root / ".staging").mkdir(exist_ok=True)
        staging = self.root / ".staging" / f"{card.task_id}-v{card.version:04d}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, write in parts.items():
                write(staging / name)
            key.save(staging / "key.safetensors")
            (staging / "task.json").write_text(card.to_json())
            (staging / MANIFEST).write_text(json.dumps({"files": _file_hashes(staging)}, indent=2) + "\n")
            _check_part_files(staging)
            self._check_backbone(staging, identity, record)
            for f in staging.rglob("*"):
                if f.is_file():
                    _fsync(f)
            for d in [*(p for p in staging.rglob("*") if p.is_dir()), staging]:
                _fsync(d)
            final = self._version_path(card.task_id, card.version)
            _make_dirs(final.parent)
            os.rename(staging, final)  # fails if another writer took this version first: nothing is overwritten
            _fsync(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with self._history_lock():  # the version is committed already: this line only tells who and why
            self._record(Change(Action.COMMIT, card.task_id, card.version, {
                "adapter_kind": card.adapter_kind, "candidate": failed_gate(card.gate),
                **{k: card.decision[k] for k in ("action", "dataset", "imported_from") if k in card.decision}}))
        return self.get(card.task_id, card.version)

    def gc(self, keep: int, dry_run: bool = False, who: str | None = None) -> Collected:
        """Remove the versions nothing needs: a task keeps its `keep` newest versions, the version it serves (or
        would serve if restored), and its pending candidates; a shared connector's head is some task's serving
        version, so it stays too. Recorded as one history line before anything is removed; each version leaves by
        one rename, so a reader sees it whole or not at all."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the newest version of a task numbers the next), got {keep}")
        with self.writing(), self._history_lock():  # no rollback to a version while it is being removed
            plan: dict[str, tuple[int, ...]] = {}
            for task_id in self.task_ids():
                status = self.status(task_id)
                needed = {*status.versions[-keep:], *status.candidates, self.serving_version(task_id, retired_too=True)}
                if removable := tuple(v for v in status.versions if v not in needed):
                    plan[task_id] = removable
            size = sum(f.stat().st_size for task_id, versions in plan.items() for v in versions
                       for f in self._version_path(task_id, v).rglob("*") if f.is_file())
            collected = Collected(plan, size)
            if dry_run or not plan:
                return collected
            self._record(Change(Action.GC, None, None, {"keep": keep, "removed": {t: list(v) for t, v in plan.items()},
                                                         "bytes": size}, **_who(who)))
            trash = self.root / ".staging" / f"gc-{uuid.uuid4().hex[:8]}"
            trash.mkdir(parents=True)
            for task_id, versions in plan.items():
                for v in versions:
                    os.rename(self._version_path(task_id, v), trash / f"{task_id}-v{v:04d}")
                _fsync(self.tasks_dir / task_id)
        shutil.rmtree(trash, ignore_errors=True)  # outside the locks: commits and changes need not wait for it
        return collected

    def _check_backbone(self, staging: Path, identity: str | None, record: dict | None) -> None:
        """The version must fit the registry's backbone record; the registry's first commit (and its first LoRA,
        and the first commit that names the backbone) completes the record, written before the version lands."""
        shapes = version_shapes(staging)
        meta = self.meta()
        current = meta.get("backbone")
        if record is not None:  # an imported bundle's own record: its identity must agree too
            identity = identity or record.get("identity")
        if current is None:
            updated = _record_of(shapes, identity)
        else:
            problems = _fit_problems(current, shapes)
            if identity and current.get("identity") and identity != current["identity"]:
                problems.insert(0, f"it was trained on {identity!r}, this registry's tasks on {current['identity']!r}")
            if problems:
                raise BackboneMismatch("the task does not fit this registry's backbone: " + "; ".join(problems))
            updated = {**current, "identity": current.get("identity") or identity}
            if "lora" in shapes and "lora" not in current:
                updated["lora"] = shapes["lora"]
            elif "lora" in shapes:  # modules a later LoRA adapts for the first time
                updated["lora"] = {**current["lora"], "modules": {**shapes["lora"]["modules"],
                                                                  **current["lora"]["modules"]}}
        if updated != current:
            self._write_meta({**meta, "backbone": updated})

    def _write_meta(self, meta: dict) -> None:
        with atomic_path(self.root / "registry.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def _bump_generation(self) -> None:
        """Under the history lock: two writers' bumps never merge into one."""
        with atomic_path(self.root / GENERATION) as tmp:
            tmp.write_text(f"{self.generation() + 1}\n")

    def verify(self) -> Iterator[str]:
        """Problems found in the store, one line each (none: the store is sound)."""
        yield from history_problems(self.root)
        record = self.backbone()
        for task_id in self.task_ids():
            for v in self.versions(task_id):
                seen: set[str] = set()
                for problem in self._verify_version(task_id, v, record):
                    if problem not in seen:  # a missing file is found by the part check and the manifest alike
                        seen.add(problem)
                        yield f"{task_id} v{v}: {problem}"

    def _verify_version(self, task_id: str, v: int, record: dict | None) -> Iterator[str]:
        path = self._version_path(task_id, v)
        problems = [f"missing {rel}" for rel in ("task.json", "key.safetensors") if not (path / rel).is_file()]
        try:
            if not (path / MANIFEST).is_file():
                problems.append(f"missing {MANIFEST}: its files cannot be checked")
            else:
                problems += _manifest_problems(path)
            card = TaskCard.from_json((path / "task.json").read_text())
            problems += [f"missing {part}/{name}" for part in PARTS[card.adapter_kind] for name in PART_FILES[part]
                         if not (path / part / name).is_file()]
            problems += _part_file_problems(path)
            if (card.task_id, card.version) != (task_id, v):
                problems.append(f"card says {card.task_id} v{card.version}")
            key = TaskKey.load(path / "key.safetensors")
            if not (len(key.image) == len(key.instruction) == len(key.output) == len(key.counts) > 0):
                problems.append("key parts disagree in centroid count")
            elif key.routing_floors.shape != (len(key.image), 2) or not np.isfinite(key.routing_floors).all():
                problems.append("key floors are not one finite (image, instruction) pair per centroid")
            if record is not None and not problems:  # widths are read from the files: only when they are whole
                problems += [f"does not fit the registry's backbone: {p}" for p in _fit_problems(record, version_shapes(path))]
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a finding, not a crash
            problems.append(f"unreadable: {exc}")
        yield from problems

    # -- moving one task between registries
    def export_bundle(self, task_id: str, out: Path, version: int | None = None) -> Path:
        """One task version as a single tar file: bundle.json (sha256 of every file, the registry's backbone
        record) and the version's files. A version that fails its checks is not exported (BundleError)."""
        t = self.get(task_id, version)
        problems = list(self._verify_version(t.task_id, t.version, self.backbone()))
        if problems:
            raise BundleError(f"{t.task_id} v{t.version} is damaged, not exported: {'; '.join(problems)}")
        files = json.loads((t.path / MANIFEST).read_text())["files"]  # checked against the files just now
        files[MANIFEST] = sha256_file(t.path / MANIFEST)
        meta = {"format": BUNDLE_FORMAT, "task_id": t.task_id, "version": t.version, "files": files,
                "backbone": self.backbone()}
        out = Path(out)
        with atomic_path(out) as tmp, tarfile.open(tmp, "w") as tar:
            data = (json.dumps(meta, indent=2) + "\n").encode()
            info = tarfile.TarInfo("bundle.json")
            info.size = len(data)
            tar.addfile(info, fileobj=io.BytesIO(data))
            for rel in files:
                tar.add(t.path / rel, arcname=f"task/{rel}", recursive=False)
        return out

    def import_bundle(self, bundle: Path, task_id: str | None = None) -> TaskVersion:
        """Add a bundle's task as the next version of `task_id` (default: its own id), after checking every hash,
        the bundle's own manifest, the card's schema and that its key and adapter fit this registry's backbone.
        The card keeps its lineage: where it came from is added to its decision."""
        with self.writing():  # extracted under .staging: a killed import leaves nothing the next writer keeps
            (self.root / ".staging").mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="import-", dir=self.root / ".staging") as tmp:
                meta = _extract_bundle(Path(bundle), Path(tmp))
                src = Path(tmp) / "task"
                if (src / MANIFEST).is_file():  # the exporter's manifest must agree with what arrived
                    problems = list(_manifest_problems(src))
                    if problems:
                        raise BundleError(f"{bundle}: the files disagree with the version's manifest: "
                                          + "; ".join(problems))
                try:
                    card = TaskCard.from_json((src / "task.json").read_text())
                except InvalidCard as exc:
                    raise BundleError(f"{bundle}: {exc}") from None
                target = validate_task_id(task_id or card.task_id)
                card.decision = {**card.decision, "imported_from": {"task_id": card.task_id,
                                 "version": card.version, "bundle_sha256": sha256_file(Path(bundle))}}
                card.task_id, card.version = target, (self.versions(target) or [0])[-1] + 1
                parts = {p: _copy_from(src / p) for p in (*PARTS[card.adapter_kind], *OPTIONAL_PARTS)
                         if (src / p).is_dir()}
                try:
                    key = TaskKey.load(src / "key.safetensors")
                except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a bad header
                    raise BundleError(f"{bundle}: the task key cannot be read: {exc}") from None
                if set(PARTS[card.adapter_kind]) - set(parts):
                    raise BundleError(f"{bundle}: a {card.adapter_kind} task needs parts "
                                      f"{', '.join(PARTS[card.adapter_kind])}")
                return self._commit(card, key, parts, None, record=meta.get("backbone"))


def _who(who: str | None) -> dict:
    return {"who": who} if who else {}


def _part_file_problems(path: Path) -> list[str]:
    """Files a version's parts may not hold: anything but their own (a pickled adapter_model.bin beside or instead
    of the safetensors, which PEFT's loader would read)."""
    problems = []
    for part, names in PART_FILES.items():
        if (path / part).is_dir():
            problems += [f"{part}/{p.name} is not one of the part's files ({', '.join(names)})"
                         for p in sorted((path / part).iterdir()) if p.name not in names]
    for snapshots in ("eval", "replay"):
        for p in sorted((path / snapshots).rglob("*")) if (path / snapshots).is_dir() else []:
            image = p.parent.name == "images" and p.suffix.lower() in SNAPSHOT_IMAGE_SUFFIXES
            if p.is_file() and not (p.name == "samples.jsonl" or image):
                problems.append(f"{p.relative_to(path)} is not a snapshot's file")
    return problems


def _check_part_files(path: Path) -> None:
    problems = _part_file_problems(path)
    if problems:
        raise ValueError("refused: " + "; ".join(problems))


def _manifest_problems(path: Path) -> Iterator[str]:
    listed = json.loads((path / MANIFEST).read_text())["files"]
    found = _file_hashes(path)
    for rel in sorted(set(listed) | set(found)):
        if rel not in found:
            yield f"missing {rel}"
        elif rel not in listed:
            yield f"unlisted file {rel}"
        elif listed[rel] != found[rel]:
            yield f"{rel} changed since it was written (sha256 differs)"


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A regular member's data (the caller checked it is one: tarfile gives None for other kinds)."""
    data = tar.extractfile(member)
    if data is None:
        raise tarfile.TarError(f"{member.name!r} is not a regular file")
    return data


def _extract_bundle(bundle: Path, into: Path) -> dict:
    """Extract only regular files named in bundle.json, each streamed to disk while its sha256 is computed and
    checked. Refused before anything is written: more members or bytes than the limits allow, sparse members."""
    try:
        with tarfile.open(bundle, "r:") as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar:  # headers only: a member's data is not read here
                if len(members) >= MAX_BUNDLE_MEMBERS:
                    _refuse_oversized(bundle, [*members.values(), member])
                if member.name in members:
                    raise BundleError(f"{bundle}: {member.name!r} is in it twice")
                members[member.name] = member
            if "bundle.json" not in members or not members["bundle.json"].isfile():
                raise BundleError(f"{bundle} is not a task bundle (no bundle.json)")
            _refuse_oversized(bundle, list(members.values()))
            if members["bundle.json"].size > 16 * 1024 * 1024:  # read whole: a small file
                raise BundleError(f"{bundle}: bundle.json is too large")
            meta = json.loads(_member_file(tar, members["bundle.json"]).read())
            if not isinstance(meta, dict) or meta.get("format") not in (1, BUNDLE_FORMAT) \
                    or not isinstance(meta.get("files"), dict):
                raise BundleError(f"{bundle}: unsupported bundle format {meta.get('format') if isinstance(meta, dict) else meta!r}")
            if meta.get("backbone") is not None and not isinstance(meta["backbone"], dict):
                raise BundleError(f"{bundle}: its backbone record is not an object")
            extra = set(members) - {"bundle.json"} - {f"task/{rel}" for rel in meta["files"]}
            if extra:
                raise BundleError(f"{bundle}: files not listed in bundle.json: {', '.join(sorted(extra))}")
            for rel, digest in meta["files"].items():
                listed = members.get(f"task/{rel}")
                if listed is None or not listed.isfile() or not _stays_inside(rel):
                    raise BundleError(f"{bundle}: {rel!r} is missing or not a plain file inside the bundle")
                target = into / "task" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                sha = hashlib.sha256()
                with _member_file(tar, listed) as src, open(target, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        sha.update(block)
                        dst.write(block)
                if sha.hexdigest() != digest:
                    raise BundleError(f"{bundle}: {rel} does not match its sha256 (damaged or tampered with)")
    except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as exc:
        raise BundleError(f"{bundle} is not a readable task bundle: {exc}") from None
    except OSError as exc:  # e.g. a file listed under a name that another listed file is a directory of
        raise BundleError(f"{bundle}: its files cannot be laid out: {exc}") from None
    for required in ("task.json", "key.safetensors"):
        if not (into / "task" / required).is_file():
            raise BundleError(f"{bundle}: the bundle has no {required}")
    return meta


def _refuse_oversized(bundle: Path, members: list[tarfile.TarInfo]) -> None:
    """From the headers alone: too many members, a member or a whole too large, a sparse member (one that claims
    bytes it does not hold: 10 KiB on disk can claim 2 GiB)."""
    if len(members) > MAX_BUNDLE_MEMBERS:
        raise BundleError(f"{bundle}: more than {MAX_BUNDLE_MEMBERS} members")
    for member in members:
        if member.issparse():
            raise BundleError(f"{bundle}: {member.name!r} is a sparse file (refused: it claims {member.size} bytes "
                              "it does not hold)")
        if member.size > MAX_MEMBER_BYTES:
            raise BundleError(f"{bundle}: {member.name!r} has {member.size} bytes; the limit is {MAX_MEMBER_BYTES}")
    total = sum(m.size for m in members)
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"{bundle}: its files hold {total} bytes; the limit is {MAX_BUNDLE_BYTES}")


def _copy_from(src: Path) -> Callable[[Path], None]:
    """A version part written as a copy of the directory `src`."""
    def copy(target: Path) -> None:
        shutil.copytree(src, target)
    return copy


def _stays_inside(rel: str) -> bool:
    """A bundle's file name that cannot leave the directory it is extracted into."""
    return bool(rel) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


# -- older formats
def migrate(root: Path, identity: str | None = None, log=print) -> bool:
    """Upgrade a registry written by an older cit to FORMAT_VERSION in place; False when it already is.
    Format 1 -> 2: registry.json gains the backbone record (the widths every version has; they must agree) and the
    generation counter starts; versions written before manifests existed get one, of their files as they are now
    (said per version: run `verify` before migrating if in doubt).
    Format 2 -> 3: the history starts, with the migration as its first line; no version was committed behind a
    gate and none is retired, so every task serves the version it served before.
    Nothing else in a version is changed."""
    root = Path(root)
    marker = root / "registry.json"
    if not marker.exists():
        raise FileNotFoundError(f"no registry at {root}")
    meta = json.loads(marker.read_text())
    fmt = meta.get("format")
    if fmt == FORMAT_VERSION:
        return False
    if fmt not in (1, 2):
        raise ValueError(f"registry {root} has format {fmt}; migrate upgrades formats 1 and 2")
    registry = Registry(root)
    with registry.writing(), registry._history_lock():
        if fmt == 1:
            meta = {**meta, "format": 2, "backbone": _backbone_of_format1(registry, identity, log)}
            _make_dirs(registry.tasks_dir)
            log(f"registry {root}: format 1 -> 2")
        registry._record(Change(Action.MIGRATE, None, None, {"from": fmt, "to": FORMAT_VERSION}))
        registry._write_meta({**meta, "format": FORMAT_VERSION})
        log(f"registry {root}: format 2 -> {FORMAT_VERSION}")
    return True


def _backbone_of_format1(registry: Registry, identity: str | None, log) -> dict | None:
    """The backbone record of a format-1 registry's versions, which must agree; each gets a manifest if it has
    none."""
    record: dict | None = None
    for task_id in registry.task_ids():
        for v in registry.versions(task_id):
            path = registry._version_path(task_id, v)
            if not (path / MANIFEST).is_file():
                with atomic_path(path / MANIFEST) as tmp:
                    tmp.write_text(json.dumps({"files": _file_hashes(path)}, indent=2) + "\n")
                log(f"{task_id} v{v}: had no manifest; one is written of its files as they are now")
            shapes = version_shapes(path)
            if record is None:
                record = _record_of(shapes, identity)
            problems = _fit_problems(record, shapes)
            if problems:
                raise BackboneMismatch(f"{task_id} v{v} does not fit the other tasks' backbone: " + "; ".join(problems))
            if "lora" in shapes:
                record["lora"] = {"base_model": shapes["lora"]["base_model"],
                                  "modules": {**shapes["lora"]["modules"], **record.get("lora", {}).get("modules", {})}}
    return record


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p, and fsync the parent of every directory made: its entry survives a power loss."""
    path = Path(path)
    if path.is_dir():
        return
    _make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    _fsync(path.parent)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically and durably (the file, then the
    directory entry, fsynced)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
