"""Gathered LoRA: every row of a batch adds the low-rank update of its own adapter (forward only).

Several adapters over one frozen base (`engine.adapters.multi`): K adapters of one linear layer
stacked as ``A`` (K, r, in) and ``B`` (K, out, r) (adapters of smaller rank zero-padded to the
largest r, which changes no product: the padded columns of h are exactly 0), with per-adapter
scales ``s`` (K,) fp32. For x flattened to (N, in), the base output y (N, out) and the adapter of
each row ``ids`` (N,) int64 (-1: no adapter, the base alone)::

    h[n]  = x[n] · A_kᵀ                 (r,)     k = ids[n]
    y[n] += s_k · h[n] · B_kᵀ           (out,)   rows with ids[n] = -1 are left as they are

in place on y (the base product's output, which the caller owns), in fp32 with one rounding to
y's dtype. It is inference only: there is no backward (a batch that mixes adapters is generated
from, never trained), and the op refuses inputs that require grad under autograd.

The kernels (a segmented, gathered low-rank product). Once per call, or once per batch when the
caller passes the `GatherRows` of its ids (`gather_rows`): the rows are sorted by adapter (a
stable ``argsort``, ``order`` (N,)) and ``offsets`` (K + 1,) are the cumulative counts, so that
the rows of adapter k are ``order[offsets[k] : offsets[k + 1]]`` (those of -1 come first and are
in no segment). Two launches, no host read of the counts:

1. ``_gather_shrink_kernel``: grid (row tiles, K, rank tiles); program (t, k, ·) takes the t-th
   BLOCK_M rows of adapter k's segment (it returns at once when the segment is shorter), loads
   those rows of x through ``order`` and computes their h = x·A_kᵀ (fp32) into h (N, r) at the
   rows' own positions.
2. ``_gather_expand_kernel``: grid (row tiles, K, column tiles); the same rows, ``y += s_k ·
   h·B_kᵀ`` on a (BLOCK_M, BLOCK_N) tile, h split in two 16-bit halves for the 16-bit MMA
   (`kernels.lowrank.dot_split`: ~16 bits of h kept).

Every row belongs to at most one segment, so each element of h and y is written by one program;
rows of -1 are never read or written. The grid has K·⌈N / BLOCK_M⌉ row programs of which only
⌈n_k / BLOCK_M⌉ per adapter do work: K is a handful of adapters, so the idle ones cost a launch
slot each. Decode (N = batch, one token a row) uses BLOCK_M = 16, the smallest tl.dot. fp32
accumulation; fp32 / bf16 / fp16 inputs (x, y, A, B of one dtype), fp32 scales.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting, use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch
from kernels.lowrank import KERNEL_DTYPES, dot, dot_precision, dot_split


class GatherRows(NamedTuple):
    """The rows of a batch sorted by adapter, computed once and shared by every layer's call."""

    ids: torch.Tensor  # (N,) int64, the adapter of each row, -1 for none
    order: torch.Tensor  # (N,) int64, row indices sorted by adapter id (stable)
    offsets: torch.Tensor  # (K + 1,) int64: adapter k's rows are order[offsets[k]:offsets[k + 1]]


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def lora_gather_ref(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scales: torch.Tensor, adapter_ids: torch.Tensor, *,
                    rows: GatherRows | None = None) -> torch.Tensor:
    """``y[n] += s_k · (x[n]·A_kᵀ)·B_kᵀ`` for k = ids[n] ≥ 0, in place on y (N, out); returns y.

    The definition of the op, in fp32 (float64 inputs: in float64): one (n_k, r) and one (n_k, out)
    product per adapter over its rows, added to y in fp32 and rounded once to y's dtype. ``rows``
    is accepted (and unused) so that the signature is the public op's.
    """
    check_gather_inputs("lora_gather_ref", y, x, lora_A, lora_B, scales, adapter_ids)
    ids, acc = adapter_ids.reshape(-1), torch.promote_types(x.dtype, torch.float32)  # fp32 (float64 stays)
    for k in range(lora_A.shape[0]):
        sel = (ids == k).nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        h = x[sel].to(acc) @ lora_A[k].to(acc).t()  # (n_k, r)
        delta = scales[k].to(acc) * (h @ lora_B[k].to(acc).t())  # (n_k, out)
        y[sel] = (y[sel].to(acc) + delta).to(y.dtype)
    return y


def check_gather_inputs(op: str, y, x, lora_A, lora_B, scales, adapter_ids) -> None:
    """Shapes, dtypes and devices; errors name the argument and what was expected."""
    for name, t in (("y", y), ("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("scales", scales),
                    ("adapter_ids", adapter_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 2 or y.dim() != 2 or lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{op}: expected x (N, in), y (N, out), lora_A (K, r, in), lora_B (K, out, r); got "
                         f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    (n, n_in), (k, r, _) = x.shape, lora_A.shape
    n_out = y.shape[1]
    if lora_A.shape != (k, r, n_in) or r == 0:
        raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected (K, r ≥ 1, in={n_in})")
    if lora_B.shape != (k, n_out, r):
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, expected (K={k}, out={n_out}, r={r})")
    if y.shape[0] != n or adapter_ids.shape != (n,):
        raise ValueError(f"{op}: y has {y.shape[0]} rows and adapter_ids shape {tuple(adapter_ids.shape)}; x has "
                         f"{n} rows")
    if scales.shape != (k,) or scales.dtype != torch.float32:
        raise ValueError(f"{op}: scales must be ({k},) float32, got {tuple(scales.shape)} {scales.dtype}")
    if adapter_ids.dtype != torch.int64:
        raise ValueError(f"{op}: adapter_ids must be int64, got {adapter_ids.dtype}")
    dtypes = {t.dtype for t in (y, x, lora_A, lora_B)}
    if len(dtypes) > 1 or not x.is_floating_point():
        raise ValueError(f"{op}: y, x, lora_A and lora_B must share one float dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (y, x, lora_A, lora_B, scales, adapter_ids)}
    if len(devices) > 1:
        raise ValueError(f"{op}: every operand must be on one device, got {sorted(map(str, devices))}")
    if adapter_ids.device.type == "cpu" and n and not bool(((adapter_ids >= -1) & (adapter_ids < k)).all()):
        raise ValueError(f"{op}: adapter_ids must lie in [-1, {k}), got {sorted(set(adapter_ids.tolist()))}")


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_rows(order_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """(positions in x of this program's rows, which are valid, adapter k): the program_id(0)-th
    BLOCK_M rows of adapter program_id(1)'s segment; ``ok`` is all False past its end."""
    k = tl.program_id(1)
    start, end = tl.load(offsets_ptr + k), tl.load(offsets_ptr + k + 1)
    pos = start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = pos < end
    return tl.load(order_ptr + pos, mask=ok, other=0), ok, k, start + tl.program_id(0) * BLOCK_M < end


@triton.jit
def _gather_shrink_kernel(
    x_ptr, a_ptr, h_ptr, order_ptr, offsets_ptr, D_IN, R,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_ai, stride_hm, stride_hr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """H[rows, R] = X[rows, D_IN] · A_kᵀ (fp32) for the rows of adapter k = program_id(1) in this
    program's tile of its segment; program_id(2): the BLOCK_R-column tile of the rank."""
    rows, row_ok, k, busy = _segment_rows(order_ptr, offsets_ptr, BLOCK_M)
    if busy:
        rs = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        ks = tl.arange(0, BLOCK_K)
        r_ok = rs < R
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
        a_ptrs = a_ptr + k.to(tl.int64) * stride_ak + ks[:, None] * stride_ai + rs[None, :] * stride_ar  # A_kᵀ
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            k_ok = k0 + ks < D_IN
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = dot(x, a, acc, DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ai
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + rs[None, :] * stride_hr
        tl.store(h_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _gather_expand_kernel(
    h_ptr, b_ptr, y_ptr, scale_ptr, order_ptr, offsets_ptr, D_OUT, R,
    stride_hm, stride_hr, stride_bk, stride_bn, stride_br, stride_ym, stride_yn,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[rows, D_OUT] += s_k · H[rows, R] · B_kᵀ in place, for the rows of adapter k = program_id(1)
    in this program's tile of its segment; program_id(2): the BLOCK_N-column tile of Y."""
    rows, row_ok, k, busy = _segment_rows(order_ptr, offsets_ptr, BLOCK_M)
    if busy:
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < D_OUT
        rs = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_ok = r0 + rs < R
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + (r0 + rs)[None, :] * stride_hr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptr + k.to(tl.int64) * stride_bk + (r0 + rs)[:, None] * stride_br + cols[None, :] * stride_bn,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # B_kᵀ tile (BLOCK_R, BLOCK_N)
            acc = dot_split(h, b, acc, DOT_PRECISION)
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
        y_mask = row_ok[:, None] & col_ok[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc * tl.load(scale_ptr + k)).to(y_ptr.dtype.element_ty), mask=y_mask)


# ---------------------------------------------------------------------------------------------
# 3. Launchers: block sizes, grids
# ---------------------------------------------------------------------------------------------

_NUM_WARPS = 4
# Under TRITON_INTERPRET (CPU tests): tiles smaller than the test shapes, so tails, several row
# tiles per segment and several column / reduction tiles are all exercised.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}


def _block_m(n_rows: int) -> int:
    """Rows per program: 16 (the smallest tl.dot) for decode-sized batches, up to 64 for a prefill."""
    return min(64, max(16, triton.next_power_of_2(max(n_rows, 1))))


def _blocks(n_rows: int, rank: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_M, BLOCK_K (shrink's reduction over in), BLOCK_N (expand's columns), BLOCK_R (16:
    the rank side stays one small tile; larger ranks take more shrink programs / expand steps).
    fp32 tiles are half as wide (IEEE dots hold their operands in registers)."""
    if interpreting():
        return {**_INTERPRETER_BLOCKS, "BLOCK_R": 16}
    wide = 64 if dtype == torch.float32 else 128
    return {"BLOCK_M": _block_m(n_rows), "BLOCK_K": wide, "BLOCK_N": wide, "BLOCK_R": 16}


def gather_rows(adapter_ids: torch.Tensor, num_adapters: int) -> GatherRows:
    """Sort the rows of ``adapter_ids`` (N,) by adapter: the segments of `lora_gather`'s kernels.
    Ids must lie in [-1, num_adapters) (checked by `check_gather_inputs`, which reads them)."""
    ids = adapter_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=num_adapters + 1)[:num_adapters + 1]  # [none, 0, …, K-1]
    return GatherRows(ids, order, torch.cumsum(counts, 0))


def _gather_triton_(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scales: torch.Tensor, rows: GatherRows) -> None:
    """The two launches: h = x·A_kᵀ per segment into an (N, r) fp32 buffer, then y += s_k·h·B_kᵀ."""
    (n, n_in), (k, r, _), n_out = x.shape, lora_A.shape, y.shape[1]
    b = _blocks(n, r, x.dtype)
    h = torch.empty((n, r), dtype=torch.float32, device=x.device)  # rows of -1 stay unwritten, never read
    row_tiles, prec = triton.cdiv(n, b["BLOCK_M"]), dot_precision(x.dtype)
    _gather_shrink_kernel[(row_tiles, k, triton.cdiv(r, b["BLOCK_R"]))](
        x, lora_A, h, rows.order, rows.offsets, n_in, r, *x.stride(), *lora_A.stride(), *h.stride(),
        DOT_PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_K=b["BLOCK_K"], BLOCK_R=b["BLOCK_R"], num_warps=_NUM_WARPS)
    _gather_expand_kernel[(row_tiles, k, triton.cdiv(n_out, b["BLOCK_N"]))](
        h, lora_B, y, scales, rows.order, rows.offsets, n_out, r, *h.stride(), *lora_B.stride(), *y.stride(),
        DOT_PRECISION=prec, BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"], BLOCK_R=b["BLOCK_R"], num_warps=_NUM_WARPS)


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """Every launch of `_gather_triton_` (kernels/launch_cases.py): per dtype and dot precision, each
    BLOCK_M `_block_m` picks (16: decode, 32, 64: prefill), at the (in, out) = (hidden,
    intermediate) layer with K = 4 stacked adapters of rank r = 16 (the rank only changes grid
    sizes and loop counts: BLOCK_R is always 16), A (K, r, in), B (K, out, r) and x, y, h
    contiguous, as `engine.adapters.multi` passes them."""
    n_in, n_out, r, k, f32, i64 = shapes.hidden, shapes.intermediate, 16, 4, torch.float32, torch.int64
    cases = []
    for dt in shapes.dtypes:
        precisions = ("ieee", "tf32") if dt == torch.float32 else ("tf32",)  # see kernels.lowrank.dot_precision
        wide = 64 if dt == f32 else 128
        for prec in precisions:
            for block_m in (16, 32, 64):
                tag = f"BLOCK_M={block_m} {prec}"
                shrink = dict(x_ptr=dt, a_ptr=dt, h_ptr=f32, order_ptr=i64, offsets_ptr=i64, D_IN=n_in, R=r,
                              stride_xm=n_in, stride_xk=1, stride_ak=r * n_in, stride_ar=n_in, stride_ai=1,
                              stride_hm=r, stride_hr=1)
                expand = dict(h_ptr=f32, b_ptr=dt, y_ptr=dt, scale_ptr=f32, order_ptr=i64, offsets_ptr=i64,
                              D_OUT=n_out, R=r, stride_hm=r, stride_hr=1, stride_bk=n_out * r, stride_bn=r, stride_br=1,
                              stride_ym=n_out, stride_yn=1)
                cases += [
                    KernelCase(f"shrink h = x·A_kᵀ {tag}", _gather_shrink_kernel, dt, shrink,
                               dict(DOT_PRECISION=prec, BLOCK_M=block_m, BLOCK_K=wide, BLOCK_R=16),
                               fixed_launch(_NUM_WARPS)),
                    KernelCase(f"expand y += s_k·h·B_kᵀ {tag}", _gather_expand_kernel, dt, expand,
                               dict(DOT_PRECISION=prec, BLOCK_M=block_m, BLOCK_N=wide, BLOCK_R=16),
                               fixed_launch(_NUM_WARPS)),
                ]
    return cases


# ---------------------------------------------------------------------------------------------
# 4. No autograd.Function: forward only (inference), see the module docstring
# 5. Public op
# ---------------------------------------------------------------------------------------------


def lora_gather(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scales: torch.Tensor, adapter_ids: torch.Tensor, *, rows: GatherRows | None = None) -> torch.Tensor:
    """``y[n] += s_k · (x[n]·A_kᵀ)·B_kᵀ`` with k = adapter_ids[n] (-1: nothing added), in place on
    y (N, out); returns y. x (N, in), lora_A (K, r, in), lora_B (K, out, r) in y's dtype,
    scales (K,) fp32, adapter_ids (N,) int64 (module docstring: the math and the kernels).

    ``rows``: `gather_rows(adapter_ids, K)` when the caller computed it once for the batch (every
    layer shares it); else it is computed here. Triton kernels when `kernels.backend.use_triton`
    says so and the dtype is fp32/bf16/fp16, else `lora_gather_ref`. Checks every operand (ids
    against K only on a CPU: no host read of a device tensor); `lora_gather_checked` is the same op
    for a caller that checked them once (`engine.adapters.multi.MultiLoRALinear`). Forward only:
    refuses operands that require grad while autograd is on.
    """
    check_gather_inputs("lora_gather", y, x, lora_A, lora_B, scales, adapter_ids)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B, y)):
        raise ValueError("lora_gather: forward only (inference); call it under torch.no_grad() or "
                         "torch.inference_mode()")
    return lora_gather_checked(y, x, lora_A, lora_B, scales, adapter_ids, rows=rows)


def lora_gather_checked(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scales: torch.Tensor, adapter_ids: torch.Tensor, *,
                        rows: GatherRows | None = None) -> torch.Tensor:
    """`lora_gather` without the per-call operand checks (a module whose stacked weights are fixed
    at construction and whose ids were checked when the batch was selected): no host time per
    layer and decode step."""
    if x.dtype not in KERNEL_DTYPES or x.shape[0] == 0 or not use_triton(y, x, lora_A, lora_B, scales, adapter_ids):
        return lora_gather_ref(y, x, lora_A, lora_B, scales, adapter_ids)
    rows = gather_rows(adapter_ids, lora_A.shape[0]) if rows is None else rows
    _gather_triton_(y, x, lora_A, lora_B, scales, rows)
    return y
