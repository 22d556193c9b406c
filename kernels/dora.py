"""DoRA's weight norm: the norm of each output row of the adapted weight, tile by tile.

Formula, for a frozen base weight ``W`` (out, in) and LoRA's ``A`` = ``lora_A`` (r, in),
``B`` = ``lora_B`` (out, r), ``s`` = ``scale``::

    V   = W + s · B · A                     (out, in)   the adapted direction
    n_o = ‖V_o,:‖₂ = sqrt(Σ_i V_oi²)        (out,)      one norm per output feature, fp32

as PEFT 0.21's ``DoraLinearLayer.get_weight_norm`` (``torch.linalg.norm(W + s·B·A, dim=1)``).
DoRA (Liu et al. 2024) rescales each output by ``m_o / n_o`` with ``n`` detached from the graph
(the paper's §4.3), so this op has no backward: it runs under ``torch.no_grad`` and returns a
plain fp32 tensor (no autograd.Function, STYLE's step 4, is needed).

The kernel never forms ``B·A`` (out, in): a program owns ``BLOCK_M`` rows, keeps their ``B``
rows (BLOCK_M, r) in registers and walks the ``in`` dimension in ``BLOCK_K`` tiles, computing
``W_tile + s · B_rows · A_tile`` (one ``tl.dot`` of rank r, fp32 IEEE products) and summing its
squares per row; only the (out,) sums of squares ever reach memory. Cost: one read of W
(out·in elements) plus 2·out·in·r flops; A is read once per row block.

Quantized bases are dequantized once (`kernels.frozen.dequantize_frozen`, a Triton kernel on a GPU) to
the dtype they were quantized from, and the dense kernel reads that temporary: the dequantizer is
an element-wise kernel of its own, not a tile helper this kernel could call. Because DoRA caches
the norm until A or B change (`engine.adapters.dora`), this costs one extra dequantization per
optimizer step, not per micro-batch.

Shapes: ``weight`` (out, in) fp32/bf16/fp16 (any strides) or a quantized weight (`kernels.frozen`); ``lora_A``
(r, in), ``lora_B`` (out, r) any float dtype (read as fp32); result (out,) fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch
from kernels.frozen import dequantize_frozen, is_quantized, storage

# ---------------------------------------------------------------------------------------------
# 1. Reference: the math, in plain torch
# ---------------------------------------------------------------------------------------------


def _dense(weight) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor (quantized: dequantized to the dtype it came from)."""
    return weight if isinstance(weight, torch.Tensor) else dequantize_frozen(weight, weight.dtype)


_REF_ROWS = 256  # rows of V the reference forms at once: a (256, in) fp32 block stays in a CPU's cache


@torch.no_grad()
def dora_weight_norm_ref(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``‖W + scale · B · A‖₂`` per output row, in fp32: (out,).

    V is formed ``_REF_ROWS`` rows at a time (``addmm``: W_rows + s·B_rows·A), never at full size:
    on a CPU this is 3-5x faster than forming the whole (out, in) V (it stays in cache)."""
    w, a, b = _dense(weight), lora_A.float(), lora_B.float()
    return torch.cat([torch.linalg.vector_norm(torch.addmm(w[i:i + _REF_ROWS].float(), b[i:i + _REF_ROWS], a,
                                                           alpha=scale), dim=1)
                      for i in range(0, w.shape[0], _REF_ROWS)])


# ---------------------------------------------------------------------------------------------
# 2. Triton kernel: one program, BLOCK_M rows, the in dimension in BLOCK_K tiles
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dora_norm_fwd_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    n_out, n_in, rank,
    w_stride_row, w_stride_col, a_stride_row, a_stride_col, b_stride_row, b_stride_col,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < n_out
    # B's rows of this block (BLOCK_M, BLOCK_R), read once; padded ranks are zero and add nothing.
    b = tl.load(b_ptr + rows[:, None] * b_stride_row + ranks[None, :] * b_stride_col,
                mask=row_ok[:, None] & (ranks[None, :] < rank), other=0.0).to(tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        a = tl.load(a_ptr + ranks[:, None] * a_stride_row + cols[None, :] * a_stride_col,
                    mask=(ranks[:, None] < rank) & col_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * w_stride_row + cols[None, :] * w_stride_col,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v = w + scale * tl.dot(b, a, input_precision="ieee")  # (BLOCK_M, BLOCK_K); masked entries 0
        sumsq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(sumsq), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# 3. Launcher
# ---------------------------------------------------------------------------------------------

_BLOCK_M, _WARPS = 32, 4  # rows per program, warps per program
_MAX_BLOCK_R = 128  # ranks above it take the reference (B's rows would not fit in registers)


def _rank_tile(rank: int) -> int:
    """The rank tile: ≥ 16 (the smallest tl.dot), a power of two."""
    return max(16, triton.next_power_of_2(rank))


def _in_tile(block_r: int) -> int:
    """The in-tile width: 64 up to rank tile 32, narrower above so that the A tile (BLOCK_R,
    BLOCK_K) and the product stay in registers (rank tile 64 at width 64 spills on sm_80/sm_90)."""
    return 64 if block_r <= 32 else max(16, 2048 // block_r)


def _dora_norm_triton(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    n_out, n_in = weight.shape
    out = torch.empty(n_out, dtype=torch.float32, device=weight.device)
    a, b = lora_A.float(), lora_B.float()  # no copy for the fp32 masters
    block_r = _rank_tile(a.shape[0])
    _dora_norm_fwd_kernel[(triton.cdiv(n_out, _BLOCK_M),)](
        weight, a, b, out, n_out, n_in, a.shape[0],
        weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), float(scale),
        BLOCK_M=_BLOCK_M, BLOCK_K=_in_tile(block_r), BLOCK_R=block_r, num_warps=_WARPS,
    )
    return out


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_dora_norm_triton` can launch (kernels/launch_cases.py): every weight dtype and
    rank tile (the ranks of ``shapes`` and the largest the launcher takes), for the largest weight (intermediate, hidden), A and B fp32 contiguous."""
    f32, cases = torch.float32, []
    n_out, n_in = shapes.intermediate, shapes.hidden
    for dtype in shapes.dtypes:
        for block_r in sorted({_rank_tile(r) for r in shapes.lora_ranks} | {_MAX_BLOCK_R}):
            args = dict(w_ptr=dtype, a_ptr=f32, b_ptr=f32, out_ptr=f32, n_out=n_out, n_in=n_in, rank=block_r,
                        w_stride_row=n_in, w_stride_col=1, a_stride_row=n_in, a_stride_col=1,
                        b_stride_row=block_r, b_stride_col=1, scale=2.0)
            constexprs = dict(BLOCK_M=_BLOCK_M, BLOCK_K=_in_tile(block_r), BLOCK_R=block_r)
            cases.append(KernelCase(f"rank tile {block_r}", _dora_norm_fwd_kernel, dtype, args, constexprs,
                                    fixed_launch(_WARPS)))
    return cases


# ---------------------------------------------------------------------------------------------
# 4. autograd.Function: none (the norm is detached, module docstring)
# 5. Public op
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``‖W + scale · B · A‖₂`` per output row, fp32 (out,); B·A is never formed at full size.

    ``weight``: (out, in) tensor or a quantized weight (dequantized once, module docstring). Triton when
    `kernels.backend.use_triton` says so (CUDA tensors, or the forced mode with the interpreter)
    and the rank is at most 128; else `dora_weight_norm_ref`."""
    n_out, n_in = weight.shape
    if lora_A.shape != (lora_A.shape[0], n_in) or lora_B.shape != (n_out, lora_A.shape[0]):
        raise ValueError(f"dora_weight_norm: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not "
                         f"fit weight (out={n_out}, in={n_in}): expected (r, {n_in}) and ({n_out}, r)")
    packed = storage(weight) if is_quantized(weight) else weight
    if weight.device.type == "meta" or lora_A.shape[0] > _MAX_BLOCK_R or not use_triton(packed, lora_A, lora_B):
        return dora_weight_norm_ref(weight, lora_A, lora_B, scale)
    return _dora_norm_triton(_dense(weight), lora_A, lora_B, scale)
