"""DoRA's weight norm: the Triton kernel (forced; interpreter on CPU) against the reference, and the
reference against the plain fp64 formula ‖W + s·B·A‖ per row."""

import pytest
import torch

from kernels.backend import force_triton
from kernels.dora import dora_weight_norm, dora_weight_norm_ref
from kernels.nf4 import dequantize_nf4, quantize_nf4
from tests.tolerances import assert_close

# (out, in, r): odd sizes, ranks of every rank tile (16, 32, 64, 128), in-dims not a tile multiple,
# more rows than one block of the reference (256)
SHAPES = [(5, 123, 3), (77, 40, 17), (33, 130, 64), (20, 50, 100), (300, 20, 4)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _operands(shape, dtype, device, seed=0):
    n_out, n_in, r = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g).to(device, dtype)
    a = (torch.randn(r, n_in, generator=g) / n_in ** 0.5).to(device)
    b = torch.randn(n_out, r, generator=g).to(device)
    return w, a, b


def _fp64_norm(w, a, b, scale):
    return torch.linalg.norm(w.double() + scale * (b.double() @ a.double()), dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_and_fp64_formula(shape, dtype, device):
    w, a, b = _operands(shape, dtype, device)
    with force_triton():
        got = dora_weight_norm(w, a, b, 0.7)
    ref = dora_weight_norm_ref(w, a, b, 0.7)
    exact = _fp64_norm(w, a, b, 0.7)
    assert got.dtype == ref.dtype == torch.float32 and got.shape == (shape[0],)
    # both from the same (rounded) W in fp32: fp32's budget whatever W's dtype
    assert_close(got, ref, torch.float32, "kernel vs reference")
    assert_close(ref, exact, torch.float32, "reference vs fp64 formula")


def test_kernel_reads_strided_weight_and_bf16_factors(device):
    """A transposed (non-contiguous) W and bf16 A, B (read as fp32) are taken without a copy of W."""
    w, a, b = _operands((48, 37, 5), torch.float32, device, seed=3)
    wt = w.t().contiguous().t()  # same values, strides (1, 48)
    assert not wt.is_contiguous()
    with force_triton():
        got = dora_weight_norm(wt, a.bfloat16(), b.bfloat16(), -1.3)
    assert_close(got, _fp64_norm(w, a.bfloat16(), b.bfloat16(), -1.3).float(), torch.float32, "strided")


@pytest.mark.parametrize("triton", [False, True])
def test_nf4_base_is_the_norm_of_its_dequantized_weight(triton, device):
    w, a, b = _operands((64, 96, 4), torch.bfloat16, device, seed=5)
    q = quantize_nf4(w)
    dense = dequantize_nf4(q, torch.bfloat16)
    if triton:
        with force_triton():
            got = dora_weight_norm(q, a, b, 2.0)
    else:
        got = dora_weight_norm(q, a, b, 2.0)
    assert_close(got, _fp64_norm(dense, a, b, 2.0).float(), torch.float32, "nf4 norm")


def test_large_rank_takes_the_reference_and_bad_shapes_raise():
    w, a, b = _operands((9, 11, 130), torch.float32, "cpu")
    with force_triton():
        assert_close(dora_weight_norm(w, a, b, 0.5), _fp64_norm(w, a, b, 0.5).float(), torch.float32, "r=130")
    with pytest.raises(ValueError, match=r"do not fit weight \(out=9, in=11\)"):
        dora_weight_norm(w, a[:, :5], b, 0.5)
