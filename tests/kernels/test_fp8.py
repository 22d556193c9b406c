"""fp8: the e4m3 weight format, the row-scaled products of `kernels.fp8_linear` against plain math
on the same rounded operands, and LoRA over an FP8 base (outputs and every gradient).

On a CPU the products are the fp32 emulation of ``torch._scaled_mm`` (same e4m3 codes, same
scales), so these tests check the numerics of the GPU path up to summation order.
"""

import pytest
import torch

from kernels.backend import force_triton, use_reference
from kernels.fp8 import E4M3, E4M3_MAX, FP8Tensor, dequantize_fp8, fp8_dequant_ref, quantize_fp8
from kernels.fp8_rows import quantize_rows
from kernels.fp8_linear import fp8_grad_input_ref, fp8_linear, fp8_matmul_ref
from kernels.lora import lora_linear
from models.quantized import FP8Linear
from tests.kernels.test_lora import make_inputs
from tests.tolerances import assert_close


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_codes_are_the_scaled_e4m3_rounding(dtype):
    w = _weight((37, 96), dtype)
    w[5] = 0.0
    q = quantize_fp8(w)
    absmax = w.float().abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))
    assert q.codes.dtype == E4M3 and q.dtype == dtype
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.codes.view(torch.uint8), (w.float() / scale[:, None]).to(E4M3).view(torch.uint8))
    assert float(q.codes.float().abs().amax(dim=1)[0]) == E4M3_MAX  # each row's maximum maps to 448
    err = (fp8_dequant_ref(q, torch.float32) - w.float()).abs()
    bound = w.float().abs() * 2.0**-4 + q.scale[:, None] * 2.0**-10  # half an e4m3 step (normal, subnormal)
    assert bool((err <= bound).all())
    assert not fp8_dequant_ref(q, torch.float32)[5].any()
    assert torch.equal(dequantize_fp8(q, dtype), fp8_dequant_ref(q, dtype))


def _plain_products(x, q, dy):
    """The forward and dX of the FP8 linear written out on dequantized rounded operands."""
    xc, xs = quantize_rows(x)
    y = (xc.float() * xs) @ (q.codes.float() * q.scale[:, None]).t()
    gc, gs = quantize_rows(dy.float() * q.scale)
    dx = (gc.float() * gs) @ q.codes.float()
    return y, dx


@pytest.mark.parametrize("shape", [(5, 64, 48), (33, 96, 130)])  # (tokens, in, out)
def test_fp8_linear_forward_and_grad_input(shape):
    n, n_in, n_out = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, n_in, generator=g).requires_grad_()
    q = quantize_fp8(_weight((n_out, n_in), seed=2))
    b = (torch.randn(n_out, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(n, n_out, generator=g)
    y = fp8_linear(x, q, b)
    y.backward(dy)
    y_plain, dx_plain = _plain_products(x.detach(), q, dy)
    assert_close(y, y_plain + b.detach(), torch.float32, "y")
    assert_close(x.grad, dx_plain, torch.float32, "dx")
    assert_close(b.grad, dy.sum(0), torch.float32, "dbias")
    assert_close(fp8_matmul_ref(x.detach(), q), y_plain, torch.float32, "fp8_matmul_ref")
    assert_close(fp8_grad_input_ref(dy, q), dx_plain, torch.float32, "fp8_grad_input_ref")
    # and the FP8 products stay near the exact bf16-free product (e4m3: ~2^-4 per operand)
    w = q.codes.float() * q.scale[:, None]
    exact = x.detach() @ w.t()
    assert float((y_plain - exact).norm() / exact.norm()) < 0.06


# the kernels in fp32 and bf16 (fp32 low-rank sums), the reference path (autograd in x's dtype) in fp32
@pytest.mark.parametrize("dtype,triton", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_lora_over_fp8_matches_plain_math(dtype, triton, device):
    t = make_inputs((16,), 64, 48, 16, dtype, device)
    q = quantize_fp8(t["weight"].float().cpu()).to(device)
    x, a, b = (t[k].detach().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    with (force_triton() if triton else use_reference()):
        y = lora_linear(x, q, a, b, 2.0, bias=t["bias"])
    y.backward(t["dy"])
    # plain fp32 math on the same rounded values: the FP8 base products, the low-rank update exact
    x32, a32, b32, dy32 = (t[k].float() for k in ("x", "lora_A", "lora_B", "dy"))
    base, dx_base = _plain_products(x32.to(dtype).float(), q, t["dy"])
    h = x32 @ a32.t()
    want_y = base.to(dtype).float() + 2.0 * h @ b32.t() + t["bias"].float()
    dh = 2.0 * dy32 @ b32
    want = {"y": want_y, "dX": dx_base.to(dtype).float() + dh @ a32, "dA": dh.t() @ x32, "dB": 2.0 * dy32.t() @ h}
    for name, got in (("y", y), ("dX", x.grad), ("dA", a.grad), ("dB", b.grad)):
        assert got.dtype == dtype, name
        assert_close(got, want[name], dtype, name)


def test_module_keeps_its_codes_through_dtype_casts():
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = FP8Linear.from_linear(linear)
    before = layer.frozen_weight.codes.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.frozen_weight.codes.view(torch.uint8), before.view(torch.uint8))
    assert layer.frozen_weight.codes.dtype == E4M3 and isinstance(layer.frozen_weight, FP8Tensor)
    x = torch.randn(3, 64)
    assert_close(layer(x), fp8_matmul_ref(x, layer.frozen_weight), torch.float32, "forward")
    dense = layer.to_linear(torch.float32)
    assert torch.equal(dense.weight, fp8_dequant_ref(layer.frozen_weight, torch.float32))


def test_bad_weights_are_refused():
    with pytest.raises(TypeError, match="dtype"):
        quantize_fp8(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.zeros(12))
    with pytest.raises(ValueError, match="in_features"):
        fp8_linear(torch.randn(2, 5), quantize_fp8(_weight((4, 8))))
    q = quantize_fp8(_weight((4, 8)))
    for out in (torch.empty(4, 9), torch.empty(4, 8, dtype=torch.float16), torch.empty(8, 4).t()):
        with pytest.raises(ValueError, match="out: expected a contiguous torch.float32 tensor of shape \\(4, 8\\)"):
            dequantize_fp8(q, torch.float32, out=out)
    with pytest.raises(TypeError, match="q: expected an FP8Tensor, got Tensor"):
        dequantize_fp8(q.codes, torch.float32)


def _layout_checking_scaled_mm(a, b, *, scale_a, scale_b, out_dtype):
    """What torch._scaled_mm requires of its operands on a GPU (row-major a, column-major b, K and N
    multiples of 16, fp32 scales (M, 1) and (1, N)), asserted, then its product in fp32."""
    (m, k), n = a.shape, b.shape[1]
    assert a.dtype == b.dtype == E4M3 and a.stride() == (k, 1) and b.stride() == (1, k)
    assert k % 16 == 0 and n % 16 == 0
    assert scale_a.shape == (m, 1) and scale_b.shape == (1, n) and scale_a.dtype == scale_b.dtype == torch.float32
    return (a.float() @ b.float() * scale_a * scale_b).to(out_dtype)


@pytest.mark.parametrize("m", [5, 32])  # M needs no multiple of 16
def test_scaled_mm_gets_its_layout_for_both_products(m):
    """Both products of the FP8 linear reach torch._scaled_mm laid out as a GPU requires: checked
    by hand, by torch's own checks (on meta tensors it applies its CUDA rules), and, where this
    torch runs _scaled_mm on a CPU, by its values."""
    from kernels.fp8 import fp8_mm_ref, scaled_mm_laid_out

    q = quantize_fp8(_weight((48, 64), seed=5))
    ones = torch.ones(64)
    products = {"x·Wᵀ": (*quantize_rows(torch.randn(m, 64)), q.codes, q.scale),
                "dY·W": (*quantize_rows(torch.randn(m, 48)), q.codes.t(), ones)}
    for name, (a, a_scale, b, b_scale) in products.items():
        want = fp8_mm_ref(a, a_scale, b, b_scale, torch.bfloat16)
        got = scaled_mm_laid_out(a, a_scale, b, b_scale, torch.bfloat16, _layout_checking_scaled_mm)
        assert_close(got, want, torch.bfloat16, name)
        meta = [t.to("meta") for t in (a, a_scale, b, b_scale)]
        assert scaled_mm_laid_out(*meta, torch.bfloat16, torch._scaled_mm).shape == want.shape
        if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13):  # its CPU kernel (not in 2.11)
            assert_close(scaled_mm_laid_out(a, a_scale, b, b_scale, torch.bfloat16, torch._scaled_mm), want,
                         torch.bfloat16, f"{name} by torch._scaled_mm on the CPU")
