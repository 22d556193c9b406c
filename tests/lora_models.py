"""Tiny random Llama models with LoRA injected, for the tests that train a few steps through them."""

from __future__ import annotations

import torch

from engine.adapters import LoRAConfig, adapter_params, inject_lora, set_trainable
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.quantized import quantize_linears


def tiny_lora_model(cfg: LlamaConfig, quant: str = "none", dropout: float = 0.1, targets="all-linear",
                    lora_b_std: float | None = 0.05) -> LlamaForCausalLM:
    """Seeded random weights (NF4 for ``quant="nf4"``), LoRA r=4 alpha=8 on ``targets``, only the
    adapters trainable, in training mode; ``lora_b_std``: B drawn from N(0, std) instead of PEFT's
    zeros, so that A gets gradients too."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if quant == "nf4":
        quantize_linears(model)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=dropout, target_modules=targets))
    set_trainable(model)
    if lora_b_std is not None:
        with torch.no_grad():
            for name, p in adapter_params(model).items():
                if name.endswith("lora_B"):
                    p.normal_(0, lora_b_std)
    return model.train()
