"""Fold adapters into the base: each mergeable adapter module (`engine.adapters.base`) is replaced by
the plain module it computes (LoRA: W' = W + s·B·A; DoRA and IA³ their own folds).

The sum is formed in fp32 and rounded once to the output dtype. An NF4 base (QLoRA) is dequantized
first, so the merged weight is the dequantized NF4 weight plus the update: what the adapter was
trained against, not the original full-precision weight (`MergeReport` says which layers).
Prefix tuning and bottleneck adapters cannot be merged (`NotMergeable`, before anything changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters.base import NotMergeable, adapter_modules
from engine.adapters.targets import replace_module
from models.quantized import QuantizedLinear


@dataclass
class MergeReport:
    merged: list[str]  # modules whose adapter was folded into the weight
    dequantized: list[str]  # NF4 bases turned dense (merged ones onto their dequantized weight)

    def summary(self) -> str:
        text = f"merged the adapter into {len(self.merged)} linear layers"
        if self.dequantized:
            text += (f"; the base was NF4: {len(self.dequantized)} layers were dequantized and the adapter "
                     f"merged onto the dequantized weights (they carry NF4 rounding, not the original weights)")
        return text


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype | None = None) -> MergeReport:
    """Put in place of each adapter module the plain module with its adapter folded in.

    The sum is formed in fp32 and rounded once to ``dtype`` (default: the base's dtype; for an
    NF4 base, the dtype it was quantized from); an NF4 base is dequantized first. Raises
    `NotMergeable` (nothing changed) when an adapter cannot be folded into weights.
    """
    modules = adapter_modules(model)
    if not modules:
        raise ValueError("merge: the model has no adapters")
    for name, m in modules.items():
        if not m.mergeable:
            raise NotMergeable(f"{name}: a {type(m).__name__} adds computation that is not a change of weights; it "
                               "cannot be merged (serve the base with the adapter folder instead)")
    report = MergeReport(merged=[], dequantized=[])
    for name, m in modules.items():
        if isinstance(getattr(m, "base", None), QuantizedLinear):
            report.dequantized.append(name)
        replace_module(model, name, m.merged(dtype))
        report.merged.append(name)
    return report
