"""Fold LoRA into the base: W' = W + s·B·A in every adapted linear, and plain linears put back.

The sum is formed in fp32 and rounded once to the output dtype. An NF4 base (QLoRA) is dequantized
first, so the merged weight is the dequantized NF4 weight plus the update: what the adapter was
trained against, not the original full-precision weight (`MergeReport` says which layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters.targets import lora_modules, replace_module
from kernels.nf4 import dequantize_nf4
from models.quantized import NF4Linear


@dataclass
class MergeReport:
    merged: list[str]  # modules whose LoRA update was folded into the weight
    dequantized: list[str]  # NF4 bases turned dense (merged ones onto their dequantized weight)

    def summary(self) -> str:
        text = f"merged LoRA into {len(self.merged)} linear layers"
        if self.dequantized:
            text += (f"; the base was NF4: {len(self.dequantized)} layers were dequantized and the adapter "
                     f"merged onto the dequantized weights (they carry NF4 rounding, not the original weights)")
        return text


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype | None = None) -> MergeReport:
    """Fold W' = W + s B A into each base and put a plain ``nn.Linear`` back in place of the LoRALinear.

    The sum is formed in fp32 and rounded once to ``dtype`` (default: the base's dtype; for an
    NF4 base, the dtype it was quantized from); an NF4 base is dequantized first.
    """
    report = MergeReport(merged=[], dequantized=[])
    for name, m in lora_modules(model).items():
        base = m.base
        if isinstance(base, NF4Linear):
            q = base.weight_nf4
            weight, out_dtype = dequantize_nf4(q, dtype=torch.float32), q.dtype
            report.dequantized.append(name)
        else:
            weight, out_dtype = base.weight.float(), base.weight.dtype
        merged = (weight + m.delta_weight().to(weight.device)).to(dtype or out_dtype)
        linear = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype or base.bias.dtype), requires_grad=False)
        replace_module(model, name, linear)
        report.merged.append(name)
    if not report.merged:
        raise ValueError("merge: the model has no LoRA adapters")
    return report
