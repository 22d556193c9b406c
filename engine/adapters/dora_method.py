"""DoRA as an `engine.adapters.methods.AdapterMethod` (``--peft dora``): LoRA's configuration and
checks (`engine.adapters.lora_method.LoRAMethod`) with DoRA's modules (`engine.adapters.dora`) and
PEFT's ``use_dora`` folder (`engine.adapters.dora_format`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters import dora_format
from engine.adapters.dora import inject_dora
from engine.adapters.lora import LoRAConfig
from engine.adapters.lora_init import initialise_lora
from engine.adapters.lora_method import LoRAMethod
from engine.adapters.methods import register


class DoRAMethod(LoRAMethod):
    name = "dora"

    # config_from_flags (use_dora from --peft dora) and check_fits (the rank) are LoRA's.

    def inject(self, model: nn.Module, config: LoRAConfig) -> list[str]:
        names = inject_dora(model, config)
        # gaussian only (config.validate refuses the others for DoRA): it redraws A with B = 0, so the
        # magnitude ‖W + s·B·A‖ = ‖W‖ computed at construction stays right
        initialise_lora(model, config, names)
        return names

    def claims(self, raw: dict[str, Any]) -> bool:
        return raw.get("peft_type", "LORA") == "LORA" and raw.get("use_dora") is True

    def save(self, model: nn.Module, config: LoRAConfig, out_dir: str | os.PathLike,
             base_model_name_or_path: str | None, metadata: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        return dora_format.save_dora(model, config, out_dir, base_model_name_or_path, metadata, tensors)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dora_format.dora_state_dict(model)

    def read_config(self, adapter_dir: str | os.PathLike) -> LoRAConfig:
        return dora_format.read_dora_config(adapter_dir)

    def load(self, model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
        return dora_format.load_dora(model, adapter_dir)

    def load_weights(self, model: nn.Module, adapter_dir: str | os.PathLike) -> None:
        dora_format.load_dora_weights(model, adapter_dir)


DORA = register(DoRAMethod())
