"""Routing: the nearest task key by inner product over FAISS.

The index is derived state: it is persisted under <registry>/index for a fast start and rebuilt from the task
keys whenever it is missing or its fingerprint no longer matches the store.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from importlib.resources import files

import faiss
import numpy as np

from .store import Registry, TaskKey, _unit, atomic_path, default_floors

log = logging.getLogger("cit.registry")


@dataclass(frozen=True)
class Candidate:
    """A task's best centroid for a request (by score), with the request's cosine to each part and the centroid's
    floors on them (store.image_floor, store.instruction_floor)."""

    task_id: str
    version: int
    score: float        # cos(image) + cos(instruction): what FAISS ranks by
    image: float
    instruction: float
    image_floor: float
    instruction_floor: float


class FallBack(Enum):
    """Why the base connector answers a request that named no task."""

    NO_TASKS = "no task is registered"
    IMAGE_UNLIKE = "the image is unlike the images of every close task"
    INSTRUCTION_UNLIKE = "the instruction is unlike what the tasks with such images ask"
    NEARER_OTHER_QUESTION = "the instruction is nearer another question than what the task asks"


BACKGROUND = "background"  # Routing.nearer when the nearer question is one of the background questions


@dataclass(frozen=True)
class Routing:
    """Where a request goes: `chosen`, or the base connector for the reason `fell_back` (of the best candidate)."""

    chosen: Candidate | None
    fell_back: FallBack | None
    candidates: list[Candidate]
    nearer: str | None = None  # NEARER_OTHER_QUESTION: the task id whose question is nearer, or BACKGROUND


def background_questions() -> list[str]:
    """Questions about images that no task is assumed to ask (easy-VQA's 107 training questions, MIT licence):
    an instruction nearer one of them than to a task's own questions is not that task's (outlier exposure:
    known outliers calibrate what is unknown). A task whose own questions are among them keeps them: a
    background question inside a task's instruction floor does not count against it."""
    return json.loads(files("cit_registry").joinpath("background_questions.json").read_text())["questions"]


# A request routes to a task when it clears both of the task's floors by this margin (the same for every task: each
# floor is measured on the task's own data) and its instruction is nearer the task's than any other known question.
ROUTING_MARGIN = 0.0
# Up to this many index rows (task centroids) search is exact: one query over 4,096 keys of 1,664 floats takes about
# a millisecond here, and exact time grows linearly. Above it an IVF index over a random projection of the keys to
# 256 dimensions, with 4-bit PQ codes, proposes candidates that are re-ranked exactly on the full keys
# (bench/faiss_routing.py: latency and recall against exact search up to 1 M keys).
EXACT_SEARCH_LIMIT = 4096
PROJECTED_DIMS = 256
REFINE_FACTOR = 8  # candidates re-ranked exactly per result asked for (reading full keys is a large part of a query)


def ivf_lists(n: int) -> int:
    """Inverted lists for n keys: the power of two nearest sqrt(n) (1 M keys: 1,024), with the 39 keys per list
    that FAISS's k-means asks for. Fewer, longer lists scan faster per key than many short ones."""
    return 1 << max(4, min(round(np.log2(np.sqrt(n))), int(np.log2(n / 39))))


def ivf_probes(lists: int) -> int:
    """Lists searched per query: 6 * sqrt(lists) (1,024 lists: 192). Random keys, the hardest case, need this many
    for recall@1 >= 0.99 at 1 M keys (bench/faiss_routing.py)."""
    return min(lists, round(6 * np.sqrt(lists)))


def make_index(vectors: np.ndarray, exact_limit: int = EXACT_SEARCH_LIMIT) -> faiss.Index:
    """Index over the rows of `vectors`: exact inner product while small, approximate when large.

    The approximate index ranks by L2 distance, as IVF's k-means cells are drawn: for keys of one norm (every routing
    key is two unit vectors) the nearest key is the one with the largest inner product. Router.search turns its
    distances back into inner products. The projection is random, not PCA: the two parts differ in width, and on
    keys without strong structure PCA keeps the instruction's dimensions (3.3 times the variance each) and drops
    the image's (1 M random keys, one IVF setting: recall@1 0.952 after PCA, 0.986 after a random projection).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n <= exact_limit:
        index: faiss.Index = faiss.IndexFlatIP(dim)
    else:
        norms = np.einsum("ij,ij->i", vectors, vectors)
        if not np.allclose(norms, norms[0], atol=1e-3):
            raise ValueError("approximate routing needs keys of one norm (unit image and instruction parts)")
        reduced = min(PROJECTED_DIMS, dim - dim % 8)
        lists = ivf_lists(n)
        index = faiss.index_factory(dim, f"RR{reduced},IVF{lists},PQ{reduced // 8}x4fs,RFlat", faiss.METRIC_L2)
        sample = np.random.default_rng(0).choice(n, min(n, 64 * lists), replace=False)
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    _tune(index)
    return index


def _tune(index: faiss.Index) -> None:
    """Search settings; applied to a read index too, so a changed setting needs no rebuild."""
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_FACTOR
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = ivf_probes(ivf.nlist)


INDEX_FORMAT = 3  # 3: each row's floors and the image width are recorded (2: keys file, generation, ntotal)


class Router:
    def __init__(self, vectors: np.ndarray, rows: list[tuple[str, int]], fingerprint: list,
                 exact_limit: int = EXACT_SEARCH_LIMIT, generation: int = 0, floors: np.ndarray | None = None,
                 image_dim: int = 0) -> None:
        self.rows = rows  # index row -> (task id, version)
        self._served = {task: version for task, version in rows}  # task id -> the version this index routes to
        self.fingerprint = fingerprint
        self.generation = generation  # the registry's generation when its keys were read
        self.index = make_index(vectors, exact_limit) if len(vectors) else None
        # each row's (image, instruction) floors: the defaults where none are given
        self.floors = default_floors(len(rows)) if floors is None else np.asarray(floors, np.float32)
        self.image_dim = image_dim  # a key row is [image part (image_dim), instruction part]
        # every key's squared norm (make_index checks they are one), to turn L2 distances into inner products
        self._key_norm2 = float(np.dot(vectors[0], vectors[0])) if len(vectors) else 0.0
        self._max_centroids = max(Counter(task for task, _ in rows).values(), default=1)

    @classmethod
    def build(cls, registry: Registry) -> Router:
        # What the keys are read against comes first: a commit landing meanwhile can make this index look stale
        # (rebuilt at the next check), never fresh.
        fingerprint, generation = registry.fingerprint(), registry.generation()
        keyed = []
        for task in registry.serving():
            try:
                key = task.key()
                key.routing_floors  # noqa: B018 - a key whose floors cannot be read is damaged too
            except Exception as exc:  # noqa: BLE001 - one damaged key leaves its task out, not every task
                log.warning("task %s v%d is not routed: its key cannot be read (%s)", task.task_id, task.version, exc)
                continue
            keyed.append((task.task_id, task.version, key))
        return cls.of_keys(keyed, fingerprint, generation)

    @classmethod
    def of_keys(cls, keyed: list[tuple[str, int, TaskKey]], fingerprint: list | None = None,
                generation: int = 0) -> Router:
        """A router over (task id, version, key) triples."""
        if not keyed:
            return cls(np.zeros((0, 0), np.float32), [], fingerprint or [], generation=generation)
        rows = [(task_id, version) for task_id, version, key in keyed for _ in range(len(key.image))]
        return cls(np.concatenate([k.routing_vectors for _, _, k in keyed]), rows, fingerprint or [],
                   generation=generation, floors=np.concatenate([k.routing_floors for _, _, k in keyed]),
                   image_dim=keyed[0][2].image.shape[1])

    def refreshed(self, registry: Registry, seen: tuple[list, int] | None = None) -> Router:
        """The router for the registry as it is now, reading only the keys of the task versions this one does not
        hold: a commit to a registry of 100 k tasks reads one key, not 100 k (reading them is most of a build; the
        index over the kept and the new keys is made anew, seconds at that size). `seen`: the registry's
        (fingerprint, generation) when the caller has just read them (a walk of 100 k task directories takes
        seconds). What the keys are read against comes first: a commit landing meanwhile can make this index look
        stale (rebuilt at the next check), never fresh."""
        fingerprint, generation = seen or (registry.fingerprint(), registry.generation())
        held: dict[tuple[str, int], list[int]] = {}
        for i, row in enumerate(self.rows):
            held.setdefault((row[0], row[1]), []).append(i)
        kept = _keys_of(self.index) if self.index is not None else np.zeros((0, 0), np.float32)
        vectors, floors, rows, image_dim = [], [], [], self.image_dim
        for task_id, version in fingerprint:
            if (task_id, version) in held:
                at = held[task_id, version]
                vectors.append(kept[at])
                floors.append(self.floors[at])
            else:
                try:
                    key = registry.get(task_id, version).key()
                    floors.append(key.routing_floors)
                except Exception as exc:  # noqa: BLE001 - as in build: one damaged key leaves its task out
                    log.warning("task %s v%d is not routed: its key cannot be read (%s)", task_id, version, exc)
                    continue
                vectors.append(key.routing_vectors)
                image_dim = image_dim or key.image.shape[1]
            rows += [(task_id, version)] * len(vectors[-1])
        if not rows:
            return Router(np.zeros((0, 0), np.float32), [], fingerprint, generation=generation)
        return Router(np.concatenate(vectors), rows, fingerprint, generation=generation,
                      floors=np.concatenate(floors), image_dim=image_dim)

    @classmethod
    def load(cls, registry: Registry, persist: bool = True, previous: Router | None = None) -> Router:
        """The persisted index when it matches the store, else a rebuilt one (`previous`.refreshed when a router
        is at hand, a full build otherwise), persisted when `persist` and the registry's write lock is free (the
        index is derived state: a reader never races a writer for it)."""
        fingerprint, generation = registry.fingerprint(), registry.generation()
        try:
            meta, index = read_index(registry)
            if meta["fingerprint"] == fingerprint:
                router = cls(np.zeros((0, 0), np.float32), [tuple(r) for r in meta["rows"]], fingerprint,
                             generation=generation, floors=np.array(meta["floors"], np.float32).reshape(-1, 2),
                             image_dim=meta["image_dim"])
                router.index = index
                router._max_centroids = meta["max_centroids"]
                router._key_norm2 = meta["key_norm2"]
                return router
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            pass  # missing, stale, torn or unreadable: derived state, so rebuild it
        router = cls.build(registry) if previous is None else previous.refreshed(registry, (fingerprint, generation))
        if persist:
            try:
                with registry.writing_if_free() as writable:
                    if writable:
                        router.save(registry)
            except OSError:
                pass  # a read-only registry still routes, it just rebuilds on every start
        return router

    def save(self, registry: Registry) -> None:
        """Under the registry's write lock: the keys go to a file of their own name, then index.json, which names
        it, replaces the old one atomically, so a reader sees the old pair or the new one, never a mix."""
        index_dir = registry.root / "index"
        index_dir.mkdir(exist_ok=True)
        name = None
        if self.index is not None:
            name = f"keys-{uuid.uuid4().hex[:12]}.faiss"
            with atomic_path(index_dir / name) as tmp:
                faiss.write_index(self.index, str(tmp))
        meta = {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "generation": self.generation,
                "rows": self.rows, "floors": self.floors.tolist(), "image_dim": self.image_dim,
                "max_centroids": self._max_centroids, "key_norm2": self._key_norm2,
                "keys": name, "ntotal": self.index.ntotal if self.index is not None else 0,
                "dim": self.index.d if self.index is not None else 0}
        with atomic_path(index_dir / "index.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
        for old in index_dir.glob("keys*.faiss"):  # a reader between the old index.json and its keys file fails to
            if old.name != name:                   # open them, and rebuilds (or reads the new pair)
                old.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._served)

    def version_of(self, task_id: str) -> int | None:
        """The version of `task_id` this index routes to (None: not in the index), without I/O."""
        return self._served.get(task_id)

    def _search(self, queries: np.ndarray, k: int) -> list[list[tuple[Candidate, np.ndarray]]]:
        """Top-k tasks per query row, best score first (a task's best centroid counts), each with the instruction
        part of that centroid's key."""
        if self.index is None or self.index.ntotal == 0:
            return [[] for _ in range(len(queries))]
        n = min(self.index.ntotal, k * self._max_centroids)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.index.search(queries, n)
        if self.index.metric_type == faiss.METRIC_L2:  # |q - k|^2 = |q|^2 + |k|^2 - 2 q.k
            scores = (np.einsum("ij,ij->i", queries, queries)[:, None] + self._key_norm2 - scores) / 2
        out = []
        for query, row_scores, row_ids in zip(queries, scores, ids):
            best: dict[str, tuple[float, int]] = {}
            for s, i in zip(row_scores, row_ids):
                if i >= 0 and self.rows[i][0] not in best:
                    best[self.rows[i][0]] = (float(s), int(i))
            chosen = list(best.values())[:k]
            keys = _flat(self.index).reconstruct_batch(np.array([i for _, i in chosen], np.int64)) if chosen \
                else np.zeros((0, self.index.d), np.float32)
            found = []
            for (s, i), key in zip(chosen, keys):
                d = self.image_dim
                found.append((Candidate(self.rows[i][0], self.rows[i][1], s, float(query[:d] @ key[:d]),
                                        float(query[d:] @ key[d:]), *map(float, self.floors[i])), key[d:]))
            out.append(found)
        return out

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Candidate]]:
        """Top-k tasks per query row (see store.routing_query), best score first; a task's best centroid counts."""
        return [[c for c, _ in found] for found in self._search(queries, k)]

    def route(self, queries: np.ndarray, background: np.ndarray, margin: float = ROUTING_MARGIN,
              k: int = 5) -> list[Routing]:
        """Where each query row goes. The candidates are tried best score first; the first to pass serves it:
        the image clears the candidate's image floor + margin, the instruction its instruction floor + margin,
        and the instruction is nearer the candidate's instruction centroid than any question the candidate does
        not itself ask (`asks`): the other candidates' and the `background` question embeddings [B, text_dim]
        (background_questions). Otherwise the base connector answers, for the best candidate's reason."""
        background = np.asarray(background, np.float32)
        routings = []
        for query, found in zip(np.asarray(queries, np.float32), self._search(queries, k)):
            instruction = query[self.image_dim:]
            first: tuple[FallBack, str | None] | None = None
            chosen = None
            for c, key in found:
                nearer = None
                if c.image < c.image_floor + margin:
                    reason = FallBack.IMAGE_UNLIKE
                elif c.instruction < c.instruction_floor + margin:
                    reason = FallBack.INSTRUCTION_UNLIKE
                else:
                    # only questions the task does not itself ask count against it: another task asking the same
                    # question (of other images) is no evidence that this request asks something else
                    others = {o.task_id: o.instruction for o, other_key in found
                              if o.task_id != c.task_id and not asks(key, other_key, c.instruction_floor)}
                    outside = background[~asks(key, background, c.instruction_floor)]
                    if len(outside):
                        others[BACKGROUND] = float((outside @ instruction).max())
                    nearer = max(others, key=lambda task: others[task], default=None)
                    if nearer is None or others[nearer] < c.instruction:
                        chosen = c
                        break
                    reason = FallBack.NEARER_OTHER_QUESTION
                first = first or (reason, nearer)
            candidates = [c for c, _ in found]
            if chosen is not None:
                routings.append(Routing(chosen, None, candidates))
            else:
                reason, nearer = first or (FallBack.NO_TASKS, None)
                routings.append(Routing(None, reason, candidates, nearer))
        return routings


def asks(task_question: np.ndarray, questions: np.ndarray, instruction_floor: float) -> np.ndarray | bool:
    """Whether a task whose instruction centroid is `task_question` asks `questions` (one embedding or [N, d]):
    they are within its instruction floor of it, as the wordings it was trained on are."""
    return questions @ task_question >= instruction_floor


def read_index(registry: Registry) -> tuple[dict, faiss.Index | None]:
    """The persisted index and its description; ValueError when they disagree with each other (a torn or
    tampered pair), OSError/KeyError when missing."""
    index_dir = registry.root / "index"
    meta = json.loads((index_dir / "index.json").read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"index format {meta.get('format')!r} (this cit writes {INDEX_FORMAT})")
    index = None
    if meta["keys"] is not None:
        if "/" in meta["keys"] or not meta["keys"].endswith(".faiss"):
            raise ValueError(f"index.json names {meta['keys']!r}, not a keys file of its own")
        index = faiss.read_index(str(index_dir / meta["keys"]))
        _tune(index)
    ntotal, dim = (index.ntotal, index.d) if index is not None else (0, 0)
    if (ntotal, dim) != (meta["ntotal"], meta["dim"]) or ntotal != len(meta["rows"]):
        raise ValueError(f"the keys file holds {ntotal} keys of {dim} dimensions; index.json says "
                         f"{meta['ntotal']} of {meta['dim']} for {len(meta['rows'])} rows")
    return meta, index


def verify_index(registry: Registry) -> list[str]:
    """Problems of the persisted routing index, one line each: missing, stale, torn, or keys that are not the
    tasks' keys."""
    try:
        meta, index = read_index(registry)
    except FileNotFoundError:
        return ["routing index is missing (it is rebuilt on the next server start or add-task)"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        return [f"routing index is unreadable or torn: {exc}"]
    if meta["fingerprint"] != registry.fingerprint():
        return ["routing index is stale (it is rebuilt on the next server start or add-task)"]
    built = Router.build(registry)
    if [list(r) for r in built.rows] != [list(r) for r in meta["rows"]]:
        return ["routing index rows disagree with the task keys"]
    if not np.allclose(np.array(meta["floors"], np.float32).reshape(-1, 2), built.floors) \
            or meta["image_dim"] != built.image_dim:
        return ["routing index floors differ from the task keys"]
    if index is not None and built.index is not None and not np.allclose(_keys_of(index), _keys_of(built.index), atol=1e-5):
        return ["routing index keys differ from the task keys"]
    return []


def _flat(index: faiss.Index) -> faiss.Index:
    """The index that holds the full keys (an approximate index keeps them for exact re-ranking)."""
    return faiss.downcast_index(index.refine_index) if isinstance(index, faiss.IndexRefine) else index


def _keys_of(index: faiss.Index) -> np.ndarray:
    flat = _flat(index)
    return flat.reconstruct_n(0, flat.ntotal)


# Reuse a task's adapter at this similarity or above, when the new task's images are also the task's kind: at
# least REUSE_IMAGE_SHARE of its training images clear one of the task's image floors (the router would send them
# to that adapter anyway). Similarity alone cannot tell a new wording of a task from its question asked of other
# images: measured (docs/routing/reuse-threshold.txt, 40 pairs) redraws score 0.99, paraphrases 0.82-0.94, the
# same question over other images 0.62-0.80, a new question over the same images 0.20-0.48, unrelated tasks at
# most 0.17; the share of images inside the floor is 98-100 % for redraws and paraphrases, 0-11 % for other images.
REUSE_THRESHOLD = 0.6
REUSE_IMAGE_SHARE = 0.5


def image_share(key: TaskKey, images: np.ndarray) -> float:
    """The share of `images` (raw image features [N, d], the image part of routing queries) that clear the image
    floor of one of the key's centroids."""
    if len(images) == 0:
        return 0.0
    cos = _unit(images) @ key.image.T  # [N, C]
    return float(np.mean((cos >= key.routing_floors[:, 0]).any(axis=1)))


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
