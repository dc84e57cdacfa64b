"""Resident adapters: an LRU of task connectors keyed by (task id, version), the registry as the cold tier."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from cit_backbone.adapters import Connector
from cit_registry.store import Registry


@dataclass(frozen=True)
class AdapterId:
    """One adapter: a task at one version. The base connector is BASE, not None."""

    task_id: str
    version: int


BASE = AdapterId("", 0)


class AdapterStore:
    def __init__(self, registry: Registry, base: Connector, capacity: int) -> None:
        self.registry, self.base, self.capacity = registry, base, capacity
        self._resident: OrderedDict[AdapterId, Connector] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, adapter: AdapterId) -> Connector:
        if adapter == BASE:
            return self.base
        with self._lock:
            if adapter in self._resident:
                self.hits += 1
                self._resident.move_to_end(adapter)
                return self._resident[adapter]
        connector = Connector.load(self.registry.get(adapter.task_id, adapter.version).adapter_dir)
        with self._lock:
            self.misses += 1
            self._resident[adapter] = connector
            while len(self._resident) > self.capacity:
                self._resident.popitem(last=False)
                self.evictions += 1
        return connector

    def resident(self) -> list[AdapterId]:
        with self._lock:
            return list(self._resident)
