"""IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned scaling vectors, as HF PEFT's ``IA3Config`` / ``peft.tuners.ia3.Linear``.

For a frozen base linear W (out, in), bias b, and a trained vector l:

* a target that is not a feed-forward module scales the output,  y = (x Wᵀ + b) ⊙ l,   l (out,);
* a feed-forward module (PEFT's ``feedforward_modules``) scales the input, y = (x ⊙ l) Wᵀ + b, l (in,).

l starts at ones (PEFT's ``init_ia3_weights=True``), so a fresh adapter is the base. As in PEFT
the product with l is formed in fp32 (l is the fp32 master copy) and rounded once to the dtype of
the tensor it scales. Gradients (chain rule, G = dL/dy):

* output scale, z = x Wᵀ + b:  dL/dl = Σ_rows G ⊙ z,   dL/dz = G ⊙ l,  then dL/dx = (G ⊙ l) W;
* input scale, u = x ⊙ l:      dL/du = G W,   dL/dl = Σ_rows x ⊙ (G W),   dL/dx = (G W) ⊙ l.

Why no Triton kernel: the op is one elementwise multiply beside the base GEMM (memory-bound: a
read and a write of the (..., out) or (..., in) activation), and torch already runs it as one
elementwise kernel forward and a multiply plus a row reduction backward; a Triton kernel alone
would move the same bytes. The only real saving is fusing the scale into a neighbour (the
SwiGLU that produces down_proj's input, or the GEMM's epilogue), which would tie this module to
the MLP's and the base's kernels; no GPU was available to measure whether that pays.

Targets (PEFT's rules, `engine.adapters.targets.find_targets`): a list entry matches a module whose
name equals it or ends in ``.entry``, a string is a regex matched against the whole name,
"all-linear" is every linear but the output head. Feed-forward membership is PEFT's own rule
(`is_feedforward`): a list entry matches a name that merely ends with it, a string is a regex
matched against the whole name. PEFT's defaults for Llama are ``target_modules = [k_proj, v_proj,
down_proj]`` and ``feedforward_modules = [down_proj]`` (peft/utils/constants.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.adapters.base import AdapterModule, adapter_modules
from engine.adapters.lora import ALL_LINEAR, FrozenBaseLinear, _module_device, dense_base_weight, merged_linear
from engine.adapters.targets import find_targets, replace_module
from engine.errors import InputError

# PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING["llama"]
LLAMA_IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
LLAMA_IA3_FEEDFORWARD = ("down_proj",)


@dataclass
class IA3Config:
    """What IA³ adapts. Field meanings are PEFT's ``IA3Config``: ``target_modules`` and
    ``feedforward_modules`` (a tuple of names or a regex string; targets may also be "all-linear"),
    ``exclude_modules``. IA³ has no dropout, so there is no ``dropout`` attribute (the run sets one
    only on a configuration that has it, `engine.run.model.build_model`)."""

    target_modules: tuple[str, ...] | str = LLAMA_IA3_TARGETS
    feedforward_modules: tuple[str, ...] | str = LLAMA_IA3_FEEDFORWARD
    exclude_modules: tuple[str, ...] | str | None = None

    method = "ia3"  # the --peft name (`engine.adapters.methods`); a class attribute, not a field

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, set)):
                setattr(self, name, tuple(sorted(value) if isinstance(value, set) else value))
        if not self.target_modules:
            raise InputError("IA³ target_modules is empty: give module names (k_proj, ...) or 'all-linear'")
        if (isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple)
                and not set(self.feedforward_modules) <= set(self.target_modules)):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            raise InputError(f"IA³ feedforward_modules {extra} are not among target_modules "
                             f"{list(self.target_modules)} (PEFT requires a subset)")

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's ``_check_target_module_feedforward``: regex fullmatch, or the name ends with an entry."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(entry) for entry in ff)


def ia3_config_from_flags(flags: Any) -> IA3Config:
    """IA³'s configuration from a `engine.config.TrainConfig`: ``--target-modules all-linear`` (the
    flag's default) is PEFT's IA³ default for Llama (k_proj, v_proj, down_proj; down_proj
    feed-forward); an explicit comma list is taken as given, and its feed-forward modules are the
    entries whose last name is in PEFT's default feed-forward list (down_proj)."""
    if flags.target_modules == ALL_LINEAR:
        return IA3Config(LLAMA_IA3_TARGETS, LLAMA_IA3_FEEDFORWARD)
    targets = tuple(t.strip() for t in flags.target_modules.split(",") if t.strip())
    if not targets:
        raise InputError(f"--target-modules {flags.target_modules!r}: no module names")
    return IA3Config(targets, tuple(t for t in targets if t.split(".")[-1] in LLAMA_IA3_FEEDFORWARD))


def ia3_scale(x: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """x ⊙ l over the last axis, formed in fp32 and rounded once to x's dtype (PEFT's order):
    x (..., n), l (n,) -> (..., n)."""
    return (x.float() * l.float()).to(x.dtype)


class IA3Linear(FrozenBaseLinear, AdapterModule):
    """A frozen base linear (``nn.Linear`` or a ``QuantizedLinear``) with an IA³ vector ``ia3_l``, fp32:
    (out,) scaling the output, or (in,) scaling the input when ``feedforward``. Initialised to ones."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base)
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=torch.float32, device=_module_device(base)))
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        if self.feedforward:
            return self.base(ia3_scale(x, self.ia3_l))
        return ia3_scale(self.base(x), self.ia3_l)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def unwrapped(self) -> nn.Module:
        return self.base

    @torch.no_grad()
    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain linear computing the same: feed-forward W' = W diag(l) (columns scaled), else
        W' = diag(l) W and b' = b ⊙ l (rows and bias); formed in fp32 and rounded once to ``dtype``
        (default: the base's dtype; a quantized base onto its dequantized weight)."""
        weight, _ = dense_base_weight(self.base)
        l = self.ia3_l.detach().float().to(weight.device)
        linear = merged_linear(self.base, weight * (l[None, :] if self.feedforward else l[:, None]), dtype)
        if self.base.bias is not None and not self.feedforward:
            bias = self.base.bias.detach()
            linear.bias = nn.Parameter((bias.float() * l).to(dtype or bias.dtype), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, scales={self.ia3_l.shape[0]}"


def ia3_modules(model: nn.Module) -> dict[str, IA3Linear]:
    """Every `IA3Linear` of the model by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def find_ia3_targets(model: nn.Module, cfg: IA3Config) -> list[str]:
    """The linears `inject_ia3` would wrap, in model order (PEFT's target rules); InputError when a
    target matches nothing or a non-linear, or the model has adapters already."""
    if adapter_modules(model):
        raise InputError("the model already has adapters; load or inject only once")
    try:
        return find_targets(model, cfg)  # reads target_modules and exclude_modules only
    except InputError as err:
        raise InputError(str(err).replace("LoRA", "IA³")) from None


def inject_ia3(model: nn.Module, cfg: IA3Config) -> list[str]:
    """Replace each target linear by an `IA3Linear` owning it (l = ones); return the names."""
    names = find_ia3_targets(model, cfg)
    for name in names:
        replace_module(model, name, IA3Linear(model.get_submodule(name), cfg.is_feedforward(name)))
    return names
