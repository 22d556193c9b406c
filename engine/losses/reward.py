"""The reward model's scores and its Bradley–Terry loss: pooling at the last token, then pure functions.

Score of a document (prompt + completion, ending with its EOS / end-of-turn token):

    r = h_T · wᵀ        h_T: the final hidden state (after the final norm, `hidden_states`) at the
                        document's LAST token; w: the head ``score`` (1, H), `engine.adapters.score_head`

as transformers' ``LlamaForSequenceClassification`` (``num_labels=1``) scores a sequence. In a padded,
padding-free or packed batch the last token of document d is found from `Batch.documents`
(`last_token_index`), so the scores come out as a (D,) vector in document order, whatever the
layout: for a batch of pairs ``[c_1 … c_B, r_1 … r_B]`` the chosen half first.

Per pair, with r_c, r_r the chosen and rejected scores and m the pair's margin (0 unless the record
gives one), the Bradley–Terry negative log-likelihood that chosen beats rejected (TRL's
RewardTrainer: ``-logsigmoid(r_c - r_r - margin)``):

    ℓ = −log σ(r_c − r_r − m),        ∂ℓ/∂r_c = −σ(−(r_c − r_r − m)) = −∂ℓ/∂r_r

Metrics per pair: ``accuracy`` 1 where r_c > r_r (strictly) else 0, ``margin`` r_c − r_r (means
over the pairs are logged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.data.batching import Batch
from engine.losses.causal_lm import hidden_states


def last_token_index(batch: Batch) -> torch.Tensor:
    """(D,) int64: the flat index into the batch's (B·T) positions of each document's last real
    token, documents in the order of `Batch.documents`. On the device the batch is on: call it on
    the CPU batch, as collated, and no device op is spent on it (nor any host read).

    ``last[d] = max {i : documents.flat[i] = d}``, one scatter-reduce (padding, -1, goes to a slot
    past the last document that is dropped)."""
    docs = batch.documents().reshape(-1)  # (B*T,), -1 on padding
    n = batch.num_documents
    positions = torch.arange(docs.numel(), device=docs.device)
    last = torch.full((n + 1,), -1, dtype=torch.long, device=docs.device)
    return last.scatter_reduce(0, docs.masked_fill(docs < 0, n), positions, reduce="amax")[:n]


def pooled_rewards(hidden: torch.Tensor, head: torch.nn.Module, last: torch.Tensor) -> torch.Tensor:
    """(D,) fp32: the head applied to the hidden states (B, T, H) at the flat positions ``last``."""
    return head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, last))  # (D, H) -> (D,)


def sequence_rewards(model: torch.nn.Module, batch: Batch, last: torch.Tensor | None = None) -> torch.Tensor:
    """(D,) fp32: the score of each document of ``batch`` (``last``: its `last_token_index`, on the
    batch's device; computed here when not given); differentiable when grad is on."""
    last = last_token_index(batch) if last is None else last
    hidden = hidden_states(model, batch)  # first: under FSDP2 the root's head weight is whole only after it
    return pooled_rewards(hidden, model.score, last)


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor,
                         margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses (P,) fp32: ``−log σ(r_c − r_r − m)`` (m = 0 without ``margin``); inputs (P,)."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair values (P,), detached: ``accuracy`` (r_c > r_r) and ``margin`` (r_c − r_r)."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"accuracy": (chosen > rejected).float(), "margin": chosen - rejected}
