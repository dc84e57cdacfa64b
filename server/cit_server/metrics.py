"""Prometheus metrics of one server (prometheus-client, own registry): requests and errors by status, latency by
phase, tokens, routing, batch sizes, and the adapter cache."""
from __future__ import annotations

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


class Metrics:
    def __init__(self, store: AdapterStore) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cit_requests", "RPCs answered, by method and gRPC status", ["method", "status"],
                                registry=r)
        self.latency = Histogram("cit_latency_seconds", "Generation latency by phase: queue (until its batch "
                                 "starts), route (embed + FAISS), first_token, total", ["phase"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("cit_generated_tokens", "tokens generated", registry=r)
        self.routed = Counter("cit_routed", "generations by the task that served them ('' = base connector)",
                              ["task"], registry=r)
        self.fell_back = Counter("cit_fell_back", "generations that named no task and that no task's floors "
                                 "admitted (answered by the base connector), by reason", ["reason"], registry=r)
        self.batch_size = Histogram("cit_batch_size", "requests decoded together, observed at every decode step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.running = Gauge("cit_running_rows", "requests in the running batch (decoded together)", registry=r)
        r.register(_AdapterCacheCollector(store))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return httpd.server_port
