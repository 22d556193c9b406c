"""Counting dequantizations per quantized weight: the tests that hold a step to ≤ 2 per weight use this."""

from __future__ import annotations

from collections import Counter

import torch

import kernels.frozen

_DEQUANTIZERS = {"nf4": ("dequantize_nf4", "packed"), "int8": ("dequantize_int8", "codes")}


def counting_dequantizations(monkeypatch, fmt: str = "nf4") -> Counter:
    """Count the ``fmt`` (nf4, int8) dequantizations of the LoRA, grouped-LoRA and quantized-linear
    ops (they all dequantize a base weight through `kernels.frozen.dequantize_frozen`), per weight
    (its codes buffer), for the rest of the test."""
    name, buffer = _DEQUANTIZERS[fmt]
    calls: Counter = Counter()

    def counted(q, dtype=torch.bfloat16, *, out=None, _real=getattr(kernels.frozen, name)):
        calls[getattr(q, buffer).data_ptr()] += 1
        return _real(q, dtype, out=out)
    monkeypatch.setattr(kernels.frozen, name, counted)
    return calls
