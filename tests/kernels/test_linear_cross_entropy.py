"""kernels.linear_cross_entropy against F.cross_entropy(h @ Wᵀ, y) and hand-written formulas, in fp32.

Every test runs both implementations: the Triton path (forced, so on a CPU it runs in the
interpreter) and the plain-torch reference. Token counts are small because the interpreter is
slow; vocabularies are real (32,000 Llama-2, 49,152 SmolLM2, 128,256 Llama-3). The chunk size is
shrunk to 4 tokens and the dW slice to a third of the vocabulary so the multi-chunk code runs.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels.linear_cross_entropy as lce
from kernels.backend import set_kernel_mode
from kernels.linear_cross_entropy import linear_cross_entropy, linear_logprobs, sequence_logprobs
from tests.tolerances import assert_close

REAL_CHUNK_ROWS = lce._chunk_rows  # before the autouse fixture below shrinks it
IMPLS = ("triton", "reference")
REDUCTIONS = ("mean", "sum", "none")
CASES = [  # (N, H, V, dtype)
    (5, 77, 1000, torch.float32),  # odd, non-power-of-two everything
    (9, 33, 13, torch.float32),  # tiny vocabulary: every softmax entry is large, so dW is sharp
    (17, 64, 32_000, torch.bfloat16),
    (11, 16, 49_152, torch.float16),
    (7, 32, 128_256, torch.float32),
    (3, 16, 128_256, torch.bfloat16),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """4-token chunks and dW slices of about a third of the vocabulary, whatever V the test uses."""
    real_chunk_rows = lce._chunk_rows
    monkeypatch.setattr(lce, "_chunk_rows", lambda n, v, **kw: min(4, real_chunk_rows(n, v, **kw)))
    monkeypatch.setattr(lce, "DW_SLICE_ROWS", 4_999)


def make_inputs(n, h, v, dtype, device, seed=0, ignore=(0, 3)):
    """hidden ~ N(0, 1), weight ~ N(0, 4/H) so logits ~ N(0, 4); labels with ``ignore`` positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[i for i in ignore if i < n]] = -100
    return hidden, weight, labels.to(device)


def fp32_leaves(*tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


def upstream(reduction, labels):
    """An upstream gradient that keeps gradients at magnitude ~1: n_valid for a mean (undoing the
    1/n), 1 for a sum, N(0, 1) per token for ``none``."""
    if reduction == "none":
        return torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)).to(labels.device)
    if reduction == "mean":
        return (labels != -100).sum().clamp(min=1).float()
    return torch.ones((), device=labels.device)


def run(impl, fn, *args, **kwargs):
    with set_kernel_mode("triton" if impl == "triton" else "reference"):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,h,v,dtype", CASES)
def test_matches_cross_entropy(impl, reduction, n, h, v, dtype, device):
    hidden, weight, labels = make_inputs(n, h, v, dtype, device)
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == (() if reduction != "none" else (n,))
    hf, wf = fp32_leaves(hidden, weight)
    expected = F.cross_entropy(hf @ wf.T, labels, ignore_index=-100, reduction=reduction)
    assert_close(loss, expected, dtype, "loss")
    grad = upstream(reduction, labels)
    loss.backward(grad)
    expected.backward(grad)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert_close(hidden.grad, hf.grad, dtype, "dhidden")
    assert_close(weight.grad, wf.grad, dtype, "dweight")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_batch_is_zero_not_nan(impl, reduction, device):
    hidden, weight, labels = make_inputs(6, 24, 500, torch.float32, device)
    labels = torch.full_like(labels, -7)
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, ignore_index=-7, reduction=reduction,
               z_loss=1e-2, label_smoothing=0.1)
    assert_close(loss, torch.zeros_like(loss), torch.float32, "loss")
    loss.backward(torch.ones_like(loss))
    assert_close(hidden.grad, torch.zeros_like(hidden), torch.float32, "dhidden")
    assert_close(weight.grad, torch.zeros_like(weight), torch.float32, "dweight")


def hand_written_loss(hidden, weight, labels, reduction, eps, lam):
    """ℓ_i = lse − (1 − ε) z_y − ε mean_j z_j + λ lse², 0 at ignored rows; mean over valid rows."""
    z = hidden @ weight.T
    lse = z.logsumexp(-1)
    valid = labels != -100
    z_target = z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    per_token = torch.where(valid, lse - (1 - eps) * z_target - eps * z.mean(-1) + lam * lse**2, 0.0)
    if reduction == "none":
        return per_token
    return per_token.sum() / (valid.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,h,v,dtype", [(9, 33, 13, torch.float32), (9, 33, 1000, torch.float32),
                                         (5, 16, 32_000, torch.bfloat16)])
def test_label_smoothing_and_z_loss(impl, reduction, n, h, v, dtype, device):
    eps, lam = 0.1, 0.05
    hidden, weight, labels = make_inputs(n, h, v, dtype, device, seed=2)
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, reduction=reduction, z_loss=lam,
               label_smoothing=eps)
    hf, wf = fp32_leaves(hidden, weight)
    expected = hand_written_loss(hf, wf, labels, reduction, eps, lam)
    assert_close(loss, expected, dtype, "loss")
    with torch.no_grad():  # the hand formula's smoothing part is F.cross_entropy's own
        smoothed = F.cross_entropy(hf @ wf.T, labels, reduction=reduction, label_smoothing=eps)
        assert_close(hand_written_loss(hf, wf, labels, reduction, eps, 0.0), smoothed, torch.float32, "smoothing")
    grad = upstream(reduction, labels)
    loss.backward(grad)
    expected.backward(grad)
    assert_close(hidden.grad, hf.grad, dtype, "dhidden")
    assert_close(weight.grad, wf.grad, dtype, "dweight")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs(impl, dtype, device):
    hidden, weight, labels = make_inputs(13, 40, 49_152, dtype, device, seed=3)
    logp = run(impl, linear_logprobs, hidden, weight, labels)
    hf, wf = fp32_leaves(hidden, weight)
    gathered = (hf @ wf.T).log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    expected = torch.where(labels != -100, gathered, 0.0)
    assert_close(logp, expected, dtype, "logprobs")
    grad = upstream("none", labels)
    logp.backward(grad)
    expected.backward(grad)
    assert_close(hidden.grad, hf.grad, dtype, "dhidden")
    assert_close(weight.grad, wf.grad, dtype, "dweight")


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs(impl, device):
    b, t, h, v = 2, 6, 24, 32_000
    hidden, weight, labels = make_inputs(b * t, h, v, torch.float32, device, seed=4, ignore=(0, 1, 7))
    hidden3 = hidden.detach().view(b, t, h).requires_grad_()
    seq = run(impl, sequence_logprobs, hidden3, weight, labels.view(b, t))
    hf, wf = fp32_leaves(hidden3, weight)
    logp = (hf @ wf.T).log_softmax(-1).gather(-1, labels.view(b, t).clamp(min=0)[..., None])[..., 0]
    expected = torch.where(labels.view(b, t) != -100, logp, 0.0).sum(1)
    assert seq.shape == (b,)
    assert_close(seq, expected, torch.float32, "sequence logprobs")
    grad = torch.tensor([1.0, -0.5], device=device)  # as in DPO: chosen minus rejected
    seq.backward(grad)
    expected.backward(grad)
    assert_close(hidden3.grad, hf.grad, torch.float32, "dhidden")
    assert_close(weight.grad, wf.grad, torch.float32, "dweight")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias(impl, reduction, device):
    hidden, weight, labels = make_inputs(6, 20, 300, torch.float32, device, seed=5)
    bias = torch.randn(300, generator=torch.Generator().manual_seed(6)).to(device).requires_grad_()
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, reduction=reduction, bias=bias)
    hf, wf, bf = fp32_leaves(hidden, weight, bias)
    expected = F.cross_entropy(F.linear(hf, wf, bf), labels, reduction=reduction)
    assert_close(loss, expected, torch.float32, "loss")
    grad = upstream(reduction, labels)
    loss.backward(grad)
    expected.backward(grad)
    for ours, ref, name in ((hidden, hf, "dhidden"), (weight, wf, "dweight"), (bias, bf, "dbias")):
        assert_close(ours.grad, ref.grad, torch.float32, name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_and_frozen_hidden(impl, reduction, device):
    hidden, weight, labels = make_inputs(7, 24, 700, torch.float32, device, seed=7)
    hf, wf = fp32_leaves(hidden, weight)
    expected = F.cross_entropy(hf @ wf.T, labels, reduction=reduction)
    grad = upstream(reduction, labels)
    expected.backward(grad)
    frozen_w = weight.detach()
    run(impl, linear_cross_entropy, hidden, frozen_w, labels, reduction=reduction).backward(grad)
    assert frozen_w.grad is None
    assert_close(hidden.grad, hf.grad, torch.float32, "dhidden")
    frozen_h = hidden.detach()
    run(impl, linear_cross_entropy, frozen_h, weight, labels, reduction=reduction).backward(grad)
    assert frozen_h.grad is None
    assert_close(weight.grad, wf.grad, torch.float32, "dweight")


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_gives_the_same_loss_and_no_graph(impl, device):
    hidden, weight, labels = make_inputs(5, 16, 900, torch.float32, device, seed=8)
    with torch.no_grad():
        loss = run(impl, linear_cross_entropy, hidden, weight, labels, label_smoothing=0.2)
    assert not loss.requires_grad
    expected = F.cross_entropy(hidden.detach() @ weight.detach().T, labels, label_smoothing=0.2)
    assert_close(loss, expected, torch.float32, "loss")


def test_triton_path_never_holds_more_than_a_chunk_of_logits(monkeypatch, device):
    """Every logits tensor the Triton path makes is one (≤ 4, V) chunk, never (N, V)."""
    shapes = []
    real_launch = lce._launch_rows
    monkeypatch.setattr(lce, "_launch_rows", lambda logits, *a: (shapes.append(tuple(logits.shape)),
                                                                  real_launch(logits, *a)))
    hidden, weight, labels = make_inputs(11, 16, 32_000, torch.bfloat16, device, seed=9)
    run("triton", linear_cross_entropy, hidden, weight, labels).backward()
    assert shapes == [(4, 32_000), (4, 32_000), (3, 32_000)]


def test_chunk_rows_at_real_sizes():
    assert REAL_CHUNK_ROWS(16_384, 128_256) == 1024  # 0.26 GB of bf16 logits per chunk
    assert REAL_CHUNK_ROWS(16_384, 128_256, accumulate_dw=True) == 4096
    assert REAL_CHUNK_ROWS(5, 1000) == 5
    assert REAL_CHUNK_ROWS(100, 1 << 28) == 1


def _bad(**changes):
    hidden, weight, labels = make_inputs(4, 8, 50, torch.float32, "cpu")
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update(changes)
    return args


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args,error,match", [
    (_bad(weight=torch.randn(50, 9)), ValueError, "disagree on H"),
    (_bad(hidden=torch.randn(2, 4, 8)), ValueError, "hidden must be a 2-D"),
    (_bad(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels shape"),
    (_bad(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be an int64"),
    (_bad(labels=torch.tensor([0, 50, 1, 2])), ValueError, r"labels\[1\] = 50 is outside \[0, V=50\)"),
    (_bad(labels=torch.tensor([0, 1, -3, 2])), ValueError, r"labels\[2\] = -3"),
    (_bad(weight=torch.randn(50, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (_bad(weight=torch.randn(50, 8).bfloat16()), TypeError, "weight dtype torch.bfloat16 != hidden"),
    (_bad(reduction="avg"), ValueError, "reduction 'avg'"),
    (_bad(bias=torch.randn(49)), ValueError, "bias must be"),
    (_bad(label_smoothing=1.5), ValueError, "label_smoothing"),
])
def test_bad_inputs_name_the_argument(impl, args, error, match):
    with pytest.raises(error, match=match):
        run(impl, linear_cross_entropy, **args)


def test_sequence_logprobs_shape_errors():
    hidden, weight, labels = make_inputs(6, 8, 50, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sequence_logprobs"):
        sequence_logprobs(hidden, weight, labels)
    with pytest.raises(ValueError, match="sequence_logprobs"):
        sequence_logprobs(hidden.view(2, 3, 8), weight, labels.view(3, 2))
