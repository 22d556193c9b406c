"""What every adapter module is, whatever its method: the contract the trainers rely on.

An adapter is explicit module replacement (or attachment): a LoRA/DoRA/IA³ linear owns the frozen
linear it replaced, a bottleneck adapter owns the sublayer it follows, a prefix is attached to an
attention layer. Each such module is an `AdapterModule`, so that one set of helpers serves every
method (`engine.adapters.targets`: `adapter_params`, `set_trainable`, `disable_adapters`;
`engine.adapters.merge.merge`) and no trainer branches on the method:

* ``adapter_parameters()`` -> ``{local name: Parameter}``: what trains (fp32 master copies), what
  the optimizer holds and what a DPO reference snapshot copies; the model-level name of each is
  ``<module name>.<local name>``;
* ``adapter_enabled``: False makes the module compute what the base alone computes (DPO's
  reference policy is the base with every adapter off);
* ``merged(dtype)`` -> the plain module with the adapter folded into its weights, or raises
  `NotMergeable` (prefix tuning, bottleneck adapters: their computation is not a weight change);
* ``unwrapped()`` -> the module the adapter replaced (removing adapters), or None for an
  attached module that is deleted instead.
"""

from __future__ import annotations

import torch
from torch import nn


class NotMergeable(ValueError):
    """The adapter's computation cannot be folded into the base's weights."""


class AdapterModule:
    """Mixin for an ``nn.Module`` that carries a trainable adapter (see the module docstring)."""

    adapter_enabled: bool = True
    mergeable: bool = True

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def merged(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain module with this adapter folded in, the sum formed in fp32 and rounded once to
        ``dtype`` (default: the base's dtype)."""
        raise NotMergeable(f"{type(self).__name__}: this adapter cannot be merged into the base weights")

    def unwrapped(self) -> nn.Module | None:
        raise NotImplementedError


def adapter_modules(model: nn.Module) -> dict[str, AdapterModule]:
    """Every `AdapterModule` of the model by module name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterModule)}
