"""Fault injection for the registry's commit: kill -9 a writer at random moments, many times, and check each time
that the registry holds whole versions only and that every earlier version is byte-identical.

    python scripts/registry_faults.py --kills 500 [--seed 0]

The writer commits tasks in a loop through `Registry.commit` (lock, staging, fsync, rename, manifest), each with a
256 KiB adapter written in 16 KiB pieces, so kills land during weight writes, key and card writes, fsyncs and
renames alike. Every check reads the whole registry, so a fresh registry starts every 20 kills to keep the run
linear. Exit status 1 on the first problem found.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITER = r"""
import sys, numpy as np
from cit_registry.store import Registry, TaskCard, TaskKey
reg = Registry.open(sys.argv[1], create=True)
rng = np.random.default_rng(int(sys.argv[2]))

def adapter(path):
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    with open(path / "adapter_model.safetensors", "wb") as f:
        for _ in range(16):
            f.write(rng.bytes(1 << 14))

print("ready", flush=True)
while True:
    task = f"t{rng.integers(0, 8)}"
    version = (reg.versions(task) or [0])[-1] + 1
    key = TaskKey.from_embeddings(rng.normal(size=(4, 8)), rng.normal(size=(4, 4)), rng.normal(size=(4, 4)))
    reg.commit(TaskCard(task, version, "eproj", {"action": "expanded"}), key, {"adapter": adapter})
"""


def snapshot(root: Path) -> dict[str, str]:
    tasks = root / "tasks"
    if not tasks.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tasks.rglob("*")) if p.is_file()}


def main() -> int:
    from cit_registry.store import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.3, help="longest wait before a kill, seconds")
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    start = time.time()
    versions = orphans = 0
    with tempfile.TemporaryDirectory() as tmp:
        before: dict[str, str] = {}
        for i in range(args.kills):
            if i % 20 == 0:
                root = Path(tmp) / f"reg{i // 20}"
                versions += sum(1 for f in before if f.endswith("task.json"))
                before = {}
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(args.seed * 100_000 + i)],
                                      stdout=subprocess.PIPE, text=True)
            if writer.stdout.readline().strip() != "ready":
                print(f"kill {i}: the writer did not start", file=sys.stderr)
                return 1
            time.sleep(rnd.uniform(0.0, args.max_delay))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            reg = Registry.open(root)
            problems = list(reg.verify())
            now = snapshot(root)
            changed = [f for f, digest in before.items() if now.get(f) != digest]
            if problems or changed:
                print(f"kill {i}: problems {problems}, earlier files changed or lost {changed}", file=sys.stderr)
                return 1
            before = now
        versions += sum(1 for f in before if f.endswith("task.json"))
        staging = root / ".staging"
        orphans = len(list(staging.iterdir())) if staging.exists() else 0
    print(f"{args.kills} kills (seed {args.seed}) in {time.time() - start:.0f} s: verify clean after every kill, "
          f"every earlier version byte-identical; {versions} whole versions committed, "
          f"{orphans} staging leftover(s) at the end (removed by the next writer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
