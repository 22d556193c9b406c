"""What the quantized frozen weights share: the row-coded formats' accessors, and the check of a
dequantization's arguments.

`RowCodes` is the base of the formats with one code per weight and one fp32 number per output row
(`kernels.int8.Int8Tensor`: absmax; `kernels.fp8.FP8Tensor`: scale): ``codes`` (out, in), and from
it the shape, size and device; ``to`` moves every tensor field. `check_row_weight` is what both
row-coded quantizers take (a non-empty 2-D float weight). `check_dequantize_args` is what
every public dequantizer (NF4, int8, FP8) checks before it writes: the weight's type, the target
dtype, and an ``out`` buffer that must be contiguous, of the weight's shape, dtype and device (the
rows of the concatenated q/k/v weight in `kernels.lora_group` are such a buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class RowCodes:
    """codes (out, in), one per weight; a subclass adds its per-row tensor and the source dtype."""

    codes: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str):
        """A copy with every tensor on ``device``."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)})


def check_row_weight(weight: torch.Tensor) -> None:
    """What a row-coded quantizer takes: TypeError unless ``weight`` is a fp32/bf16/fp16 tensor,
    ValueError unless it is a non-empty 2-D (out, in) one."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight: dtype {weight.dtype} not supported, expected float32, bfloat16 or float16")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty 2-D (out, in) tensor, got shape {tuple(weight.shape)}")


def check_dequantize_args(q, kind: type, dtype: torch.dtype, out: torch.Tensor | None) -> None:
    """TypeError unless ``q`` is a ``kind`` and ``dtype`` a float dtype; ValueError unless ``out``
    is None or a contiguous ``dtype`` tensor of ``q.shape`` on q's device."""
    if not isinstance(q, kind):
        raise TypeError(f"q: expected an {kind.__name__}, got {type(q).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: {dtype} not supported, expected float32, bfloat16 or float16")
    if out is not None and (out.shape != q.shape or out.dtype != dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {dtype} tensor of shape {tuple(q.shape)} on {q.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
