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

Kernels (Triton): forward = (1) ``_lowrank_down_kernel``: h = drop(x)·Aᵀ with dropout fused into
the load of x, (2) ``_lora_matmul_kernel``: one tiled GEMM whose fp32 accumulator starts from the
low-rank term s·h·Bᵀ (a small second ``tl.dot`` over r) and then accumulates x·Wᵀ. Backward =
dH by (1) with U = B, dX by (2) with the dropout mask applied to the low-rank term only, and dA,
dB by ``_lowrank_wgrad_kernel`` (reductions over the N tokens, split across programs and summed).
NF4 weights are dequantized (``kernels.nf4.dequantize_nf4``, its Triton kernel on a GPU) into a
temporary and the same GEMM runs on it: the dequantization moves ~2.6 bytes per weight against
the GEMM's 2·N flops per weight, so a fused dequant-GEMM would save little at N ≥ 2048 tokens.

Dropout mask: ``keep[i, j] = U(seed, i·in + j) ≥ p`` with U Triton's ``tl.rand`` (Philox-4x32-10).
The forward, the dX epilogue and the dA kernel regenerate it from the seed, so no (N, in) mask is
stored. ``dropout_keep_mask`` recomputes the same mask in plain torch, bit for bit, so the
reference given the same ``seed`` applies the same mask as the kernels. Without a ``seed`` the
public op draws one from torch's generator for the kernels, and also for the reference when the
kernel mode is forced (``ENGINE_KERNELS=reference`` or ``triton``), so that A/B runs and tests
compare the same masks; in the default ``auto`` mode the reference (a CPU run) draws a cheaper
mask from torch's generator instead.

Saved for backward: ``x`` (needed for dA; it is the layer input that autograd keeps alive
anyway), ``h`` (N, r) in fp32 (tiny: r ≪ in; recomputing it would re-read x), ``lora_A``,
``lora_B``, the base weight (a reference to the frozen parameter, or the small packed NF4 object,
dequantized again in backward rather than keeping a dense (out, in) copy alive), and the seed.
Never drop(x) or the mask (N, in), never a gradient buffer for W.

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
from kernels.nf4 import NF4Tensor, dequantize_nf4

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
    x_ptr, u_ptr, h_ptr, M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_hm, stride_hr,
    scale, seed, p,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """H[M, R] = scale · drop(X)[M, K] · U[K, R] in fp32; one (BLOCK_M, BLOCK_R) tile per program.
    Forward: X = x, U = Aᵀ, scale = 1/(1−p). Backward: X = dY, U = B, scale = s, no dropout.
    (M_BUCKET is only the autotuning key.)"""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    row_ok, r_ok = rows < M, rs < R
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
def _lora_matmul_kernel(
    x_ptr, w_ptr, h_ptr, u_ptr, bias_ptr, c_ptr, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_hm, stride_hr, stride_ur, stride_un,
    stride_cm, stride_cn,
    lowrank_scale, seed, p,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = lowrank_scale · [keep ⊙] (H[M, R] · U[R, N]) + X[M, K] · W[K, N] (+ bias[N]).
    Forward: X = x, W = Wᵀ (the base weight), H = h, U = Bᵀ (LoRA's B), scale s. Backward dX:
    X = dY, W = W, H = dH, U = A (LoRA's A), scale 1/(1−p), keep = the forward's dropout mask of x
    (N = in)."""
    # Grouped tile order: GROUP_M row-tiles run next to each other and share W's column tile in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows
    # Rows/cols wrap (% M, % N) so the loads need no M/N mask; the final store is masked.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    # The low-rank term first: the main loop then accumulates onto it, so one fp32 accumulator
    # serves both products (and the dropout mask touches the low-rank part only).
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rs < R
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + (r0 + rs)[None, :] * stride_hr,
                    mask=r_ok[None, :], other=0.0)
        u = tl.load(u_ptr + (r0 + rs)[:, None] * stride_ur + cols[None, :] * stride_un,
                    mask=r_ok[:, None], other=0.0)
        acc = _dot_split(h, u, acc, DOT_PRECISION)
    if DROPOUT:
        acc = tl.where(_keep_mask(seed, rows, cols, N, p), acc, 0.0)
    acc = acc * lowrank_scale
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + ks[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=ks[None, :] < K - k0, other=0.0)
        w = tl.load(w_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        acc = _dot(x, w, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c_ptrs = c_ptr + out_rows[:, None].to(tl.int64) * stride_cm + out_cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(out_rows < M)[:, None] & (out_cols < N)[None, :])


@triton.jit
def _lowrank_wgrad_kernel(
    l_ptr, x_ptr, g_ptr, M, N, R, M_BUCKET, rows_per_split,
    stride_lm, stride_lr, stride_xm, stride_xn, stride_gs, stride_gr, stride_gn,
    scale, seed, p,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """G[s, R, N] = scale · Σ_{m in split s} L[m, R]ᵀ · drop(X)[m, N], fp32 partial sums.
    dA: L = dH, X = x with the dropout mask, scale 1/(1−p). dBᵀ: L = h, X = dY, scale s.
    Grid (N tiles, splits of the M rows, R tiles): the token reduction is long and the output
    small, so splitting M keeps every SM busy; the splits are summed by the launcher."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok, r_ok = cols < N, rs < R
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

# H100/H200 candidates (bf16 wgmma tiles 64–256 wide, 4–8 warps); configs that run out of shared
# memory (fp32 with the largest tiles) are skipped by the autotuner. The key buckets M to a power
# of two, so a training run with varying token counts tunes a handful of times, not every step.
_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                             (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 32, 4, 4)]
]
_DOWN_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (32, 128, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
]
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (32, 128, 4, 4), (128, 128, 8, 3)]
]
_KEY = ["M_BUCKET", "N", "K", "R", "DROPOUT"]
_matmul_tuned = triton.autotune(_MATMUL_CONFIGS, key=_KEY)(_lora_matmul_kernel)
_down_tuned = triton.autotune(_DOWN_CONFIGS, key=["M_BUCKET", "K", "R", "DROPOUT"])(_lowrank_down_kernel)
_wgrad_tuned = triton.autotune(_WGRAD_CONFIGS, key=["M_BUCKET", "N", "R", "DROPOUT"])(_lowrank_wgrad_kernel)

# Under TRITON_INTERPRET (CPU tests) one small fixed config: tiles smaller than the test shapes,
# so tails, several tiles and several M splits are all exercised.
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
_WGRAD_ROWS_PER_SPLIT = 512  # GPU: rows each program reduces (a multiple of every BLOCK_M)


class _Dropout(NamedTuple):
    seed: int
    p: float


def _launch(raw, tuned, grid, keys, *args, **kwargs) -> None:
    """Run ``tuned`` (autotuned) on a GPU, or ``raw`` with the small interpreter blocks."""
    if interpreting():
        meta = {k: _INTERPRETER_META[k] for k in keys}
        raw[grid(meta)](*args, **kwargs, **meta)
    else:
        tuned[grid](*args, **kwargs)


def _block_r(rank: int) -> int:
    """Rank tile: ≥ 16 (the smallest tl.dot), ≤ 64 (larger ranks loop or use more programs)."""
    return min(64, max(16, triton.next_power_of_2(rank)))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE fp32 like torch's default, TF32 only where torch allows it for matmuls.
    (bf16/fp16 inputs ignore it; "tf32" is Triton's default there.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dropout_args(drop: _Dropout | None) -> dict:
    return {"seed": drop.seed if drop else 0, "p": drop.p if drop else 0.0, "DROPOUT": drop is not None}


def _lowrank_down(x: torch.Tensor, u: torch.Tensor, scale: float, drop: _Dropout | None) -> torch.Tensor:
    """fp32 ``scale · drop(x) · u`` for x (M, K), u (K, R) any strides → (M, R) contiguous."""
    (m, k), r = x.shape, u.shape[1]
    h = torch.empty((m, r), dtype=torch.float32, device=x.device)
    block_r = _block_r(r)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))

    _launch(_lowrank_down_kernel, _down_tuned, grid, ("BLOCK_M", "BLOCK_K"),
            x, u, h, m, k, r, triton.next_power_of_2(m), *x.stride(), *u.stride(), *h.stride(), scale,
            **_dropout_args(drop), DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=block_r)
    return h


def _matmul(x, w, h, u, lowrank_scale: float, bias, drop: _Dropout | None) -> torch.Tensor:
    """``lowrank_scale · [keep ⊙](h·u) + x·w (+ bias)`` for x (M, K), w (K, N), h (M, R), u (R, N)
    (any strides) → (M, N) contiguous in x's dtype."""
    (m, k), n, r = x.shape, w.shape[1], h.shape[1]
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _launch(_lora_matmul_kernel, _matmul_tuned, grid, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
            x, w, h, u, bias if bias is not None else c, c, m, n, k, r, triton.next_power_of_2(m),
            *x.stride(), *w.stride(), *h.stride(), *u.stride(), *c.stride(), lowrank_scale,
            **_dropout_args(drop), HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_R=_block_r(r))
    return c


def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wgrad_splits(m: int, n: int, r: int, num_sms: int, unit: int) -> tuple[int, int]:
    """(splits of the M rows, rows per split, a multiple of ``unit``): enough splits to give each
    SM ~2 programs, but never a split without rows."""
    col_tiles = triton.cdiv(n, 128) * triton.cdiv(r, _block_r(r))
    splits = max(1, min(triton.cdiv(m, unit), triton.cdiv(2 * num_sms, col_tiles)))
    return splits, triton.cdiv(triton.cdiv(m, splits), unit) * unit


def _wgrad(lo: torch.Tensor, x: torch.Tensor, scale: float, drop: _Dropout | None) -> torch.Tensor:
    """fp32 ``scale · loᵀ · drop(x)`` for lo (M, R), x (M, N) (any strides) → (R, N)."""
    (m, n), r = x.shape, lo.shape[1]
    block_r = _block_r(r)
    unit = _INTERPRETER_META["BLOCK_M"] if interpreting() else _WGRAD_ROWS_PER_SPLIT
    splits, rows_per_split = _wgrad_splits(m, n, r, _num_sms(x.device), unit)
    g = torch.empty((splits, r, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), splits, triton.cdiv(r, block_r))

    _launch(_lowrank_wgrad_kernel, _wgrad_tuned, grid, ("BLOCK_M", "BLOCK_N"),
            lo, x, g, m, n, r, triton.next_power_of_2(m), rows_per_split, *lo.stride(), *x.stride(),
            *g.stride(), scale, **_dropout_args(drop), DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=block_r)
    return g.sum(0) if splits > 1 else g[0]


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """Every launch of `_lowrank_down`, `_matmul` and `_wgrad` in `LoRALinearFunction`
    (kernels/launch_cases.py), at the (in, out) = (hidden, intermediate) layer (gate/up; q/k/v/o
    and down differ only in multiple-of-16 sizes), for each rank, dtype and dot precision, with
    the operands' strides as the autograd.Function passes them: W (out, in) and A (r, in), B (out, r)
    contiguous, so ``w.t()``/``lora_b.t()``/``lora_a.t()`` have unit row stride. Edit this list
    when a launch in section 4 changes."""
    M, K, N, f32 = shapes.tokens, shapes.hidden, shapes.intermediate, torch.float32
    m_bucket, cases = triton.next_power_of_2(M), []
    for dt in shapes.dtypes:
        precisions = ("ieee", "tf32") if dt == torch.float32 else ("tf32",)  # see _dot_precision
        for r, prec in ((r, prec) for r in shapes.lora_ranks for prec in precisions):
            meta = dict(DOT_PRECISION=prec, BLOCK_R=_block_r(r))
            tag = f"r={r} {prec}"
            drop = dict(scale=1.0, seed=12345, p=0.1)  # a seed, as drawn: neither 1 nor a multiple of 16

            def down(name, k, stride_u, dropout):
                args = dict(x_ptr=dt, u_ptr=dt, h_ptr=f32, M=M, K=k, R=r, M_BUCKET=m_bucket, stride_xm=k,
                            stride_xk=1, stride_uk=stride_u[0], stride_ur=stride_u[1], stride_hm=r, stride_hr=1, **drop)
                return KernelCase(f"{name} {tag}", _lowrank_down_kernel, dt, args, dict(DROPOUT=dropout, **meta),
                                  tuple(_down_tuned.configs))

            def matmul(name, n, k, stride_w, stride_u, bias, dropout):
                args = dict(x_ptr=dt, w_ptr=dt, h_ptr=f32, u_ptr=dt, bias_ptr=dt, c_ptr=dt, M=M, N=n, K=k, R=r,
                            M_BUCKET=m_bucket, stride_xm=k, stride_xk=1, stride_wk=stride_w[0], stride_wn=stride_w[1],
                            stride_hm=r, stride_hr=1, stride_ur=stride_u[0], stride_un=stride_u[1], stride_cm=n,
                            stride_cn=1, lowrank_scale=2.0, seed=12345, p=0.1)
                return KernelCase(f"{name} {tag}", _lora_matmul_kernel, dt, args,
                                  dict(HAS_BIAS=bias, DROPOUT=dropout, **meta), tuple(_matmul_tuned.configs))

            def wgrad(name, n, dropout):
                args = dict(l_ptr=f32, x_ptr=dt, g_ptr=f32, M=M, N=n, R=r, M_BUCKET=m_bucket,
                            rows_per_split=_wgrad_splits(M, n, r, shapes.num_sms, _WGRAD_ROWS_PER_SPLIT)[1], stride_lm=r, stride_lr=1,
                            stride_xm=n, stride_xn=1, stride_gs=r * n, stride_gr=n, stride_gn=1, **drop)
                return KernelCase(f"{name} {tag}", _lowrank_wgrad_kernel, dt, args, dict(DROPOUT=dropout, **meta),
                                  tuple(_wgrad_tuned.configs))

            cases += [
                # forward: h = drop(x)·Aᵀ, y = x·Wᵀ (+ bias) + s·h·Bᵀ
                down("fwd h", K, (1, K), False), down("fwd h dropout", K, (1, K), True),
                matmul("fwd y", N, K, (1, K), (1, r), False, False),
                matmul("fwd y bias", N, K, (1, K), (1, r), True, False),
                # backward: dH = s·dY·B, dX = dY·W + keep ⊙ dH·A, dA = dHᵀ·drop(x), dB = s·dYᵀ·h
                down("bwd dH", N, (r, 1), False),
                matmul("bwd dX", K, N, (K, 1), (K, 1), False, False),
                matmul("bwd dX dropout", K, N, (K, 1), (K, 1), False, True),
                wgrad("bwd dA", K, False), wgrad("bwd dA dropout", K, True), wgrad("bwd dB", N, False),
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
        h = _lowrank_down(x, lora_a.t(), keep_scale, drop)  # (N, r) fp32 = drop(x)·Aᵀ
        y = _matmul(x, w.t(), h, lora_b.t(), scale, bias, None)
        # x for dA (no (N, in) mask: the seed regenerates it), h (N, r) for dB, A and B for dX and
        # dH; the frozen weight as the parameter itself, or packed NF4 to re-dequantize in backward.
        ctx.save_for_backward(x, h, lora_A, lora_B, w if isinstance(weight, torch.Tensor) else None)
        ctx.nf4_weight = None if isinstance(weight, torch.Tensor) else weight
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
            dx = _matmul(dy, w, dh, lora_a, keep_scale, None, drop)  # dY·W + keep/(1−p) ⊙ dH·A
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
    from ``seed`` (default: a seed from torch's CPU generator, so ``torch.manual_seed`` and
    activation checkpointing reproduce it). Triton kernels when ``kernels.backend.use_triton``
    says so (CUDA tensors, or a forced mode) and x is fp32/bf16/fp16; else `lora_linear_ref`.
    Module docstring: the backward, what is saved, stride handling.
    """
    _check_inputs("lora_linear", x, weight, lora_A, lora_B, scale, dropout_p, bias)
    frozen = [name for name, t in (("weight", weight), ("bias", bias)) if isinstance(t, torch.Tensor) and t.requires_grad]
    if frozen and torch.is_grad_enabled():
        raise ValueError(f"lora_linear: {' and '.join(frozen)} requires grad, but the base layer is frozen "
                         f"(no gradient is computed for it); call .requires_grad_(False) on it")
    dense = weight if isinstance(weight, torch.Tensor) else None
    triton_path = x.dtype in _KERNEL_DTYPES and x.numel() > 0 and use_triton(x, dense, lora_A, lora_B, bias)
    dropping = training and dropout_p > 0
    if dropping and seed is None and (triton_path or kernel_mode() != "auto"):
        # the kernels' mask, from a seed drawn alike in both forced modes (A/B runs compare the same masks)
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if not triton_path:
        return lora_linear_ref(x, weight, lora_A, lora_B, scale, dropout_p, training, bias, seed=seed)
    drop = _Dropout(int(seed), float(dropout_p)) if dropping else None
    n_out, n_in = weight.shape
    y = LoRALinearFunction.apply(x.reshape(-1, n_in), weight, lora_A, lora_B, bias, float(scale), drop)
    return y.view(*x.shape[:-1], n_out)
