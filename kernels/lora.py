"""LoRA linear: a frozen base product plus a trainable low-rank update, fused forward and backward.

Formula, for ``x`` of shape ``(..., in)`` flattened to ``(N, in)``::

    drop(x) = x ⊙ keep / (1 − p)          keep ∈ {0, 1}^(N, in), P(keep = 1) = 1 − p
    h       = drop(x) · Aᵀ                (N, r)      the low-rank down-projection
    y       = x · Wᵀ (+ bias) + s · h · Bᵀ  (N, out)

with ``W`` (out, in) frozen (dense fp32/bf16/fp16, or an ``NF4Tensor`` dequantized to x's dtype),
``A`` = ``lora_A`` (r, in), ``B`` = ``lora_B`` (out, r) as in PEFT, ``s`` = ``scale`` (alpha / r).
``B · A`` (out, in) is never formed: the update costs 2·N·r·(in + out) flops instead of a GEMM.
Dropout applies only when ``training`` and ``p > 0``; otherwise ``drop(x) = x``.

Backward, given ``dY = ∂L/∂y`` (N, out). ``y`` depends on ``B`` through ``s·h·Bᵀ``, on ``h``
through the same term, on ``A`` through ``h``, and on ``x`` through the base product and ``h``::

    dB = ∂L/∂B = s · dYᵀ · h                             (out, r)
    dH = ∂L/∂h = s · dY · B                              (N, r)
    dA = ∂L/∂A = dHᵀ · drop(x)                           (r, in)    since h = drop(x)·Aᵀ
    dX = ∂L/∂x = dY · W + (dH · A) ⊙ keep / (1 − p)      (N, in)    base path + dropout path
    dW, dbias: none (the base is frozen; asking for them is an error).

Where each product runs: the base GEMMs ``x·Wᵀ`` (forward) and ``dY·W`` (dX) go through
cuBLAS (``torch.addmm`` / ``torch.mm``, fp32 accumulation), the same path as the adapter-off layer;
only the low-rank update is ours, in three small Triton kernels:
(1) ``_lowrank_down_kernel``: h = drop(x)·Aᵀ in fp32, dropout fused into the load of x (and dH by
the same kernel with U = B, no dropout); (2) ``_lowrank_up_kernel``: C += scale · [keep ⊙] (H·U)
in place on the cuBLAS output, H split into two 16-bit halves so the fp32 h keeps ~16 bits (the
forward adds s·h·Bᵀ to y; the backward adds keep/(1−p) ⊙ dH·A to dX, the dropout mask drawn in
this rank-r kernel, never inside a big GEMM tile); (3) ``_lowrank_wgrad_kernel``: dA and dBᵀ as
reductions over the N tokens, split across programs and summed. The up-projection reads and
writes C once more (N·out elements): ~10 % of the GEMM's time at N = 4096, bench_lora measures it.
NF4 weights are dequantized (``kernels.nf4.dequantize_nf4``, its Triton kernel on a GPU) into a
temporary that the GEMM reads: the dequantization moves ~2.6 bytes per weight against the GEMM's
2·N flops per weight. Under gradient checkpointing the recompute keeps its dequantized weight for
the backward that follows at once (`kernels.nf4.keep_dequantized`), so each NF4 weight is
dequantized twice per step (forward, recompute), not three times.

Dropout mask: ``keep[i, j] = U(seed, i·in + j) ≥ p`` with U Triton's ``tl.rand`` (Philox-4x32-10).
The forward, the dX up-projection and the dA kernel regenerate it from the seed, so no (N, in)
mask is stored. The kernels read the seed from a one-element int64 tensor on the device: without a
``seed`` argument the public op draws it there with ``torch.randint`` (the device's generator, which
``torch.manual_seed`` fixes and activation checkpointing replays), so no call reads anything on
the host. ``dropout_keep_mask`` recomputes the same mask in plain torch, bit for bit, so the
reference given the same ``seed`` applies the same mask as the kernels; when the kernel mode is
forced (``ENGINE_KERNELS=reference`` or ``triton``) both draw the seed alike from torch's generator,
so that A/B runs and tests compare the same masks; in the default ``auto`` mode the reference (a
CPU run) draws a cheaper mask from torch's generator instead.

Saved for backward: ``x`` (needed for dA; it is the layer input that autograd keeps alive
anyway), ``h`` (N, r) in fp32 (tiny: r ≪ in; recomputing it would re-read x), ``lora_A``,
``lora_B``, the base weight (a reference to the frozen parameter; for NF4 the small packed object,
dequantized again in backward rather than keeping a dense (out, in) copy alive between the
forward and the backward — except under `kernels.nf4.keep_dequantized`, i.e. gradient
checkpointing, where the forward's copy is dropped at once and the recompute's lives until the
backward that follows), and the seed tensor. Never drop(x) or the mask (N, in), never a gradient
buffer for W.

Groups: the three kernels also serve `kernels.lora_group` (q/k/v or gate/up sharing x): there
h holds the G adapters' columns side by side (R = G·r, GROUP_R = r) and column group g draws its
dropout mask from its own seed ``seed[g]`` (one adapter: G = 1, GROUP_R = R); a down or wgrad tile
never straddles two groups, and the up kernel sums the groups' masked products in one pass over C.

Strides: every 2-D operand is passed to the kernels with its own row/column strides, so
transposed or sliced 2-D views run without a copy; leading dims of x are flattened with
``reshape`` (a copy only when they cannot be viewed). The kernels cover fp32/bf16/fp16; float64
(gradcheck) always runs the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting, kernel_mode, use_triton
from kernels.launch_cases import KernelCase, ModelShapes
from kernels.nf4 import NF4Tensor, dequantize_nf4, keeping_dequantized

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# 1. Reference: the math, in plain torch (differentiated by autograd)
# ---------------------------------------------------------------------------------------------

# Philox-4x32-10 constants, as in triton.language.random
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10  # largest scale with (2**31 − 1) · scale < 1 in fp32


def _mul_u32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a·b, for b holding uint32 values in int64.

    Split into 16-bit halves so no intermediate exceeds 2**50 (int64 has no unsigned overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = (a_hi * b_lo + a_lo * b_hi) * 65536 + a_lo * b_lo  # product minus a_hi·b_hi·2**32
    return a_hi * b_hi + (t >> 32), t & _U32


def _philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` in plain torch: fp32 uniforms in [0, 1), bit-identical."""
    c0, c1 = offsets & _U32, offsets >> 32
    c2 = c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_u32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_u32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    signed = torch.where(c0 >= 2**31, _U32 - c0, c0)  # bitcast to int32, then x < 0 → ~x
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device="cpu") -> torch.Tensor:
    """The (n_rows, n_cols) bool keep-mask the Triton kernels draw for ``seed``:
    ``keep[i, j] = tl.rand(seed, i·n_cols + j) ≥ p`` (p compared in fp32)."""
    offsets = torch.arange(n_rows * n_cols, dtype=torch.int64, device=device).view(n_rows, n_cols)
    return _philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32, device=device)


def _dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor in ``dtype`` (NF4 is dequantized)."""
    return weight if isinstance(weight, torch.Tensor) else dequantize_nf4(weight, dtype)


def lora_linear_ref(x, weight, lora_A, lora_B, scale, dropout_p=0.0, training=False, bias=None, *,
                    seed=None):
    """``x·Wᵀ (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ`` in x's dtype; the definition of the op.

    ``lora_A``/``lora_B`` are cast to x's dtype (they may be kept in fp32). Dropout (``training``
    and ``dropout_p > 0``): with ``seed`` the kernels' Philox mask (`dropout_keep_mask`), else a
    mask from torch's generator. See the module docstring for shapes and the backward.
    """
    _check_inputs("lora_linear_ref", x, weight, lora_A, lora_B, scale, dropout_p, bias)
    w = _dense_weight(weight, x.dtype)
    dropped = x
    if training and dropout_p > 0:
        n_in = x.shape[-1]
        if seed is None:
            keep = torch.rand(x.shape, device=x.device) >= dropout_p
        else:
            keep = dropout_keep_mask(seed, x.numel() // n_in, n_in, dropout_p, x.device).view(x.shape)
        dropped = x * keep / (1.0 - dropout_p)
    h = dropped @ lora_A.to(x.dtype).t()  # (..., r)
    y = x @ w.t() + scale * (h @ lora_B.to(x.dtype).t())
    return y if bias is None else y + bias


def _check_inputs(op, x, weight, lora_A, lora_B, scale, dropout_p, bias) -> None:
    """Shapes, dtypes and devices of the operands; errors name the argument and what was expected."""
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {type(t).__name__}"
                            f"{'' if not isinstance(t, torch.Tensor) else ' of ' + str(t.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., in), got a 0-d tensor")
    if not isinstance(weight, (torch.Tensor, NF4Tensor)) or len(weight.shape) != 2:
        raise ValueError(f"{op}: weight must be a 2-D (out, in) tensor or an NF4Tensor, got {type(weight).__name__}")
    n_out, n_in = weight.shape
    if isinstance(weight, torch.Tensor) and weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if x.shape[-1] != n_in:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features but weight is (out={n_out}, in={n_in})")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{op}: lora_A must be (r, in) and lora_B (out, r); got {tuple(lora_A.shape)} "
                         f"and {tuple(lora_B.shape)}")
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError(f"{op}: lora_A has rank r=0; LoRA needs r ≥ 1")
    if lora_A.shape[1] != n_in:
        raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected (r, in={n_in})")
    if lora_B.shape != (n_out, rank):
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, expected (out={n_out}, r={rank}) "
                         f"to match weight and lora_A")
    if bias is not None and (bias.shape != (n_out,) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be ({n_out},) in {x.dtype}, got {tuple(bias.shape)} in {bias.dtype}")
    devices = {t.device for t in (x, weight, lora_A, lora_B, bias if bias is not None else x)}
    if len(devices) > 1:
        raise ValueError(f"{op}: x, weight, lora_A, lora_B and bias must share a device, got {sorted(map(str, devices))}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------


# Triton's CPU interpreter multiplies bf16 tl.dot operands wrongly (garbage of order 1e10 with
# triton 3.9), while fp32 is exact; there bf16 tiles go through fp32, which gives the same
# products and fp32 sums that a GPU's bf16 MMA gives.
_INTERPRETER_BF16_DOT_IN_FP32 = tl.constexpr(interpreting())


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a·b`` with fp32 accumulation (``tl.dot``, see the interpreter note above)."""
    if _INTERPRETER_BF16_DOT_IN_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dot_split(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a·b`` for an fp32 ``a`` (h or dH) and a 16-bit ``b``, to ~16 bits of ``a``: a = hi + lo,
    both in b's dtype, two MMAs. Rounding ``a`` once would cost 8 bits (bf16) on every term of
    the token reductions of dA and dB; the second MMA is on the rank-r side, so it is ~free."""
    if b.dtype == tl.float32:
        return _dot(a, b, acc, DOT_PRECISION)
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    return _dot(lo, b, _dot(hi, b, acc, DOT_PRECISION), DOT_PRECISION)


@triton.jit
def _keep_mask(seed, rows, cols, n_cols, p):
    """Dropout keep-mask of the (rows × cols) tile of an (·, n_cols) matrix: rand(i·n_cols + j) ≥ p."""
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def _lowrank_down_kernel(
    x_ptr, u_ptr, h_ptr, seed_ptr, M, K, R, GROUP_R, M_BUCKET,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_hm, stride_hr,
    scale, p,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """H[M, R] = scale · drop_g(X)[M, K] · U[K, R] in fp32; one (BLOCK_M, BLOCK_R) tile per program.
    Forward: X = x, U = Aᵀ, scale = 1/(1−p). Backward: X = dY, U = B, scale = s, no dropout.
    Groups: the R columns are R / GROUP_R groups of GROUP_R (the adapters of projections sharing
    x, `kernels.lora_group`), group g masking x with its own seed ``seed_ptr[g]``; a tile never
    straddles two groups. One group (GROUP_R = R) is the single adapter. (M_BUCKET is only the
    autotuning key.)"""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tiles_per_group = tl.cdiv(GROUP_R, BLOCK_R)
    group = tl.program_id(1) // tiles_per_group
    rs_in = (tl.program_id(1) - group * tiles_per_group) * BLOCK_R + tl.arange(0, BLOCK_R)
    rs = group * GROUP_R + rs_in
    ks = tl.arange(0, BLOCK_K)
    row_ok, r_ok = rows < M, rs_in < GROUP_R
    seed = tl.load(seed_ptr + group) if DROPOUT else 0
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    u_ptrs = u_ptr + ks[:, None] * stride_uk + rs[None, :] * stride_ur
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rows, k0 + ks, K, p), x, tl.zeros_like(x))
        u = tl.load(u_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _dot(x, u, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        u_ptrs += BLOCK_K * stride_uk
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + rs[None, :] * stride_hr
    tl.store(h_ptrs, acc * scale, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lowrank_up_kernel(
    h_ptr, u_ptr, c_ptr, seed_ptr, M, N, R, GROUP_R, M_BUCKET,
    stride_hm, stride_hr, stride_ur, stride_un, stride_cm, stride_cn,
    scale, p,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C[M, N] += scale · Σ_g [keep_g ⊙] (H[M, R_g] · U[R_g, N]), in place on C (the cuBLAS output),
    R_g the g-th of R / GROUP_R column groups of H (rows of U). Forward: H = h, U = Bᵀ, scale s,
    no dropout (then the groups are one sum over R). Backward dX: H = dH, U = A, scale 1/(1−p),
    keep_g = the forward's dropout mask of x drawn from ``seed_ptr[g]`` (N = in). The tile is
    small (its K is the rank), so the Philox mask costs registers here and not inside a
    (BLOCK × BLOCK × K) GEMM."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        for g0 in range(0, R, GROUP_R):  # each group under its own mask
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(g0, g0 + GROUP_R, BLOCK_R):
                r_ok = r0 + rs < g0 + GROUP_R
                h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + (r0 + rs)[None, :] * stride_hr,
                            mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                u = tl.load(u_ptr + (r0 + rs)[:, None] * stride_ur + cols[None, :] * stride_un,
                            mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                acc_g = _dot_split(h, u, acc_g, DOT_PRECISION)
            acc += tl.where(_keep_mask(tl.load(seed_ptr + g0 // GROUP_R), rows, cols, N, p), acc_g, 0.0)
    else:
        for r0 in range(0, R, BLOCK_R):
            r_ok = r0 + rs < R
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + (r0 + rs)[None, :] * stride_hr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            u = tl.load(u_ptr + (r0 + rs)[:, None] * stride_ur + cols[None, :] * stride_un,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot_split(h, u, acc, DOT_PRECISION)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    c_mask = row_ok[:, None] & col_ok[None, :]
    c = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, (c + acc * scale).to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _lowrank_wgrad_kernel(
    l_ptr, x_ptr, g_ptr, seed_ptr, M, N, R, GROUP_R, M_BUCKET, rows_per_split,
    stride_lm, stride_lr, stride_xm, stride_xn, stride_gs, stride_gr, stride_gn,
    scale, p,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """G[s, R, N] = scale · Σ_{m in split s} L[m, R]ᵀ · drop(X)[m, N], fp32 partial sums.
    dA: L = dH, X = x with the dropout mask, scale 1/(1−p). dBᵀ: L = h, X = dY, scale s.
    Grid (N tiles, splits of the M rows, R tiles): the token reduction is long and the output
    small, so splitting M keeps every SM busy; the splits are summed by the launcher. Groups as
    in `_lowrank_down_kernel`: rows R_g of G use the mask of ``seed_ptr[g]``."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tiles_per_group = tl.cdiv(GROUP_R, BLOCK_R)
    group = tl.program_id(2) // tiles_per_group
    rs_in = (tl.program_id(2) - group * tiles_per_group) * BLOCK_R + tl.arange(0, BLOCK_R)
    rs = group * GROUP_R + rs_in
    col_ok, r_ok = cols < N, rs_in < GROUP_R
    seed = tl.load(seed_ptr + group) if DROPOUT else 0
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        lo = tl.load(l_ptr + rows[:, None].to(tl.int64) * stride_lm + rs[None, :] * stride_lr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rows, cols, N, p), x, tl.zeros_like(x))
        acc = _dot_split(tl.trans(lo), x, acc, DOT_PRECISION)
    g_ptrs = g_ptr + pid_s * stride_gs + rs[:, None] * stride_gr + cols[None, :] * stride_gn
    tl.store(g_ptrs, acc * scale, mask=r_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# 3. Launchers: block sizes, grids, outputs
# ---------------------------------------------------------------------------------------------

# H100/H200 candidates (BLOCK_a, BLOCK_b, warps, stages), per (DROPOUT, fp32) specialisation: the
# rank side of every tile is BLOCK_R (16–64), so the tiles stay small. tl.rand costs registers per
# element of its tile (Philox-4x32-10 on each), and fp32 dots without tensor cores (IEEE) hold
# their operands in registers: those specialisations get smaller tiles. Every list is checked to
# compile without a register spill for sm_80 and sm_90 (tests/kernels/test_compile.py). The key
# buckets M to a power of two, so a training run with varying token counts tunes a handful of
# times, not every step.
_FP32_TILES = [(32, 64, 4, 3), (64, 32, 8, 3), (32, 32, 4, 3)]
# fp32 with dropout: the up-projection (dX) of a group keeps two fp32 tiles live (the group's
# product and the running sum) next to Philox, and dA Philox next to fp32 operands: half the
# registers per thread (8 warps, or a smaller tile).
_FP32_DROPOUT_TILES = [(32, 32, 4, 3), (32, 64, 8, 3), (64, 32, 8, 3)]
_TILES = {
    "down": {(False, False): [(64, 128, 4, 3), (128, 64, 8, 3), (32, 128, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)],
             (True, False): [(128, 64, 4, 3), (32, 128, 4, 4), (64, 64, 4, 4)]},
    "up": {(False, False): [(64, 128, 4, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2)],
           (True, False): [(32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]},
    "wgrad": {(False, False): [(64, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
              (True, False): [(64, 32, 4, 3), (32, 32, 4, 3), (64, 64, 8, 1)]},
}
_BLOCKS = {"down": ("BLOCK_M", "BLOCK_K"), "up": ("BLOCK_M", "BLOCK_N"), "wgrad": ("BLOCK_M", "BLOCK_N")}
_KEYS = {"down": ["M_BUCKET", "K", "R"], "up": ["M_BUCKET", "N", "R"], "wgrad": ["M_BUCKET", "N", "R"]}
_KERNELS = {"down": _lowrank_down_kernel, "up": _lowrank_up_kernel, "wgrad": _lowrank_wgrad_kernel}


def _autotuned(op: str) -> dict[tuple[bool, bool], "triton.runtime.autotuner.Autotuner"]:
    """One autotuner of ``op``'s kernel per (DROPOUT, fp32) specialisation, with its own tiles."""
    tuned = {}
    for dropout in (False, True):
        for fp32 in (False, True):
            tiles = (_FP32_DROPOUT_TILES if dropout and op != "down" else _FP32_TILES) if fp32 \
                else _TILES[op][(dropout, False)]
            configs = [triton.Config(dict(zip(_BLOCKS[op], t[:2])), num_warps=t[2], num_stages=t[3]) for t in tiles]
            tuned[(dropout, fp32)] = triton.autotune(configs, key=_KEYS[op])(_KERNELS[op])
    return tuned


_DOWN_TUNED, _UP_TUNED, _WGRAD_TUNED = _autotuned("down"), _autotuned("up"), _autotuned("wgrad")


def _tuned(table: dict, drop, operand: torch.Tensor):
    """The autotuner of ``table`` for this launch's (DROPOUT, fp32) specialisation."""
    return table[(drop is not None, operand.dtype == torch.float32)]

# Under TRITON_INTERPRET (CPU tests) one small fixed config: tiles smaller than the test shapes,
# so tails, several tiles and several M splits are all exercised.
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_WGRAD_ROWS_PER_SPLIT = 512  # GPU: rows each program reduces (a multiple of every BLOCK_M)


class _Dropout(NamedTuple):
    seed: torch.Tensor  # (G,) int64 on the device, one per adapter group: the kernels load it, the host never
    p: float            # reads it (G = 1 for one adapter)


def _launch(raw, tuned, grid, keys, *args, **kwargs) -> None:
    """Run ``tuned`` (autotuned) on a GPU, or ``raw`` with the small interpreter blocks."""
    if interpreting():
        meta = {k: _INTERPRETER_META[k] for k in keys}
        raw[grid(meta)](*args, **kwargs, **meta)
    else:
        tuned[grid](*args, **kwargs)


# The most rank columns a tile holds, per kernel: the up kernel loops over the rank (its dot's K), so
# 16 keeps its h and u operands small next to the (BLOCK_M, BLOCK_N) accumulator; down and wgrad
# hold the rank side of their output tile and spread larger ranks over more programs (the down
# kernel's big x tiles leave room for 16 columns only). Wider rank tiles spilled registers at
# r = 32 and 64 (tests/kernels/test_compile.py --full, triton 3.6 and 3.9).
_RANK_TILE = {"down": 16, "up": 16, "wgrad": 32}


def _block_r(rank: int, op: str) -> int:
    """Rank tile of ``op``'s kernel: ≥ 16 (the smallest tl.dot), ≤ `_RANK_TILE` (larger ranks loop or
    use more programs)."""
    return min(_RANK_TILE[op], max(16, triton.next_power_of_2(rank)))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE fp32 like torch's default, TF32 only where torch allows it for matmuls.
    (bf16/fp16 inputs ignore it; "tf32" is Triton's default there.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _seed_ptr(drop: _Dropout | None, unused: torch.Tensor) -> torch.Tensor:
    """The seed tensor; without dropout any tensor (the kernel never reads it then)."""
    return drop.seed if drop else unused


def _p(drop: _Dropout | None) -> float:
    return drop.p if drop else 0.0


def _groups(r: int, group_r: int | None) -> tuple[int, int]:
    """(rank per group, number of groups) of R = r columns; None: one group."""
    group_r = r if group_r is None else group_r
    return group_r, r // group_r


def _lowrank_down(x: torch.Tensor, u: torch.Tensor, scale: float, drop: _Dropout | None,
                  group_r: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``scale · drop_g(x) · u`` for x (M, K), u (K, R) any strides → (M, R), contiguous or
    into ``out`` (fp32, any strides); with ``group_r``, column group g (of R / group_r) masks x
    with ``drop.seed[g]``."""
    (m, k), r = x.shape, u.shape[1]
    h = torch.empty((m, r), dtype=torch.float32, device=x.device) if out is None else out
    group_r, groups = _groups(r, group_r)
    block_r = _block_r(group_r, "down")

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), groups * triton.cdiv(group_r, block_r))

    _launch(_lowrank_down_kernel, _tuned(_DOWN_TUNED, drop, x), grid, ("BLOCK_M", "BLOCK_K"),
            x, u, h, _seed_ptr(drop, h), m, k, r, group_r, triton.next_power_of_2(m), *x.stride(), *u.stride(),
            *h.stride(), scale, _p(drop), DROPOUT=drop is not None, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_R=block_r)
    return h


def _lowrank_up_(c: torch.Tensor, h: torch.Tensor, u: torch.Tensor, scale: float, drop: _Dropout | None,
                 group_r: int | None = None) -> None:
    """``c += scale · Σ_g [keep_g ⊙] (h_g · u_g)`` in place, for c (M, N), h (M, R) fp32, u (R, N),
    any strides; the R columns of h (rows of u) in groups of ``group_r`` (default: one group)."""
    (m, n), r = c.shape, h.shape[1]
    group_r, _ = _groups(r, group_r)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _launch(_lowrank_up_kernel, _tuned(_UP_TUNED, drop, c), grid, ("BLOCK_M", "BLOCK_N"),
            h, u, c, _seed_ptr(drop, h), m, n, r, group_r, triton.next_power_of_2(m), *h.stride(), *u.stride(),
            *c.stride(), scale, _p(drop), DROPOUT=drop is not None, DOT_PRECISION=_dot_precision(c.dtype),
            BLOCK_R=_block_r(group_r, "up"))


def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wgrad_splits(m: int, n: int, r: int, num_sms: int, unit: int) -> tuple[int, int]:
    """(splits of the M rows, rows per split, a multiple of ``unit``): enough splits to give each
    SM ~2 programs, but never a split without rows (``r``: the rank of one group)."""
    col_tiles = triton.cdiv(n, 128) * triton.cdiv(r, _block_r(r, "wgrad"))
    splits = max(1, min(triton.cdiv(m, unit), triton.cdiv(2 * num_sms, col_tiles)))
    return splits, triton.cdiv(triton.cdiv(m, splits), unit) * unit


def _wgrad(lo: torch.Tensor, x: torch.Tensor, scale: float, drop: _Dropout | None,
           group_r: int | None = None) -> torch.Tensor:
    """fp32 ``scale · loᵀ · drop_g(x)`` for lo (M, R), x (M, N) (any strides) → (R, N); with
    ``group_r``, output rows of group g use x masked by ``drop.seed[g]``."""
    (m, n), r = x.shape, lo.shape[1]
    group_r, groups = _groups(r, group_r)
    block_r = _block_r(group_r, "wgrad")
    unit = _INTERPRETER_META["BLOCK_M"] if interpreting() else _WGRAD_ROWS_PER_SPLIT
    splits, rows_per_split = _wgrad_splits(m, n * groups, group_r, _num_sms(x.device), unit)
    g = torch.empty((splits, r, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), splits, groups * triton.cdiv(group_r, block_r))

    _launch(_lowrank_wgrad_kernel, _tuned(_WGRAD_TUNED, drop, x), grid, ("BLOCK_M", "BLOCK_N"),
            lo, x, g, _seed_ptr(drop, g), m, n, r, group_r, triton.next_power_of_2(m), rows_per_split, *lo.stride(),
            *x.stride(), *g.stride(), scale, _p(drop), DROPOUT=drop is not None,
            DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=block_r)
    return g.sum(0) if splits > 1 else g[0]


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """Every launch of `_lowrank_down`, `_lowrank_up_` and `_wgrad` in `LoRALinearFunction` and in
    `kernels.lora_group` (kernels/launch_cases.py), at the (in, out) = (hidden, intermediate) layer
    (gate/up; q/k/v/o and down differ only in multiple-of-16 sizes), for each rank, dtype and dot
    precision, with the operands' strides as the autograd.Functions pass them: W (out, in) and
    A (r, in), B (out, r) contiguous, so ``lora_b.t()``/``lora_a.t()`` have unit row stride. The
    grouped op (G = 2, 3 adapters side by side: R = G·r; GROUP_R = r with dropout, else one group
    of G·r) works on slices of the concatenated output, whose row stride is Σ out (here 2·out).
    Cases that compile to the same binary are compiled once by the check. Edit this list when a
    launch in either file changes."""
    M, K, N, f32, i64 = shapes.tokens, shapes.hidden, shapes.intermediate, torch.float32, torch.int64
    m_bucket, cases = triton.next_power_of_2(M), []
    for dt in shapes.dtypes:
        precisions = ("ieee", "tf32") if dt == torch.float32 else ("tf32",)  # see _dot_precision
        for r, prec in ((r, prec) for r in shapes.lora_ranks for prec in precisions):
            tag = f"r={r} {prec}"

            def down(name, k, stride_u, dropout, rank=r, group_r=r, stride_x=None, stride_h=None):
                args = dict(x_ptr=dt, u_ptr=dt, h_ptr=f32, seed_ptr=i64 if dropout else f32, M=M, K=k, R=rank,
                            GROUP_R=group_r, M_BUCKET=m_bucket, stride_xm=stride_x or k, stride_xk=1,
                            stride_uk=stride_u[0], stride_ur=stride_u[1], stride_hm=stride_h or rank, stride_hr=1,
                            scale=1.0, p=0.1)
                meta = dict(DROPOUT=dropout, DOT_PRECISION=prec, BLOCK_R=_block_r(group_r, "down"))
                return KernelCase(f"{name} {tag}", _lowrank_down_kernel, dt, args, meta,
                                  tuple(_DOWN_TUNED[(dropout, dt == f32)].configs))

            def up(name, n, stride_u, dropout, rank=r, group_r=r, stride_c=None, stride_h=None):
                args = dict(h_ptr=f32, u_ptr=dt, c_ptr=dt, seed_ptr=i64 if dropout else f32, M=M, N=n, R=rank,
                            GROUP_R=group_r, M_BUCKET=m_bucket, stride_hm=stride_h or rank, stride_hr=1,
                            stride_ur=stride_u[0], stride_un=stride_u[1], stride_cm=stride_c or n, stride_cn=1,
                            scale=2.0, p=0.1)
                meta = dict(DROPOUT=dropout, DOT_PRECISION=prec, BLOCK_R=_block_r(group_r, "up"))
                return KernelCase(f"{name} {tag}", _lowrank_up_kernel, dt, args, meta,
                                  tuple(_UP_TUNED[(dropout, dt == f32)].configs))

            def wgrad(name, n, dropout, rank=r, group_r=r, stride_x=None, stride_l=None):
                groups = rank // group_r
                args = dict(l_ptr=f32, x_ptr=dt, g_ptr=f32, seed_ptr=i64 if dropout else f32, M=M, N=n, R=rank,
                            GROUP_R=group_r, M_BUCKET=m_bucket,
                            rows_per_split=_wgrad_splits(M, n * groups, group_r, shapes.num_sms,
                                                         _WGRAD_ROWS_PER_SPLIT)[1],
                            stride_lm=stride_l or rank, stride_lr=1, stride_xm=stride_x or n, stride_xn=1,
                            stride_gs=rank * n, stride_gr=n, stride_gn=1, scale=1.0, p=0.1)
                meta = dict(DROPOUT=dropout, DOT_PRECISION=prec, BLOCK_R=_block_r(group_r, "wgrad"))
                return KernelCase(f"{name} {tag}", _lowrank_wgrad_kernel, dt, args, meta,
                                  tuple(_WGRAD_TUNED[(dropout, dt == f32)].configs))

            cases += [
                # forward: y = x·Wᵀ (cuBLAS); h = drop(x)·Aᵀ; y += s·h·Bᵀ
                down("fwd h", K, (1, K), False), down("fwd h dropout", K, (1, K), True),
                up("fwd y += s·h·Bᵀ", N, (1, r), False),
                # backward: dH = s·dY·B; dX = dY·W (cuBLAS) += keep ⊙ dH·A; dA = dHᵀ·drop(x); dB = s·dYᵀ·h
                down("bwd dH", N, (r, 1), False),
                up("bwd dX += dH·A", K, (K, 1), False), up("bwd dX += keep ⊙ dH·A", K, (K, 1), True),
                wgrad("bwd dA", K, False), wgrad("bwd dA dropout", K, True), wgrad("bwd dB", N, False),
            ]
            for g in (2, 3):  # the grouped op: G·r columns of h side by side, slices of y (row stride 2N)
                gr = g * r
                cases += [
                    down(f"group{g} fwd h", K, (1, K), False, gr, gr),
                    down(f"group{g} fwd h dropout", K, (1, K), True, gr, r),
                    up(f"group{g} fwd y_i += s·h_i·B_iᵀ", N, (1, r), False, stride_c=2 * N, stride_h=gr),
                    down(f"group{g} bwd dH_i", N, (r, 1), False, stride_x=2 * N, stride_h=gr),
                    up(f"group{g} bwd dX += Σ dH·A", K, (K, 1), False, gr, gr),
                    up(f"group{g} bwd dX += Σ keep_g ⊙ dH_g·A_g", K, (K, 1), True, gr, r),
                    wgrad(f"group{g} bwd dA", K, False, gr, gr), wgrad(f"group{g} bwd dA dropout", K, True, gr, r),
                    wgrad(f"group{g} bwd dB_i", N, False, stride_x=2 * N, stride_l=gr),
                ]
    return cases


# ---------------------------------------------------------------------------------------------
# 4. autograd.Function
# ---------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """2-D core: x (N, in) → y (N, out). ``weight`` dense or NF4; gradients for x, lora_A, lora_B."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale: float, drop: _Dropout | None):
        w = _dense_weight(weight, x.dtype)
        lora_a, lora_b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        keep_scale = 1.0 / (1.0 - drop.p) if drop else 1.0
        y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())  # cuBLAS (N, out)
        h = _lowrank_down(x, lora_a.t(), keep_scale, drop)  # (N, r) fp32 = drop(x)·Aᵀ
        _lowrank_up_(y, h, lora_b.t(), scale, None)  # y += s·h·Bᵀ
        # x for dA (no (N, in) mask: the seed regenerates it), h (N, r) for dB, A and B for dX and
        # dH; the frozen weight as the parameter itself, or packed NF4 to re-dequantize in backward
        # (the dense copy only under checkpointing: dropped after the forward, the recompute's
        # feeds the backward that runs right after).
        keep_dense = isinstance(weight, torch.Tensor) or keeping_dequantized()
        ctx.save_for_backward(x, h, lora_A, lora_B, w if keep_dense else None)
        ctx.nf4_weight = None if keep_dense else weight
        ctx.scale, ctx.drop = scale, drop
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, lora_A, lora_B, w = ctx.saved_tensors
        s, drop = ctx.scale, ctx.drop
        keep_scale = 1.0 / (1.0 - drop.p) if drop else 1.0
        lora_a, lora_b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        dy = dy.to(x.dtype)
        dx = d_a = d_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dh = _lowrank_down(dy, lora_b, s, None)  # (N, r) = s·dY·B
        if ctx.needs_input_grad[0]:
            w = w if w is not None else _dense_weight(ctx.nf4_weight, x.dtype)
            dx = torch.mm(dy, w)  # cuBLAS dY·W (N, in)
            _lowrank_up_(dx, dh, lora_a, keep_scale, drop)  # += keep/(1−p) ⊙ dH·A
        if ctx.needs_input_grad[2]:
            d_a = _wgrad(dh, x, keep_scale, drop).to(lora_A.dtype)  # dHᵀ·drop(x)
        if ctx.needs_input_grad[3]:
            d_b = _wgrad(h, dy, s, None).t().contiguous().to(lora_B.dtype)  # s·dYᵀ·h
        return dx, None, d_a, d_b, None, None, None


# ---------------------------------------------------------------------------------------------
# 5. Public op
# ---------------------------------------------------------------------------------------------


def lora_linear(x, weight, lora_A, lora_B, scale, dropout_p=0.0, training=False, bias=None, *, seed=None):
    """``y = x·Wᵀ (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ`` for x (..., in) → (..., out).

    ``weight``: frozen (out, in) tensor in x's dtype, or an ``NF4Tensor``; ``lora_A`` (r, in),
    ``lora_B`` (out, r), any float dtype (computed in x's dtype, gradients in their own); ``bias``
    (out,) frozen. Dropout on x's LoRA path when ``training`` and ``dropout_p > 0``, its mask drawn
    from ``seed`` (an int, or a one-element int64 tensor on x's device; default: drawn from torch's
    generator of x's device, so ``torch.manual_seed`` and activation checkpointing reproduce it).
    Triton kernels when ``kernels.backend.use_triton`` says so (CUDA tensors, or a forced mode) and
    x is fp32/bf16/fp16; else `lora_linear_ref`. Checks every operand (errors name the argument);
    `lora_linear_checked` is the same op for callers that checked them once (`LoRALinear`).
    Module docstring: the backward, what is saved, stride handling.
    """
    _check_inputs("lora_linear", x, weight, lora_A, lora_B, scale, dropout_p, bias)
    frozen = [name for name, t in (("weight", weight), ("bias", bias)) if isinstance(t, torch.Tensor) and t.requires_grad]
    if frozen and torch.is_grad_enabled():
        raise ValueError(f"lora_linear: {' and '.join(frozen)} requires grad, but the base layer is frozen "
                         f"(no gradient is computed for it); call .requires_grad_(False) on it")
    return lora_linear_checked(x, weight, lora_A, lora_B, scale, dropout_p, training, bias, seed=seed)


def lora_linear_checked(x, weight, lora_A, lora_B, scale, dropout_p=0.0, training=False, bias=None, *,
                        seed=None):
    """`lora_linear` without the per-call operand checks: for a caller that validated shapes,
    dtypes and the frozen base once (a module whose operands are fixed at construction), so that a
    training step spends no host time re-checking them on every call."""
    dense = weight if isinstance(weight, torch.Tensor) else None
    triton_path = x.dtype in _KERNEL_DTYPES and x.numel() > 0 and use_triton(x, dense, lora_A, lora_B, bias)
    dropping = training and dropout_p > 0
    if not triton_path:
        if dropping and seed is None and kernel_mode() != "auto":
            # the kernels' mask, from a seed drawn as the Triton path draws it (A/B runs compare the same masks)
            seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device).item())
        if isinstance(seed, torch.Tensor):
            seed = int(seed.item())
        return lora_linear_ref(x, weight, lora_A, lora_B, scale, dropout_p, training, bias, seed=seed)
    drop = _Dropout(_seed_tensor(seed, x.device), float(dropout_p)) if dropping else None
    n_out, n_in = weight.shape
    y = LoRALinearFunction.apply(x.reshape(-1, n_in), weight, lora_A, lora_B, bias, float(scale), drop)
    return y.view(*x.shape[:-1], n_out)


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The dropout seed as a (1,) int64 tensor on ``device``: drawn there from torch's generator
    when ``seed`` is None (no host read), else the given int or tensor."""
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)
