"""A reward model's scalar head: ``score``, one linear map from the final hidden state to a number.

    r(x) = h_last(x) · wᵀ,        w: (1, H), no bias

where h_last is the final-norm hidden state of the sequence's last token (the pooling lives with
the loss: `engine.losses.reward`). This is transformers' ``LlamaForSequenceClassification`` head
with ``num_labels=1`` (``score = nn.Linear(H, 1, bias=False)``), attached to our causal LM as
``model.score`` so that its name in a PEFT folder is PEFT's: ``modules_to_save: ["score"]``, saved as
``base_model.model.score.weight`` (`engine.adapters.peft_format`).

Why here, in `engine.adapters`, and not in `models/`: the head is trained and saved with the LoRA
weights, as part of the adapter folder (PEFT's ``modules_to_save``), never as part of a base
checkpoint; `models.llama` stays the plain HF architecture and knows nothing of it. It is not an
``nn.Linear`` on purpose: LoRA's ``all-linear`` targets must never pick it up.

The weight is an fp32 master (as LoRA's A and B); the product runs in the hidden states' dtype,
as HF's head does in the model's dtype, and the scores come out in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCORE = "score"                  # the head's module name, in our model and in PEFT's files
HF_INITIALIZER_RANGE = 0.02      # transformers' LlamaConfig default, when config.json names none


class ScoreHead(nn.Module):
    """``score``: (…, H) hidden states → (…,) fp32 scores; ``weight`` (1, H) fp32."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != 1:
            raise ValueError(f"ScoreHead: weight must be (1, hidden), got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # read the weight here, at the call: under FSDP2 it is the root's gathered parameter after
        # the model's forward, as for the LM head
        return F.linear(hidden, self.weight.to(hidden.dtype)).squeeze(-1).float()


def new_score_head(hidden_size: int, seed: int, std: float = HF_INITIALIZER_RANGE,
                   device: torch.device | str = "cpu") -> ScoreHead:
    """A fresh head initialised as transformers does, w ~ N(0, std²) (``initializer_range``),
    drawn on the CPU from a generator of its own seeded by ``seed``: the same weights on any
    device and rank, and the global RNG (LoRA A's initialisation, dropout) is left untouched."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.empty(1, hidden_size, dtype=torch.float32).normal_(0.0, std, generator=generator)
    return ScoreHead(weight).to(device)


def initializer_range(model_dir: str | Path) -> float:
    """``initializer_range`` of the model's config.json (HF's default 0.02 when absent)."""
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text()).get("initializer_range")
    except (OSError, ValueError):
        value = None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        else HF_INITIALIZER_RANGE


def score_head(model: nn.Module) -> ScoreHead | None:
    """The model's ``score`` head, or None (a plain causal LM)."""
    head = getattr(model, SCORE, None)
    return head if isinstance(head, ScoreHead) else None


def attach_score_head(model: nn.Module, head: ScoreHead) -> ScoreHead:
    """Register ``head`` as ``model.score`` (a submodule: its weight is then ``score.weight``)."""
    if hasattr(model, SCORE):
        raise ValueError(f"the model already has a {SCORE!r} attribute")
    model.add_module(SCORE, head)
    return head
