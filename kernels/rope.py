"""Rotary position embedding (RoPE) applied to q and k in one kernel, HF half-rotation layout,
with explicit position ids; plus ``rope_inv_freq``, the default / linear / llama3 frequencies.

Formula, per token at position ``p`` and head vector ``x = (x1, x2) ∈ R^hd`` (halves of hd/2)::

    θ_i  = p · inv_freq_i                       (fp32, i < hd/2)
    out1 = x1 · cos θ − x2 · sin θ              i.e. out = x · cos + rotate_half(x) · sin,
    out2 = x2 · cos θ + x1 · sin θ              rotate_half(x) = (−x2, x1), cos/sin repeated twice

Backward: the map is linear and, for each (token, i), a plane rotation R(θ) of ``(x1_i, x2_i)``;
its Jacobian transpose is R(θ)ᵀ = R(−θ), so ``dx = R(−θ) · dout`` — the same kernel with ``sin``
negated. Nothing of q or k is needed: only ``position_ids`` and ``inv_freq`` are saved.

Shapes: ``q (B, T, n_heads, hd)``, ``k (B, T, n_kv, hd)`` (GQA: n_kv ≤ n_heads), ``position_ids``
``(B, T)`` or ``(1, T)`` integers (packed sequences restart positions per document), ``inv_freq``
``(hd/2,)`` fp32. Returns ``(q_out, k_out)`` in q's and k's dtypes; all math in fp32. The Triton
path computes cos/sin in the kernel, one (hd/2) vector per token, never a (B, T, hd) table; HF
instead casts cos/sin to the input dtype before multiplying, so in bf16 it differs from this op by
about one ulp.

The backward always writes fresh gradient tensors (autograd may share or expand incoming ones).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``(head_dim/2,)`` fp32: ``1 / theta^(2i/head_dim)``, then scaled.

    ``scaling`` is HF's ``rope_scaling`` / ``rope_parameters`` dict (``rope_type`` or ``type``):
    ``default`` (or None), ``linear`` (divide by ``factor``) or ``llama3`` (Llama 3.1: wavelengths
    above ``original_max_position_embeddings / low_freq_factor`` divided by ``factor``, those below
    ``.../high_freq_factor`` kept, a linear blend in 1/wavelength between). Same fp32 operations,
    in the same order, as transformers' ``ROPE_INIT_FUNCTIONS``, so the result is bit-identical.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_inv_freq: head_dim must be a positive even integer, got {head_dim}")
    scaling = dict(scaling or {})
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_inv_freq: partial_rotary_factor != 1 is not supported")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"rope_inv_freq: rope_type {rope_type!r} not supported (default, linear, llama3)")


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling (see ``rope_inv_freq``)."""
    try:
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
    except KeyError as missing:
        raise ValueError(f"rope_inv_freq: llama3 scaling needs key {missing}") from None
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                   inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x · cos + rotate_half(x) · sin`` for q and k, in fp32, returned in their dtypes."""
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # (B, T, 1, hd)
    cos, sin = emb.cos(), emb.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, x_stride_h, o_stride_h, n_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate all heads of one token: tile (BLOCK_HEADS, BLOCK_HALF) of first and second halves."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    x_ptrs = x_ptr + heads * x_stride_h + d
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    o_ptrs = o_ptr + heads * o_stride_h + d
    tl.store(o_ptrs, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_freq_ptr, seq_len,
                 q_stride_b, q_stride_t, q_stride_h, k_stride_b, k_stride_t, k_stride_h,
                 qo_stride_b, qo_stride_t, qo_stride_h, ko_stride_b, ko_stride_t, ko_stride_h,
                 pos_stride_b, pos_stride_t, n_q_heads, n_k_heads,
                 INVERSE: tl.constexpr, HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr,
                 BLOCK_K_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One program per token (b, t): rotate its q heads and k heads by θ = pos · inv_freq.

    Forward and backward are this kernel: ``INVERSE`` rotates by −θ (sin negated), the transpose.
    """
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    t = (pid % seq_len).to(tl.int64)
    pos = tl.load(pos_ptr + b * pos_stride_b + t * pos_stride_t).to(tl.float32)
    d = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + d, mask=d < HALF, other=0.0)
    angle = (pos * inv_freq)[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin
    _rotate_heads(q_ptr + b * q_stride_b + t * q_stride_t, qo_ptr + b * qo_stride_b + t * qo_stride_t,
                  q_stride_h, qo_stride_h, n_q_heads, cos, sin, HALF, BLOCK_Q_HEADS, BLOCK_HALF)
    _rotate_heads(k_ptr + b * k_stride_b + t * k_stride_t, ko_ptr + b * ko_stride_b + t * ko_stride_t,
                  k_stride_h, ko_stride_h, n_k_heads, cos, sin, HALF, BLOCK_K_HEADS, BLOCK_HALF)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_meta(n_q: int, n_k: int, half: int) -> tuple[dict, int]:
    """(block constexprs, num_warps) for n_q / n_k heads of hd/2 = ``half``."""
    blocks = dict(HALF=half, BLOCK_Q_HEADS=triton.next_power_of_2(n_q), BLOCK_K_HEADS=triton.next_power_of_2(n_k),
                  BLOCK_HALF=triton.next_power_of_2(half))
    return blocks, 4 if n_q * half <= 4096 else 8


def _rope_launch(q, k, qo, ko, position_ids, inv_freq, inverse: bool) -> None:
    """Rotate ``q``, ``k`` (B, T, heads, hd) into ``qo``, ``ko`` (may alias q, k) in one launch."""
    B, T, n_q, hd = q.shape
    n_k = k.shape[2]
    pos_stride_b = 0 if position_ids.shape[0] == 1 else position_ids.stride(0)  # (1, T) broadcasts
    if B * T == 0:
        return
    blocks, num_warps = _rope_meta(n_q, n_k, hd // 2)
    _rope_kernel[(B * T,)](
        q, k, qo, ko, position_ids, inv_freq, T,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        pos_stride_b, position_ids.stride(1), n_q, n_k,
        INVERSE=inverse, **blocks, num_warps=num_warps)


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_rope_launch` launches (kernels/launch_cases.py): q (1, T, n_heads, hd) and k
    (1, T, n_kv, hd) as the attention's views of its projections, position_ids (1, T) int64 (the
    packed (B, T) form differs only in a multiple-of-16 batch stride), forward and inverse."""
    T, hd, n_q, n_k = shapes.tokens, shapes.head_dim, shapes.n_heads, shapes.n_kv_heads
    blocks, num_warps = _rope_meta(n_q, n_k, hd // 2)
    cases = []
    for dt in shapes.dtypes:
        q_strides = dict(zip(("stride_b", "stride_t", "stride_h"), (T * n_q * hd, n_q * hd, hd)))
        k_strides = dict(zip(("stride_b", "stride_t", "stride_h"), (T * n_k * hd, n_k * hd, hd)))
        args = dict(q_ptr=dt, k_ptr=dt, qo_ptr=dt, ko_ptr=dt, pos_ptr=torch.int64, inv_freq_ptr=torch.float32,
                    seq_len=T, **{f"{t}_{k}": v for t in ("q", "qo") for k, v in q_strides.items()},
                    **{f"{t}_{k}": v for t in ("k", "ko") for k, v in k_strides.items()},
                    pos_stride_b=0, pos_stride_t=1, n_q_heads=n_q, n_k_heads=n_k)
        for inverse in (False, True):
            cases.append(KernelCase("bwd" if inverse else "fwd", _rope_kernel, dt, args,
                                    dict(INVERSE=inverse, **blocks), fixed_launch(num_warps)))
    return cases


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq):
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        qo = torch.empty_like(q, memory_format=torch.contiguous_format)
        ko = torch.empty_like(k, memory_format=torch.contiguous_format)
        _rope_launch(q, k, qo, ko, position_ids, inv_freq, inverse=False)
        # the rotation is linear and its inverse needs only the angles: save positions, not q/k
        ctx.save_for_backward(position_ids, inv_freq)
        return qo, ko

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        position_ids, inv_freq = ctx.saved_tensors
        dq_out, dk_out = _unit_last_stride(dq_out), _unit_last_stride(dk_out)
        dq = torch.empty(dq_out.shape, dtype=dq_out.dtype, device=dq_out.device)
        dk = torch.empty(dk_out.shape, dtype=dk_out.dtype, device=dk_out.device)
        _rope_launch(dq_out, dk_out, dq, dk, position_ids, inv_freq, inverse=True)
        return dq, dk, None, None


def _check(q, k, position_ids, inv_freq) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, heads, head_dim)")
    B, T, _, hd = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != hd or hd % 2:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must share B, T and an even head_dim with q {tuple(q.shape)}")
    if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
        raise ValueError(f"apply_rope: position_ids {tuple(position_ids.shape)} must be ({B}, {T}) or (1, {T})")
    if position_ids.dtype.is_floating_point:
        raise ValueError(f"apply_rope: position_ids must be integers, got {position_ids.dtype}")
    if inv_freq.shape != (hd // 2,):
        raise ValueError(f"apply_rope: inv_freq {tuple(inv_freq.shape)} must be (head_dim/2,) = ({hd // 2},)")


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
               inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q (B, T, n_heads, hd)`` and ``k (B, T, n_kv, hd)`` by ``position_ids · inv_freq``.

    Triton (one launch for q and k) when ``kernels.backend.use_triton`` says so, else
    ``apply_rope_ref``. Returns new tensors; q and k are not modified.
    """
    _check(q, k, position_ids, inv_freq)
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32)
    position_ids = position_ids.to(q.device)
    if use_triton(q, k, position_ids, inv_freq):
        return RoPEFunction.apply(q, k, position_ids, inv_freq.contiguous())
    return apply_rope_ref(q, k, position_ids, inv_freq)
