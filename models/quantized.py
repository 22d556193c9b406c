"""Frozen base weights stored in NF4 at run time: the `NF4Linear` module, which linears QLoRA
quantizes (`should_quantize`, the one rule), and whole-model conversion both ways.

Quantization has two phases: the pure functions of `kernels.nf4` (quantize / dequantize an
`NF4Tensor`), then this module, which swaps ``nn.Linear`` modules for `NF4Linear`s (or back).
The loader quantizes tensor by tensor while reading a checkpoint (`models.loading`), so a model
never exists dense on the device; `quantize_linears` converts a model already in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.nf4 import NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4, quantize_nf4
from kernels.nf4_linear import nf4_linear


def should_quantize(weight_name: str) -> bool:
    """Whether a checkpoint tensor is a decoder-block linear weight that QLoRA stores in NF4.

    ``model.layers.N.<...>_proj.weight``: the attention and MLP projections; embeddings, norms and
    the output head stay in full precision (as in QLoRA and transformers' bitsandbytes path).
    """
    return weight_name.startswith("model.layers.") and weight_name.endswith("_proj.weight")


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: ``y = x · dequant(Q)ᵀ + b``.

    The NF4 tensors are buffers (``weight_packed``, ``weight_absmax``, ``weight_quant_map`` and,
    with double quantization, ``weight_nested_absmax``, ``weight_nested_quant_map``,
    ``weight_offset``), so ``.to()`` and ``state_dict()`` carry them; ``weight_nf4`` reassembles
    the `NF4Tensor`. The bias, if any, is a Parameter with ``requires_grad=False``. The product
    is `kernels.nf4_linear.nf4_linear` (no dense weight kept for the backward).
    """

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"q: expected a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_dtype, self.nested_blocksize = q.blocksize, q.dtype, q.nested_blocksize
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_quant_map", q.code)
        if q.double_quant:
            self.register_buffer("weight_nested_absmax", q.nested_absmax)
            self.register_buffer("weight_nested_quant_map", q.nested_code)
            self.register_buffer("weight_offset", q.offset)
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight_nf4(self) -> NF4Tensor:
        nested = hasattr(self, "weight_nested_absmax")
        return NF4Tensor(
            packed=self.weight_packed, absmax=self.weight_absmax, blocksize=self.blocksize,
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
            code=self.weight_quant_map,
            nested_absmax=self.weight_nested_absmax if nested else None,
            nested_code=self.weight_nested_quant_map if nested else None,
            offset=self.weight_offset if nested else None,
            nested_blocksize=self.nested_blocksize if nested else NESTED_BLOCKSIZE,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize a dense ``nn.Linear`` (its weight in its own dtype) into an `NF4Linear`."""
        q = quantize_nf4(linear.weight.detach().contiguous(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantized weight in ``dtype`` (default: the dtype the
        weight was quantized from); frozen like this layer."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantize_nf4(self.weight_nf4, dtype=dtype or self.weight_dtype),
                                     requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype or self.bias.dtype), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight_nf4, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={hasattr(self, 'weight_nested_absmax')}")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule ``name``, in the same train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module.train(getattr(parent, child).training))


def quantize_linears(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> list[str]:
    """Replace every dense ``nn.Linear`` that `should_quantize` selects by an `NF4Linear`; return
    the names replaced (QLoRA on a model already in memory)."""
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and should_quantize(name + ".weight"):
            _replace(model, name, NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant))
            converted.append(name)
    return converted


@torch.no_grad()
def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every `NF4Linear` by a dense ``nn.Linear`` with its dequantized weight in ``dtype``
    (default: the dtype it was quantized from); return the names replaced."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            _replace(model, name, module.to_linear(dtype))
            names.append(name)
    return names
