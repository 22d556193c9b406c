"""An adapter's loss on an evaluation set and its KL to the base there, in one pass over the batches.

For the active adapter (policy p) and the same model with its adapters switched off (base p0,
`engine.adapters.disable_adapters`), over the counted positions t of the set (those whose shifted
label is not -100: the tokens the loss counts; N of them, summed over the whole set)::

    loss        = (1 / N) Σ_t -log p(labels[t+1] | tokens ≤ t)          (as `mean_loss`)
    kl_to_base  = (1 / N) Σ_t KL(p0(·|t) ‖ p(·|t))
                = (1 / N) Σ_t Σ_v p0(v|t) (log p0(v|t) − log p(v|t))

KL(base ‖ adapter) is an expectation under the base: it grows wherever the adapter takes away
probability the base gave, token by token over the whole vocabulary, which a rise of the loss on
the labels alone can hide (forgetting, issue 14). It is ≥ 0 and exactly 0 for a fresh adapter
(B = 0). Per batch (`batch_loss_and_kl`) the base's final hidden states h0 and the adapter's h
(B, T, H) give both numbers: the fused head + cross-entropy on h (`hidden_loss_sum`, the very op
`mean_loss` uses, so the loss is the same number bit for bit) and the fused head + KL on (h, h0)
(`kernels.linear_kl`, reduction ``sum``, the (N, V) logits never formed), masked to the counted
positions. So the adapter's forward runs once for both, and the base's once more. (A training run's
``--retain-data`` measures the same sums, padding-free and across ranks: `engine.run.retention`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from engine.adapters import disable_adapters
from engine.data.batching import Batch, BatchLoader
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.errors import InputError
from engine.losses.causal_lm import (
    LossResult,
    count_loss_tokens,
    hidden_loss_sum,
    hidden_states,
    perplexity,
    shifted_labels,
)
from kernels.linear_kl import linear_kl


@dataclass(frozen=True)
class LossAndKL:
    """The adapter's `LossResult` on the set, and its mean KL(base ‖ adapter) per counted token (nats)."""

    loss: LossResult
    kl_to_base: float


@torch.no_grad()
def batch_loss_and_kl(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(Σ_t −log p(labels[t+1]), Σ_t KL(p0_t ‖ p_t)) over the counted positions of one batch
    (already on the model's device), float64 (2,); ``model`` holds its active adapter."""
    with disable_adapters(model):
        base_hidden = hidden_states(model, batch)                # (B, T, H), the base
    hidden = hidden_states(model, batch)                         # (B, T, H), the adapter
    head = model.lm_head.weight                                  # (V, H)
    loss = hidden_loss_sum(hidden, head, batch)
    counted = (shifted_labels(batch) != IGNORE).reshape(-1)      # (B*(T-1),)
    flat, flat_base = (h[:, :-1].reshape(-1, h.shape[-1]) for h in (hidden, base_hidden))  # (B*(T-1), H)
    kl = linear_kl(flat, flat_base, head, counted, reduction="sum")
    return torch.stack([loss, kl]).double()


@torch.no_grad()
def loss_and_kl_to_base(model: nn.Module, samples: list[Sample], *, batch_size: int, pad_id: int,
                        device: torch.device | str, desc: str = "eval", progress: bool = True) -> LossAndKL:
    """The loss of ``model`` with its active adapter on ``samples`` and its KL to the base (module
    docstring), from padded batches of ``batch_size`` samples in file order (as `mean_loss`'s).
    ``model`` must hold LoRA modules (ValueError otherwise: there is no base to compare with)."""
    loader = BatchLoader(samples, batch_size, pad_id=pad_id, shuffle=False, batching="padded")
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ −log p, Σ KL(p0 ‖ p)
    tokens = 0
    for index in tqdm(range(loader.num_batches(0)), desc=desc, unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
        batch = loader.batch(0, index)
        sums += batch_loss_and_kl(model, batch.to(device))
        tokens += count_loss_tokens(batch)  # on the CPU batch: no device sync per batch
    model.train(was_training)
    if tokens == 0:
        raise InputError(f"{desc}: no trainable tokens to evaluate")
    loss_sum, kl_sum = sums.tolist()
    loss = loss_sum / tokens
    return LossAndKL(LossResult(loss, perplexity(loss), tokens), kl_sum / tokens)
