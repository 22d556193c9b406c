"""RMSNorm Triton kernels (forced; interpreter on CPU) against the fp32 reference, and the reference
against transformers' LlamaRMSNorm: outputs, dX and dW."""

import pytest
import torch

from kernels.backend import force_triton
from kernels.rms_norm import rms_norm, rms_norm_ref
from tests.tolerances import assert_close

SHAPES = [(1, 1, 8), (2, 3, 77), (3, 1000), (2, 7, 576)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every shape in every dtype, plus one many-row case (dW sums 615 rows) in the loosest dtype only:
# the interpreter's cost grows with rows, and CI's budget is small
CASES = [(s, d) for s in SHAPES for d in DTYPES] + [((5, 123, 77), torch.bfloat16)]
EPS = 1e-5


def _randn(shape, dtype, device, g, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g) * scale + shift).to(device, dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _fp32(t):
    return t.detach().float().requires_grad_()


@pytest.mark.parametrize("shape,dtype", CASES)
def test_rms_norm_matches_reference(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = _randn(shape, dtype, device, g, scale=2.0)
    w = _randn(shape[-1:], dtype, device, g, scale=0.1, shift=1.0)
    dy = _randn(shape, dtype, device, g)
    x_t, w_t = _leaf(x), _leaf(w)
    with force_triton():
        y = rms_norm(x_t, w_t, EPS)
    y.backward(dy)
    x_r, w_r = _fp32(x), _fp32(w)
    y_ref = rms_norm_ref(x_r, w_r, EPS)
    y_ref.backward(dy.float())
    assert y.dtype == dtype and x_t.grad.dtype == dtype and w_t.grad.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(x_t.grad, x_r.grad, dtype, "dx")
    assert_close(w_t.grad, w_r.grad, dtype, "dw")


def test_rms_norm_frozen_weight_and_noncontiguous_rows(device):
    """LoRA freezes norm weights (no dW pass); a column slice has a row stride wider than H."""
    g = torch.Generator().manual_seed(2)
    wide = _randn((6, 9, 200), torch.float32, device, g)
    x = wide[..., :77]
    w = _randn((77,), torch.float32, device, g, scale=0.1, shift=1.0)
    dy = _randn((6, 9, 77), torch.float32, device, g)
    x_t = _leaf(x)
    with force_triton():
        y = rms_norm(x_t, w, EPS)
    y.backward(dy)
    x_r = _fp32(x)
    y_ref = rms_norm_ref(x_r, w, EPS)
    y_ref.backward(dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x_t.grad, x_r.grad, torch.float32, "dx")


def test_rms_norm_closed_form_dx(device):
    """The backward formula of the docstring, dx = r(g − n·mean(g·n)), against autograd of the reference."""
    g = torch.Generator().manual_seed(3)
    x, dy = _randn((4, 33), torch.float32, device, g), _randn((4, 33), torch.float32, device, g)
    w = _randn((33,), torch.float32, device, g, shift=1.0)
    x_r = _fp32(x)
    rms_norm_ref(x_r, w, EPS).backward(dy)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    n, gw = x * r, dy * w
    assert_close(x_r.grad, r * (gw - n * (gw * n).mean(-1, keepdim=True)), torch.float32, "dx")


def test_rms_norm_reference_equals_hf_llama_rmsnorm(device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(4)
    x = _randn((3, 5, 96), torch.float32, device, g, scale=3.0)
    hf = LlamaRMSNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        hf.weight.copy_(_randn((96,), torch.float32, device, g, shift=1.0))
    expected = hf(x)
    assert_close(rms_norm_ref(x, hf.weight, 1e-6), expected, torch.float32, "reference vs HF")
    with force_triton():
        assert_close(rms_norm(x, hf.weight, 1e-6), expected, torch.float32, "triton vs HF")


def test_rms_norm_bf16_within_one_rounding_of_hf(device):
    """HF rounds the normalized value to bf16 before the weight multiply (two roundings), we round
    once: the two stay within the bf16 row of the table of each other."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(5)
    x = _randn((4, 7, 77), torch.bfloat16, device, g, scale=2.0)
    hf = LlamaRMSNorm(77, eps=EPS).to(device, torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(_randn((77,), torch.bfloat16, device, g, scale=0.1, shift=1.0))
    with force_triton():
        ours = rms_norm(x, hf.weight, EPS)
    assert ours.dtype == torch.bfloat16
    assert_close(ours, hf(x), torch.bfloat16, "ours vs HF in bf16")


def test_rms_norm_rejects_bad_weight(device):
    x = torch.zeros(2, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=device), EPS)
