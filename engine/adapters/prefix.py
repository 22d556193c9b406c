"""Prefix tuning (Li & Liang 2021) as HF PEFT 0.21 has it (``PrefixTuningConfig``, peft_type
"PREFIX_TUNING"): learned keys and values of P = ``num_virtual_tokens`` positions in every layer,
which every query attends besides its own causal keys.

`PrefixEncoder` is PEFT's ``PrefixEncoder`` for a decoder-only model, attached to the model as
``model.model.prefix_encoder`` (the slot `models.llama.LlamaModel` calls; nothing is replaced).
With token_dim = nkv · hd (PEFT sizes the prefix by the key/value heads of a GQA model:
``num_attention_heads`` = nkv in its config), L layers:

* plain: ``embedding`` (P, L·2·token_dim) is the prefix itself;
* ``prefix_projection``: ``embedding`` (P, token_dim) → ``transform`` = Linear(token_dim, E) → tanh →
  Linear(E, L·2·token_dim), E = ``encoder_hidden_size`` (PEFT's default: token_dim).

Either way the flat prefix X (P, L·2·token_dim) is cut as PEFT's ``get_prompt`` cuts it:
X.view(P, 2L, nkv, hd).permute(1, 2, 0, 3) → (2L, nkv, P, hd), layer l's keys at index 2l and its
values at 2l + 1, each handed over as (1, nkv, P, hd) (the same for every row; no RoPE is applied
to them, as in PEFT, whose prefix enters transformers as an already built cache). Initialisation is
PEFT's (``init_weights`` None): ``nn.Embedding``'s N(0, 1), ``nn.Linear``'s default, created in
PEFT's order, so the same seed gives PEFT's weights. The parameters are fp32 (the master copies
that train); the prefix is cast to the model's dtype in attention, as PEFT casts it to the base's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from engine.adapters.base import AdapterModule
from engine.errors import InputError

SLOT = "prefix_encoder"  # the attribute of models.llama.LlamaModel that prefix tuning fills


@dataclass
class PrefixConfig:
    """``--peft prefix``: P = ``num_virtual_tokens`` prefix positions per layer, trained directly or
    (``prefix_projection``) through a two-layer MLP of width ``encoder_hidden_size`` (None:
    token_dim = nkv · hd, PEFT's default)."""

    num_virtual_tokens: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    method: ClassVar[str] = "prefix"
    dropout: ClassVar[float] = 0.0  # the method has no dropout

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens < 1:
            raise InputError(f"num_virtual_tokens={self.num_virtual_tokens!r}: expected a whole number >= 1")
        if self.encoder_hidden_size is not None and (
                isinstance(self.encoder_hidden_size, bool) or not isinstance(self.encoder_hidden_size, int)
                or self.encoder_hidden_size < 1):
            raise InputError(f"encoder_hidden_size={self.encoder_hidden_size!r}: expected a whole number >= 1")


@dataclass(frozen=True)
class PrefixShape:
    """What the prefix must fit: L layers of nkv key/value heads of hd dims."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def flat_dim(self) -> int:
        """L · 2 · token_dim: one row of the flat prefix (PEFT's ``prompt_embeddings``)."""
        return self.num_layers * 2 * self.token_dim

    @classmethod
    def of(cls, model: nn.Module) -> PrefixShape:
        cfg = model.config
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)


class PrefixEncoder(nn.Module, AdapterModule):
    """PEFT's PrefixEncoder: ``forward()`` → per layer (pk, pv), each (1, nkv, P, hd), or None when
    the adapter is off (the base alone)."""

    mergeable = False

    def __init__(self, shape: PrefixShape, cfg: PrefixConfig, device: torch.device | str | None = None):
        super().__init__()
        self.shape, self.num_virtual_tokens = shape, cfg.num_virtual_tokens
        self.prefix_projection = cfg.prefix_projection
        P, D = cfg.num_virtual_tokens, shape.token_dim
        kw = {"device": device, "dtype": torch.float32}
        if cfg.prefix_projection:
            E = cfg.encoder_hidden_size or D
            self.embedding = nn.Embedding(P, D, **kw)
            self.transform = nn.Sequential(nn.Linear(D, E, **kw), nn.Tanh(), nn.Linear(E, shape.flat_dim, **kw))
        else:
            self.embedding = nn.Embedding(P, shape.flat_dim, **kw)

    @property
    def encoder_hidden_size(self) -> int | None:
        return self.transform[0].out_features if self.prefix_projection else None

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def unwrapped(self) -> None:
        return None  # attached, not a replacement: removing the adapter deletes it

    def flat(self) -> torch.Tensor:
        """The flat prefix X (P, L·2·token_dim): PEFT's ``prompt_embeddings``."""
        x = self.embedding.weight  # embedding(arange(P)) is the whole table, in order
        return self.transform(x) if self.prefix_projection else x

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self.adapter_enabled:
            return None
        s = self.shape
        kv = self.flat().view(1, self.num_virtual_tokens, 2 * s.num_layers, s.num_kv_heads, s.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2L, 1, nkv, P, hd), as PEFT's get_prompt
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(s.num_layers)]


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    """The model's attached `PrefixEncoder`, if any (``model.model.prefix_encoder``)."""
    encoder = getattr(model.model, SLOT, None)
    return encoder if isinstance(encoder, PrefixEncoder) else None


def inject_prefix(model: nn.Module, cfg: PrefixConfig) -> list[str]:
    """Attach a fresh `PrefixEncoder` (the global torch RNG draws its initialisation) on the device
    of the model's embedding; return its name."""
    if getattr(model.model, SLOT, None) is not None:
        raise InputError("the model already has a prefix encoder; load or inject only once")
    device = model.model.embed_tokens.weight.device
    encoder = PrefixEncoder(PrefixShape.of(model), cfg, device=device).train(model.training)
    setattr(model.model, SLOT, encoder)
    return [f"model.{SLOT}"]
