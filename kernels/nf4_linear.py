"""Linear layer with a frozen NF4 weight: ``y = x · dequant(Q)ᵀ + b``.

Forward: ``W = dequantize_nf4(Q, x.dtype)`` (out, in), then ``y = x @ Wᵀ + b``; W is a temporary,
freed as soon as the matmul returns. Backward: the weight is frozen, so only

    dL/dx = dL/dy · W          (..., out) @ (out, in) -> (..., in)
    dL/db = sum over tokens of dL/dy          (only if the bias asks for a gradient)

are needed, and W is dequantized again for dL/dx instead of being saved: keeping the dense W
alive between forward and backward would cost 2 bytes per weight in bf16 for every layer — the
memory QLoRA exists to save — while recomputing it is one memory-bound pass over 0.5 byte per
weight. Nothing about ``x`` is saved (no weight gradient needs it).

Shapes: x (..., in) fp32/bf16/fp16; Q of shape (out, in); bias (out,) or None -> (..., out) in
x.dtype. The matmul runs in x.dtype (the compute dtype), whatever dtype Q was quantized from.

Layout: reference -> (the Triton dequant kernel lives in kernels/nf4.py) -> autograd.Function ->
public op -> `NF4Linear` module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.backend import use_triton
from kernels.nf4 import FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4, nf4_dequant_ref, quantize_nf4
from kernels.nf4 import from_bnb_state_dict as nf4_from_bnb_state_dict

# ----------------------------------------------------------------------------------------------
# 1. Reference (differentiated by autograd; it keeps the dense W for backward, fine for tests)
# ----------------------------------------------------------------------------------------------


def nf4_linear_ref(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, nf4_dequant_ref(q, x.dtype), bias)


# ----------------------------------------------------------------------------------------------
# 2. autograd.Function: saves only the (already resident) NF4 weight, recomputes W in backward
# ----------------------------------------------------------------------------------------------


class _NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Only a reference to Q (kept by the module anyway) is saved; no dense W, no x.
        ctx.q = q
        return F.linear(x, dequantize_nf4(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.q, grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, None, grad_bias


# ----------------------------------------------------------------------------------------------
# 3. Public op
# ----------------------------------------------------------------------------------------------


def _check_inputs(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q: expected an NF4Tensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q: expected a 2-D (out, in) weight, got shape {tuple(q.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} not supported, expected float32, bfloat16 or float16")
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"x: last dimension must be in_features={q.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (q.shape[0],):
        raise ValueError(f"bias: expected shape ({q.shape[0]},), got {tuple(bias.shape)}")


def nf4_linear(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(q)ᵀ + bias`` (see the module docstring); gradients for x (and bias) only."""
    _check_inputs(x, q, bias)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if use_triton(x, q.packed):
        return _NF4LinearFunction.apply(x, q, bias)
    return nf4_linear_ref(x, q, bias)


# ----------------------------------------------------------------------------------------------
# 4. Module
# ----------------------------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4.

    The NF4 tensors are buffers (``weight_packed``, ``weight_absmax``, ``weight_quant_map`` and,
    with double quantization, ``weight_nested_absmax``, ``weight_nested_quant_map``,
    ``weight_offset``), so ``.to()`` and ``state_dict()`` carry them; ``weight_nf4`` reassembles
    the `NF4Tensor`. The bias, if any, is a Parameter with ``requires_grad=False``.
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

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str,
                            bias: torch.Tensor | None = None) -> NF4Linear:
        """Build from bitsandbytes' Linear4bit keys under ``prefix``; ``bias`` defaults to
        ``state_dict[prefix + "bias"]`` when present."""
        q = nf4_from_bnb_state_dict(state_dict, prefix)
        if bias is None:
            bias = state_dict.get((prefix if not prefix or prefix.endswith(".") else prefix + ".") + "bias")
        return cls(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight_nf4, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={hasattr(self, 'weight_nested_absmax')}")
