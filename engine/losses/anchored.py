"""SFT's loss with the two mitigations of forgetting: replay tokens and the KL anchor to the base.

For one micro-batch whose next-token labels y_t (t trainable) are either the training data's or a
replay sample's (`engine.data.replay.Mixed.replay_labels`), with π the policy (adapters on) and
π₀ the base (every adapter off: `engine.adapters.disable_adapters`, the same weights)::

    train  = Σ_{t ∈ training}  −log π(y_t | y_<t)
    replay = Σ_{t ∈ replay}    −log π(y_t | y_<t)
    kl     = Σ_t KL(π₀(·|y_<t) ‖ π(·|y_<t))          over every trainable t (0 when β = 0)

and the step minimises (train + replay + β · kl) / N, N the trainable tokens of the whole window
(all ranks): the mean loss per token, plus β times the mean KL per token (``--kl-to-base β``).
The KL runs through `kernels.linear_kl` (no (N, V) logits on a GPU); its gradient reaches the
policy's hidden states only: the base pass runs under no_grad. The base forward draws no random
numbers (LoRA dropout lives in the adapter path, switched off), so β changes nothing else.

With no replay label in the batch, the training sum goes through the fused head's ``sum``
reduction; with some, through ``none`` (the per-token losses, split by the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapters import disable_adapters
from engine.data.render import IGNORE
from engine.data.replay import Mixed
from engine.losses.causal_lm import hidden_states, shifted_labels
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.linear_kl import linear_kl


@dataclass
class AnchoredSums:
    """The three sums of one micro-batch, 0-d fp32 tensors (``train`` and ``kl`` differentiable)."""

    train: torch.Tensor
    replay: torch.Tensor
    kl: torch.Tensor

    def objective(self, beta: float) -> torch.Tensor:
        """train + replay + β · kl (still to be divided by the window's N)."""
        total = self.train + self.replay
        return total + beta * self.kl if beta else total


def anchored_sums(model: torch.nn.Module, mixed: Mixed, beta: float) -> AnchoredSums:
    """`AnchoredSums` of one micro-batch already on the model's device (``mixed.replay_labels`` may
    stay on the host; it is moved here)."""
    batch = mixed.batch
    if beta:
        with torch.no_grad(), disable_adapters(model):
            base = hidden_states(model, batch)
    hidden = hidden_states(model, batch)  # after the base pass: under FSDP2 the head is whole after a forward
    width = hidden.shape[-1]
    flat = hidden[:, :-1].reshape(-1, width)  # (B*(T-1), H)
    labels = shifted_labels(batch).reshape(-1)
    head = model.lm_head.weight
    if mixed.replay_samples:
        per_token = linear_cross_entropy(flat, head, labels, reduction="none", labels_checked=True)  # 0 where ignored
        is_replay = mixed.replay_labels.reshape(-1).to(per_token.device, non_blocking=True)
        train, replay = per_token.masked_fill(is_replay, 0.0).sum(), per_token.masked_fill(~is_replay, 0.0).sum()
    else:
        train = linear_cross_entropy(flat, head, labels, reduction="sum", labels_checked=True)
        replay = torch.zeros((), dtype=torch.float32, device=train.device)
    if beta:
        kl = linear_kl(flat, base[:, :-1].reshape(-1, width), head, labels != IGNORE, reduction="sum")
    else:
        kl = torch.zeros((), dtype=torch.float32, device=train.device)
    return AnchoredSums(train, replay, kl)
