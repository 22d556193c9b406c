"""The optimizer step every recipe takes after its backward: guard, clip, schedule, AdamW.

    update = optimizer.step(loss, step)

1. the global gradient norm of the trainable parameters is computed and clipped to
   ``max_grad_norm`` (0: no clipping, the norm is still measured);
2. guard: when the loss or that norm is not finite, the weights are not touched (the step is
   skipped; the caller logs it and counts it);
3. the learning rate of this step comes from the schedule (a pure function of the step number,
   so a resumed run needs nothing else), then one AdamW step;
4. the gradients are dropped either way (``zero_grad(set_to_none=True)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.run.schedule import lr_at


@dataclass(frozen=True)
class Update:
    """What one optimizer step did: the gradient norm before clipping, the rate, and whether the
    weights were updated (False: a non-finite loss or gradient, the step was skipped)."""

    grad_norm: float
    lr: float
    applied: bool


class Optimizer:
    """AdamW over the trainable parameters, with the schedule, clipping and the non-finite guard."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, max_grad_norm: float, schedule: str, warmup: int, total_steps: int):
        self.params = params
        self.adamw = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.peak_lr, self.schedule, self.warmup, self.total_steps = lr, schedule, warmup, total_steps
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else math.inf

    def lr_at(self, step: int) -> float:
        return lr_at(step, peak=self.peak_lr, warmup=self.warmup, total=self.total_steps, schedule=self.schedule)

    def step(self, loss: float, step: int) -> Update:
        """Clip, guard and apply the accumulated gradients for optimizer step ``step`` (0-based)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm).item()
        lr = self.lr_at(step)
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            for group in self.adamw.param_groups:
                group["lr"] = lr
            self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        return Update(grad_norm, lr, applied)
