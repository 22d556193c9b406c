"""LoRA as an `engine.adapters.methods.AdapterMethod`: the flags' configuration, injection (with
its ``--lora-init``: `engine.adapters.lora_init`) and PEFT's folder (`engine.adapters.peft_format`).

A PiSSA/OLoRA adapter, whose init changed the base, is saved as the plain rank-2r LoRA on the
original base that it amounts to (`engine.adapters.lora_init`); resuming such a run (its model
re-initialised by the same init) takes the trained A, B back out of that folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters import peft_format
from engine.adapters.lora import ALL_LINEAR, LoRAConfig
from engine.adapters.lora_init import converted_config, converted_pair, initial_factors, initialise_lora, split_converted
from engine.adapters.methods import AdapterMethod, register
from engine.adapters.targets import find_targets, inject_lora, lora_modules
from engine.errors import InputError


def lora_config_from_flags(flags: Any) -> LoRAConfig:
    """LoRA's configuration from a `engine.config.TrainConfig` (``--lora-*``, ``--target-modules``)."""
    targets = ALL_LINEAR if flags.target_modules == ALL_LINEAR else tuple(
        t.strip() for t in flags.target_modules.split(",") if t.strip())
    return LoRAConfig(r=flags.lora_r, alpha=flags.lora_alpha, dropout=flags.lora_dropout, target_modules=targets,
                      use_rslora=flags.rslora, use_dora=flags.peft == "dora", init=flags.lora_init)


def check_rank_fits(skeleton: nn.Module, config: LoRAConfig) -> None:
    """The rank is at most the smallest dimension of each targeted linear (a larger one would only
    allocate parameters that add no capacity)."""
    for name in find_targets(skeleton, config):
        linear = skeleton.get_submodule(name)
        smallest = min(linear.in_features, linear.out_features)
        if config.rank_for(name) > smallest:
            raise InputError(f"--lora-r {config.rank_for(name)}: more than the smallest dimension ({smallest}) of "
                             f"the targeted linear {name} ({linear.out_features}x{linear.in_features}); use at "
                             f"most {smallest}")


class LoRAMethod(AdapterMethod):
    name = "lora"

    def config_from_flags(self, flags: Any) -> LoRAConfig:
        return lora_config_from_flags(flags)

    def check_fits(self, skeleton: nn.Module, config: LoRAConfig) -> None:
        check_rank_fits(skeleton, config)

    def inject(self, model: nn.Module, config: LoRAConfig) -> list[str]:
        names = inject_lora(model, config)
        initialise_lora(model, config, names)
        return names

    def claims(self, raw: dict[str, Any]) -> bool:
        return raw.get("peft_type", "LORA") == "LORA" and not raw.get("use_dora")

    def save(self, model: nn.Module, config: LoRAConfig, out_dir: str | os.PathLike,
             base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        if _converted_modules(model):  # PiSSA/OLoRA: the rank-2r plain LoRA on the original base
            config = converted_config(config)
        tensors = self.state_dict(model) if tensors is None else tensors
        return peft_format.save_lora(model, config, out_dir, base_model_name_or_path, metadata, tensors)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = peft_format.lora_state_dict(model)
        for name, module in _converted_modules(model).items():
            a, b = (f"{peft_format.PREFIX}{name}.{which}.weight" for which in ("lora_A", "lora_B"))
            tensors[a], tensors[b] = converted_pair(module, tensors[a], tensors[b])
        return tensors

    def read_config(self, adapter_dir: str | os.PathLike) -> LoRAConfig:
        return peft_format.read_adapter_config(adapter_dir)

    def load(self, model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
        return peft_format.load_lora(model, adapter_dir)

    def load_weights(self, model: nn.Module, adapter_dir: str | os.PathLike) -> None:
        converted = _converted_modules(model)
        if not converted:
            peft_format.load_lora_weights(model, adapter_dir)
            return
        weights = peft_format.read_adapter_weights(adapter_dir)
        where = str(Path(adapter_dir) / peft_format.WEIGHTS_NAME)
        for name, module in converted.items():
            if name in weights:  # a missing module is reported by load_lora_weights
                pair = weights[name]
                pair["lora_A"], pair["lora_B"] = split_converted(name, module, pair["lora_A"], pair["lora_B"], where)
        peft_format.load_lora_weights(model, adapter_dir, weights=weights)


def _converted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA modules that keep an initial A₀, B₀ (PiSSA, OLoRA), by name."""
    return {name: m for name, m in lora_modules(model).items() if initial_factors(m) is not None}


LORA = register(LoRAMethod())
