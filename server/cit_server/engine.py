"""The request path: request -> embed -> route (FAISS) -> adapter cache -> backbone -> tokens.

Generation runs on the scheduler's thread (scheduler.py): `admit` takes new requests along that path into the
running batch, `step` decodes one token for every running request."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from cit_backbone.adapters import AdapterFiles, ConnectorConfig, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.images import decode_image
from cit_backbone.language_model import RowState, Sampling
from cit_registry.router import Candidate, Router, select
from cit_registry.store import Registry, TaskVersion, routing_query

from .adapter_cache import BASE, AdapterId, AdapterStore
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import Job, Scheduler, Step


log = logging.getLogger("cit.server")
INSTRUCTION_CACHE_SIZE = 4096  # instruction embeddings kept for routing


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

    features: torch.Tensor      # [1, F] vision features (for the connector)
    query: np.ndarray           # [1, D + 384] routing query (pooled image vector, instruction)


@dataclass(eq=False)
class _Loading:
    """A routed job waiting for its cold adapter's files (read on the adapter store's loader thread)."""

    job: Job
    embedded: Embedded
    adapter: AdapterId  # as routed
    files: Future


@dataclass(eq=False)
class _Running:
    """A row of the running batch and the request it answers."""

    job: Job
    state: RowState
    served: AdapterId  # acquired from the adapter store until the row leaves


class Engine:
    def __init__(self, config: ServerConfig, backbone: Backbone | None = None, embedder: TextEmbedder | None = None):
        self.config = config
        self.registry = Registry.open(config.registry)
        self.backbone = backbone or Backbone()
        self.embedder = embedder or TextEmbedder()
        self.adapters = AdapterStore(self.registry, self.backbone, config.adapter_cache_size,
                                     config.adapter_cache_bytes, config.pinned_tasks)
        self._check_tasks_fit()
        self.metrics = Metrics(self.adapters)
        self._router = Router.load(self.registry)
        self._router_checked = time.monotonic()
        self._router_lock = threading.Lock()
        self._building: threading.Thread | None = None  # a new routing index being built
        self._instructions: OrderedDict[str, np.ndarray] = OrderedDict()  # guarded by the model lock
        self._model_lock = threading.Lock()  # one forward pass at a time: 2 cores gain nothing from more
        self._worker = self._start_worker() if config.engine == "vllm" and config.vllm_worker is None else None
        self._batch = self._new_batch()  # the running rows; only the scheduler thread touches it
        self._running: list[_Running] = []
        self._loading: list[_Loading] = []  # only the scheduler thread touches these two
        self.scheduler = Scheduler(self.admit, self.step, config.max_batch_size, config.batch_window_ms / 1000,
                                   config.max_queue)

    def _check_tasks_fit(self) -> None:
        """Every task's projection must read this backbone's vision features and write its LM's width: a registry
        trained on another backbone fails here, clearly, not at its first request."""
        base = self.adapters.base.connector.config
        shape = lambda c: (c.feature_dim, c.hidden_size, c.num_tokens, c.projector)  # noqa: E731
        for task in self.registry.latest():
            config = ConnectorConfig.read(task.adapter_dir)
            if shape(config) != shape(base):
                raise ValueError(f"task {task.task_id!r} was trained on another backbone: its projection "
                                 f"{shape(config)} does not fit this one's {shape(base)} (feature width, LM width, "
                                 "visual tokens, projector); start the server with that backbone (--backbone)")

    def _start_worker(self):
        from .vllm_engine import WorkerProcess, default_worker_python

        return WorkerProcess(self.config.vllm_python or default_worker_python(), self.backbone.lm.path,
                             self.config.adapter_cache_size)

    def _worker_died(self) -> bool:
        return self._worker is not None and self._worker.proc.poll() is not None

    def _recover_worker(self) -> None:
        """Before new rows join: if the vLLM worker this server started has exited, its rows end with an error and
        a new worker starts (scheduler thread; requests that arrive meanwhile wait in the queue)."""
        if not self._worker_died():
            return
        from .vllm_engine import WorkerError

        self._reset_batch(WorkerError(f"the vLLM worker exited (code {self._worker.proc.returncode}); a new one "
                                      "is starting"))

    def _reset_batch(self, error: Exception) -> None:
        """Every running row ends with `error`; an empty batch replaces theirs (a worker that died is restarted)."""
        for row in list(self._running):
            self._finish(row, ("error", error))
        self._batch.close()
        self._batch = self._new_batch()

    def _new_batch(self):
        """An empty running batch on the configured engine: the embedded LM, or a vLLM worker."""
        if self.config.engine == "embedded":
            return self.backbone.decode_batch()
        from .vllm_engine import WORKER_START_TIMEOUT_S, VllmBatch

        if self._worker_died():
            log.error("the vLLM worker exited (code %s); starting a new one", self._worker.proc.returncode)
            self._worker.stop()  # what is left of its process group
            self._worker = self._start_worker()
        batch = VllmBatch(self._worker.target if self._worker else self.config.vllm_worker, self.backbone.lm,
                          self.adapters.lora_dir)
        info = batch.info(timeout=WORKER_START_TIMEOUT_S)
        if info.hidden_size != self.backbone.lm.hidden_size:
            raise ValueError(f"the vLLM worker serves {info.model} (hidden size {info.hidden_size}); this "
                             f"backbone's LM has hidden size {self.backbone.lm.hidden_size}")
        return batch

    def close(self) -> None:
        self.scheduler.close()
        self._batch.close()
        self.adapters.close()
        if self._worker is not None:
            self._worker.stop()

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
        queries = routing_query(self.backbone.routing_features(features).numpy(),
                                self._instruction_embeddings(instructions))
        return [Embedded(features[i : i + 1], queries[i : i + 1]) for i in range(len(images))]

    def _instruction_embeddings(self, instructions: list[str]) -> np.ndarray:
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
        """The routing index. When the registry gained or changed a task (checked at most once a second) the new
        index is built on a thread of its own while requests go on routing with this one (training a large index
        takes a minute), and replaces it when ready."""
        with self._router_lock:
            now = time.monotonic()
            if self._building is None and now - self._router_checked >= self.config.refresh_seconds:
                self._router_checked = now
                if self.registry.fingerprint() != self._router.fingerprint:
                    self._building = threading.Thread(target=self._rebuild, name="cit-router", daemon=True)
                    self._building.start()
            return self._router

    def _rebuild(self) -> None:
        try:
            router = Router.load(self.registry)
        except Exception:  # noqa: BLE001 - keep routing with the old index; the next check tries again
            log.exception("rebuilding the routing index failed")
            router = None
        with self._router_lock:
            self._router = router or self._router
            self._building = None

    def reload(self) -> tuple[int, bool]:
        """Read the registry now and wait for its index (the admin RPC): the routable tasks, and whether anything
        changed. Requests go on routing with the old index meanwhile."""
        with self._router_lock:  # not router(): it could start a background build of the same index
            router = self._router
        if self.registry.fingerprint() == router.fingerprint:
            return len(router), False
        router = Router.load(self.registry)
        with self._router_lock:
            self._router, self._router_checked = router, time.monotonic()
        return len(router), True

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

    def admit(self, jobs: list[Job]) -> None:
        """embed -> route -> adapters -> prefill: new jobs join the running batch (scheduler thread). A job whose
        adapter is cold waits in `_loading` while the loader thread reads it; it joins at a later step."""
        start = time.monotonic()
        for job in jobs:
            self.metrics.latency.labels("queue").observe(start - job.submitted)
        self._recover_worker()
        ready: list[tuple[Job, Embedded, AdapterId, AdapterFiles | None]] = []
        with self._model_lock:
            embedded = self._embed([j.image for j in jobs], [j.instruction for j in jobs])
            for job, emb in zip(jobs, embedded):
                try:
                    decision = self.route(emb, job.task_id)
                    reading = self.adapters.prefetch(decision.adapter)  # None: resident
                except Exception as exc:  # noqa: BLE001 - this row's error (e.g. NOT_FOUND) goes to its request
                    job.out.put(("error", exc))
                    continue
                job.out.put(("route", decision))
                self.metrics.latency.labels("route").observe(time.monotonic() - start)
                self.metrics.routed.labels(decision.adapter.task_id).inc()
                if decision.below_threshold:
                    self.metrics.below_threshold.inc()
                if reading is None:
                    ready.append((job, emb, decision.adapter, None))
                else:
                    self._loading.append(_Loading(job, emb, decision.adapter, reading))
        self._join(ready)

    def _join_loaded(self) -> None:
        """Jobs whose adapter has been read join now; cancelled ones leave."""
        if not self._running:  # nothing to decode meanwhile: wait a little for a read instead of spinning
            wait([w.files for w in self._loading], timeout=0.05, return_when=FIRST_COMPLETED)
        done = [w for w in self._loading if w.files.done() or w.job.cancelled()]
        self._loading = [w for w in self._loading if w not in done]
        ready = []
        for waiting in done:
            if waiting.job.cancelled():
                waiting.job.out.put(("cancelled", 0))
            elif waiting.files.exception() is not None:
                waiting.job.out.put(("error", waiting.files.exception()))
            else:
                ready.append((waiting.job, waiting.embedded, waiting.adapter, waiting.files.result()))
        self._join(ready)

    def _join(self, jobs: list[tuple[Job, Embedded, AdapterId, AdapterFiles | None]]) -> None:
        """Routed jobs whose adapters are at hand are prefilled into the running batch."""
        joining: list[tuple[Job, AdapterId, TaskAdapter, torch.Tensor]] = []
        with self._model_lock:
            for job, emb, adapter, files in jobs:
                try:
                    served, loaded = self.adapters.acquire(adapter, files)  # CacheFull -> RESOURCE_EXHAUSTED
                except Exception as exc:  # noqa: BLE001 - this row's error goes to its request
                    job.out.put(("error", exc))
                    continue
                joining.append((job, served, loaded, emb.features))
            if not joining:
                return
            try:
                states = self.backbone.join(self._batch, torch.cat([j[3] for j in joining]),
                                            [j[2] for j in joining], [j[0].instruction for j in joining],
                                            [j[0].sampling for j in joining])
            except Exception as exc:  # noqa: BLE001 - the joining requests get the error; the batch goes on
                log.exception("prefilling %d requests failed", len(joining))
                for job, served, _, _ in joining:
                    self.adapters.release(served)
                    job.out.put(("error", exc))
                return
        for (job, served, _, _), state in zip(joining, states):
            self._running.append(_Running(job, state, served))
        self._emit()

    def step(self) -> int:
        """Drop rows whose client went away, let in jobs whose adapter is read, decode one token for every running
        row; returns the rows running or waiting for their adapter."""
        if self._loading:
            self._join_loaded()
        for row in [r for r in self._running if r.job.cancelled()]:
            log.info("generation stopped after %d of at most %d tokens: the client went away",
                     len(row.state.token_ids), row.job.sampling.max_new_tokens)
            self._batch.remove(row.state)
            self._finish(row, ("cancelled", len(row.state.token_ids)))
        if self._running:
            self.metrics.batch_size.observe(len(self._running))
            try:
                with self._model_lock:
                    self._batch.step()
            except Exception as exc:  # noqa: BLE001 - every running request gets the error; the server goes on
                log.exception("decode step of %d rows failed", len(self._running))
                self._reset_batch(exc)
            self._emit()
        self.metrics.running.set(len(self._running))
        return len(self._running) + len(self._loading)

    def _emit(self) -> None:
        for row in list(self._running):
            state, job = row.state, row.job
            step = Step(state.stable_text(job.sampling.stop), state.text, state.finish_reason, state.prompt_tokens,
                        len(state.token_ids))
            if state.finish_reason:
                self._finish(row, ("step", step))
            elif state.token_ids:  # a vLLM row has none until the worker's first tokens arrive
                job.out.put(("step", step))

    def _finish(self, row: _Running, message: tuple) -> None:
        self._running.remove(row)
        self.adapters.release(row.served)
        row.job.out.put(message)

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
