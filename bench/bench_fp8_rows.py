"""Benchmark the per-row e4m3 quantization of an FP8 product's operand: torch reference vs our Triton kernel.

    python -m bench.bench_fp8_rows                # Llama-3-8B operands at 8192 tokens
    python -m bench.bench_fp8_rows --quick        # the widest operand only

Shapes (tokens × K): the operands an FP8 linear quantizes at Llama-3-8B sizes, x of q/k/v/o/gate/up
(K = 4096) and of down (K = 14336) in the forward, dY ⊙ s_w of gate/up (K = 14336) in the
backward. Effective bandwidth counts the bytes the op must move: the bf16 operand once (n · 2),
the codes (n) and the row scales (4 · rows); the kernel reads the operand twice (the second
time mostly from L2). Providers: ``torch`` (`kernels.fp8_rows.quantize_rows_ref`, a bounded fp32
scratch) and ``ours`` (the Triton kernel, on a GPU only: on a CPU the interpreter would time
Python); mode ``forward`` only. The ratio torch / ours is what each FP8 product saves per call.
Results go to bench/results/ (see bench.common).
"""

from __future__ import annotations

import torch

from bench.common import bench_parser, forced_triton, run_forward_op
from kernels.fp8_rows import quantize_rows, quantize_rows_ref

GPU_SHAPES = {"llama3-8b.x_hidden": (8192, 4096), "llama3-8b.x_down": (8192, 14336),
              "llama3-8b.dy_gate_up": (8192, 14336)}
QUICK_SHAPES = {"llama3-8b.x_down": (8192, 14336)}
CPU_SHAPES = {"small": (256, 512)}


def bytes_moved(shape: tuple[int, int], dtype: torch.dtype, with_col_scale: bool) -> int:
    """Minimal traffic of one quantization: the operand (and column scales) in, codes and row scales out."""
    n = shape[0] * shape[1]
    return n * dtype.itemsize + (4 * shape[1] if with_col_scale else 0) + n + 4 * shape[0]


def providers(a: torch.Tensor, col_scale: torch.Tensor | None, device: str) -> dict:
    """name -> zero-argument callable producing (codes, scales)."""
    out = {"torch": lambda: quantize_rows_ref(a, col_scale)}
    if device == "cuda":
        out["ours"] = forced_triton(lambda: quantize_rows(a, col_scale))
    return out


def case(name: str, shape: tuple[int, int], dtype: torch.dtype, device: str) -> tuple[dict, int]:
    """x of a forward product, or dY of the backward (``dy_*``, with the weight's column scales)."""
    a = torch.randn(shape, device=device, dtype=dtype)
    col = torch.rand(shape[1], device=device) + 0.5 if name.split(".")[-1].startswith("dy") else None
    return providers(a, col, device), bytes_moved(shape, dtype, col is not None)


def main(argv: list[str] | None = None):
    args = bench_parser(__doc__).parse_args(argv)
    return run_forward_op("fp8_rows", "fp8_rows", args, (GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES), case, label="operand")


if __name__ == "__main__":
    main()
