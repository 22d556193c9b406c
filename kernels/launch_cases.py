"""What the launchers of each kernel file can launch: the input of the ahead-of-time GPU compile
check, `tests/kernels/test_compile.py`.

Every kernel file ends its launcher section with ``compile_cases(shapes) -> list[KernelCase]``:
one entry per distinct specialisation its launchers can pass at ``shapes`` (a dtype, a constexpr
flag, a different stride pattern), each with every configuration the launch can run with (the
autotuner's ``.configs``, or the one fixed ``num_warps``/``num_stages`` of a plain launch). The
block sizes come from the launchers' own helpers, so a changed heuristic changes the check; a new
kernel argument or constexpr makes the check fail until the case names it.

Arguments are given as values, the way the launcher passes them: a ``torch.dtype`` stands for a
tensor of that dtype (torch allocations are 16-byte aligned), ints and floats are sample values at
``shapes`` (Triton specialises ints equal to 1 and multiples of 16, so strides matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton


@dataclass(frozen=True)
class ModelShapes:
    """The sizes a launch is specialised for; the default is Llama-2-7B at 4,096 tokens."""

    tokens: int = 4096
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    lora_ranks: tuple[int, ...] = (8, 16, 32, 64)
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
    num_sms: int = 132  # H100/H200: grids sized per SM (RMSNorm backward, LoRA wgrad splits)


LLAMA2_7B = ModelShapes()


class KernelCase(NamedTuple):
    """One specialisation of one ``@triton.jit`` kernel, as a launcher passes it."""

    name: str  # what launch it is, e.g. "fwd DROPOUT" (the dtype is added by the check)
    fn: Any  # the triton.JITFunction
    dtype: torch.dtype  # the compute dtype of the launch
    args: dict[str, Any]  # every runtime argument: torch.dtype for a tensor, else a sample value
    constexprs: dict[str, Any]  # the constexprs the launcher passes (not those the configs set)
    configs: tuple[triton.Config, ...]  # every configuration it can run with
    options: dict[str, Any] = {}  # other compile options the launcher passes (enable_fp_fusion)


def fixed_launch(num_warps: int = 4) -> tuple[triton.Config, ...]:
    """The one configuration of a plain (not autotuned) launch: its num_warps, default stages."""
    return (triton.Config({}, num_warps=num_warps),)
