"""The request path: request -> embed -> route (FAISS) -> adapter cache -> backbone -> tokens.

A front (the gRPC servicer, or `stream` in-process) takes an admission slot, then `submit` decodes and checks the
request on a front thread and queues it. Generation runs on the scheduler's thread (scheduler.py): `admit` takes
new requests along that path into the running batch, `step` decodes one token for every running request."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import TypeVar, Union

import numpy as np
import torch
from PIL import Image

from cit_backbone.adapters import AdapterFiles, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.language_model import RowState, Sampling
from cit_registry.router import Candidate, FallBack, Router, background_questions
from cit_registry.store import Registry, TaskVersion

from .adapter_cache import BASE, AdapterId, AdapterStore
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import Admission, Event, EventSink, Failed, Job, Routed, Scheduler, Step, Stopped
from .validation import RequestLimits
from .vllm_engine import WORKER_START_TIMEOUT_S, VllmBatch, WorkerError, WorkerProcess, default_worker_python


log = logging.getLogger("cit.server")
INSTRUCTION_CACHE_SIZE = 4096  # instruction embeddings kept for routing
WORKER_RETRY_S = 5.0  # a vLLM worker that failed to start is tried again after this long
EXTERNAL_WORKER_RETRY_S = 2.0  # how long the scheduler waits for a --vllm-worker it reconnects to
FULL_CHECK_S = 60.0   # the registry's task directories are walked this often (its generation: every refresh)
T = TypeVar("T")


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
    fell_back: FallBack | None   # why the base connector answers (None: routed, or forced)
    forced: bool
    margin: float
    candidates: list[Candidate] = field(default_factory=list)
    nearer: str | None = None    # FallBack.NEARER_OTHER_QUESTION: the task whose question is nearer, or BACKGROUND


@dataclass(frozen=True)
class Delta:
    """Text that follows what was sent so far."""

    text: str


@dataclass(frozen=True)
class Completion:
    """The last output of a stream: the whole text and why it ended."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Output = Union[RouteDecision, Delta, Completion]  # what a stream yields: the route, deltas, the completion


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


class _LoopSink:
    """A job's events, handed from the scheduler thread to an asyncio front's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is reading this job any more
            pass


class _Reader:
    """Turns one job's events into what a front sends: the route, text deltas, and the completion."""

    def __init__(self, engine: "Engine", job: Job) -> None:
        self.metrics, self.job = engine.metrics, job
        self.sent, self.first, self.done = 0, True, False

    def read(self, event: Event) -> list[Output]:
        if isinstance(event, Routed):
            return [event.decision]
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Stopped):
            raise Cancelled("the client cancelled the request or its deadline passed")
        if self.first:
            self.metrics.latency.labels("first_token").observe(time.monotonic() - self.job.submitted)
            self.first = False
        delta, self.sent = event.stable_text[self.sent:], len(event.stable_text)
        out: list[Output] = [Delta(delta)] if delta else []
        if event.finish_reason:
            self.metrics.latency.labels("total").observe(time.monotonic() - self.job.submitted)
            self.metrics.tokens.inc(event.completion_tokens)
            out.append(Completion(event.text, event.finish_reason, event.prompt_tokens, event.completion_tokens))
            self.done = True
        return out


class Engine:
    def __init__(self, config: ServerConfig, backbone: Backbone | None = None, embedder: TextEmbedder | None = None):
        self.config = config
        self.registry = Registry.open(config.registry)
        self.backbone = backbone or Backbone()
        self.backbone.lm.prefix_cache_bytes = config.prefix_cache_bytes
        self.embedder = embedder or TextEmbedder()
        self._background = self.embedder.embed(background_questions())  # questions no task is assumed to ask
        self.adapters = AdapterStore(self.registry, self.backbone, config.adapter_cache_size,
                                     config.adapter_cache_bytes, config.pinned_tasks)
        self._check_backbone()
        self.metrics = Metrics(self.adapters)
        self.admission = Admission(config.max_requests)
        visual = self.adapters.base.connector.config.num_tokens
        self.limits = RequestLimits(config, lambda instruction: self.backbone.lm.prompt_tokens(instruction, visual))
        self._front = ThreadPoolExecutor(config.workers, thread_name_prefix="cit-front")  # decoding, registry reads
        self._router = Router.load(self.registry)
        self._router_lock = threading.Lock()   # guards self._router
        self._rebuilding = threading.Lock()    # one index build at a time (the watcher's or an admin reload's)
        self._instructions: OrderedDict[str, np.ndarray] = OrderedDict()  # guarded by the model lock
        self._model_lock = threading.Lock()  # one forward pass at a time: 2 cores gain nothing from more
        self._closing = threading.Event()
        self._worker = self._start_worker() if config.engine == "vllm" and config.vllm_worker is None else None
        self._worker_ready = threading.Event()  # set while a started worker is up (see _supervise)
        self._worker_ready.set()
        self._batch = self._new_batch()  # the running rows; only the scheduler thread touches it (None: no worker)
        self._batch_worker = self._worker  # the worker process self._batch talks to
        if self._worker is not None:
            self._supervisor = threading.Thread(target=self._supervise, name="cit-vllm-supervisor", daemon=True)
            self._supervisor.start()
        threading.Thread(target=self._watch_registry, name="cit-registry-watch", daemon=True).start()
        self._running: list[_Running] = []
        self._loading: list[_Loading] = []  # only the scheduler thread touches these two
        self.scheduler = Scheduler(self.admit, self.step, config.max_batch_size, config.batch_window_ms / 1000)

    def _check_backbone(self) -> None:
        """The registry records the backbone its tasks were trained on (identity, widths): a registry of another
        backbone fails here, clearly, not at its first request. One read, whatever the number of tasks."""
        record = self.registry.backbone()
        if record is None:
            return
        base = asdict(self.adapters.base.connector.config)
        problems = [f"projection {k} {record['adapter'][k]!r} (this backbone's: {base[k]!r})"
                    for k in record["adapter"] if record["adapter"][k] != base.get(k)]
        if record["key"]["image"] != self.backbone.routing_dim:
            problems.append(f"image keys of {record['key']['image']} dimensions (this backbone's: "
                            f"{self.backbone.routing_dim})")
        if record.get("identity") and record["identity"] != self.backbone.identity:
            problems.insert(0, f"backbone {record['identity']!r} (this one is {self.backbone.identity!r})")
        if problems:
            raise ValueError(f"registry {self.registry.root}: its tasks were trained on another backbone: "
                             + "; ".join(problems) + "; start the server with that backbone (--backbone)")

    # -- the vLLM worker: started with the engine, restarted by a supervisor thread when it dies
    def _start_worker(self):
        return WorkerProcess(self.config.vllm_python or default_worker_python(), self.backbone.lm.path,
                             self.config.adapter_cache_size, self.config.vllm_max_model_len)

    def _supervise(self) -> None:
        """Restart a worker this server started when it exits, on this thread: the scheduler goes on meanwhile
        (new requests get UNAVAILABLE, health says NOT_SERVING) and is handed the new worker when it is up."""
        while not self._closing.wait(0.25):
            if self._worker.proc.poll() is None:
                continue
            self._worker_ready.clear()
            log.error("the vLLM worker exited (code %s); starting a new one", self._worker.proc.returncode)
            self._worker.stop()  # what is left of its process group
            try:
                self._worker = self._start_worker()
            except Exception:  # noqa: BLE001 - logged; tried again shortly
                log.exception("starting a new vLLM worker failed; trying again in %.0f s", WORKER_RETRY_S)
                self._closing.wait(WORKER_RETRY_S)
                continue
            self._worker_ready.set()

    def _follow_worker(self) -> None:
        """Scheduler thread, before rows join or step: when the worker has changed or died, the running rows end
        with UNAVAILABLE (retryable) and a batch on the new worker replaces theirs once it is up. A worker this
        server did not start (--vllm-worker) is reconnected to when its batch was lost, with a short deadline."""
        if self._worker is None:
            if self._batch is None:
                try:
                    self._batch = self._new_batch(timeout=EXTERNAL_WORKER_RETRY_S)
                except Exception:  # noqa: BLE001 - requests meanwhile: UNAVAILABLE
                    log.exception("reconnecting to the vLLM worker at %s failed", self.config.vllm_worker)
            return
        current = self._worker if self._worker_ready.is_set() else None
        if self._batch is not None and (current is not self._batch_worker or current.proc.poll() is not None):
            self._reset_batch(WorkerError("the vLLM worker exited; a new one is starting, retry shortly"))
            self._batch = None
        if self._batch is None and current is not None and current.proc.poll() is None:
            try:
                self._batch, self._batch_worker = self._new_batch(), current
            except Exception:  # noqa: BLE001 - the supervisor sees a dead worker; requests meanwhile: UNAVAILABLE
                log.exception("connecting to the new vLLM worker failed")

    def ready(self) -> bool:
        """Whether requests can be served now (false while a vLLM worker is being restarted): health follows it."""
        if not self.scheduler.alive():
            return False
        return self._worker is None or (self._worker_ready.is_set() and self._worker.proc.poll() is None)

    def _reset_batch(self, error: Exception) -> None:
        """Every running row ends with `error`; the batch is closed."""
        for row in list(self._running):
            self._finish(row, Failed(error))
        if self._batch is not None:
            self._batch.close()

    def _new_batch(self, timeout: float | None = None):
        """An empty running batch on the configured engine: the embedded LM, or a vLLM worker (which answers
        within `timeout`, by default its start deadline)."""
        if self.config.engine == "embedded":
            return self.backbone.decode_batch()
        batch = VllmBatch(self._worker.target if self._worker else self.config.vllm_worker, self.backbone.lm,
                          self.adapters.lora_dir)
        try:
            info = batch.info(timeout=timeout or WORKER_START_TIMEOUT_S)
        except Exception:
            batch.close()
            raise
        if info.hidden_size != self.backbone.lm.hidden_size:
            batch.close()
            raise ValueError(f"the vLLM worker serves {info.model} (hidden size {info.hidden_size}); this "
                             f"backbone's LM has hidden size {self.backbone.lm.hidden_size}")
        return batch

    def close(self) -> None:
        self._closing.set()
        self.scheduler.close()
        if self._batch is not None:
            self._batch.close()
        self.adapters.close()
        self._front.shutdown(wait=False, cancel_futures=True)
        if self._worker is not None:
            self._supervisor.join(timeout=WORKER_START_TIMEOUT_S)  # it may be starting a worker: that one too
            self._worker.stop()

    # -- request -> embed
    def decode(self, image: bytes, instruction: str) -> Image.Image:
        """Check a request's input in the caller's thread: bad input never reaches the model."""
        self.limits.instruction(instruction)
        return self.limits.image(image)

    def embed(self, image: bytes, instruction: str) -> Embedded:
        img = self.decode(image, instruction)
        with self._model_lock:
            return self._embed([img], [instruction])[0]

    def _embed(self, images: list[Image.Image], instructions: list[str]) -> list[Embedded]:
        features = self.backbone.encode_images(images)
        queries = self.backbone.routing_query(features, self._instruction_embeddings(instructions))
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
        """The routing index: no I/O on the request path (the registry watcher replaces it)."""
        with self._router_lock:
            return self._router

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
            except Exception:  # noqa: BLE001 - keep routing with the old index; the next check tries again
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

    def route(self, embedded: Embedded, task_id: str | None = None, k: int = 5) -> RouteDecision:
        margin = self.config.routing_margin
        routing = self.router().route(embedded.query, self._background, margin, k)[0]
        candidates = routing.candidates
        if task_id is not None:
            task = self.registry.get(task_id)  # TaskNotFound -> NOT_FOUND
            score = next((c.score for c in candidates if c.task_id == task_id), float("nan"))
            return RouteDecision(AdapterId(task.task_id, task.version), score, None, True, margin, candidates)
        chosen = routing.chosen
        if chosen is None:
            best = candidates[0].score if candidates else float("nan")
            return RouteDecision(BASE, best, routing.fell_back, False, margin, candidates, routing.nearer)
        return RouteDecision(AdapterId(chosen.task_id, chosen.version), chosen.score, None, False, margin, candidates)

    # -- route -> adapter -> backbone -> tokens
    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run blocking front work (image decoding, registry reads) on the engine's front threads, so that an
        asyncio front's loop (and health checks on it) never waits for it."""
        return await asyncio.get_running_loop().run_in_executor(self._front, fn, *args)

    def submit(self, request: Request, out: EventSink, cancelled: Callable[[], bool] = _never) -> Job:
        """Decode and check a request (ValueError: INVALID_ARGUMENT), then queue it for the scheduler; its events
        go to `out`. The caller holds an admission slot until the request ends."""
        job = Job(self.decode(request.image, request.instruction), request.instruction, request.sampling,
                  request.task_id, cancelled, out)
        self.scheduler.submit(job)
        return job

    def stream(self, request: Request, cancelled: Callable[[], bool] = _never) -> Iterator[Output]:
        """The route, then text deltas, then the Completion. When `cancelled()` turns true the generation stops at
        the next step (Cancelled is raised). Overloaded when the server holds --max-requests requests already."""
        with self.admission.slot():
            events: queue.SimpleQueue[Event] = queue.SimpleQueue()
            reader = _Reader(self, self.submit(request, events, cancelled))
            while not reader.done:
                try:
                    event = events.get(timeout=1.0)
                except queue.Empty:
                    if cancelled():  # gone while queued or running: the scheduler drops the job at its next look
                        raise Cancelled("the client cancelled the request or its deadline passed") from None
                    continue
                yield from reader.read(event)

    async def astream(self, request: Request) -> AsyncIterator[Output]:
        """`stream` for asyncio fronts: the same outputs, admission and limits; decoding runs on a front thread.
        A caller that stops iterating (its client went away) stops the generation at the next step."""
        with self.admission.slot():
            sink, gone = _LoopSink(asyncio.get_running_loop()), threading.Event()
            try:
                reader = _Reader(self, await self.call(self.submit, request, sink, gone.is_set))
                while not reader.done:
                    for output in reader.read(await sink.queue.get()):
                        yield output
            finally:
                gone.set()

    def generate(self, request: Request, cancelled: Callable[[], bool] = _never) -> tuple[RouteDecision, Completion]:
        outputs = list(self.stream(request, cancelled))
        return outputs[0], outputs[-1]

    async def agenerate(self, request: Request) -> tuple[RouteDecision, Completion]:
        outputs = [output async for output in self.astream(request)]
        return outputs[0], outputs[-1]

    def admit(self, jobs: list[Job]) -> None:
        """embed -> route -> adapters -> prefill: new jobs join the running batch (scheduler thread). A job whose
        adapter is cold waits in `_loading` while the loader thread reads it; it joins at a later step."""
        start = time.monotonic()
        for job in jobs:
            self.metrics.latency.labels("queue").observe(start - job.submitted)
        self._follow_worker()
        if self._batch is None:
            for job in jobs:
                job.out.put(Failed(WorkerError("the vLLM worker is restarting; retry shortly")))
            return
        ready: list[tuple[Job, Embedded, AdapterId, AdapterFiles | None]] = []
        with self._model_lock:
            embedded = self._embed([j.image for j in jobs], [j.instruction for j in jobs])
            for job, emb in zip(jobs, embedded):
                try:
                    decision = self.route(emb, job.task_id)
                    reading = self.adapters.prefetch(decision.adapter)  # None: resident
                except Exception as exc:  # noqa: BLE001 - this row's error (e.g. NOT_FOUND) goes to its request
                    job.out.put(Failed(exc))
                    continue
                job.out.put(Routed(decision))
                self.metrics.latency.labels("route").observe(time.monotonic() - start)
                self.metrics.routed.labels(decision.adapter.task_id).inc()
                if decision.fell_back is not None:
                    self.metrics.fell_back.labels(decision.fell_back.name.lower()).inc()
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
                waiting.job.out.put(Stopped())
            elif waiting.files.exception() is not None:
                waiting.job.out.put(Failed(waiting.files.exception()))
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
                    job.out.put(Failed(exc))
                    continue
                joining.append((job, served, loaded, emb.features))
            self._prefill(joining)
        self._emit()

    def _prefill(self, joining: list[tuple[Job, AdapterId, TaskAdapter, torch.Tensor]]) -> None:
        """Rows join the batch in one prefill. A failed prefill fails the joining requests and leaves the running
        batch as it was; a row whose first token fails to sample fails alone (DecodeBatch.join)."""
        if not joining:
            return
        if self._batch is None:  # the vLLM worker went away while these adapters were read
            for job, served, _, _ in joining:
                self.adapters.release(served)
                job.out.put(Failed(WorkerError("the vLLM worker is restarting; retry shortly")))
            return
        try:
            states = self.backbone.join(self._batch, torch.cat([j[3] for j in joining]), [j[2] for j in joining],
                                        [j[0].instruction for j in joining], [j[0].sampling for j in joining])
        except Exception as exc:  # noqa: BLE001 - the joining requests get the error; the batch goes on
            log.exception("prefilling %d requests failed", len(joining))
            for job, served, _, _ in joining:
                self.adapters.release(served)
                job.out.put(Failed(exc))
            return
        for (job, served, _, _), state in zip(joining, states):
            self._running.append(_Running(job, state, served))

    def step(self) -> int:
        """Drop rows whose client went away, let in jobs whose adapter is read, decode one token for every running
        row; returns the rows running or waiting for their adapter."""
        self._follow_worker()
        if self._loading:
            self._join_loaded()
        for row in [r for r in self._running if r.job.cancelled()]:
            log.info("generation stopped after %d of at most %d tokens: the client went away",
                     len(row.state.token_ids), row.job.sampling.max_new_tokens)
            self._batch.remove(row.state)
            self._finish(row, Stopped())
        if self._running:
            self.metrics.batch_size.observe(len(self._running))
            try:
                with self._model_lock:
                    self._batch.step()  # a row that fails alone ends alone (RowState.error)
            except Exception as exc:  # noqa: BLE001 - the whole step failed: every running request gets the error
                log.exception("decode step of %d rows failed", len(self._running))
                self._reset_batch(exc)
                # embedded: a fresh batch at once; vLLM: _follow_worker connects a new one before the next rows
                self._batch = self._new_batch() if self.config.engine == "embedded" else None
            self._emit()
        self.metrics.running.set(len(self._running))
        return len(self._running) + len(self._loading)

    def _emit(self) -> None:
        for row in list(self._running):
            state, job = row.state, row.job
            step = Step(state.stable_text(job.sampling.stop), state.text, state.finish_reason, state.prompt_tokens,
                        len(state.token_ids))
            if state.error is not None:
                log.warning("a request failed alone after %d tokens: %r", len(state.token_ids), state.error)
                self._finish(row, Failed(state.error))
            elif state.finish_reason:
                self._finish(row, step)
            elif state.token_ids:  # a vLLM row has none until the worker's first tokens arrive
                job.out.put(step)

    def _finish(self, row: _Running, event: Event) -> None:
        self._running.remove(row)
        self.adapters.release(row.served)
        row.job.out.put(event)

    # -- registry views
    def tasks(self) -> list[TaskVersion]:
        return self.registry.latest()

    def task(self, task_id: str) -> TaskVersion:
        return self.registry.get(task_id)
