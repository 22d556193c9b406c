"""kernels.linear_kl against F.kl_div(log p, log p0, log_target=True) on materialised logits.

Every test runs both implementations: the Triton path (forced, so on a CPU it runs in the
interpreter) and the plain-torch reference. fp32 inputs are checked against an fp64 kl_div, bf16
inputs against an fp32 one from the same rounded inputs, with the shared tolerance table. Token
counts are small because the interpreter is slow; vocabularies are real (49,152 SmolLM2, 128,256
Llama-3). The chunk size is shrunk to 4 tokens so the multi-chunk code runs.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels.linear_kl as lkl
from kernels.backend import set_kernel_mode
from kernels.linear_kl import linear_kl, linear_kl_ref
from tests.tolerances import assert_close

REAL_CHUNK_ROWS = lkl._chunk_rows  # before the autouse fixture below shrinks it
IMPLS = ("triton", "reference")
REDUCTIONS = ("sum", "mean", "none")
CASES = [  # (N, H, V, dtype)
    (5, 77, 123, torch.float32),  # odd, non-power-of-two everything
    (9, 33, 13, torch.float32),  # tiny vocabulary: every probability is large
    (7, 24, 49_152, torch.float32),
    (3, 16, 128_256, torch.float32),
    (6, 40, 1000, torch.bfloat16),
    (3, 16, 49_152, torch.bfloat16),
    (3, 16, 128_256, torch.bfloat16),
    (5, 16, 32_000, torch.float16),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """4-token chunks, whatever V the test uses."""
    real_chunk_rows = lkl._chunk_rows
    monkeypatch.setattr(lkl, "_chunk_rows", lambda n, v: min(4, real_chunk_rows(n, v)))


def make_inputs(n, h, v, dtype, device, seed=0, masked=(0, 3), shift=0.5):
    """base ~ N(0, 1), policy = base + shift · N(0, 1), weight ~ N(0, 4/H): logits ~ N(0, 4) and
    KL per row of order 1; ``mask`` False at the ``masked`` rows."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, h, generator=g)
    policy = (base + shift * torch.randn(n, h, generator=g)).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype).to(device)
    mask = torch.ones(n, dtype=torch.bool)
    mask[[i for i in masked if i < n]] = False
    return policy, base.to(dtype).to(device), weight, mask.to(device)


def kl_div_expected(policy, base, weight, mask, reduction, dtype):
    """The definition through F.kl_div, in fp64 for fp32 inputs and fp32 for half precision;
    ``policy`` returned is the leaf to differentiate."""
    ref = torch.float64 if dtype == torch.float32 else torch.float32
    leaf = policy.detach().to(ref).requires_grad_()
    w = weight.to(ref)
    log_p = F.log_softmax(leaf @ w.T, dim=-1)
    log_p0 = F.log_softmax(base.to(ref) @ w.T, dim=-1)
    if reduction == "none":
        per_row = F.kl_div(log_p, log_p0, log_target=True, reduction="none").sum(-1)
        return leaf, torch.where(mask, per_row, 0.0)
    kept = F.kl_div(log_p[mask], log_p0[mask], log_target=True, reduction="sum" if reduction == "sum" else
                    "batchmean") if mask.any() else (log_p.sum() * 0)
    return leaf, kept


def upstream(reduction, mask):
    """An upstream gradient that keeps gradients at magnitude ~1: n for a mean (undoing the 1/n),
    1 for a sum, N(0, 1) per token for ``none``."""
    if reduction == "none":
        return torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)).to(mask.device)
    if reduction == "mean":
        return mask.sum().clamp(min=1).float()
    return torch.ones((), device=mask.device)


def run(impl, *args, **kwargs):
    with set_kernel_mode("triton" if impl == "triton" else "reference"):
        return linear_kl(*args, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,h,v,dtype", CASES)
def test_matches_kl_div(impl, reduction, n, h, v, dtype, device):
    policy, base, weight, mask = make_inputs(n, h, v, dtype, device)
    kl = run(impl, policy, base, weight, mask, reduction=reduction)
    assert kl.dtype == torch.float32 and kl.shape == (() if reduction != "none" else (n,))
    leaf, expected = kl_div_expected(policy, base, weight, mask, reduction, dtype)
    assert_close(kl, expected, dtype, "kl")
    grad = upstream(reduction, mask)
    kl.backward(grad)
    expected.backward(grad.to(expected.dtype))
    assert policy.grad.dtype == dtype
    assert_close(policy.grad, leaf.grad, dtype, "dpolicy")


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_are_exactly_zero(impl, device):
    policy, base, weight, mask = make_inputs(6, 20, 500, torch.float32, device, masked=(1, 4), shift=3.0)
    kl = run(impl, policy, base, weight, mask, reduction="none")
    assert torch.isfinite(kl).all()
    assert (kl[~mask] == 0).all() and (kl[mask] > 0).all()
    kl.backward(torch.ones_like(kl))
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_holding_nan_and_inf_give_zero(impl, device):
    """Whatever a masked row holds (padding garbage), its KL and its gradient are 0."""
    policy, base, weight, mask = make_inputs(5, 16, 300, torch.float32, device, masked=(1, 3))
    with torch.no_grad():
        policy[1], base[3] = float("nan"), float("inf")
    kl = run(impl, policy, base, weight, mask, reduction="none")
    leaf, expected = kl_div_expected(policy, base.nan_to_num(posinf=0.0), weight, mask, "none", torch.float32)
    assert_close(kl, expected, torch.float32, "kl")
    kl.backward(torch.ones_like(kl))
    expected.backward(torch.ones_like(expected))
    assert_close(policy.grad, torch.where(mask[:, None], leaf.grad, 0.0), torch.float32, "dpolicy")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_masked_is_zero_not_nan(impl, reduction, device):
    policy, base, weight, _ = make_inputs(5, 24, 300, torch.float32, device)
    mask = torch.zeros(5, dtype=torch.bool, device=device)
    kl = run(impl, policy, base, weight, mask, reduction=reduction)
    assert_close(kl, torch.zeros_like(kl), torch.float32, "kl")
    kl.backward(torch.ones_like(kl))
    assert (policy.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_equal_to_base_is_exactly_zero(impl, dtype, device):
    """A fresh adapter (B = 0): the two passes give the same hidden states, so KL is exactly 0 and
    so is the fused gradient p − p0; the reference's log-softmax backward gives p · Σ p0 − p0,
    0 up to the rounding of Σ p0."""
    _, base, weight, mask = make_inputs(7, 32, 49_152, dtype, device, masked=())
    policy = base.clone().requires_grad_()
    kl = run(impl, policy, base, weight, mask, reduction="none")
    assert (kl == 0).all()
    kl.sum().backward()
    assert_close(policy.grad, torch.zeros_like(policy), dtype, "dpolicy")
    if impl == "triton":
        assert (policy.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_mask_means_every_row(impl, device):
    policy, base, weight, _ = make_inputs(5, 16, 700, torch.float32, device, seed=3)
    everything = torch.ones(5, dtype=torch.bool, device=device)
    for reduction in REDUCTIONS:
        assert_close(run(impl, policy, base, weight, reduction=reduction),
                     run(impl, policy, base, weight, everything, reduction=reduction), torch.float32, reduction)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_gives_the_same_kl_and_no_graph(impl, device):
    policy, base, weight, mask = make_inputs(5, 16, 900, torch.float32, device, seed=4)
    with torch.no_grad():
        kl = run(impl, policy, base, weight, mask, reduction="mean")
        expected = linear_kl_ref(policy, base, weight, mask, reduction="mean")
    assert not kl.requires_grad
    assert_close(kl, expected, torch.float32, "kl")


def test_triton_path_never_holds_more_than_a_chunk_of_logits(monkeypatch, device):
    """Every logits tensor the Triton path makes is one (≤ 4, V) chunk, never (N, V)."""
    shapes = []
    real_launch = lkl._launch_rows
    monkeypatch.setattr(lkl, "_launch_rows", lambda z, z0, *a: (shapes.append((tuple(z.shape), tuple(z0.shape))),
                                                                 real_launch(z, z0, *a)))
    policy, base, weight, mask = make_inputs(11, 16, 32_000, torch.bfloat16, device, seed=5)
    run("triton", policy, base, weight, mask).backward()
    assert shapes == [((4, 32_000),) * 2, ((4, 32_000),) * 2, ((3, 32_000),) * 2]


def test_chunk_rows_at_real_sizes():
    assert REAL_CHUNK_ROWS(16_384, 128_256) == 512  # 2 × 0.13 GB of bf16 logits per chunk
    assert REAL_CHUNK_ROWS(16_384, 49_152) == 1024
    assert REAL_CHUNK_ROWS(5, 1000) == 5
    assert REAL_CHUNK_ROWS(100, 1 << 28) == 1


def _bad(**changes):
    policy, base, weight, mask = make_inputs(4, 8, 50, torch.float32, "cpu")
    args = dict(policy_hidden=policy, base_hidden=base, weight=weight, mask=mask)
    args.update(changes)
    return args


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args,error,match", [
    (_bad(weight=torch.randn(50, 9)), ValueError, "disagree on H"),
    (_bad(policy_hidden=torch.randn(2, 4, 8)), ValueError, "policy_hidden must be a 2-D"),
    (_bad(base_hidden=torch.randn(5, 8)), ValueError, r"base_hidden shape \(5, 8\)"),
    (_bad(mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask shape"),
    (_bad(mask=torch.ones(4, dtype=torch.long)), TypeError, "mask must be a bool"),
    (_bad(weight=torch.randn(50, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (_bad(base_hidden=torch.randn(4, 8).bfloat16()), TypeError, "base_hidden dtype torch.bfloat16 != policy"),
    (_bad(reduction="batchmean"), ValueError, "reduction 'batchmean'"),
    (_bad(weight=torch.randn(50, 8).requires_grad_()), ValueError, "weight requires grad"),
    (_bad(base_hidden=torch.randn(4, 8).requires_grad_()), ValueError, "base_hidden requires grad"),
])
def test_bad_inputs_name_the_argument(impl, args, error, match):
    with pytest.raises(error, match=match):
        run(impl, **args)
