"""Data-parallel training: several processes started by `accelerate launch` or `torchrun` (one per GPU, or CPU
processes talking over gloo) train one adapter as one process would.

Every process reads the same data and draws the same order, so each builds the same batch at each step; the batch's
rows are dealt out across the processes, each backpropagates its rows' share of the step's loss (its rows' mean
weighted by its share of the batch's answer tokens), and the gradients are summed, so every process takes the
optimiser step one process takes with the whole batch, to float rounding. The task's images are encoded the same
way: each process encodes its share and the features are gathered. What a method computes once per task
(EWC's importance, A-GEM's reference gradient) is computed whole by every process; evaluating, re-measuring and
committing are the main process's alone.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cit_backbone.numerics import Numerics


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training one adapter (rank 0 of 1: training alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> list[int]:
        """This process's rows of a batch of n (row i goes to process i mod world; none where n < world)."""
        return list(range(self.rank, n, self.world))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Each tensor, in place, summed over the processes: one collective for all of them."""
        if self.world == 1 or not tensors:
            return
        device = tensors[0].device  # the first tensor's: NCCL sums only on the GPU
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather_rows(self, mine: torch.Tensor, n: int) -> torch.Tensor:
        """The whole [n, ...] tensor in every process, from each process's rows of it (`mine`: its rows(n), in
        order): what one process computes for all n rows, each process computing only its share."""
        if self.world == 1:
            return mine
        per = -(-n // self.world)  # the most rows one process holds; the others are padded to it
        on = torch.device("cuda", torch.cuda.current_device()) \
            if torch.distributed.get_backend() == "nccl" else mine.device  # NCCL gathers only on the GPU
        padded = torch.zeros(per, *mine.shape[1:], dtype=mine.dtype, device=on)
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        whole = torch.empty(n, *mine.shape[1:], dtype=mine.dtype, device=mine.device)
        for rank, part in enumerate(parts):
            whole[rank :: self.world] = part[: len(range(rank, n, self.world))].to(mine.device)
        return whole


ALONE = Ranks()


def launched(numerics: Numerics) -> tuple[Ranks, Numerics]:
    """The ranks a launcher started this process as (WORLD_SIZE > 1 in its environment) and the device it trains on:
    cuda:LOCAL_RANK where `numerics` asks for CUDA, the CPU (gloo) otherwise. Other processes than the main one
    print no progress bars. Not launched: ALONE and `numerics` unchanged.

    ValueError where a launcher started several processes onto one named CUDA device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ALONE, numerics
    on_cuda = numerics.device.type == "cuda"
    if on_cuda and numerics.device.index is not None:
        raise ValueError(f"--device {numerics.device}: under a launcher each process takes the GPU of its local rank; "
                         "use --device cuda (or auto)")
    from accelerate import PartialState  # the launcher's environment -> process group (NCCL on GPUs, gloo on CPUs)

    state = PartialState(cpu=not on_cuda)
    ranks = Ranks(state.process_index, state.num_processes)
    if not ranks.main:
        os.environ["TQDM_DISABLE"] = "1"  # one set of progress bars, the main process's
    return ranks, Numerics(state.device if on_cuda else numerics.device, numerics.dtype)
