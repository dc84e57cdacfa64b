"""The engine: a front (front.py: decode, validate, embed, route), the adapter store, and the running batch.

A front door (the gRPC servicer, or `stream` in-process) takes an admission slot, then `submit` decodes and checks
the request on a front thread and queues it. Generation runs on the scheduler's thread (scheduler.py): `admit`
takes new requests along that path into the running batch, `step` decodes one token for every running request.
On the vLLM engine the batch's rows decode in a worker process (vllm_engine.py), which a supervisor restarts."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import TypeVar, Union

import torch

from cit_backbone.adapters import AdapterFiles, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.decode_batch import RunningBatch
from cit_backbone.embedder import TextEmbedder
from cit_backbone.sampling import RowState
from cit_registry.lifecycle import Action, Change
from cit_registry.store import Registry, TaskVersion

from .adapter_cache import AdapterId, AdapterStore
from .config import ServerConfig
from .front import Embedded, Front, Request, RouteDecision
from .metrics import Metrics
from .scheduler import Admission, Event, EventSink, Failed, Job, Routed, Scheduler, Step, Stopped
from .vllm_engine import (
    WORKER_START_TIMEOUT_S,
    VllmBatch,
    WorkerError,
    WorkerProcess,
    WorkerSupervisor,
    default_worker_python,
)

log = logging.getLogger("cit.server")
EXTERNAL_WORKER_RETRY_S = 2.0  # how long the scheduler waits for a --vllm-worker it reconnects to
T = TypeVar("T")
# the in-process API: an Engine takes Requests (front.py owns them) and streams Outputs
__all__ = ["Cancelled", "Completion", "Delta", "Engine", "Output", "Request", "RouteDecision"]


class Cancelled(Exception):
    """The client went away (cancelled, or its deadline passed) before the answer was complete."""


def _never() -> bool:
    return False


def _route_and_completion(outputs: list[Output]) -> tuple[RouteDecision, Completion]:
    """A whole stream's first and last outputs (a stream that ended without a Completion raised instead)."""
    route, done = outputs[0], outputs[-1]
    assert isinstance(route, RouteDecision) and isinstance(done, Completion)
    return route, done


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
        self.loop, self.queue = loop, asyncio.Queue[Event]()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is reading this job any more
            pass


class _Reader:
    """Turns one job's events into what a front sends: the route, text deltas, and the completion; and counts the
    job in the per-task metrics once it ends (ok, error, or cancelled: `abandoned`)."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self.metrics, self.job = engine.metrics, job
        self.sent, self.first, self.done = 0, True, False
        self.served: tuple[str, int] | None = None  # (task id, version) once routed
        self.ended = False

    def read(self, event: Event) -> list[Output]:
        if isinstance(event, Routed):
            decision = event.decision
            self.served = (decision.adapter.task_id, decision.adapter.version)
            self.metrics.count_task(decision.adapter.task_id)
            if decision.fell_back is not None:
                nearest = decision.candidates[0].task_id if decision.candidates else ""
                self.metrics.task_fell_back.labels(self.metrics.top_tasks.peek(nearest),
                                                   decision.fell_back.name.lower()).inc()
            return [decision]
        if isinstance(event, Failed):
            self._end("error")
            raise event.error
        if isinstance(event, Stopped):
            self._end("cancelled")
            raise Cancelled("the client cancelled the request or its deadline passed")
        if self.first:
            self.metrics.latency.labels("first_token").observe(time.monotonic() - self.job.submitted)
            self.first = False
        delta, self.sent = event.stable_text[self.sent:], len(event.stable_text)
        out: list[Output] = [Delta(delta)] if delta else []
        if event.finish_reason:
            total = time.monotonic() - self.job.submitted
            self.metrics.latency.labels("total").observe(total)
            self.metrics.tokens.inc(event.completion_tokens)
            if self.served is not None:
                labels = self.metrics.task_labels(*self.served)
                self.metrics.task_latency.labels(*labels).observe(total)
                self.metrics.task_tokens.labels(*labels).inc(event.completion_tokens)
            self._end("ok")
            out.append(Completion(event.text, event.finish_reason, event.prompt_tokens, event.completion_tokens))
            self.done = True
        return out

    def abandoned(self) -> None:
        """The front stopped reading before the end (its client went away)."""
        self._end("cancelled")

    def _end(self, outcome: str) -> None:
        if self.served is not None and not self.ended:
            self.metrics.task_requests.labels(*self.metrics.task_labels(*self.served), outcome).inc()
        self.ended = True


class Engine:
    def __init__(self, config: ServerConfig, backbone: Backbone | None = None, embedder: TextEmbedder | None = None):
        self.config = config
        self.registry = Registry.open(config.registry)
        self.backbone = backbone or Backbone()
        self.backbone.lm.prefix_cache_bytes = config.prefix_cache_bytes
        self.adapters = AdapterStore(self.registry, self.backbone, config.adapter_cache_size,
                                     config.adapter_cache_bytes, config.pinned_tasks)
        self._check_backbone()
        if config.engine == "vllm" and not self.backbone.lm.layout.plain:
            raise ValueError("--engine vllm takes prompt embeddings with one position per token under causal "
                             f"attention; this backbone's LM does not ({self.backbone.lm.layout}: multimodal RoPE or a "
                             "prompt seen both ways): serve it with --engine embedded")
        self.metrics = Metrics(self.adapters, config.metrics_top_tasks)
        self.admission = Admission(config.max_requests)
        self._model_lock = threading.Lock()  # one forward pass at a time: 2 cores gain nothing from more
        embedder = embedder or TextEmbedder(str(self.backbone.numerics.device))
        self.front = Front(config, self.registry, self.backbone, embedder,
                           self.adapters.base.connector.config.output_tokens, self._model_lock)
        self._front_threads = ThreadPoolExecutor(config.workers, thread_name_prefix="cit-front")  # decoding, reads
        # the vLLM worker this server starts (None: embedded, or a --vllm-worker started by someone else)
        self.supervisor = WorkerSupervisor(self._start_worker) \
            if config.engine == "vllm" and config.vllm_worker is None else None
        self._batch: RunningBatch | None = self._new_batch()  # only the scheduler thread touches it (None: no worker)
        self._batch_worker = self.supervisor.worker if self.supervisor else None  # the worker self._batch talks to
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


    # -- the vLLM worker: the supervisor restarts it; the scheduler follows it
    def _start_worker(self) -> WorkerProcess:
        return WorkerProcess(self.config.vllm_python or default_worker_python(), self.backbone.lm.path,
                             self.config.adapter_cache_size, self.config.vllm_max_model_len,
                             dtype=self.backbone.numerics.dtype_name,
                             tensor_parallel_size=self.config.vllm_tensor_parallel_size,
                             gpu_memory_utilization=self.config.vllm_gpu_memory_utilization,
                             data_parallel_size=self.config.vllm_data_parallel_size)

    def _follow_worker(self) -> None:
        """Scheduler thread, before rows join or step: when the worker has changed or died, the running rows end
        with UNAVAILABLE (retryable) and a batch on the new worker replaces theirs once it is up. A worker this
        server did not start (--vllm-worker) is reconnected to when its batch was lost, with a short deadline."""
        if self.supervisor is None:
            if self._batch is None:
                try:
                    self._batch = self._new_batch(timeout=EXTERNAL_WORKER_RETRY_S)
                except Exception:
                    log.exception("reconnecting to the vLLM worker at %s failed", self.config.vllm_worker)
            return
        current = self.supervisor.up()
        if self._batch is not None and current is not self._batch_worker:
            self._reset_batch(WorkerError("the vLLM worker exited; a new one is starting, retry shortly"))
            self._batch = None
        if self._batch is None and current is not None:
            try:
                self._batch, self._batch_worker = self._new_batch(), current
            except Exception:
                log.exception("connecting to the new vLLM worker failed")

    def ready(self) -> bool:
        """Whether requests can be served now (false while a vLLM worker is being restarted): health follows it."""
        return self.scheduler.alive() and (self.supervisor is None or self.supervisor.up() is not None)

    def _reset_batch(self, error: Exception) -> None:
        """Every running row ends with `error`; the batch is closed."""
        for row in list(self._running):
            self._finish(row, Failed(error))
        if self._batch is not None:
            self._batch.close()

    def _new_batch(self, timeout: float | None = None) -> RunningBatch:
        """An empty running batch on the configured engine: the embedded LM, or a vLLM worker (which answers
        within `timeout`, by default its start deadline)."""
        if self.config.engine == "embedded":
            return self.backbone.decode_batch()
        target = self.supervisor.worker.target if self.supervisor else self.config.vllm_worker
        assert target is not None  # --engine vllm: a worker this server starts, or --vllm-worker names one
        batch = VllmBatch(target, self.backbone.lm, self.adapters.lora_dir)
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
        if self.supervisor is not None:  # a worker dying while the running rows drain is not started again
            self.supervisor.retire()
        self.front.close()
        self.scheduler.close()
        if self._batch is not None:
            self._batch.close()
        self.adapters.close()
        self._front_threads.shutdown(wait=False, cancel_futures=True)
        if self.supervisor is not None:
            self.supervisor.close()

    # -- route -> adapter -> backbone -> tokens
    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run blocking front work (image decoding, registry reads) on the engine's front threads, so that an
        asyncio front's loop (and health checks on it) never waits for it."""
        return await asyncio.get_running_loop().run_in_executor(self._front_threads, fn, *args)

    def submit(self, request: Request, out: EventSink, cancelled: Callable[[], bool] = _never) -> Job:
        """Decode and check a request (ValueError: INVALID_ARGUMENT), then queue it for the scheduler; its events
        go to `out`. The caller holds an admission slot until the request ends."""
        job = Job(self.front.decode(request.image, request.instruction), request.instruction, request.sampling,
                  request.task_id, cancelled, out)
        self.scheduler.submit(job)
        return job

    def stream(self, request: Request, cancelled: Callable[[], bool] = _never) -> Iterator[Output]:
        """The route, then text deltas, then the Completion. When `cancelled()` turns true the generation stops at
        the next step (Cancelled is raised). Overloaded when the server holds --max-requests requests already."""
        with self.admission.slot():
            events: queue.SimpleQueue[Event] = queue.SimpleQueue()
            reader = _Reader(self, self.submit(request, events, cancelled))
            try:
                while not reader.done:
                    try:
                        event = events.get(timeout=1.0)
                    except queue.Empty:
                        if cancelled():  # gone while queued or running: the scheduler drops the job at its next look
                            raise Cancelled("the client cancelled the request or its deadline passed") from None
                        continue
                    yield from reader.read(event)
            finally:
                reader.abandoned()  # counted as cancelled unless it ended otherwise

    async def astream(self, request: Request) -> AsyncGenerator[Output, None]:
        """`stream` for asyncio fronts: the same outputs, admission and limits; decoding runs on a front thread.
        A caller that stops iterating (its client went away) stops the generation at the next step."""
        with self.admission.slot():
            sink, gone = _LoopSink(asyncio.get_running_loop()), threading.Event()
            reader: _Reader | None = None
            try:
                reader = _Reader(self, await self.call(self.submit, request, sink, gone.is_set))
                while not reader.done:
                    for output in reader.read(await sink.queue.get()):
                        yield output
            finally:
                gone.set()
                if reader is not None:
                    reader.abandoned()  # counted as cancelled unless it ended otherwise

    def generate(self, request: Request, cancelled: Callable[[], bool] = _never) -> tuple[RouteDecision, Completion]:
        return _route_and_completion(list(self.stream(request, cancelled)))

    async def agenerate(self, request: Request) -> tuple[RouteDecision, Completion]:
        return _route_and_completion([output async for output in self.astream(request)])

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
            embedded = self.front.embed_batch([j.image for j in jobs], [j.instruction for j in jobs])
            for job, emb in zip(jobs, embedded):
                try:
                    decision = self.front.route(emb, job.task_id)
                    reading = self.adapters.prefetch(decision.adapter)  # None: resident
                except Exception as exc:  # noqa: BLE001 - this row's error (e.g. NOT_FOUND) goes to its request
                    job.out.put(Failed(exc))
                    continue
                job.out.put(Routed(decision))
                self.metrics.latency.labels("route").observe(time.monotonic() - start)
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
            elif (error := waiting.files.exception()) is not None:
                waiting.job.out.put(Failed(error))
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
        except Exception as exc:
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
            assert self._batch is not None  # running rows have a batch: they end with it (_reset_batch)
            self._batch.remove(row.state)
            self._finish(row, Stopped())
        if self._running:
            self.metrics.batch_size.observe(len(self._running))
            try:
                with self._model_lock:
                    self._batch.step()  # type: ignore[union-attr]  # running rows have a batch (see above)  # a row that fails alone ends alone (RowState.error)
            except Exception as exc:
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
        return self.registry.serving()

    def task(self, task_id: str) -> TaskVersion:
        return self.registry.get(task_id)

    def change_task(self, task_id: str, action: Action, version: int | None, who: str) -> tuple[Change | None, int | None]:
        """A lifecycle change (the admin RPC): recorded in the registry's history, then routing follows at once.
        The change and the version that serves now."""
        registry = self.registry
        change = {Action.RETIRE: lambda: registry.retire(task_id, who),
                  Action.RESTORE: lambda: registry.restore(task_id, who),
                  Action.ROLLBACK: lambda: registry.rollback(task_id, version, who),
                  Action.PROMOTE: lambda: registry.promote(task_id, version, who),
                  Action.REJECT: lambda: registry.reject(task_id, _required(version, "reject"), who)}[action]()
        self.front.reload()
        return change, registry.serving_version(task_id)

    def residency(self, task: TaskVersion) -> str:
        """Where the adapter serving `task` is now: "pinned", "resident" or "cold" (reads the registry)."""
        return self.adapters.residency(AdapterId(task.task_id, task.version))


def _required(version: int | None, change: str) -> int:
    if version is None:
        raise ValueError(f"{change} needs a version")
    return version
