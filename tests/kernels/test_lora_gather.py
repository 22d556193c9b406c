"""kernels/lora_gather.py: the gathered (per-row adapter) LoRA forward against its torch reference.

On a CPU the kernels run in the Triton interpreter (``force_triton``); the reference runs in fp32
on the same rounded inputs (y, x, A, B upcast), compared with the shared tolerances of the dtype.
Rows without an adapter (-1) must come back bit for bit as they went in.
"""

import pytest
import torch

from kernels.backend import force_triton, set_kernel_mode
from kernels.lora_gather import gather_rows, lora_gather, lora_gather_ref
from tests.tolerances import assert_close


def make_inputs(n, n_in, n_out, ranks, dtype, device, seed=0):
    """y, x at magnitude ~1; K = len(ranks) adapters stacked at the largest rank, each zero-padded
    beyond its own rank (as `engine.adapters.multi` stacks them); scales (K,) fp32."""
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    a = torch.zeros(len(ranks), r, n_in)
    b = torch.zeros(len(ranks), n_out, r)
    for k, rk in enumerate(ranks):
        a[k, :rk] = torch.randn(rk, n_in, generator=g) * n_in**-0.5
        b[k, :, :rk] = torch.randn(n_out, rk, generator=g) * rk**-0.5
    scales = torch.tensor([2.0, 0.5, 1.25, 3.0][:len(ranks)], dtype=torch.float32)
    return {"y": torch.randn(n, n_out, generator=g).to(dtype).to(device),
            "x": torch.randn(n, n_in, generator=g).to(dtype).to(device),
            "lora_A": a.to(dtype).to(device), "lora_B": b.to(dtype).to(device), "scales": scales.to(device)}


def check(t, ids, dtype, rows=False):
    ids = torch.tensor(ids, dtype=torch.int64, device=t["x"].device)
    y0 = t["y"].clone()
    with force_triton(), torch.no_grad():
        extra = {"rows": gather_rows(ids, t["lora_A"].shape[0])} if rows else {}
        got = lora_gather(t["y"].clone(), t["x"], t["lora_A"], t["lora_B"], t["scales"], ids, **extra)
    want = lora_gather_ref(y0.float(), t["x"].float(), t["lora_A"].float(), t["lora_B"].float(), t["scales"], ids)
    assert got.dtype == dtype
    assert_close(got, want, dtype, "y")
    none = ids == -1
    assert torch.equal(got[none], y0[none]), "rows without an adapter must be left as they are"
    return got


MIXED = [0, 2, -1, 1, 0, -1, 2]  # N = 7: every adapter, two base rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_ranks_and_base_rows(dtype, device):
    """N=7, in=123, out=77, adapters of rank 8, 16 and 5 (padded to 16), some rows without one."""
    check(make_inputs(7, 123, 77, (8, 16, 5), dtype, device), MIXED, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[1] * 7, [-1] * 7, [2, 2, -1, 2, 2, 2, -1]], ids=["all-one", "all-none", "gaps"])
def test_one_adapter_and_empty_groups(ids, dtype, device):
    """All rows on one adapter (the others' segments empty), no row with one, and empty groups."""
    got = check(make_inputs(7, 123, 77, (8, 16, 16), dtype, device), ids, dtype)
    if all(i == -1 for i in ids):
        assert torch.equal(got, make_inputs(7, 123, 77, (8, 16, 16), dtype, device)["y"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_row_tiles_and_rank_tiles(dtype, device):
    """40 rows (several 16-row tiles per segment under the interpreter), rank 24 (two rank tiles),
    columns over two tiles; the rows sorted once and passed in (``rows=``), as every layer does."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 3, (40,), generator=g).tolist()
    check(make_inputs(40, 64, 48, (24, 8, 24), dtype, device, seed=2), ids, dtype, rows=True)


def test_one_adapter_equals_a_plain_lora_product():
    """K = 1, every row on it: y + s·(x·Aᵀ)·Bᵀ, the LoRA term of `kernels.lora`."""
    t = make_inputs(5, 33, 20, (4,), torch.float64, "cpu")
    ids = torch.zeros(5, dtype=torch.int64)
    want = t["y"] + 2.0 * (t["x"] @ t["lora_A"][0].t()) @ t["lora_B"][0].t()
    got = lora_gather_ref(t["y"].clone(), t["x"], t["lora_A"], t["lora_B"], t["scales"], ids)
    assert_close(got, want, torch.float64, "y")


def test_auto_mode_on_cpu_runs_the_reference():
    t = make_inputs(7, 123, 77, (8, 16, 5), torch.float32, "cpu")
    ids = torch.tensor(MIXED)
    with set_kernel_mode("auto"):
        got = lora_gather(t["y"].clone(), t["x"], t["lora_A"], t["lora_B"], t["scales"], ids)
    assert torch.equal(got, lora_gather_ref(t["y"].clone(), t["x"], t["lora_A"], t["lora_B"], t["scales"], ids))


def test_gather_rows_segments():
    rows = gather_rows(torch.tensor(MIXED), 4)
    assert rows.order.tolist() == [2, 5, 0, 4, 3, 1, 6]  # none first, then adapter 0, 1, 2 (stable)
    assert rows.offsets.tolist() == [2, 4, 5, 7, 7]  # adapter 3: an empty segment


def _bad(**changes):
    t = make_inputs(4, 12, 10, (3, 2), torch.float32, "cpu")
    return {**t, "adapter_ids": torch.tensor([0, 1, -1, 0]), **changes}


BAD_INPUTS = [
    (dict(x=torch.randn(4, 13)), r"lora_A is \(2, 3, 12\), expected \(K, r ≥ 1, in=13\)"),
    (dict(lora_B=torch.randn(2, 11, 3)), r"lora_B is \(2, 11, 3\), expected \(K=2, out=10, r=3\)"),
    (dict(adapter_ids=torch.tensor([0, 1, 2, 0])), r"adapter_ids must lie in \[-1, 2\)"),
    (dict(adapter_ids=torch.tensor([0, 1, -2, 0])), r"adapter_ids must lie in \[-1, 2\)"),
    (dict(adapter_ids=torch.tensor([0, 1, 0])), "adapter_ids shape"),
    (dict(adapter_ids=torch.tensor([0, 1, -1, 0], dtype=torch.int32)), "must be int64"),
    (dict(scales=torch.ones(2, dtype=torch.float64)), "scales must be"),
    (dict(x=torch.randn(4, 12).double()), "share one float dtype"),
    (dict(x=torch.randn(4, 3, 12)), r"expected x \(N, in\)"),
]


@pytest.mark.parametrize("changes,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(changes, message):
    args = _bad(**changes)
    with force_triton(), torch.no_grad(), pytest.raises((ValueError, TypeError), match=message):
        lora_gather(args["y"], args["x"], args["lora_A"], args["lora_B"], args["scales"], args["adapter_ids"])


def test_refuses_autograd():
    args = _bad(x=torch.randn(4, 12, requires_grad=True))
    with pytest.raises(ValueError, match="forward only"):
        lora_gather(args["y"], args["x"], args["lora_A"], args["lora_B"], args["scales"], args["adapter_ids"])
