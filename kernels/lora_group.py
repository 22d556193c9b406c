"""Grouped LoRA linear: the frozen projections of one input, each with an optional LoRA, computed together.

Attention's q, k, v (and the MLP's gate, up) read the same ``x``. For members i = 1..G' with frozen
``W_i`` (out_i, in), bias ``b_i``, and for the adapted ones ``A_i`` (r, in), ``B_i`` (out_i, r),
scale ``s_i``, with x flattened to (N, in)::

    y   = [y_1 | y_2 | … | y_G']                                   (N, Σ out_i)
    y_i = x · W_iᵀ (+ b_i) + s_i · drop_i(x) · A_iᵀ · B_iᵀ          (no LoRA term for a plain member)

where ``drop_i`` has its own mask for each adapted member (PEFT gives every adapted module its own
``nn.Dropout``, so grouping changes nothing a user trained against). It equals
``torch.cat([lora_linear(x, W_i, A_i, B_i, s_i, p) …], -1)``, which is its reference
(`lora_linear_group_ref`). Number the adapted members g = 1..G in order; ``h_g = drop_g(x)·A_gᵀ``.

Backward, given dY = [dY_1 | …] (the chain rule of `kernels.lora` for each member, summed over
the members for the shared x)::

    dH_g = s_g · dY_g · B_g                                         (N, r)
    dX   = Σ_i dY_i · W_i  +  Σ_g (dH_g · A_g) ⊙ keep_g / (1 − p)   (N, in)
    dA_g = dH_gᵀ · drop_g(x)                                        (r, in)
    dB_g = s_g · dY_gᵀ · h_g                                        (out_g, r)

What is done once for the group instead of once per member:

* Quantized weights (NF4, int8: `kernels.frozen`) are dequantized into the rows of one (Σ out, in)
  buffer, and one cuBLAS GEMM computes ``x·W_catᵀ`` (and ``dY·W_cat`` for dX). Dense weights are not copied: each member's
  cuBLAS GEMM writes its column slice of y, and dX accumulates ``dY_i·W_i`` in place (addmm_).
  FP8 weights (`kernels.fp8_linear`) have their e4m3 codes and row scales concatenated (1 byte per
  weight), so x is quantized once and one FP8 product gives y; the product of member i's columns
  is the one it computes alone (the same codes of x, the same codes and scales of W_i). For dX
  each member's ``q(dY_i ⊙ s_iᵀ)·C_i`` is its own product, as alone: one row scale over the
  concatenated dY would put every member's gradient on the grid of the largest, so dY is
  quantized per member and the G products are summed into dX.
* The down-projection ``h = [h_1 | … | h_G]`` (N, G·r) is one launch of the `kernels.lowrank`
  down kernel over the concatenated ``[A_1; …; A_G]`` (column group g masked with seed g); the
  dropout term of dX is one launch of the up kernel that reads and writes dX once, not G times;
  ``dA`` for every group is one launch of the wgrad kernel.
* Per adapted member, on slices of the shared buffers (no copies): ``y_g += s_g·h_g·B_gᵀ``,
  ``dH_g``, ``dB_g``.

Grouping needs one rank r and one dropout p over the adapted members and one kind of weight (all
dense in x's dtype, all dequantized formats, or all FP8); otherwise (PEFT's ``rank_pattern``
giving q and v different ranks, FP8 beside another format) `lora_linear_group` computes each
member with `lora_linear` and concatenates — the same result.

Saved for backward, as in `kernels.lora`: x, h (N, G·r) fp32, the A and B tensors, the weights by
reference (quantized: their codes, dequantized again for dX — or, under
`kernels.nf4.keep_dequantized`, the (Σ out, in) buffer of the recompute; FP8: the members' own
codes, the concatenated ones freed after the forward), the seeds.
Dropout seeds: a (G,) int64 tensor on x's device, drawn there by ``torch.randint`` when not given
(the same values, on a CPU generator, as G successive one-element draws of the per-member path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kernels.backend import use_triton
from kernels.fp8 import FP8Tensor
from kernels.fp8_linear import fp8_grad_input, fp8_matmul
from kernels.frozen import FrozenWeight, dequantize_frozen, frozen_linear, storage
from kernels.lora import lora_linear_checked, lora_linear_ref
from kernels.lowrank import KERNEL_DTYPES, Dropout, lowrank_down, lowrank_up_, lowrank_wgrad
from kernels.nf4 import keeping_dequantized


class GroupMember(NamedTuple):
    """One projection of the group: its frozen weight and bias, and its LoRA when it has one."""

    weight: FrozenWeight  # (out, in), frozen: dense in x's dtype, or quantized (kernels.frozen)
    bias: torch.Tensor | None = None  # (out,), frozen
    lora_A: torch.Tensor | None = None  # (r, in); None: a plain linear member
    lora_B: torch.Tensor | None = None  # (out, r)
    scale: float = 0.0  # s = alpha / r
    dropout_p: float = 0.0  # in force now (0 outside training)

    @property
    def adapted(self) -> bool:
        return self.lora_A is not None


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def lora_linear_group_ref(x: torch.Tensor, members: Sequence[GroupMember], *, seeds=None) -> torch.Tensor:
    """``cat([y_1, …], -1)`` (..., Σ out) with each ``y_i`` by `lora_linear_ref` (dropout of the
    g-th adapted member from ``seeds[g]`` when given, else from torch's generator)."""
    outs, g = [], 0
    for m in members:
        if not m.adapted:
            outs.append(frozen_linear(x, m.weight, m.bias))
            continue
        seed = None if seeds is None else int(seeds[g])
        outs.append(lora_linear_ref(x, m.weight, m.lora_A, m.lora_B, m.scale, m.dropout_p, m.dropout_p > 0,
                                    m.bias, seed=seed))
        g += 1
    return torch.cat(outs, dim=-1)


# ---------------------------------------------------------------------------------------------
# 2–3. Kernels and launchers: those of `kernels.lowrank` (down / up / wgrad with column groups)
# ---------------------------------------------------------------------------------------------


class _Group(NamedTuple):
    """What the autograd.Function needs besides the tensors it differentiates."""

    members: tuple[GroupMember, ...]
    slices: tuple[tuple[int, int], ...]  # each member's columns [start, end) of y
    rank: int  # r of every adapted member (0: none adapted)
    drop: Dropout | None


def _group(members: Sequence[GroupMember], drop: Dropout | None) -> _Group:
    slices, start = [], 0
    for m in members:
        slices.append((start, start + m.weight.shape[0]))
        start += m.weight.shape[0]
    rank = next((m.lora_A.shape[0] for m in members if m.adapted), 0)
    return _Group(tuple(members), tuple(slices), rank, drop)


def _cat_bias(members: Sequence[GroupMember], x: torch.Tensor) -> torch.Tensor | None:
    """The concatenated bias (Σ out,), zeros for members without one; None when no member has one."""
    if all(m.bias is None for m in members):
        return None
    return torch.cat([m.bias.to(x.dtype) if m.bias is not None else x.new_zeros(m.weight.shape[0]) for m in members])


def _dequantized_cat(members: Sequence[GroupMember], slices, dtype: torch.dtype) -> torch.Tensor:
    """The quantized (NF4, int8) weights dequantized into the rows of one (Σ out, in) buffer."""
    n_in = members[0].weight.shape[1]
    w = torch.empty((slices[-1][1], n_in), dtype=dtype, device=members[0].weight.device)
    for m, (a, b) in zip(members, slices):
        dequantize_frozen(m.weight, dtype, out=w[a:b])
    return w


def _fp8_cat(members: Sequence[GroupMember]) -> FP8Tensor:
    """The FP8 weights as one (Σ out, in) `FP8Tensor`: their codes and row scales concatenated (the
    codes as bytes, which every torch concatenates on every device)."""
    weights = [m.weight for m in members]
    codes = torch.cat([w.codes.view(torch.uint8) for w in weights]).view(weights[0].codes.dtype)
    return FP8Tensor(codes, torch.cat([w.scale for w in weights]), weights[0].dtype)


def _fp8_grad_input(dy: torch.Tensor, members: Sequence[GroupMember], slices) -> torch.Tensor:
    """``Σ_i q(dY_i ⊙ s_iᵀ)·C_i`` (N, in): each member's FP8 dX product, as it computes it alone."""
    dx = None
    for m, (a, b) in zip(members, slices):
        part = fp8_grad_input(dy[:, a:b], m.weight)
        dx = part if dx is None else dx.add_(part)
    return dx


def _adapted(group: _Group):
    """(index among the adapted g, member, its columns) for every adapted member."""
    adapted = [(m, sl) for m, sl in zip(group.members, group.slices) if m.adapted]
    return [(g, m, sl) for g, (m, sl) in enumerate(adapted)]


# ---------------------------------------------------------------------------------------------
# 4. autograd.Function
# ---------------------------------------------------------------------------------------------


class GroupedLoRALinearFunction(torch.autograd.Function):
    """2-D core: x (N, in) → y (N, Σ out). ``lora`` = A_1, B_1, A_2, B_2, … of the adapted members."""

    @staticmethod
    def forward(ctx, x, group: _Group, *lora):
        members, slices, r, drop = group
        fp8 = isinstance(members[0].weight, FP8Tensor)
        dequantized = not fp8 and not isinstance(members[0].weight, torch.Tensor)  # NF4, int8
        w_cat = None
        if fp8:  # x quantized once, one FP8 product over the concatenated codes
            y, bias = fp8_matmul(x, _fp8_cat(members)), _cat_bias(members, x)
            if bias is not None:
                y += bias
        elif dequantized:  # one dequantized buffer, one GEMM
            w_cat = _dequantized_cat(members, slices, x.dtype)
            bias = _cat_bias(members, x)
            y = torch.mm(x, w_cat.t()) if bias is None else torch.addmm(bias, x, w_cat.t())
        else:  # no copy of the weights: each GEMM writes its columns of y
            y = torch.empty((x.shape[0], slices[-1][1]), dtype=x.dtype, device=x.device)
            for m, (a, b) in zip(members, slices):
                if m.bias is None:
                    torch.mm(x, m.weight.t(), out=y[:, a:b])
                else:
                    torch.addmm(m.bias, x, m.weight.t(), out=y[:, a:b])
        h = None
        if lora:
            a_cat = torch.cat([A.to(x.dtype) for A in lora[0::2]])  # (G·r, in)
            keep_scale = 1.0 / (1.0 - drop.p) if drop else 1.0
            # one group per adapter only when masks differ; without dropout one (N, G·r) product
            h = lowrank_down(x, a_cat.t(), keep_scale, drop, group_r=r if drop else None)
            for g, m, (a, b) in _adapted(group):
                lowrank_up_(y[:, a:b], h[:, g * r:(g + 1) * r], lora[2 * g + 1].to(x.dtype).t(), m.scale, None)
        keep_dense = dequantized and keeping_dequantized()  # see kernels/lora.py: the recompute's copy feeds the backward
        # x only for dA (no adapter: dX needs the weights alone)
        ctx.save_for_backward(x if lora else None, h, *lora, w_cat if keep_dense else None)
        ctx.group, ctx.x_meta = group, (x.shape[0], x.dtype, x.device)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, *lora, w_cat = ctx.saved_tensors
        group = ctx.group
        members, slices, r, drop = group
        n, dtype, device = ctx.x_meta
        dy = dy.to(dtype)
        keep_scale = 1.0 / (1.0 - drop.p) if drop else 1.0
        adapted = _adapted(group)
        grads = [None] * len(lora)
        dh = None
        if lora and (ctx.needs_input_grad[0] or any(ctx.needs_input_grad[2::2])):
            dh = torch.empty((n, len(adapted) * r), dtype=torch.float32, device=device)
            for g, m, (a, b) in adapted:  # dH_g = s_g·dY_g·B_g
                lowrank_down(dy[:, a:b], lora[2 * g + 1].to(dtype), m.scale, None, out=dh[:, g * r:(g + 1) * r])
        dx = None
        if ctx.needs_input_grad[0]:
            if isinstance(members[0].weight, FP8Tensor):
                dx = _fp8_grad_input(dy, members, slices)
            elif not isinstance(members[0].weight, torch.Tensor):
                w = w_cat if w_cat is not None else _dequantized_cat(members, slices, dtype)
                dx = torch.mm(dy, w)
            else:
                for m, (a, b) in zip(members, slices):
                    dx = torch.mm(dy[:, a:b], m.weight) if dx is None else dx.addmm_(dy[:, a:b], m.weight)
            if lora:  # += Σ_g keep_g/(1−p) ⊙ dH_g·A_g, dX read and written once
                a_cat = torch.cat([A.to(dtype) for A in lora[0::2]])
                lowrank_up_(dx, dh, a_cat, keep_scale, drop, group_r=r if drop else None)
        if lora and any(ctx.needs_input_grad[2::2]):
            d_a = lowrank_wgrad(dh, x, keep_scale, drop, group_r=r if drop else None)  # (G·r, in): dH_gᵀ·drop_g(x)
            for g in range(len(adapted)):
                grads[2 * g] = d_a[g * r:(g + 1) * r].to(lora[2 * g].dtype)
        for g, m, (a, b) in adapted:
            if ctx.needs_input_grad[2 + 2 * g + 1]:  # dB_g = s_g·dY_gᵀ·h_g
                grads[2 * g + 1] = lowrank_wgrad(h[:, g * r:(g + 1) * r], dy[:, a:b], m.scale, None).t().contiguous() \
                    .to(lora[2 * g + 1].dtype)
        return (dx, None, *grads)


# ---------------------------------------------------------------------------------------------
# 5. Public op
# ---------------------------------------------------------------------------------------------


def lora_linear_group(x: torch.Tensor, members: Sequence[GroupMember], *, seeds=None) -> torch.Tensor:
    """``cat([y_1, …, y_G'], -1)`` for x (..., in) → (..., Σ out), ``y_i`` as `kernels.lora.lora_linear`
    computes it for member i (module docstring: the formula, the backward, what is shared).

    Operands are not checked per call (the modules that build the members checked them once, as
    for `lora_linear_checked`). ``seeds``: the dropout seeds of the adapted members, a (G,) int64
    tensor on x's device or G ints (default: drawn from torch's generator of x's device). The
    Triton kernels run when `kernels.backend.use_triton` says so and the members can be grouped
    (one rank, one dropout p, one kind of weight); otherwise each member runs as its own op —
    exactly what its module would compute alone — and the outputs are concatenated.
    """
    adapted = [m for m in members if m.adapted]
    if not _groupable(x, members, adapted):
        return torch.cat(_each(x, members, seeds), dim=-1)
    p = adapted[0].dropout_p if adapted else 0.0
    drop = Dropout(_seeds(seeds, len(adapted), x.device), float(p)) if p > 0 else None
    lora = [t for m in adapted for t in (m.lora_A, m.lora_B)]
    n_in = x.shape[-1]
    y = GroupedLoRALinearFunction.apply(x.reshape(-1, n_in), _group(members, drop), *lora)
    return y.view(*x.shape[:-1], y.shape[-1])


def _groupable(x: torch.Tensor, members: Sequence[GroupMember], adapted: Sequence[GroupMember]) -> bool:
    """Whether the grouped kernels apply: Triton chosen, a kernel dtype, one weight kind, one (r, p)."""
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0:
        return False
    fp8 = [isinstance(m.weight, FP8Tensor) for m in members]
    if any(fp8) and not all(fp8):  # FP8 products cannot share a buffer with dequantized weights
        return False
    dense = [m.weight for m in members if isinstance(m.weight, torch.Tensor)]
    if dense and (len(dense) != len(members) or any(w.dtype != x.dtype for w in dense)):
        return False
    if len({(m.lora_A.shape[0], m.dropout_p) for m in adapted}) > 1:
        return False
    tensors = [x, *dense, *(t for m in members for t in (m.bias, m.lora_A, m.lora_B))]
    return use_triton(*tensors) if dense else use_triton(*tensors, storage(members[0].weight))


def _each(x: torch.Tensor, members: Sequence[GroupMember], seeds) -> list[torch.Tensor]:
    """Each member as its module alone computes it (`lora_linear_checked`, `kernels.frozen.frozen_linear`)."""
    outs, g = [], 0
    for m in members:
        if m.adapted:
            seed = None if seeds is None else seeds[g]
            outs.append(lora_linear_checked(x, m.weight, m.lora_A, m.lora_B, m.scale, m.dropout_p, m.dropout_p > 0,
                                            m.bias, seed=seed))
            g += 1
        else:
            outs.append(frozen_linear(x, m.weight, m.bias))
    return outs


def _seeds(seeds, count: int, device: torch.device) -> torch.Tensor:
    """The (G,) int64 seed tensor on ``device``: drawn there when ``seeds`` is None (no host read)."""
    if seeds is None:
        return torch.randint(0, 2**31 - 1, (count,), device=device)
    if isinstance(seeds, torch.Tensor):
        return seeds.reshape(count).to(device=device, dtype=torch.int64)
    return torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)
