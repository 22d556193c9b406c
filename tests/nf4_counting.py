"""Counting NF4 dequantizations per weight: the tests that hold a step to ≤ 2 per weight use this."""

from __future__ import annotations

from collections import Counter

import torch

import kernels.frozen


def counting_dequantizations(monkeypatch) -> Counter:
    """Count `dequantize_nf4` calls of the LoRA, grouped-LoRA and NF4-linear ops (they all dequantize
    a base weight through `kernels.frozen.dequantize_frozen`), per NF4 weight (its packed buffer),
    for the rest of the test."""
    calls: Counter = Counter()

    def counted(q, dtype=torch.bfloat16, *, out=None, _real=kernels.frozen.dequantize_nf4):
        calls[q.packed.data_ptr()] += 1
        return _real(q, dtype, out=out)
    monkeypatch.setattr(kernels.frozen, "dequantize_nf4", counted)
    return calls
