"""Batching: requests that arrive together are embedded, routed and decoded as one batch, whatever task each one
routes to (per-row projections and LoRAs in one forward pass).

One scheduler thread owns the model. Request threads decode and check their input, queue a Job, and read what the
scheduler sends back on the job's own queue: the route decision, one Step per decoded token, or an error. A job
whose client went away gets no more work from the next step on; a batch whose rows have all gone stops.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from cit_backbone.language_model import Sampling

log = logging.getLogger("cit.server")


class Overloaded(Exception):
    """The queue of waiting requests is full (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Step:
    """A job's state after one decode step, copied out of the decode loop."""

    stable_text: str          # text that can no longer change (see RowState.stable_text)
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    image: Image.Image
    instruction: str
    sampling: Sampling
    task_id: str | None
    cancelled: Callable[[], bool]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ("route"|"step"|"cancelled"|"error", x)
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, serve_batch: Callable[[list[Job]], None], max_batch: int, window_s: float, max_queue: int):
        self._serve_batch, self.max_batch, self.window_s, self.max_queue = serve_batch, max_batch, window_s, max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cit-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self.max_queue} requests are waiting already; try again shortly")
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _collect(self) -> list[Job] | None:
        """The first waiting job, and every job arriving within the window after it (up to max_batch)."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:  # jobs already waiting join at once; then wait out the window for more
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while (batch := self._collect()) is not None:
            live = []
            for job in batch:
                if job.cancelled():
                    job.out.put(("cancelled", 0))
                else:
                    live.append(job)
            if not live:
                continue
            try:
                self._serve_batch(live)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                log.exception("batch of %d failed", len(live))
                for job in live:
                    job.out.put(("error", exc))
