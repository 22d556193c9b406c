"""The model a run trains: the frozen base (dense or NF4) with a LoRA adapter that is the only
trainable part, a fresh one from the flags or the one given with ``--init-adapter``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.adapters import (
    LoRAConfig,
    inject_lora,
    load_adapter,
    lora_modules,
    read_adapter_metadata,
    set_trainable,
)
from engine.config import TrainConfig
from models import load_model


@dataclass
class TrainableModel:
    """The model, its adapter's configuration, the starting adapter's lineage (None for a fresh
    adapter) and the number of trainable parameters."""

    model: nn.Module
    lora_cfg: LoRAConfig
    parent_lineage: dict | None
    trainable_parameters: int


def lora_config_from_flags(cfg: TrainConfig) -> LoRAConfig:
    targets = "all-linear" if cfg.target_modules == "all-linear" else tuple(
        t.strip() for t in cfg.target_modules.split(",") if t.strip())
    return LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                      use_rslora=cfg.rslora)


def build_model(cfg: TrainConfig, model_dir: Path, device: torch.device, dtype: torch.dtype) -> TrainableModel:
    """Load the base (quantized to NF4 with ``--quant nf4``), attach the adapter, freeze the rest.

    The global RNG is seeded first: it draws LoRA A's initialisation and, later, dropout.
    ``--init-adapter`` brings its own r, alpha and targets; dropout is a training choice and
    comes from the flags either way. Gradient checkpointing defaults to on for a GPU.
    """
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, dtype=dtype, device=device, quantize=None if cfg.quant == "none" else cfg.quant)
    if cfg.init_adapter:
        lora_cfg = load_adapter(model, cfg.init_adapter)
        lora_cfg.dropout = cfg.lora_dropout
        for module in lora_modules(model).values():
            module.dropout = cfg.lora_dropout
        parent = read_adapter_metadata(cfg.init_adapter)
    else:
        lora_cfg, parent = lora_config_from_flags(cfg), None
        inject_lora(model, lora_cfg)
    trainable = set_trainable(model)
    model.gradient_checkpointing = (cfg.grad_checkpointing if cfg.grad_checkpointing is not None
                                    else device.type == "cuda")
    return TrainableModel(model, lora_cfg, parent, trainable)
