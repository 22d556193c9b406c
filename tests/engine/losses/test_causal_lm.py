"""Per-token KL to the reference over completions: exact over the vocabulary, chunked."""

import torch
import torch.nn.functional as F

from engine.data.batching import collate_padded
from engine.data.samples import Sample
from engine.losses.causal_lm import completion_kl, hidden_logps
from tests.tolerances import assert_close


def batch_of(samples):
    from engine.data.batching import Batch

    return Batch(**collate_padded(samples, pad_id=0), sample_ids=[[i] for i in range(len(samples))], epoch=0, index=0)


def test_completion_kl_equals_the_divergence_of_full_softmaxes():
    gen = torch.Generator().manual_seed(0)
    samples = [Sample([1, 4, 5, 6, 7], [-100, -100, 5, 6, 7], "a"), Sample([1, 2, 3], [-100, 2, 3], "b")]
    batch = batch_of(samples)
    V, H = 23, 8
    weight = torch.randn(V, H, generator=gen)
    policy, ref = torch.randn(2, 5, H, generator=gen), torch.randn(2, 5, H, generator=gen)
    total, count = completion_kl(policy, ref, weight, batch, chunk_tokens=2)  # several chunks
    keep = batch.labels[:, 1:] != -100
    lp = F.log_softmax(policy[:, :-1][keep] @ weight.t(), -1)
    lr = F.log_softmax(ref[:, :-1][keep] @ weight.t(), -1)
    expected = F.kl_div(lr, lp, log_target=True, reduction="sum")  # KL(π ‖ π_ref)
    assert count == int(keep.sum()) == 5
    assert_close(torch.tensor(total), expected.double(), torch.float32, "KL sum")
    assert completion_kl(policy, policy, weight, batch)[0] == 0.0
    logps, lengths = hidden_logps(policy, weight, batch)
    assert lengths.tolist() == [3, 2] and (logps < 0).all()


def test_per_document_logps_of_a_packed_row_equal_the_padded_rows_sums_with_gradients():
    """hidden_logps on one padding-free row (index_add per document) = on padded rows (one sum per
    row), values and the gradient reaching the hidden states, when each token has the same hidden state."""
    from engine.data.batching import Batch, collate_padding_free

    gen = torch.Generator().manual_seed(1)
    samples = [Sample([1, 4, 5, 6, 7], [-100, -100, 5, 6, 7], "a"), Sample([1, 2, 3], [-100, 2, 3], "b"),
               Sample([1, 9, 8, 7, 6, 5], [-100, -100, -100, 7, 6, 5], "c")]
    padded = batch_of(samples)
    free = Batch(**collate_padding_free(samples, pad_id=0), sample_ids=[[0, 1, 2]], epoch=0, index=0)
    V, H = 23, 8
    weight = torch.randn(V, H, generator=gen)
    rows = torch.randn(3, 6, H, generator=gen)
    row_hidden = rows.clone().requires_grad_(True)
    # the padding-free row holds each sample's positions, back to back: (1, 5 + 3 + 6, H)
    flat_hidden = torch.cat([rows[i, :len(s.input_ids)] for i, s in enumerate(samples)])[None].requires_grad_(True)
    (want, want_n), (got, got_n) = hidden_logps(row_hidden, weight, padded), hidden_logps(flat_hidden, weight, free)
    assert got_n.tolist() == want_n.tolist() == [3, 2, 3]
    assert_close(got, want, torch.float32, "per-document logps")
    upstream = torch.tensor([0.3, -1.0, 2.0])
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    expected = torch.cat([row_hidden.grad[i, :len(s.input_ids)] for i, s in enumerate(samples)])[None]
    assert expected.abs().sum() > 0
    assert_close(flat_hidden.grad, expected, torch.float32, "d logps / d hidden")
