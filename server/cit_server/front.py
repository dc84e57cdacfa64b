"""The request front: request -> decode and validate -> embed -> route (FAISS). Everything a request goes through
before it reaches its adapter and the running batch, and the routing index it routes with, which follows the
registry: a watcher thread builds the new index when the registry changes and swaps it in while requests go on
routing with the old one."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.sampling import Sampling
from cit_registry.router import Candidate, FallBack, Router, background_questions
from cit_registry.store import Registry

from .adapter_cache import BASE, AdapterId
from .config import ServerConfig
from .validation import RequestLimits

log = logging.getLogger("cit.server")
INSTRUCTION_CACHE_SIZE = 4096  # instruction embeddings kept for routing
FULL_CHECK_S = 60.0   # the registry's task directories are walked this often (its generation: every refresh)


@dataclass(frozen=True)
class Request:
    image: bytes
    instruction: str
    sampling: Sampling
    task_id: str | None = None  # set: routing is skipped


@dataclass(frozen=True)
class Embedded:
    """A request's embeddings, computed once and used for routing and generation alike."""

    features: torch.Tensor      # [1, F] vision features (for the connector)
    query: np.ndarray           # [1, D + 384] routing query (pooled image vector, instruction)


@dataclass(frozen=True)
class RouteDecision:
    adapter: AdapterId           # BASE when no task is close enough
    score: float
    fell_back: FallBack | None   # why the base connector answers (None: routed, or forced)
    forced: bool
    margin: float
    candidates: list[Candidate] = field(default_factory=list)
    nearer: str | None = None    # FallBack.NEARER_OTHER_QUESTION: the task whose question is nearer, or BACKGROUND


class Front:
    """`decode` runs on any thread; `embed` (the vision tower and the text embedder) under `model_lock`, which
    the caller holds for `embed_batch`; `route` reads the current index without I/O."""

    def __init__(self, config: ServerConfig, registry: Registry, backbone: Backbone, embedder: TextEmbedder,
                 visual_tokens: int, model_lock: threading.Lock) -> None:
        self.config, self.registry, self.backbone, self.embedder = config, registry, backbone, embedder
        self.limits = RequestLimits(config, lambda instruction: backbone.lm.prompt_tokens(instruction, visual_tokens))
        self._background = embedder.embed(background_questions())  # questions no task is assumed to ask
        self._instructions: OrderedDict[str, np.ndarray] = OrderedDict()  # guarded by the model lock
        self._model_lock = model_lock
        self._router = Router.load(registry)
        self._router_lock = threading.Lock()   # guards self._router
        self._rebuilding = threading.Lock()    # one index build at a time (the watcher's or an admin reload's)
        self._closing = threading.Event()
        threading.Thread(target=self._watch_registry, name="cit-registry-watch", daemon=True).start()

    def close(self) -> None:
        self._closing.set()

    # -- request -> decode and validate
    def decode(self, image: bytes, instruction: str) -> Image.Image:
        """Check a request's input in the caller's thread: bad input never reaches the model."""
        self.limits.instruction(instruction)
        return self.limits.image(image)

    # -- decode -> embed
    def embed(self, image: bytes, instruction: str) -> Embedded:
        img = self.decode(image, instruction)
        with self._model_lock:
            return self.embed_batch([img], [instruction])[0]

    def embed_batch(self, images: list[Image.Image], instructions: list[str]) -> list[Embedded]:
        """Decoded requests' embeddings in one pass; the caller holds the model lock."""
        features = self.backbone.encode_images(images)
        queries = self.backbone.routing_query(features, self.instruction_embeddings(instructions))
        return [Embedded(features[i : i + 1], queries[i : i + 1]) for i in range(len(images))]

    def instruction_embeddings(self, instructions: list[str]) -> np.ndarray:
        """Applications send the same few instructions again and again: their embeddings are kept (an LRU), so
        routing usually costs the FAISS search alone (the image features are needed for generation anyway)."""
        cache = self._instructions
        missing = [i for i in dict.fromkeys(instructions) if i not in cache]
        if missing:
            for instruction, vector in zip(missing, self.embedder.embed(missing)):
                cache[instruction] = vector
        for instruction in instructions:
            cache.move_to_end(instruction)
        while len(cache) > INSTRUCTION_CACHE_SIZE:
            cache.popitem(last=False)
        return np.stack([cache[i] for i in instructions])

    # -- embed -> route
    def router(self) -> Router:
        """The routing index: no I/O on the request path (the registry watcher replaces it)."""
        with self._router_lock:
            return self._router

    def route(self, embedded: Embedded, task_id: str | None = None, k: int = 5) -> RouteDecision:
        margin = self.config.routing_margin
        router = self.router()
        routing = router.route(embedded.query, self._background, margin, k)[0]
        candidates = routing.candidates
        if task_id is not None:
            # the version the index serves, as routing would pick it (no registry read on the scheduler thread:
            # reading and checking a card there cost a forced request more than routing one); a task the index
            # lacks (its key unreadable, or committed since the last refresh) is looked up in the registry
            version = router.version_of(task_id)
            if version is None:
                version = self.registry.get(task_id).version  # TaskNotFound -> NOT_FOUND
            score = next((c.score for c in candidates if c.task_id == task_id), float("nan"))
            return RouteDecision(AdapterId(task_id, version), score, None, True, margin, candidates)
        chosen = routing.chosen
        if chosen is None:
            best = candidates[0].score if candidates else float("nan")
            return RouteDecision(BASE, best, routing.fell_back, False, margin, candidates, routing.nearer)
        return RouteDecision(AdapterId(chosen.task_id, chosen.version), chosen.score, None, False, margin, candidates)

    # -- the index follows the registry
    def _watch_registry(self) -> None:
        """Every refresh_seconds: one read of the registry's generation counter; every FULL_CHECK_S, a walk of its
        task directories too (it catches a commit whose counter bump a crash lost). On a change the new index is
        built here, off the scheduler thread, while requests route with the old one (a large index takes a
        minute to train)."""
        last_walk = time.monotonic()
        while not self._closing.wait(max(self.config.refresh_seconds, 0.05)):
            try:
                walk = time.monotonic() - last_walk >= FULL_CHECK_S
                if walk:
                    last_walk = time.monotonic()
                self._refresh(walk)
            except Exception:
                log.exception("rebuilding the routing index failed")

    def _refresh(self, walk: bool) -> bool:
        """Rebuild the index when the registry changed (generation, or with `walk` the task directories too);
        whether it did. One build at a time, whoever asks."""
        with self._rebuilding:
            router = self.router()
            changed = self.registry.generation() != router.generation or (
                walk and self.registry.fingerprint() != router.fingerprint)
            if changed:  # only the keys of versions the old index lacks are read
                router = Router.load(self.registry, previous=router)
                with self._router_lock:
                    self._router = router
            return changed

    def reload(self) -> tuple[int, bool]:
        """Read the registry now, walking its task directories, and wait for its index (the admin RPC): the
        routable tasks, and whether anything changed. Requests go on routing with the old index meanwhile."""
        changed = self._refresh(walk=True)
        return len(self.router()), changed
