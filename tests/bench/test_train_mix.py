"""bench.train_mix: the padded and padding-free layouts hold the same samples and give the same loss."""

import torch

from bench.train_mix import padded_batch, padding_free_batch, round_samples
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.losses.causal_lm import count_loss_tokens, loss_sum
from models import load_model
from tests.tolerances import assert_close

SAMPLES = [Sample([1, 5, 6, 7], [IGNORE, IGNORE, 6, 7], "a:1"), Sample([1, 8, 9], [IGNORE, 8, 9], "a:2"),
           Sample([1, 10, 11, 12, 13], [IGNORE, IGNORE, IGNORE, 12, 13], "a:3")]


def test_padding_free_row_restarts_positions_and_numbers_segments():
    batch = padding_free_batch(SAMPLES)
    assert batch.input_ids.shape == (1, 12)
    assert batch.input_ids[0].tolist() == [1, 5, 6, 7, 1, 8, 9, 1, 10, 11, 12, 13]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert batch.segment_ids[0].tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert batch.attention_mask.all()
    assert count_loss_tokens(batch) == count_loss_tokens(padded_batch(SAMPLES, pad_id=0)) == 6


def test_padded_batch_pads_to_the_longest():
    batch = padded_batch(SAMPLES, pad_id=0)
    assert batch.input_ids.shape == (3, 5)
    assert batch.attention_mask.sum().item() == 12
    assert (batch.labels[batch.attention_mask == 0] == IGNORE).all()


def test_round_samples_cycle_a_seeded_permutation():
    rounds = round_samples(SAMPLES, per_step=2, rounds=3, seed=0)
    assert [len(r) for r in rounds] == [2, 2, 2]
    flat = [s.source for r in rounds for s in r]
    assert sorted(flat[:3]) == ["a:1", "a:2", "a:3"] and flat[3:] == flat[:3]
    assert round_samples(SAMPLES, 2, 3, seed=0) == rounds


def test_both_layouts_give_the_same_loss(tiny_model_dir):
    """The same tokens are predicted in both layouts: Σ token losses agree (fp32, same model)."""
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        padded = loss_sum(model, padded_batch(SAMPLES, pad_id=2))
        free = loss_sum(model, padding_free_batch(SAMPLES))
    assert_close(free, padded, torch.float32, name="loss_sum")
