"""A task's lifecycle: which of its versions serves, recorded as an append-only history.

    <root>/history.jsonl    one JSON object a line: every commit, retirement, restoration, rollback, promotion,
                            rejection, collection and migration, with who did it and when

Versions are immutable directories (store.py); what changes is which one serves. That is decided by the history
alone, folded in order (`Lifecycle.of`), together with one fact each version carries in its own card: whether it
was committed as a *candidate* (its `gate` says it did not pass its forgetting gate), so a candidate can never serve
by accident, whatever happens to the history. One change is one appended line: written whole, fsynced, under the
registry's history lock, then the generation counter is bumped so running servers see it. A line a crash cut short
is the last one; readers skip it and the next writer cuts it off before appending.

The serving version of a task:
- none while the task is retired (restore brings it back; nothing is deleted);
- else the version a rollback chose, as long as no version newer than the newest one at the time of the rollback
  may serve (a later commit or promotion supersedes a rollback; `rollback --to latest` ends it at once);
- else its newest version that is not a pending or rejected candidate.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

HISTORY = "history.jsonl"


class Action(str, Enum):
    COMMIT = "commit"      # a version was written (add-task, import)
    RETIRE = "retire"
    RESTORE = "restore"
    ROLLBACK = "rollback"  # version: the one that serves from now (None: the newest again)
    PROMOTE = "promote"
    REJECT = "reject"
    GC = "gc"
    MIGRATE = "migrate"


def actor() -> str:
    """Who is changing the registry, as the history records it: CIT_ACTOR, else user@host."""
    if os.environ.get("CIT_ACTOR"):
        return os.environ["CIT_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Change:
    """One line of the history."""

    action: Action
    task: str | None = None
    version: int | None = None
    detail: dict = field(default_factory=dict)
    who: str = field(default_factory=actor)
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "action": self.action.value}, sort_keys=True)

    @staticmethod
    def from_json(line: str) -> Change:
        raw = json.loads(line)
        return Change(Action(raw["action"]), raw.get("task"), raw.get("version"), raw.get("detail") or {},
                      raw.get("who", ""), raw.get("at", ""))


@dataclass(frozen=True)
class TaskState:
    """What the history says of one task."""

    retired: bool = False
    rollback: tuple[int, int] | None = None  # (version that serves, newest version when it was chosen)
    promoted: frozenset[int] = frozenset()
    rejected: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Lifecycle:
    """The history folded into each task's state."""

    tasks: dict[str, TaskState] = field(default_factory=dict)

    @staticmethod
    def of(changes: Iterable[Change]) -> Lifecycle:
        tasks: dict[str, TaskState] = {}
        for c in changes:
            if c.task is None:
                continue
            s = tasks.get(c.task, TaskState())
            if c.action is Action.RETIRE:
                s = replace(s, retired=True)
            elif c.action is Action.RESTORE:
                s = replace(s, retired=False)
            elif c.action is Action.ROLLBACK:
                newest = c.detail.get("newest")  # a line without it (written by hand) holds until any newer version
                s = replace(s, rollback=None if c.version is None else
                            (c.version, int(newest) if isinstance(newest, int) else c.version))
            elif c.action is Action.PROMOTE and c.version is not None:
                s = replace(s, promoted=s.promoted | {c.version}, rejected=s.rejected - {c.version})
            elif c.action is Action.REJECT and c.version is not None:
                s = replace(s, rejected=s.rejected | {c.version}, promoted=s.promoted - {c.version})
            tasks[c.task] = s
        return Lifecycle(tasks)

    def state(self, task_id: str) -> TaskState:
        return self.tasks.get(task_id, TaskState())

    def may_serve(self, task_id: str, version: int, candidate: Callable[[int], bool]) -> bool:
        """Whether a version may serve: it is no candidate, or a promoted one (`candidate(v)`: its card's gate
        failed)."""
        s = self.state(task_id)
        return version not in s.rejected and (version in s.promoted or not candidate(version))

    def newest(self, task_id: str, versions: list[int], candidate: Callable[[int], bool]) -> int | None:
        """The newest of `versions` that may serve, rollbacks and retirement aside."""
        return next((v for v in reversed(versions) if self.may_serve(task_id, v, candidate)), None)

    def serving(self, task_id: str, versions: list[int], candidate: Callable[[int], bool],
                retired_too: bool = False) -> int | None:
        """The version of `task_id` that serves (None: retired, or no version may serve). `versions`: those on
        disk, oldest first; `retired_too`: the version it would serve if it were restored."""
        s = self.state(task_id)
        if s.retired and not retired_too:
            return None
        newest = self.newest(task_id, versions, candidate)
        if s.rollback is not None and s.rollback[0] in versions and (newest is None or newest <= s.rollback[1]):
            return s.rollback[0]
        return newest


def read_history(root: Path) -> list[Change]:
    """Every whole line of the history, oldest first (a last line a crash cut short is skipped)."""
    try:
        text = (Path(root) / HISTORY).read_text()
    except FileNotFoundError:
        return []
    changes = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn by a crash: the next writer cuts it off
        try:
            changes.append(Change.from_json(line))
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours (a hand edit): skipped, `verify` reports it
    return changes


def append_change(root: Path, change: Change) -> None:
    """Append one line, fsynced. The caller holds the history lock, and bumps the generation counter next, whose
    rename fsyncs the registry's directory: that makes a history file this line created durable too."""
    path = Path(root) / HISTORY
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # a dead writer's torn line: cut back to the last whole one
                f.seek(0)
                whole = f.read().rfind(b"\n") + 1  # rare (a crash mid-append): reading the file once is fine
                f.truncate(whole)
        f.write((change.to_json() + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def history_problems(root: Path) -> list[str]:
    """Lines of the history that are not changes (verify)."""
    try:
        lines = (Path(root) / HISTORY).read_text().splitlines()
    except FileNotFoundError:
        return []
    problems = []
    for i, line in enumerate(lines, 1):
        try:
            Change.from_json(line)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"history line {i} is not a change: {exc}")
    return problems


def _part_bytes(path: Path) -> dict[str, int]:
    """Bytes of each adapter part of a version directory (adapter, lora, method), as on disk."""
    return {part: sum(f.stat().st_size for f in (path / part).rglob("*") if f.is_file())
            for part in ("adapter", "lora", "method") if (path / part).is_dir()}


def version_facts(card, path: Path) -> dict:
    """What `diff` compares of one version, flat: field -> value."""
    facts: dict = {
        "adapter kind": card.adapter_kind,
        "decision": card.decision.get("action"),
        "decision: most similar": card.decision.get("most_similar"),
        "decision: similarity": card.decision.get("similarity"),
        "data sets": [d["name"] for d in card.datasets],
        "accuracy before": card.metrics.get("accuracy_before"),
        "accuracy after": card.metrics.get("accuracy_after"),
        "gate": card.gate or None,
        "created": card.created_at,
    }
    for d in card.datasets:
        facts[f"accuracy when trained: {d['name']}"] = d.get("accuracy_after")
    for name, measured in card.metrics.get("forgetting", {}).items():
        if isinstance(measured, dict):
            facts[f"re-measured now: {name}"] = measured.get("now")
    for other, s in card.similarities.items():
        facts[f"similarity to {other}"] = s.get("score") if isinstance(s, dict) else s
    for k in ("method", "epochs", "lr", "samples", "steps", "final_loss", "seconds", "sequence"):
        if k in card.training:
            facts[f"training: {k}"] = card.training[k]
    for part, size in _part_bytes(path).items():
        facts[f"bytes: {part}"] = size
    return facts


def diff_versions(old, new) -> dict[str, dict]:
    """Field -> {"from", "to"} for every fact that differs between two TaskVersions."""
    a, b = version_facts(old.card, old.path), version_facts(new.card, new.path)
    return {k: {"from": a.get(k), "to": b.get(k)} for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}
