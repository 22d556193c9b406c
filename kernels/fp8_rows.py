"""Dynamic per-row e4m3 quantization of an operand, the first step of every FP8 product.

For a (M, K) operand ``a`` and an optional fp32 column scale c (K,), with ``v = a ⊙ c`` formed
in fp32 (v = a without c):

    s[m]      = max(max_k |v[m, k]| / 448, MIN_SCALE)                    (M, 1) fp32
    code[m,k] = e4m3(clamp(v[m, k] / s[m], -448, 448))                   (M, K) float8_e4m3fn

e4m3 rounds to nearest, ties to even; 448 is its largest finite value and MIN_SCALE
(`kernels.fp8`) keeps an all-zero row finite. The forward of an FP8 linear quantizes x this way
(no c), its dX backward quantizes dY with the weight's row scales as c (`kernels.fp8_linear`).

Why a kernel. In torch ops the quantization is a cast to an fp32 scratch and five passes over
it (|·|, max, divide, clamp, the cast to e4m3), about 40 bytes of traffic per bf16 element (48
with dY's column scale); the kernel reads the operand twice (the row max, then the codes; the
second read mostly from L2) and writes one byte: 5 bytes. An estimate, not a measurement: a
Llama-3-8B block at 8192 tokens quantizes 8192 × 38,912 elements in its forward (x for each of
q, k, v, gate and up, and for o and down), 12.8 GB in torch ops, about 3.8 ms at an H100's
3.35 TB/s — as long as the block's 3.6 TFLOP of e4m3 products take at 1,000 TFLOP/s. The kernel
moves 1.6 GB of it. ``python -m bench.bench_fp8_rows`` measures both on a GPU.

Rounding is done on the bits, so that the interpreter and every GPU give torch's cast exactly:
for |y| ≥ 2⁻⁶ (normal e4m3) the fp32 mantissa is rounded to 3 bits by the carry trick and the
exponent re-biased (127 → 7); below, the value is a multiple of 2⁻⁹ (subnormal e4m3), rounded by
adding and subtracting 2²³ to ``|y| · 2⁹`` (fp32's own round to nearest even). Both divisions are
``div_rn`` (IEEE division: Triton's ``/`` may lower to an approximate one), and no multiply is
fused into an add (``enable_fp_fusion=False``), so every operation rounds as torch's. A NaN in a row makes
that row's scale NaN and its codes NaN (0x7F), as in torch; the training step's non-finite guard
then skips the step.

Shapes: a (M, K) fp32/bf16/fp16, any row stride (another column stride than 1 is copied first);
column scale (K,) fp32.
Returns (codes (M, K) float8_e4m3fn, scales (M, 1) fp32). Layout: reference -> kernel -> launcher
-> public op (no autograd: the codes are an operand of a product, never differentiated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.fp8 import E4M3, E4M3_MAX, MIN_SCALE
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch
from kernels.weight_codes import FLOAT_DTYPES

ROW_CHUNK_ELEMENTS = 1 << 24  # the reference's fp32 scratch: at most 64 MiB at a time

# ----------------------------------------------------------------------------------------------
# 1. Reference: plain torch, through a bounded fp32 scratch
# ----------------------------------------------------------------------------------------------


def quantize_rows_ref(a: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's quantization in torch ops. Rows go through one fp32 scratch block of
    at most `ROW_CHUNK_ELEMENTS` at a time, so the operand never has a full fp32 copy: the codes are
    the only full-size tensor made (1 byte per element)."""
    m, k = a.shape
    codes = torch.empty((m, k), dtype=E4M3, device=a.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=a.device)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, m, rows):
        v = a[start:start + rows].to(torch.float32, copy=True)  # (rows, K) scratch, never a view of a
        if col_scale is not None:
            v.mul_(col_scale)
        s = (v.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_(min=MIN_SCALE)
        codes[start:start + rows] = v.div_(s).clamp_(-E4M3_MAX, E4M3_MAX)
        scale[start:start + rows] = s
    return codes, scale


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel: one program per row, two sweeps of BLOCK columns
# ----------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_bits(y):
    """The e4m3fn byte of fp32 y, |y| ≤ 448 (or NaN), rounded to nearest even (module docstring)."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - (120 << 3)  # exponent 127 -> 7
    nan = y != y
    scaled = tl.abs(tl.where(nan, 0.0, y)) * 512.0  # |y| / 2^-9, exact (a NaN never reaches the cast)
    subnormal = ((scaled + 8388608.0) - 8388608.0).to(tl.uint32)  # round to an integer 0..8
    code = tl.where(magnitude >= 0x3C800000, normal, subnormal)  # 0x3C800000: 2^-6
    code = tl.where(nan, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _operand(a_row, col_scale_ptr, start, n_cols, HAS_COL_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """v = a ⊙ c in fp32 for the BLOCK columns from ``start`` of one row (0 past the end)."""
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = tl.load(a_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        v = v * tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
    return v


@triton.jit
def _fp8_rows_kernel(a_ptr, col_scale_ptr, codes_ptr, scale_ptr, n_cols, a_row_stride, min_scale,
                     HAS_COL_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * a_row_stride
    codes_row = codes_ptr + row * n_cols
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        v = _operand(a_row, col_scale_ptr, start, n_cols, HAS_COL_SCALE, BLOCK)
        amax = _max_keeping_nan(amax, tl.abs(v))
    row_max = tl.reduce(amax, 0, _max_keeping_nan)  # a NaN anywhere in the row: NaN, as torch's amax
    s = tl.math.div_rn(row_max, 448.0)
    s = tl.where(s < min_scale, min_scale, s)  # NaN stays NaN, as torch's clamp
    tl.store(scale_ptr + row, s)
    for start in range(0, n_cols, BLOCK):
        v = _operand(a_row, col_scale_ptr, start, n_cols, HAS_COL_SCALE, BLOCK)
        y = tl.math.div_rn(v, s)
        y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
        cols = start + tl.arange(0, BLOCK)
        tl.store(codes_row + cols, _e4m3_bits(y), mask=cols < n_cols)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------

_BLOCK, _WARPS = 1024, 4


def _quantize_rows_triton(a: torch.Tensor, col_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    a = a if a.stride(1) == 1 else a.contiguous()
    m, k = a.shape
    codes = torch.empty((m, k), dtype=E4M3, device=a.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=a.device)
    if m == 0:
        return codes, scale
    has_col_scale = col_scale is not None
    col = col_scale.to(torch.float32).contiguous() if has_col_scale else scale  # any pointer when unused
    _fp8_rows_kernel[(m,)](a, col, codes.view(torch.uint8), scale, k, a.stride(0), MIN_SCALE,
                           HAS_COL_SCALE=has_col_scale, BLOCK=_BLOCK, num_warps=_WARPS, enable_fp_fusion=False)
    return codes, scale


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_quantize_rows_triton` can launch: every operand dtype, with and without a column
    scale (forward x, backward dY ⊙ s_w), at the widest operand (the down projection's input)."""
    cases = []
    for dtype in shapes.dtypes:
        for has_col_scale in (False, True):
            args = dict(a_ptr=dtype, col_scale_ptr=torch.float32, codes_ptr=torch.uint8, scale_ptr=torch.float32,
                        n_cols=shapes.intermediate, a_row_stride=shapes.intermediate, min_scale=MIN_SCALE)
            cases.append(KernelCase("rows" + (" COL_SCALE" if has_col_scale else ""), _fp8_rows_kernel, dtype,
                                    args, dict(HAS_COL_SCALE=has_col_scale, BLOCK=_BLOCK), fixed_launch(_WARPS),
                                    dict(enable_fp_fusion=False)))
    return cases


# ----------------------------------------------------------------------------------------------
# 4. Public op
# ----------------------------------------------------------------------------------------------


def quantize_rows(a: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (M, K) e4m3, scales (M, 1) fp32) of a (M, K) fp32/bf16/fp16 operand, ``col_scale``
    (K,) fp32 or None (module docstring): Triton on CUDA (or when forced), else the reference;
    both give the same bytes."""
    if a.dim() != 2:
        raise ValueError(f"a: expected a 2-D (M, K) operand, got shape {tuple(a.shape)}")
    if col_scale is not None and col_scale.shape != (a.shape[1],):
        raise ValueError(f"col_scale: expected shape ({a.shape[1]},), got {tuple(col_scale.shape)}")
    if a.dtype in FLOAT_DTYPES and use_triton(a, col_scale):
        return _quantize_rows_triton(a, col_scale)
    return quantize_rows_ref(a, col_scale)
