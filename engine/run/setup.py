"""Settle the defaults that depend on the machine or the model: device, dtype, maximum length."""

from __future__ import annotations

import torch

from engine.errors import InputError
from models.config import LlamaConfig

DEFAULT_MAX_LEN = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # flag value -> dtype


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a GPU (fp16 where bf16 is unsupported), fp32 on a CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_max_len(max_len: int | None, model_cfg: LlamaConfig) -> int:
    """The flag, or min(model context, 2048); never beyond what the model supports."""
    context = model_cfg.max_position_embeddings
    if max_len is None:
        return min(context, DEFAULT_MAX_LEN)
    if max_len > context:
        raise InputError(f"--max-len {max_len} exceeds the model's context of {context} tokens")
    return max_len
