"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small two-layer network after a
sublayer, added to that sublayer's output before the block's residual add.

For a sublayer output y (..., H) the adapter computes, with D (d, H), b_d (d,), U (H, d), b_u (H,):

    a = act(drop(y) D^T + b_d)            (..., d)     d = adapter_dim, the bottleneck
    y' = y + a U^T + b_u                  (..., H)

so the Llama block ``h = x + attn(norm(x)); out = h + mlp(norm(h))`` becomes
``h = x + A_attn(attn(norm(x))); out = h + A_mlp(mlp(norm(h)))`` with A(y) = y' above.
Placements: ``houlsby`` wraps both ``self_attn`` and ``mlp`` of every block, ``pfeiffer`` only ``mlp``.

Initialisation: U = 0 and b_u = 0 (so at init the model is exactly the base), D Kaiming-uniform
(``nn.Linear``'s default, bound 1/sqrt(H)) and b_d = 0. D must not start at zero: with U = 0 too,
every gradient of D and U would be zero (∂U = gᵀ a with a = act(b_d) = 0 for ReLU, ∂D ∝ U = 0).

Backward, for g = ∂L/∂y' and z = drop(y) D^T + b_d (dropout off, so drop(y) = y):

    ∂b_u = Σ g          ∂U = gᵀ a          ∂a = g U          ∂z = ∂a ⊙ act'(z)
    ∂b_d = Σ ∂z         ∂D = ∂zᵀ y         ∂y = g + ∂z D     (Σ over every token)

autograd derives it. D, U and the biases are fp32 master copies; the forward casts them to y's
dtype (bf16 in training on a GPU), as `engine.adapters.lora.LoRALinear` does, and autograd returns
their gradients in fp32. The sublayer is frozen and may be dense or quantized (its linears
`models.quantized.QuantizedLinear`s: NF4, int8, FP8): the adapter only sees its output.

Not mergeable: act makes the adapter a computation of its own, not a change of any base weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import AdapterModule
from engine.adapters.targets import replace_module
from engine.errors import InputError

PLACEMENTS = ("houlsby", "pfeiffer")  # engine.config.ADAPTER_PLACEMENTS
# which sublayers of a block each placement wraps
PLACEMENT_SUBLAYERS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class BottleneckConfig:
    """A bottleneck adapter: its inner size ``adapter_dim`` (d), where it goes (``placement``), its
    ``non_linearity`` (relu: AdapterHub's Pfeiffer default) and the dropout on its input (a
    training choice, 0 by default as in AdapterHub)."""

    adapter_dim: int = 64
    placement: str = "houlsby"
    non_linearity: str = "relu"
    dropout: float = 0.0

    method = "bottleneck"  # the --peft name (engine.adapters.methods); a class attribute, not a field

    def __post_init__(self) -> None:
        if isinstance(self.adapter_dim, bool) or not isinstance(self.adapter_dim, int) or self.adapter_dim < 1:
            raise InputError(f"adapter_dim must be a positive integer, got {self.adapter_dim!r}")
        if self.placement not in PLACEMENTS:
            raise InputError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise InputError(f"adapter non_linearity must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.non_linearity!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise InputError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")


class AdapterProjection(nn.Module):
    """``x W^T + b`` with W (out, in) and b (out,) in fp32, computed in x's dtype.

    Not an ``nn.Linear`` on purpose: what selects linears (LoRA's ``all-linear``, NF4 quantization)
    must not take an adapter's trainable layer for a base linear."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BottleneckAdapter(nn.Module, AdapterModule):
    """A frozen sublayer (a block's ``self_attn`` or ``mlp``) followed by a bottleneck adapter:
    ``forward(*args) = y + adapter(y)``, y = sublayer(*args) (the module docstring's formula).

    The sublayer's calling convention passes through untouched (attention's positions, mask and KV
    cache; the MLP's token chunks, `chunk_tokens`, which `models.llama.LlamaModel.mlp_chunk_tokens`
    sets on every block's ``mlp``). Parameters: ``adapter_down`` (D, b_d) and ``adapter_up`` (U, b_u).
    """

    mergeable = False

    def __init__(self, sublayer: nn.Module, hidden_size: int, adapter_dim: int, non_linearity: str = "relu",
                 dropout: float = 0.0, device: torch.device | str | None = None):
        super().__init__()
        if isinstance(sublayer, BottleneckAdapter):
            raise InputError("the sublayer already has a bottleneck adapter; inject or load only once")
        self.sublayer = sublayer
        for p in sublayer.parameters():
            p.requires_grad_(False)
        self.non_linearity, self.dropout = non_linearity, float(dropout)
        self.act = ACTIVATIONS[non_linearity]
        self.adapter_down = AdapterProjection(hidden_size, adapter_dim, device)
        self.adapter_up = AdapterProjection(adapter_dim, hidden_size, device)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))  # nn.Linear's: bound 1/sqrt(H)
        self.adapter_enabled = True

    @property
    def hidden_size(self) -> int:
        return self.adapter_down.in_features

    @property
    def adapter_dim(self) -> int:
        return self.adapter_down.out_features

    @property
    def chunk_tokens(self) -> int | None:
        """The wrapped MLP's token chunk size (`models.llama.LlamaMLP.chunk_tokens`)."""
        return self.sublayer.chunk_tokens

    @chunk_tokens.setter
    def chunk_tokens(self, tokens: int | None) -> None:
        self.sublayer.chunk_tokens = tokens

    def adapter(self, y: torch.Tensor) -> torch.Tensor:
        """a U^T + b_u with a = act(drop(y) D^T + b_d): what is added to y (..., H)."""
        x = F.dropout(y, self.dropout, training=True) if self.training and self.dropout > 0 else y
        return self.adapter_up(self.act(self.adapter_down(x)))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.sublayer(*args, **kwargs)
        if not self.adapter_enabled:
            return y
        return y + self.adapter(y)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"adapter_down.weight": self.adapter_down.weight, "adapter_down.bias": self.adapter_down.bias,
                "adapter_up.weight": self.adapter_up.weight, "adapter_up.bias": self.adapter_up.bias}

    def unwrapped(self) -> nn.Module:
        return self.sublayer

    def extra_repr(self) -> str:
        return f"adapter_dim={self.adapter_dim}, non_linearity={self.non_linearity}, dropout={self.dropout:g}"


BLOCK_SUBLAYER = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)")


def bottleneck_targets(model: nn.Module, placement: str) -> list[str]:
    """The sublayers a placement wraps (``model.layers.N.self_attn`` / ``.mlp``), in model order;
    InputError when the model has none or already has bottleneck adapters."""
    kinds = PLACEMENT_SUBLAYERS[placement]
    modules = dict(model.named_modules())
    if any(isinstance(m, BottleneckAdapter) for m in modules.values()):
        raise InputError("the model already has bottleneck adapters; inject or load only once")
    names = [n for n in modules if (m := BLOCK_SUBLAYER.fullmatch(n)) and m[1] in kinds]
    if not names:
        raise InputError(f"bottleneck placement {placement!r}: the model has no model.layers.N.{'/'.join(kinds)} "
                         "sublayers (a Llama decoder is expected)")
    return names


def inject_bottleneck(model: nn.Module, cfg: BottleneckConfig) -> list[str]:
    """Wrap each target sublayer in a `BottleneckAdapter` (D drawn from the global torch RNG);
    return the wrapped names. Freezes nothing else (`engine.adapters.targets.set_trainable` does)."""
    names = bottleneck_targets(model, cfg.placement)
    hidden = model.config.hidden_size
    device = model.model.embed_tokens.weight.device
    for name in names:
        sublayer = model.get_submodule(name)
        replace_module(model, name, BottleneckAdapter(sublayer, hidden, cfg.adapter_dim, cfg.non_linearity,
                                                      cfg.dropout, device))
    return names


def bottleneck_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """Every `BottleneckAdapter` of the model by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
