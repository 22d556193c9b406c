"""fp8_rows: the per-row e4m3 quantizer of FP8 products, its Triton kernel (forced, so on a CPU it
runs in the interpreter) against the torch reference byte for byte, and the reference against the
module docstring's formula.
"""

import pytest
import torch

import kernels.fp8_rows
from kernels.backend import force_triton
from kernels.fp8 import E4M3, E4M3_MAX, MIN_SCALE
from kernels.fp8_rows import quantize_rows, quantize_rows_ref

IMPLS = ("triton", "reference")


def run(impl, a, col_scale=None):
    if impl == "triton":
        with force_triton():
            return quantize_rows(a, col_scale)
    return quantize_rows_ref(a, col_scale)


def same_bytes(got, want, name=""):
    (codes, scale), (want_codes, want_scale) = got, want
    assert codes.dtype == E4M3 and codes.shape == want_codes.shape and scale.shape == want_scale.shape
    assert torch.equal(scale, want_scale), f"{name} scales"
    off = codes.view(torch.uint8) != want_codes.view(torch.uint8)
    assert not off.any(), f"{name}: {int(off.sum())} codes differ, first at {tuple(off.nonzero()[0].tolist())}"


@pytest.mark.parametrize("impl", IMPLS)
def test_activation_rows_are_scaled_to_the_e4m3_range(impl):
    a = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 6)[:, None]
    a[2] = 0.0
    codes, scale = run(impl, a)
    assert scale.shape == (6, 1) and codes.dtype == E4M3
    assert torch.allclose(codes.float().abs().amax(dim=1)[[0, 1, 3, 4, 5]], torch.full((5,), E4M3_MAX))
    assert not codes[2].float().any() and float(scale[2]) == MIN_SCALE
    rel = ((codes.float() * scale - a).abs() / a.abs().clamp(min=1e-30))[a.abs() > scale * 2.0**-6]
    assert float(rel.max()) <= 2.0**-4


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_of_tiny_values_is_quantized_on_its_own_grid(impl):
    """Rows whose max is 1e-11 (gradient rows that are rounding noise, or a token-normalized loss
    over many tokens) get the codes the same row has at any power-of-two scale: the floor of the
    scale applies to an all-zero row only. (A floor of 1e-12 gave them coarser codes, and 2 ranks,
    which scale the loss by the world size, then rounded otherwise than one process.)"""
    a = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)) * 1e-11
    reference_codes, reference_scale = run(impl, a)
    for power in (1, 20, 80):
        codes, scale = run(impl, a * 2.0**power)
        assert torch.equal(codes.view(torch.uint8), reference_codes.view(torch.uint8)), power
        assert torch.equal(scale, reference_scale * 2.0**power)
    assert torch.allclose(reference_codes.float().abs().amax(dim=1), torch.full((4,), E4M3_MAX))


def test_row_quantization_in_chunks_equals_it_whole(monkeypatch):
    """The reference's rows go through a bounded scratch block: the codes and scales are those of
    the whole tensor at once, the input is left untouched, and the column scales of dY ⊙ s_w are
    applied in fp32."""
    a = torch.randn(37, 24) * torch.logspace(-2, 2, 37)[:, None]
    col = torch.rand(24) + 0.5
    before = a.clone()
    whole = quantize_rows_ref(a, col)
    monkeypatch.setattr(kernels.fp8_rows, "ROW_CHUNK_ELEMENTS", 5 * 24)  # 8 chunks, the last of 2 rows
    same_bytes(quantize_rows_ref(a, col), whole, "chunked")
    assert torch.equal(a, before)
    v = a * col
    scale = (v.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=MIN_SCALE)
    assert torch.equal(whole[1], scale)
    assert torch.equal(whole[0].view(torch.uint8), (v / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_col_scale", [False, True])
@pytest.mark.parametrize("m, k", [(3, 77), (5, 1500), (1, 2048)])  # one sweep; two with a tail; two full
def test_kernel_gives_the_references_bytes(dtype, with_col_scale, m, k):
    g = torch.Generator().manual_seed(m * k)
    a = (torch.randn(m, k, generator=g) * torch.logspace(-4, 4, m)[:, None]).to(dtype)
    if m > 2:
        a[1] = 0.0  # an all-zero row: scale MIN_SCALE, codes 0
    col = torch.rand(k, generator=g) + 0.5 if with_col_scale else None
    same_bytes(run("triton", a, col), quantize_rows_ref(a, col), f"{dtype} {m}x{k}")


def test_kernel_reads_rows_at_their_stride():
    """dY of one member of a grouped projection is a column slice of the group's (rows strided)."""
    whole = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    part = whole[:, 8:24]
    assert part.stride() == (40, 1)
    same_bytes(run("triton", part), quantize_rows_ref(part.contiguous()))
    same_bytes(run("triton", whole.t()), quantize_rows_ref(whole.t().contiguous()), "column-major")


def _e4m3_values() -> torch.Tensor:
    """Every positive finite e4m3 value, ascending (codes 0x00 to 0x7E)."""
    return torch.arange(0x7F, dtype=torch.uint8).view(E4M3).float()


def test_rounding_is_torchs_cast_at_every_tie_and_beside_it():
    """Each row holds 448 (so its scale is exactly 1 and y = v), then every e4m3 value, every
    midpoint between neighbours (a tie: to the even code) and the fp32 numbers just below and above
    each midpoint, with both signs: the kernel's bit rounding is torch's cast everywhere."""
    values = _e4m3_values()
    mids = (values[1:] + values[:-1]) / 2  # exact in fp32
    below, above = torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 1e9))
    probes = torch.cat([values, mids, below, above])
    probes = torch.cat([probes, -probes])
    rows = torch.cat([torch.full((1,), E4M3_MAX), probes])[None]
    codes, scale = run("triton", rows)
    assert float(scale) == 1.0
    assert torch.equal(codes.view(torch.uint8), rows.to(E4M3).view(torch.uint8))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_nan_makes_its_row_nan_and_leaves_the_others(impl):
    a = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    a[1, 17] = float("nan")
    codes, scale = run(impl, a)
    assert torch.isnan(scale[1]).all() and torch.isnan(codes[1].float()).all()
    same_bytes((codes[[0, 2]], scale[[0, 2]]), quantize_rows_ref(a[[0, 2]]), "finite rows")


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match=r"a: expected a 2-D \(M, K\) operand"):
        quantize_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"col_scale: expected shape \(4,\)"):
        quantize_rows(torch.zeros(2, 4), torch.ones(3))
