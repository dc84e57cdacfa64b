"""A training step against the matmul-only time of its own shapes (issue 15: within 1.5x; say what bounds it).

    python bench/train_step.py [--rounds 7] [--batch 16] [--task fashion-mnist] [--dtype float32|bfloat16]

The step is an EProj step as add-task takes it, on the default backbone: a batch of real rows of the task (each
with one of its training wordings), the connector's forward, the LM's loss over the image and answer positions
(the instruction's prefix from the prefix cache, as in every training step after a wording's first), the backward
into the connector, AdamW's update. The bound, from the same run and the same shapes: every Linear the step's
forward calls (recorded once with forward hooks: its input rows and its weight) multiplied with F.linear, and
for the backward the gradient's matmul back through that weight ([rows, out] @ W), which every frozen layer of the
LM needs as the gradient passes through it to the connector (and the weight gradient, for the connector's own
layers). Attention's own matmuls (scores over the cached prefix) are not in the bound. The two alternate within a
round, in a rotated order; per-round ratios, median [min, max]. Then a profile of one step: what takes the rest.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.numerics import Numerics
from cit_registry.taskdata import read_jsonl
from cit_trainer.data import export_task
from cit_trainer.training import embed_task


def record_linears(modules: list[torch.nn.Module], run) -> list[tuple[torch.nn.Linear, int]]:
    """(layer, input rows) of every Linear call `run` makes, in call order."""
    calls: list[tuple[torch.nn.Linear, int]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].shape[:-1].numel())))
             for root in modules for m in root.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def matmul_only(calls: list[tuple[torch.nn.Linear, int]], operands: dict) -> float:
    """Seconds for the calls' forward matmuls and their backward matmuls, nothing else."""
    with torch.no_grad():
        start = time.perf_counter()
        for layer, rows in calls:
            x, g = operands[layer.in_features, layer.out_features, rows]
            w = layer.weight.detach()
            F.linear(x, w)
            g @ w  # the gradient through the layer, to its input
            if layer.weight.requires_grad:
                g.t() @ x  # the layer's own weight gradient (the connector's)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16, help="rows per step (add-task's default)")
    parser.add_argument("--task", default="fashion-mnist")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    backbone = Backbone(numerics=Numerics.resolve("cpu", args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        task_dir, _ = export_task(args.task, Path(tmp), max(64, args.batch), 1)
        task = embed_task(backbone, TextEmbedder(), read_jsonl(task_dir / "train.jsonl"), "train")
    connector = backbone.base_connector().clone().to(backbone.lm.device).train()
    opt = torch.optim.AdamW(connector.parameters(), lr=1e-4)
    batch = task.batch().take(list(range(args.batch)))

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad()
        loss = backbone.lm.loss(connector(batch.features.to(backbone.lm.device)), batch.instructions, batch.answers)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    step()  # the wordings' prefixes into the cache, as after a task's first steps
    calls = record_linears([connector, backbone.lm.model], step)
    operands = {}
    for layer, rows in calls:
        dtype = layer.weight.dtype
        operands[layer.in_features, layer.out_features, rows] = (
            torch.randn(rows, layer.in_features, dtype=dtype), torch.randn(rows, layer.out_features, dtype=dtype))
    flops = sum(2 * rows * layer.in_features * layer.out_features * (3 if layer.weight.requires_grad else 2)
                for layer, rows in calls)
    rows_per_call = sorted({rows for _, rows in calls})
    print(f"{args.task}, batch {args.batch}, {args.dtype}, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print(f"the step's Linear calls: {len(calls)} (rows per call: {rows_per_call}); their matmuls "
          f"{flops / 1e9:.1f} GFLOP forward + backward")
    times: dict[str, list[float]] = {"step": [], "matmul": []}
    runs = {"step": step, "matmul": lambda: matmul_only(calls, operands)}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            times[name].append(statistics.median(runs[name]() for _ in range(3)))
    ratios = [s / m for s, m in zip(times["step"], times["matmul"])]
    for name, t in times.items():
        print(f"  {name:<7} median {1000 * statistics.median(t):7.1f} ms  [{1000 * min(t):.1f}, {1000 * max(t):.1f}]")
    print(f"  step / matmul-only: median {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] "
          f"over {args.rounds} rounds (goal <= 1.5); matmuls at "
          f"{flops / statistics.median(times['matmul']) / 1e9:.0f} GFLOP/s")
    print(f"load average at the end {os.getloadavg()[0]:.1f}\n\none step, profiled (self CPU time):")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
