"""Write a model as a pre-quantized bitsandbytes 4-bit (NF4) checkpoint folder, without bitsandbytes.

The folder is what transformers writes for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` (the format `models.bnb_checkpoint`
reads): every decoder-block linear ``<prefix>`` that QLoRA quantizes (`should_quantize`) holds

    <prefix>.weight                                    (n/2, 1) uint8, two NF4 codes per byte
    <prefix>.weight.absmax                             (n/64,) uint8 codes (double quantization)
    <prefix>.weight.quant_map                          (16,) fp32, the NF4 table
    <prefix>.weight.nested_absmax, .nested_quant_map   (n/64/256,) fp32 and (256,) fp32
    <prefix>.weight.quant_state.bitsandbytes__nf4      uint8 bytes of the JSON quant state

(`models.bnb_checkpoint.to_bnb_state_dict`, byte-compatible with bitsandbytes' ``Linear4bit``), and
every other tensor (embeddings, norms, lm_head, biases) is dense in ``dtype``. ``config.json`` gains
the ``quantization_config`` transformers writes, with ``bnb_4bit_compute_dtype`` = ``dtype``.

A linear that is already an `NF4Linear` keeps its NF4 tensor as it is (no second rounding); a dense
one is quantized here from its weight rounded to ``dtype``: Q = NF4(W.to(dtype)), blocksize 64.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from kernels.nf4 import NF4Tensor, quantize_nf4
from models.bnb_checkpoint import to_bnb_state_dict
from models.loading import expected_tensors, write_weights
from models.quantized import NF4Linear, should_quantize


def bnb_quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict:
    """The ``quantization_config`` of config.json, field for field as transformers' BitsAndBytesConfig."""
    return {"quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True,
            "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "load_in_4bit": True, "load_in_8bit": False}


def nf4_weight(module: nn.Module, dtype: torch.dtype) -> NF4Tensor:
    """The NF4 tensor of one linear: an `NF4Linear`'s own, or NF4 of a dense weight in ``dtype``."""
    if isinstance(module, NF4Linear):
        return module.weight_nf4
    if type(module) is not nn.Linear:
        raise TypeError(f"expected an nn.Linear or NF4Linear, got {type(module).__name__} (merge LoRA first)")
    return quantize_nf4(module.weight.detach().to(dtype).contiguous())


@torch.no_grad()
def bnb_nf4_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of ``model`` in HF order: the QLoRA linears as bnb NF4 key groups,
    the rest dense in ``dtype`` (module docstring)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in expected_tensors(model.config):
        if should_quantize(name):
            prefix = name.removesuffix(".weight")
            out.update(to_bnb_state_dict(nf4_weight(model.get_submodule(prefix), dtype), prefix))
        else:
            out[name] = state[name].detach().to(dtype)
    return out


def save_bnb_nf4_model(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, *,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``config.json`` (with ``quantization_config``) and the 4-bit safetensors (sharded with
    an index when over ``max_shard_bytes``) of ``model`` (plain linears or `NF4Linear`s) at ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = bnb_nf4_state_dict(model, dtype)
    double_quant = any(name.endswith(".weight.nested_absmax") for name in tensors)
    config = {**model.config.to_hf_config(), "torch_dtype": str(dtype).removeprefix("torch."),
              "quantization_config": bnb_quantization_config(dtype, double_quant)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights(tensors, out, max_shard_bytes=max_shard_bytes)
    return out
