"""Learning-rate schedules as a pure function of the step, so resuming needs only the step number.

For optimizer step ``s`` (0-based) of ``total`` with ``warmup`` warmup steps and peak rate ``peak``:

    warmup  (s < warmup):   lr = peak * (s + 1) / warmup          (never a wasted zero-lr step)
    then    p = (s - warmup) / max(1, total - warmup)  in [0, 1)
    cosine:   lr = peak * (1 + cos(pi * p)) / 2
    linear:   lr = peak * (1 - p)
    constant: lr = peak
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "constant":
        return peak
    raise ValueError(f"unknown schedule {schedule!r}: expected cosine, linear or constant")


def default_warmup(total_steps: int) -> int:
    """3% of the run, as is customary for LoRA fine-tunes (0 for runs under 34 steps)."""
    return int(0.03 * total_steps)
