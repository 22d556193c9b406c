"""Linear layer with a frozen e4m3 weight, its products in FP8: ``y = x · Wᵀ + b``.

With ``W = diag(s_w) · C`` (C (out, in) e4m3 codes, s_w (out,) fp32, `kernels.fp8`):

    forward   y  = fp8_mm(q(x), C) = (C_x · Cᵀ) ⊙ (s_x · s_wᵀ)           x (N, in) -> (N, out)
    backward  dx = dy · W = (dy ⊙ s_wᵀ) · C = fp8_mm(q(dy ⊙ s_wᵀ), Cᵀ)   (N, out) -> (N, in)

where ``q`` quantizes each row dynamically (`kernels.fp8_rows.quantize_rows`: C_x, s_x; a Triton
kernel on the GPU, a bounded fp32 scratch in torch ops elsewhere). In the backward
the weight's scales run along the contraction, so they are folded into dY's columns before dY is
quantized (a per-output-channel scale cannot be applied after a product over that channel), and
C takes no scale of its own. dL/db = Σ_tokens dy when the bias asks for it. The weight is frozen:
nothing else has a gradient, and nothing but a reference to the codes is saved (no x, no dense W);
the backward takes Cᵀ as a contiguous e4m3 copy (1 byte per weight, freed at once) because
``torch._scaled_mm`` wants its second operand column-major.

Shapes: x (..., in) fp32/bf16/fp16; returns (..., out) in x's dtype. The products run in FP8 on a
CUDA GPU of compute capability ≥ 8.9 with bf16 x, and as the fp32 emulation of the same rounding
elsewhere (`kernels.fp8.fp8_mm`); the LoRA update on top stays in x's dtype (`kernels.lora`).
Layout: reference -> autograd.Function -> public op. The module that stores a weight this way is
`models.quantized.FP8Linear`.
"""

from __future__ import annotations

import torch

from kernels.fp8 import FP8Tensor, fp8_mm, fp8_mm_ref
from kernels.fp8_rows import quantize_rows, quantize_rows_ref

# ----------------------------------------------------------------------------------------------
# 1. Reference: the forward and the dX of the backward, plain torch on the rounded operands
# ----------------------------------------------------------------------------------------------


def fp8_matmul_ref(x: torch.Tensor, q: FP8Tensor, mm=fp8_mm_ref, quantize=quantize_rows_ref) -> torch.Tensor:
    """``q(x) · Wᵀ`` for x (N, in): the forward product, fp32 sums of the e4m3 codes (by ``mm``,
    the operand quantized by ``quantize``)."""
    codes, scale = quantize(x)
    return mm(codes, scale, q.codes, q.scale, x.dtype)


def fp8_grad_input_ref(dy: torch.Tensor, q: FP8Tensor, mm=fp8_mm_ref, quantize=quantize_rows_ref) -> torch.Tensor:
    """``q(dy ⊙ s_wᵀ) · C`` for dy (N, out): dL/dx of the product, (N, in) in dy's dtype (by ``mm``,
    the operand quantized by ``quantize``)."""
    codes, scale = quantize(dy, q.scale)
    return mm(codes, scale, q.codes.t(), torch.ones(q.shape[1], device=dy.device), dy.dtype)


# ----------------------------------------------------------------------------------------------
# 2. The two products: the row quantizer's kernel, FP8 tensor cores where they run
# ----------------------------------------------------------------------------------------------


def fp8_matmul(x: torch.Tensor, q: FP8Tensor) -> torch.Tensor:
    """`fp8_matmul_ref` by `kernels.fp8_rows.quantize_rows` and `kernels.fp8.fp8_mm`: x (N, in) -> (N, out)."""
    return fp8_matmul_ref(x, q, fp8_mm, quantize_rows)


def fp8_grad_input(dy: torch.Tensor, q: FP8Tensor) -> torch.Tensor:
    """`fp8_grad_input_ref` by `kernels.fp8_rows.quantize_rows` and `kernels.fp8.fp8_mm`: dy (N, out) -> (N, in)."""
    return fp8_grad_input_ref(dy, q, fp8_mm, quantize_rows)


# ----------------------------------------------------------------------------------------------
# 3. autograd.Function: saves only the (already resident) codes and scales
# ----------------------------------------------------------------------------------------------


class FP8LinearFunction(torch.autograd.Function):
    """2-D core: x (N, in) -> y (N, out); gradients for x and the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: FP8Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.q = q  # the module's own buffers: no copy
        y = fp8_matmul(x, q)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = fp8_grad_input(dy, ctx.q) if ctx.needs_input_grad[0] else None
        d_bias = dy.sum(dim=0) if ctx.needs_input_grad[2] else None
        return dx, None, d_bias


# ----------------------------------------------------------------------------------------------
# 4. Public op
# ----------------------------------------------------------------------------------------------


def fp8_linear(x: torch.Tensor, q: FP8Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · Wᵀ + bias`` with both products in FP8 (module docstring): x (..., in) -> (..., out)."""
    if not isinstance(q, FP8Tensor):
        raise TypeError(f"q: expected an FP8Tensor, got {type(q).__name__}")
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"x: last dimension must be in_features={q.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = FP8LinearFunction.apply(x.reshape(-1, q.shape[1]), q, bias)
    return y.view(*x.shape[:-1], q.shape[0])
