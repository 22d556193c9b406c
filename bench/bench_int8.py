"""Benchmark int8 dequantization: torch reference vs our Triton kernel vs bitsandbytes.

    python -m bench.bench_int8                    # all providers available on this machine
    python -m bench.bench_int8 --quick            # Llama-3-8B gate/up only

Shapes: the projection weights of Llama-2-7B and Llama-3-8B (those of bench_nf4). Effective
bandwidth counts the bytes the op must move: the int8 codes (n), the row absmax (4·out) and the
dense output (n · element size). Providers: ``torch`` (``int8_dequant_ref``), ``ours`` (the Triton
dequantizer, on a GPU only: on a CPU the interpreter would time Python) and ``bitsandbytes``
(``int8_vectorwise_dequant`` then the cast to the compute dtype, where installed); mode
``forward`` only. Results go to bench/results/ (see bench.common).
"""

from __future__ import annotations

import torch

from bench.bench_nf4 import CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES
from bench.common import bench_parser, forced_triton, run_forward_op
from kernels.int8 import dequantize_int8, int8_dequant_ref, quantize_int8


def bytes_moved(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Minimal traffic of one dequantization: codes + row scales in, dense tensor out."""
    n = shape[0] * shape[1]
    return n + 4 * shape[0] + n * dtype.itemsize


def providers(weight: torch.Tensor, dtype: torch.dtype, device: str) -> dict:
    """name -> zero-argument callable producing the dense weight."""
    q = quantize_int8(weight)
    out = {"torch": lambda: int8_dequant_ref(q, dtype)}
    if device == "cuda":
        out["ours"] = forced_triton(lambda: dequantize_int8(q, dtype))
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return out
    out["bitsandbytes"] = lambda: bnbf.int8_vectorwise_dequant(q.codes, q.absmax).to(dtype)
    return out


def case(name: str, shape: tuple[int, int], dtype: torch.dtype, device: str) -> tuple[dict, int]:
    weight = torch.randn(shape, device=device, dtype=dtype) * 0.02
    return providers(weight, dtype, device), bytes_moved(shape, dtype)


def main(argv: list[str] | None = None):
    args = bench_parser(__doc__).parse_args(argv)
    return run_forward_op("int8", "int8_dequant", args, (GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES), case)


if __name__ == "__main__":
    main()
