"""Frozen base weights of every format behind one interface: dense, NF4, int8 and FP8.

A frozen weight (out, in) is a dense tensor in the compute dtype or one of the quantized formats:
`kernels.nf4.NF4Tensor` (QLoRA), `kernels.int8.Int8Tensor` (per-row absmax int8, bitsandbytes'
8-bit storage) or `kernels.fp8.FP8Tensor` (per-row scaled e4m3). The LoRA kernels, the grouped
projections and DoRA call only these functions, so a new format is one entry here:

* `dequantize_frozen` — the dense weight in a dtype (NF4 and int8 by their Triton kernels on a GPU);
* `base_product` / `base_grad_input` — ``x · Wᵀ (+ b)`` and ``dy · W``, the two products a frozen
  linear takes part in. For the dequantized formats they are cuBLAS matmuls of the dense weight
  (`base_product` returns it for the backward to reuse, or None when it is to be dequantized again
  there); for FP8 they are the FP8 products of `kernels.fp8_linear`, which quantize the
  activations (or dY) too, so they have no dense weight to share;
* `frozen_linear` — the base layer alone with its autograd, used by `models.quantized`.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from kernels.backend import use_triton
from kernels.fp8 import FP8Tensor, dequantize_fp8, fp8_dequant_ref
from kernels.fp8_linear import fp8_grad_input, fp8_linear, fp8_matmul
from kernels.int8 import Int8Tensor, dequantize_int8, int8_dequant_ref
from kernels.nf4 import NF4Tensor, dequantize_nf4, keeping_dequantized, nf4_dequant_ref

QuantizedWeight = Union[NF4Tensor, Int8Tensor, FP8Tensor]
FrozenWeight = Union[torch.Tensor, QuantizedWeight]
QUANTIZED_TYPES = (NF4Tensor, Int8Tensor, FP8Tensor)

_DEQUANT_REF = {NF4Tensor: nf4_dequant_ref, Int8Tensor: int8_dequant_ref, FP8Tensor: fp8_dequant_ref}


def is_quantized(weight) -> bool:
    """Whether ``weight`` is one of the quantized formats (not a dense tensor)."""
    return isinstance(weight, QUANTIZED_TYPES)


def storage(weight: QuantizedWeight) -> torch.Tensor:
    """The tensor holding a quantized weight's codes (its device and the Triton decision follow it)."""
    return weight.packed if isinstance(weight, NF4Tensor) else weight.codes


def dequantize_frozen(weight: FrozenWeight, dtype: torch.dtype, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) weight dense in ``dtype``: a dense one as it is (cast if needed), a quantized
    one dequantized (into ``out`` when given, a contiguous tensor of its shape)."""
    if isinstance(weight, torch.Tensor):
        dense = weight if weight.dtype == dtype else weight.to(dtype)
        return dense if out is None else out.copy_(dense)
    if isinstance(weight, NF4Tensor):
        return dequantize_nf4(weight, dtype, out=out)
    if isinstance(weight, Int8Tensor):
        return dequantize_int8(weight, dtype, out=out)
    if isinstance(weight, FP8Tensor):
        return dequantize_fp8(weight, dtype, out=out)
    raise TypeError(f"weight: expected a tensor, NF4Tensor, Int8Tensor or FP8Tensor, got {type(weight).__name__}")


def dequant_reference(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The plain-torch dequantization of a quantized weight (the definition its kernel matches)."""
    return _DEQUANT_REF[type(weight)](weight, dtype)


def base_product(x: torch.Tensor, weight: FrozenWeight, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = x · Wᵀ (+ bias)`` for x (N, in) -> (N, out), and what the backward may keep of W:
    the dense weight (a dense base, or a dequantized one under `kernels.nf4.keep_dequantized`), or
    None (to dequantize again in `base_grad_input`; always None for FP8)."""
    if isinstance(weight, FP8Tensor):
        y = fp8_matmul(x, weight)
        return (y if bias is None else y + bias), None
    w = dequantize_frozen(weight, x.dtype)
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())  # cuBLAS (N, out)
    keep = isinstance(weight, torch.Tensor) or keeping_dequantized()
    return y, (w if keep else None)


def base_grad_input(dy: torch.Tensor, weight: FrozenWeight, dense: torch.Tensor | None) -> torch.Tensor:
    """``dL/dx = dy · W`` for dy (N, out) -> (N, in), from the dense W `base_product` kept, or
    from the frozen weight itself."""
    if isinstance(weight, FP8Tensor):
        return fp8_grad_input(dy, weight)
    w = dense if dense is not None else dequantize_frozen(weight, dy.dtype)
    return torch.mm(dy, w.to(dy.dtype))  # cuBLAS (N, in)


class _FrozenLinearFunction(torch.autograd.Function):
    """x (N, in) -> (N, out) through a dequantized frozen weight: saves only a reference to the
    quantized weight (the module's own buffers) and dequantizes again for dX — except under
    `kernels.nf4.keep_dequantized` (checkpointing), where the recompute's dense copy feeds the
    backward that follows at once (2 dequantizations per step instead of 3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        y, dense = base_product(x, weight, bias)
        ctx.save_for_backward(dense)
        ctx.weight = None if dense is not None else weight
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (dense,) = ctx.saved_tensors
        dx = base_grad_input(dy, ctx.weight, dense) if ctx.needs_input_grad[0] else None
        d_bias = dy.sum(dim=0) if ctx.needs_input_grad[2] else None
        return dx, None, d_bias


def frozen_linear(x: torch.Tensor, weight: FrozenWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · Wᵀ + bias`` through a frozen weight: x (..., in) -> (..., out) in x's dtype; gradients
    for x (and a bias that asks). A dense weight by ``F.linear``; FP8 by
    `kernels.fp8_linear.fp8_linear` everywhere; the other formats by the Function above where
    Triton runs, else by autograd over the reference."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if isinstance(weight, FP8Tensor):
        return fp8_linear(x, weight, bias)
    if use_triton(x, storage(weight)):
        n_out, n_in = weight.shape
        return _FrozenLinearFunction.apply(x.reshape(-1, n_in), weight, bias).view(*x.shape[:-1], n_out)
    return F.linear(x, dequant_reference(weight, x.dtype), bias)
