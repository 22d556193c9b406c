"""The LM head fused with cross-entropy, chunked over tokens: the (N, V) logits never exist.

Math, per token i with hidden row h_i (H,), label y_i, head W (V, H), optional bias b (V,)::

    z_i   = W h_i + b                               logits, (V,)
    lse_i = log Σ_j exp(z_ij)
    ℓ_i   = lse_i − (1 − ε) z_iy − (ε / V) Σ_j z_ij + λ lse_i²     (ε label smoothing, λ z-loss)
    ℓ_i   = 0 where y_i == ignore_index

which is ``F.cross_entropy(z, y, ignore_index, reduction="none", label_smoothing=ε)`` plus the
z-loss λ·lse² on every non-ignored token. Reductions: ``none`` gives ℓ (N,); ``sum`` gives Σ ℓ_i;
``mean`` gives Σ ℓ_i / n with n the number of non-ignored tokens, as F.cross_entropy does —
except that an all-ignored batch (n = 0) gives a loss of 0 with zero gradients, not 0/0 = NaN,
so that a batch of pure prompt tokens cannot poison a run. Losses are fp32 whatever the inputs.

Backward: with p_ij = exp(z_ij − lse_i) and s_i the scale of row i (the upstream gradient, times
1/n for ``mean``, 0 for ignored rows)::

    ∂ℓ_i/∂z_ij = p_ij (1 + 2λ lse_i) − (1 − ε) [j = y_i] − ε / V
    dz_i = s_i · ∂ℓ_i/∂z_i,   dh = dz W (N, H),   dW = dzᵀ h (V, H),   db = Σ_i dz_i (V,)

Log-probs for DPO: log p(y_i | h_i) = z_iy − lse_i = −ℓ_i with ε = λ = 0, so `linear_logprobs` is
``-linear_cross_entropy(..., reduction="none")`` and `sequence_logprobs` sums it per sequence.

How the fused path runs (the Triton path; CUDA tensors, or forced). Tokens are cut into chunks of
C rows (C·V ≤ ``CHUNK_ELEMENTS``: 1,024 tokens at V = 128,256; 4,096 when dW is accumulated,
see ``CHUNK_ELEMENTS_DW``). Per chunk: the logits
(C, V) = h_c Wᵀ are one cuBLAS GEMM in the input dtype (fp32 accumulation inside); one Triton
program per row makes an online max / sum-exp pass over the vocabulary in fp32 (BLOCK_V columns
at a time), giving lse, the target logit and the loss, then a second pass over the same row
overwrites the logits in place with dz; two more GEMMs contract dz into dh_c = dz W and into the
fp32 accumulator dW += dzᵀ h_c (fp32 across chunks, at the price of reading
and writing that fp32 (V, H) once per chunk; Liger accumulates dW in bf16 instead). So the work is the same three GEMMs as the eager
``h @ W.T`` + ``F.cross_entropy``, and the extra memory is one (C, V) chunk instead of the (N, V)
logits, their softmax and their gradient. The GEMMs stay in cuBLAS on purpose: a ``tl.dot``
matmul tiled inside the softmax kernel would either recompute the logits (a 4th and 5th GEMM for
dh and dW) or run the heavy GEMMs at Triton's rather than cuBLAS's throughput; either misses the
"no slower than eager" target, while the vocabulary-sized memory is already gone.

What is saved for backward, and why:

* ``mean`` / ``sum`` (scalar loss): the upstream gradient is one scalar, so dh, dW, db are
  computed in the forward (when the inputs need them) and saved; backward only multiplies them
  by that scalar. This saves recomputing the logits GEMM, and the (N, V) logits are never kept.
  dW is accumulated in fp32 and stored in the weight dtype. A frozen head (LoRA) gets no dW.
* ``none`` (and hence the log-probs): the upstream gradient differs per token and dW = Σ_i s_i
  dz_iᵀ h_i cannot be rescaled afterwards, so forward saves hidden, weight, bias, labels and the
  fp32 lse (N,); backward recomputes each chunk's logits and uses the saved lse to skip the
  online pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import interpreting, use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_ELEMENTS = 1 << 27  # logits elements per chunk: 1,024 tokens × 128,256 vocab = 0.26 GB in bf16
# With a trainable head, every chunk reads and writes the fp32 dW (V, H) once (4.2 GB at Llama-3's
# head): chunks 4× larger (4,096 tokens, 1 GB of bf16 logits) make that ~10% of the GEMM time, not ~40%.
CHUNK_ELEMENTS_DW = 1 << 29
DW_SLICE_ROWS = 16_384  # vocab rows per dW GEMM in half precision: its temporary is 16,384 × H


def _check_inputs(hidden, weight, labels, ignore_index, reduction, z_loss, label_smoothing, bias) -> None:
    """Raise ValueError / TypeError naming the offending argument."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"linear_cross_entropy: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear_cross_entropy: {name} dtype {t.dtype} is not one of fp32, bf16, fp16")
    (n, h), (v, hw) = hidden.shape, weight.shape
    if h != hw:
        raise ValueError(f"linear_cross_entropy: hidden (N, H) = {(n, h)} and weight (V, H) = {(v, hw)} "
                         "disagree on H")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_cross_entropy: weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"linear_cross_entropy: labels must be an int64 tensor, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.shape != (n,):
        raise ValueError(f"linear_cross_entropy: labels shape {tuple(labels.shape)} != (N,) = ({n},)")
    if bias is not None and (bias.shape != (v,) or bias.dtype != hidden.dtype):
        raise ValueError(f"linear_cross_entropy: bias must be ({v},) {hidden.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"linear_cross_entropy: hidden, weight, labels (and bias) on different devices {devices}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r} is not one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing {label_smoothing} is not in [0, 1]")
    if z_loss < 0.0:
        raise ValueError(f"linear_cross_entropy: z_loss {z_loss} must be >= 0")


def _check_label_range(labels: torch.Tensor, v: int, ignore_index: int) -> None:
    """Every label in [0, V) or ignore_index: one host read (a device sync on a GPU)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):  # a wrong label would otherwise read out of bounds
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: labels[{i}] = {int(labels[i])} is outside [0, V={v}) "
                         f"and is not ignore_index={ignore_index}")


def reduce_per_token(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The references' reduction of a per-token loss (N,): ``none`` as is, ``sum``, or ``mean`` over the
    ``valid`` rows (shared by the fused head ops: `kernels.linear_kl` too)."""
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)  # 0/0 := 0 (all tokens ignored)


def _reference(hidden, weight, labels, ignore_index, reduction, z_loss, label_smoothing, bias):
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())  # (N, V) fp32
    per_token = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                                label_smoothing=label_smoothing)
    valid = labels != ignore_index
    if z_loss:
        per_token = per_token + z_loss * torch.where(valid, torch.logsumexp(logits, -1).square(), 0.0)
    return reduce_per_token(per_token, valid, reduction)


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                             label_smoothing: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition (module docstring): fp32 logits (N, V) materialised, F.cross_entropy, autograd."""
    _check_inputs(hidden, weight, labels, ignore_index, reduction, z_loss, label_smoothing, bias)
    _check_label_range(labels, weight.shape[0], ignore_index)
    return _reference(hidden, weight, labels, ignore_index, reduction, z_loss, label_smoothing, bias)


@triton.jit
def _lce_rows_kernel(
    logits_ptr, logits_row_stride, labels_ptr, lse_ptr, loss_ptr, scale_ptr,
    V, ignore_index, z_loss, smoothing,
    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row of a logits chunk: loss and lse, then dz written over the logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    if label != ignore_index:
        if COMPUTE_LSE:
            # online logsumexp: running max m and Σ exp(z - m), rescaled when m grows
            m = float("-inf")
            sum_exp = 0.0
            sum_z = 0.0
            for v0 in range(0, V, BLOCK_V):
                mask = v0 + cols < V
                z = tl.load(row_ptr + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                if SMOOTHING:
                    sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
                m = m_new
            lse = m + tl.log(sum_exp)
            z_target = tl.load(row_ptr + label).to(tl.float32)
            loss = lse - (1.0 - smoothing) * z_target + z_loss * lse * lse
            if SMOOTHING:
                loss -= smoothing * sum_z / V
            tl.store(lse_ptr + row, lse)
            tl.store(loss_ptr + row, loss)
        else:
            lse = tl.load(lse_ptr + row)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row)
            p_coef = scale * (1.0 + 2.0 * z_loss * lse)
            target_coef = scale * (1.0 - smoothing)
            uniform = scale * smoothing / V
            for v0 in range(0, V, BLOCK_V):
                mask = v0 + cols < V
                z = tl.load(row_ptr + v0 + cols, mask=mask, other=0.0).to(tl.float32)
                dz = p_coef * tl.exp(z - lse) - uniform
                dz = tl.where(v0 + cols == label, dz - target_coef, dz)
                tl.store(row_ptr + v0 + cols, dz.to(logits_ptr.dtype.element_ty), mask=mask)
    else:
        if COMPUTE_LSE:
            tl.store(lse_ptr + row, 0.0)
            tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(logits_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                tl.store(row_ptr + v0 + cols, zeros, mask=v0 + cols < V)


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    reduction: str
    z_loss: float
    label_smoothing: float


def _launch_rows(logits, labels, lse, loss, scale, opts: _Options, compute_lse: bool) -> None:
    """Run `_lce_rows_kernel` over the rows of one (C, V) logits chunk (dz overwrites it if scale)."""
    rows, vocab = logits.shape
    _lce_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, lse, loss, scale if scale is not None else lse,
        vocab, opts.ignore_index, float(opts.z_loss), float(opts.label_smoothing),
        COMPUTE_LSE=compute_lse, WRITE_GRAD=scale is not None, SMOOTHING=opts.label_smoothing > 0,
        BLOCK_V=_block_v(vocab), num_warps=_ROWS_WARPS,
    )


_ROWS_WARPS = 8


def _block_v(vocab: int) -> int:
    """Vocabulary columns per step: the interpreter pays per loop step, a GPU per register, so
    wide blocks there, 4,096 here."""
    return min(triton.next_power_of_2(vocab), 32_768 if interpreting() else 4_096)


# (COMPUTE_LSE, WRITE_GRAD) of the three uses of `_launch_rows` in `_lce_chunked`: loss only
# (reduction "none" forward), loss and dz (scalar reductions), dz from the saved lse ("none" backward)
_ROWS_MODES = ((True, False), (True, True), (False, True))


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_launch_rows` launches (kernels/launch_cases.py) on a (C, vocab) logits chunk: every
    dtype, the three modes of `_ROWS_MODES`, with and without label smoothing."""
    vocab, f32, cases = shapes.vocab, torch.float32, []
    for dt in shapes.dtypes:
        args = dict(logits_ptr=dt, logits_row_stride=vocab, labels_ptr=torch.int64, lse_ptr=f32, loss_ptr=f32,
                    scale_ptr=f32, V=vocab, ignore_index=-100, z_loss=0.0, smoothing=0.0)
        for compute_lse, write_grad in _ROWS_MODES:
            for smoothing in (False, True):
                name = " ".join(n for n, on in (("lse", compute_lse), ("grad", write_grad), ("smoothing", smoothing)) if on)
                cases.append(KernelCase(name, _lce_rows_kernel, dt, args,
                                        dict(COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, SMOOTHING=smoothing,
                                             BLOCK_V=_block_v(vocab)), fixed_launch(_ROWS_WARPS)))
    return cases


def _chunk_rows(n_tokens: int, vocab: int, accumulate_dw: bool = False) -> int:
    """Tokens per chunk: the largest power of two with rows · vocab ≤ CHUNK_ELEMENTS (or
    CHUNK_ELEMENTS_DW when dW is accumulated), at least 1."""
    fit = max(1, (CHUNK_ELEMENTS_DW if accumulate_dw else CHUNK_ELEMENTS) // vocab)
    return min(max(n_tokens, 1), 1 << (fit.bit_length() - 1))


def _accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """dw (V, H) fp32 += dzᵀ h. Half-precision GEMMs cannot write into fp32, so the product goes
    through a temporary of DW_SLICE_ROWS vocab rows at a time rather than a whole (V, H) one."""
    if dz.dtype == torch.float32:
        dw.addmm_(dz.t(), h)
        return
    for v0 in range(0, dw.shape[0], DW_SLICE_ROWS):
        dw[v0:v0 + DW_SLICE_ROWS] += dz[:, v0:v0 + DW_SLICE_ROWS].t() @ h


def _lce_chunked(hidden, weight, bias, labels, opts: _Options, scale=None, lse=None,
                 needs=(False, False, False)):
    """Loss (N,) and lse (N,) in fp32 and, when ``scale`` (N,) is given, the gradients
    (dh, dW fp32, db fp32) for the inputs flagged in ``needs``; ``lse`` given skips the online pass."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = torch.empty(n, **f32)
    compute_lse = lse is None
    lse = torch.empty(n, **f32) if compute_lse else lse
    need_dh, need_dw, need_db = needs if scale is not None else (False, False, False)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(vocab, h_dim, **f32) if need_dw else None
    db = torch.zeros(vocab, **f32) if need_db else None
    rows = _chunk_rows(n, vocab, accumulate_dw=dw is not None)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h = hidden[s:e]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # (C, V)
        _launch_rows(logits, labels[s:e], lse[s:e], loss[s:e], None if scale is None else scale[s:e],
                     opts, compute_lse)
        dz = logits  # overwritten in place by the kernel when a scale was given
        if dh is not None:
            torch.mm(dz, weight, out=dh[s:e])
        if dw is not None:
            _accumulate_dw(dw, dz, h)
        if db is not None:
            db += dz.sum(0, dtype=torch.float32)
    return loss, lse, dh, dw, db


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: _Options, needs: tuple[bool, bool, bool]):
        ctx.opts, ctx.needs = opts, needs
        ctx.recompute = opts.reduction == "none"
        if ctx.recompute:
            loss, lse, *_ = _lce_chunked(hidden, weight, bias, labels, opts)
            # per-token upstream gradients are only known in backward: keep the inputs and the
            # fp32 lse (N,), recompute the logits there chunk by chunk
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
            return loss
        valid = labels != opts.ignore_index
        denom = valid.sum().clamp(min=1) if opts.reduction == "mean" else valid.new_ones((), dtype=torch.long)
        scale = valid.float() / denom if any(needs) else None
        loss, _, dh, dw, db = _lce_chunked(hidden, weight, bias, labels, opts, scale=scale, needs=needs)
        # scalar upstream gradient: the gradients of the loss are final up to that scalar, so keep
        # them (dh (N, H), dW (V, H), db (V,) in the input dtype) instead of any logits
        ctx.save_for_backward(dh, _cast(dw, weight.dtype), _cast(db, weight.dtype))
        return loss.sum() / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.recompute:
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            scale = grad_out.float().contiguous()
            _, _, dh, dw, db = _lce_chunked(hidden, weight, bias, labels, ctx.opts, scale=scale, lse=lse,
                                            needs=ctx.needs)
            return dh, _cast(dw, weight.dtype), _cast(db, weight.dtype), None, None, None
        grads = [None if t is None else t * grad_out for t in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                         label_smoothing: float = 0.0, bias: torch.Tensor | None = None, *,
                         labels_checked: bool = False) -> torch.Tensor:
    """Cross-entropy of ``hidden (N, H) @ weight (V, H)ᵀ (+ bias)`` against ``labels (N,)`` int64,
    without materialising the (N, V) logits on the Triton path.

    Equals ``F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction=...,
    label_smoothing=...)`` plus ``z_loss · logsumexp²`` per non-ignored token, reduced like the loss;
    ``mean`` over zero tokens is 0. Returns fp32: a scalar, or (N,) for ``none`` (0 at ignored rows).
    Triton path on CUDA (or when kernels.backend forces it), else `linear_cross_entropy_ref`.
    ``labels_checked``: the caller guarantees every label is in [0, V) or ``ignore_index`` (the
    engine checks its token ids against the vocabulary once, at setup), so the range check — the
    op's one host read — is skipped.
    """
    _check_inputs(hidden, weight, labels, ignore_index, reduction, z_loss, label_smoothing, bias)
    if not labels_checked:
        _check_label_range(labels, weight.shape[0], ignore_index)
    if not use_triton(hidden, weight, labels, bias):
        return _reference(hidden, weight, labels, ignore_index, reduction, z_loss, label_smoothing, bias)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    opts = _Options(int(ignore_index), reduction, float(z_loss), float(label_smoothing))
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, labels.contiguous(), opts, needs)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = -100, *, labels_checked: bool = False) -> torch.Tensor:
    """log softmax(hidden @ weightᵀ)[i, labels[i]] per token, (N,) fp32, 0 where ignored; differentiable.
    ``labels_checked``: as in `linear_cross_entropy`."""
    return -linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none",
                                 labels_checked=labels_checked)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = -100, *, labels_checked: bool = False) -> torch.Tensor:
    """Σ_t log p(labels[b, t] | hidden[b, t]) per sequence, (B,) fp32, for DPO.

    ``hidden`` (B, T, H) and ``labels`` (B, T) must already be aligned (the caller shifts labels
    so that position t predicts token t + 1); ignored positions contribute 0.
    """
    if hidden.dim() != 3 or not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
        raise ValueError(f"sequence_logprobs: hidden must be (B, T, H) and labels (B, T), got "
                         f"{tuple(hidden.shape)} and {tuple(getattr(labels, 'shape', ()))}")
    b, t, h = hidden.shape
    per_token = linear_logprobs(hidden.reshape(b * t, h), weight, labels.reshape(b * t), ignore_index,
                                labels_checked=labels_checked)
    return per_token.view(b, t).sum(1)
