"""DoRA adapters in PEFT 0.21's folder format, both ways (LoRA's format, `engine.adapters.peft_format`,
plus the magnitude):

* ``adapter_config.json``: LoRA's fields with ``"use_dora": true``;
* ``adapter_model.safetensors``: LoRA's ``base_model.model.<module>.lora_{A,B}.weight`` and DoRA's
  magnitude (out,) fp32 under ``base_model.model.<module>.lora_magnitude_vector`` (the key PEFT
  0.21 writes: it strips the ``.weight`` of its ``DoraLinearLayer`` when saving); we also read
  ``.lora_magnitude_vector.weight`` and ``.lora_magnitude_vector.default.weight``.

The LoRA-only tools (multi-adapter serving, combine, GGUF export) read folders with
`peft_format.read_adapter_config` without its ``dora`` switch, so they keep refusing DoRA folders
("use_dora=True is not supported").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapters import peft_format
from engine.adapters.dora import dora_modules, inject_dora
from engine.adapters.lora import LoRAConfig
from engine.adapters.peft_format import WEIGHTS_NAME
from engine.adapters.score_head import ScoreHead, attach_score_head, score_head
from engine.dtensors import copy_full_into, full_tensor
from engine.errors import InputError

MAGNITUDE = "lora_magnitude_vector"
_PREFIX = "base_model.model."


def dora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA's PEFT-keyed tensors (`peft_format.lora_state_dict`) and each module's magnitude under
    ``base_model.model.<module>.lora_magnitude_vector`` (whole, fp32, on the CPU)."""
    tensors = peft_format.lora_state_dict(model)
    for name, m in dora_modules(model).items():
        tensors[f"{_PREFIX}{name}.{MAGNITUDE}"] = full_tensor(m.lora_magnitude_vector.detach()).to("cpu").clone()
    return tensors


def save_dora(model: nn.Module, cfg: LoRAConfig, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
              metadata: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's DoRA adapter as a PEFT folder at ``out_dir``, atomically."""
    if not dora_modules(model):
        raise ValueError("save_dora: the model has no DoRA adapters")
    config = {**peft_format.peft_config_dict(model, cfg, base_model_name_or_path), "use_dora": True}
    return peft_format.write_adapter_folder(out_dir, config, dora_state_dict(model) if tensors is None else tensors,
                                            metadata)


def read_dora_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    return peft_format.read_adapter_config(adapter_dir, dora=True)


def _check_magnitudes(path: Path, model: nn.Module, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Each magnitude is (out,) for its module's base."""
    for name, tensors in weights.items():
        got, out = tuple(tensors[MAGNITUDE].shape), model.get_submodule(name).out_features
        if got != (out,):
            raise InputError(f"{path}: {_PREFIX}{name}.{MAGNITUDE} has shape {got}, expected ({out},) (one per output "
                             f"feature of the base)")


@torch.no_grad()
def _assign(model: nn.Module, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    modules = dora_modules(model)
    peft_format.assign_adapter_weights(model, weights)
    for name, tensors in weights.items():
        copy_full_into(modules[name].lora_magnitude_vector, tensors[MAGNITUDE])


def load_dora(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Inject DoRA into ``model`` per the folder's config and load A, B and the magnitudes (and a
    reward model's head), everything checked before the model is touched. Returns the config."""
    cfg = read_dora_config(adapter_dir)
    weights = peft_format.read_adapter_weights(adapter_dir, dora=True)
    head = peft_format.read_head_weight(adapter_dir, cfg)
    peft_format.adapter_targets(model, adapter_dir, cfg, weights)
    _check_magnitudes(Path(adapter_dir) / WEIGHTS_NAME, model, weights)
    peft_format.check_head_fits(adapter_dir, head, model.config.hidden_size)
    inject_dora(model, cfg)
    _assign(model, weights)
    if head is not None:
        attach_score_head(model, ScoreHead(head).to(model.model.embed_tokens.weight.device))
    return cfg


def load_dora_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy a saved DoRA adapter's tensors into a model that already has the same DoRA layers (resume)."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    weights = peft_format.read_adapter_weights(adapter_dir, dora=True)
    head_weight = peft_format.read_head_weight(adapter_dir, read_dora_config(adapter_dir))
    head = score_head(model)
    if (head is None) != (head_weight is None) or (head is not None and head.weight.shape != head_weight.shape):
        raise InputError(f"{path}: its reward head ({peft_format.HEAD_KEY}) does not match the model's")
    modules = dora_modules(model)
    if set(weights) != set(modules):
        diff = sorted(set(weights) ^ set(modules))
        raise InputError(f"{path}: its DoRA modules differ from the model's (e.g. {diff[0]!r})")
    for name, m in modules.items():
        for which, param in m.adapter_parameters().items():
            got = tuple(weights[name][which].shape)
            if got != tuple(param.shape):
                raise InputError(f"{path}: {name}.{which} has shape {got}, expected {tuple(param.shape)}")
    _assign(model, weights)
    if head is not None:
        copy_full_into(head.weight, head_weight)
