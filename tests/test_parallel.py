"""Data-parallel add-task (issue 18): two CPU processes under `accelerate launch` (gloo) train the adapter one
process trains, on the real backbone.

Tolerance: each saved part (the projection, the LoRA, the method's state) differs from one process's by at most 1e-3
of its norm. Exact equality is not to be had: the processes add a step's gradient up in another order, and AdamW's
first steps move every weight by about the learning rate whatever its gradient's size, so a weight whose gradient is
near zero can step either way on that rounding (a few weights in 10,000; 1e-4 of the norm here). Summing nothing
(each process stepping on its half of the batch) differs by 3e-2 to 6e-2 of the norm.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import run_cli

TRAIN = ["--max-train", "49", "--max-eval", "8", "--epochs", "1"]  # 4 steps: 16, 16, 16 rows and 1 (one process has none)
LAUNCH = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "-m", "cit_trainer.cli"]


def add_task(registry: Path, data: Path, *options: str, processes: int = 1) -> str:
    command = LAUNCH if processes == 2 else ["cit-trainer"]
    return run_cli(*command, "add-task", str(data), "--registry", str(registry), "--device", "cpu", *TRAIN,
                   *options).stdout


def parts(version: Path) -> dict:
    """Each saved part of a task version (adapter, lora, method) as one float64 vector."""
    import torch
    from safetensors.torch import load_file

    found = {f.parent.name: torch.cat([t.flatten().double() for _, t in sorted(load_file(f).items())])
             for f in sorted(version.glob("*/*.safetensors"))}
    assert found, f"no weights under {version}"
    return found


def assert_same_adapter(one: Path, two: Path) -> None:
    parts_one, parts_two = parts(one), parts(two)
    assert sorted(parts_one) == sorted(parts_two)
    for name, a in parts_one.items():
        gap = (a - parts_two[name]).norm() / a.norm()
        assert gap <= 1e-3, f"{name} differs by {gap.item():.2e} of its norm"
    training_one, training_two = (json.loads((v / "task.json").read_text())["training"] for v in (one, two))
    assert training_one["steps"] == training_two["steps"] == 4
    assert training_two["final_loss"] == pytest.approx(training_one["final_loss"], rel=1e-4)


def test_two_processes_train_the_lora_adapter_one_process_trains(task_dirs, tmp_path):
    add_task(tmp_path / "one", task_dirs["digits"], "--method", "lora")
    out = add_task(tmp_path / "two", task_dirs["digits"], "--method", "lora", processes=2)
    assert out.count("digits v1 (expanded)") == 1, out  # one report: the main process's
    assert_same_adapter(tmp_path / "one/tasks/digits/v0001", tmp_path / "two/tasks/digits/v0001")


def test_two_processes_train_a_regularised_shared_connector_as_one_process_does(task_dirs, tmp_path):
    """EWC's second task: the penalty of the first task's importance counts once in the summed gradient."""
    first = tmp_path / "first"
    add_task(first, task_dirs["digits"], "--method", "ewc")
    for copy in ("one", "two"):
        shutil.copytree(first, tmp_path / copy)
    for registry, processes in (("one", 1), ("two", 2)):
        add_task(tmp_path / registry, task_dirs["fashion-mnist"], "--method", "ewc", "--threshold", "1",
                 processes=processes)
    assert_same_adapter(tmp_path / "one/tasks/fashion-mnist/v0001", tmp_path / "two/tasks/fashion-mnist/v0001")


def test_a_launcher_needs_each_process_on_its_own_gpu(monkeypatch):
    import torch

    from cit_backbone.numerics import Numerics
    from cit_trainer.parallel import ALONE, launched

    assert launched(Numerics()) == (ALONE, Numerics())  # not launched: alone, as asked
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="each process takes the GPU of its local rank"):
        launched(Numerics(torch.device("cuda:1")))


def test_each_process_encodes_only_its_share_of_the_images(tmp_path):
    """Under a launcher each process runs the vision tower on its rows alone (i mod N) and gathers the rest; a
    stand-in backbone counts what it encoded and a stand-in gather returns what one process encodes."""
    import numpy as np
    import torch

    from cit_registry.taskdata import read_jsonl
    from cit_trainer.data import export_task
    from cit_trainer.parallel import Ranks
    from cit_trainer.training import embed_task

    task_dir, _ = export_task("digits", tmp_path, 5, 1)
    samples = read_jsonl(task_dir / "train.jsonl")
    encoded: list[bytes] = []

    class Backbone:
        def encode_images(self, images):
            encoded.extend(img.tobytes() for img in images)
            return torch.tensor([[float(np.asarray(img).sum())] for img in images]).reshape(len(images), 1)

        def routing_features(self, features):
            return features

    class Embedder:
        def embed(self, texts):
            return np.zeros((len(texts), 4), np.float32)

    class SecondOfTwo(Ranks):
        def gather_rows(self, mine, n):
            assert mine.shape == (len(self.rows(n)), 1)
            return whole.features

    whole = embed_task(Backbone(), Embedder(), samples, "all")
    assert len(encoded) == 5
    encoded.clear()
    share = embed_task(Backbone(), Embedder(), samples, "share", ranks=SecondOfTwo(1, 2))
    assert len(encoded) == 2 and torch.equal(share.features, whole.features)
