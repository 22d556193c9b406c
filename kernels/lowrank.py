"""Low-rank building blocks of the LoRA ops: the three Triton kernels, their launchers and the dropout mask.

`kernels.lora` (one adapter), `kernels.lora_group` (q/k/v or gate/up sharing x) and
`kernels.lora_gather` (each row its own adapter) compute the frozen base product with cuBLAS and
only the low-rank update here. For x (M, K), c (M, N), a rank side of R columns in fp32, ``s`` a
scale and ``drop(x) = x ⊙ keep`` (the kernels' Philox mask; the 1/(1 − p) goes into ``s``)::

    lowrank_down:   H  = s · drop_g(X) · U                   X (M, K), U (K, R)  → H (M, R) fp32
    lowrank_up_:    C += s · Σ_g [keep_g ⊙] (H_g · U_g)      H (M, R) fp32, U (R, N), in place on C
    lowrank_wgrad:  G  = s · Lᵀ · drop_g(X)                  L (M, R) fp32, X (M, N)  → G (R, N) fp32

The LoRA forward is ``h = lowrank_down(x, Aᵀ, 1/(1−p), drop)``, ``lowrank_up_(y, h, Bᵀ, s)``;
its backward ``dH = lowrank_down(dY, B, s)``, ``lowrank_up_(dX, dH, A, 1/(1−p), drop)``,
``dA = lowrank_wgrad(dH, x, 1/(1−p), drop)``, ``dBᵀ = lowrank_wgrad(h, dY, s)`` (the chain rule is
written out in `kernels.lora`). Kernels: ``_lowrank_down_kernel`` (dropout fused into the load
of x), ``_lowrank_up_kernel`` (reads and writes C once; H split into two 16-bit halves by
`dot_split`, so the fp32 h keeps ~16 bits; the dropout mask drawn in this rank-r tile, never
inside a big GEMM tile), ``_lowrank_wgrad_kernel`` (a reduction over the M tokens, split across
programs and summed by the launcher). `dot` / `dot_split` / `dot_precision` are shared with
`kernels.lora_gather`'s kernels.

Dropout mask: ``keep[i, j] = U(seed, i·K + j) ≥ p`` with U Triton's ``tl.rand`` (Philox-4x32-10),
regenerated from the seed by each kernel that needs it, so no (M, K) mask is ever stored. The seed
is a device tensor that the kernels load (`Dropout`: no host read). `dropout_keep_mask` is the
same mask in plain torch, bit for bit; `lowrank_down_ref`, `lowrank_up_ref` and
`lowrank_wgrad_ref` are the three products in fp32 torch, with that mask (tests/kernels/test_lowrank.py).

Groups (`kernels.lora_group`): the R columns of H are R / GROUP_R groups of GROUP_R (the G
adapters' columns side by side, R = G·r, GROUP_R = r) and column group g draws its dropout mask
from its own seed ``seed[g]`` (one adapter: G = 1, GROUP_R = R); a down or wgrad tile never
straddles two groups, and the up kernel sums the groups' masked products in one pass over C.

Strides: every 2-D operand is passed with its own row/column strides, so transposed or sliced
views run without a copy. Inputs fp32/bf16/fp16 (`KERNEL_DTYPES`), accumulation in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.launch_cases import KernelCase, ModelShapes

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take; float64 runs references


class Dropout(NamedTuple):
    """The dropout of a launch: keep = rand(seed[g], i·n_cols + j) ≥ p (None: no dropout)."""

    seed: torch.Tensor  # (G,) int64 on the device, one per adapter group: the kernels load it, the host never
    p: float            # reads it (G = 1 for one adapter)


# ---------------------------------------------------------------------------------------------
# 1. Reference: the dropout mask and the three products, in plain torch
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


def _dropped(t: torch.Tensor, drop: Dropout | None, group: int) -> torch.Tensor:
    """``t`` (M, n) fp32 with group ``group``'s keep-mask over its (M, n) elements (no 1/(1−p))."""
    if drop is None:
        return t.float()
    keep = dropout_keep_mask(int(drop.seed[group]), *t.shape, drop.p, t.device)
    return torch.where(keep, t.float(), 0.0)


def lowrank_down_ref(x, u, scale, drop=None, group_r=None, out=None) -> torch.Tensor:
    """`lowrank_down` in fp32 torch: ``scale · drop_g(x) · u_g`` per column group g, (M, R)."""
    r = u.shape[1]
    gr = group_r or r
    h = scale * torch.cat([_dropped(x, drop, g) @ u[:, g * gr:(g + 1) * gr].float() for g in range(r // gr)], 1)
    return h if out is None else out.copy_(h)


def lowrank_up_ref(c, h, u, scale, drop=None, group_r=None) -> None:
    """`lowrank_up_` in fp32 torch: ``c += scale · Σ_g [keep_g ⊙] (h_g · u_g)`` in place, rounded once."""
    r = h.shape[1]
    gr = group_r or r
    acc = sum(_dropped(h[:, g * gr:(g + 1) * gr].float() @ u[g * gr:(g + 1) * gr].float(), drop, g)
              for g in range(r // gr))
    c.copy_((c.float() + scale * acc).to(c.dtype))


def lowrank_wgrad_ref(lo, x, scale, drop=None, group_r=None) -> torch.Tensor:
    """`lowrank_wgrad` in fp32 torch: rows of group g are ``scale · lo_gᵀ · drop_g(x)``, (R, N)."""
    r = lo.shape[1]
    gr = group_r or r
    return scale * torch.cat([lo[:, g * gr:(g + 1) * gr].float().t() @ _dropped(x, drop, g) for g in range(r // gr)])


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------


# Triton's CPU interpreter multiplies bf16 tl.dot operands wrongly (garbage of order 1e10 with
# triton 3.9), while fp32 is exact; there bf16 tiles go through fp32, which gives the same
# products and fp32 sums that a GPU's bf16 MMA gives.
_INTERPRETER_BF16_DOT_IN_FP32 = tl.constexpr(interpreting())


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a·b`` with fp32 accumulation (``tl.dot``, see the interpreter note above)."""
    if _INTERPRETER_BF16_DOT_IN_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dot_split(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a·b`` for an fp32 ``a`` (h or dH) and a 16-bit ``b``, to ~16 bits of ``a``: a = hi + lo,
    both in b's dtype, two MMAs. Rounding ``a`` once would cost 8 bits (bf16) on every term of
    the token reductions of dA and dB; the second MMA is on the rank-r side, so it is ~free."""
    if b.dtype == tl.float32:
        return dot(a, b, acc, DOT_PRECISION)
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    return dot(lo, b, dot(hi, b, acc, DOT_PRECISION), DOT_PRECISION)


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
        acc = dot(x, u, acc, DOT_PRECISION)
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
                acc_g = dot_split(h, u, acc_g, DOT_PRECISION)
            acc += tl.where(_keep_mask(tl.load(seed_ptr + g0 // GROUP_R), rows, cols, N, p), acc_g, 0.0)
    else:
        for r0 in range(0, R, BLOCK_R):
            r_ok = r0 + rs < R
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + (r0 + rs)[None, :] * stride_hr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            u = tl.load(u_ptr + (r0 + rs)[:, None] * stride_ur + cols[None, :] * stride_un,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot_split(h, u, acc, DOT_PRECISION)
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
        acc = dot_split(tl.trans(lo), x, acc, DOT_PRECISION)
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


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE fp32 like torch's default, TF32 only where torch allows it for matmuls.
    (bf16/fp16 inputs ignore it; "tf32" is Triton's default there.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _seed_ptr(drop: Dropout | None, unused: torch.Tensor) -> torch.Tensor:
    """The seed tensor; without dropout any tensor (the kernel never reads it then)."""
    return drop.seed if drop else unused


def _p(drop: Dropout | None) -> float:
    return drop.p if drop else 0.0


def _groups(r: int, group_r: int | None) -> tuple[int, int]:
    """(rank per group, number of groups) of R = r columns; None: one group."""
    group_r = r if group_r is None else group_r
    return group_r, r // group_r


def lowrank_down(x: torch.Tensor, u: torch.Tensor, scale: float, drop: Dropout | None,
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
            *h.stride(), scale, _p(drop), DROPOUT=drop is not None, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=block_r)
    return h


def lowrank_up_(c: torch.Tensor, h: torch.Tensor, u: torch.Tensor, scale: float, drop: Dropout | None,
                 group_r: int | None = None) -> None:
    """``c += scale · Σ_g [keep_g ⊙] (h_g · u_g)`` in place, for c (M, N), h (M, R) fp32, u (R, N),
    any strides; the R columns of h (rows of u) in groups of ``group_r`` (default: one group)."""
    (m, n), r = c.shape, h.shape[1]
    group_r, _ = _groups(r, group_r)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _launch(_lowrank_up_kernel, _tuned(_UP_TUNED, drop, c), grid, ("BLOCK_M", "BLOCK_N"),
            h, u, c, _seed_ptr(drop, h), m, n, r, group_r, triton.next_power_of_2(m), *h.stride(), *u.stride(),
            *c.stride(), scale, _p(drop), DROPOUT=drop is not None, DOT_PRECISION=dot_precision(c.dtype),
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


def lowrank_wgrad(lo: torch.Tensor, x: torch.Tensor, scale: float, drop: Dropout | None,
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
            DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r)
    return g.sum(0) if splits > 1 else g[0]


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """Every launch of `lowrank_down`, `lowrank_up_` and `lowrank_wgrad` in
    `kernels.lora.LoRALinearFunction` and in `kernels.lora_group` (kernels/launch_cases.py), at the
    (in, out) = (hidden, intermediate) layer (gate/up; q/k/v/o and down differ only in
    multiple-of-16 sizes), for each rank, dtype and dot precision, with the operands' strides as
    the autograd.Functions pass them: W (out, in) and A (r, in), B (out, r) contiguous, so
    ``lora_b.t()``/``lora_a.t()`` have unit row stride. The grouped op (G = 2, 3 adapters side by
    side: R = G·r; GROUP_R = r with dropout, else one group of G·r) works on slices of the
    concatenated output, whose row stride is Σ out (here 2·out). Cases that compile to the same
    binary are compiled once by the check. Edit this list when a launch in either file changes."""
    M, K, N, f32, i64 = shapes.tokens, shapes.hidden, shapes.intermediate, torch.float32, torch.int64
    m_bucket, cases = triton.next_power_of_2(M), []
    for dt in shapes.dtypes:
        precisions = ("ieee", "tf32") if dt == torch.float32 else ("tf32",)  # see dot_precision
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
