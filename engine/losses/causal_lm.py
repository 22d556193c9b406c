"""The causal-LM loss every loop shares: shifted labels, summed token losses, accumulation, eval.

Hidden state t predicts token t + 1, so labels are shifted by one (and a packed row never predicts
a document's first token from the previous document). The head and the cross-entropy run fused
(`kernels.linear_cross_entropy`): the (tokens, vocab) logits never exist on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.data.batching import Batch, BatchLoader
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.errors import InputError
from engine.run.distributed import Parallel, evaluation_share
from kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_logprobs,
    sequence_logprobs,
)


def shifted_labels(batch: Batch) -> torch.Tensor:
    """labels[:, 1:] with -100 where the next token starts another packed document
    (`Batch.next_token_labels`)."""
    return batch.next_token_labels()


def hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's final hidden states (B, T, H) of a padded, padding-free or packed batch (its
    documents as the loader described them on the host: `Batch.attention_args`)."""
    attention_mask, segments = batch.attention_args()
    return model.hidden_states(batch.input_ids, attention_mask, batch.position_ids, segments)


def loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Σ over the batch's trainable tokens of -log p(next token), in fp32 (a 0-dim tensor)."""
    hidden = hidden_states(model, batch)  # first: under FSDP2 the head weight is whole only after the forward
    return hidden_loss_sum(hidden, model.lm_head.weight, batch)


def hidden_loss_sum(hidden: torch.Tensor, head_weight: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`loss_sum` from hidden states (B, T, H) already computed: the head ``(V, H)`` and the
    cross-entropy fused over positions [:, :-1] against `shifted_labels` (0-dim fp32)."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
    # labels_checked: every token id was checked against the vocabulary when the data met the
    # model (engine.run.model.check_model_fits), so the op skips its range check (a host read)
    return linear_cross_entropy(hidden, head_weight, shifted_labels(batch).reshape(-1), reduction="sum",
                                labels_checked=True)


def completion_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log p(y_t | y_<t) over each document's trainable tokens (D,) fp32, their counts (D,)).

    For preference pairs the trainable tokens are the completion's (labels -100 on the prompt and
    the padding); documents come in the order of `Batch.documents` (for a padded batch, its rows).
    Hidden state t predicts token t + 1, so the labels are shifted by one; the head runs fused
    (`kernels.linear_cross_entropy`: no (N, V) logits).
    """
    hidden = hidden_states(model, batch)  # first: under FSDP2 the head weight is whole only after the forward
    return hidden_logps(hidden, model.lm_head.weight, batch)


def hidden_logps(hidden: torch.Tensor, head_weight: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` from hidden states (B, T, H) already computed.

    Padded batch (one document per row): `sequence_logprobs` sums each row. Padding-free or packed
    batch: the token log-probs ℓ_i = log p(y_i | h_i) of every position (0 where the label is
    ignored: prompts, padding, boundaries) are summed per document d(i) (the document of the
    predicted token), ``logps[d] = Σ_{i: d(i) = d} ℓ_i``, by one index_add (differentiable in ℓ,
    hence in the hidden states). Every position is computed, as in the padded path, rather than
    selecting the labelled ones: selecting by a mask has a data-dependent size, a device sync.
    """
    if batch.segment_ids is None:
        labels = batch.labels[:, 1:]
        logps = sequence_logprobs(hidden[:, :-1], head_weight, labels, IGNORE, labels_checked=True)
        return logps, (labels != IGNORE).sum(1)
    labels = shifted_labels(batch).reshape(-1)                       # (B*(T-1),)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])              # (B*(T-1), H)
    token_logps = linear_logprobs(flat, head_weight, labels, IGNORE, labels_checked=True)  # 0 where ignored
    docs = batch.label_documents().reshape(-1)
    n = batch.num_documents
    logps = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, docs, token_logps)
    return logps, document_loss_tokens(batch)


def document_loss_tokens(batch: Batch) -> torch.Tensor:
    """Trainable (shifted) tokens of each document of the batch, (D,) int64, on the batch's device."""
    keep = (shifted_labels(batch) != IGNORE).reshape(-1).long()
    docs = batch.label_documents().reshape(-1)
    return torch.zeros(batch.num_documents, dtype=torch.long, device=keep.device).index_add(0, docs, keep)


@torch.no_grad()
def completion_kl(policy_hidden: torch.Tensor, ref_hidden: torch.Tensor, head_weight: torch.Tensor,
                  batch: Batch, chunk_tokens: int = 256) -> tuple[float, int]:
    """(Σ_t KL(π(·|t) ‖ π_ref(·|t)), number of t) over the trainable positions t of ``batch``.

    KL(π ‖ π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)), the exact divergence over the whole
    vocabulary at each position that predicts a trainable token; the logits are formed
    ``chunk_tokens`` positions at a time (two (chunk, V) fp32 blocks), never for all positions.
    """
    keep = shifted_labels(batch) != IGNORE
    pol = policy_hidden[:, :-1][keep]  # (N, H)
    ref = ref_hidden[:, :-1][keep]
    total = torch.zeros((), dtype=torch.float64, device=pol.device)
    for start in range(0, pol.shape[0], chunk_tokens):
        lp = F.log_softmax(pol[start:start + chunk_tokens].float() @ head_weight.float().t(), dim=-1)
        lr = F.log_softmax(ref[start:start + chunk_tokens].float() @ head_weight.float().t(), dim=-1)
        total += (lp.exp() * (lp - lr)).sum(dtype=torch.float64)
    return total.item(), pol.shape[0]


def count_loss_tokens(batch: Batch) -> int:
    """The trainable next-token labels of ``batch`` (counted by its loader on the host, if it did)."""
    if batch.loss_tokens is not None:
        return batch.loss_tokens
    return int((shifted_labels(batch) != IGNORE).sum())


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
              device: torch.device | str, desc: str = "eval", progress: bool = True,
              batching: str = "padded", parallel: Parallel | None = None) -> LossResult:
    """Σ loss over every trainable token of ``samples`` / their number (batches of ``batch_size``
    samples in file order, ``padded`` or ``padding-free``: the same sum up to float rounding).
    Under torchrun (``parallel``) the ranks share the batches (`evaluation_share`) and sum."""
    loader = BatchLoader(samples, batch_size, pad_id=pad_id, shuffle=False, batching=batching)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    share = list(evaluation_share(parallel, loader.num_batches(0)))
    for index, counted in tqdm(share, desc=desc, unit="batch", disable=not progress, leave=False,
                               dynamic_ncols=True):
        batch = loader.batch(0, index)
        part = loss_sum(model, batch.to(device)).double()
        if counted:
            tokens += count_loss_tokens(batch)  # on the CPU batch: no device sync per batch
            total += part
    model.train(was_training)
    if parallel is not None:
        parallel.sum_(total)
        tokens, = parallel.sum_ints([tokens])
    if tokens == 0:
        raise InputError(f"{desc}: no trainable tokens to evaluate")
    loss = total.item() / tokens
    return LossResult(loss, perplexity(loss), tokens)
