"""Batched KV-cache sampling: left padding changes nothing (greedy == per-prompt `generate`, also with
LoRA and NF4), EOS ends a completion, max_new_tokens bounds it, seeded sampling is reproducible,
top_p -> 0 is greedy, the first token's empirical distribution is softmax(logits / T) (nucleus
included), and the model's modes come back."""

from __future__ import annotations

import pytest
import torch

from engine.generate import generate, sample_next
from engine.sampling import sample_completions, sample_next_tokens, sampling_generator
from models.config import LlamaConfig
from tests.lora_models import tiny_lora_model
from tools.random_checkpoint import random_model

CFG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=6)
PROMPTS = [[3, 17, 5, 42, 8], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [44, 0, 12]]  # lengths 5, 1, 9, 3; window 6


@pytest.fixture(scope="module")
def tiny():
    model = random_model(CFG, seed=3).double()  # float64: argmax ties cannot flip between layouts
    with torch.no_grad():  # larger logits than the 0.02 init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(50)
    return model


def sample(model, prompts=PROMPTS, n=10, **kw):
    options = dict(max_new_tokens=n, temperature=0.0, top_p=1.0, eos_token_ids=(), generator=None, pad_id=0)
    return sample_completions(model, prompts, **{**options, **kw})


def one_by_one(model, prompts=PROMPTS, n=10, **kw):
    return [list(generate(model, p, n, **kw)) for p in prompts]


def test_batched_greedy_equals_generate_per_prompt(tiny):
    out = sample(tiny, n=12)
    assert out == one_by_one(tiny, n=12)  # left padding, RoPE positions and the sliding window
    assert [len(c) for c in out] == [12] * 4
    assert sample(tiny, [PROMPTS[2]] * 3, n=12) == [out[2]] * 3  # no padding at all
    assert sample(tiny, n=12, pad_id=49) == out  # the pad token is never attended to
    assert sample(tiny, n=1) == [c[:1] for c in out]


def cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    """The completion a free-running row gives when ``eos`` ends it: through its first EOS."""
    return next((row[:k + 1] for k, t in enumerate(row) if t in eos), row)


@pytest.mark.parametrize("check_every", [1, 3, 100])
def test_eos_ends_each_completion_and_includes_it(tiny, check_every):
    free = sample(tiny, n=12)
    stop = free[0][2]  # the greedy token at step 2 of row 0
    unused = next(t for t in range(CFG.vocab_size) if all(t not in row for row in free))
    out = sample(tiny, n=12, eos_token_ids=(stop, unused), check_every=check_every)
    assert out[0] == free[0][:3] and stop not in free[0][:2]
    assert out == [cut_at_eos(row, {stop}) for row in free]  # each row stops at its first EOS (kept)
    assert any(len(c) == 12 for c in out) and any(len(c) < 12 for c in out)
    assert out == one_by_one(tiny, n=12, eos_token_ids=(stop, unused))
    firsts = {row[0] for row in free}
    forwards = []
    hook = tiny.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        everyone = sample(tiny, n=12, eos_token_ids=firsts, check_every=check_every)
    finally:
        hook.remove()
    assert everyone == [cut_at_eos(row, firsts) for row in free]
    assert all(len(c) == 1 for c in everyone)  # every row finishes at step 0 ...
    assert len(forwards) == min(check_every, 12)  # ... and decoding stops at the next check


def test_seeded_sampling_is_reproducible_and_top_p_tiny_is_greedy(tiny):
    def draw(seed, **kw):
        return sample(tiny, n=10, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert all(len(c) == 10 for c in draw(0))
    assert draw(0, top_p=1e-6) == sample(tiny, n=10)
    # one row: the same draws as the single-prompt sampler (`engine.generate.sample_next`)
    single = list(generate(tiny, PROMPTS[0], 10, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5)))
    assert sample(tiny, [PROMPTS[0]], n=10, temperature=0.7, top_p=0.9,
                  generator=torch.Generator().manual_seed(5)) == [single]


def test_sampling_generator_depends_on_seed_step_and_part_only():
    def draws(*args):
        return torch.rand(4, generator=sampling_generator(*args)).tolist()

    assert draws(1, 7, "cpu") == draws(1, 7, "cpu", 0)
    assert len({tuple(draws(*a)) for a in [(1, 7, "cpu"), (1, 8, "cpu"), (2, 7, "cpu"), (1, 7, "cpu", 1)]}) == 4
    assert sampling_generator(0, 0, "cpu").initial_seed() != 0  # salted: not the micro-batch dropout seed


def test_sample_next_tokens_rows_match_sample_next():
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.5, 0.8), (2.0, 0.3)):
        batched = sample_next_tokens(logits[:1], temperature, top_p, torch.Generator().manual_seed(9))
        assert int(batched[0]) == sample_next(logits[0], temperature, top_p, torch.Generator().manual_seed(9))
    assert sample_next_tokens(logits, 0.0, 1.0, None).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.5, 0.7)])
def test_first_token_frequencies_follow_softmax_over_the_nucleus(temperature, top_p):
    cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = random_model(cfg, seed=1).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of a few units: no token certain, none negligible
    prompt, n = [1, 5, 2], 2000
    logits = model(torch.tensor([prompt]))[0, -1]
    probs = torch.softmax(logits / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    kept = order[(sorted_probs.cumsum(0) - sorted_probs) < top_p]
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert 0.05 < expected.max() < 0.9 and (top_p == 1.0 or len(kept) < cfg.vocab_size)
    out = sample_completions(model, [prompt] * n, max_new_tokens=1, temperature=temperature, top_p=top_p,
                             eos_token_ids=(), generator=torch.Generator().manual_seed(0), pad_id=0)
    freq = torch.bincount(torch.tensor([c[0] for c in out]), minlength=cfg.vocab_size).double() / n
    stderr = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 4 * stderr).all(), f"freq {freq.tolist()} vs {expected.tolist()}"
    assert (freq[expected == 0] == 0).all()  # nothing outside the nucleus


def test_lora_model_samples_in_eval_mode_and_modes_come_back():
    model = tiny_lora_model(CFG, dropout=0.5).double()  # training mode, strong LoRA dropout
    assert model.training
    model.model.layers[0].mlp.eval()  # a submodule in its own mode stays so
    out = sample(model, n=8)
    assert model.training and not model.model.layers[0].mlp.training
    assert all(m.training for name, m in model.named_modules() if not name.startswith("model.layers.0.mlp"))
    model.eval()
    assert out == one_by_one(model, n=8)  # the same tokens as without dropout
    model.train()
    model.eval()
    sample(model, n=2)
    assert not any(m.training for m in model.modules())


def test_nf4_lora_model():
    model = tiny_lora_model(CFG, quant="nf4", dropout=0.0).eval()
    assert sample(model, n=6) == one_by_one(model, n=6)


def test_bad_arguments(tiny):
    assert sample(tiny, []) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(tiny, [[1], []])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        sample(tiny, n=0)
    with pytest.raises(ValueError, match="top_p=0"):
        sample(tiny, top_p=0.0)
    with pytest.raises(ValueError, match="pad_id=50"):
        sample(tiny, pad_id=50)
