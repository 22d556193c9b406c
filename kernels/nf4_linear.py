"""Linear layer with a frozen NF4 weight: ``y = x · dequant(Q)ᵀ + b``.

Forward: ``W = dequantize_nf4(Q, x.dtype)`` (out, in), then ``y = x @ Wᵀ + b``; W is a temporary,
freed as soon as the matmul returns. Backward: the weight is frozen, so only

    dL/dx = dL/dy · W          (..., out) @ (out, in) -> (..., in)
    dL/db = sum over tokens of dL/dy          (only if the bias asks for a gradient)

are needed, and W is dequantized again for dL/dx instead of being saved (except under gradient
checkpointing, `kernels.nf4.keep_dequantized`: the recompute's copy feeds the backward at once): keeping the dense W
alive between forward and backward would cost 2 bytes per weight in bf16 for every layer — the
memory QLoRA exists to save — while recomputing it is one memory-bound pass over 0.5 byte per
weight. Nothing about ``x`` is saved (no weight gradient needs it).

Shapes: x (..., in) fp32/bf16/fp16; Q of shape (out, in); bias (out,) or None -> (..., out) in
x.dtype. The matmul runs in x.dtype (the compute dtype), whatever dtype Q was quantized from.

Layout: reference -> (the Triton dequant kernel lives in kernels/nf4.py; the autograd.Function,
shared with int8, in kernels/frozen.py) -> public op. The module that stores a weight this way is
`models.quantized.NF4Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.frozen import frozen_linear
from kernels.nf4 import NF4Tensor, nf4_dequant_ref
from kernels.weight_codes import FLOAT_DTYPES

# ----------------------------------------------------------------------------------------------
# 1. Reference (differentiated by autograd; it keeps the dense W for backward, fine for tests)
# ----------------------------------------------------------------------------------------------


def nf4_linear_ref(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, nf4_dequant_ref(q, x.dtype), bias)


# ----------------------------------------------------------------------------------------------
# 2. Public op (its autograd.Function is `kernels.frozen`'s, shared by every dequantized format:
#    it saves only the already resident NF4 weight and dequantizes W again in backward)
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
    return frozen_linear(x, q, bias)

