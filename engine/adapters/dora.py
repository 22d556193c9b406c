"""DoRA (Liu et al. 2024, weight-decomposed low-rank adaptation): LoRA plus a trained magnitude
per output feature, as PEFT 0.21's ``LoraConfig(use_dora=True)``.

For a frozen base W (out, in), LoRA's A (r, in), B (out, r), scale s and the magnitude m (out,)::

    V  = W + s · B · A                    the adapted direction (out, in)
    n  = ‖V‖ per row, detached            (out,)   `kernels.dora.dora_weight_norm`
    g  = m / n                            (out,)   the per-output rescale
    y  = g ⊙ (x Wᵀ + s · drop(x) Aᵀ Bᵀ) + b          i.e. y = x (g ⊙ V)ᵀ + b without dropout

which is PEFT's ``base_result·(g − 1) + g·s·B(A(x))`` added to the base output ``x Wᵀ + b``.
``n`` is treated as a constant (the paper's §4.3; PEFT detaches it too), so the gradients are::

    z   = x Wᵀ + s · drop(x) Aᵀ Bᵀ        (N, out) `kernels.lora.lora_linear_checked`, no bias
    dz  = dy ⊙ g                          LoRA's backward then gives dx, dA, dB from dz
    dm  = Σ_tokens (dy ⊙ z) / n           (out,)

Dropout: on the low-rank path only, as LoRA's (`LoRALinear`). PEFT in training with dropout > 0
instead rescales a second base product ``drop(x) Wᵀ`` (``(g − 1) ⊙ drop(x) Wᵀ``): the same
expectation, but a second full GEMM forward and backward; without dropout, or in eval mode,
the two are the same function.

The norm is cached: it is recomputed only when A, B or the base weight may have changed, so the
micro-batches of one step and the gradient-checkpointing recompute reuse the one computed in the
step's first forward. The cache key holds each tensor's ``_version`` counter (bumped by in-place
ops: a loaded checkpoint's ``copy_``, a plain AdamW) and storage, and the number of optimizer
steps taken in the process (`_OptimizerSteps`), because torch's fused AdamW (ours,
`engine.run.optimizer`) updates parameters without bumping ``_version``.
The magnitude starts at ‖W + s·B·A‖ (= ‖W‖ for PEFT's B = 0), so a fresh layer equals its base.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from engine.adapters.lora import LoRAConfig, LoRALinear, dense_base_weight, merged_linear
from engine.adapters.targets import find_targets, replace_module
from kernels.dora import dora_weight_norm
from kernels.lora import lora_linear_checked
from kernels.lora_group import GroupMember
from models.quantized import QuantizedLinear


class _OptimizerSteps:
    """How many ``torch.optim.Optimizer.step`` calls this process made (any optimizer), counted by
    torch's global step hook: a parameter may have changed only across one of them, whatever the
    optimizer's implementation (fused kernels leave ``_version`` alone)."""

    count = 0

    @classmethod
    def _hook(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


register_optimizer_step_post_hook(_OptimizerSteps._hook)


def _tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current values: the object, its in-place version and storage."""
    return id(t), t._version, 0 if t.device.type == "meta" else t.data_ptr()


class DoRALinear(LoRALinear):
    """`LoRALinear` with DoRA's magnitude ``lora_magnitude_vector`` (out,) fp32, trained beside
    ``lora_A`` and ``lora_B`` (the module docstring gives the math)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        self._norm_key: tuple | None = None
        self._norm: torch.Tensor | None = None
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().clone())

    def _base_key(self) -> tuple:
        if isinstance(self.base, QuantizedLinear):  # its buffers (`frozen_weight` is a new object at each access)
            return tuple(_tensor_key(b) for b in self.base.buffers(recurse=False))
        return _tensor_key(self.base.weight)

    def weight_norm(self) -> torch.Tensor:
        """n = ‖W + s·B·A‖ per output row (out,) fp32, detached; recomputed only when A, B or W changed."""
        key = (_OptimizerSteps.count, _tensor_key(self.lora_A), _tensor_key(self.lora_B), self._base_key())
        if key != self._norm_key:
            self._norm = dora_weight_norm(self.base_weight(), self.lora_A.detach(), self.lora_B.detach(), self.scale)
            self._norm_key = key
        return self._norm

    def group_member(self) -> GroupMember | None:
        """Only the base enters a grouped projection (`models.projection`): the per-output rescale
        is not a grouped op, so an enabled DoRA layer is called on its own."""
        return super().group_member() if not self.adapter_enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        z = lora_linear_checked(x, self.base_weight(), self.lora_A, self.lora_B, self.scale,
                                dropout_p=self.dropout, training=self.training)  # x Wᵀ + s·drop(x)AᵀBᵀ
        g = (self.lora_magnitude_vector / self.weight_norm()).to(z.dtype)  # autograd: dz = dy⊙g, dm = Σ dy⊙z / n
        return z * g if self.base.bias is None else torch.addcmul(self.base.bias, z, g)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "lora_magnitude_vector": self.lora_magnitude_vector}

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = (m / ‖V‖) ⊙ V with V = W + s·B·A, (out, in) fp32 (a quantized base dequantized)."""
        weight, _ = dense_base_weight(self.base)
        v = weight + self.delta_weight().to(weight.device)
        norm = torch.linalg.vector_norm(v, dim=1)
        return (self.lora_magnitude_vector.float().to(v.device) / norm)[:, None] * v

    @torch.no_grad()
    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain linear with W' = (m / ‖W + s·B·A‖) ⊙ (W + s·B·A) formed in fp32 and rounded once
        to ``dtype`` (default: the base's; a quantized base onto its dequantized weight), the base's bias."""
        return merged_linear(self.base, self.merged_weight(), dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


def inject_dora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace each target linear (`engine.adapters.targets.find_targets`) by a `DoRALinear` owning
    it; return the replaced names. A's initialisation draws from the global torch RNG."""
    names = find_targets(model, cfg)
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, DoRALinear(base, cfg.rank_for(name), cfg.alpha_for(name), cfg.dropout,
                                               cfg.use_rslora))
    return names


def dora_modules(model: nn.Module) -> dict[str, DoRALinear]:
    """Every `DoRALinear` of the model by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
