"""A LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli -m base.gguf --lora adapter.gguf``).

The layout of llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted linear ``W`` (GGUF name
``blk.N.attn_q.weight``) two tensors ``blk.N.attn_q.weight.lora_a`` = A (r, in) and ``.lora_b`` =
B (out, r), i.e. GGUF shapes ``[in, r]`` and ``[r, out]``. llama.cpp permutes the rows of q/k
(`models.gguf_map.permute_qk`); since ΔW = s·B·A, permuting ΔW's rows is permuting B's rows, so
B of q_proj/k_proj is permuted and A is not.

llama.cpp computes ``W x + (alpha / r) · B (A x)`` with one alpha for the file and each tensor's
own rank r. An adapter whose scale s is not ``alpha / r`` everywhere (rsLoRA's alpha/√r, an
``alpha_pattern``) keeps the file's alpha and has B multiplied by ``s / (alpha / r)`` in those
modules, so that llama.cpp applies the same update; `LoraGGUF.rescaled` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.adapters.lora import LoRAConfig, lora_scale
from engine.errors import InputError
from models.config import LlamaConfig
from models.gguf_map import gguf_tensor_name, permute_qk


@dataclass
class LoraGGUF:
    """The tensors (GGUF name -> HF-layout fp32 tensor, q/k already permuted) and alpha of the file."""

    alpha: float
    tensors: dict[str, torch.Tensor]
    rescaled: dict[str, float] = field(default_factory=dict)  # module -> factor B was multiplied by

    def summary(self) -> str:
        text = f"LoRA GGUF: {len(self.tensors) // 2} adapted linears, alpha {self.alpha:g}"
        if self.rescaled:
            factors = sorted({round(f, 6) for f in self.rescaled.values()})
            text += (f"; llama.cpp applies alpha/r with one alpha, so B of {len(self.rescaled)} modules was scaled "
                     f"by {', '.join(f'{f:g}' for f in factors)} to keep each module's own scale")
        return text


@torch.no_grad()
def lora_gguf(weights: dict[str, dict[str, torch.Tensor]], cfg: LoRAConfig, model_cfg: LlamaConfig) -> LoraGGUF:
    """The llama.cpp LoRA tensors of an adapter (``weights``: `read_adapter_weights`, checked against
    the model by `adapter_targets`; ``cfg``: its config). See the module docstring."""
    alpha = float(cfg.alpha)
    out = LoraGGUF(alpha, {})
    for name, pair in sorted(weights.items()):
        base = gguf_tensor_name(f"{name}.weight")
        a, b = pair["lora_A"].float().clone(), pair["lora_B"].float().clone()
        r = a.shape[0]
        factor = lora_scale(r, cfg.alpha_for(name), cfg.use_rslora) / (alpha / r)
        if abs(factor - 1.0) > 1e-12:
            b *= factor
            out.rescaled[name] = factor
        if name.endswith("self_attn.q_proj"):
            b = permute_qk(b, model_cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj"):
            b = permute_qk(b, model_cfg.num_key_value_heads)
        out.tensors[f"{base}.lora_a"] = a.contiguous()  # (r, in): GGUF [in, r]
        out.tensors[f"{base}.lora_b"] = b.contiguous()  # (out, r): GGUF [r, out]
    if not out.tensors:
        raise InputError("the adapter has no LoRA tensors to export")
    return out


def add_lora_metadata(writer, lora: LoraGGUF) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)

