"""Several adapters over one base loaded once: held in memory, checked, switched in and out.

`read_adapter` keeps an adapter's config and weights in memory; `check_adapter_fits` checks them
against a model's shapes before any is applied (a meta-device model will do) and records the
adapter's layout (adapted modules, ranks and scales). `AdapterSwitcher.activate` applies one at a
time: when the next adapter has the same layout as the active one, its weights are copied into the
existing LoRA modules; otherwise the plain base linears are put back and the new layout is
injected. ``activate(None)`` puts the plain base back.

LoRA adapters are held in memory (weights read once). An adapter of another method (DoRA, IA³,
prefix, bottleneck: `engine.adapters.methods`) is checked the same way, on a meta-device copy of the
model, and loaded from its folder each time it is activated (its ``weights`` are None).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters.lora import lora_scale
from engine.adapters.methods import folder_method, method_of
from engine.adapters.peft_format import (
    adapter_targets,
    assign_adapter_weights,
    read_adapter_config,
    read_adapter_weights,
    read_head_weight,
)
from engine.adapters.targets import inject_lora, remove_adapters
from engine.errors import InputError
from models.skeleton import meta_model


@dataclass
class Adapter:
    """One adapter: its config (its method's), for LoRA its fp32 weights per module (None for the
    other methods: read from the folder when activated), and its module layout."""

    name: str
    path: Path
    config: Any
    weights: dict[str, dict[str, torch.Tensor]] | None
    layout: dict[str, tuple[int, float]] = field(default_factory=dict)  # module -> (r, scale)

    @property
    def is_lora(self) -> bool:
        return self.weights is not None

    def require_lora(self, purpose: str) -> None:
        """InputError unless this is a plain LoRA adapter (``purpose``: what needs one)."""
        if not self.is_lora:
            raise InputError(f"adapter {self.name!r} ({self.path}): a {self.config.method} adapter; {purpose} "
                             "takes LoRA adapters only")


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Config and weights of an adapter folder (InputError when missing or malformed)."""
    path = Path(path)
    method = folder_method(path)
    if method.name != "lora":
        return Adapter(name or str(path), path, method.read_config(path), None)
    config = read_adapter_config(path)
    read_head_weight(path, config)  # a reward head must agree with the config (the caller decides on it)
    weights = {module: {k: t.to(torch.float32) for k, t in pair.items()}
               for module, pair in read_adapter_weights(path).items()}
    return Adapter(name or str(path), path, config, weights)


def check_adapter_fits(model: nn.Module, adapter: Adapter) -> None:
    """Check the adapter's targets and every A/B shape against a model *without* LoRA (a meta-device
    model will do, nothing is computed), and record its layout. Raises InputError naming the file.
    Another method's adapter is loaded onto a meta-device copy of the model (every check it makes)."""
    if not adapter.is_lora:
        method_of(adapter.config).load(meta_model(model.config), adapter.path)
        adapter.layout = {adapter.config.method: (0, 0.0)}
        return
    targets = adapter_targets(model, adapter.path, adapter.config, adapter.weights)
    cfg = adapter.config
    adapter.layout = {name: (cfg.rank_for(name), lora_scale(cfg.rank_for(name), cfg.alpha_for(name), cfg.use_rslora))
                      for name in targets}


class AdapterSwitcher:
    """Applies one in-memory `Adapter` (or none) at a time to a model loaded once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: Adapter | None = None

    @torch.no_grad()
    def activate(self, adapter: Adapter | None) -> None:
        """Make ``adapter`` the active one (None: the plain base). Its layout must have been
        recorded by `check_adapter_fits`."""
        if adapter is None:
            remove_adapters(self.model)
            self.active = None
            return
        if not adapter.layout:
            raise ValueError(f"adapter {adapter.name!r}: call check_adapter_fits before activating it")
        if not adapter.is_lora:
            remove_adapters(self.model)
            method_of(adapter.config).load(self.model, adapter.path)
        else:
            if self.active is None or not self.active.is_lora or self.active.layout != adapter.layout:
                remove_adapters(self.model)
                inject_lora(self.model, adapter.config)
            # With the same layout the existing LoRA modules only need the new weights.
            assign_adapter_weights(self.model, adapter.weights)
        self.model.eval()  # no dropout
        self.active = adapter


def base_then_adapters(model: nn.Module, adapters: list[Adapter], base_name: str = "base") -> Iterator[str]:
    """The plain base, then each adapter in turn, active in ``model`` (every one checked against it
    first); yields the name of what is active, and puts the plain base back at the end."""
    remove_adapters(model)
    for adapter in adapters:
        check_adapter_fits(model, adapter)
    switcher = AdapterSwitcher(model)
    for adapter in [None, *adapters]:
        switcher.activate(adapter)
        yield base_name if adapter is None else adapter.name
    switcher.activate(None)
