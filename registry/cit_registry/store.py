"""The registry on disk.

    <root>/registry.json                         marks the directory as a registry
    <root>/tasks/<task_id>/v0001/task.json       the task card of version 1
                               /key.safetensors  the task key (centroids)
                               /adapter/         the projection: adapter_config.json + adapter_model.safetensors
                               /lora/            LoRA tasks only: a LoRA on the LM in PEFT's own format
                               /method/          shared-connector tasks only: the method's memory
                               /manifest.json    sha256 of every other file of the version
    <root>/index/                                derived routing index (see router.py)
    <root>/.staging/                             versions being written
    <root>/.lock                                 held (flock) by the one process writing

A version is written whole into .staging, fsynced, then renamed into place: rename is atomic, so a reader sees
a complete version or none. Versions are never modified afterwards; the manifest lets `verify` prove it. One
writer at a time: a second gets RegistryLocked at once, with the holder's pid. A writer that was killed leaves at
most a directory in .staging, which the next writer removes.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1
# What each adapter kind's version holds besides task.json and key.safetensors, and each part's files.
# "shared": a task trained with a shared-connector method (seqft, ewc, ...): adapter/ is the one connector all
# tasks of that method share, as it stood after this task; the newest such version serves them all.
PARTS = {"eproj": ("adapter",), "lora": ("adapter", "lora"), "shared": ("adapter", "method")}
PART_FILES = {"adapter": ("adapter_config.json", "adapter_model.safetensors"),
              "lora": ("adapter_config.json", "adapter_model.safetensors"),
              "method": ("state.json", "state.safetensors")}
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
VERSION_DIR = re.compile(r"^v(\d{4,})$")


class TaskNotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


class RegistryLocked(RuntimeError):
    """Another process is writing the registry."""


class BundleError(ValueError):
    """A task bundle is malformed, tampered with, or does not fit the registry."""


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
    adapter_kind: str                       # "eproj" (per-task projection), "lora" or "shared" (see PARTS)
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
        """The LoRA directory (PEFT's format) of a LoRA task; None for other kinds."""
        return self.path / "lora" if self.card.adapter_kind == "lora" else None

    @property
    def shared_method(self) -> str | None:
        """The shared-connector method whose lineage this version belongs to (None: the task owns its adapter)."""
        return self.card.training.get("method") if self.card.adapter_kind == "shared" else None

    def key(self) -> TaskKey:
        return TaskKey.load(self.path / "key.safetensors")

    def centroids(self) -> int:
        """Routing centroids in the task key, read from the file's header (no tensor is loaded)."""
        from safetensors import safe_open

        with safe_open(str(self.path / "key.safetensors"), "np") as f:
            return f.get_slice("counts").get_shape()[0]


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None
        self._lock_depth = 0

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

    @contextmanager
    def writing(self) -> Iterator["Registry"]:
        """Hold the registry's write lock (re-entrant within this object). Orphans of killed writers are removed."""
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
            shutil.rmtree(self.root / ".staging", ignore_errors=True)  # only a dead writer can have left these
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None

    def shared_head(self, method: str) -> TaskVersion | None:
        """The newest version trained with a shared-connector method: its connector serves every task of it."""
        lineage = [t for t in self.latest() if t.shared_method == method]
        return max(lineage, key=lambda t: t.card.training.get("sequence", 0), default=None)

    def commit(self, card: TaskCard, key: TaskKey, parts: dict[str, Callable[[Path], None]]) -> TaskVersion:
        """Write a new task version atomically. card.version must be the next version of card.task_id; parts maps
        each directory of the card's adapter kind (PARTS) to a function that writes it."""
        if card.adapter_kind not in PARTS or set(parts) != set(PARTS[card.adapter_kind]):
            raise ValueError(f"a {card.adapter_kind!r} task is written as parts "
                             f"{', '.join(PARTS.get(card.adapter_kind, ()))}, not {', '.join(parts)}")
        validate_task_id(card.task_id)
        expected = (self._versions(card.task_id) or [0])[-1] + 1
        if card.version != expected:
            raise ValueError(f"task {card.task_id!r}: next version is {expected}, not {card.version}")
        with self.writing():
            return self._commit(card, key, parts)

    def _commit(self, card: TaskCard, key: TaskKey, parts: dict[str, Callable[[Path], None]]) -> TaskVersion:
        staging = self.root / ".staging" / f"{card.task_id}-v{card.version:04d}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            for name, write in parts.items():
                write(staging / name)
            key.save(staging / "key.safetensors")
            (staging / "task.json").write_text(card.to_json())
            (staging / MANIFEST).write_text(json.dumps({"files": _file_hashes(staging)}, indent=2) + "\n")
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
                seen: set[str] = set()
                for problem in self._verify_version(task_id, v):
                    if problem not in seen:  # a missing file is found by the part check and the manifest alike
                        seen.add(problem)
                        yield f"{task_id} v{v}: {problem}"

    def _verify_version(self, task_id: str, v: int) -> Iterator[str]:
        path = self.tasks_dir / task_id / f"v{v:04d}"
        for rel in ("task.json", "key.safetensors"):
            if not (path / rel).is_file():
                yield f"missing {rel}"
        try:
            card = TaskCard.from_json((path / "task.json").read_text())
            if card.adapter_kind not in PARTS:
                yield f"unknown adapter kind {card.adapter_kind!r}"
            for part in PARTS.get(card.adapter_kind, ()):
                for name in PART_FILES[part]:
                    if not (path / part / name).is_file():
                        yield f"missing {part}/{name}"
            if (path / MANIFEST).is_file():  # versions written before manifests existed have none
                listed = json.loads((path / MANIFEST).read_text())["files"]
                found = _file_hashes(path)
                for rel in sorted(set(listed) | set(found)):
                    if rel not in found:
                        yield f"missing {rel}"
                    elif rel not in listed:
                        yield f"unlisted file {rel}"
                    elif listed[rel] != found[rel]:
                        yield f"{rel} changed since it was written (sha256 differs)"
            if (card.task_id, card.version) != (task_id, v):
                yield f"card says {card.task_id} v{card.version}"
            key = TaskKey.load(path / "key.safetensors")
            if not (len(key.image) == len(key.instruction) == len(key.output) == len(key.counts) > 0):
                yield "key parts disagree in centroid count"
        except Exception as exc:  # any unreadable file is a finding, not a crash
            yield f"unreadable: {exc}"

    # -- moving one task between registries
    def export_bundle(self, task_id: str, out: Path, version: int | None = None) -> Path:
        """One task version as a single tar file: bundle.json (sha256 of every file) and the version's files."""
        t = self.get(task_id, version)
        files = _file_hashes(t.path)
        if (t.path / MANIFEST).is_file():
            files[MANIFEST] = sha256_file(t.path / MANIFEST)
        meta = {"format": BUNDLE_FORMAT, "task_id": t.task_id, "version": t.version, "files": files}
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
        """Add a bundle's task as the next version of `task_id` (default: its own id), after checking every hash.
        The card keeps its lineage: where it came from is added to its decision."""
        with self.writing():  # extracted under .staging: a killed import leaves nothing the next writer keeps
            (self.root / ".staging").mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="import-", dir=self.root / ".staging") as tmp:
                meta = _extract_bundle(Path(bundle), Path(tmp))
                src = Path(tmp) / "task"
                card = TaskCard.from_json((src / "task.json").read_text())
                if card.adapter_kind not in PARTS:
                    raise BundleError(f"bundle holds an unknown adapter kind {card.adapter_kind!r}")
                target = validate_task_id(task_id or meta["task_id"])
                card.decision = {**card.decision, "imported_from": {"task_id": meta["task_id"],
                                 "version": meta["version"], "bundle_sha256": sha256_file(Path(bundle))}}
                card.task_id, card.version = target, (self._versions(target) or [0])[-1] + 1
                parts = {p: (lambda d, p=p: shutil.copytree(src / p, d)) for p in PARTS[card.adapter_kind]}
                return self._commit(card, TaskKey.load(src / "key.safetensors"), parts)


def _extract_bundle(bundle: Path, into: Path) -> dict:
    """Extract only regular files named in bundle.json, each checked against its sha256. Nothing else is read."""
    try:
        with tarfile.open(bundle, "r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            if "bundle.json" not in members or not members["bundle.json"].isfile():
                raise BundleError(f"{bundle} is not a task bundle (no bundle.json)")
            meta = json.loads(tar.extractfile(members["bundle.json"]).read())
            if meta.get("format") != BUNDLE_FORMAT or not isinstance(meta.get("files"), dict):
                raise BundleError(f"{bundle}: unsupported bundle format {meta.get('format')!r}")
            extra = set(members) - {"bundle.json"} - {f"task/{rel}" for rel in meta["files"]}
            if extra:
                raise BundleError(f"{bundle}: files not listed in bundle.json: {', '.join(sorted(extra))}")
            for rel, digest in meta["files"].items():
                member = members.get(f"task/{rel}")
                parts = Path(rel).parts
                if member is None or not member.isfile() or Path(rel).is_absolute() or ".." in parts:
                    raise BundleError(f"{bundle}: {rel!r} is missing or not a plain file inside the bundle")
                data = tar.extractfile(member).read()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise BundleError(f"{bundle}: {rel} does not match its sha256 (damaged or tampered with)")
                target = into / "task" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle} is not a readable task bundle: {exc}") from None
    for required in ("task.json", "key.safetensors"):
        if not (into / "task" / required).is_file():
            raise BundleError(f"{bundle}: the bundle has no {required}")
    return meta


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
