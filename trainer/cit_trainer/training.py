"""Training and evaluating a connector on one task's samples."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from cit_backbone.adapters import Connector, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.sampling import Sampling
from cit_registry.store import TaskKey
from cit_registry.taskdata import Sample, Verdict, accuracy_by_template, judge

from .data import load_images
from .methods import Batch, Method
from .parallel import ALONE, Ranks


@dataclass
class EmbeddedTask:
    """A task's samples with the features every later step needs, computed once."""

    samples: list[Sample]
    features: torch.Tensor     # [N, F] vision features the connector reads
    instruction: np.ndarray | None  # [N, 384]; None where no task key is needed (the base mixture)
    output: np.ndarray | None       # [N, 384]
    image: torch.Tensor | None = None  # [N, D] the image part of keys and routing queries; None: `features`

    @property
    def routing_image(self) -> np.ndarray:
        return (self.features if self.image is None else self.image).numpy()

    @property
    def instructions(self) -> list[str]:
        return [s.instruction for s in self.samples]

    @property
    def answers(self) -> list[str]:
        return [s.output for s in self.samples]

    def batch(self) -> Batch:
        return Batch(self.features, self.instructions, self.answers)

    def joined(self, other: EmbeddedTask) -> EmbeddedTask:
        """Both tasks' samples as one (training a reused adapter on new and replayed data alike)."""
        def cat(a, b):
            return None if a is None or b is None else np.concatenate([a, b])
        if self.image is not None and other.image is None:  # as before the typing pass: an error, not a silent drop
            raise ValueError("only one of the joined tasks has its routing image features")
        return EmbeddedTask(self.samples + other.samples, torch.cat([self.features, other.features]),
                            cat(self.instruction, other.instruction), cat(self.output, other.output),
                            None if self.image is None or other.image is None else torch.cat([self.image, other.image]))

    def key(self) -> TaskKey:
        assert self.instruction is not None and self.output is not None, "no text embeddings: no key"
        return TaskKey.from_embeddings(self.routing_image, self.instruction, self.output)


def embed_task(backbone: Backbone, embedder: TextEmbedder, samples: list[Sample], desc: str, batch: int = 64,
               ranks: Ranks = ALONE) -> EmbeddedTask:
    """The task's image features and text embeddings. Under a launcher (`ranks`) each process encodes its share
    of the images (the vision tower's work) and every process gets them all."""
    mine = [samples[i] for i in ranks.rows(len(samples))]
    feats = [backbone.encode_images([])]  # [0, feature width]: a process may hold no rows
    for i in tqdm(range(0, len(mine), batch), desc=f"encoding {desc}", unit="batch", leave=False):
        feats.append(backbone.encode_images(load_images(mine[i : i + batch])))

    def embed_unique(texts: list[str]) -> np.ndarray:  # instructions repeat a lot: embed each once
        unique = sorted(set(texts))
        table = dict(zip(unique, embedder.embed(unique)))
        return np.stack([table[t] for t in texts])

    features = ranks.gather_rows(torch.cat(feats), len(samples))
    return EmbeddedTask(
        samples,
        features,
        embed_unique([s.instruction for s in samples]),
        embed_unique([s.output for s in samples]),
        backbone.routing_features(features),
    )


def train_connector(
    backbone: Backbone,
    connector: Connector,
    task: EmbeddedTask,
    epochs: int = 2,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    desc: str = "training",
    method: Method | None = None,
    lora: str | None = None,
    ranks: Ranks = ALONE,
) -> list[float]:
    """Train `connector` in place on the task (vision tower and LM frozen, except the LoRA named `lora`, loaded
    trainable in the LM, which trains with it); returns the loss of each step.

    AdamW with a one-cycle schedule (10 % warm-up, cosine decay): at a constant rate the last steps' noise decides
    the final accuracy, which then swings by several points from epoch to epoch. A continual-learning `method`
    (methods.py) may add replayed rows or a penalty to each step and adjust its gradient; it is told when the
    task begins and ends (needs the task's key). Under a launcher (`ranks`, parallel.py) each process takes its
    share of every step's rows and the gradients are summed: the same steps as one process, to float rounding.
    """
    connector.to(backbone.lm.device)  # in place: the caller's connector is the one trained
    gen = torch.Generator().manual_seed(seed)
    # the method's own draws (ER's and A-GEM's rows from the buffer): the data order stays the one SeqFT sees
    method_gen = torch.Generator().manual_seed(seed + 1)
    params = [*connector.parameters(), *(backbone.lm.loras.parameters(lora) if lora else [])]
    opt = torch.optim.AdamW(params, lr=lr)
    steps = epochs * ((len(task.samples) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    method = method or Method()
    data = task.batch()

    def loss_fn(batch: Batch, logits: bool = False) -> torch.Tensor:
        visual = connector(batch.features.to(backbone.lm.device))
        if logits:
            return backbone.lm.answer_logits(visual, batch.instructions, batch.answers, lora)[0]
        return backbone.lm.loss(visual, batch.instructions, batch.answers, lora)

    key = task.key() if task.instruction is not None else None
    method.begin_task(connector, key)
    connector.train()
    losses: list[float] = []
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(task.samples), generator=gen).tolist()
            for i in range(0, len(order), batch_size):
                batch = data.take(order[i : i + batch_size])
                replayed = method.replay(batch_size, method_gen)
                rows = Batch.concat([batch, replayed]) if replayed else batch
                opt.zero_grad()
                if ranks.world == 1:
                    loss = loss_fn(rows)
                    penalty = method.penalty(connector)
                    (loss + penalty if penalty is not None else loss).backward()
                else:
                    penalty = method.penalty(connector) if ranks.main else None  # once in the summed gradient
                    if penalty is not None:
                        penalty.backward()
                    loss = _backward_share(rows, ranks, loss_fn, backbone.lm.answer_ids)
                    ranks.reduce_sum([*_gradients(params), loss])
                method.adjust_gradient(connector, loss_fn, method_gen)
                opt.step()
                schedule.step()
                method.after_step(connector)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    method.end_task(connector, key, data, loss_fn)
    connector.eval()
    return losses


def _backward_share(rows: Batch, ranks: Ranks, loss_fn, answer_ids) -> torch.Tensor:
    """Backpropagate this process's rows' share of the step's mean loss over answer tokens (their mean weighted by
    their share of the tokens): summed over the processes, the gradient of the whole batch's mean. Returns the share
    ([1], detached); a process left without rows (a batch smaller than the world) adds nothing."""
    mine = rows.take(ranks.rows(len(rows)))
    if not len(mine):
        return torch.zeros(1)
    tokens = lambda batch: sum(len(answer_ids(a)) for a in batch.answers)  # noqa: E731
    share = loss_fn(mine) * (tokens(mine) / tokens(rows))
    share.backward()
    return share.detach().reshape(1)


def _gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's gradient, zeros where this process's step gave it none (it still takes part in the sum)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [g for p in params if (g := p.grad) is not None]


class Evaluation(NamedTuple):
    accuracy: float
    correct: list[bool]          # per sample, in order
    verdicts: list[Verdict]      # correct, a format error (the answer with more around it) or a knowledge error
    predictions: list[str]       # what was generated, per sample

    def by_template(self, samples: list[Sample]) -> dict[str, float]:
        return accuracy_by_template(samples, self.correct)

    def errors(self) -> dict[str, int]:
        return {v.value: self.verdicts.count(v) for v in (Verdict.FORMAT, Verdict.KNOWLEDGE)}


def evaluate(
    backbone: Backbone, adapter: TaskAdapter, task: EmbeddedTask, batch_size: int = 32, desc: str = "evaluating"
) -> Evaluation:
    """Greedy accuracy of `adapter` on the task (taskdata.judge: exact match after normalisation), with each
    sample's verdict."""
    longest = max(len(backbone.lm.answer_ids(a)) for a in task.answers)
    sampling = Sampling(max_new_tokens=min(longest + 2, 64))
    predictions: list[str] = []
    for i in tqdm(range(0, len(task.samples), batch_size), desc=desc, unit="batch", leave=False):
        features = task.features[i : i + batch_size]
        n = len(features)
        states = backbone.generate(features, [adapter] * n, task.instructions[i : i + n], [sampling] * n)
        predictions += [s.text for s in states]
    verdicts = [judge(p, a) for p, a in zip(predictions, task.answers)]
    correct = [v is Verdict.CORRECT for v in verdicts]
    return Evaluation(sum(correct) / len(correct), correct, verdicts, predictions)
