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
from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, bench_shapes, copy_bandwidth_gbps,
                          dtype_name, forced_triton, measure_modes, report)
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


def main(argv: list[str] | None = None):
    args = bench_parser(__doc__).parse_args(argv)
    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    shapes = bench_shapes(device, args.quick, GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES)
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for name, shape in shapes.items():
        weight = torch.randn(shape, device=device, dtype=dtype) * 0.02
        records += measure_modes("int8_dequant", providers(weight, dtype, device), lambda: Inputs(args=()), shape,
                                 device, modes=("forward",), bytes_moved={"forward": bytes_moved(shape, dtype)},
                                 copy_bw_gbps=copy_bw, extra={"dtype": dtype_name(dtype), "layer": name},
                                 quick=args.quick)
        del weight
    notes = "" if device == "cuda" else "ours (Triton) not run on a CPU"
    return report("int8", records, device, args, notes=notes, copy_bw_gbps=copy_bw)


if __name__ == "__main__":
    main()
