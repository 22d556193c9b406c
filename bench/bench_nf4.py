"""Benchmark NF4 dequantization: torch reference vs our Triton kernel vs bitsandbytes.

    python -m bench.bench_nf4                     # all providers available on this machine
    python -m bench.bench_nf4 --dtype fp16 --no-double-quant
    python -m bench.bench_nf4 --quick             # Llama-3-8B gate/up only

Shapes are the projection weights of Llama-2-7B (4096x4096, 4096x11008, 11008x4096) and
Llama-3-8B (4096x14336, 14336x4096, 1024x4096). Effective bandwidth counts the bytes the op must
move: the packed codes (n/2), the block statistics, and the dense output (n * element size); its
share of the measured device copy bandwidth is the figure of merit (target >= 85% on H100/H200,
and >= 1.3x bitsandbytes' speed). Providers: ``torch`` (``nf4_dequant_ref``), ``ours`` (the Triton
dequantizer) and ``bitsandbytes`` (``dequantize_4bit``, where installed); mode ``forward`` only.

On a CPU the Triton provider is skipped (the interpreter measures Python, not the kernel) and
the shapes are scaled down; the JSON notes say so. Results go to bench/results/ (see bench.common).
"""

from __future__ import annotations

import torch

from bench.common import bench_parser, forced_triton, run_forward_op
from kernels.nf4 import dequantize_nf4, nf4_dequant_ref, quantize_nf4

GPU_SHAPES = {
    "llama2-7b.q/k/v/o": (4096, 4096), "llama2-7b.gate/up": (11008, 4096), "llama2-7b.down": (4096, 11008),
    "llama3-8b.gate/up": (14336, 4096), "llama3-8b.down": (4096, 14336), "llama3-8b.k/v": (1024, 4096),
}
QUICK_SHAPES = {"llama3-8b.gate/up": (14336, 4096)}
CPU_SHAPES = {"small.square": (512, 512), "small.wide": (256, 1024)}


def bytes_moved(shape: tuple[int, int], blocksize: int, double_quant: bool, dtype: torch.dtype) -> int:
    """Minimal traffic of one dequantization: codes + statistics in, dense tensor out."""
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    stats = n_blocks * (1 if double_quant else 4) + (4 * -(-n_blocks // 256) if double_quant else 0)
    return n // 2 + stats + n * dtype.itemsize


def providers(weight: torch.Tensor, blocksize: int, double_quant: bool, dtype: torch.dtype, device: str) -> dict:
    """name -> zero-argument callable producing the dense weight."""
    q = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    out = {"torch": lambda: nf4_dequant_ref(q, dtype)}
    if device == "cuda":  # on a CPU the interpreter would time Python, not the kernel
        out["ours"] = forced_triton(lambda: dequantize_nf4(q, dtype))
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return out
    packed, state = bnbf.quantize_4bit(weight.to(dtype), blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type="nf4")
    out["bitsandbytes"] = lambda: bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    return out


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__)
    parser.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize")
    parser.add_argument("--no-double-quant", action="store_true", help="fp32 absmax instead of 8-bit codes")
    args = parser.parse_args(argv)
    double_quant = not args.no_double_quant

    def case(name: str, shape: tuple[int, int], dtype: torch.dtype, device: str) -> tuple[dict, int]:
        weight = torch.randn(shape, device=device, dtype=dtype) * 0.02
        return (providers(weight, args.blocksize, double_quant, dtype, device),
                bytes_moved(shape, args.blocksize, double_quant, dtype))

    return run_forward_op("nf4", "nf4_dequant", args, (GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES), case,
                          notes=f"blocksize={args.blocksize} double_quant={double_quant}")


if __name__ == "__main__":
    main()
