"""The optimizer step every recipe takes after its backward: guard, clip, schedule, AdamW.

    update = optimizer.step(loss, step)

1. the global gradient norm of the trainable parameters is computed and clipped to
   ``max_grad_norm`` (0: no clipping, the norm is still measured);
2. guard: when the loss or that norm is not finite, the weights are not touched (the step is
   skipped; the caller logs it and counts it);
3. the learning rate of this step comes from the schedule (a pure function of the step number,
   so a resumed run needs nothing else), times each parameter group's ``lr_scale``, then one
   AdamW step;
4. the gradients are dropped either way (``zero_grad(set_to_none=True)``).

Nothing here reads a tensor on the host: the norm and the guard stay on the device. The guard is
a ``found_inf`` tensor (1.0 = skip) handed to PyTorch's fused AdamW, which then leaves the
weights, its moments and its step count untouched, as it does for ``GradScaler``. The caller
reads `Update` on the host when it logs (`engine.run.session.Run` does so once per log interval).

Parameter groups (`param_groups`): LoRA+ (Hayou et al. 2024, ``--loraplus-ratio``) trains B at
``ratio`` times A's rate: every LoRA ``lora_B`` in a group with ``lr_scale = ratio``, everything
else (A, DoRA's magnitude, a reward head, any other method's tensors) at the base rate. The
checkpoint keys AdamW's state by parameter name (`engine.run.checkpoint.optimizer_tensors`), so
groups change nothing there; the groups follow from the flags, which a resume must repeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.adapters import adapter_params
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


def param_groups(model: torch.nn.Module, loraplus_ratio: float | None = None) -> list[dict]:
    """The trainable parameters of ``model`` (in model order) as AdamW groups ``{"params", "lr_scale"}``:
    one group at scale 1, or with ``loraplus_ratio`` every LoRA B (adapter parameters named
    ``*.lora_B``, `engine.adapters.adapter_params`) in a second group at that scale."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if loraplus_ratio is None:
        return [{"params": trainable, "lr_scale": 1.0}]
    lora_b = {id(p) for name, p in adapter_params(model).items() if name.rsplit(".", 1)[-1] == "lora_B"}
    if not lora_b:
        raise ValueError("--loraplus-ratio: the model has no LoRA B to give its own learning rate")
    groups = [{"params": [p for p in trainable if id(p) not in lora_b], "lr_scale": 1.0},
              {"params": [p for p in trainable if id(p) in lora_b], "lr_scale": float(loraplus_ratio)}]
    return [g for g in groups if g["params"]]


class Optimizer:
    """Fused AdamW over the trainable parameters, with the schedule, clipping and the non-finite guard.

    ``params``: a list of parameters (one group at the scheduled rate), or `param_groups`' groups
    (each at the scheduled rate times its ``lr_scale``)."""

    def __init__(self, params: list[torch.nn.Parameter] | list[dict], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, max_grad_norm: float, schedule: str, warmup: int, total_steps: int):
        groups = params if params and isinstance(params[0], dict) else [{"params": list(params), "lr_scale": 1.0}]
        self.params = [p for g in groups for p in g["params"]]  # clipped together: one global norm
        # fused: one kernel per step on CUDA (and on CPU), and the only AdamW that takes found_inf
        self.adamw = torch.optim.AdamW([{**g, "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups], lr=lr,
                                       betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
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
            group["lr"] = lr * group["lr_scale"]
        self.adamw.found_inf = found_inf  # read by the fused kernel: skip the update where 1.0
        self.adamw.step()
        self.adamw.found_inf = None
        self.adamw.zero_grad(set_to_none=True)
        return Update(grad_norm, lr, found_inf)
