"""Per-output-channel absmax int8 weights (bitsandbytes' LLM.int8 storage), with a Triton dequantizer.

Format. A weight W (out, in) keeps, per output row o:

    absmax[o] = max_i |W[o, i]|                           (fp32; bitsandbytes calls it ``SCB``)
    code[o,i] = round(W[o, i] * (127 / absmax[o]))        (int8 in [-127, 127], round half to even)
    W[o, i]  ~= code[o, i] * absmax[o] * (1 / 127)        (two fp32 products, rounded once to dtype)

so the rounding error of an element is at most ``absmax[o] / 254``. The rounding is exactly that
of bitsandbytes' ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` (its torch path: the
product in fp32, ``torch.round``, and the reciprocal 1/127 as the fp32 constant it multiplies by),
so a bitsandbytes 8-bit checkpoint's ``weight`` (int8 codes) and ``SCB`` (absmax) are read as they
are (`models.bnb8_checkpoint`). A row of zeros has absmax 0 and codes 0 (bitsandbytes would divide
by zero there).

What we do not do: LLM.int8's outlier decomposition (input columns above a threshold computed in
fp16) and its int8 × int8 matmul. Our int8 is a storage format: the weight is dequantized to the
compute dtype and multiplied by cuBLAS, as NF4 is, so activations are never quantized (README).

Shapes: ``codes`` (out, in) int8, ``absmax`` (out,) fp32. Layout of this file: reference (quantize,
dequantize) -> Triton dequant kernel -> launcher -> public op. No autograd Function: the codes are
frozen; the gradient path through a frozen weight is `kernels.frozen.frozen_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch
from kernels.rounding import cast_rne
from kernels.weight_codes import RowCodes, check_dequantize_args, check_row_weight

INT8_MAX = 127
INV_127 = 7.874015718698502e-3  # the fp32 constant bitsandbytes multiplies by (1/127 rounded)


@dataclass
class Int8Tensor(RowCodes):
    """A weight in int8: codes (out, in) and one fp32 absmax per output row.

    ``dtype`` is the dtype the weight was quantized from (what it dequantizes to by default)."""

    absmax: torch.Tensor
    dtype: torch.dtype


def int8_bytes(out_features: int, in_features: int) -> int:
    """Bytes an `Int8Tensor` of this shape holds: one per weight plus an fp32 absmax per row."""
    return out_features * in_features + 4 * out_features


# ----------------------------------------------------------------------------------------------
# 1. Reference: quantization and dequantization in plain torch
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> Int8Tensor:
    """Row-wise absmax int8 of a (out, in) fp32/bf16/fp16 weight (module docstring), row by row
    in chunks so that no full-size fp32 copy of a large weight exists at once."""
    check_row_weight(weight)
    absmax = weight.abs().amax(dim=1).float()  # exact in fp32
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    # 127 / absmax in fp32, as bitsandbytes; a zero row gets factor 0 (codes 0) instead of 0 · inf
    factor = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))
    rows = max(1, (1 << 22) // weight.shape[1])  # 4M elements of fp32 work per chunk
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows].float() * factor[start:start + rows, None]
        codes[start:start + rows] = torch.round(block).to(torch.int8)
    return Int8Tensor(codes=codes, absmax=absmax, dtype=weight.dtype)


def int8_dequant_ref(q: Int8Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference dequantization: ``code * absmax * (1/127)`` in fp32, rounded once to ``dtype``."""
    return (q.codes.float() * q.absmax[:, None] * INV_127).to(dtype)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel: one program writes BLOCK consecutive outputs of the flat weight
# ----------------------------------------------------------------------------------------------

@triton.jit
def _int8_dequant_fwd_kernel(codes_ptr, absmax_ptr, out_ptr, n_elements, n_cols, inv_127,
                             ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    code = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.float32)
    scale = tl.load(absmax_ptr + idx // n_cols, mask=mask, other=0.0)
    value = (code * scale) * inv_127
    tl.store(out_ptr + idx, cast_rne(value, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------

_DEQUANT_BLOCK, _DEQUANT_WARPS = 1024, 4


def _int8_dequant_triton(q: Int8Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device) if out is None else out
    n = q.numel
    _int8_dequant_fwd_kernel[(triton.cdiv(n, _DEQUANT_BLOCK),)](
        q.codes, q.absmax, out, n, q.shape[1], INV_127, ROUND_BF16=dtype == torch.bfloat16,
        BLOCK=_DEQUANT_BLOCK, num_warps=_DEQUANT_WARPS, enable_fp_fusion=False)
    return out


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_int8_dequant_triton` can launch: every output dtype, for the largest weight."""
    cases = []
    for dtype in shapes.dtypes:
        args = dict(codes_ptr=torch.int8, absmax_ptr=torch.float32, out_ptr=dtype,
                    n_elements=shapes.intermediate * shapes.hidden, n_cols=shapes.hidden, inv_127=INV_127)
        constexprs = dict(ROUND_BF16=dtype == torch.bfloat16, BLOCK=_DEQUANT_BLOCK)
        cases.append(KernelCase("dequant", _int8_dequant_fwd_kernel, dtype, args, constexprs,
                                fixed_launch(_DEQUANT_WARPS), dict(enable_fp_fusion=False)))
    return cases


# ----------------------------------------------------------------------------------------------
# 4. Public op
# ----------------------------------------------------------------------------------------------

def dequantize_int8(q: Int8Tensor, dtype: torch.dtype = torch.bfloat16, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``dtype`` (out, in) tensor: Triton on CUDA (or when forced), else the reference.

    ``out``: a contiguous ``dtype`` tensor of ``q.shape`` on q's device to write into; returned."""
    check_dequantize_args(q, Int8Tensor, dtype, out)
    if use_triton(q.codes):
        return _int8_dequant_triton(q, dtype, out)
    dense = int8_dequant_ref(q, dtype)
    return dense if out is None else out.copy_(dense)
