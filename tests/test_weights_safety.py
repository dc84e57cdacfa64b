"""Loading weights never runs code: a pickled payload in place of any weights file is refused before it can act."""
import os
import pickle

import pytest

from cit_backbone import vision
from cit_backbone.adapters import Connector, ConnectorConfig
from cit_registry.store import TaskKey


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"proj.weight": Payload(marker)}))


def test_a_pickled_connector_is_refused(tmp_path):
    Connector(ConnectorConfig(feature_dim=4, hidden_size=3)).save(tmp_path / "adapter")
    plant(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "ran")
    with pytest.raises(Exception):
        Connector.load(tmp_path / "adapter")
    assert not (tmp_path / "ran").exists()


def test_a_pickled_task_key_is_refused(tmp_path):
    plant(tmp_path / "key.safetensors", tmp_path / "ran")
    with pytest.raises(Exception):
        TaskKey.load(tmp_path / "key.safetensors")
    assert not (tmp_path / "ran").exists()


def test_a_pickled_vision_checkpoint_is_refused(tmp_path, monkeypatch):
    import torch

    torch.save({"weight": Payload(tmp_path / "ran")}, tmp_path / "evil.pth")  # a real torch checkpoint, with code
    monkeypatch.setattr(vision, "vision_weights_path", lambda: tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        vision.VisionTower()
    assert not (tmp_path / "ran").exists()
