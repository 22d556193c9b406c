"""`engine.merge_drift`: the KL and top-1 sums against `kernels.linear_kl`'s reference (one head) and
against the definition on materialised fp64 logits (two heads), over odd chunk sizes."""

import pytest
import torch

from engine.merge_drift import kl_and_agreement
from kernels.linear_kl import linear_kl_ref
from tests.tolerances import tol


def rows(n, h, v, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g), torch.randn(n, h, generator=g),
            torch.randn(v, h, generator=g) * 0.5, torch.randn(v, h, generator=g) * 0.01)


@pytest.mark.parametrize("n,h,v,chunk", [(5, 16, 123, 2), (37, 8, 77, 256), (64, 32, 301, 7)])
def test_equals_linear_kl_reference_with_one_head(n, h, v, chunk):
    h0, h1, w, _ = rows(n, h, v, seed=n)
    kl, agree = kl_and_agreement(h0, w, h1, w, chunk=chunk)
    want = linear_kl_ref(h1, h0, w, reduction="sum").item()  # KL(base = h0 ‖ policy = h1)
    t = tol(torch.float32)
    assert abs(kl - want) <= t.atol * n + t.rtol * abs(want), (kl, want)
    assert agree == int(((h0 @ w.t()).argmax(-1) == (h1 @ w.t()).argmax(-1)).sum())


@pytest.mark.parametrize("chunk", [3, 256])
def test_two_heads_against_fp64_definition(chunk):
    h0, _, w, dw = rows(29, 16, 97, seed=4)
    h = h0 + 0.01 * torch.randn(h0.shape, generator=torch.Generator().manual_seed(5))
    kl, agree = kl_and_agreement(h0, w, h, w + dw, chunk=chunk)
    log_p = torch.log_softmax(h0.double() @ w.double().t(), -1)
    log_q = torch.log_softmax(h.double() @ (w + dw).double().t(), -1)
    want = (log_p.exp() * (log_p - log_q)).sum().item()
    t = tol(torch.float32)
    assert want > 0 and abs(kl - want) <= t.atol * 29 + t.rtol * want, (kl, want)
    assert agree == int((log_p.argmax(-1) == log_q.argmax(-1)).sum())


def test_identical_models_give_zero_and_full_agreement():
    h0, _, w, _ = rows(11, 8, 50, seed=9)
    kl, agree = kl_and_agreement(h0, w, h0.clone(), w.clone(), chunk=4)
    assert kl == 0.0 and agree == 11
