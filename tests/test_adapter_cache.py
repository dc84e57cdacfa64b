"""The server's adapter store: an LRU of task adapters with the registry on disk as the cold tier."""
import pytest
import torch

from cit_backbone.adapters import Connector, ConnectorConfig
from cit_registry.store import Registry, TaskCard
from cit_server.adapter_cache import BASE, AdapterId, AdapterStore, CacheFull

from .test_registry import make_key

TINY = ConnectorConfig(feature_dim=4, hidden_size=3)


def registry_with(tmp_path, names, lm=None):
    """Tasks with constant connectors (weight = their index); names starting with "l" are LoRA tasks."""
    reg = Registry.open(tmp_path / "reg", create=True)
    for i, name in enumerate(names):
        connector = Connector(TINY)
        torch.nn.init.constant_(connector.proj.weight, float(i))
        if name.startswith("l"):
            lm.loras.add("fresh")
            reg.commit(TaskCard(name, 1, "lora", {"action": "expanded"}), make_key(),
                       {"adapter": connector.save, "lora": lambda d: lm.loras.save("fresh", d)})
            lm.loras.unload("fresh")
        else:
            reg.commit(TaskCard(name, 1, "eproj", {"action": "expanded"}), make_key(), {"adapter": connector.save})
    return reg


def test_lru_keeps_capacity_and_evicts_the_least_recent(tmp_path, backbone):
    reg = registry_with(tmp_path, ["a", "b", "c"])
    store = AdapterStore(reg, backbone, capacity=2)
    a, b, c = (AdapterId(n, 1) for n in "abc")
    store.get(a)
    store.get(b)
    assert store.resident() == [a, b]
    store.get(a)  # a is now the most recent
    store.get(c)  # evicts b
    assert store.resident() == [a, c]
    assert (store.hits, store.misses, store.evictions) == (1, 3, 1)
    again = store.get(b).connector  # reloaded from disk, transparently
    assert torch.equal(again.proj.weight, torch.full_like(again.proj.weight, 1.0))
    assert store.resident() == [c, b]


def test_a_lora_lives_in_the_lm_while_resident_and_leaves_it_on_eviction(tmp_path, backbone):
    reg = registry_with(tmp_path, ["la", "lb"], backbone.lm)
    store = AdapterStore(reg, backbone, capacity=1)
    la, lb = AdapterId("la", 1), AdapterId("lb", 1)
    assert store.get(la).lora == "la@v1" and "la@v1" in backbone.lm.loras.names()
    assert store.get(lb).lora == "lb@v1"  # evicts la
    assert backbone.lm.loras.names() == ["lb@v1"]
    assert store.get(la).lora == "la@v1" and backbone.lm.loras.names() == ["la@v1"]
    backbone.unload_adapter(store.get(la))  # leave the session LM as it was


def test_a_cold_adapter_is_read_ahead_on_the_loader_thread_and_only_put_in_place_by_acquire(tmp_path, backbone):
    import shutil

    reg = registry_with(tmp_path, ["a", "lb"], backbone.lm)
    store = AdapterStore(reg, backbone, capacity=2)
    a, lb = AdapterId("a", 1), AdapterId("lb", 1)
    reads = [store.prefetch(a), store.prefetch(lb)]
    assert store.resident() == []  # read, not put in place
    files = [r.result(timeout=30) for r in reads]
    for adapter in (a, lb):  # from here on, the disk is not read again
        version = reg.get(adapter.task_id)
        for directory in (version.adapter_dir, version.lora_dir):
            if directory is not None:
                shutil.rmtree(directory)
    weight = store.acquire(a, files[0])[1].connector.proj.weight
    assert torch.equal(weight, torch.zeros_like(weight))
    served, loaded = store.acquire(lb, files[1])
    assert loaded.lora == "lb@v1" and "lb@v1" in backbone.lm.loras.names()
    assert torch.equal(loaded.connector.proj.weight, torch.ones_like(weight))
    assert store.prefetch(a) is None  # resident now
    for adapter in (a, lb):
        store.release(adapter)
    store.evict(lb)  # leave the session LM as it was
    with pytest.raises(FileNotFoundError):
        AdapterStore(reg, backbone, capacity=1).get(a)  # without the read-ahead files the deleted task is gone
    store.close()


def test_base_is_never_cached_or_evicted(tmp_path, backbone):
    reg = registry_with(tmp_path, ["a"])
    store = AdapterStore(reg, backbone, capacity=1)
    assert store.get(BASE) is store.base and store.base.lora is None and store.resident() == []


def test_adapters_in_use_are_never_evicted_and_a_full_cache_says_so(tmp_path, backbone):
    reg = registry_with(tmp_path, ["a", "b", "c"])
    store = AdapterStore(reg, backbone, capacity=2)
    a, b, c = (AdapterId(n, 1) for n in "abc")
    held_a, _ = store.acquire(a)
    held_b, _ = store.acquire(b)
    with pytest.raises(CacheFull, match="pinned or in use"):
        store.acquire(c)  # both slots serve running requests
    assert store.resident() == [a, b] and not store.evict(a)
    store.release(held_a)
    store.acquire(c)  # a, released, makes room; b still serves its request
    assert store.resident() == [b, c]
    store.release(held_b)


def test_pinned_tasks_load_at_start_and_stay(tmp_path, backbone):
    reg = registry_with(tmp_path, ["a", "b", "c"])
    store = AdapterStore(reg, backbone, capacity=2, pinned=("a",))
    a, b, c = (AdapterId(n, 1) for n in "abc")
    assert store.resident() == [a]
    store.get(b)
    store.get(c)  # evicts b, the least recent unpinned one; a is older but pinned
    assert store.resident() == [a, c] and store.misses == 3
    # what ListTasks and GET /v1/models report for each task
    assert [store.residency(x) for x in (a, b, c)] == ["pinned", "cold", "resident"]


def test_pinning_keeps_only_the_newest_version_so_retrains_while_serving_never_fill_the_cache(tmp_path, backbone):
    reg = registry_with(tmp_path, ["a", "b"])
    store = AdapterStore(reg, backbone, capacity=2, pinned=("a",))
    for version in (2, 3, 4):  # retrained three times while serving; each new version is asked for
        reg.commit(TaskCard("a", version, "eproj", {"action": "reused"}), make_key(),
                   {"adapter": Connector(TINY).save})
        store.get(AdapterId("a", version))
    store.get(AdapterId("b", 1))  # another task still finds room
    assert store.resident() == [AdapterId("a", 4), AdapterId("b", 1)]
    store.get(AdapterId("b", 1))


def test_a_byte_bound_holds_as_well_as_the_count(tmp_path, backbone):
    reg = registry_with(tmp_path, ["a", "b", "c"])
    size = (reg.get("a").adapter_dir / "adapter_model.safetensors").stat().st_size
    store = AdapterStore(reg, backbone, capacity=3, max_bytes=2 * size)
    for name in "abc":
        store.get(AdapterId(name, 1))
    assert store.resident() == [AdapterId("b", 1), AdapterId("c", 1)] and store.resident_bytes() == 2 * size
    with pytest.raises(CacheFull, match="bytes"):
        AdapterStore(reg, backbone, capacity=3, max_bytes=size - 1).get(AdapterId("a", 1))


def test_a_shared_method_task_follows_its_newest_connector_as_versions_arrive(tmp_path, backbone):
    """Tasks of a shared-connector method are served by the method's newest connector; a version committed while
    serving takes over at once (the store caches heads only until the registry changes)."""
    reg = Registry.open(tmp_path / "reg", create=True)

    def commit_shared(name, sequence, weight):
        connector = Connector(TINY)
        torch.nn.init.constant_(connector.proj.weight, weight)
        reg.commit(TaskCard(name, 1, "shared", {"action": "expanded"}, training={"method": "ewc", "sequence": sequence}),
                   make_key(), {"adapter": connector.save, "method": lambda d: d.mkdir(parents=True, exist_ok=True)})

    commit_shared("first", 1, 1.0)
    commit_shared("second", 2, 2.0)
    store = AdapterStore(reg, backbone, capacity=2)
    assert store.serving(AdapterId("first", 1)) == AdapterId("second", 1)
    assert store.get(AdapterId("first", 1)).connector.proj.weight.unique().item() == 2.0
    commit_shared("third", 3, 3.0)
    assert store.serving(AdapterId("first", 1)) == AdapterId("third", 1)
    assert store.get(AdapterId("second", 1)).connector.proj.weight.unique().item() == 3.0
