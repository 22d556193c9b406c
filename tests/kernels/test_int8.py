"""int8: bitsandbytes' row-wise quantization bit for bit, Triton dequant == reference bit for bit,
the rounding bound, and LoRA over an int8 base against plain math on the rounded weight.

bitsandbytes (its CPU/torch path) is the oracle for quantization and dequantization; the Triton
kernel runs under the interpreter on a CPU (``force_triton``).
"""

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from kernels.backend import force_triton, use_reference
from kernels.frozen import frozen_linear
from kernels.int8 import Int8Tensor, dequantize_int8, int8_dequant_ref, quantize_int8
from kernels.lora import lora_linear, lora_linear_ref
from tests.kernels.test_lora import make_inputs, run
from tests.tolerances import assert_close

SHAPES = [(5, 123), (77, 64), (130, 33)]  # (out, in)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    codes, scb, _ = bnb_functional.int8_vectorwise_quant(w.clone())
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.absmax.dtype == torch.float32 and q.dtype == dtype
    assert torch.equal(q.codes, codes), "codes differ from bitsandbytes' int8_vectorwise_quant"
    assert torch.equal(q.absmax, scb), "absmax differs from bitsandbytes' SCB"
    assert torch.equal(int8_dequant_ref(q, torch.float32), bnb_functional.int8_vectorwise_dequant(codes, scb))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequant_equals_reference_bit_for_bit(shape, dtype):
    q = quantize_int8(_weight(shape, torch.float32, seed=1))
    want = int8_dequant_ref(q, dtype)
    with force_triton():
        got = dequantize_int8(q, dtype)
        into = dequantize_int8(q, dtype, out=torch.empty(shape, dtype=dtype))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert got.dtype == dtype
    assert torch.equal(got.view(bits), want.view(bits)) and torch.equal(into.view(bits), want.view(bits))


def test_rounding_bound_and_zero_rows():
    w = _weight((9, 200), torch.float32, seed=2)
    w[3] = 0.0
    q = quantize_int8(w)
    err = (int8_dequant_ref(q, torch.float32) - w).abs()
    bound = q.absmax[:, None] / 254 * (1 + 1e-6)
    assert bool((err <= bound).all()), f"max error / bound {float((err / bound.clamp(min=1e-30)).max()):.3f}"
    assert q.absmax[3] == 0 and not q.codes[3].any() and not int8_dequant_ref(q, torch.float32)[3].any()
    assert int(q.codes.abs().max()) == 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_over_int8_matches_reference_on_rounded_weight(dtype, device):
    t = make_inputs((16,), 64, 48, 16, dtype, device)
    q = quantize_int8(t["weight"].float().cpu()).to(device)
    with use_reference():
        w_dense = dequantize_int8(q, dtype)
    with force_triton():
        got = run(lora_linear, {**t, "weight": q})
    want = run(lora_linear_ref, {**t, "weight": w_dense}, upcast=True)
    for name, g, w in zip(("y", "dX", "dA", "dB"), got, want):
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_int8_forward_and_grads(bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 64, generator=g).requires_grad_()
    q = quantize_int8(_weight((40, 64), torch.float32, seed=4))
    b = (torch.randn(40, generator=g) * 0.1).requires_grad_() if bias else None
    dy = torch.randn(3, 5, 40, generator=g)
    with force_triton():
        y = frozen_linear(x, q, b)
    y.backward(dy)
    x32 = x.detach().clone().requires_grad_()
    b32 = b.detach().clone().requires_grad_() if bias else None
    y32 = torch.nn.functional.linear(x32, int8_dequant_ref(q, torch.float32), b32)
    y32.backward(dy)
    assert_close(y, y32, torch.float32, "y")
    assert_close(x.grad, x32.grad, torch.float32, "dx")
    if bias:
        assert_close(b.grad, b32.grad, torch.float32, "dbias")


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 4, dtype=torch.int32), "dtype"),
    (torch.zeros(12), "2-D"),
    ("weights", "torch.Tensor"),
])
def test_bad_weights_are_refused(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        quantize_int8(bad)


def test_dequantize_checks_its_arguments():
    q = quantize_int8(_weight((4, 8), torch.float32))
    with pytest.raises(TypeError, match="Int8Tensor"):
        dequantize_int8(q.codes)
    with pytest.raises(ValueError, match="out"):
        dequantize_int8(q, torch.float32, out=torch.empty(4, 9))
    assert isinstance(q.to("cpu"), Int8Tensor)
