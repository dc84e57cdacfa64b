"""The request path: request -> embed -> route (FAISS) -> adapter cache -> backbone -> tokens.

Generation runs batch-wise on the scheduler's thread (scheduler.py): `serve_batch` is that path for a batch."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.images import decode_image
from cit_backbone.language_model import Sampling
from cit_registry.router import Candidate, Router, select
from cit_registry.store import Registry, TaskVersion, routing_query

from .adapter_cache import BASE, AdapterId, AdapterStore
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import Job, Scheduler, Step


log = logging.getLogger("cit.server")


class Cancelled(Exception):
    """The client went away (cancelled, or its deadline passed) before the answer was complete."""


def _never() -> bool:
    return False


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
        self.metrics = Metrics(self.adapters)
        self._router = Router.load(self.registry)
        self._router_checked = time.monotonic()
        self._router_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one forward pass at a time: 2 cores gain nothing from more
        self.scheduler = Scheduler(self.serve_batch, config.max_batch_size, config.batch_window_ms / 1000,
                                   config.max_queue)

    def close(self) -> None:
        self.scheduler.close()

    # -- request -> embed
    def validate_instruction(self, instruction: str) -> str:
        if not instruction.strip():
            raise ValueError("instruction is empty")
        if len(instruction) > self.config.max_instruction_chars:
            raise ValueError(f"instruction has {len(instruction)} characters; the limit is {self.config.max_instruction_chars}")
        return instruction

    def decode(self, image: bytes, instruction: str) -> Image.Image:
        """Check a request's input in the caller's thread: bad input never reaches the model."""
        self.validate_instruction(instruction)
        return decode_image(image, self.config.max_image_bytes, self.config.max_image_pixels)

    def embed(self, image: bytes, instruction: str) -> Embedded:
        img = self.decode(image, instruction)
        with self._model_lock:
            return self._embed([img], [instruction])[0]

    def _embed(self, images: list[Image.Image], instructions: list[str]) -> list[Embedded]:
        features = self.backbone.encode_images(images)
        queries = routing_query(features.numpy(), self.embedder.embed(instructions))
        return [Embedded(features[i : i + 1], queries[i : i + 1]) for i in range(len(images))]

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
    def stream(self, request: Request, cancelled: Callable[[], bool] = _never,
               ) -> Iterator[tuple[RouteDecision | None, str, Completion | None]]:
        """Yields (route, "", None) first, then (None, delta, None) per step, and (None, delta, completion) last.
        When `cancelled()` turns true the generation stops at the next step (Cancelled is raised)."""
        job = Job(self.decode(request.image, request.instruction), request.instruction, request.sampling,
                  request.task_id, cancelled)
        self.scheduler.submit(job)  # Overloaded -> RESOURCE_EXHAUSTED
        sent, first = 0, True
        while True:
            try:
                kind, payload = job.out.get(timeout=1.0)
            except queue.Empty:
                if cancelled():  # gone while queued or running: the scheduler drops the job at its next look
                    raise Cancelled("the client cancelled the request or its deadline passed") from None
                continue
            if kind == "route":
                yield payload, "", None
            elif kind == "error":
                raise payload
            elif kind == "cancelled":
                raise Cancelled("the client cancelled the request or its deadline passed")
            else:
                step: Step = payload
                if first:
                    self.metrics.latency.labels("first_token").observe(time.monotonic() - job.submitted)
                    first = False
                delta, sent = step.stable_text[sent:], len(step.stable_text)
                if step.finish_reason:
                    self.metrics.latency.labels("total").observe(time.monotonic() - job.submitted)
                    self.metrics.tokens.inc(step.completion_tokens)
                    yield None, delta, Completion(step.text, step.finish_reason, step.prompt_tokens,
                                                  step.completion_tokens)
                    return
                if delta:
                    yield None, delta, None

    def serve_batch(self, jobs: list[Job]) -> None:
        """embed -> route -> adapters -> one decode for the whole batch; runs on the scheduler's thread."""
        start = time.monotonic()
        self.metrics.batch_size.observe(len(jobs))
        for job in jobs:
            self.metrics.latency.labels("queue").observe(start - job.submitted)
        with self._model_lock:
            embedded = self._embed([j.image for j in jobs], [j.instruction for j in jobs])
            rows = []
            for job, emb in zip(jobs, embedded):
                try:
                    decision = self.route(emb, job.task_id)
                    # max_batch_size <= adapter_cache_size: a batch never evicts an adapter another row uses
                    adapter = self.adapters.get(decision.adapter)
                except Exception as exc:  # noqa: BLE001 - this row's error (e.g. NOT_FOUND) goes to its request
                    job.out.put(("error", exc))
                    continue
                job.out.put(("route", decision))
                rows.append((job, emb, adapter))
                self.metrics.routed.labels(decision.adapter.task_id).inc()
                if decision.below_threshold:
                    self.metrics.below_threshold.inc()
            routed = time.monotonic()
            for job, _, _ in rows:
                self.metrics.latency.labels("route").observe(routed - start)
            if not rows:
                return
            jobs = [r[0] for r in rows]
            active = set(range(len(rows)))
            states_seen = self.backbone.stream(torch.cat([r[1].features for r in rows]), [r[2] for r in rows],
                                               [j.instruction for j in jobs], [j.sampling for j in jobs])
            for states in states_seen:
                for i in sorted(active):
                    job, state = jobs[i], states[i]
                    if job.cancelled():
                        log.info("generation stopped after %d of at most %d tokens: the client went away",
                                 len(state.token_ids), job.sampling.max_new_tokens)
                        job.out.put(("cancelled", len(state.token_ids)))
                        active.discard(i)
                        continue
                    job.out.put(("step", Step(state.stable_text(job.sampling.stop), state.text, state.finish_reason,
                                              state.prompt_tokens, len(state.token_ids))))
                    if state.finish_reason:
                        active.discard(i)
                if not active:  # every row has finished or gone: stop decoding the batch
                    states_seen.close()
                    return

    def generate(self, request: Request, cancelled: Callable[[], bool] = _never) -> tuple[RouteDecision, Completion]:
        decision, completion = None, None
        for route, _, final in self.stream(request, cancelled):
            decision = route or decision
            completion = final or completion
        assert decision is not None and completion is not None
        return decision, completion

    # -- registry views
    def tasks(self) -> list[TaskVersion]:
        return self.registry.latest()

    def task(self, task_id: str) -> TaskVersion:
        return self.registry.get(task_id)
