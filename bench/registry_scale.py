"""Registry scale: server start-up and change detection at 1 k, 10 k and 100 k tasks.

    python bench/registry_scale.py [--sizes 1000 10000 100000] [--rounds 5]

For each size a registry of that many tasks is written: the first version through Registry.commit (the default
backbone's projection shape), the others beside it with their own key, card and manifest and the first one's
projection files hard-linked (writing 100 k versions through commit's fsyncs would take most of an hour and
measures nothing this bench is about). Then, with the real backbone loaded once:
  - start-up: Engine(...) on the registry, the first time (the routing index is built and persisted) and again
    (the persisted index is read), the backbone excluded (it costs the same at every size);
  - change detection: one check as the server makes it every second (the registry's generation counter) against
    a walk of every task directory (what it did before, still done once a minute); medians of --rounds;
  - a commit while serving: time until the running engine routes to the new task.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TEXT_DIM, TextEmbedder
from cit_backbone.vision import FEATURE_DIM
from cit_registry.store import MANIFEST, Registry, TaskCard, TaskKey, sha256_file
from cit_server.config import ServerConfig
from cit_server.engine import Engine


def tiny_adapter(backbone: Backbone):
    connector = backbone.base_connector()  # the real shape (1280 -> 576): the server checks it
    return connector.save


def key(rng) -> TaskKey:
    return TaskKey.from_embeddings(rng.random((1, FEATURE_DIM)), rng.normal(size=(1, TEXT_DIM)),
                                   rng.normal(size=(1, TEXT_DIM)))


def build(root: Path, n: int, backbone: Backbone) -> Registry:
    reg = Registry.open(root, create=True)
    rng = np.random.default_rng(n)
    first = reg.commit(TaskCard("t0000000", 1, "eproj", {"action": "expanded"}), key(rng),
                       {"adapter": tiny_adapter(backbone)}, backbone=backbone.identity)
    card = json.loads((first.path / "task.json").read_text())
    files = json.loads((first.path / MANIFEST).read_text())["files"]
    source, start = first.adapter_dir, time.time()
    for i in range(1, n):
        task = f"t{i:07d}"
        path = reg.tasks_dir / task / "v0001"
        if i % 50_000 == 0:  # a file system allows some 65,000 links to one file: a fresh copy to link to
            source = Path(shutil.copytree(source, path / "adapter"))
        else:
            shutil.copytree(source, path / "adapter", copy_function=os.link)
        key(rng).save(path / "key.safetensors")
        (path / "task.json").write_text(json.dumps({**card, "task_id": task}, indent=2, sort_keys=True) + "\n")
        own = {rel: sha256_file(path / rel) for rel in ("key.safetensors", "task.json")}
        (path / MANIFEST).write_text(json.dumps({"files": {**files, **own}}, indent=2, sort_keys=True) + "\n")
        if i % 10000 == 0:
            print(f"  {i} tasks written ({time.time() - start:.0f} s)", flush=True)
    reg._bump_generation()
    return reg


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backbone, embedder = Backbone(), TextEmbedder()
    print("tasks | build (s) | start, index built (s) | start, index read (s) | generation check (ms) | "
          "directory walk (ms) | commit -> routed (s)")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / f"reg-{n}"
            t0 = time.perf_counter()
            reg = build(root, n, backbone)
            built = time.perf_counter() - t0
            config = ServerConfig(registry=root)
            starts = []
            for _ in range(2):  # first: no persisted index yet; second: it is read
                t0 = time.perf_counter()
                engine = Engine(config, backbone=backbone, embedder=embedder)
                starts.append(time.perf_counter() - t0)
                if len(starts) == 1:
                    engine.close()
            generation = median_ms(reg.generation, args.rounds)
            walk = median_ms(reg.fingerprint, args.rounds)
            before = engine.front.router()
            t0 = time.perf_counter()
            reg.commit(TaskCard("added", 1, "eproj", {"action": "expanded"}), key(np.random.default_rng(1)),
                       {"adapter": tiny_adapter(backbone)}, backbone=backbone.identity)
            while engine.front.router() is before:  # a cheap look: the watcher swaps in a new router when it is built
                time.sleep(0.05)
            routed = time.perf_counter() - t0
            assert "added" in {task for task, _ in engine.front.router().rows}
            engine.close()
            print(f"{n} | {built:.0f} | {starts[0]:.1f} | {starts[1]:.1f} | {generation:.3f} | {walk:.0f} | "
                  f"{routed:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
