"""Training a starting connector: the one-off step that lets the shared backbone see at all."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from cit_backbone.adapters import Connector, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.numerics import CPU_FLOAT32, Numerics
from cit_registry.taskdata import Sample

from .data import base_mixture
from .training import EmbeddedTask, evaluate, train_connector

MIXTURE_DATA = {
    "caption": "easy-VQA training images captioned 'a <colour> <shape>', instruction 'Describe the image.'",
    "instruct": "easy-VQA training images: half captioned as in 'caption', half with easy-VQA's yes/no questions",
}


def train_base(out_dir: Path, samples: int = 1000, epochs: int = 2, lr: float = 1e-3, seed: int = 0,
               mixture: str = "caption", numerics: Numerics = CPU_FLOAT32) -> dict:
    """Train a fresh connector on a starting mixture; write it (and a card of how it was made) to out_dir."""
    torch.manual_seed(seed)
    backbone = Backbone(numerics=numerics)
    examples = base_mixture(samples + 100, seed=seed, mixture=mixture)
    random.Random(seed).shuffle(examples)
    train, held_out = examples[:samples], examples[samples:]

    def embedded(rows: list[tuple[Image.Image, str, str]]) -> EmbeddedTask:
        # The base mixture lives in memory: no task key or text embedding is needed, only features.
        feats = backbone.encode_images([img for img, _, _ in rows])
        return EmbeddedTask([Sample(Path(), i, o) for _, i, o in rows], feats, None, None)

    start = time.time()
    connector = Connector(backbone.connector_config())
    train_set, test_set = embedded(train), embedded(held_out)
    losses = train_connector(backbone, connector, train_set, epochs=epochs, lr=lr, seed=seed, desc="base connector")
    accuracy = evaluate(backbone, TaskAdapter(connector), test_set).accuracy
    card = {
        "command": f"cit-trainer train-base --mixture {mixture} --samples {samples} --epochs {epochs} --lr {lr} "
                   f"--seed {seed}",
        "data": MIXTURE_DATA[mixture],
        "samples": len(train), "epochs": epochs, "lr": lr, "seed": seed,
        "final_loss": losses[-1], "held_out_accuracy": accuracy, "numerics": numerics.describe(),
        "seconds": round(time.time() - start, 1),
    }
    connector.save(out_dir)
    (Path(out_dir) / "base_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card
