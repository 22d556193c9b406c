"""LoRA by explicit module replacement: configuration, `LoRALinear`, injection, merge, QLoRA bases.

A LoRA linear computes, for a frozen base weight W (out, in) and trainable A (r, in), B (out, r):

    y = x W^T + b + s * dropout(x) A^T B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

as in PEFT, so our adapters and PEFT's are interchangeable. `inject_lora` swaps the named
`nn.Linear` (or `NF4Linear`, for QLoRA) modules of a model for `LoRALinear`s that own them; nothing
is patched. Module names follow HF's tree (``model.layers.0.self_attn.q_proj``), so the target
rules below are PEFT's:

* ``target_modules = "all-linear"``: every linear layer except the output head ``lm_head``;
* a list of names: a module matches when its full name equals an entry or ends in ``.entry``;
* any other string: a regular expression that must match the full module name (``re.fullmatch``).

``rank_pattern`` / ``alpha_pattern`` (PEFT's per-module overrides: pattern -> r / alpha) apply to
the first pattern ``p`` for which ``(.*\\.)?(p)$`` matches the module name.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.errors import InputError
from kernels.lora import lora_linear
from kernels.nf4 import dequantize_nf4
from kernels.nf4_linear import NF4Linear

ALL_LINEAR = "all-linear"
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_HEAD = "lm_head"


@dataclass
class LoRAConfig:
    """What to adapt and how. Field meanings match PEFT's ``LoraConfig`` (``alpha`` = ``lora_alpha``)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, set)):
            self.target_modules = tuple(sorted(self.target_modules) if isinstance(self.target_modules, set)
                                        else self.target_modules)
        if isinstance(self.exclude_modules, (list, set)):
            self.exclude_modules = tuple(self.exclude_modules)
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


class LoRALinear(nn.Module):
    """A frozen base linear (dense ``nn.Linear`` or ``NF4Linear``) plus a trainable low-rank update.

    Parameters: ``lora_A`` (r, in) and ``lora_B`` (out, r), kept in fp32 (the optimizer's master
    copy); the kernel computes with them in the input's dtype. Initialisation is PEFT's: A ~ Kaiming
    uniform with a = sqrt(5) (bound 1/sqrt(in)), B = 0, so at init the layer equals its base.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        device = _module_device(base)
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.scale = lora_scale(r, float(alpha), use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.adapter_enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def base_weight(self):
        """The frozen weight the kernel takes: a dense (out, in) tensor or an NF4Tensor."""
        return self.base.weight_nf4 if isinstance(self.base, NF4Linear) else self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        # The kernel casts the fp32 master A, B to x's dtype itself and returns their grads in fp32.
        return lora_linear(x, self.base_weight(), self.lora_A, self.lora_B, self.scale,
                           dropout_p=self.dropout, training=self.training, bias=self.base.bias)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * B A, the (out, in) update in fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}"


def _module_device(module: nn.Module) -> torch.device:
    if isinstance(module, NF4Linear):
        return module.weight_nf4.device
    return module.weight.device


# ----------------------------------------------------------------------------- target selection

def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear))


def _is_excluded(cfg: LoRAConfig, name: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return any(name == e or name.endswith("." + e) for e in ex)


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the modules `inject_lora` would replace, in model order; nothing is changed.

    Raises InputError when a target matches no module, matches a module that is not a linear
    layer, or selects the output head (its weight is read directly by the fused loss).
    """
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALinear) for m in modules.values()):
        raise InputError("the model already has LoRA adapters; load or inject only once")
    tm = cfg.target_modules
    if tm == ALL_LINEAR:
        names = [n for n, m in modules.items() if _is_linear(m) and n.split(".")[-1] != OUTPUT_HEAD]
        if not names:
            raise InputError("target_modules='all-linear' matched no linear layer in the model")
    elif isinstance(tm, str):
        names = [n for n in modules if n and re.fullmatch(tm, n)]
        if not names:
            raise InputError(f"target_modules regex {tm!r} matches no module name (it must match the whole "
                             f"name, e.g. 'model.layers.0.self_attn.q_proj')")
    else:
        names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in tm)]
        for target in tm:
            if not any(n == target or n.endswith("." + target) for n in names):
                available = sorted({n.split(".")[-1] for n, m in modules.items() if _is_linear(m)})
                raise InputError(f"LoRA target module {target!r} matches no module in the model; "
                                 f"linear layers are named {', '.join(available)}")
    names = [n for n in names if not _is_excluded(cfg, n)]
    for n in names:
        if n.split(".")[-1] == OUTPUT_HEAD:
            raise InputError(f"LoRA on the output head {n!r} is not supported (the loss reads its weight directly)")
        if not _is_linear(modules[n]):
            raise InputError(f"LoRA target {n!r} is a {type(modules[n]).__name__}, not a linear layer")
    if not names:
        raise InputError("every LoRA target module is excluded by exclude_modules")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the one named ``name``, in the same train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module.train(getattr(parent, child).training))


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace each target linear by a `LoRALinear` owning it; return the replaced names.

    Uses the global torch RNG for A's initialisation (seed it for reproducible runs). Freezes
    nothing else: call `set_trainable` to make the LoRA weights the only trainable ones.
    """
    names = find_targets(model, cfg)
    for name in names:
        base = model.get_submodule(name)
        r, alpha = cfg.rank_for(name), cfg.alpha_for(name)
        _set_submodule(model, name, LoRALinear(base, r, alpha, cfg.dropout, cfg.use_rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` of the model by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters by name (``<module>.lora_A`` / ``<module>.lora_B``), in model order."""
    params: dict[str, nn.Parameter] = {}
    for name, m in lora_modules(model).items():
        params[f"{name}.lora_A"] = m.lora_A
        params[f"{name}.lora_B"] = m.lora_B
    return params


def set_trainable(model: nn.Module) -> int:
    """Freeze everything but the LoRA weights; return the number of trainable elements."""
    lora = {id(p) for p in adapter_params(model).values()}
    if not lora:
        raise ValueError("set_trainable: the model has no LoRA adapters (call inject_lora first)")
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block every LoRALinear computes its base only (DPO's reference model)."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise ValueError("disable_adapters: the model has no LoRA adapters")
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, was in zip(modules, previous):
            m.adapter_enabled = was


# ----------------------------------------------------------------------------- merge and quantization

@dataclass
class MergeReport:
    merged: list[str]  # modules whose LoRA update was folded into the weight
    dequantized: list[str]  # NF4 bases turned dense (merged ones onto their dequantized weight)

    def summary(self) -> str:
        text = f"merged LoRA into {len(self.merged)} linear layers"
        if self.dequantized:
            text += (f"; the base was NF4: {len(self.dequantized)} layers were dequantized and the adapter "
                     f"merged onto the dequantized weights (they carry NF4 rounding, not the original weights)")
        return text


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype | None = None) -> MergeReport:
    """Fold W' = W + s B A into each base and put a plain ``nn.Linear`` back in place of the LoRALinear.

    The sum is formed in fp32 and rounded once to ``dtype`` (default: the base's dtype; for an
    NF4 base, the dtype it was quantized from); an NF4 base is dequantized first.
    """
    report = MergeReport(merged=[], dequantized=[])
    for name, m in lora_modules(model).items():
        base = m.base
        if isinstance(base, NF4Linear):
            q = base.weight_nf4
            weight, out_dtype = dequantize_nf4(q, dtype=torch.float32), q.dtype
            report.dequantized.append(name)
        else:
            weight, out_dtype = base.weight.float(), base.weight.dtype
        merged = (weight + m.delta_weight().to(weight.device)).to(dtype or out_dtype)
        linear = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype or base.bias.dtype), requires_grad=False)
        _set_submodule(model, name, linear)
        report.merged.append(name)
    if not report.merged:
        raise ValueError("merge: the model has no LoRA adapters")
    return report


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every `NF4Linear` by a dense ``nn.Linear`` with its dequantized weight in ``dtype``
    (default: the dtype it was quantized from)."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            q = module.weight_nf4
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(dequantize_nf4(q, dtype=dtype or q.dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(dtype or module.bias.dtype), requires_grad=False)
            _set_submodule(model, name, linear)
            names.append(name)
    return names


def should_quantize(weight_name: str) -> bool:
    """Whether a checkpoint tensor is a decoder-block linear weight that QLoRA stores in NF4.

    ``model.layers.N.<...>_proj.weight``: the attention and MLP projections; embeddings, norms and
    the output head stay in full precision. The loader uses this to quantize layer by layer.
    """
    return weight_name.startswith("model.layers.") and weight_name.endswith("_proj.weight")


def quantize_model_nf4(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> list[str]:
    """Convert every decoder-block linear (also those inside LoRALinears) to an `NF4Linear`; return names."""
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if isinstance(module.base, nn.Linear):
                module.base = NF4Linear.from_linear(module.base, blocksize=blocksize,
                                                    double_quant=double_quant).train(module.training)
                converted.append(name)
        elif isinstance(module, nn.Linear) and should_quantize(name + ".weight"):
            _set_submodule(model, name, NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant))
            converted.append(name)
    return converted
