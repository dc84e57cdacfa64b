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
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, as long as nothing unpickles
        Connector.load(tmp_path / "adapter")
    assert not (tmp_path / "ran").exists()


def test_a_pickled_task_key_is_refused(tmp_path):
    plant(tmp_path / "key.safetensors", tmp_path / "ran")
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, as long as nothing unpickles
        TaskKey.load(tmp_path / "key.safetensors")
    assert not (tmp_path / "ran").exists()


def test_a_pickled_vision_checkpoint_is_refused(tmp_path, monkeypatch):
    import torch

    torch.save({"weight": Payload(tmp_path / "ran")}, tmp_path / "evil.pth")  # a real torch checkpoint, with code
    monkeypatch.setattr(vision, "vision_weights_path", lambda: tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        vision.VisionTower()
    assert not (tmp_path / "ran").exists()


def test_a_pickled_peft_lora_is_refused_before_peft_can_fall_back_to_it(tmp_path, backbone):
    """PEFT reads adapter_model.bin (torch.load) when a LoRA directory has no adapter_model.safetensors."""
    import torch

    lm = backbone.lm
    lm.loras.add("safe")
    lm.loras.save("safe", tmp_path / "lora")
    lm.loras.unload("safe")
    (tmp_path / "lora" / "adapter_model.safetensors").unlink()
    torch.save({"weight": Payload(tmp_path / "ran")}, tmp_path / "lora" / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.safetensors only"):
        lm.loras.load("evil", tmp_path / "lora", trainable=True)  # trainable: PEFT's own loader, not the slots
    assert not (tmp_path / "ran").exists() and "evil" not in lm.loras.names()


def test_the_registry_refuses_pickled_files_in_a_version(tmp_path):
    from cit_registry.store import Registry, TaskCard

    from .test_registry import make_key, write_adapter, write_lora

    reg = Registry.open(tmp_path / "reg", create=True)

    def lora_with_a_pickle(path):
        write_lora(path)
        plant(path / "adapter_model.bin", tmp_path / "ran")
    with pytest.raises(ValueError, match="lora/adapter_model.bin is not one of the part's files"):
        reg.commit(TaskCard("evil", 1, "lora", {}), make_key(), {"adapter": write_adapter, "lora": lora_with_a_pickle})
    assert reg.task_ids() == [] and not (tmp_path / "ran").exists()
