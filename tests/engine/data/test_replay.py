"""Replay (`engine.data.replay`): the exact quota, the order over passes, the round-robin over
micro-batches, the layouts of a mixed batch and their replay labels, and state / restore."""

from __future__ import annotations

import math

import pytest

from engine.data.batching import BatchLoader
from engine.data.render import IGNORE
from engine.data.replay import Mixed, ReplayMix
from engine.data.samples import DataReport, Sample


def samples(lengths: list[int], tag: str, start: int = 3) -> list[Sample]:
    out = []
    for i, n in enumerate(lengths):
        ids = list(range(start + 10 * i, start + 10 * i + n))
        out.append(Sample(ids, [IGNORE] + ids[1:], f"{tag}:{i + 1}"))
    return out


def mix(n: int = 5, ratio: float = 0.1, seed: int = 0) -> ReplayMix:
    return ReplayMix(samples([4] * n, "replay", start=500), ratio, seed, DataReport(file="replay.jsonl"))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.3])
def test_the_quota_is_the_exact_fraction_over_any_steps(ratio):
    replay = mix(ratio=ratio)
    taken = mixed = 0
    for step, size in enumerate([4, 4, 3, 8, 1, 4, 7, 4, 4, 5] * 3):
        added = sum(len(ids) for ids in replay.assign([list(range(size))]))
        taken, mixed = taken + size, mixed + added
        # replay / (train + replay) = ratio, to within one sample: q(n) = floor(n ρ / (1 − ρ))
        assert mixed == math.floor(taken * ratio / (1 - ratio) + 1e-12), (step, taken, mixed)
    assert replay.trained == taken


def test_order_is_a_permutation_per_pass_and_round_robin_over_micro_batches():
    replay = mix(n=5, ratio=0.5)  # one replay sample per training sample
    first = replay.assign([[0, 1], [2, 3], [4]])  # 5 training samples over 3 micro-batches -> 5 replay
    assert [len(ids) for ids in first] == [2, 2, 1]
    order = [first[j % 3][j // 3] for j in range(5)]
    assert sorted(order) == list(range(5))  # one whole pass
    second = sum(replay.assign([[5, 6, 7, 8, 9]]), [])
    assert sorted(second) == list(range(5)) and second != order  # the next pass, another permutation
    again = mix(n=5, ratio=0.5)
    assert again.assign([[0, 1], [2, 3], [4]]) == first  # the seed fixes it


def test_state_and_restore_continue_the_same_samples():
    a, b = mix(n=7, ratio=0.3), mix(n=7, ratio=0.3)
    for _ in range(5):
        a.assign([[0, 1, 2, 3]])
    b.restore(a.state())
    assert [a.assign([[0, 1, 2, 3]]) for _ in range(6)] == [b.assign([[0, 1, 2, 3]]) for _ in range(6)]


@pytest.mark.parametrize("batching", ["padding-free", "padded"])
def test_a_mixed_batch_appends_the_replay_samples_and_marks_their_labels(batching):
    train = samples([5, 3, 6], "train")
    loader = BatchLoader(train, 3, pad_id=0, shuffle=False, batching=batching)
    batch = loader.batch(0, 0)
    replay = mix(n=4)
    mixed = replay.batch(loader, batch, [2, 0])
    ids, labels = mixed.batch.input_ids, mixed.batch.next_token_labels()
    expected_ids = [t for s in train for t in s.input_ids] + replay.samples[2].input_ids + replay.samples[0].input_ids
    real = ids[mixed.batch.attention_mask.bool()] if batching == "padded" else ids[0, :len(expected_ids)]
    assert real.tolist() == expected_ids
    # the replay labels are exactly the trainable labels of the replay samples' tokens
    replay_ids = set(replay.samples[2].input_ids[1:] + replay.samples[0].input_ids[1:])
    counted = labels != IGNORE
    assert {int(t) for t in labels[mixed.replay_labels & counted]} == replay_ids
    assert not ({int(t) for t in labels[~mixed.replay_labels & counted]} & replay_ids)
    assert mixed.replay_tokens == 2 * 3 and mixed.replay_samples == 2
    sources = [replay.source_of(loader, i) for row in mixed.batch.sample_ids for i in row]
    assert sources == ["train:1", "train:2", "train:3", "replay:3", "replay:1"]
    plain = replay.batch(loader, batch, [])
    assert plain.batch is batch and not plain.replay_labels.any() and plain.replay_tokens == 0
    assert isinstance(Mixed.plain(batch), Mixed)
