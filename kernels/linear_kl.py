"""The LM head fused with KL(base ‖ policy), chunked over tokens: the (N, V) logits never exist.

Math, per token i with the policy's hidden row h_i (H,), the base model's hidden row h0_i (H,)
(the same token through the model with the adapters switched off) and the head W (V, H)::

    z_i  = W h_i,     log p_i  = z_i  − lse_i,    lse_i  = log Σ_v exp(z_iv)        policy
    z0_i = W h0_i,    log p0_i = z0_i − lse0_i,   lse0_i = log Σ_v exp(z0_iv)       base
    KL_i = KL(p0_i ‖ p_i) = Σ_v p0_iv (log p0_iv − log p_iv)
         = Σ_v p0_iv (z0_iv − z_iv) + lse_i − lse0_i
    KL_i = 0 where mask_i is False, with a zero gradient (never NaN, whatever the row holds)

The direction is base ‖ policy: the expectation is under the base distribution p0, so the policy
is penalised wherever it drops probability the base gave (the "forgetting" of issue 14). It equals
``F.kl_div(log p, log p0, log_target=True, reduction="none").sum(-1)`` on the materialised logits.
Reductions: ``none`` gives KL (N,) fp32; ``sum`` gives Σ_i KL_i; ``mean`` gives Σ_i KL_i / n with n
the number of unmasked rows — 0 with zero gradients when n = 0, not 0/0 = NaN. Results are fp32
whatever the inputs. KL ≥ 0 in exact arithmetic; rounding may leave a row at −1e-7, it is not
clamped. With h = h0 (a fresh adapter, B = 0) every KL_i is exactly 0, and so is every gradient
on the fused path: the two GEMMs give the same bits, so z0 − z = 0, m = m0, s = s0 and p = p0 (the
reference's autograd gives p · Σ p0 − p0, 0 up to the rounding of Σ p0).

Backward. Only the policy is differentiated: the base pass is a constant reference (``base_hidden``
must not require grad) and the head is frozen, as in LoRA (``weight`` must not require grad; a
trainable head would need dW = dzᵀ h, which this op does not compute — it raises instead). With
g_i the upstream gradient of row i (times 1/n for ``mean``, 0 for masked rows)::

    ∂KL_i/∂z_iv = p_iv − p0_iv          (Σ_v p0_iv = 1 makes the lse_i term give p_iv)
    dz_i = g_i (p_i − p0_i),   dh = dz W (N, H)

How the fused path runs (the Triton path; CUDA tensors, or forced). Tokens are cut into chunks of
C rows (C·V ≤ ``CHUNK_ELEMENTS`` per logits chunk: 512 tokens at V = 128,256; two chunks, z and z0,
live at once, as much memory as one chunk of `kernels.linear_cross_entropy`). Per chunk: the
logits z = h_c Wᵀ and z0 = h0_c Wᵀ (C, V) are two cuBLAS GEMMs in the input dtype; one Triton
program per row makes one online pass over the vocabulary in fp32 (BLOCK_V columns at a time)
that keeps the running maxima m, m0 and the sums s = Σ exp(z − m), s0 = Σ exp(z0 − m0),
t = Σ exp(z0 − m0)(z0 − z), each rescaled when its maximum grows, so that one pass gives

    KL = t / s0 + lse − lse0 = t / s0 + (m − m0) − log(s0 / s)

(the log of a ratio near 1 when the policy is near the base, rather than the difference of two
lse ≈ log V: that keeps KL's absolute error at ~1e-7 instead of ~1e-6, which matters for the
KL ~ 1e-5 of a run that has barely moved). When a gradient is wanted, a second pass over the row
overwrites z in place with dz = p − p0 = exp(z − lse) − exp(z0 − lse0); one more GEMM gives
dh_c = dz W. So the work is the eager version's three GEMMs, and the extra memory is two (C, V)
chunks instead of two (N, V) logits, their log-softmaxes and their gradient.

What is saved for backward, and why: the head is frozen, so the only gradient is dh, and row i of
dh is linear in that row's upstream gradient: dh_i = g_i · (p_i − p0_i) W. The forward therefore
computes the unit gradient u = mask · (p − p0) W (N, H) (in the input dtype) whenever the policy
needs a gradient, and saves only u — for every reduction, ``none`` included, unlike the
cross-entropy op (whose dW is a sum over rows and cannot be rescaled afterwards). Backward is a
multiplication: ``sum`` dh = g u, ``mean`` dh = (g / n) u, ``none`` dh = g[:, None] u. Nothing of
vocabulary size is kept, no logits are recomputed, and the hidden states need not be kept alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import interpreting, use_triton
from kernels.linear_cross_entropy import reduce_per_token
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# logits elements per chunk, for each of z and z0: 2 × 512 tokens × 128,256 vocab = 0.26 GB in bf16
CHUNK_ELEMENTS = 1 << 26


def _check_inputs(policy_hidden, base_hidden, weight, mask, reduction) -> None:
    """Raise ValueError / TypeError naming the offending argument."""
    for name, t in (("policy_hidden", policy_hidden), ("base_hidden", base_hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"linear_kl: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear_kl: {name} dtype {t.dtype} is not one of fp32, bf16, fp16")
        if t.dtype != policy_hidden.dtype:
            raise TypeError(f"linear_kl: {name} dtype {t.dtype} != policy_hidden dtype {policy_hidden.dtype}")
    (n, h), (v, hw) = policy_hidden.shape, weight.shape
    if base_hidden.shape != (n, h):
        raise ValueError(f"linear_kl: base_hidden shape {tuple(base_hidden.shape)} != policy_hidden (N, H) = {(n, h)}")
    if h != hw:
        raise ValueError(f"linear_kl: policy_hidden (N, H) = {(n, h)} and weight (V, H) = {(v, hw)} disagree on H")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"linear_kl: mask must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape != (n,):
            raise ValueError(f"linear_kl: mask shape {tuple(mask.shape)} != (N,) = ({n},)")
    devices = {t.device for t in (policy_hidden, base_hidden, weight, mask) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"linear_kl: policy_hidden, base_hidden, weight (and mask) on different devices {devices}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_kl: reduction {reduction!r} is not one of {REDUCTIONS}")
    if torch.is_grad_enabled():
        if weight.requires_grad:
            raise ValueError("linear_kl: weight requires grad, but the head is frozen here (no dW is computed): "
                             "pass weight.detach() or freeze the head")
        if base_hidden.requires_grad:
            raise ValueError("linear_kl: base_hidden requires grad, but the base pass is a constant reference: "
                             "compute it under torch.no_grad() or pass base_hidden.detach()")


def _reference(policy_hidden, base_hidden, weight, mask, reduction):
    if mask is None:
        mask = torch.ones(policy_hidden.shape[0], dtype=torch.bool, device=policy_hidden.device)
    keep = mask[:, None]  # masked rows enter as zeros, so that no NaN or inf they hold reaches a gradient
    w = weight.float()
    log_p = F.log_softmax(F.linear(torch.where(keep, policy_hidden.float(), 0.0), w), dim=-1)  # (N, V) fp32
    log_p0 = F.log_softmax(F.linear(torch.where(keep, base_hidden.float(), 0.0), w), dim=-1)  # (N, V), a constant
    per_token = (log_p0.exp() * (log_p0 - log_p)).sum(-1)  # Σ_v p0 (log p0 − log p), (N,)
    return reduce_per_token(torch.where(mask, per_token, 0.0), mask, reduction)


def linear_kl_ref(policy_hidden: torch.Tensor, base_hidden: torch.Tensor, weight: torch.Tensor,
                  mask: torch.Tensor | None = None, *, reduction: str = "sum") -> torch.Tensor:
    """The definition (module docstring): fp32 logits (N, V) materialised, F.log_softmax, autograd."""
    _check_inputs(policy_hidden, base_hidden, weight, mask, reduction)
    return _reference(policy_hidden, base_hidden, weight, mask, reduction)


@triton.jit
def _lkl_rows_kernel(
    z_ptr, z_row_stride, z0_ptr, z0_row_stride, mask_ptr, kl_ptr,
    V,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row of a logits chunk: KL(p0 ‖ p), then dz = p − p0 written over z."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    z0_row = z0_ptr + row * z0_row_stride
    cols = tl.arange(0, BLOCK_V)
    if tl.load(mask_ptr + row) != 0:
        # one online pass: running maxima m, m0; s = Σ exp(z − m), s0 = Σ exp(z0 − m0) and
        # t = Σ exp(z0 − m0)(z0 − z), the last two rescaled by exp(m0_old − m0_new) when m0 grows
        m = float("-inf")
        m0 = float("-inf")
        s = 0.0
        s0 = 0.0
        t = 0.0
        for v0 in range(0, V, BLOCK_V):
            inside = v0 + cols < V
            # columns past V: 0 in z0 − z (finite, so that 0 · (z0 − z) stays 0), −inf in the exps
            z = tl.load(z_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
            z0 = tl.load(z0_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
            z_in = tl.where(inside, z, float("-inf"))
            z0_in = tl.where(inside, z0, float("-inf"))
            m_new = tl.maximum(m, tl.max(z_in, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_in - m_new), axis=0)
            m = m_new
            m0_new = tl.maximum(m0, tl.max(z0_in, axis=0))
            alpha = tl.exp(m0 - m0_new)
            e0 = tl.exp(z0_in - m0_new)  # exp(z0 − m0), 0 past V
            s0 = s0 * alpha + tl.sum(e0, axis=0)
            t = t * alpha + tl.sum(e0 * (z0 - z), axis=0)
            m0 = m0_new
        # lse − lse0 = (m − m0) − log(s0 / s): the log of a ratio ≈ 1, not a difference of two ≈ log V
        tl.store(kl_ptr + row, t / s0 + (m - m0) - tl.log(s0 / s))
        if WRITE_GRAD:
            lse = m + tl.log(s)
            lse0 = m0 + tl.log(s0)
            for v0 in range(0, V, BLOCK_V):
                inside = v0 + cols < V
                z = tl.load(z_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
                z0 = tl.load(z0_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
                dz = tl.exp(z - lse) - tl.exp(z0 - lse0)
                tl.store(z_row + v0 + cols, dz.to(z_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(kl_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(z_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                tl.store(z_row + v0 + cols, zeros, mask=v0 + cols < V)


_ROWS_WARPS = 8


def _block_v(vocab: int) -> int:
    """Vocabulary columns per step: the interpreter pays per loop step, a GPU per register, so
    wide blocks there, 4,096 here."""
    return min(triton.next_power_of_2(vocab), 32_768 if interpreting() else 4_096)


def _launch_rows(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor, write_grad: bool) -> None:
    """Run `_lkl_rows_kernel` over the rows of one (C, V) chunk: KL into ``kl`` (C,) fp32 and, if
    ``write_grad``, dz = p − p0 over ``z``. ``mask`` (C,) is uint8 (a bool tensor's bytes)."""
    rows, vocab = z.shape
    _lkl_rows_kernel[(rows,)](
        z, z.stride(0), z0, z0.stride(0), mask, kl, vocab,
        WRITE_GRAD=write_grad, BLOCK_V=_block_v(vocab), num_warps=_ROWS_WARPS,
    )


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_launch_rows` launches (kernels/launch_cases.py) on a (C, vocab) chunk: every dtype,
    KL only (no gradient wanted) and KL with dz."""
    vocab, cases = shapes.vocab, []
    for dt in shapes.dtypes:
        args = dict(z_ptr=dt, z_row_stride=vocab, z0_ptr=dt, z0_row_stride=vocab, mask_ptr=torch.uint8,
                    kl_ptr=torch.float32, V=vocab)
        for write_grad in (False, True):
            cases.append(KernelCase("kl grad" if write_grad else "kl", _lkl_rows_kernel, dt, args,
                                    dict(WRITE_GRAD=write_grad, BLOCK_V=_block_v(vocab)), fixed_launch(_ROWS_WARPS)))
    return cases


def _chunk_rows(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two with rows · vocab ≤ CHUNK_ELEMENTS, at least 1."""
    fit = max(1, CHUNK_ELEMENTS // vocab)
    return min(max(n_tokens, 1), 1 << (fit.bit_length() - 1))


def _lkl_chunked(policy_hidden, base_hidden, weight, mask_u8, need_grad: bool):
    """KL (N,) fp32 and, when ``need_grad``, the unit gradient u = mask · (p − p0) W (N, H) in the
    input dtype (None otherwise)."""
    n = policy_hidden.shape[0]
    vocab = weight.shape[0]
    kl = torch.empty(n, dtype=torch.float32, device=policy_hidden.device)
    unit = torch.empty_like(policy_hidden) if need_grad else None
    rows = _chunk_rows(n, vocab)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = policy_hidden[s:e] @ weight.t()  # (C, V)
        z0 = base_hidden[s:e] @ weight.t()  # (C, V)
        _launch_rows(z, z0, mask_u8[s:e], kl[s:e], need_grad)
        if unit is not None:
            torch.mm(z, weight, out=unit[s:e])  # z now holds dz = p − p0 (0 on masked rows)
    return kl, unit


class LinearKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_hidden, base_hidden, weight, mask, reduction: str, need_grad: bool):
        ctx.reduction = reduction
        kl, unit = _lkl_chunked(policy_hidden, base_hidden, weight, mask.view(torch.uint8), need_grad)
        denom = mask.sum().clamp(min=1) if reduction == "mean" else None
        # the head is frozen, so row i of dh is g_i · u_i: keep the unit gradient u (N, H) and the
        # mean's count, nothing of vocabulary size and not the hidden states (module docstring)
        ctx.save_for_backward(unit, denom)
        if reduction == "none":
            return kl
        return kl.sum() if reduction == "sum" else kl.sum() / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        unit, denom = ctx.saved_tensors
        if unit is None:
            return None, None, None, None, None, None
        if ctx.reduction == "none":
            factor = grad_out[:, None]
        else:
            factor = grad_out if ctx.reduction == "sum" else grad_out / denom
        return unit * factor.to(unit.dtype), None, None, None, None, None


def linear_kl(policy_hidden: torch.Tensor, base_hidden: torch.Tensor, weight: torch.Tensor,
              mask: torch.Tensor | None = None, *, reduction: str = "sum") -> torch.Tensor:
    """KL(base ‖ policy) per token of the head ``weight (V, H)`` applied to ``policy_hidden (N, H)``
    and ``base_hidden (N, H)``, without materialising the (N, V) logits on the Triton path.

    Per row: Σ_v p0_v (log p0_v − log p_v), p0 = softmax(W h0), p = softmax(W h); 0 where ``mask``
    (N,) bool is False (None: every row counts). Reduced by ``reduction``: ``sum`` (default),
    ``mean`` over the unmasked rows (0 when there are none) or ``none`` (N,). Returns fp32.
    Differentiable in ``policy_hidden`` only: ``base_hidden`` and ``weight`` must not require grad
    (ValueError otherwise, when grad is enabled). Triton path on CUDA (or when kernels.backend
    forces it), else `linear_kl_ref`.
    """
    _check_inputs(policy_hidden, base_hidden, weight, mask, reduction)
    if not use_triton(policy_hidden, base_hidden, weight, mask):
        return _reference(policy_hidden, base_hidden, weight, mask, reduction)
    if mask is None:
        mask = torch.ones(policy_hidden.shape[0], dtype=torch.bool, device=policy_hidden.device)
    need_grad = torch.is_grad_enabled() and policy_hidden.requires_grad
    return LinearKLFunction.apply(policy_hidden, base_hidden, weight, mask.contiguous(), reduction, need_grad)
