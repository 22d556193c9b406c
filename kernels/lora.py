"""LoRA linear: a frozen base product plus a trainable low-rank update, fused forward and backward.

Formula, for ``x`` of shape ``(..., in)`` flattened to ``(N, in)``::

    drop(x) = x ⊙ keep / (1 − p)          keep ∈ {0, 1}^(N, in), P(keep = 1) = 1 − p
    h       = drop(x) · Aᵀ                (N, r)      the low-rank down-projection
    y       = x · Wᵀ (+ bias) + s · h · Bᵀ  (N, out)

with ``W`` (out, in) frozen: dense fp32/bf16/fp16, or a quantized weight of `kernels.frozen` (NF4 or
int8 dequantized to x's dtype; FP8, whose products run in FP8, `kernels.fp8_linear`),
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
only the low-rank update is ours, in three small Triton kernels of `kernels.lowrank`:
(1) ``_lowrank_down_kernel``: h = drop(x)·Aᵀ in fp32, dropout fused into the load of x (and dH by
the same kernel with U = B, no dropout); (2) ``_lowrank_up_kernel``: C += scale · [keep ⊙] (H·U)
in place on the cuBLAS output, H split into two 16-bit halves so the fp32 h keeps ~16 bits (the
forward adds s·h·Bᵀ to y; the backward adds keep/(1−p) ⊙ dH·A to dX, the dropout mask drawn in
this rank-r kernel, never inside a big GEMM tile); (3) ``_lowrank_wgrad_kernel``: dA and dBᵀ as
reductions over the N tokens, split across programs and summed. The up-projection reads and
writes C once more (N·out elements): ~10 % of the GEMM's time at N = 4096, bench_lora measures it.
NF4 and int8 weights are dequantized (`kernels.frozen.dequantize_frozen`, their Triton kernels on a
GPU) into a temporary that the GEMM reads: the dequantization moves ~2.6 bytes per weight against the GEMM's
2·N flops per weight. Under gradient checkpointing the recompute keeps its dequantized weight for
the backward that follows at once (`kernels.nf4.keep_dequantized`), so each NF4 weight is
dequantized twice per step (forward, recompute), not three times. An FP8 base has no dense copy:
``x·Wᵀ`` and ``dY·W`` are its row-scaled e4m3 products (`kernels.frozen.base_product`).

Dropout mask: ``keep[i, j] = U(seed, i·in + j) ≥ p`` with U Triton's ``tl.rand`` (Philox-4x32-10).
The forward, the dX up-projection and the dA kernel regenerate it from the seed, so no (N, in)
mask is stored. The kernels read the seed from a one-element int64 tensor on the device: without a
``seed`` argument the public op draws it there with ``torch.randint`` (the device's generator, which
``torch.manual_seed`` fixes and activation checkpointing replays), so no call reads anything on
the host. ``dropout_keep_mask`` (`kernels.lowrank`) recomputes the same mask in plain torch, bit
for bit, so the reference given the same ``seed`` applies the same mask as the kernels; when the
kernel mode is forced (``ENGINE_KERNELS=reference`` or ``triton``) both draw the seed alike from
torch's generator, so that A/B runs and tests compare the same masks; in the default ``auto`` mode
the reference (a CPU run) draws a cheaper mask from torch's generator instead.

Saved for backward: ``x`` (needed for dA; it is the layer input that autograd keeps alive
anyway), ``h`` (N, r) in fp32 (tiny: r ≪ in; recomputing it would re-read x), ``lora_A``,
``lora_B``, the base weight (a reference to the frozen parameter; for NF4 the small packed object,
dequantized again in backward rather than keeping a dense (out, in) copy alive between the
forward and the backward — except under `kernels.nf4.keep_dequantized`, i.e. gradient
checkpointing, where the forward's copy is dropped at once and the recompute's lives until the
backward that follows), and the seed tensor. Never drop(x) or the mask (N, in), never a gradient
buffer for W.

Groups: the same kernels serve `kernels.lora_group` (q/k/v or gate/up sharing x): the G
adapters' columns of h side by side, each column group with its own dropout seed.

Strides: every 2-D operand is passed to the kernels with its own row/column strides, so
transposed or sliced 2-D views run without a copy; leading dims of x are flattened with
``reshape`` (a copy only when they cannot be viewed). The kernels cover fp32/bf16/fp16; float64
(gradcheck) always runs the reference.
"""

from __future__ import annotations

import math

import torch

from kernels.backend import kernel_mode, use_triton
from kernels.lowrank import (  # compile_cases: this op's launches (and lora_group's), re-exported
    KERNEL_DTYPES,
    Dropout,
    compile_cases,  # noqa: F401
    dropout_keep_mask,
    lowrank_down,
    lowrank_up_,
    lowrank_wgrad,
)
from kernels.fp8 import FP8Tensor
from kernels.fp8_linear import fp8_linear
from kernels.frozen import QUANTIZED_TYPES, base_grad_input, base_product, dequantize_frozen

# ---------------------------------------------------------------------------------------------
# 1. Reference: the math, in plain torch (differentiated by autograd)
# ---------------------------------------------------------------------------------------------


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor in ``dtype`` (a quantized one is dequantized)."""
    return weight if isinstance(weight, torch.Tensor) else dequantize_frozen(weight, dtype)


def lora_linear_ref(x, weight, lora_A, lora_B, scale, dropout_p=0.0, training=False, bias=None, *,
                    seed=None):
    """``x·Wᵀ (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ`` in x's dtype; the definition of the op.

    ``lora_A``/``lora_B`` are cast to x's dtype (they may be kept in fp32). Dropout (``training``
    and ``dropout_p > 0``): with ``seed`` the kernels' Philox mask (`dropout_keep_mask`), else a
    mask from torch's generator. See the module docstring for shapes and the backward.
    """
    _check_inputs("lora_linear_ref", x, weight, lora_A, lora_B, scale, dropout_p, bias)
    dropped = x
    if training and dropout_p > 0:
        n_in = x.shape[-1]
        if seed is None:
            keep = torch.rand(x.shape, device=x.device) >= dropout_p
        else:
            keep = dropout_keep_mask(seed, x.numel() // n_in, n_in, dropout_p, x.device).view(x.shape)
        dropped = x * keep / (1.0 - dropout_p)
    h = dropped @ lora_A.to(x.dtype).t()  # (..., r)
    # an FP8 base computes its product in FP8 (activations quantized too), the others densely
    base = fp8_linear(x, weight) if isinstance(weight, FP8Tensor) else x @ dense_weight(weight, x.dtype).t()
    y = base + scale * (h @ lora_B.to(x.dtype).t())
    return y if bias is None else y + bias


def _check_inputs(op, x, weight, lora_A, lora_B, scale, dropout_p, bias) -> None:
    """Shapes, dtypes and devices of the operands; errors name the argument and what was expected."""
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {type(t).__name__}"
                            f"{'' if not isinstance(t, torch.Tensor) else ' of ' + str(t.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., in), got a 0-d tensor")
    if not isinstance(weight, (torch.Tensor, *QUANTIZED_TYPES)) or len(weight.shape) != 2:
        raise ValueError(f"{op}: weight must be a 2-D (out, in) tensor, NF4Tensor, Int8Tensor or FP8Tensor, "
                         f"got {type(weight).__name__}")
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
# 2–3. Kernels and launchers: those of `kernels.lowrank` (down / up / wgrad, the dropout mask)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 4. autograd.Function
# ---------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """2-D core: x (N, in) → y (N, out). ``weight`` dense or quantized; gradients for x, lora_A, lora_B."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale: float, drop: Dropout | None):
        lora_a, lora_b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        keep_scale = 1.0 / (1.0 - drop.p) if drop else 1.0
        y, w = base_product(x, weight, bias)  # cuBLAS x·Wᵀ (N, out) (FP8: its scaled product)
        h = lowrank_down(x, lora_a.t(), keep_scale, drop)  # (N, r) fp32 = drop(x)·Aᵀ
        lowrank_up_(y, h, lora_b.t(), scale, None)  # y += s·h·Bᵀ
        # x for dA (no (N, in) mask: the seed regenerates it), h (N, r) for dB, A and B for dX and
        # dH; the frozen weight as the parameter itself, or the quantized one to re-dequantize in
        # backward (the dense copy only under checkpointing: dropped after the forward, the
        # recompute's feeds the backward that runs right after; FP8 never has one).
        ctx.save_for_backward(x, h, lora_A, lora_B, w)
        ctx.frozen_weight = None if w is not None else weight
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
            dh = lowrank_down(dy, lora_b, s, None)  # (N, r) = s·dY·B
        if ctx.needs_input_grad[0]:
            dx = base_grad_input(dy, ctx.frozen_weight, w)  # cuBLAS dY·W (N, in)
            lowrank_up_(dx, dh, lora_a, keep_scale, drop)  # += keep/(1−p) ⊙ dH·A
        if ctx.needs_input_grad[2]:
            d_a = lowrank_wgrad(dh, x, keep_scale, drop).to(lora_A.dtype)  # dHᵀ·drop(x)
        if ctx.needs_input_grad[3]:
            d_b = lowrank_wgrad(h, dy, s, None).t().contiguous().to(lora_B.dtype)  # s·dYᵀ·h
        return dx, None, d_a, d_b, None, None, None


# ---------------------------------------------------------------------------------------------
# 5. Public op
# ---------------------------------------------------------------------------------------------


def lora_linear(x, weight, lora_A, lora_B, scale, dropout_p=0.0, training=False, bias=None, *, seed=None):
    """``y = x·Wᵀ (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ`` for x (..., in) → (..., out).

    ``weight``: frozen (out, in) tensor in x's dtype, or an NF4/int8/FP8 tensor; ``lora_A`` (r, in),
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
    triton_path = x.dtype in KERNEL_DTYPES and x.numel() > 0 and use_triton(x, dense, lora_A, lora_B, bias)
    dropping = training and dropout_p > 0
    if not triton_path:
        if dropping and seed is None and kernel_mode() != "auto":
            # the kernels' mask, from a seed drawn as the Triton path draws it (A/B runs compare the same masks)
            seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device).item())
        if isinstance(seed, torch.Tensor):
            seed = int(seed.item())
        return lora_linear_ref(x, weight, lora_A, lora_B, scale, dropout_p, training, bias, seed=seed)
    drop = Dropout(_seed_tensor(seed, x.device), float(dropout_p)) if dropping else None
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
