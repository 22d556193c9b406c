"""How far a merged model drifts from the model as trained: mean KL per token and top-1 agreement.

The reference p is the model the adapter was trained as (for QLoRA: the base rounded to NF4 exactly
as in training, with the adapter unmerged on top); the candidate q is the merged model as written
(its folder loaded back). Over the counted positions t of a sample of data (those whose shifted
label is not -100, the tokens the loss counts; N of them over the whole sample)::

    kl    = (1 / N) Σ_t KL(p_t ‖ q_t) = (1 / N) Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v))     nats/token
    top1  = (1 / N) Σ_t [argmax_v p_t(v) = argmax_v q_t(v)]                              in [0, 1]

KL(as-trained ‖ merged) is an expectation under the model as trained, the direction of
`engine.kl_to_base` (there the base is the reference): it grows wherever the merge takes away
probability the trained model gave. kl = 0 and top1 = 1 when the two models agree exactly.

The two models need not share a head (a merged folder stores lm_head in its own dtype), so this is
not `kernels.linear_kl` (one head for both): each model's logits come from its own head. Two passes,
so that only one model is in memory at a time: `reference_hiddens` keeps the reference's final
hidden states at the counted positions, (n_b, H) per batch in fp32 on the CPU, and its head W0 (V, H);
`drift_to` runs the candidate over the same batches and forms both logits ``chunk`` positions at a
time ((chunk, V) fp32 each, never (N, V)), with ``F.kl_div(log q, log p, log_target=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.data.batching import Batch, BatchLoader
from engine.data.render import IGNORE
from engine.data.samples import Sample
from engine.errors import InputError
from engine.losses.causal_lm import hidden_states, shifted_labels

CHUNK_TOKENS = 256


@dataclass(frozen=True)
class Drift:
    """kl: mean KL(as-trained ‖ merged) per counted token (nats); top1: fraction of counted tokens
    whose argmax agrees; tokens / samples: how many were counted."""

    kl: float
    top1: float
    tokens: int
    samples: int

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"drift from the model as trained: mean KL {self.kl:.3g} nats/token, top-1 agreement "
                f"{100 * self.top1:.2f}% ({self.tokens} tokens of {self.samples} samples)")


@dataclass
class Reference:
    """The reference model's counted hidden states per batch ((n_b, H) fp32, CPU) and head (V, H) fp32."""

    batches: list[Batch]
    hiddens: list[torch.Tensor]
    head: torch.Tensor
    samples: int


def drift_batches(samples: list[Sample], batch_size: int, pad_id: int) -> list[Batch]:
    """Padded batches of ``samples`` in their order (as `engine.kl_to_base` reads an eval set)."""
    if not samples:
        raise InputError("drift: no samples to measure on")
    loader = BatchLoader(samples, batch_size, pad_id=pad_id, shuffle=False, batching="padded")
    return [loader.batch(0, i) for i in range(loader.num_batches(0))]


@torch.no_grad()
def counted_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The final hidden states (n, H) fp32 on the CPU at the batch's counted positions."""
    hidden = hidden_states(model, batch)[:, :-1]                      # (B, T-1, H)
    counted = (shifted_labels(batch) != IGNORE)                       # (B, T-1)
    return hidden[counted].float().cpu()


@torch.no_grad()
def reference_hiddens(model: nn.Module, samples: list[Sample], *, batch_size: int, pad_id: int,
                      device: torch.device | str) -> Reference:
    """Pass 1: the reference model (the one as trained) over ``samples``."""
    batches = drift_batches(samples, batch_size, pad_id)
    model.eval()
    hiddens = [counted_hidden(model, b.to(device)) for b in batches]
    if sum(h.shape[0] for h in hiddens) == 0:
        raise InputError("drift: the samples have no counted (trainable) tokens")
    return Reference(batches, hiddens, model.lm_head.weight.detach().float().cpu(), len(samples))


def kl_and_agreement(h0: torch.Tensor, w0: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                     chunk: int = CHUNK_TOKENS) -> tuple[float, int]:
    """(Σ_t KL(p_t ‖ q_t), Σ_t [argmax p_t = argmax q_t]) for p = softmax(h0 W0ᵀ), q = softmax(h Wᵀ);
    h0, h (n, H) and W0, W (V, H), all fp32 on one device."""
    kl, agree = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, h0.shape[0], chunk):
        z0, z = h0[start:start + chunk] @ w0.t(), h[start:start + chunk] @ w.t()      # (c, V) each
        log_p, log_q = F.log_softmax(z0, dim=-1), F.log_softmax(z, dim=-1)
        kl += F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(dtype=torch.float64).cpu()
        agree += int((z0.argmax(-1) == z.argmax(-1)).sum())
    return kl.item(), agree


@torch.no_grad()
def drift_to(reference: Reference, model: nn.Module, device: torch.device | str) -> Drift:
    """Pass 2: the candidate (the merged model) over the reference's batches; the `Drift` between them."""
    model.eval()
    head = model.lm_head.weight.detach().float()
    w0 = reference.head.to(head.device)
    kl_sum, agree, tokens = 0.0, 0, 0
    for batch, h0 in zip(reference.batches, reference.hiddens):
        h = counted_hidden(model, batch.to(device))
        kl, a = kl_and_agreement(h0.to(head.device), w0, h.to(head.device), head)
        kl_sum, agree, tokens = kl_sum + kl, agree + a, tokens + h0.shape[0]
    return Drift(kl=kl_sum / tokens, top1=agree / tokens, tokens=tokens, samples=reference.samples)
