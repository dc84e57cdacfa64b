"""The one bootstrap interval the benchmark, the routing suite and bench/reuse.py report."""
from __future__ import annotations

import math

import numpy as np


def bootstrap(values, rounds: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `values` and its 95 % percentile-bootstrap interval (values resampled with replacement); fewer than
    two values: no interval (the mean thrice, NaN for none)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()),) * 3 if len(x) else (math.nan,) * 3  # type: ignore[return-value]
    means = x[np.random.default_rng(seed).integers(0, len(x), (rounds, len(x)))].mean(1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
