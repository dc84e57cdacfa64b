"""The request path: request -> embed -> route (FAISS) -> adapter cache -> backbone -> tokens."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.images import decode_image
from cit_backbone.language_model import Sampling
from cit_registry.router import Candidate, Router, select
from cit_registry.store import Registry, TaskVersion, routing_query

from .adapter_cache import BASE, AdapterId, AdapterStore
from .config import ServerConfig


@dataclass(frozen=True)
class Request:
    image: bytes
    instruction: str
    sampling: Sampling
    task_id: str | None = None  # set: routing is skipped


@dataclass(frozen=True)
class RouteDecision:
    adapter: AdapterId           # BASE when no task is close enough
    score: float
    below_threshold: bool
    forced: bool
    threshold: float
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Embedded:
    """A request's embeddings, computed once and used for routing and generation alike."""

    features: torch.Tensor      # [1, 1280] vision features
    query: np.ndarray           # [1, 1664] routing query


class Engine:
    def __init__(self, config: ServerConfig, backbone: Backbone | None = None, embedder: TextEmbedder | None = None):
        self.config = config
        self.registry = Registry.open(config.registry)
        self.backbone = backbone or Backbone()
        self.embedder = embedder or TextEmbedder()
        self.adapters = AdapterStore(self.registry, self.backbone, config.adapter_cache_size)
        self._router = Router.load(self.registry)
        self._router_checked = time.monotonic()
        self._router_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one forward pass at a time: 2 cores gain nothing from more

    # -- request -> embed
    def validate_instruction(self, instruction: str) -> str:
        if not instruction.strip():
            raise ValueError("instruction is empty")
        if len(instruction) > self.config.max_instruction_chars:
            raise ValueError(f"instruction has {len(instruction)} characters; the limit is {self.config.max_instruction_chars}")
        return instruction

    def embed(self, image: bytes, instruction: str) -> Embedded:
        self.validate_instruction(instruction)
        img = decode_image(image, self.config.max_image_bytes, self.config.max_image_pixels)
        with self._model_lock:
            features = self.backbone.encode_images([img])
            text = self.embedder.embed([instruction])
        return Embedded(features, routing_query(features.numpy(), text))

    # -- embed -> route
    def router(self) -> Router:
        """The routing index, reloaded when the registry gained or changed a task (checked at most once a second)."""
        with self._router_lock:
            if time.monotonic() - self._router_checked >= self.config.refresh_seconds:
                self._router_checked = time.monotonic()
                if self.registry.fingerprint() != self._router.fingerprint:
                    self._router = Router.load(self.registry)
            return self._router

    def route(self, embedded: Embedded, task_id: str | None = None, k: int = 5) -> RouteDecision:
        candidates = self.router().search(embedded.query, k)[0]
        threshold = self.config.routing_threshold
        if task_id is not None:
            task = self.registry.get(task_id)  # TaskNotFound -> NOT_FOUND
            score = next((c.score for c in candidates if c.task_id == task_id), float("nan"))
            return RouteDecision(AdapterId(task.task_id, task.version), score, False, True, threshold, candidates)
        chosen = select(candidates, threshold)
        if chosen is None:
            best = candidates[0].score if candidates else float("nan")
            return RouteDecision(BASE, best, True, False, threshold, candidates)
        return RouteDecision(AdapterId(chosen.task_id, chosen.version), chosen.score, False, False, threshold, candidates)

    # -- route -> adapter -> backbone -> tokens
    def stream(self, request: Request) -> Iterator[tuple[RouteDecision | None, str, Completion | None]]:
        """Yields (route, "", None) first, then (None, delta, None) per step, and (None, delta, completion) last."""
        embedded = self.embed(request.image, request.instruction)
        decision = self.route(embedded, request.task_id)
        stops, sent = request.sampling.stop, 0
        with self._model_lock:  # held from loading the adapter to the last token: nothing evicts it in between
            adapter = self.adapters.get(decision.adapter)
            yield decision, "", None
            for (state,) in self.backbone.stream(embedded.features, [adapter], [request.instruction], [request.sampling]):
                text = state.stable_text(stops)
                delta, sent = text[sent:], len(text)
                if state.finish_reason:
                    yield None, delta, Completion(state.text, state.finish_reason, state.prompt_tokens,
                                                  len(state.token_ids))
                    return
                if delta:
                    yield None, delta, None

    def generate(self, request: Request) -> tuple[RouteDecision, Completion]:
        decision, completion = None, None
        for route, _, final in self.stream(request):
            decision = route or decision
            completion = final or completion
        assert decision is not None and completion is not None
        return decision, completion

    # -- registry views
    def tasks(self) -> list[TaskVersion]:
        return self.registry.latest()

    def task(self, task_id: str) -> TaskVersion:
        return self.registry.get(task_id)
