"""Continual-learning methods of He et al. (arXiv 2311.16206), applied to the shared connector.

A `Method` shapes `train_connector` through four hooks (begin a task, add rows or a penalty to a step, adjust the
gradient, end a task) and remembers what it needs of earlier tasks: anchor parameters and their importance
(EWC, MAS, SI and their task-similarity-informed TIR variants), or a replay buffer (ER, A-GEM).
SeqFT is the method with no memory. EProj, LoRA and joint training need no hooks: EProj trains a fresh connector
per task (LoRA: a connector and a LoRA on the LM), joint training trains one connector on every task seen so far.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cit_registry.store import TaskKey

IMPORTANCE_METHODS = ("ewc", "mas", "si")
REPLAY_METHODS = ("er", "agem")
SHARED_METHODS = ("seqft", *IMPORTANCE_METHODS, *(f"tir-{m}" for m in IMPORTANCE_METHODS), *REPLAY_METHODS)
ROUTED_METHODS = ("eproj", "lora")  # an adapter per task, chosen by routing: no hooks needed
METHODS = (*ROUTED_METHODS, "joint", *SHARED_METHODS)
IMPORTANCE_SAMPLES = 64  # training samples over which EWC's Fisher and MAS's sensitivity are estimated


@dataclass
class Batch:
    """Rows of one training step: vision features and the text around them."""

    features: torch.Tensor   # [B, feature_dim]
    instructions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.answers)

    def take(self, rows: list[int]) -> Batch:
        return Batch(self.features[rows], [self.instructions[r] for r in rows], [self.answers[r] for r in rows])

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        return Batch(torch.cat([b.features for b in batches]), [i for b in batches for i in b.instructions],
                     [a for b in batches for a in b.answers])


class Method:
    """SeqFT: plain sequential fine-tuning. The base of every shared-connector method."""

    name = "seqft"

    def begin_task(self, connector: torch.nn.Module, key: TaskKey | None) -> None:
        """Called before training on a task whose key is `key`."""

    def replay(self, batch_size: int, generator: torch.Generator) -> Batch | None:
        """Rows from earlier tasks to add to this step's batch (ER)."""
        return None

    def penalty(self, connector: torch.nn.Module) -> torch.Tensor | None:
        """A term added to this step's loss (EWC, MAS, SI)."""
        return None

    def adjust_gradient(self, connector: torch.nn.Module, loss_fn, generator: torch.Generator) -> None:
        """Change the gradients in place after backward (A-GEM); loss_fn(batch) gives a batch's loss."""

    def after_step(self, connector: torch.nn.Module) -> None:
        """Called after each optimiser step (SI's path integral)."""

    def end_task(self, connector: torch.nn.Module, key: TaskKey | None, data: Batch, loss_fn) -> None:
        """Called after training on a task: remember what later tasks must not destroy."""

    # -- memory across add-task runs: tensors in safetensors, the rest in JSON (nothing pickled)
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass

    def save(self, directory: Path) -> None:
        tensors, meta = self.state()
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(directory / "state.safetensors"))
        (directory / "state.json").write_text(json.dumps({"method": self.name, **meta}, indent=2) + "\n")

    def load(self, directory: Path) -> Method:
        meta = json.loads((directory / "state.json").read_text())
        if meta.get("method") != self.name:
            raise ValueError(f"{directory} holds the memory of method {meta.get('method')!r}, not {self.name!r}")
        self.load_state(load_file(str(directory / "state.safetensors")), meta)
        return self


def _params(connector: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in connector.named_parameters() if p.requires_grad}


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    """A trainable parameter's gradient after a backward pass (every one gets one: the loss uses them all)."""
    if p.grad is None:
        raise RuntimeError("a trainable connector parameter got no gradient")
    return p.grad


# ------------------------------------------------------------------------------------------ importance methods


def tir_similarity(keys: list[TaskKey]) -> np.ndarray:
    """Task similarity s[i, j] of the paper's TIR from task keys (first centroid of each part).

    For each part (image, instruction, output) the cosines of all task pairs are standardised over the pairs,
    passed through a sigmoid, and the three are multiplied: s = σ(z_img)·σ(z_inst)·σ(z_out). With only two tasks
    (one pair) there is nothing to standardise over, and the raw cosines are multiplied (negative ones read as 0).
    The diagonal is 1.
    """
    n = len(keys)
    s = np.ones((n, n))
    if n < 2:
        return s
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    factors = []
    for part in ("image", "instruction", "output"):
        vectors = np.stack([getattr(k, part)[0] for k in keys]).astype(np.float64)
        cos = np.array([vectors[i] @ vectors[j] for i, j in pairs])
        if len(pairs) == 1:
            factors.append(np.clip(cos, 0.0, None))
        else:
            z = (cos - cos.mean()) / (cos.std() + 1e-12)
            factors.append(1.0 / (1.0 + np.exp(-z)))
    prod = factors[0] * factors[1] * factors[2]
    for (i, j), v in zip(pairs, prod):
        s[i, j] = s[j, i] = v
    return s


class ImportanceMethod(Method):
    """A quadratic penalty λ·Σ Ω(θ − θ*)² toward the parameters θ* after the previous task.

    Every task's importance is divided by one scale, the first task's mean importance (so one λ suits EWC, MAS and
    SI alike, while a task whose parameters mattered less, e.g. one hardly learnt, keeps weighing less), and merged
    into Ω by element-wise max, remembering which task supplied each entry. With `tir`, before task k every entry is
    scaled by (1 − s(k, owner)): parameters important to a task similar to the new one are left freer to move.
    SI's path integral (Zenke et al. 2017) sums −g·Δθ with g the gradient of the task's loss alone: the penalty's
    gradient, known in closed form, is taken out of the step's gradient first.
    """

    def __init__(self, kind: str, strength: float = 100.0, tir: bool = False) -> None:
        if kind not in IMPORTANCE_METHODS:
            raise ValueError(f"unknown importance method {kind!r}")
        self.kind, self.strength, self.tir = kind, strength, tir
        self.name = f"tir-{kind}" if tir else kind
        self.keys: list[TaskKey] = []               # keys of finished tasks, in order
        self.importance: dict[str, torch.Tensor] = {}  # merged Ω
        self.owner: dict[str, torch.Tensor] = {}       # index into self.keys of the task that supplied Ω
        self.anchor: dict[str, torch.Tensor] = {}      # θ* after the previous task
        self.scaled: dict[str, torch.Tensor] = {}      # Ω as used for the current task
        self._path: dict[str, torch.Tensor] = {}       # SI: running -g·Δθ
        self._start: dict[str, torch.Tensor] = {}
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # SI: (θ, task-loss g) before the step
        self.scale: float | None = None                # the first task's mean importance: every task's divisor

    def begin_task(self, connector, key) -> None:
        params = _params(connector)
        device = next(iter(params.values())).device  # memory read from the registry is on the CPU
        for state in (self.importance, self.owner, self.anchor):
            state.update({n: t.to(device) for n, t in state.items()})
        self._start = {n: p.detach().clone() for n, p in params.items()}
        self._path = {n: torch.zeros_like(p) for n, p in params.items()}
        self.scaled = self.importance
        if self.tir and self.keys:
            sims = tir_similarity([*self.keys, key])[-1, :-1]  # the new task against each finished one
            scale = torch.tensor(1.0 - sims, dtype=torch.float32, device=device)
            self.scaled = {n: imp * scale[self.owner[n]] for n, imp in self.importance.items()}

    def penalty(self, connector) -> torch.Tensor | None:
        if not self.scaled:
            return None
        params = _params(connector)
        total = sum((self.scaled[n] * (params[n] - self.anchor[n]).pow(2)).sum() for n in self.scaled)
        return self.strength * cast(torch.Tensor, total)

    def adjust_gradient(self, connector, loss_fn, generator) -> None:
        if self.kind == "si":  # remember θ and the task loss's g before the step: the path integral needs both
            self._before = {n: (p.detach().clone(), p.grad.detach() - self._penalty_grad(n, p))
                            for n, p in _params(connector).items() if p.grad is not None}

    def _penalty_grad(self, name: str, p: torch.Tensor) -> torch.Tensor | float:
        """∂/∂θ of the penalty λ·Ω(θ − θ*)² for one parameter."""
        if name not in self.scaled:
            return 0.0
        return 2 * self.strength * self.scaled[name] * (p.detach() - self.anchor[name])

    def after_step(self, connector) -> None:
        if self.kind == "si":
            for n, p in _params(connector).items():
                if n in self._before:
                    old, grad = self._before[n]
                    self._path[n] -= grad * (p.detach() - old)

    def task_importance(self, connector, data: Batch, loss_fn) -> dict[str, torch.Tensor]:
        params = _params(connector)
        if self.kind == "si":
            xi = 1e-3  # damping of Zenke et al. for parameters that hardly moved
            return {n: (self._path[n] / ((p.detach() - self._start[n]).pow(2) + xi)).clamp(min=0)
                    for n, p in params.items()}
        data = data.take(list(range(min(len(data), IMPORTANCE_SAMPLES))))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for i in range(len(data)):  # per sample: the Fisher is the mean of squared per-sample gradients (a batch's
            rows = data.take([i])   # gradient squared is a smaller number); one backward pass each
            connector.zero_grad()
            if self.kind == "ewc":  # diagonal empirical Fisher: squared gradient of the log-likelihood
                loss_fn(rows).backward()
            else:  # MAS: gradient of the squared L2 norm of the output (the answer logits)
                logits = loss_fn(rows, logits=True)
                logits.pow(2).sum(-1).mean().backward()
            for n, p in params.items():
                g = _grad(p).detach()
                total[n] += g.pow(2) if self.kind == "ewc" else g.abs()
            count += 1
        connector.zero_grad()
        return {n: t / max(count, 1) for n, t in total.items()}

    def end_task(self, connector, key, data, loss_fn) -> None:
        new = self.task_importance(connector, data, loss_fn)
        mean = torch.cat([v.flatten() for v in new.values()]).mean().item()
        if self.scale is None and mean > 1e-12:  # a first task that moved nothing sets no scale: the next one does
            self.scale = mean
        index = len(self.keys)
        for n, imp in new.items():
            imp = imp / (self.scale or 1.0)
            if n in self.importance:
                wins = imp > self.importance[n]
                self.importance[n] = torch.where(wins, imp, self.importance[n])
                self.owner[n] = torch.where(wins, torch.full_like(self.owner[n], index), self.owner[n])
            else:
                self.importance[n] = imp
                self.owner[n] = torch.full(imp.shape, index, dtype=torch.long, device=imp.device)
        self.anchor = {n: p.detach().clone() for n, p in _params(connector).items()}
        self.keys.append(key)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{part}.{n}": t for part, d in (("importance", self.importance), ("owner", self.owner),
                                                   ("anchor", self.anchor)) for n, t in d.items()}
        for i, k in enumerate(self.keys):  # TIR compares each new task with the owners' keys
            for part in ("image", "instruction", "output", "counts"):
                tensors[f"key{i}.{part}"] = torch.from_numpy(np.ascontiguousarray(getattr(k, part)))
        return tensors, {"tasks": len(self.keys), "strength": self.strength, "scale": self.scale}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for part, d in (("importance", self.importance), ("owner", self.owner), ("anchor", self.anchor)):
            d.clear()
            d.update({k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".")})
        self.keys = [TaskKey(*(tensors[f"key{i}.{p}"].numpy() for p in ("image", "instruction", "output", "counts")))
                     for i in range(meta["tasks"])]
        # memory written before one scale existed (each task scaled to mean 1): the next task sets the scale
        self.scale = meta.get("scale")


# ------------------------------------------------------------------------------------------ replay methods


class ReplayMethod(Method):
    """ER adds buffer rows to every step; A-GEM keeps the step from raising the buffer's loss.

    The buffer keeps `fraction` of each finished task's training samples, at least `min_per_task`. A-GEM (Chaudhry
    et al. 2019) projects the gradient; its guarantee — the step does not raise the buffer's loss, to first order —
    holds for plain SGD only, since AdamW's moments and weight decay make the step taken differ from the projected
    gradient. So the step actually taken is checked too, and its component up the buffer's gradient removed.
    """

    def __init__(self, kind: str, fraction: float = 0.01, min_per_task: int = 8) -> None:
        if kind not in REPLAY_METHODS:
            raise ValueError(f"unknown replay method {kind!r}")
        if not 0.0 <= fraction <= 1.0 or min_per_task < 0:
            raise ValueError("the buffer fraction must lie in [0, 1] and its minimum be >= 0")
        self.kind = self.name = kind
        self.fraction, self.min_per_task = fraction, min_per_task
        self.buffer: Batch | None = None
        self._step: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None  # A-GEM: θ, g_ref, |g_ref|²

    def _draw(self, n: int, generator: torch.Generator) -> Batch | None:
        if self.buffer is None or len(self.buffer) == 0:
            return None
        rows = torch.randperm(len(self.buffer), generator=generator)[:n].tolist()
        return self.buffer.take(rows)

    def replay(self, batch_size, generator) -> Batch | None:
        return self._draw(max(1, batch_size // 2), generator) if self.kind == "er" else None

    def adjust_gradient(self, connector, loss_fn, generator) -> None:
        if self.kind != "agem":
            return
        reference = self._draw(16, generator)
        if reference is None:
            return
        params = list(_params(connector).values())
        grads = [_grad(p).detach().clone() for p in params]
        connector.zero_grad()
        loss_fn(reference).backward()
        ref = [_grad(p).detach().clone() for p in params]
        dot = sum((g * r).sum() for g, r in zip(grads, ref))
        ref_sq = sum((r * r).sum() for r in ref)
        if dot < 0:  # the step would raise the buffer's loss: remove that component
            grads = [g - (dot / ref_sq) * r for g, r in zip(grads, ref)]
        for p, g in zip(params, grads):
            p.grad = g
        self._step = ([p.detach().clone() for p in params], ref, torch.as_tensor(ref_sq))

    def after_step(self, connector) -> None:
        """A-GEM: the step taken, Δθ, must not raise the buffer's loss to first order (g_ref·Δθ <= 0)."""
        if self._step is None:
            return
        before, ref, ref_sq = self._step
        self._step = None
        params = list(_params(connector).values())
        rise = torch.stack([((p.detach() - b) * r).sum() for p, b, r in zip(params, before, ref)]).sum()
        if rise > 0 and ref_sq > 0:
            with torch.no_grad():
                for p, r in zip(params, ref):
                    p.sub_((rise / ref_sq) * r)

    def end_task(self, connector, key, data, loss_fn) -> None:
        keep = min(len(data), max(self.min_per_task, math.ceil(self.fraction * len(data))))
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(len(data)))[:keep].tolist()
        chosen = data.take(rows)
        self.buffer = chosen if self.buffer is None else Batch.concat([self.buffer, chosen])

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.buffer is None:
            return {}, {"instructions": [], "answers": []}
        # The buffer keeps vision features, not images: the registry stays independent of the data's files.
        return {"features": self.buffer.features}, {"instructions": self.buffer.instructions,
                                                    "answers": self.buffer.answers}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.buffer = Batch(tensors["features"], meta["instructions"], meta["answers"]) if meta["answers"] else None


def make_method(name: str, strength: float = 100.0, replay_fraction: float = 0.01) -> Method:
    """The hooks for a shared-connector method (see SHARED_METHODS)."""
    if name == "seqft":
        return Method()
    if name in IMPORTANCE_METHODS:
        return ImportanceMethod(name, strength)
    if name.startswith("tir-") and name[4:] in IMPORTANCE_METHODS:
        return ImportanceMethod(name[4:], strength, tir=True)
    if name in REPLAY_METHODS:
        return ReplayMethod(name, replay_fraction)
    raise ValueError(f"{name!r} is not a shared-connector method; choose from {', '.join(SHARED_METHODS)}")
