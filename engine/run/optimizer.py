"""The optimizer step every recipe takes after its backward: guard, clip, schedule, AdamW.

    update = optimizer.step(loss, step)

1. the global gradient norm of the trainable parameters is computed and clipped to
   ``max_grad_norm`` (0: no clipping, the norm is still measured);
2. guard: when the loss or that norm is not finite, the weights are not touched (the step is
   skipped; the caller logs it and counts it);
3. the learning rate of this step comes from the schedule (a pure function of the step number,
   so a resumed run needs nothing else), then one AdamW step;
4. the gradients are dropped either way (``zero_grad(set_to_none=True)``).

Nothing here reads a tensor on the host: the norm and the guard stay on the device. The guard is
a ``found_inf`` tensor (1.0 = skip) handed to PyTorch's fused AdamW, which then leaves the
weights, its moments and its step count untouched, as it does for ``GradScaler``. The caller
reads `Update` on the host when it logs (`engine.run.session.Run` does so once per log interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.dtensors import full_tensor
from engine.run.schedule import lr_at


@dataclass(frozen=True)
class Update:
    """What one optimizer step did: the gradient norm before clipping and ``found_inf`` (1.0: a
    non-finite loss or gradient, the step was skipped), both 0-d fp32 tensors on the device, and
    the rate. ``applied`` reads ``found_inf`` on the host (a device sync on a GPU)."""

    grad_norm: torch.Tensor
    lr: float
    found_inf: torch.Tensor

    @property
    def applied(self) -> bool:
        return not bool(self.found_inf)


class Optimizer:
    """Fused AdamW over the trainable parameters, with the schedule, clipping and the non-finite guard."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, max_grad_norm: float, schedule: str, warmup: int, total_steps: int):
        self.params = params
        # fused: one kernel per step on CUDA (and on CPU), and the only AdamW that takes found_inf
        self.adamw = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.peak_lr, self.schedule, self.warmup, self.total_steps = lr, schedule, warmup, total_steps
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else math.inf

    def lr_at(self, step: int) -> float:
        return lr_at(step, peak=self.peak_lr, warmup=self.warmup, total=self.total_steps, schedule=self.schedule)

    def step(self, loss: torch.Tensor | float, step: int) -> Update:
        """Clip, guard and apply the accumulated gradients for optimizer step ``step`` (0-based);
        ``loss`` is the step's mean loss (a 0-d tensor on the device, or a float)."""
        # under FSDP2 the norm of the sharded gradients is a replicated DTensor: its local value is the total
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)).float()
        loss = torch.as_tensor(loss, dtype=torch.float32, device=grad_norm.device)
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        lr = self.lr_at(step)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.found_inf = found_inf  # read by the fused kernel: skip the update where 1.0
        self.adamw.step()
        self.adamw.found_inf = None
        self.adamw.zero_grad(set_to_none=True)
        return Update(grad_norm, lr, found_inf)
