"""Document attention with a key/value prefix (prefix tuning, `models.attention`) against a dense
fp64 definition built here: every document sees the P prefix keys (prefix key p at position p,
document token i at P + i, so a window W keeps prefix key p iff P + i - p < W) and its own causal
keys. Outputs and the gradients of q, k, v and of the prefix keys and values; GQA and MHA, one
prefix for the batch or one per row, windows shorter and longer than the documents, band chunks
smaller than the window; the FlexAttention path's mask_mod on the index grid and its eager
forward on CPU. The model level (packed rows, padding, the KV cache, PEFT's logits) is in
tests/engine/adapters/test_prefix.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from models.attention import (
    DocumentLayout,
    block_mask_for,
    document_attention,
    document_attention_flex,
    document_attention_sdpa,
    document_mask_mod,
)
from tests.tolerances import assert_close, tol

ROW_DOCS = [1, 17, 1, 30, 8]  # row 0: five documents (two of length 1); row 1: 40 real + 17 padding
T = sum(ROW_DOCS)
P = 3


def layout() -> DocumentLayout:
    seg = torch.stack([torch.repeat_interleave(torch.arange(5), torch.tensor(ROW_DOCS)),
                       torch.tensor([0] * 40 + [1] * 17)])  # (2, T)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 40:] = 0
    return DocumentLayout.from_batch(mask, seg)


def dense_prefix_mask(doc_ids: torch.Tensor, prefix_len: int, window: int | None) -> torch.Tensor:
    """(B, T, P + T) True = may attend, from the definition (module docstring), index by index."""
    B, T = doc_ids.shape
    allowed = torch.zeros(B, T, prefix_len + T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            start = next(s for s in range(i + 1) if doc_ids[b, s] == doc_ids[b, i])  # own document start
            at = prefix_len + i - start  # the query's position in [prefix; document]
            for p in range(prefix_len):
                allowed[b, i, p] = window is None or at - p < window
            for j in range(start, i + 1):
                allowed[b, i, prefix_len + j] = window is None or i - j < window
    return allowed


def prefix_attention_ref(q, k, v, pk, pv, doc_ids, window):
    """softmax(q [pk; k]ᵀ / sqrt(hd) + log mask) [pv; v] in fp64 with the dense mask."""
    B = q.shape[0]
    mask = dense_prefix_mask(doc_ids, pk.shape[2], window)[:, None]  # (B, 1, T, P + T)
    keys = torch.cat((pk.double().expand(B, -1, -1, -1), k.double()), dim=2)
    values = torch.cat((pv.double().expand(B, -1, -1, -1), v.double()), dim=2)
    return F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


def inputs(nh, nkv, prefix_rows, dtype, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda b, h, n: torch.randn(b, h, n, hd, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = make(2, nh, T), make(2, nkv, T), make(2, nkv, T)
    pk, pv = make(prefix_rows, nkv, P), make(prefix_rows, nkv, P)
    return q, k, v, pk, pv, torch.randn(2, nh, T, hd, generator=g).to(dtype)


def test_reference_mask_is_the_definition():
    """Spot checks of the dense mask: a length-1 document sees the prefix and itself only."""
    lay = layout()
    m = dense_prefix_mask(lay.doc_ids, P, None)
    assert m[0, 0].tolist() == [True] * P + [True] + [False] * (T - 1)
    assert m[0, 18].tolist() == [True] * P + [False] * 18 + [True] + [False] * (T - 19)  # doc 3 (length 1)
    w = dense_prefix_mask(lay.doc_ids, P, 4)
    assert w[0, 1, :P].tolist() == [True, True, True]  # doc 2's first token, at P + 0 = 3: 3 - p < 4
    assert w[0, 2, :P].tolist() == [False, True, True]  # its second, at 4: prefix key 0 is 4 back
    assert not w[0, 5, :P].any()  # 4 tokens into its document: the prefix is out of the window


HEADS = {"gqa": (6, 2), "mha": (4, 4)}
WINDOWS = {"no-window": None, "window-4": 4, "window-11": 11, "window-100": 100}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("prefix_rows", [1, 2], ids=["shared-prefix", "prefix-per-row"])
@pytest.mark.parametrize("chunk", [None, 8], ids=["chunk-default", "chunk-8"])
def test_prefix_attention_equals_dense_reference(heads, window, dtype, prefix_rows, chunk):
    lay = layout()
    q, k, v, pk, pv, dy = inputs(*heads, prefix_rows, dtype)
    kwargs = {} if chunk is None else {"window_chunk": chunk}
    if chunk is None:
        y = document_attention(q, k, v, lay, window, prefix=(pk, pv))
    else:
        y = document_attention_sdpa(q, k, v, lay, window, prefix=(pk, pv), **kwargs)
    got = torch.autograd.grad(y, (q, k, v, pk, pv), dy)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    want_y = prefix_attention_ref(*ref_in, lay.doc_ids, window)
    want = torch.autograd.grad(want_y, ref_in, dy.double())
    assert y.dtype == dtype
    assert_close(y, want_y, dtype, name="y")
    # A prefix's gradient is a sum over the documents that share it, each document's part out of its
    # own SDPA backward, rounded to the dtype once: n rounded parts, so n times the table's atol.
    # dk, dv in bf16: twice the atol (the masked band SDPA backward of a window over [prefix; document]
    # measured 1.6e-2 where the table allows 1.4e-2, on 1 element of 3648).
    shared_by = len(ROW_DOCS) + 2 if prefix_rows == 1 else len(ROW_DOCS)
    scales = {"dpk": shared_by, "dpv": shared_by, "dk": 2, "dv": 2} if dtype != torch.float32 else {}
    for name, g, w in zip(("dq", "dk", "dv", "dpk", "dpv"), got, want):
        assert g.dtype == dtype
        scale = scales.get(name, 1)
        assert_close(g, w, dtype, name=name, atol=tol(dtype).atol * scale)


def test_prefix_changes_every_document_and_none_is_plain():
    """The prefix matters (every query's output moves), and prefix=None is the plain op."""
    lay = layout()
    q, k, v, pk, pv, _ = inputs(6, 2, 1, torch.float32)
    with torch.no_grad():
        plain = document_attention(q, k, v, lay)
        with_prefix = document_attention(q, k, v, lay, prefix=(pk * 3, pv * 3))
        assert torch.equal(document_attention(q, k, v, lay, prefix=None), plain)
    moved = (with_prefix - plain).abs().amax(dim=(1, 3))  # (B, T)
    assert bool((moved > 1e-3).all())


@pytest.mark.parametrize("window", [None, 4], ids=["no-window", "window-4"])
def test_flex_prefix_mask_mod_and_forward_on_cpu(window):
    """The CUDA path's pieces that run on a CPU: the mask_mod over [prefix; row] on the index grid
    equals the dense definition; the eager flex forward equals the reference."""
    from torch.nn.attention.flex_attention import create_mask

    lay = layout()
    grid = create_mask(document_mask_mod(lay.doc_ids, lay.positions(), P, window), 2, 1, T, P + T,
                       device="cpu")[:, 0]
    assert torch.equal(grid, dense_prefix_mask(lay.doc_ids, P, window))
    q, k, v, pk, pv, _ = (t.detach() for t in inputs(6, 2, 1, torch.float32))
    with warnings.catch_warnings():  # eager flex warns (once) that it is not the fused kernel
        warnings.simplefilter("ignore", UserWarning)
        y = document_attention_flex(q, k, v, lay, window, compiled=False, prefix=(pk, pv))
    assert_close(y, prefix_attention_ref(q, k, v, pk, pv, lay.doc_ids, window), torch.float32, name="flex y")
    assert block_mask_for(lay, window, False, P) is block_mask_for(lay, window, False, P)
    assert block_mask_for(lay, window, False, P) is not block_mask_for(lay, window, False)
