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
