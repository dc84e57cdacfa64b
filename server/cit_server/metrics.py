"""Prometheus metrics of one server (prometheus-client, own registry): requests and errors by status, latency by
phase, tokens, routing, batch sizes, the adapter cache, and the same per task for the busiest tasks."""
from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .adapter_cache import AdapterStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _AdapterCacheCollector(Collector):
    """Reads the adapter store's own counters at scrape time: the store stays free of Prometheus."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def collect(self):
        for name, value, doc in (("hits", self.store.hits, "requests whose adapter was resident"),
                                 ("misses", self.store.misses, "adapters loaded from the registry"),
                                 ("evictions", self.store.evictions, "adapters evicted (LRU)")):
            family = CounterMetricFamily(f"cit_adapter_cache_{name}", doc)
            family.add_metric([], value)
            yield family
        resident = GaugeMetricFamily("cit_adapter_cache_resident", "adapters resident now")
        resident.add_metric([], len(self.store.resident()))
        yield resident
        size = GaugeMetricFamily("cit_adapter_cache_bytes", "bytes of adapter weights resident now")
        size.add_metric([], self.store.resident_bytes())
        yield size


OTHER = "other"  # the task label of every task outside the top N by traffic
BASE = "base"    # the task label of requests the base connector answered


class TopTasks:
    """Which tasks get a label of their own: the `top_n` busiest by requests, in bounded memory and series.

    Request counts are kept by Space-Saving (Metwally et al., 2005) in 4 x top_n counters, whatever the number of
    tasks. A task takes a label when the label set has room or when its guaranteed count (less what its counter
    may have inherited) passes 1.5 x that of the least busy labelled task, which then gives its label up
    (`on_drop`: its series are removed; its traffic counts under OTHER from then on, as a new task's does until it
    gets a label). Labelled tasks keep their counters. So at most top_n tasks have series at a time.
    """

    def __init__(self, top_n: int, on_drop: Callable[[str], None]) -> None:
        self.top_n, self.capacity, self.on_drop = top_n, max(4 * top_n, 16), on_drop
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}  # per counted task: how much of its count it may have inherited
        self.labelled: set[str] = set()
        self._lock = threading.Lock()

    def peek(self, task: str) -> str:
        """The label `task` has now, without counting a request."""
        return task if task in self.labelled else OTHER if task else "none"

    def label(self, task: str) -> str:
        """Count one request of `task` and return the label it is counted under."""
        if self.top_n == 0:
            return OTHER
        with self._lock:
            if task in self.counts:
                self.counts[task] += 1
            elif len(self.counts) < self.capacity:
                self.counts[task], self.errors[task] = 1, 0
            else:  # Space-Saving: the new task takes over the smallest counter, never a labelled task's; what it
                # inherits is its possible overcount (its count is an upper bound, count - error a lower one)
                smallest = min((t for t in self.counts if t not in self.labelled), key=self.counts.__getitem__)
                inherited = self.counts.pop(smallest)
                del self.errors[smallest]
                self.counts[task], self.errors[task] = inherited + 1, inherited
            if task in self.labelled:
                return task
            if len(self.labelled) < self.top_n:
                self.labelled.add(task)
                return task
            weakest = min(self.labelled, key=lambda t: self.counts.get(t, 0))
            if self.counts[task] - self.errors[task] <= 1.5 * self.counts.get(weakest, 0):
                return OTHER  # a label changes hands only on traffic the newcomer surely had
            self.labelled.discard(weakest)
            self.labelled.add(task)
            self.on_drop(weakest)  # under the lock: no other thread labels `weakest` again before its series go
            return task


class Metrics:
    def __init__(self, store: AdapterStore, top_tasks: int = 20) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cit_requests", "RPCs answered, by method and gRPC status", ["method", "status"],
                                registry=r)
        self.latency = Histogram("cit_latency_seconds", "Generation latency by phase: queue (until its batch "
                                 "starts), route (embed + FAISS), first_token, total", ["phase"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("cit_generated_tokens", "tokens generated", registry=r)
        self.fell_back = Counter("cit_fell_back", "generations that named no task and that no task's floors "
                                 "admitted (answered by the base connector), by reason", ["reason"], registry=r)
        # Per task, for the busiest --metrics-top-tasks tasks ("other" for the rest, "base" for the base connector)
        labels = ["task", "version"]
        self.task_requests = Counter("cit_task_requests", "generations by the task (and version) that served them "
                                     "and how they ended (ok, error, cancelled)", [*labels, "outcome"], registry=r)
        self.task_latency = Histogram("cit_task_latency_seconds", "time to the whole answer, by serving task",
                                      labels, buckets=LATENCY_BUCKETS, registry=r)
        self.task_tokens = Counter("cit_task_generated_tokens", "tokens generated, by serving task", labels,
                                   registry=r)
        self.task_fell_back = Counter("cit_task_fell_back", "generations answered by the base connector, by the "
                                      "nearest task they fell back from and the reason", ["task", "reason"], registry=r)
        self.top_tasks = TopTasks(top_tasks, self._drop_task)
        self.batch_size = Histogram("cit_batch_size", "requests decoded together, observed at every decode step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.running = Gauge("cit_running_rows", "requests in the running batch (decoded together)", registry=r)
        r.register(_AdapterCacheCollector(store))

    def count_task(self, task_id: str) -> None:
        """One request routed to (or forced onto) `task_id` ("": the base connector), for the busiest-task ranking."""
        if task_id:
            self.top_tasks.label(task_id)

    def task_labels(self, task_id: str, version: int) -> tuple[str, str]:
        """The (task, version) labels a request of that task version counts under now: asked when it is counted,
        not when it was routed, so a task that lost its label meanwhile adds to OTHER, not to removed series."""
        if not task_id:
            return BASE, ""
        task = self.top_tasks.peek(task_id)
        return (task, str(version)) if task != OTHER else (OTHER, "")

    def _drop_task(self, task: str) -> None:
        """A task left the top N: its series go (Prometheus keeps what it scraped)."""
        for metric in (self.task_requests, self.task_latency, self.task_tokens, self.task_fell_back):
            metric.remove_by_labels({"task": task})

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return httpd.server_port
