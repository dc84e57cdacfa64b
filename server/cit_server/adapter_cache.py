"""Resident adapters: an LRU of task adapters keyed by (task id, version), the registry as the cold tier.

A LoRA task's LoRA lives inside the shared LM while resident (named "<task>@v<version>") and is unloaded from it on
eviction; the backbone itself knows nothing of this cache. Tasks trained with a shared-connector method (seqft,
ewc, ...) are all served by that method's newest serving connector (Registry.shared_head), resident once for all of them.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cit_backbone.adapters import AdapterFiles, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.numerics import trained_dtype
from cit_registry.store import Registry

log = logging.getLogger("cit.server")


@dataclass(frozen=True)
class AdapterId:
    """One adapter: a task at one version. The base connector is BASE, not None."""

    task_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.task_id}@v{self.version}"


BASE = AdapterId("", 0)


class CacheFull(Exception):
    """No adapter can be evicted to make room: every resident one is pinned or serves a running request
    (RESOURCE_EXHAUSTED)."""


class AdapterStore:
    """Bounds: `capacity` adapters and, optionally, `max_bytes` of adapter weights. Adapters that running requests
    use (acquired, not yet released) and pinned tasks are never evicted.

    Callers hold the backbone's model lock: loading or unloading a LoRA changes the LM's modules."""

    def __init__(self, registry: Registry, backbone: Backbone, capacity: int, max_bytes: int | None = None,
                 pinned: tuple[str, ...] = ()) -> None:
        self.registry, self.backbone, self.capacity, self.max_bytes = registry, backbone, capacity, max_bytes
        self.pinned = frozenset(pinned)
        self.base = TaskAdapter(backbone.base_connector())
        backbone.lm.loras.slots(capacity)  # a resident LoRA task's LoRA is copied into a slot: loads take ms
        self._resident: OrderedDict[AdapterId, TaskAdapter] = OrderedDict()
        self._bytes: dict[AdapterId, int] = {}
        self._lora_dirs: dict[str, Path] = {}  # LoRA name of a resident adapter -> its directory
        self._users: Counter[AdapterId] = Counter()
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="cit-adapter-loader")
        self._reading: dict[AdapterId, Future[AdapterFiles]] = {}  # reads in flight, for requests to share
        self.hits = self.misses = self.evictions = 0
        self._warned: set[AdapterId] = set()  # task versions whose training precision differs (_warn_numerics)
        self._methods: dict[AdapterId, str | None] = {}  # shared-connector method of a version, None if its own
        self._heads: dict[str, AdapterId] = {}             # newest version of each shared method ...
        self._heads_of: int | None = None                   # ... at this registry generation
        for task_id in sorted(self.pinned):  # pinned tasks are loaded up front
            version = registry.serving_version(task_id)
            if version is None:  # retired (or only candidates): pinned again once it serves
                registry.versions(task_id) or registry.get(task_id)  # no such task at all: TaskNotFound, as before
                log.warning("pinned task %s has no serving version now (retired, or only candidates)", task_id)
                continue
            self.get(AdapterId(task_id, version))

    def _warn_numerics(self, adapter: AdapterId, training: dict) -> None:
        """A task served in another precision than it was trained in answers differently (docs: USAGE, "Device and
        precision"): said once per task version, as it becomes resident the first time."""
        trained, serving = trained_dtype(training), self.backbone.numerics.dtype_name
        if trained != serving and adapter not in self._warned:
            self._warned.add(adapter)
            log.warning("task %s was trained in %s and is served in %s: its accuracy may differ from its card's "
                        "(serve with --dtype %s, or re-measure it)", adapter, trained, serving, trained)

    def get(self, adapter: AdapterId) -> TaskAdapter:
        """The adapter serving a task version, made resident; nothing holds it afterwards."""
        served, loaded = self.acquire(adapter)
        self.release(served)
        return loaded

    def prefetch(self, adapter: AdapterId) -> Future[AdapterFiles] | None:
        """Start reading a cold adapter's files on the loader thread; None when it is resident (or the base).
        `acquire(adapter, future.result())` then only puts it in place, so running rows never wait for the disk."""
        if adapter == BASE:
            return None
        adapter = self.serving(adapter)
        with self._lock:
            if adapter in self._resident:
                return None
            self._reading = {a: f for a, f in self._reading.items() if not f.done()}  # the finished are the caller's
            if adapter not in self._reading:
                self._reading[adapter] = self._loader.submit(self._read, adapter)
            return self._reading[adapter]

    def _read(self, adapter: AdapterId) -> AdapterFiles:
        version = self.registry.get(adapter.task_id, adapter.version)
        return self.backbone.read_adapter(version.adapter_dir, version.lora_dir)

    def acquire(self, adapter: AdapterId, files: AdapterFiles | None = None) -> tuple[AdapterId, TaskAdapter]:
        """The adapter serving a task version, held resident until `release(served)`; `files`: what `prefetch`
        read, else a cold adapter is read here. CacheFull when it is cold and nothing can make room for it."""
        if adapter == BASE:
            return BASE, self.base
        adapter = self.serving(adapter)
        with self._lock:
            if adapter in self._resident:
                self.hits += 1
                self._resident.move_to_end(adapter)
            else:
                version = self.registry.get(adapter.task_id, adapter.version)
                size = sum(f.stat().st_size for d in (version.adapter_dir, version.lora_dir) if d is not None
                           for f in d.glob("*.safetensors"))
                self._make_room(size)
                if files is None or files.connector_dir != version.adapter_dir:  # (a newer shared head since)
                    files = self.backbone.read_adapter(version.adapter_dir, version.lora_dir)
                self._warn_numerics(adapter, version.card.training)
                self._resident[adapter] = self.backbone.install_adapter(str(adapter), files)
                self._bytes[adapter] = size
                if version.lora_dir is not None:  # the vLLM engine sends this path with each of its requests
                    self._lora_dirs[str(adapter)] = version.lora_dir
                self.misses += 1
            self._users[adapter] += 1
            return adapter, self._resident[adapter]

    def release(self, served: AdapterId) -> None:
        if served == BASE:
            return
        with self._lock:
            self._users[served] -= 1
            if self._users[served] <= 0:
                del self._users[served]

    def _make_room(self, size: int) -> None:
        """Evict least recently used adapters until one more of `size` bytes fits both bounds."""
        def over() -> bool:
            return len(self._resident) + 1 > self.capacity or (
                self.max_bytes is not None and sum(self._bytes.values()) + size > self.max_bytes)

        if self.max_bytes is not None and size > self.max_bytes:
            raise CacheFull(f"the adapter has {size} bytes; the cache holds at most {self.max_bytes}")
        for candidate in list(self._resident):  # oldest first
            if not over():
                return
            if not self._is_pinned(candidate) and not self._users[candidate]:
                self._drop(candidate)
        if over():
            raise CacheFull(f"all {len(self._resident)} resident adapters are pinned or in use; "
                            "retry shortly or raise --adapter-cache-size / --adapter-cache-bytes")

    def _is_pinned(self, adapter: AdapterId) -> bool:
        """Pinning keeps a task's serving version resident: versions it replaced while serving are evictable."""
        return adapter.task_id in self.pinned and self.registry.serving_version(adapter.task_id) == adapter.version

    def lora_dir(self, name: str) -> Path:
        """The directory (PEFT format) of a resident adapter's LoRA, by the LoRA's name."""
        with self._lock:
            if name not in self._lora_dirs:
                raise KeyError(f"no resident adapter has a LoRA named {name!r}")
            return self._lora_dirs[name]

    def serving(self, adapter: AdapterId) -> AdapterId:
        """The adapter that serves a task version: itself, or for a shared-connector task its method's newest.
        Cached: a committed version never changes, and the heads are re-read when the registry's generation moves."""
        if adapter not in self._methods:
            self._methods[adapter] = self.registry.get(adapter.task_id, adapter.version).shared_method
        method = self._methods[adapter]
        if method is None:
            return adapter
        generation = self.registry.generation()  # one small read, not a walk of the task directories
        if generation != self._heads_of:
            self._heads, self._heads_of = {}, generation
        if method not in self._heads:
            head = self.registry.shared_head(method)
            assert head is not None, f"no version of method {method!r} serves"  # this task's own version does
            self._heads[method] = AdapterId(head.task_id, head.version)
        return self._heads[method]

    def evict(self, adapter: AdapterId) -> bool:
        """Drop one resident adapter (its LoRA leaves the LM); False when it was not resident or is in use."""
        with self._lock:
            if adapter not in self._resident or self._users[adapter]:
                return False
            self._drop(adapter)
            return True

    def _drop(self, adapter: AdapterId) -> None:
        self.backbone.unload_adapter(self._resident.pop(adapter))
        del self._bytes[adapter]
        self._lora_dirs.pop(str(adapter), None)
        self.evictions += 1

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    def residency(self, adapter: AdapterId) -> str:
        """"pinned", "resident" or "cold": where the adapter serving a task version is now (registry reads: call it
        off the event loop)."""
        served = self.serving(adapter)
        if self._is_pinned(served):
            return "pinned"
        with self._lock:
            return "resident" if served in self._resident else "cold"

    def resident(self) -> list[AdapterId]:
        with self._lock:
            return list(self._resident)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())
