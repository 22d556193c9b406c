"""kernels/lora.py: the Triton LoRA linear against its torch reference, outputs and all gradients.

On a CPU the kernels run in the Triton interpreter (``force_triton``); the reference is computed
in fp32 from the same rounded inputs, with the shared tolerances of the kernel's dtype.
"""

import pytest
import torch

from kernels.backend import force_triton, set_kernel_mode, use_reference
from kernels.lora import dropout_keep_mask, lora_linear, lora_linear_ref
from kernels.nf4 import dequantize_nf4, quantize_nf4
from tests.tolerances import assert_close

SHAPES = [((5,), 123, 77), ((16,), 64, 48), ((2, 3), 33, 130)]  # (leading dims of x, in, out)


def make_inputs(lead, n_in, n_out, rank, dtype, device, bias=True, seed=0):
    """x, W, A, B, bias, dY at magnitude ~1 (W, A, B scaled by 1/sqrt(fan-in)), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    return {
        "x": rnd(*lead, n_in), "weight": rnd(n_out, n_in, std=n_in**-0.5),
        "lora_A": rnd(rank, n_in, std=n_in**-0.5), "lora_B": rnd(n_out, rank, std=n_out**-0.5),
        "bias": rnd(n_out) if bias else None, "dy": rnd(*lead, n_out),
    }


def run(fn, t, scale=2.0, upcast=False, dy=None, **kwargs):
    """y and (dX, dA, dB) of ``fn``; ``upcast`` runs it in fp32 on the same rounded values."""
    conv = (lambda v: v.float()) if upcast else (lambda v: v)
    x, a, b = (conv(t[k]).detach().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    bias = None if t["bias"] is None else conv(t["bias"])
    y = fn(x, conv(t["weight"]), a, b, scale, bias=bias, **kwargs)
    y.backward(conv(t["dy"] if dy is None else dy))
    return y, x.grad, a.grad, b.grad


def assert_matches_reference(t, dtype, weight_ref=None, **kwargs):
    with force_triton():
        got = run(lora_linear, t, **kwargs)
    ref_inputs = t if weight_ref is None else {**t, "weight": weight_ref}
    want = run(lora_linear_ref, ref_inputs, upcast=True, **kwargs)
    for name, g, w in zip(("y", "dX", "dA", "dB"), got, want):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("rank", [1, 8, 16, 64, 80])  # 80: the low-rank dot loops over two rank tiles
def test_ranks_fp32(rank, device):
    # 40 tokens: under the interpreter the dA/dB token reductions run as three partial sums
    assert_matches_reference(make_inputs((40,), 64, 48, rank, torch.float32, device), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
def test_dtypes_and_shapes(lead, n_in, n_out, dtype, device):
    t = make_inputs(lead, n_in, n_out, 16, dtype, device, bias=(n_out != 48))
    assert_matches_reference(t, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_with_same_seed(dtype, device):
    t = make_inputs((5,), 123, 77, 8, dtype, device)
    assert_matches_reference(t, dtype, dropout_p=0.25, training=True, seed=1234)


def test_dropout_changes_output_only_in_training(device):
    t = make_inputs((16,), 64, 48, 8, torch.float32, device)
    with force_triton():
        plain = run(lora_linear, t)[0]
        eval_mode = run(lora_linear, t, dropout_p=0.5, training=False)[0]
        dropped = run(lora_linear, t, dropout_p=0.5, training=True, seed=7)[0]
        again = run(lora_linear, t, dropout_p=0.5, training=True, seed=7)[0]
    assert torch.equal(plain, eval_mode), "dropout must be off when training=False"
    assert not torch.allclose(plain, dropped), "dropout with p=0.5 left the output unchanged"
    assert torch.equal(dropped, again), "the same seed must give the same mask"


def test_mask_and_compile_cases_stay_importable_from_kernels_lora():
    """The mask (its statistics: test_lowrank.py) and the compile cases moved to kernels.lowrank;
    scripts import them from here."""
    import kernels.lora
    import kernels.lowrank

    assert dropout_keep_mask is kernels.lowrank.dropout_keep_mask
    assert kernels.lora.compile_cases is kernels.lowrank.compile_cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_weight(dtype, device):
    t = make_inputs((16,), 64, 48, 16, dtype, device)
    q = quantize_nf4(t["weight"].float().cpu(), blocksize=64).to(device)
    with use_reference():
        w_dense = dequantize_nf4(q, dtype)  # the rounded weights the op multiplies by
    assert_matches_reference({**t, "weight": q}, dtype, weight_ref=w_dense)


def test_strided_inputs(device):
    """Transposed / sliced views of x, W, A, B and a non-contiguous dY run without a copy."""
    n, n_in, n_out, rank = 9, 40, 24, 8
    t = make_inputs((n,), n_in, n_out, rank, torch.float32, device)
    strided = {
        "x": t["x"].t().contiguous().t(), "weight": t["weight"].t().contiguous().t(),
        "lora_A": torch.stack([t["lora_A"], -t["lora_A"]], dim=2)[:, :, 0],
        "lora_B": t["lora_B"].t().contiguous().t(), "bias": t["bias"], "dy": t["dy"].t().contiguous().t(),
    }
    assert not any(v.is_contiguous() for k, v in strided.items() if k != "bias")
    assert_matches_reference(strided, torch.float32)


def test_fp32_adapter_with_bf16_base(device):
    """LoRA weights kept in fp32 with a bf16 base: computed in bf16, gradients returned in fp32."""
    t = make_inputs((16,), 64, 48, 8, torch.bfloat16, device)
    t32 = {**t, "lora_A": t["lora_A"].float(), "lora_B": t["lora_B"].float()}
    with force_triton():
        _, dx, da, db = run(lora_linear, t32)
    _, dx_ref, da_ref, db_ref = run(lora_linear_ref, t32, upcast=True)
    assert da.dtype == db.dtype == torch.float32 and dx.dtype == torch.bfloat16
    for name, g, w in (("dX", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
        assert_close(g, w, torch.bfloat16, name)


def test_saves_only_what_backward_needs(device):
    t = make_inputs((16,), 64, 48, 8, torch.float32, device)
    x = t["x"].requires_grad_()
    with force_triton():
        y = lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], 2.0, dropout_p=0.1, training=True)
    saved = [s for s in y.grad_fn.next_functions[0][0].saved_tensors if s is not None]  # through the view
    shapes = sorted(tuple(s.shape) for s in saved)
    assert shapes == sorted([(16, 64), (16, 8), (8, 64), (48, 8), (48, 64)]), shapes
    big = [s for s in saved if s.shape == (16, 64)]
    assert big[0].data_ptr() == x.data_ptr(), "x must be saved as is, not a dropped copy or a mask"


def test_auto_mode_on_cpu_runs_the_reference():
    t = make_inputs((5,), 123, 77, 8, torch.float32, "cpu")
    with set_kernel_mode("auto"):
        y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.5, bias=t["bias"])
    assert torch.equal(y, lora_linear_ref(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.5, bias=t["bias"]))


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x, w, a, b, bias = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                        for s in ((2, 3, 7), (5, 7), (3, 7), (5, 3), (5,)))

    def f(x, w, a, b, bias):
        return lora_linear_ref(x, w, a, b, 1.5, dropout_p=0.3, training=True, bias=bias, seed=11)

    assert torch.autograd.gradcheck(f, (x, w, a, b, bias))


def _bad(**changes):
    t = make_inputs((4,), 12, 10, 3, torch.float32, "cpu")
    args = {"x": t["x"], "weight": t["weight"], "lora_A": t["lora_A"], "lora_B": t["lora_B"], "scale": 1.0,
            "dropout_p": 0.0, "training": False, "bias": t["bias"]}
    return {**args, **changes}


BAD_INPUTS = [
    (dict(x=torch.ones(4, 12, dtype=torch.int64)), "x must be a floating-point tensor"),
    (dict(weight=torch.randn(10, 12).double()), "weight dtype"),
    (dict(weight=torch.randn(120)), "weight must be a 2-D"),
    (dict(x=torch.randn(4, 13)), "13 input features"),
    (dict(lora_A=torch.randn(0, 12), lora_B=torch.randn(10, 0)), "r=0"),
    (dict(lora_A=torch.randn(3, 11)), r"lora_A is \(3, 11\), expected \(r, in=12\)"),
    (dict(lora_B=torch.randn(10, 4)), r"lora_B is \(10, 4\), expected \(out=10, r=3\)"),
    (dict(lora_B=torch.randn(11, 3)), r"lora_B is \(11, 3\)"),
    (dict(lora_A=torch.randn(3, 12, 1)), "lora_A must be"),
    (dict(bias=torch.randn(11)), "bias must be"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
    (dict(dropout_p=-0.1), "dropout_p must be in"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(weight=torch.randn(10, 12, requires_grad=True)), "weight requires grad"),
]


@pytest.mark.parametrize("changes,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(changes, message):
    with force_triton(), pytest.raises((ValueError, TypeError), match=message):
        lora_linear(**_bad(**changes))
