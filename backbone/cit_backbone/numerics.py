"""Where the frozen backbone runs and in what precision: one value the trainer and the server resolve from their
`--device` / `--dtype` options and hand to every module that builds tensors.

The frozen weights (language model) take `dtype`; the vision tower stays in float32, because its features are the
image part of task keys and routing queries, which must not depend on the serving precision. Trainable adapters
(connectors, LoRAs) keep float32 weights, as mixed-precision training does; their outputs are cast to `dtype` where
they enter the language model. Sampling reads float32 logits on the CPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import DEVICE_HELP, DTYPE_NAMES

CPU = torch.device("cpu")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class Numerics:
    device: torch.device = CPU
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "float32") -> Numerics:
        """From the options' words; ValueError with what to do when the machine cannot honour them."""
        if device == "auto":
            chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                chosen = torch.device(device)
            except RuntimeError:
                raise ValueError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
            if chosen.type not in ("cpu", "cuda"):
                raise ValueError(f"device {device!r} is not supported; use {DEVICE_HELP}")
            if chosen.type == "cuda":
                if not torch.cuda.is_available():
                    raise ValueError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}, "
                                     f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu")
                if chosen.index is not None and chosen.index >= torch.cuda.device_count():
                    raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        return cls(chosen, DTYPES[dtype])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, str]:
        """What a task card records of the numerics a task was trained with (the device's type: which GPU does not
        change the numbers)."""
        return {"device": self.device.type, "dtype": self.dtype_name}

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


CPU_FLOAT32 = Numerics()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none): the one reader of them."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def trained_dtype(training: dict) -> str:
    """The dtype a task was trained with, from its card's `training`; cards written before cit recorded it:
    float32 (every task was trained in float32 then)."""
    return str(training.get("numerics", {}).get("dtype", "float32"))
