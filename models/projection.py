"""Projections that read the same input, computed together: attention's q, k, v and the MLP's gate, up.

``project_together(x, (q_proj, k_proj, v_proj))`` equals ``torch.cat([m(x) for m in ...], -1)``, the
modules keeping their names, parameters and PEFT keys (the grouping is internal to the step). Each
module describes itself as a `kernels.lora_group.GroupMember` — a frozen ``nn.Linear``, an
`QuantizedLinear` (NF4, int8, FP8), or any module with a ``group_member()`` method (``engine.adapters.LoRALinear``: its
base, its LoRA when enabled, its dropout when training) — and `kernels.lora_group.lora_linear_group`
computes them in one grouped op (one dequantized NF4 buffer and GEMM, one down-projection...). A
module it does not know, or an ``nn.Linear`` whose weight is being trained, is simply called.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.lora_group import GroupMember, lora_linear_group
from models.quantized import QuantizedLinear


def group_member(module: nn.Module) -> GroupMember | None:
    """How ``module`` enters a grouped projection, or None when it cannot (then it is called)."""
    if type(module) is nn.Linear:
        trained = module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad)
        return None if trained and torch.is_grad_enabled() else GroupMember(module.weight, module.bias)
    if isinstance(module, QuantizedLinear):
        return GroupMember(module.frozen_weight, module.bias)
    describe = getattr(module, "group_member", None)
    return describe() if callable(describe) else None


def project_together(x: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor:
    """``cat([m(x) for m in modules], -1)``: x (..., in) → (..., Σ out), as one grouped op."""
    members = [group_member(m) for m in modules]
    if any(m is None for m in members):
        return torch.cat([m(x) for m in modules], dim=-1)
    return lora_linear_group(x, members)
