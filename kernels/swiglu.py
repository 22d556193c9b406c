"""SwiGLU gating of the Llama MLP: ``y = silu(gate) * up``, fused forward and backward.

Formula (elementwise, computed in fp32, written in ``gate.dtype``)::

    σ(g)    = 1 / (1 + exp(-g))
    silu(g) = g · σ(g)
    y       = silu(g) · u

Backward (chain rule, elementwise; ``dy`` the incoming gradient)::

    ∂y/∂u = silu(g)                          → d_up   = dy · g · σ(g)
    ∂y/∂g = u · d silu/dg
          = u · (σ(g) + g · σ(g)(1 − σ(g)))
          = u · σ(g) · (1 + g · (1 − σ(g)))  → d_gate = dy · u · σ(g) · (1 + g · (1 − σ(g)))

Shapes: ``gate`` and ``up`` both ``(..., I)`` (any shape, equal), same dtype; ``y`` the same.
`swiglu_packed` takes them as the two halves of one ``(..., 2I)`` tensor, ``[gate | up]``, the
output of the MLP's grouped gate/up projection (`kernels.lora_group`), and returns its gradient
as one ``(..., 2I)`` tensor too: no copy of either half in the forward or the backward.
Saved for backward: ``gate`` and ``up`` only. ``silu(gate)`` is recomputed from ``gate`` in the
backward kernel (one ``exp`` per element) rather than stored, which saves a ``(tokens, I)``
tensor per layer, the largest activation of the MLP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32, returned in ``gate.dtype`` (the definition of the op)."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def swiglu_packed_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``swiglu_ref(gate, up)`` for ``gate_up = [gate | up]`` (..., 2I) → (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


@triton.jit
def _in_offsets(offsets, n_cols, stride_row):
    """Where output element ``offsets`` (of a (rows, n_cols) row-major output) reads gate and up:
    row · stride_row + col (the gate/up halves of a packed row; one row for separate tensors)."""
    return (offsets // n_cols) * stride_row + offsets % n_cols


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, y_ptr, n_elements, n_cols, stride_row, BLOCK_SIZE: tl.constexpr):
    # int64 offsets: tokens × intermediate can pass 2**31 at long contexts
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    src = _in_offsets(offsets, n_cols, stride_row)
    g = tl.load(gate_ptr + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + src, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    y = g * sig * u
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, n_cols, stride_row,
                       BLOCK_SIZE: tl.constexpr):
    """d_gate, d_up written where gate, up are read (`_in_offsets`)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    src = _in_offsets(offsets, n_cols, stride_row)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + src, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    d_up = dy * g * sig
    d_gate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + src, d_gate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + src, d_up.to(dup_ptr.dtype.element_ty), mask=mask)


_BLOCK_SIZE = 1024


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate dtype {gate.dtype} and up dtype {up.dtype} must match")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate on {gate.device} and up on {up.device} must share a device")


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward over the flattened elements; returns ``y`` shaped like ``gate``."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](gate, up, y, n, n, 0, BLOCK_SIZE=_BLOCK_SIZE)
    return y


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns fresh ``(d_gate, d_up)`` (never written into ``gate``/``up``,
    which a caller may still hold)."""
    dy = dy.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](dy, gate, up, d_gate, d_up, n, n, 0,
                                                            BLOCK_SIZE=_BLOCK_SIZE)
    return d_gate, d_up


def _swiglu_packed_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """``y`` (..., I) from a contiguous ``[gate | up]`` (..., 2I)."""
    half = gate_up.shape[-1] // 2
    y = gate_up.new_empty((*gate_up.shape[:-1], half))
    n = y.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](gate_up, gate_up[..., half:], y, n, half, 2 * half,
                                                            BLOCK_SIZE=_BLOCK_SIZE)
    return y


def _swiglu_packed_bwd(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """``[d_gate | d_up]`` (..., 2I), fresh, for a contiguous ``[gate | up]``."""
    dy, half = dy.contiguous(), gate_up.shape[-1] // 2
    d_gate_up = torch.empty_like(gate_up)
    n = dy.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK_SIZE),)](dy, gate_up, gate_up[..., half:], d_gate_up,
                                                            d_gate_up[..., half:], n, half, 2 * half,
                                                            BLOCK_SIZE=_BLOCK_SIZE)
    return d_gate_up


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_swiglu_fwd` / `_swiglu_bwd` launch (kernels/launch_cases.py) on (tokens, intermediate)."""
    n, cases = shapes.tokens * shapes.intermediate, []
    for dt in shapes.dtypes:
        # separate gate, up: one row of n; packed [gate | up]: rows of I at row stride 2I (same specialisation
        # when I is a multiple of 16, as at every Llama size)
        for layout, n_cols, stride_row in (("", n, 0), (" packed", shapes.intermediate, 2 * shapes.intermediate)):
            cases.append(KernelCase("fwd" + layout, _swiglu_fwd_kernel, dt,
                                    dict(gate_ptr=dt, up_ptr=dt, y_ptr=dt, n_elements=n, n_cols=n_cols,
                                         stride_row=stride_row), dict(BLOCK_SIZE=_BLOCK_SIZE), fixed_launch()))
            cases.append(KernelCase("bwd" + layout, _swiglu_bwd_kernel, dt,
                                    dict(dy_ptr=dt, gate_ptr=dt, up_ptr=dt, dgate_ptr=dt, dup_ptr=dt, n_elements=n,
                                         n_cols=n_cols, stride_row=stride_row),
                                    dict(BLOCK_SIZE=_BLOCK_SIZE), fixed_launch()))
    return cases


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        # gate and up are all backward needs: silu(gate) and σ(gate) are recomputed there.
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate``, ``up`` of equal shape ``(..., I)``; fp32 math, ``gate.dtype`` out.

    Runs the fused Triton kernels when ``kernels.backend.use_triton`` says so (CUDA tensors, or a
    forced mode), else ``swiglu_ref`` differentiated by autograd. See the module docstring for the
    backward formulas and what is saved.
    """
    _check(gate, up)
    if use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_ref(gate, up)


class SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)  # as SwiGLUFunction: gate and up only
        return _swiglu_packed_fwd(gate_up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return _swiglu_packed_bwd(dy, gate_up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` of shape ``(..., 2I)`` → ``(..., I)``; the
    gradient comes back as one ``(..., 2I)`` tensor. Triton when `use_triton` says so, else
    `swiglu_packed_ref`."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: the last dimension ({gate_up.shape[-1]}) must be even: [gate | up]")
    if use_triton(gate_up):
        return SwiGLUPackedFunction.apply(gate_up)
    return swiglu_packed_ref(gate_up)
