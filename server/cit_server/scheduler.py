"""Continuous batching: one running batch of rows, whatever task each routes to (per-row projections and LoRAs in
one forward pass). Between two decode steps waiting requests join it (embedded, routed and prefilled together),
and rows that finished or whose client went away leave it, so a free slot is taken at the next step.

One scheduler thread owns the model. Fronts decode and check a request's input on their own threads, queue a Job,
and read the typed events the scheduler puts into the job's sink: Routed, one Step per decoded token, then Failed
or Stopped if it did not finish. Admission bounds how many jobs the server holds at all.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union

from PIL import Image

from cit_backbone.sampling import Sampling

if TYPE_CHECKING:
    from .front import RouteDecision

log = logging.getLogger("cit.server")


class Overloaded(Exception):
    """The server holds as many requests as it admits (RESOURCE_EXHAUSTED)."""


class Admission:
    """At most `limit` requests inside the server at once: decoding, waiting, prefilling or decoding tokens.
    Every front door (the gRPC servicer, the in-process stream) takes a slot before any work and gives it back
    when the request ends; beyond the limit a request is refused at once, so a burst costs the refused nothing
    and the admitted a bounded wait (gRPC's advice on admission control)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise Overloaded(f"the server holds {self.limit} requests already (--max-requests); retry shortly")
        try:
            yield
        finally:
            self._free.release()


@dataclass(frozen=True)
class Step:
    """A job's state after one decode step, copied out of the decode loop."""

    stable_text: str          # text that can no longer change (see RowState.stable_text)
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Routed:
    """Where the job goes: sent once, before its first Step."""

    decision: RouteDecision


@dataclass(frozen=True)
class Failed:
    """The job ended with an error of its own (bad task, cache full, a row that failed); other jobs go on."""

    error: BaseException


@dataclass(frozen=True)
class Stopped:
    """The job's client went away; its generation stopped."""


Event = Union[Routed, Step, Failed, Stopped]


class EventSink(Protocol):
    """Where the scheduler thread puts a job's events: a queue.SimpleQueue, or a front's own (an asyncio loop's)."""

    def put(self, event: Event) -> None: ...


@dataclass
class Job:
    image: Image.Image
    instruction: str
    sampling: Sampling
    task_id: str | None
    cancelled: Callable[[], bool]
    out: EventSink
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    """Runs `admit(jobs)` for newly arrived jobs and `step() -> rows still running` in turn, on its own thread.
    When idle it blocks for the next job and waits `window_s` for others to prefill with it; while rows run it
    never waits: whatever is queued joins at once, up to `max_batch` rows in all."""

    def __init__(self, admit: Callable[[list[Job]], None], step: Callable[[], int], max_batch: int,
                 window_s: float):
        self._admit, self._step = admit, step
        self.max_batch, self.window_s = max_batch, window_s
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by Admission, not here
        self._thread = threading.Thread(target=self._run, name="cit-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Running rows finish first; jobs still queued behind the close are not started."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _collect(self, room: int, idle: bool) -> list[Job] | None:
        """Up to `room` waiting jobs; None once closed. Idle: block for the first, then wait out the window."""
        batch: list[Job] = []
        deadline = 0.0
        while len(batch) < room:
            try:
                if idle and not batch:
                    job = self._queue.get()
                    deadline = time.monotonic() + self.window_s  # the window opens when the first job arrives
                elif idle:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return None if not batch and idle else self._put_back_close(batch)
            batch.append(job)
        return batch

    def _put_back_close(self, batch: list[Job]) -> list[Job]:
        self._queue.put(None)  # seen again once the running rows are done
        return batch

    def _run(self) -> None:
        running = 0
        while (jobs := self._collect(self.max_batch - running, idle=running == 0)) is not None:
            live = []
            for job in jobs:
                if job.cancelled():
                    job.out.put(Stopped())
                else:
                    live.append(job)
            if live:
                try:
                    self._admit(live)
                except Exception as exc:
                    log.exception("admitting %d requests failed", len(live))
                    for job in live:
                        job.out.put(Failed(exc))
            try:
                running = self._step()
            except Exception:
                log.exception("a scheduler step failed")
                running = 0
