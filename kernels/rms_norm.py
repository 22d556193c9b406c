"""RMSNorm, ``y = x · rsqrt(mean(x², -1) + eps) · w``, fused forward and backward.

Formula, per row ``x ∈ R^H`` (all math in fp32; ``y`` written in ``x.dtype``)::

    r = (mean_j x_j² + eps)^(-1/2)        the reciprocal RMS, one fp32 per row
    n = x · r                             the normalized row
    y = n ⊙ w

Backward, with ``g = dy ⊙ w``. Since ``∂r/∂x_j = -r³ x_j / H``::

    dx_j = r g_j + Σ_i g_i x_i ∂r/∂x_j = r (g_j − n_j · (Σ_i g_i n_i) / H)
    dw   = Σ_rows dy ⊙ n                  (accumulated in fp32: per-program partial sums, then a sum)

Shapes: ``x`` ``(..., H)``, ``weight`` ``(H,)``; ``y`` like ``x``.
Saved for backward: ``x`` and the reciprocal RMS ``r`` (one fp32 per row, B·T floats);
``weight`` is a parameter, so keeping a reference to it costs no memory. ``n`` is recomputed.

HF's LlamaRMSNorm computes ``n`` in fp32 like this op but then rounds ``n`` to the input dtype
*before* multiplying by ``weight`` (and returns ``weight.dtype`` when the weight is wider). For fp32
inputs the results are identical; for bf16/fp16 this op rounds once (``n · w`` in fp32, then to
``x.dtype``) where HF rounds twice, so the two differ by at most about one bf16/fp16 ulp, and ours
is the closer one to the exact value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting, use_triton
from kernels.launch_cases import KernelCase, ModelShapes, fixed_launch
from kernels.rounding import cast_rne


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x · rsqrt(mean(x², -1) + eps) · weight`` in fp32, returned in ``x.dtype``."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, n_cols, eps,
                         EMULATE_RNE: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per row: y = x · r · w, r stored."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = cast_rne(x * rstd * w, y_ptr.dtype.element_ty, EMULATE_RNE)
    tl.store(y_ptr + row * y_row_stride + cols, y, mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                         dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
                         COMPUTE_DW: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Each program walks a contiguous chunk of rows: dx per row, dw summed over its rows in fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # int64 row indices (row · stride can pass 2**31); the loop variable inherits the bounds' type
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r64 in range(row_start, row_end):
        dy = tl.load(dy_ptr + r64 * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r64)
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / n_cols))
        dx = cast_rne(dx, dx_ptr.dtype.element_ty, EMULATE_RNE)
        tl.store(dx_ptr + r64 * dx_row_stride + cols, dx, mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * n
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): a whole row per program, more warps for wider rows."""
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rms_norm: hidden size {n_cols} too large for a one-block row (max 65536)")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., H) -> (N, H)`` with unit column stride (a copy only when the layout needs one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rms_norm_fwd(x2, weight, eps):
    """``x2`` (N, H) -> ``(y (N, H), rstd (N,) fp32)``."""
    n_rows, n_cols = x2.shape
    block, num_warps = _launch_config(n_cols)
    y = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
            EMULATE_RNE=interpreting(), BLOCK_H=block, num_warps=num_warps)
    return y, rstd


def _programs_for(n_rows: int, num_sms: int) -> int:
    """Enough programs to fill the GPU a few times over, each summing dw over a chunk of rows."""
    return max(1, min(n_rows, 4 * num_sms))


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return _programs_for(n_rows, torch.cuda.get_device_properties(device).multi_processor_count)
    return _programs_for(n_rows, 1)


def _rms_norm_bwd(dy, x2, weight, rstd, compute_dw):
    """Returns ``(dx (N, H), dw (H,) or None)``."""
    n_rows, n_cols = x2.shape
    block, num_warps = _launch_config(n_cols)
    dy2 = _rows(dy)
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    n_prog = _num_programs(n_rows, x2.device)
    dw_partial = torch.empty((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
            dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, n_prog),
            COMPUTE_DW=compute_dw, EMULATE_RNE=interpreting(), BLOCK_H=block, num_warps=num_warps)
    if not compute_dw:
        return dx, None
    dw = dw_partial.sum(0) if n_rows else torch.zeros(n_cols, dtype=torch.float32, device=x2.device)
    return dx, dw.to(weight.dtype)


def compile_cases(shapes: ModelShapes) -> list[KernelCase]:
    """What `_rms_norm_fwd` and `_rms_norm_bwd` launch (kernels/launch_cases.py) on rows of
    ``shapes.hidden``: every dtype, backward with and without dw."""
    n_rows, n_cols = shapes.tokens, shapes.hidden
    block, num_warps = _launch_config(n_cols)
    rows_per_program = triton.cdiv(n_rows, _programs_for(n_rows, shapes.num_sms))
    cases = []
    for dt in shapes.dtypes:
        fwd = dict(x_ptr=dt, w_ptr=dt, y_ptr=dt, rstd_ptr=torch.float32, x_row_stride=n_cols, y_row_stride=n_cols,
                   n_cols=n_cols, eps=1e-5)
        cases.append(KernelCase("fwd", _rms_norm_fwd_kernel, dt, fwd,
                                dict(EMULATE_RNE=interpreting(), BLOCK_H=block), fixed_launch(num_warps)))
        bwd = dict(dy_ptr=dt, x_ptr=dt, w_ptr=dt, rstd_ptr=torch.float32, dx_ptr=dt, dw_partial_ptr=torch.float32,
                   dy_row_stride=n_cols, x_row_stride=n_cols, dx_row_stride=n_cols, n_rows=n_rows, n_cols=n_cols,
                   rows_per_program=rows_per_program)
        for compute_dw in (False, True):
            cases.append(KernelCase(f"bwd{' dw' if compute_dw else ''}", _rms_norm_bwd_kernel, dt, bwd,
                                    dict(COMPUTE_DW=compute_dw, EMULATE_RNE=interpreting(), BLOCK_H=block),
                                    fixed_launch(num_warps)))
    return cases


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        y, rstd = _rms_norm_fwd(x2, weight, eps)
        # backward needs the input and r; n = x·r is recomputed.
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy, x2, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be (H,) with H = x.shape[-1] = {x.shape[-1]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x (..., H)`` with ``weight (H,)``: fp32 math, ``x.dtype`` out (see module docstring).

    Triton forward/backward when ``kernels.backend.use_triton`` says so, else ``rms_norm_ref``.
    """
    _check(x, weight)
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps))
    return rms_norm_ref(x, weight, eps)

