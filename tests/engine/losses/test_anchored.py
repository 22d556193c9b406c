"""SFT's loss against forgetting (`engine.losses.anchored`): the training and replay sums and the KL
anchor equal their definitions on materialised fp32 logits, values and every LoRA gradient; with
β = 0 and no replay it is the plain SFT loss, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.adapters import adapter_params, disable_adapters
from engine.data.batching import BatchLoader
from engine.data.render import IGNORE
from engine.data.replay import Mixed, ReplayMix
from engine.data.samples import DataReport, Sample
from engine.losses.anchored import anchored_sums
from engine.losses.causal_lm import loss_sum
from models.config import LlamaConfig
from tests.lora_models import tiny_lora_model
from tests.tolerances import assert_close

VOCAB = 97


def tiny_model() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return tiny_lora_model(cfg, dropout=0.0, lora_b_std=1.0).eval()  # large B: a KL well above rounding


def random_samples(lengths: list[int], tag: str, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * 2 + ids[2:], f"{tag}:{i + 1}"))
    return out


def mixed_batch(batching: str) -> Mixed:
    train = random_samples([9, 5, 12], "train", 1)
    loader = BatchLoader(train, 3, pad_id=0, shuffle=False, batching=batching)
    replay = ReplayMix(random_samples([7, 11], "replay", 2), 0.4, 0, DataReport(file="replay.jsonl"))
    return replay.batch(loader, loader.batch(0, 0), [1, 0])


def materialised(model, mixed: Mixed, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, replay, kl) sums from full fp32 logits: F.cross_entropy and F.kl_div."""
    batch = mixed.batch
    attention_mask, segments = batch.attention_args()
    logits = model(batch.input_ids, attention_mask, batch.position_ids, segments)[:, :-1].reshape(-1, VOCAB)
    labels = batch.next_token_labels().reshape(-1)
    per_token = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    is_replay = mixed.replay_labels.reshape(-1)
    train, replay = per_token[~is_replay].sum(), per_token[is_replay].sum()
    with torch.no_grad(), disable_adapters(model):
        base = model(batch.input_ids, attention_mask, batch.position_ids, segments)[:, :-1].reshape(-1, VOCAB)
    keep = labels != IGNORE
    kl = F.kl_div(F.log_softmax(logits[keep].float(), -1), F.log_softmax(base[keep].float(), -1), log_target=True,
                  reduction="sum")
    return train, replay, kl


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in adapter_params(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("batching", ["padding-free", "padded"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_sums_and_gradients_equal_materialised_logits(batching, beta):
    model = tiny_model()
    mixed = mixed_batch(batching)
    assert mixed.replay_samples == 2
    n = sum(int(t) for t in [(mixed.batch.next_token_labels() != IGNORE).sum()])
    ours = anchored_sums(model, mixed, beta)
    (ours.objective(beta) / n).backward()
    got = lora_grads(model)
    train, replay, kl = materialised(model, mixed, beta)
    ((train + replay + beta * kl) / n).backward()
    want = lora_grads(model)
    assert_close(torch.stack([ours.train, ours.replay]).detach(), torch.stack([train, replay]).detach(),
                 name="train, replay sums")
    if beta:
        assert ours.kl.item() > 1e-3  # B random: the policy is not the base
        assert_close(ours.kl.detach(), kl.detach(), name="KL sum")
    else:
        assert ours.kl.item() == 0.0
    for name in want:
        # B ~ N(0, 1) makes these gradients reach ~20, and each entry sums terms of that size: the
        # fp32 table is held at the tensor's own scale (its entries divided by the largest)
        scale = want[name].abs().max()
        assert_close(got[name] / scale, want[name] / scale, name=f"d/d {name} (÷ its max |·|)")


def test_without_replay_or_anchor_it_is_the_sft_loss_bit_for_bit():
    model = tiny_model()
    train = random_samples([9, 5, 12], "train", 1)
    batch = BatchLoader(train, 3, pad_id=0, shuffle=False, batching="padding-free").batch(0, 0)
    ours = anchored_sums(model, Mixed.plain(batch), 0.0)
    assert torch.equal(ours.train, loss_sum(model, batch)) and ours.replay.item() == 0.0


def test_the_anchor_is_zero_while_the_adapter_is_the_base():
    model = tiny_model()
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if name.endswith("lora_B"):
                p.zero_()
    sums = anchored_sums(model, mixed_batch("padding-free"), 1.0)
    assert sums.kl.item() == 0.0
