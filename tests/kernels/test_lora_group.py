"""kernels/lora_group.py: the grouped LoRA linear (q/k/v, gate/up sharing x) against its torch
reference, the output and every gradient; each adapted member keeps its own dropout mask.

On a CPU the kernels run in the Triton interpreter (``force_triton``); the reference is computed
in fp32 from the same rounded inputs, with the shared tolerances of the kernel's dtype.
"""

import pytest
import torch

import kernels.fp8_linear
from kernels.backend import force_triton, use_reference
from kernels.fp8 import FP8Tensor, quantize_fp8
from kernels.lora import lora_linear_ref
from kernels.lora_group import GroupMember, lora_linear_group, lora_linear_group_ref
from kernels.nf4 import dequantize_nf4, quantize_nf4
from tests.tolerances import assert_close, tol

N_IN = 64
OUTS = (48, 16, 16)  # q, k, v of a grouped-query layer in miniature: 3 query heads, 1 key/value head


def make_members(outs, rank, dtype, adapted, bias=False, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    members = []
    for i, n_out in enumerate(outs):
        w, b = rnd(n_out, N_IN, std=N_IN**-0.5), rnd(n_out) if bias else None
        if adapted[i]:
            members.append(GroupMember(w, b, rnd(rank, N_IN, std=N_IN**-0.5).float(),
                                       rnd(n_out, rank, std=n_out**-0.5).float(), (scales or [2.0] * len(outs))[i]))
        else:
            members.append(GroupMember(w, b))
    return members, rnd(*(40,), N_IN), rnd(40, sum(outs))


def run(fn, members, x, dy, upcast=False, **kwargs):
    """y, dX and every (dA, dB) of ``fn``; ``upcast``: fp32 on the same rounded values."""
    conv = (lambda v: None if v is None else v.float()) if upcast else (lambda v: v)
    xs = conv(x).detach().requires_grad_()
    leaves, ms = [], []
    for m in members:
        weight = conv(m.weight) if isinstance(m.weight, torch.Tensor) else m.weight
        if m.adapted:
            a, b = m.lora_A.detach().clone().requires_grad_(), m.lora_B.detach().clone().requires_grad_()
            leaves += [a, b]
            ms.append(m._replace(weight=weight, bias=conv(m.bias), lora_A=a, lora_B=b))
        else:
            ms.append(m._replace(weight=weight, bias=conv(m.bias)))
    y = fn(xs, ms, **kwargs)
    y.backward(conv(dy))
    return [y, xs.grad] + [t.grad for t in leaves]


def assert_matches_reference(members, x, dy, dtype, ref_members=None, **kwargs):
    """Every output and gradient against the fp32 reference, within the table. In 16 bits dX is
    rounded once per dense or FP8 member's product (each adds into dX in place) and once more for
    the low-rank term, so its budget is the table's one-rounding budget times that count (autograd's
    sum of per-member gradients, before grouping, rounded as often)."""
    with force_triton():
        got = run(lora_linear_group, members, x, dy, **kwargs)
    want = run(lora_linear_group_ref, ref_members or members, x, dy, upcast=True, **kwargs)
    names = ["y", "dX"] + [f"d{w}[{i}]" for i in range(len(got) // 2 - 1) for w in ("A", "B")]
    per_member = isinstance(members[0].weight, (torch.Tensor, FP8Tensor))
    roundings = (len(members) if per_member else 1) + any(m.adapted for m in members)
    for name, g, w in zip(names, got, want):
        if name == "dX" and dtype != torch.float32:
            assert_close(g, w, dtype, name, atol=roundings * tol(dtype).atol, rtol=roundings * tol(dtype).rtol)
        else:
            assert_close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapted", [(True, True, True), (True, False, True), (False, True, False)])
def test_grouped_equals_each_member_alone(dtype, adapted):
    """All of q/k/v adapted, a subset (q and v, PEFT's classic target), one of three."""
    members, x, dy = make_members(OUTS, 8, dtype, adapted, bias=dtype == torch.float32)
    assert_matches_reference(members, x, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_masks_are_independent_per_member(dtype):
    """With seeds, each adapted member drops x with its own mask, as `lora_linear_ref` with that
    seed (PEFT: one nn.Dropout per module); a group over (q, v) with seeds (s_q, s_v)."""
    members, x, dy = make_members(OUTS, 16, dtype, (True, False, True), scales=[2.0, 0.0, 0.5])
    members = [m._replace(dropout_p=0.25) if m.adapted else m for m in members]
    seeds = torch.tensor([101, 202])
    assert_matches_reference(members, x, dy, dtype, seeds=seeds)
    with force_triton():
        y = lora_linear_group(x, members, seeds=seeds)
    q, v = members[0], members[2]
    alone = lora_linear_ref(x, q.weight, q.lora_A, q.lora_B, q.scale, 0.25, True, seed=101)
    assert_close(y[:, :48], alone, dtype, "q alone")
    shared_mask = lora_linear_ref(x, v.weight, v.lora_A, v.lora_B, v.scale, 0.25, True, seed=101)
    assert not torch.allclose(y[:, 64:].float(), shared_mask.float(), atol=1e-2), "v reused q's dropout mask"


def test_nf4_weights_one_buffer():
    dtype = torch.bfloat16
    members, x, dy = make_members(OUTS, 8, dtype, (True, True, False))
    quantized = [m._replace(weight=quantize_nf4(m.weight.float(), blocksize=64)) for m in members]
    with use_reference():
        dense = [m._replace(weight=dequantize_nf4(q.weight, dtype)) for m, q in zip(members, quantized)]
    assert_matches_reference(quantized, x, dy, dtype, ref_members=dense)


# (the interpreted row quantizer costs about 1.3 s a call: two cases, LoRA on q and v, and none)
@pytest.mark.parametrize("dtype, adapted", [(torch.float32, (True, False, True)),
                                            (torch.bfloat16, (False, False, False))])
def test_fp8_weights_quantize_x_once(dtype, adapted, monkeypatch):
    """FP8 q, k, v (biased in fp32, as Qwen's): one row quantization of x and one product over the
    concatenated codes in the forward, against three; in the backward each member's dY is
    quantized on its own (3 quantizations, as alone). Output and every gradient as the members
    alone compute them."""
    members, x, dy = make_members(OUTS, 8, dtype, adapted, bias=dtype == torch.float32)
    fp8 = [m._replace(weight=quantize_fp8(m.weight.float())) for m in members]
    operands = []

    def counted(a, col_scale=None, _real=kernels.fp8_linear.quantize_rows):
        operands.append(tuple(a.shape))
        return _real(a, col_scale)
    monkeypatch.setattr(kernels.fp8_linear, "quantize_rows", counted)
    with force_triton():
        y = lora_linear_group(x.detach().requires_grad_(), fp8)
        assert operands == [(40, N_IN)]
        y.backward(dy)
    assert operands == [(40, N_IN), *((40, n_out) for n_out in OUTS)]
    assert_matches_reference(fp8, x, dy, dtype)


def test_fp8_beside_another_format_falls_back_to_each_member():
    members, x, dy = make_members(OUTS, 8, torch.float32, (True, False, True))
    mixed = [members[0]._replace(weight=quantize_fp8(members[0].weight)),
             members[1]._replace(weight=quantize_nf4(members[1].weight, blocksize=64)), members[2]]
    assert_matches_reference(mixed, x, dy, torch.float32)


def test_unequal_ranks_fall_back_to_each_member():
    """rank_pattern giving q and v different ranks: not groupable, same result member by member."""
    members, x, dy = make_members(OUTS, 8, torch.float32, (True, False, False))
    other, _, _ = make_members(OUTS, 4, torch.float32, (False, False, True), seed=1)
    mixed = [members[0], members[1], other[2]]
    assert_matches_reference(mixed, x, dy, torch.float32)


def test_leading_dims_and_output_layout():
    members, x, _ = make_members(OUTS, 8, torch.float32, (True, True, True))
    x3 = x.view(4, 10, N_IN)
    with force_triton():
        y = lora_linear_group(x3, members)
    assert y.shape == (4, 10, sum(OUTS))
    with force_triton():
        flat = lora_linear_group(x, members)
    assert_close(y.reshape(40, -1), flat, torch.float32, "y")
