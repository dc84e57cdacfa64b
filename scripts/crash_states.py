"""Crash consistency of registry commits under power loss, in the style of ALICE (Pillai et al., OSDI '14).

    python scripts/crash_states.py [--drop-each-fsync]

A commit runs for real (Registry.commit, small synthetic adapters) while its file-system operations are recorded
(os.mkdir, os.rename, os.replace, os.fsync, os.unlink; the tree is read after each one). A power loss may keep, of
each file, its content at its last fsync or its newest content, and of each directory, its entries at its last
fsync or its newest ones (what POSIX promises: nothing is durable before its fsync). At every point of the trace the
checker builds the crash states that differ from "everything kept" or "only what was fsynced kept" in one file or
directory, and opens each as a registry. Each must be the registry before the commit or after it, `verify` clean;
the generation counter never runs ahead of the versions or the history (whose line says who committed), a version
never lands without its backbone record, and once
commit has returned, every state is the registry after it.

Scenarios: the first commit into an empty registry (it records the backbone), a new task in a
registry that has one, and a second version of an existing task. --drop-each-fsync then repeats every scenario with
each one of its fsyncs skipped in turn, and fails unless every skipped fsync lets some crash state break the rules:
no fsync is there for nothing, and none is missing that the model can see.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from cit_registry.store import Registry, TaskCard, TaskKey


# -- what a scenario commits
def _adapter(path: Path) -> None:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"adapter_type": "eproj", "feature_dim": 8, "hidden_size": 4,
                                                          "num_tokens": 1, "projector": "linear"}))
    save_file({"proj.weight": np.ones((4, 8), np.float32)}, str(path / "adapter_model.safetensors"))


def _key(seed: int) -> TaskKey:
    rng = np.random.default_rng(seed)
    return TaskKey.from_embeddings(rng.normal(size=(2, 8)), rng.normal(size=(2, 4)), rng.normal(size=(2, 4)))


def _commit(task: str, version: int, seed: int):
    return lambda reg: reg.commit(TaskCard(task, version, "eproj", {"action": "expanded"}), _key(seed),
                                  {"adapter": _adapter}, backbone="crash-test")


SCENARIOS = {
    "first commit": ([], _commit("alpha", 1, 0)),
    "new task": ([_commit("alpha", 1, 0)], _commit("beta", 1, 1)),
    "new version": ([_commit("alpha", 1, 0)], _commit("alpha", 2, 2)),
}


# -- recording the file system while the commit runs
@dataclass
class Snapshot:
    """The tree under the registry root after one operation: object -> file bytes or directory entries. Objects
    are inodes, renumbered so that an inode number freed (a replaced file) and reused later is a new object."""

    root: int
    files: dict[int, bytes]
    dirs: dict[int, dict[str, int]]


class Objects:
    """Stable identities for inodes across the snapshots of one trace."""

    def __init__(self) -> None:
        self._of: dict[int, int] = {}  # inode number -> object, for the inodes in the latest snapshot
        self._next = 0

    def snapshot(self, root: Path) -> Snapshot:
        files: dict[int, bytes] = {}
        dirs: dict[int, dict[str, int]] = {}
        seen: dict[int, int] = {}

        def walk(path: Path) -> int:
            ino = os.lstat(path).st_ino
            if ino not in self._of:  # new, or a number freed since the last snapshot and reused: a new object
                self._of[ino], self._next = self._next, self._next + 1
            obj = seen[ino] = self._of[ino]
            if path.is_dir() and not path.is_symlink():
                dirs[obj] = {child.name: walk(child) for child in sorted(path.iterdir())}
            else:
                files[obj] = path.read_bytes()
            return obj
        top = walk(root)
        self._of = seen  # inodes gone from the tree are forgotten: their numbers may come back as new objects
        return Snapshot(top, files, dirs)

    def of(self, ino: int) -> int:
        return self._of[ino]


@dataclass
class Trace:
    ops: list[str] = field(default_factory=list)                   # what happened, for the report
    points: list[tuple[Snapshot, dict, dict]] = field(default_factory=list)  # (tree, durable files, durable dirs)
    returned_at: int = -1                                           # the point at which commit had returned
    fsyncs: int = 0


@contextmanager
def recording(root: Path, trace: Trace, drop_fsync: int | None):
    """Patch the os calls a commit makes; after each, read the tree. fsync makes the inode's current state
    durable; with drop_fsync=k the k-th fsync call (1-based) does nothing."""
    objects = Objects()
    first = objects.snapshot(root)
    durable_files, durable_dirs = dict(first.files), {i: dict(e) for i, e in first.dirs.items()}
    history: dict[int, bytes] = dict(first.files)  # every file object's newest content, gone ones included
    trace.points.append((first, dict(durable_files), {i: dict(e) for i, e in durable_dirs.items()}))
    real = {name: getattr(os, name) for name in ("mkdir", "rename", "replace", "fsync", "unlink")}

    def after(op: str) -> None:
        trace.ops.append(op)
        now = objects.snapshot(root)
        history.update(now.files)
        tree = Snapshot(now.root, {**history, **now.files}, now.dirs)  # gone files keep their last content
        trace.points.append((tree, dict(durable_files), {i: dict(e) for i, e in durable_dirs.items()}))

    def wrap(name):
        def call(*args, **kwargs):
            result = real[name](*args, **kwargs)
            shown = [os.path.relpath(a, root) if isinstance(a, (str, os.PathLike)) else a for a in args]
            after(f"{name} {' '.join(map(str, shown))}")
            return result
        return call

    def fsync(fd):
        trace.fsyncs += 1
        path = os.readlink(f"/proc/self/fd/{fd}")
        if drop_fsync == trace.fsyncs:
            after(f"fsync #{trace.fsyncs} {os.path.relpath(path, root)} (DROPPED)")
            return None
        real["fsync"](fd)
        now = objects.snapshot(root)
        obj = objects.of(os.fstat(fd).st_ino)
        if obj in now.dirs:
            durable_dirs[obj] = dict(now.dirs[obj])
        elif obj in now.files:
            durable_files[obj] = now.files[obj]
        after(f"fsync {os.path.relpath(path, root)}")
        return None

    for name in ("mkdir", "rename", "replace", "unlink"):
        setattr(os, name, wrap(name))
    os.fsync = fsync
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)


# -- crash states and what each must be
def crash_states(point: tuple[Snapshot, dict, dict]):
    """(description, durable-or-newest choice per inode) of the states checked at one point of the trace."""
    tree, durable_files, durable_dirs = point
    changed = [i for i in tree.files if i in durable_files and durable_files[i] != tree.files[i]
               or i not in durable_files] + [i for i in tree.dirs if durable_dirs.get(i) != tree.dirs[i]]
    yield "everything kept", {}
    yield "only what was fsynced kept", {i: "durable" for i in changed}
    for i in changed:
        yield f"all kept but object {i} as fsynced", {i: "durable"}
        yield f"only fsynced but object {i} kept", {**{j: "durable" for j in changed}, i: "newest"}


def materialize(point: tuple[Snapshot, dict, dict], choice: dict[int, str], target: Path) -> None:
    tree, durable_files, durable_dirs = point
    seen: set[int] = set()

    def make(ino: int, path: Path) -> None:
        if ino in seen:  # a rename cannot put one inode in two places: the later parent does not get it
            return
        seen.add(ino)
        if ino in tree.dirs:
            path.mkdir()
            entries = durable_dirs.get(ino, {}) if choice.get(ino) == "durable" else tree.dirs[ino]
            for name, child in entries.items():
                if child in tree.dirs or child in tree.files or child in durable_files or child in durable_dirs:
                    make(child, path / name)
        else:
            content = durable_files.get(ino, b"") if choice.get(ino) == "durable" else tree.files.get(
                ino, durable_files.get(ino, b""))
            path.write_bytes(content)
    make(tree.root, target)


@dataclass(frozen=True)
class State:
    fingerprint: list
    generation: int
    meta: dict
    history: list  # (action, task, version) of each line


def read_state(root: Path) -> State | str:
    """The registry a crash state opens as, or why it does not open cleanly."""
    try:
        reg = Registry.open(root)
        problems = list(reg.verify())
        if problems:
            return f"verify: {problems[0]}"
        return State(reg.fingerprint(), reg.generation(), reg.meta(),
                     [(c.action.value, c.task, c.version) for c in reg.history()])
    except Exception as exc:  # noqa: BLE001 - any failure to open is a finding
        return f"does not open: {type(exc).__name__}: {exc}"


def violation(state: State | str, old: State, new: State, returned: bool) -> str | None:
    if isinstance(state, str):
        return state
    if returned and state != new:
        return "commit had returned, but the state is not the registry after it"
    for part in ("fingerprint", "generation", "meta", "history"):
        if getattr(state, part) not in (getattr(old, part), getattr(new, part)):
            return f"its {part} is neither the old one nor the new one"
    if state.generation == new.generation != old.generation and state.fingerprint != new.fingerprint:
        return "the generation counter ran ahead of the versions"
    if state.generation == new.generation != old.generation and state.history != new.history:
        return "the generation counter ran ahead of the history"
    if state.fingerprint == new.fingerprint != old.fingerprint and state.meta != new.meta:
        return "a version landed without its backbone record"
    return None


def run_scenario(name: str, drop_fsync: int | None = None, stop_at_first: bool = False) -> tuple[int, list[str], Trace]:
    setup, action = SCENARIOS[name]
    with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
        root = Path(tmp) / "reg"
        reg = Registry.open(root, create=True)
        for step in setup:
            step(reg)
        (root / ".lock").unlink(missing_ok=True)
        old = read_state(root)
        trace = Trace()
        with recording(root, trace, drop_fsync):
            action(reg)
        trace.returned_at = len(trace.points) - 1
        new = read_state(root)
        assert isinstance(old, State) and isinstance(new, State), (old, new)
        checked, found = 0, []
        for index, point in enumerate(trace.points):
            for description, choice in crash_states(point):
                target = Path(tmp) / f"state-{checked}"
                materialize(point, choice, target)
                (target / ".lock").unlink(missing_ok=True)
                checked += 1
                why = violation(read_state(target), old, new, returned=index >= trace.returned_at)
                shutil.rmtree(target)
                if why:
                    op = trace.ops[index - 1] if index else "(before the commit)"
                    found.append(f"after {op!r}, {description}: {why}")
                    if stop_at_first:
                        return checked, found, trace
        return checked, found, trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop-each-fsync", action="store_true",
                        help="also check that skipping any one fsync breaks some crash state")
    args = parser.parse_args()
    start, total, failed = time.time(), 0, False
    for name in SCENARIOS:
        checked, found, trace = run_scenario(name)
        total += checked
        print(f"{name}: {len(trace.ops)} operations ({trace.fsyncs} fsyncs), {checked} crash states, "
              f"{len(found)} broken" + "".join(f"\n  BROKEN {f}" for f in found[:10]))
        failed |= bool(found)
        if args.drop_each_fsync:
            needless = []
            for k in range(1, trace.fsyncs + 1):
                _, broken, dropped = run_scenario(name, drop_fsync=k, stop_at_first=True)
                if not broken:
                    needless.append(next(op for op in dropped.ops if op.endswith("(DROPPED)")))
            print(f"  each of its {trace.fsyncs} fsyncs skipped in turn: "
                  + ("every one breaks some crash state" if not needless else
                     f"{len(needless)} not needed: {', '.join(needless)}"))
            failed |= bool(needless)
    print(f"{total} crash states checked in {time.time() - start:.0f} s: "
          + ("all open as the registry before or after the commit, verify clean" if not failed else "FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
