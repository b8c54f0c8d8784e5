"""Learning-rate schedules as pure functions: step -> multiplier of the peak LR."""
from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.1) -> float:
    """Linear warmup to 1.0 over `warmup` steps, then decay to `min_ratio` at `total` (cosine|linear|constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, linear or constant")
