"""The server's engine in-process, on the real backbone: the routing index follows the registry while serving."""
import time

import numpy as np

from cit_backbone.embedder import TEXT_DIM
from cit_backbone.vision import FEATURE_DIM
from cit_registry.store import Registry, TaskCard, TaskKey
from cit_server.config import ServerConfig
from cit_server.engine import Engine


def synthetic_key(seed: int) -> TaskKey:
    rng = np.random.default_rng(seed)
    return TaskKey.from_embeddings(
        rng.random((4, FEATURE_DIM)), rng.normal(size=(4, TEXT_DIM)), rng.normal(size=(4, TEXT_DIM))
    )


def test_a_task_committed_while_serving_becomes_routable_without_restart(tmp_path, backbone):
    reg = Registry.open(tmp_path / "reg", create=True)
    base = backbone.base_connector()
    reg.commit(TaskCard("first", 1, "eproj", {"action": "expanded"}), synthetic_key(0), {"adapter": base.save})
    engine = Engine(ServerConfig(registry=tmp_path / "reg", refresh_seconds=0.0), backbone=backbone)
    assert [r[0] for r in engine.front.router().rows] == ["first"]
    reg.commit(TaskCard("second", 1, "eproj", {"action": "expanded"}), synthetic_key(1), {"adapter": base.save})
    # the new index is built on a thread of its own; routing goes on with the old one meanwhile
    assert [r[0] for r in engine.front.router().rows] == ["first"]
    deadline = time.monotonic() + 30
    while len(engine.front.router()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted({r[0] for r in engine.front.router().rows}) == ["first", "second"]
    assert engine.front.router().search(synthetic_key(1).routing_vectors, k=1)[0][0].task_id == "second"
