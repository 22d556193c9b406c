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
positions. So the adapter's forward runs once for both, and the base's once more — or not at all:
`base_loss_and_states` computes the base's loss on the set and keeps its h0 of every batch in host
memory (up to `BASE_STATES_MAX_BYTES`; beyond, nothing is kept and each adapter runs the base
again), so that comparing K adapters with the base (`engine.comparison`) costs K + 1 forwards per
batch instead of 2K + 1. The states are the ones the base forward inside `batch_loss_and_kl` gives,
so the KL is the same number either way. (A training run's ``--retain-data`` measures the same sums,
padding-free and across ranks: `engine.run.retention`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from engine.adapters import adapter_modules, disable_adapters
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

# Host memory the base's hidden states of one set may take (`base_loss_and_states`): 4 GiB holds
# 500k tokens of a 4096-wide model in bf16 (padding included); a larger set runs the base again.
BASE_STATES_MAX_BYTES = 4 * 2**30


@dataclass(frozen=True)
class LossAndKL:
    """The adapter's `LossResult` on the set, and its mean KL(base ‖ adapter) per counted token (nats)."""

    loss: LossResult
    kl_to_base: float


@torch.no_grad()
def batch_loss_and_kl(model: nn.Module, batch: Batch, base_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """(Σ_t −log p(labels[t+1]), Σ_t KL(p0_t ‖ p_t)) over the counted positions of one batch
    (already on the model's device), float64 (2,); ``model`` holds its active adapter.
    ``base_hidden``: the base's hidden states (B, T, H) of this batch, if already computed."""
    if base_hidden is None:
        with disable_adapters(model):
            base_hidden = hidden_states(model, batch)            # (B, T, H), the base
    hidden = hidden_states(model, batch)                         # (B, T, H), the adapter
    head = model.lm_head.weight                                  # (V, H)
    loss = hidden_loss_sum(hidden, head, batch)
    counted = (shifted_labels(batch) != IGNORE).reshape(-1)      # (B*(T-1),)
    flat, flat_base = (h[:, :-1].reshape(-1, h.shape[-1]) for h in (hidden, base_hidden))  # (B*(T-1), H)
    kl = linear_kl(flat, flat_base, head, counted, reduction="sum")
    return torch.stack([loss, kl]).double()


def _eval_batches(model: nn.Module, loader: BatchLoader, desc: str, progress: bool):
    """(index, CPU batch) for every batch of ``loader`` in file order, with a progress bar; the
    model in eval mode meanwhile, its mode restored after the last."""
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(loader.num_batches(0)), desc=desc, unit="batch", disable=not progress,
                          leave=False, dynamic_ncols=True):
            yield index, loader.batch(0, index)
    finally:
        model.train(was_training)


def _mean_per_token(total: float, tokens: int, desc: str) -> float:
    if tokens == 0:
        raise InputError(f"{desc}: no trainable tokens to evaluate")
    return total / tokens


@torch.no_grad()
def base_loss_and_states(model: nn.Module, samples: list[Sample], *, batch_size: int, pad_id: int,
                         device: torch.device | str, desc: str = "eval", progress: bool = True,
                         max_bytes: int = BASE_STATES_MAX_BYTES) -> tuple[LossResult, list[torch.Tensor] | None]:
    """The base's `LossResult` on ``samples`` — ``model`` as it is, with no adapter active; the
    number `engine.losses.causal_lm.mean_loss` gives, bit for bit — and its hidden states (B, T, H)
    of every batch (those `loss_and_kl_to_base` makes) on the CPU, for its ``base_states``; None
    when they would take more than ``max_bytes``."""
    loader = BatchLoader(samples, batch_size, pad_id=pad_id, shuffle=False, batching="padded")
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens, states, kept = 0, [], 0
    for _, batch in _eval_batches(model, loader, desc, progress):
        on_device = batch.to(device)
        hidden = hidden_states(model, on_device)                 # (B, T, H)
        total += hidden_loss_sum(hidden, model.lm_head.weight, on_device).double()
        tokens += count_loss_tokens(batch)
        kept += hidden.numel() * hidden.element_size()
        states = states if states is not None and kept <= max_bytes else None
        if states is not None:
            states.append(hidden.to("cpu"))
    loss = _mean_per_token(total.item(), tokens, desc)
    return LossResult(loss, perplexity(loss), tokens), states


@torch.no_grad()
def loss_and_kl_to_base(model: nn.Module, samples: list[Sample], *, batch_size: int, pad_id: int,
                        device: torch.device | str, desc: str = "eval", progress: bool = True,
                        base_states: list[torch.Tensor] | None = None) -> LossAndKL:
    """The loss of ``model`` with its active adapter on ``samples`` and its KL to the base (module
    docstring), from padded batches of ``batch_size`` samples in file order (as `mean_loss`'s).
    ``model`` must hold LoRA modules (ValueError otherwise: there is no base to compare with).
    ``base_states``: the base's hidden states of these batches (`base_loss_and_states`, the same
    samples and batch size); without them the base runs on each batch."""
    if not adapter_modules(model):
        raise ValueError("loss_and_kl_to_base: the model has no adapters (no base to compare with)")
    loader = BatchLoader(samples, batch_size, pad_id=pad_id, shuffle=False, batching="padded")
    if base_states is not None and len(base_states) != loader.num_batches(0):
        raise ValueError(f"base_states: {len(base_states)} batches for {loader.num_batches(0)}")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ −log p, Σ KL(p0 ‖ p)
    tokens = 0
    for index, batch in _eval_batches(model, loader, desc, progress):
        base_hidden = None if base_states is None else base_states[index].to(device)
        sums += batch_loss_and_kl(model, batch.to(device), base_hidden)
        tokens += count_loss_tokens(batch)  # on the CPU batch: no device sync per batch
    loss_sum, kl_sum = sums.tolist()
    loss = _mean_per_token(loss_sum, tokens, desc)
    return LossAndKL(LossResult(loss, perplexity(loss), tokens), _mean_per_token(kl_sum, tokens, desc))
