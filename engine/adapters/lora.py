"""LoRA: its configuration (`LoRAConfig`, PEFT's field meanings) and the `LoRALinear` module.

A LoRA linear computes, for a frozen base weight W (out, in) and trainable A (r, in), B (out, r):

    y = x W^T + b + s * dropout(x) A^T B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

as in PEFT, so our adapters and PEFT's are interchangeable. The product runs through the fused
kernel `kernels.lora.lora_linear` (B·A is never formed). Which modules get one is
`engine.adapters.targets`; ``rank_pattern`` / ``alpha_pattern`` (PEFT's per-module overrides:
pattern -> r / alpha) apply to the first pattern ``p`` for which ``(.*\\.)?(p)$`` matches the module
name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.adapters.base import AdapterModule
from engine.errors import InputError
from kernels.lora import lora_linear_checked
from kernels.frozen import dequantize_frozen
from kernels.lora_group import GroupMember
from models.quantized import QuantizedLinear

ALL_LINEAR = "all-linear"
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_HEAD = "lm_head"


@dataclass
class LoRAConfig:
    """What to adapt and how, for LoRA and DoRA. Field meanings match PEFT's ``LoraConfig``
    (``alpha`` = ``lora_alpha``, ``init`` = ``init_lora_weights``).

    ``modules_to_save`` is what a read adapter folder trains whole beside LoRA: () for a causal-LM
    adapter, ``("score",)`` for a reward model's head (`engine.adapters.score_head`), the only
    one we support. Saving derives it from the model (whether it has the head), not from here.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False  # DoRA (`engine.adapters.dora`): a trained magnitude per output feature
    init: str = "default"  # how a fresh adapter starts (`engine.adapters.lora_init`); saved adapters are plain LoRA

    @property
    def method(self) -> str:
        """The ``--peft`` name (`engine.adapters.methods`)."""
        return "dora" if self.use_dora else "lora"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, set)):
            self.target_modules = tuple(sorted(self.target_modules) if isinstance(self.target_modules, set)
                                        else self.target_modules)
        if isinstance(self.exclude_modules, (list, set)):
            self.exclude_modules = tuple(self.exclude_modules)
        self.modules_to_save = tuple(self.modules_to_save)
        if not isinstance(self.r, int) or self.r <= 0:
            raise InputError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise InputError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise InputError("LoRA target_modules is empty: give module names (q_proj, ...) or 'all-linear'")

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_key(patterns: dict, module_name: str) -> str | None:
    """PEFT's rule: the first pattern p with ``(.*\\.)?(p)$`` matching the module name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


class FrozenBaseLinear(nn.Module):
    """A module that owns a frozen base linear (dense ``nn.Linear`` or a `QuantizedLinear`: NF4,
    int8, FP8) and adds an
    adapter's update to its output: `LoRALinear` (one trainable adapter) and
    `engine.adapters.multi.MultiLoRALinear` (several stacked, per row)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or a QuantizedLinear, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class LoRALinear(FrozenBaseLinear, AdapterModule):
    """A frozen base linear (dense ``nn.Linear`` or a `QuantizedLinear`) plus a trainable low-rank update.

    Parameters: ``lora_A`` (r, in) and ``lora_B`` (out, r), kept in fp32 (the optimizer's master
    copy); the kernel computes with them in the input's dtype. Initialisation is PEFT's: A ~ Kaiming
    uniform with a = sqrt(5) (bound 1/sqrt(in)), B = 0, so at init the layer equals its base.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base)
        device = _module_device(base)
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.scale = lora_scale(r, float(alpha), use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.adapter_enabled = True

    def base_weight(self):
        """The frozen weight the kernel takes: a dense (out, in) tensor or a quantized one."""
        return self.base.frozen_weight if isinstance(self.base, QuantizedLinear) else self.base.weight

    def group_member(self) -> GroupMember:
        """This layer as a member of a grouped projection (`models.projection`: q/k/v, gate/up):
        its base, and its LoRA with the dropout in force when the adapter is on."""
        if not self.adapter_enabled:
            if getattr(self, "lora_A0", None) is None:
                return GroupMember(self.base_weight(), self.base.bias)
            return GroupMember(self.base_weight(), self.base.bias, self.lora_A0, self.lora_B0, self.scale, 0.0)
        return GroupMember(self.base_weight(), self.base.bias, self.lora_A, self.lora_B, self.scale,
                           self.dropout if self.training else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            if getattr(self, "lora_A0", None) is None:
                return self.base(x)
            # PiSSA/OLoRA (`engine.adapters.lora_init`): the base alone is the residual W - s B0 A0; with
            # the adapter off the layer is the model it started from, W (DPO's reference, KL to the base)
            return lora_linear_checked(x, self.base_weight(), self.lora_A0, self.lora_B0, self.scale,
                                       bias=self.base.bias)
        # The kernel casts the fp32 master A, B to x's dtype itself and returns their grads in fp32.
        # Operands were checked here at construction (shapes fixed, base frozen): no per-call checks.
        return lora_linear_checked(x, self.base_weight(), self.lora_A, self.lora_B, self.scale,
                           dropout_p=self.dropout, training=self.training, bias=self.base.bias)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * B A, the (out, in) update in fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def unwrapped(self) -> nn.Module:
        return self.base

    @torch.no_grad()
    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain linear with W' = W + s B A, formed in fp32 and rounded once to ``dtype`` (default:
        the base's dtype; for a quantized base, the dtype it was quantized from, onto its dequantized weight)."""
        weight, _ = dense_base_weight(self.base)
        return merged_linear(self.base, weight + self.delta_weight().to(weight.device), dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}"


def dense_base_weight(base: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
    """A base linear's weight in fp32 (a quantized one dequantized) and the dtype it is stored in
    (for a quantized one, the dtype it was quantized from)."""
    if isinstance(base, QuantizedLinear):
        return dequantize_frozen(base.frozen_weight, torch.float32), base.frozen_weight.dtype
    return base.weight.float(), base.weight.dtype


@torch.no_grad()
def merged_linear(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` in place of ``base``: the merged fp32 ``weight`` rounded once to ``dtype``
    (default: the dtype ``base`` stores, `dense_base_weight`), and the base's bias."""
    stored = base.frozen_weight.dtype if isinstance(base, QuantizedLinear) else base.weight.dtype
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype or stored), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().to(dtype or base.bias.dtype), requires_grad=False)
    return linear


def _module_device(module: nn.Module) -> torch.device:
    if isinstance(module, QuantizedLinear):
        return module.weight_device
    return module.weight.device
