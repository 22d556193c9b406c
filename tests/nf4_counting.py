"""Counting NF4 dequantizations per weight: the tests that hold a step to ≤ 2 per weight use this."""

from __future__ import annotations

from collections import Counter

import torch

import kernels.lora
import kernels.lora_group
import kernels.nf4_linear


def counting_dequantizations(monkeypatch) -> Counter:
    """Count `dequantize_nf4` calls of the LoRA, grouped-LoRA and NF4-linear ops (every op that
    dequantizes a base weight), per NF4 weight (its packed buffer), for the rest of the test."""
    calls: Counter = Counter()
    for module in (kernels.lora, kernels.lora_group, kernels.nf4_linear):
        def counted(q, dtype=torch.bfloat16, *, out=None, _real=module.dequantize_nf4):
            calls[q.packed.data_ptr()] += 1
            return _real(q, dtype, out=out)
        monkeypatch.setattr(module, "dequantize_nf4", counted)
    return calls
