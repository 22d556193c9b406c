"""engine.kl_to_base: KL(base ‖ adapter) per counted token equals a direct computation on
materialised fp32 logits, is exactly 0 for a fresh adapter, and the loss of the same pass is
`mean_loss`'s number bit for bit; the base's hidden states kept from the base's own pass give the
same numbers as running the base again, and spare that forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.adapters import LoRAConfig, disable_adapters, inject_lora, lora_modules, remove_adapters
from engine.kl_to_base import base_loss_and_states, loss_and_kl_to_base
from engine.losses.causal_lm import mean_loss
from tests.engine.test_eval import PAD, tiny_config, tiny_samples
from tests.tolerances import assert_close
from tools.random_checkpoint import random_model


def adapted_model(b_scale: float, seed: int = 4):
    """The tiny random Llama with an all-linear r=4 adapter; B ~ b_scale · N(0, 1) (0: fresh)."""
    model = random_model(tiny_config(), seed=1)
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_scale)
    return model.eval()


def direct_kl(model, samples) -> float:
    """Σ_t KL(p0_t ‖ p_t) over the counted positions / their number, one sample at a time, from
    materialised fp32 logits of the adapter (p) and of the base (p0, adapters off)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids])
            keep = torch.tensor(s.labels[1:]) != -100
            log_p = F.log_softmax(model(ids)[0, :-1].float()[keep], dim=-1)      # (n, V)
            with disable_adapters(model):
                log_p0 = F.log_softmax(model(ids)[0, :-1].float()[keep], dim=-1)  # (n, V)
            total += F.kl_div(log_p, log_p0, log_target=True, reduction="sum").double()
            count += int(keep.sum())
    return (total / count).item()


def test_fresh_adapter_has_zero_kl():
    model = adapted_model(b_scale=0.0)
    result = loss_and_kl_to_base(model, tiny_samples(), batch_size=3, pad_id=PAD, device="cpu", progress=False)
    assert result.kl_to_base == 0.0  # B = 0: the same hidden states, bit for bit
    with disable_adapters(model):
        base = mean_loss(model, tiny_samples(), batch_size=3, pad_id=PAD, device="cpu", progress=False)
    assert result.loss == base


@pytest.mark.parametrize("batch_size", [1, 3])
def test_kl_equals_direct_and_loss_equals_mean_loss(batch_size):
    model = adapted_model(b_scale=0.1)
    samples = tiny_samples()
    result = loss_and_kl_to_base(model, samples, batch_size=batch_size, pad_id=PAD, device="cpu", progress=False)
    expected = direct_kl(model, samples)
    assert expected > 1e-3  # the adapter really moves the distribution
    assert_close(torch.tensor(result.kl_to_base), torch.tensor(expected), torch.float32, "kl_to_base")
    # the loss of the combined pass is mean_loss's, bitwise (same op on the same hidden states)
    assert result.loss == mean_loss(model, samples, batch_size=batch_size, pad_id=PAD, device="cpu", progress=False)
    assert result.loss.tokens == sum(s.loss_tokens for s in samples)
    assert all(m.adapter_enabled for m in lora_modules(model).values())  # the adapter is on again


def test_model_without_adapter_is_refused():
    with pytest.raises(ValueError, match="the model has no adapters"):
        loss_and_kl_to_base(random_model(tiny_config(), seed=1), tiny_samples(), batch_size=2, pad_id=PAD,
                            device="cpu", progress=False)


def counting_forwards(model) -> list:
    """A list that grows by one per forward of the model's first decoder block."""
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_kept_base_states_give_the_same_numbers_without_the_base_forward():
    """The base's pass (no adapter: the plain model) gives mean_loss's loss bit for bit and its
    hidden states of every batch; the adapter's KL from them is the KL that runs the base again,
    bit for bit, with one forward per batch instead of two."""
    samples, options = tiny_samples(), dict(batch_size=3, pad_id=PAD, device="cpu", progress=False)
    model = adapted_model(b_scale=0.1)
    want = loss_and_kl_to_base(model, samples, **options)
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    remove_adapters(model)
    calls = counting_forwards(model)
    base, states = base_loss_and_states(model, samples, **options)
    batches = len(calls)
    chunks = [samples[i:i + 3] for i in range(0, len(samples), 3)]
    assert base == mean_loss(model, samples, **options) and batches == len(states) == len(chunks) > 1
    assert [tuple(h.shape[:2]) for h in states] == [(len(c), max(len(s.input_ids) for s in c)) for c in chunks]
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    model.load_state_dict(adapter, strict=False)
    del calls[:]
    got = loss_and_kl_to_base(model, samples, **options, base_states=states)
    assert len(calls) == batches  # the adapter's forward only
    assert got == want
    with pytest.raises(ValueError, match=f"base_states: 1 batches for {batches}"):
        loss_and_kl_to_base(model, samples, **options, base_states=states[:1])


def test_states_beyond_the_budget_are_not_kept():
    samples, options = tiny_samples(), dict(batch_size=3, pad_id=PAD, device="cpu", progress=False)
    model = random_model(tiny_config(), seed=1).eval()
    base, all_states = base_loss_and_states(model, samples, **options)
    total = sum(h.numel() * h.element_size() for h in all_states)
    loss, states = base_loss_and_states(model, samples, **options, max_bytes=total - 1)
    assert loss == base and states is None
    assert base_loss_and_states(model, samples, **options, max_bytes=total)[1] is not None
