"""Benchmark a LoRA linear over an FP8 base against the same layer over a bf16 base.

    python -m bench.bench_fp8                     # Llama-3-8B projections, 2048 and 8192 tokens
    python -m bench.bench_fp8 --quick             # gate/up at 8192 tokens

Providers, all `kernels.lora.lora_linear` with r = 16 (forward, backward and full, as bench_lora):
``bf16`` — the base a dense bf16 weight (cuBLAS GEMMs); ``fp8`` — the base an e4m3 weight with
per-row scales, both base products (x·Wᵀ and dY·W) by ``torch._scaled_mm`` with the activations
(or dY) quantized per row (`kernels.fp8_linear`); ``base`` — the bare bf16 GEMM, the floor. The
figure is fp8 / bf16 time (target <= 0.7 on Hopper, where e4m3 tensor cores run at twice the bf16
rate). On a CPU every provider runs its reference path (fp8: the fp32 emulation of its rounding),
which says nothing about the GPU; shapes are then scaled down.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench.bench_lora import make_inputs
from bench.common import bench_device, bench_dtype, bench_parser, bench_shapes, dtype_name, measure_modes, report
from kernels.fp8 import quantize_fp8
from kernels.lora import lora_linear

GPU_LAYERS = [("llama3-8b.gate_up", 14336, 4096), ("llama3-8b.down", 4096, 14336), ("llama3-8b.q", 4096, 4096)]
GPU_TOKENS = [2048, 8192]
QUICK_LAYERS = [("llama3-8b.gate_up", 14336, 4096)]
QUICK_TOKENS = [8192]
CPU_LAYERS = [("small.square", 512, 512)]
CPU_TOKENS = [256]
RANK, SCALE = 16, 2.0


def providers(weight: torch.Tensor) -> dict:
    """name -> fn(x, weight, A, B) -> y; ``fp8`` swaps in the e4m3 copy of the dense weight."""
    fp8 = quantize_fp8(weight)

    def over(base, x, _weight, a, b):
        return lora_linear(x, base, a, b, SCALE)

    return {"bf16": functools.partial(over, weight), "fp8": functools.partial(over, fp8)}


def base(x, weight, a, b):
    return F.linear(x, weight)


def main(argv: list[str] | None = None):
    args = bench_parser(__doc__).parse_args(argv)
    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    layers, tokens = bench_shapes(device, args.quick, (GPU_LAYERS, GPU_TOKENS), (QUICK_LAYERS, QUICK_TOKENS),
                                  (CPU_LAYERS, CPU_TOKENS))
    records = []
    for layer, n_out, n_in in layers:
        weight = (torch.randn(n_out, n_in, device=device) * n_in**-0.5).to(dtype)
        for n in tokens:
            shape, row = (n, n_in, n_out), {"dtype": dtype_name(dtype), "rank": RANK, "layer": layer}
            inputs = functools.partial(make_inputs, n, weight, n_out, n_in, RANK, dtype, device)
            records += measure_modes("lora_linear", {"base": base}, functools.partial(inputs, lora_grads=False),
                                     shape, device, extra=row, quick=args.quick)
            records += measure_modes("lora_linear", providers(weight), inputs, shape, device, extra=row,
                                     quick=args.quick)
        del weight
    fp8_note = "fp8 products by torch._scaled_mm" if device == "cuda" else "CPU: fp8 is the fp32 emulation"
    return report("fp8", records, device, args, notes=f"shape (N, in, out); r={RANK}, s={SCALE}; {fp8_note}")


if __name__ == "__main__":
    main()
