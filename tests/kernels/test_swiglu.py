"""SwiGLU Triton kernels (forced, interpreter on CPU) against the fp32 reference: output, d_gate, d_up."""

import pytest
import torch

from kernels.backend import force_triton, use_reference
from kernels.swiglu import swiglu, swiglu_packed, swiglu_ref
from tests.tolerances import assert_close

SHAPES = [(1, 1, 8), (2, 3, 77), (5, 123, 77), (3, 1000), (2, 7, 576)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 2).to(device, dtype)  # spans σ's curved region
    up = torch.randn(shape, generator=g).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return gate, up, dy


def _fp32_reference(gate, up, dy):
    g32 = gate.detach().float().requires_grad_()
    u32 = up.detach().float().requires_grad_()
    y = swiglu_ref(g32, u32)
    y.backward(dy.float())
    return y, g32.grad, u32.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(shape, dtype, device):
    gate, up, dy = _inputs(shape, dtype, device)
    gate.requires_grad_()
    up.requires_grad_()
    with force_triton():
        y = swiglu(gate, up)
    y.backward(dy)
    y_ref, dgate_ref, dup_ref = _fp32_reference(gate, up, dy)
    assert y.dtype == dtype and gate.grad.dtype == dtype and up.grad.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(gate.grad, dgate_ref, dtype, "d_gate")
    assert_close(up.grad, dup_ref, dtype, "d_up")


def test_swiglu_closed_form_gradient(device):
    """The backward formula itself, not just agreement with autograd: d_gate = dy·u·σ(g)(1 + g(1 − σ(g)))."""
    gate, up, dy = _inputs((4, 33), torch.float32, device, seed=1)
    gate.requires_grad_()
    y = swiglu_ref(gate, up)
    y.backward(dy)
    s = torch.sigmoid(gate.detach())
    assert_close(gate.grad, dy * up * s * (1 + gate.detach() * (1 - s)), torch.float32, "d_gate")


def test_swiglu_reference_mode_and_noncontiguous(device):
    gate, up, _ = _inputs((6, 40), torch.float32, device)
    gate_t, up_t = gate.t(), up.t()  # non-contiguous views
    with force_triton():
        y = swiglu(gate_t, up_t)
    with use_reference():
        y_ref = swiglu(gate_t, up_t)
    assert_close(y, y_ref, torch.float32, "y (transposed inputs)")


def test_swiglu_rejects_mismatched_inputs(device):
    gate, up, _ = _inputs((2, 8), torch.float32, device)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :4])
    with pytest.raises(ValueError, match="dtype"):
        swiglu(gate, up.double())


@pytest.mark.parametrize("shape", [(2, 3, 77), (5, 123, 77), (2, 7, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_packed_matches_reference(shape, dtype, device):
    """[gate | up] in one (..., 2I) tensor (the grouped gate/up projection's output): the same
    y, and its gradient as one (..., 2I) tensor holding [d_gate | d_up]."""
    gate, up, dy = _inputs(shape, dtype, device)
    gate_up = torch.cat([gate, up], dim=-1).requires_grad_()
    with force_triton():
        y = swiglu_packed(gate_up)
    y.backward(dy)
    y_ref, dgate_ref, dup_ref = _fp32_reference(gate, up, dy)
    assert y.shape == gate.shape and gate_up.grad.shape == gate_up.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(gate_up.grad, torch.cat([dgate_ref, dup_ref], dim=-1), dtype, "[d_gate | d_up]")


def test_swiglu_packed_rejects_odd_width(device):
    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.zeros(2, 7, device=device))
