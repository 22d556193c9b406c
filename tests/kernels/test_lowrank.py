"""kernels/lowrank.py: the three low-rank launchers against their fp32 torch references, and the
dropout mask of the kernels against `dropout_keep_mask`, bit for bit.

On a CPU the kernels run in the Triton interpreter (the launchers take any tensor; tests/conftest.py
sets ``TRITON_INTERPRET``), whose small fixed tiles (BLOCK_M 16) make the shapes below run tails,
several tiles, several rank tiles and several wgrad splits. The op-level tests (outputs and every
gradient of the LoRA linear) are in test_lora.py and test_lora_group.py.
"""

import pytest
import torch

from kernels.lowrank import (
    Dropout,
    dropout_keep_mask,
    lowrank_down,
    lowrank_down_ref,
    lowrank_up_,
    lowrank_up_ref,
    lowrank_wgrad,
    lowrank_wgrad_ref,
)
from tests.tolerances import assert_close

M, K, N = 40, 75, 50  # 40 rows: three wgrad splits of 16 under the interpreter
# (rank R, columns per group, dropout): one adapter, one adapter of two rank tiles, three groups
GROUPS = [(16, None, False), (16, None, True), (40, None, False), (24, 8, True)]


def rnd(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dropout(r, group_r, on):
    if not on:
        return None
    return Dropout(torch.tensor([11, 12, 13][:r // (group_r or r)], dtype=torch.int64), 0.3)


def test_keep_mask_statistics():
    keep = dropout_keep_mask(3, 32, 1000, 0.1)
    assert keep.shape == (32, 1000) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.9) < 0.008  # 32k draws: std of the mean ≈ 0.0017
    assert not torch.equal(keep, dropout_keep_mask(4, 32, 1000, 0.1)), "different seeds, same mask"
    assert dropout_keep_mask(3, 4, 5, 0.0).all(), "p=0 must keep everything"


def test_kernel_mask_is_dropout_keep_mask_bit_for_bit():
    """c = Σ_g keep_g ⊙ (1·1): with h and u all ones and one rank column per group, the up kernel
    writes each group's mask as 0/1, which must be `dropout_keep_mask` of that group's seed."""
    seeds = torch.tensor([5, 2**31 - 2], dtype=torch.int64)
    c = torch.zeros(M, N)
    lowrank_up_(c, torch.ones(M, 2), torch.ones(2, N), 1.0, Dropout(seeds, 0.4), group_r=1)
    want = sum(dropout_keep_mask(int(s), M, N, 0.4).float() for s in seeds)
    assert torch.equal(c, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,group_r,drop_on", GROUPS)
def test_down(r, group_r, drop_on, dtype):
    x, u, drop = rnd(M, K, dtype=dtype), rnd(r, K, dtype=dtype, seed=1).t(), dropout(r, group_r, drop_on)  # Aᵀ view
    got = lowrank_down(x, u, 1.5, drop, group_r)
    assert got.dtype == torch.float32 and got.shape == (M, r)
    assert_close(got, lowrank_down_ref(x, u, 1.5, drop, group_r), torch.float32, "h")  # exact products


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,group_r,drop_on", GROUPS)
def test_up(r, group_r, drop_on, dtype):
    h, u, drop = rnd(M, r, seed=2), rnd(r, N, dtype=dtype, seed=3), dropout(r, group_r, drop_on)
    c = rnd(M, 2 * N, dtype=dtype, seed=4)[:, :N]  # a slice: row stride 2N, as lora_group's outputs
    want = c.clone()
    lowrank_up_(c, h, u, 0.5, drop, group_r)
    lowrank_up_ref(want, h, u, 0.5, drop, group_r)
    assert_close(c, want, dtype, "c")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,group_r,drop_on", GROUPS)
def test_wgrad(r, group_r, drop_on, dtype):
    lo, x, drop = rnd(M, r, seed=5), rnd(M, K, dtype=dtype, seed=6), dropout(r, group_r, drop_on)
    got = lowrank_wgrad(lo, x, 2.0, drop, group_r)
    assert got.dtype == torch.float32 and got.shape == (r, K)
    want = lowrank_wgrad_ref(lo, x, 2.0, drop, group_r)
    if dtype == torch.float32:
        assert_close(got, want, torch.float32, "G")
        return
    # dot_split keeps ~16 bits of the fp32 lo (hi + lo in bf16; the interpreter truncates, a GPU
    # rounds to nearest): each term is off by at most 2**-16 of itself. One bf16 rounding of lo
    # would be 2**-8.
    bound = 2**-16 * lowrank_wgrad_ref(lo.abs(), x.abs(), 2.0, drop, group_r) + 1e-5 * (1 + want.abs())
    ratio = ((got - want).abs() / bound).max().item()
    assert ratio <= 1, f"G: off by {ratio:.2f}× the 16-bit split's bound (max abs diff {(got - want).abs().max():.3e})"
