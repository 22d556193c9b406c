"""The causal-LM loss every loop shares: shifted labels, summed token losses, accumulation, eval.

Hidden state t predicts token t + 1, so labels are shifted by one (and a packed row never predicts
a document's first token from the previous document). The head and the cross-entropy run fused
(`kernels.linear_cross_entropy`): the (tokens, vocab) logits never exist on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from engine.batching import Batch, BatchLoader
from engine.data import Sample
from engine.data_render import IGNORE
from engine.errors import InputError
from kernels.linear_cross_entropy import linear_cross_entropy


def shifted_labels(batch: Batch) -> torch.Tensor:
    """labels[:, 1:] with -100 where the next token starts another packed document."""
    labels = batch.labels[:, 1:].clone()
    if batch.segment_ids is not None:
        labels[batch.segment_ids[:, 1:] != batch.segment_ids[:, :-1]] = IGNORE
    return labels


def loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Σ over the batch's trainable tokens of -log p(next token), in fp32 (a 0-dim tensor)."""
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids, batch.segment_ids)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
    return linear_cross_entropy(hidden, model.lm_head.weight, shifted_labels(batch).reshape(-1), reduction="sum")


def count_trainable(batch: Batch) -> int:
    return int((shifted_labels(batch) != IGNORE).sum())


def accumulate_gradients(model: torch.nn.Module, window: list[Batch], device: torch.device) -> tuple[float, int]:
    """Backward of one accumulation window, normalised by its total trainable tokens N.

    Each micro-batch contributes ``loss_sum / N``, so the summed gradient is the gradient of the
    mean loss over all N tokens of the window: the same as one batch holding all of them.
    Returns (mean loss, N).
    """
    n_tokens = sum(count_trainable(b) for b in window)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for batch in window:
        part = loss_sum(model, batch.to(device))
        (part / max(n_tokens, 1)).backward()
        total += part.detach()
    return (total / max(n_tokens, 1)).item(), n_tokens


@dataclass(frozen=True)
class LossResult:
    """Mean loss per trainable token (nats), its perplexity, and N."""

    loss: float
    perplexity: float
    tokens: int

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def perplexity(loss: float) -> float:
    """exp(loss); inf where it overflows a float (a loss above ~709 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def mean_loss(model: nn.Module, samples: list[Sample], *, batch_size: int, pad_id: int,
              device: torch.device | str, desc: str = "eval", progress: bool = True) -> LossResult:
    """Σ loss over every trainable token of ``samples`` / their number (padded batches, file order)."""
    loader = BatchLoader(samples, batch_size, pad_id=pad_id, shuffle=False)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch in tqdm(loader.batches(0), total=loader.num_batches(0), desc=desc, unit="batch",
                      disable=not progress, leave=False, dynamic_ncols=True):
        tokens += count_trainable(batch)  # on the CPU batch: no device sync per batch
        total += loss_sum(model, batch.to(device)).double()
    model.train(was_training)
    if tokens == 0:
        raise InputError(f"{desc}: no trainable tokens to evaluate")
    loss = total.item() / tokens
    return LossResult(loss, perplexity(loss), tokens)
