"""nf4_linear: forward and input/bias gradients vs dense fp32 math on the dequantized weight."""

import pytest
import torch

from kernels.backend import force_triton, use_reference
from kernels.nf4 import nf4_dequant_ref, quantize_nf4
from kernels.nf4_linear import nf4_linear
from tests.tolerances import assert_close

SHAPES = [(1, 64, 32), (5, 123, 77), (2, 7, 256, 96)]  # (..., tokens, in, out) in the last three


def _inputs(shape, dtype, bias, seed=0):
    *lead, in_f, out_f = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype).requires_grad_()
    q = quantize_nf4((torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype), blocksize=64)
    b = (torch.randn(out_f, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    return x, q, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grads_match_dense_fp32(shape, dtype, bias):
    x, q, b = _inputs(shape, dtype, bias)
    with force_triton():
        y = nf4_linear(x, q, b)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    # Dense reference in fp32 from the same rounded inputs and the same dequantized weight.
    w = nf4_dequant_ref(q, dtype).float()
    x32 = x.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_() if bias else None
    y32 = torch.nn.functional.linear(x32, w, b32)
    y32.backward(grad_y.float())
    assert y.dtype == dtype
    assert_close(y, y32, dtype, "y")
    assert_close(x.grad, x32.grad, dtype, "dx")
    if bias:
        assert_close(b.grad, b32.grad, dtype, "dbias")


def test_triton_path_equals_reference_path():
    x, q, b = _inputs((3, 50, 128, 64), torch.float32, True, seed=1)
    with force_triton():
        y_t = nf4_linear(x, q, b)
        (dx_t,) = torch.autograd.grad(y_t.sum(), x)
    with use_reference():
        y_r = nf4_linear(x, q, b)
        (dx_r,) = torch.autograd.grad(y_r.sum(), x)
    assert_close(y_t, y_r, torch.float32, "y")
    assert_close(dx_t, dx_r, torch.float32, "dx")


def test_backward_saves_no_dense_weight():
    """The autograd graph holds no (out, in) tensor: backward dequantizes again."""
    x, q, _ = _inputs((4, 256, 512), torch.float32, False, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with force_triton():
            nf4_linear(x, q).sum().backward()
    assert (512, 256) not in saved and (256, 512) not in saved


def test_bad_inputs_name_the_argument():
    x, q, b = _inputs((4, 64, 32), torch.float32, True)
    with pytest.raises(ValueError, match="x: last dimension must be in_features=64"):
        nf4_linear(torch.randn(4, 63), q)
    with pytest.raises(TypeError, match="x: dtype"):
        nf4_linear(torch.zeros(4, 64, dtype=torch.int64), q)
    with pytest.raises(ValueError, match=r"bias: expected shape \(32,\)"):
        nf4_linear(x, q, torch.zeros(31))
    with pytest.raises(TypeError, match="q: expected an NF4Tensor"):
        nf4_linear(x, torch.zeros(32, 64))
    # A strided (non-contiguous) input is handled, not rejected.
    xt = torch.randn(64, 4).t()
    assert_close(nf4_linear(xt, q), nf4_linear(xt.contiguous(), q), torch.float32, "strided x")
