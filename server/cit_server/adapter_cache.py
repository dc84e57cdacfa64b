"""Resident adapters: an LRU of task adapters keyed by (task id, version), the registry as the cold tier.

A LoRA task's LoRA lives inside the shared LM while resident (named "<task>@v<version>") and is unloaded from it on
eviction; the backbone itself knows nothing of this cache. Tasks trained with a shared-connector method (seqft,
ewc, ...) are all served by that method's newest connector (Registry.shared_head), resident once for all of them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from cit_backbone.adapters import TaskAdapter
from cit_backbone.backbone import Backbone
from cit_registry.store import Registry


@dataclass(frozen=True)
class AdapterId:
    """One adapter: a task at one version. The base connector is BASE, not None."""

    task_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.task_id}@v{self.version}"


BASE = AdapterId("", 0)


class AdapterStore:
    """Callers hold the backbone's model lock: loading or unloading a LoRA changes the LM's modules."""

    def __init__(self, registry: Registry, backbone: Backbone, capacity: int) -> None:
        self.registry, self.backbone, self.capacity = registry, backbone, capacity
        self.base = TaskAdapter(backbone.base_connector())
        self._resident: OrderedDict[AdapterId, TaskAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, adapter: AdapterId) -> TaskAdapter:
        if adapter == BASE:
            return self.base
        adapter = self.serving(adapter)
        with self._lock:
            if adapter in self._resident:
                self.hits += 1
                self._resident.move_to_end(adapter)
                return self._resident[adapter]
            version = self.registry.get(adapter.task_id, adapter.version)
            loaded = self.backbone.load_adapter(str(adapter), version.adapter_dir, version.lora_dir)
            self.misses += 1
            self._resident[adapter] = loaded
            while len(self._resident) > self.capacity:
                self._drop(next(iter(self._resident)))  # the least recently used
            return loaded

    def serving(self, adapter: AdapterId) -> AdapterId:
        """The adapter that serves a task version: itself, or for a shared-connector task its method's newest."""
        method = self.registry.get(adapter.task_id, adapter.version).shared_method
        if method is None:
            return adapter
        head = self.registry.shared_head(method)
        return AdapterId(head.task_id, head.version)

    def evict(self, adapter: AdapterId) -> bool:
        """Drop one resident adapter (its LoRA leaves the LM); False when it was not resident."""
        with self._lock:
            if adapter not in self._resident:
                return False
            self._drop(adapter)
            return True

    def _drop(self, adapter: AdapterId) -> None:
        self.backbone.unload_adapter(self._resident.pop(adapter))
        self.evictions += 1

    def resident(self) -> list[AdapterId]:
        with self._lock:
            return list(self._resident)
