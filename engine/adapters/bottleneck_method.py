"""Bottleneck adapters as an `engine.adapters.methods.AdapterMethod` (``--peft bottleneck``): the
flags' configuration (``--adapter-dim``, ``--adapter-placement``, ``--lora-dropout`` as the dropout
on the adapter's input), injection (`engine.adapters.bottleneck`) and our own folder format
(`engine.adapters.bottleneck_format`; HF PEFT has none). Not mergeable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters import bottleneck_format as fmt
from engine.adapters.bottleneck import BottleneckConfig, inject_bottleneck
from engine.adapters.methods import AdapterMethod, register


class BottleneckMethod(AdapterMethod):
    name = "bottleneck"
    mergeable = False

    def config_from_flags(self, flags: Any) -> BottleneckConfig:
        return BottleneckConfig(adapter_dim=flags.adapter_dim, placement=flags.adapter_placement,
                                dropout=flags.lora_dropout or 0.0)

    def inject(self, model: nn.Module, config: BottleneckConfig) -> list[str]:
        return inject_bottleneck(model, config)

    def claims(self, raw: dict[str, Any]) -> bool:
        return raw.get("peft_type") == fmt.PEFT_TYPE

    def save(self, model: nn.Module, config: BottleneckConfig, out_dir: str | os.PathLike,
             base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        return fmt.save_bottleneck(model, config, out_dir, base_model_name_or_path, metadata, tensors)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return fmt.bottleneck_state_dict(model)

    def read_config(self, adapter_dir: str | os.PathLike) -> BottleneckConfig:
        return fmt.read_bottleneck_config(adapter_dir)[0]

    def load(self, model: nn.Module, adapter_dir: str | os.PathLike) -> BottleneckConfig:
        return fmt.load_bottleneck(model, adapter_dir)

    def load_weights(self, model: nn.Module, adapter_dir: str | os.PathLike) -> None:
        fmt.load_bottleneck_weights(model, adapter_dir)


BOTTLENECK = register(BottleneckMethod())
