"""FP8 (e4m3) weights with per-output-channel scales, and the scaled FP8 product of two row-scaled operands.

Format. A weight W (out, in) keeps, per output row o:

    scale[o]  = max_i |W[o, i]| / 448                      (fp32; 448 is e4m3's largest finite value)
    code[o,i] = e4m3(W[o, i] / scale[o])                   (torch.float8_e4m3fn, round to nearest even)
    W[o, i]  ~= code[o, i] · scale[o]                      (fp32, rounded once to the compute dtype)

e4m3 has 3 mantissa bits: the relative error of an element is at most 2⁻⁴ (6 %), finer near a
row's maximum than int8 and coarser near zero (its subnormals stop at 2⁻⁹ · scale). A row of zeros
gets scale 1 and codes 0.

Activations are quantized the same way per row, dynamically, inside each product
(`kernels.fp8_rows.quantize_rows`): ``a ≈ e4m3(a / s_a) · s_a`` with ``s_a = max|a_row| / 448``
(a floor of ``MIN_SCALE``, fp32's smallest normal, keeps an all-zero row finite). The product of
two row-scaled operands is

    fp8_mm(A, s_a, B, s_b) = (A_codes · B_codesᵀ) ⊙ (s_a · s_bᵀ)      A (M, K), B (N, K) -> (M, N)

summed in fp32: on a CUDA GPU of compute capability ≥ 8.9 by ``torch._scaled_mm`` (e4m3 tensor
cores, row-wise scales, bf16 output; M needs no padding, K and N must be multiples of 16), elsewhere by an fp32 matmul of the same codes (`fp8_mm_ref`),
which rounds every operand exactly as the GPU does and differs only in summation order, so the
CPU tests check the numerics of the GPU path. The linear layer built on it, forward and dX
backward, is `kernels.fp8_linear`.

Shapes: ``codes`` (out, in) float8_e4m3fn, ``scale`` (out,) fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.weight_codes import RowCodes, check_dequantize_args, check_row_weight

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# The floor of an activation row's scale: fp32's smallest normal, so only an all-zero row (or one
# below 448 · 2⁻¹²⁶) meets it. A larger floor would put a row of small but real values (gradient
# rows of a token-normalized loss reach 1e-11) on a coarser grid than its own max gives, and make
# the codes depend on the loss's scale: DDP / FSDP2 scale the loss by the world size, so such a
# floor made 2 ranks round otherwise than one process.
MIN_SCALE = torch.finfo(torch.float32).tiny


@dataclass
class FP8Tensor(RowCodes):
    """A weight in e4m3: codes (out, in) and one fp32 scale per output row; ``dtype`` is the
    dtype the weight was quantized from (what it dequantizes to by default)."""

    scale: torch.Tensor
    dtype: torch.dtype


def fp8_bytes(out_features: int, in_features: int) -> int:
    """Bytes an `FP8Tensor` of this shape holds: one per weight plus an fp32 scale per row."""
    return out_features * in_features + 4 * out_features


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor) -> FP8Tensor:
    """Row-wise scaled e4m3 of a (out, in) fp32/bf16/fp16 weight (module docstring)."""
    check_row_weight(weight)
    absmax = weight.abs().amax(dim=1).float()
    scale = torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))
    codes = torch.empty(weight.shape, dtype=E4M3, device=weight.device)
    rows = max(1, (1 << 22) // weight.shape[1])  # 4M elements of fp32 work per chunk
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows].float() / scale[start:start + rows, None]
        codes[start:start + rows] = block.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return FP8Tensor(codes=codes, scale=scale, dtype=weight.dtype)


def fp8_dequant_ref(q: FP8Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``code · scale`` in fp32, rounded once to ``dtype``: (out, in)."""
    return (q.codes.float() * q.scale[:, None]).to(dtype)


def dequantize_fp8(q: FP8Tensor, dtype: torch.dtype = torch.bfloat16, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``dtype`` (out, in) tensor (one elementwise pass; merging and DoRA's norms use it)."""
    check_dequantize_args(q, FP8Tensor, dtype, out)
    dense = fp8_dequant_ref(q, dtype)
    return dense if out is None else out.copy_(dense)


def fp8_mm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``(a · bᵀ) ⊙ (a_scale · b_scaleᵀ)`` in fp32 from e4m3 codes a (M, K), b (N, K), scales
    (M, 1), (N,) or (N, 1): (M, N) in ``out_dtype``."""
    return (a.float() @ b.float().t() * a_scale * b_scale.reshape(1, -1)).to(out_dtype)


def scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs e4m3 row-wise products on ``device`` (CUDA, cc ≥ 8.9);
    asked once per device (no per-call driver query in a training step)."""
    return device.type == "cuda" and _fp8_tensor_cores(device.index if device.index is not None
                                                       else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _fp8_tensor_cores(index: int) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_mm_ref`'s product, by ``torch._scaled_mm`` where it runs (module docstring) and the
    output is bf16 (`scaled_mm_laid_out`; K and N must be multiples of 16: Llama's are)."""
    k, n = a.shape[1], b.shape[0]
    if not (out_dtype == torch.bfloat16 and scaled_mm_available(a.device) and k % 16 == 0 and n % 16 == 0):
        return fp8_mm_ref(a, a_scale, b, b_scale, out_dtype)
    return scaled_mm_laid_out(a, a_scale, b, b_scale, out_dtype, torch._scaled_mm)


def scaled_mm_laid_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       out_dtype: torch.dtype, scaled_mm: Callable) -> torch.Tensor:
    """``scaled_mm`` (``torch._scaled_mm``) on the operands laid out as it wants them: a (M, K)
    row-major, the second operand bᵀ (K, N) column-major — b row-major (N, K) gives it as a view,
    any other b (the backward's Cᵀ) one contiguous copy first — and the scales (M, 1), (1, N) fp32."""
    b_col = b.t() if b.stride(1) == 1 else b.contiguous().t()
    return scaled_mm(a.contiguous(), b_col, scale_a=a_scale.contiguous(), scale_b=b_scale.reshape(1, -1).contiguous(),
                     out_dtype=out_dtype)
