"""Routing: the nearest task key by inner product over FAISS.

The index is derived state: it is persisted under <registry>/index for a fast start and rebuilt from the task
keys whenever it is missing or its fingerprint no longer matches the store.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import faiss
import numpy as np

from .store import Registry, TaskKey, atomic_path


@dataclass(frozen=True)
class Candidate:
    task_id: str
    version: int
    score: float  # cos(image key) + cos(instruction key) of the task's best centroid


# Requests whose best cos(image) + cos(instruction) is below this are answered by the base connector. Measured on the
# shipped tasks: held-out requests score at least 1.48 against their own task.
ROUTING_THRESHOLD = 1.0
# Up to this many index rows (task centroids) search is exact; above it an HNSW graph answers in well under a
# millisecond where exact search grows linearly. Recall against exact search: bench/faiss_routing.py.
EXACT_SEARCH_LIMIT = 20_000
HNSW_NEIGHBOURS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128


def make_index(vectors: np.ndarray, exact_limit: int = EXACT_SEARCH_LIMIT) -> faiss.Index:
    """Inner-product index over the rows of `vectors`, exact while small, HNSW when large."""
    if len(vectors) <= exact_limit:
        index = faiss.IndexFlatIP(vectors.shape[1])
    else:
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _tune(index)
    return index


def _tune(index: faiss.Index) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = HNSW_EF_SEARCH


def select(candidates: list[Candidate], threshold: float) -> Candidate | None:
    """The task that serves a request: the best candidate if it reaches the threshold, else None (base connector)."""
    return candidates[0] if candidates and candidates[0].score >= threshold else None


class Router:
    def __init__(self, vectors: np.ndarray, rows: list[tuple[str, int]], fingerprint: list,
                 exact_limit: int = EXACT_SEARCH_LIMIT) -> None:
        self.rows = rows  # index row -> (task id, version)
        self.fingerprint = fingerprint
        self.index = make_index(vectors, exact_limit) if len(vectors) else None
        self._max_centroids = max(Counter(task for task, _ in rows).values(), default=1)

    @classmethod
    def build(cls, registry: Registry) -> "Router":
        vectors, rows = [], []
        for task in registry.latest():
            v = task.key().routing_vectors
            vectors.append(v)
            rows += [(task.task_id, task.version)] * len(v)
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        return cls(stacked, rows, registry.fingerprint())

    @classmethod
    def load(cls, registry: Registry) -> "Router":
        """The persisted index when it matches the store, else a rebuilt one (persisted when writable)."""
        index_dir = registry.root / "index"
        meta_file, index_file = index_dir / "index.json", index_dir / "keys.faiss"
        fingerprint = registry.fingerprint()
        try:
            meta = json.loads(meta_file.read_text())
            if meta["fingerprint"] == fingerprint:
                index = faiss.read_index(str(index_file))
                _tune(index)
                router = cls(np.zeros((0, 0), np.float32), [tuple(r) for r in meta["rows"]], fingerprint)
                router.index = index
                router._max_centroids = meta["max_centroids"]
                return router
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # missing, stale or unreadable: derived state, so rebuild it
        router = cls.build(registry)
        try:
            router.save(registry)
        except OSError:
            pass  # a read-only registry still routes, it just rebuilds on every start
        return router

    def save(self, registry: Registry) -> None:
        index_dir = registry.root / "index"
        index_dir.mkdir(exist_ok=True)
        if self.index is not None:
            with atomic_path(index_dir / "keys.faiss") as tmp:
                faiss.write_index(self.index, str(tmp))
        meta = {"fingerprint": self.fingerprint, "rows": self.rows, "max_centroids": self._max_centroids}
        with atomic_path(index_dir / "index.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")

    def __len__(self) -> int:
        return len({r[0] for r in self.rows})

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Candidate]]:
        """Top-k tasks per query row (see store.routing_query), best first; a task's best centroid counts."""
        if self.index is None or self.index.ntotal == 0:
            return [[] for _ in range(len(queries))]
        n = min(self.index.ntotal, k * self._max_centroids)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            seen: dict[str, Candidate] = {}
            for s, i in zip(row_scores, row_ids):
                if i >= 0 and self.rows[i][0] not in seen:
                    seen[self.rows[i][0]] = Candidate(self.rows[i][0], self.rows[i][1], float(s))
            out.append(list(seen.values())[:k])
        return out


# Reuse a task's adapter at this similarity or above. Measured on the shipped tasks: the same data set redrawn
# scores 0.98, distinct tasks at most 0.30.
REUSE_THRESHOLD = 0.6


def task_similarity(a: TaskKey, b: TaskKey) -> dict[str, float]:
    """Similarity of two tasks from the cosines of their image, instruction and output keys.

    score = max(cos_img, 0) * max(cos_inst, 0) * max(cos_out, 0) for the closest pair of centroids: the paper's
    product of the three similarities in its raw-cosine form, which needs no statistics over other task pairs.
    Symmetric in a and b.
    """
    cos = {part: getattr(a, part) @ getattr(b, part).T for part in ("image", "instruction", "output")}  # [Ca, Cb]
    score = np.clip(cos["image"], 0, None) * np.clip(cos["instruction"], 0, None) * np.clip(cos["output"], 0, None)
    best = np.unravel_index(int(np.argmax(score)), score.shape)
    return {**{p: float(c[best]) for p, c in cos.items()}, "score": float(score[best])}
