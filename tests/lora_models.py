"""Tiny random Llama models with LoRA injected, for the tests that train a few steps through them."""

from __future__ import annotations

import torch

from engine.adapters import LoRAConfig, adapter_params, inject_lora, set_trainable
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.quantized import quantize_linears


def randomize_lora_b(model: torch.nn.Module, std: float) -> None:
    """Draw every LoRA B from N(0, std) instead of PEFT's zeros: the adapter changes the outputs and
    A gets gradients too."""
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, std)


def loaded_lora_model(model_dir, std: float = 0.2, dropout: float = 0.0) -> torch.nn.Module:
    """The model of ``model_dir`` (fp32) with LoRA r=4 alpha=8 on every linear, B random (seed 0)."""
    from models import load_model

    torch.manual_seed(0)
    model = load_model(model_dir)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    set_trainable(model)
    randomize_lora_b(model, std)
    return model


def tiny_lora_model(cfg: LlamaConfig, quant: str = "none", dropout: float = 0.1, targets="all-linear",
                    lora_b_std: float | None = 0.05) -> LlamaForCausalLM:
    """Seeded random weights (decoder linears in ``quant``: "nf4", "int8" or "fp8"; "none": dense),
    LoRA r=4 alpha=8 on ``targets``, only the adapters trainable, in training mode; ``lora_b_std``:
    B drawn from N(0, std) instead of PEFT's zeros, so that A gets gradients too."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if quant != "none":
        quantize_linears(model, fmt=quant)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=dropout, target_modules=targets))
    set_trainable(model)
    if lora_b_std is not None:
        randomize_lora_b(model, lora_b_std)
    return model.train()
