"""engine.data.batching / engine.data.packing: the seeded epoch order, padded batches, packed rows, and
resuming at (epoch, batch index)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from engine.data.batching import BatchLoader, collate_padded, epoch_order
from engine.data.packing import plan_rows
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.losses.causal_lm import count_loss_tokens
from tests.tolerances import assert_close

PAD = 0


def make_samples(n: int, max_len: int, seed: int = 0) -> list[Sample]:
    """Variable-length documents with a masked prompt part and distinct token ids."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        length = rng.randint(2, max_len)
        ids = [rng.randint(1, 500) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        labels = [IGNORE] * prompt + ids[prompt:]
        samples.append(Sample(ids, labels, f"mem:{i + 1}"))
    return samples


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.epoch, x.index, x.sample_ids, count_loss_tokens(x)) == (y.epoch, y.index, y.sample_ids, count_loss_tokens(y))
        for name in ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert (tx is None and ty is None) or torch.equal(tx, ty), name


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = epoch_order(37, seed=5, epoch=2)
    assert sorted(order) == list(range(37))
    assert order == epoch_order(37, seed=5, epoch=2)
    assert order != epoch_order(37, seed=5, epoch=3) and order != epoch_order(37, seed=6, epoch=2)


@pytest.mark.parametrize("n,batch_size", [(1, 1), (7, 3), (16, 4)])
def test_padded_batches_pad_right_and_cover_each_sample_once(n, batch_size):
    samples = make_samples(n, 23)
    loader = BatchLoader(samples, batch_size, pad_id=PAD, seed=1)
    batches = list(loader.batches(epoch=0))
    assert len(batches) == loader.num_batches(0) == -(-n // batch_size)
    seen = [i for b in batches for row in b.sample_ids for i in row]
    assert seen == epoch_order(n, 1, 0)
    for batch in batches:
        width = batch.input_ids.shape[1]
        assert width == max(len(samples[r[0]].input_ids) for r in batch.sample_ids)
        for row, (i,) in enumerate(batch.sample_ids):
            s, k = samples[i], len(samples[i].input_ids)
            assert batch.input_ids[row, :k].tolist() == s.input_ids and batch.labels[row, :k].tolist() == s.labels
            assert (batch.input_ids[row, k:] == PAD).all() and (batch.labels[row, k:] == IGNORE).all()
            assert batch.attention_mask[row].tolist() == [1] * k + [0] * (width - k)
            assert batch.position_ids[row, :k].tolist() == list(range(k))
        assert batch.segment_ids is None
        assert count_loss_tokens(batch) == sum(samples[r[0]].loss_tokens for r in batch.sample_ids)


def test_pad_to_multiple_of_rounds_the_width_up():
    samples = make_samples(3, 21)
    batch = collate_padded(samples, PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] - max(len(s.input_ids) for s in samples) < 8


@pytest.mark.parametrize("n,max_len,batch_size", [(1, 8, 1), (25, 16, 3), (40, 37, 2)])
def test_packed_rows_are_full_length_with_per_document_positions_and_segments(n, max_len, batch_size):
    samples = make_samples(n, max_len, seed=n)
    loader = BatchLoader(samples, batch_size, pad_id=PAD, seed=2, pack=True, max_len=max_len)
    batches = list(loader.batches(epoch=1))
    placed = []
    for batch in batches:
        assert batch.input_ids.shape[1] == max_len and batch.segment_ids is not None
        for row, docs in enumerate(batch.sample_ids):
            pos = 0
            for segment, i in enumerate(docs):  # each document whole, contiguous, in its own segment
                k = len(samples[i].input_ids)
                assert batch.input_ids[row, pos:pos + k].tolist() == samples[i].input_ids
                assert batch.labels[row, pos:pos + k].tolist() == samples[i].labels
                assert batch.labels[row, pos] == IGNORE  # never predicted from the previous doc
                assert batch.position_ids[row, pos:pos + k].tolist() == list(range(k))
                assert (batch.segment_ids[row, pos:pos + k] == segment).all()
                pos += k
            assert batch.attention_mask[row].tolist() == [1] * pos + [0] * (max_len - pos)
            assert (batch.segment_ids[row, pos:] == len(docs)).all() and (batch.labels[row, pos:] == IGNORE).all()
            placed += docs
        assert count_loss_tokens(batch) == int((batch.labels[:, 1:] != IGNORE).sum())
    assert sorted(placed) == list(range(n))  # every document exactly once
    tokens = Counter(t for b in batches for t in b.input_ids[b.attention_mask.bool()].tolist())
    assert tokens == Counter(t for s in samples for t in s.input_ids)  # token multiset preserved
    assert sum(count_loss_tokens(b) for b in batches) == sum(s.loss_tokens for s in samples)


def test_best_fit_keeps_rows_full_and_is_a_function_of_the_order():
    lengths = [5, 9, 3, 7, 1, 8, 2, 10, 6, 4]
    order = list(range(len(lengths)))
    rows = plan_rows(lengths, order, 10)
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 6  # 55 tokens: a perfect packing needs 6 rows of 10
    assert rows == plan_rows(lengths, order, 10)
    with pytest.raises(ValueError, match="max_len=8"):
        plan_rows(lengths, order, 8)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_at_epoch_and_batch_index_gives_the_same_batches(pack):
    samples = make_samples(30, 19, seed=7)
    make = lambda: BatchLoader(samples, 4, pad_id=PAD, seed=11, pack=pack, max_len=19)  # noqa: E731
    for epoch in (0, 3):
        full = list(make().batches(epoch))
        for start in (0, 1, len(full) - 1, len(full)):
            assert_batches_equal(full[start:], list(make().batches(epoch, start=start)))
    assert [b.sample_ids for b in make().batches(0)] != [b.sample_ids for b in make().batches(1)]


def test_eval_loader_without_shuffle_keeps_file_order():
    samples = make_samples(9, 11)
    loader = BatchLoader(samples, 4, pad_id=PAD, shuffle=False)
    assert [r[0] for b in loader.batches(0) for r in b.sample_ids] == list(range(9))


def test_packed_rows_give_each_document_the_logits_it_gets_alone():
    """The packing contract with the model: segment ids + restarting positions make a packed row
    compute, for every document, exactly what the document computes on its own."""
    from models.config import LlamaConfig
    from models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=501, hidden_size=48, intermediate_size=77, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    samples = make_samples(9, 13, seed=3)
    loader = BatchLoader(samples, 3, pad_id=PAD, seed=0, pack=True, max_len=29)
    with torch.no_grad():
        for batch in loader.batches(0):
            packed = model(batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, segment_ids=batch.segment_ids)
            for row, docs in enumerate(batch.sample_ids):
                pos = 0
                for i in docs:
                    k = len(samples[i].input_ids)
                    alone = model(torch.tensor([samples[i].input_ids]))[0]
                    assert_close(packed[row, pos:pos + k], alone, torch.float32, f"doc {i} logits")
                    pos += k


# ---------------------------------------------------------------------------- padding-free batches

@pytest.mark.parametrize("n,batch_size,multiple", [(1, 1, 1), (7, 3, 1), (16, 4, 8)])
def test_padding_free_batch_is_one_row_of_the_padded_batch_samples(n, batch_size, multiple):
    samples = make_samples(n, 23, seed=n)
    make = lambda batching: BatchLoader(samples, batch_size, pad_id=PAD, seed=1, batching=batching,  # noqa: E731
                                        pad_to_multiple_of=multiple)
    padded, free = list(make("padded").batches(0)), list(make("padding-free").batches(0))
    assert len(free) == len(padded) == make("padding-free").num_batches(0)
    for p, f in zip(padded, free):
        docs = [row[0] for row in p.sample_ids]
        assert f.sample_ids == [docs] and (f.epoch, f.index) == (p.epoch, p.index)  # same samples, same order
        used = sum(len(samples[i].input_ids) for i in docs)
        assert f.input_ids.shape == (1, -(-used // multiple) * multiple) and f.input_ids.shape[1] - used < multiple
        pos = 0
        for segment, i in enumerate(docs):
            k = len(samples[i].input_ids)
            assert f.input_ids[0, pos:pos + k].tolist() == samples[i].input_ids
            assert f.labels[0, pos:pos + k].tolist() == samples[i].labels
            assert f.position_ids[0, pos:pos + k].tolist() == list(range(k))
            assert (f.segment_ids[0, pos:pos + k] == segment).all() and (f.documents()[0, pos:pos + k] == segment).all()
            pos += k
        assert f.attention_mask[0].tolist() == [1] * used + [0] * (f.input_ids.shape[1] - used)
        assert count_loss_tokens(f) == count_loss_tokens(p) == sum(samples[i].loss_tokens for i in docs)


@pytest.mark.parametrize("budget", [23, 40, 97])
def test_max_tokens_per_batch_takes_consecutive_samples_up_to_the_budget(budget):
    samples = make_samples(31, 23, seed=4)
    loader = BatchLoader(samples, 4, pad_id=PAD, seed=3, batching="padding-free", max_tokens=budget)
    lengths = [len(s.input_ids) for s in samples]
    batches = list(loader.batches(2))
    flat = [i for b in batches for i in b.sample_ids[0]]
    assert flat == epoch_order(31, 3, 2)  # every sample once, in epoch order
    for k, b in enumerate(batches):
        assert b.input_ids.shape == (1, sum(lengths[i] for i in b.sample_ids[0])) and b.input_ids.shape[1] <= budget
        if k + 1 < len(batches):  # greedy: the next sample would not have fitted
            assert b.input_ids.shape[1] + lengths[batches[k + 1].sample_ids[0][0]] > budget


def test_a_sample_longer_than_the_token_budget_is_refused_by_name():
    from engine.data.batching import TokenBudgetError
    from engine.errors import InputError

    samples = make_samples(5, 10, seed=0) + [Sample(list(range(1, 31)), [IGNORE] + list(range(2, 31)), "f.jsonl:6")]
    with pytest.raises(TokenBudgetError, match=r"f\.jsonl:6: sample has 30 tokens.*--max-tokens-per-batch 29") as err:
        BatchLoader(samples, 2, pad_id=PAD, batching="padding-free", max_tokens=29)
    assert isinstance(err.value, InputError)  # exit 2, one line
    with pytest.raises(ValueError, match="padding-free"):
        BatchLoader(samples, 2, pad_id=PAD, batching="padded", max_tokens=64)


@pytest.mark.parametrize("batching,max_tokens", [("padding-free", None), ("padding-free", 45), ("pack", None)])
def test_resume_mid_epoch_gives_the_same_batches_for_every_batching(batching, max_tokens):
    samples = make_samples(30, 19, seed=7)
    make = lambda: BatchLoader(samples, 4, pad_id=PAD, seed=11, batching=batching, max_len=19,  # noqa: E731
                               max_tokens=max_tokens)
    for epoch in (0, 3):
        full = list(make().batches(epoch))
        assert len(full) == make().num_batches(epoch)
        for start in (1, len(full) // 2, len(full)):
            assert_batches_equal(full[start:], list(make().batches(epoch, start=start)))


@pytest.mark.parametrize("batching,max_tokens,multiple", [("padded", None, 1), ("padded", None, 8),
                                                          ("padding-free", None, 1), ("padding-free", 50, 1),
                                                          ("pack", None, 1)])
def test_batching_report_counts_what_the_batches_compute(batching, max_tokens, multiple):
    """The report's figures, computed from lengths, equal those of the collated batches of epoch 0,
    and its padded figures those of padded batches of --batch-size."""
    from engine.data.batching_report import sft_batching_report

    samples = make_samples(26, 21, seed=9)
    make = lambda b, t: BatchLoader(samples, 3, pad_id=PAD, seed=5, batching=b, max_len=24, max_tokens=t,  # noqa: E731
                                    pad_to_multiple_of=multiple)
    report = sft_batching_report(make(batching, max_tokens))
    batches, padded = list(make(batching, max_tokens).batches(0)), list(make("padded", None).batches(0))
    tokens = sum(len(s.input_ids) for s in samples)
    assert (report.batching, report.batches, report.tokens, report.documents) == (batching, len(batches), tokens, 26)
    assert report.positions == sum(b.input_ids.numel() for b in batches)
    assert report.padded_positions == sum(b.input_ids.numel() for b in padded)
    assert report.padding_fraction == pytest.approx(1 - tokens / report.positions)
    assert report.padded_padding_fraction == pytest.approx(1 - tokens / report.padded_positions)
    if batching == "padding-free" and multiple == 1:
        assert report.padding_fraction == 0 < report.padded_padding_fraction
    assert batching in report.summary() and "%" in report.summary()
