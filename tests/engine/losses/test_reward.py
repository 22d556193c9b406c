"""The reward model's loss and pooling: Bradley–Terry against a hand-written reference (values and
gradients, margins included), and the last-token scores of a batch of pairs, the same in padded,
padding-free and packed layouts and the same as each sequence scored alone."""

from __future__ import annotations

import math

import pytest
import torch

from engine.adapters import adapter_params, set_trainable
from engine.adapters.score_head import attach_score_head, new_score_head
from engine.data.pair_batching import PairBatchLoader
from engine.data.preferences import PreferencePair
from engine.losses.reward import bradley_terry_losses, last_token_index, reward_metrics, sequence_rewards
from tests.lora_models import loaded_lora_model
from tests.tolerances import assert_close

# ---------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_and_gradients_equal_the_formula(with_margin):
    """ℓ = −log σ(r_c − r_r − m) = log(1 + exp(−(r_c − r_r − m))), ∂ℓ/∂r_c = −1 / (1 + exp(r_c − r_r − m))
    = −∂ℓ/∂r_r, written out in float64 per pair (TRL's RewardTrainer formula)."""
    gen = torch.Generator().manual_seed(0)
    chosen = (3 * torch.randn(7, generator=gen)).requires_grad_(True)
    rejected = (3 * torch.randn(7, generator=gen)).requires_grad_(True)
    margin = torch.tensor([0.0, 1.5, -0.5, 2.0, 0.0, 30.0, -30.0]) if with_margin else None
    losses = bradley_terry_losses(chosen, rejected, margin)
    m = margin.tolist() if with_margin else [0.0] * 7
    d = [c - r - mi for c, r, mi in zip(chosen.tolist(), rejected.tolist(), m)]
    expected = torch.tensor([math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x)) for x in d],
                            dtype=torch.float64)
    assert losses.dtype == torch.float32 and losses.shape == (7,)
    assert_close(losses, expected, torch.float32, "Bradley–Terry losses")
    upstream = torch.linspace(0.5, 2.0, 7)
    (losses * upstream).sum().backward()
    d_chosen = torch.tensor([-u / (1 + math.exp(x)) for u, x in zip(upstream.tolist(), d)], dtype=torch.float64)
    assert_close(chosen.grad, d_chosen, torch.float32, "dℓ/dr_c")
    assert_close(rejected.grad, -d_chosen, torch.float32, "dℓ/dr_r")


def test_margin_shifts_the_loss_and_metrics_are_per_pair():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    plain = bradley_terry_losses(chosen, rejected)
    assert_close(plain, torch.tensor([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(1))]),
                 torch.float32, "losses without margin")
    # a margin m asks chosen to win by m: the loss of (r_c, r_r, m) is that of (r_c - m, r_r)
    assert_close(bradley_terry_losses(chosen, rejected, torch.tensor([1.0, 0.0, -1.0])),
                 bradley_terry_losses(chosen - torch.tensor([1.0, 0.0, -1.0]), rejected), torch.float32, "shifted")
    metrics = reward_metrics(chosen, rejected)
    assert metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert metrics["margin"].tolist() == [1.0, 0.0, -1.0]


# ---------------------------------------------------------------------------- pooling


def pairs_of_odd_lengths() -> list[PreferencePair]:
    """Four pairs with prompts and completions of different lengths (token ids below the tiny
    vocabulary; the last token of every completion is the EOS, 2)."""
    gen = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 500, (n,), generator=gen).tolist()

    shapes = [(5, 3, 7), (9, 6, 2), (3, 11, 4), (7, 1, 8)]
    return [PreferencePair([1] + ids(p), ids(c) + [2], ids(r) + [2], f"f:{i}") for i, (p, c, r) in enumerate(shapes)]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    """The tiny model with LoRA (B random: the adapter matters) and a score head."""
    model = loaded_lora_model(tiny_model_dir, std=0.2)
    attach_score_head(model, new_score_head(model.config.hidden_size, seed=1, std=0.5))
    set_trainable(model)
    return model


def test_last_token_index_points_at_each_documents_last_token():
    pairs = pairs_of_odd_lengths()
    lengths = [len(p.prompt) + len(p.chosen) for p in pairs] + [len(p.prompt) + len(p.rejected) for p in pairs]
    for batching in ("padded", "padding-free", "pack"):
        batch = PairBatchLoader(pairs, 4, pad_id=0, shuffle=False, batching=batching, max_len=24).collate([0, 1, 2, 3])
        last = last_token_index(batch)
        flat_ids = batch.input_ids.reshape(-1)
        assert last.shape == (8,) and (flat_ids[last] == 2).all(), batching  # every document ends with EOS
        docs = batch.documents().reshape(-1)
        assert (docs[last] == torch.arange(8)).all(), batching
        assert torch.bincount(docs[docs >= 0], minlength=8).tolist() == lengths, batching
        if batching == "padded":
            T = batch.input_ids.shape[1]
            assert last.tolist() == [row * T + n - 1 for row, n in enumerate(lengths)]


def test_scores_are_the_same_in_every_layout_and_equal_each_sequence_scored_alone(reward_model):
    """Scores of the 2B documents (chosen half first) and the gradients of LoRA and of the head:
    padded rows, one padding-free row and rows packed to 24 tokens give the same values (fp32),
    and the scores equal each sequence's forward alone at its last position."""
    model = reward_model
    pairs = pairs_of_odd_lengths()

    def scored(batching: str) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        batch = PairBatchLoader(pairs, 4, pad_id=0, shuffle=False, batching=batching, max_len=24).collate([0, 1, 2, 3])
        if batching == "pack":
            assert batch.input_ids.shape[0] > 1  # several packed rows
        scores = sequence_rewards(model, batch, last_token_index(batch))
        chosen, rejected = scores.chunk(2)
        bradley_terry_losses(chosen, rejected).sum().backward()
        return {"scores": scores.detach(), **{n: p.grad.clone() for n, p in adapter_params(model).items()}}

    padded = scored("padded")
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    with torch.no_grad():  # one unpadded row each: its last position is its last token
        alone = torch.stack([model.score(model.hidden_states(torch.tensor([seq]))[0, -1]) for seq in sequences])
    assert padded["scores"].std() > 0.05  # scores that differ, so the comparison means something
    assert padded["score.weight"].abs().sum() > 0
    assert_close(padded["scores"], alone, torch.float32, "padded scores vs each sequence alone")
    for batching in ("padding-free", "pack"):
        other = scored(batching)
        for name in padded:
            assert_close(other[name], padded[name], torch.float32, name=f"{batching} {name}")
