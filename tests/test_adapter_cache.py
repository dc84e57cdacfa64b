"""The server's adapter store: an LRU of task connectors with the registry on disk as the cold tier."""
import torch

from cit_backbone.adapters import Connector, ConnectorConfig
from cit_registry.store import Registry, TaskCard
from cit_server.adapter_cache import BASE, AdapterId, AdapterStore

from .test_registry import make_key

TINY = ConnectorConfig(feature_dim=4, hidden_size=3)


def registry_with(tmp_path, names):
    reg = Registry.open(tmp_path / "reg", create=True)
    for i, name in enumerate(names):
        connector = Connector(TINY)
        torch.nn.init.constant_(connector.proj.weight, float(i))
        reg.commit(TaskCard(name, 1, "eproj", {"action": "expanded"}), make_key(), connector.save)
    return reg


def test_lru_keeps_capacity_and_evicts_the_least_recent(tmp_path):
    reg = registry_with(tmp_path, ["a", "b", "c"])
    store = AdapterStore(reg, Connector(TINY), capacity=2)
    a, b, c = (AdapterId(n, 1) for n in "abc")
    store.get(a)
    store.get(b)
    assert store.resident() == [a, b]
    store.get(a)  # a is now the most recent
    store.get(c)  # evicts b
    assert store.resident() == [a, c]
    assert (store.hits, store.misses, store.evictions) == (1, 3, 1)
    again = store.get(b)  # reloaded from disk, transparently
    assert torch.equal(again.proj.weight, torch.full_like(again.proj.weight, 1.0))
    assert store.resident() == [c, b]


def test_base_is_never_cached_or_evicted(tmp_path):
    reg = registry_with(tmp_path, ["a"])
    base = Connector(TINY)
    store = AdapterStore(reg, base, capacity=1)
    assert store.get(BASE) is base and store.resident() == []
