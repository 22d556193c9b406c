"""Benchmark: SwiGLU ``silu(gate) * up``, ours against eager torch, torch.compile and Liger.

Providers: ``torch`` (``kernels.swiglu.swiglu_ref``, eager), ``torch.compile`` (the same function
compiled; ``--no-compile`` skips it), ``ours`` (``kernels.swiglu.swiglu`` on its Triton path) and
``liger`` (``LigerSiLUMulFunction``, when ``liger_kernel`` is installed). Modes: ``forward`` (a
training forward, grad enabled), ``backward`` (alone, on a retained graph) and ``full``.

Bandwidth: the bytes the op must move at least — forward reads gate and up and writes y (3 tensors
of N·I elements), backward reads dy, gate, up and writes d_gate, d_up (5), full 8 — over the
median time, and its share of the measured copy bandwidth (target on H100/H200: ≥ 85 %).
On a GPU: bf16, Llama intermediate sizes 11,008 (Llama 2 7B) and 14,336 (Llama 3 8B) at 4,096,
8,192 and 16,384 tokens (``--quick``: 14,336 at 16,384 tokens). On a CPU: one small fp32 shape
with ours in the Triton interpreter — it only proves the script runs (do not commit those results).

Run from the repository root: ``python -m bench.bench_swiglu [--quick] [--tokens N ...]``.
"""

from __future__ import annotations

import torch

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, compiled, copy_bandwidth_gbps,
                          dtype_name, forced_triton, measure_modes, report)
from kernels.swiglu import swiglu, swiglu_ref

GPU_SHAPES = [(n, i) for i in (11_008, 14_336) for n in (4096, 8192, 16_384)]  # (tokens, intermediate)
QUICK_SHAPES = [(16_384, 14_336)]
CPU_SHAPES = [(64, 1000)]
TENSORS_MOVED = {"forward": 3, "backward": 5, "full": 8}


def providers(compile_: bool) -> dict:
    found = {"torch": swiglu_ref, "ours": forced_triton(swiglu)}
    if compile_:
        found["torch.compile"] = compiled(swiglu_ref)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return found
    found["liger"] = LigerSiLUMulFunction.apply
    return found


def make_inputs(shape, dtype, device) -> Inputs:
    g = torch.Generator(device=device).manual_seed(0)
    gate, up, dy = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    gate.requires_grad_()
    up.requires_grad_()
    return Inputs(args=(gate, up), wrt=(gate, up), grad_out=dy)


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--intermediate", type=int, default=14_336, help="I, with --tokens")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    shapes = [(n, args.intermediate) for n in args.tokens] if args.tokens else (
        CPU_SHAPES if device != "cuda" else QUICK_SHAPES if args.quick else GPU_SHAPES)
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for shape in shapes:
        tensor_bytes = shape[0] * shape[1] * dtype.itemsize
        records += measure_modes("swiglu", providers(compile_=not args.no_compile),
                                 lambda: make_inputs(shape, dtype, device), shape, device,
                                 bytes_moved={m: k * tensor_bytes for m, k in TENSORS_MOVED.items()},
                                 copy_bw_gbps=copy_bw, extra={"dtype": dtype_name(dtype)}, quick=args.quick)
    notes = "bytes_moved: forward 3, backward 5, full 8 tensors of tokens x intermediate"
    return report("swiglu", records, device, args, notes=notes, copy_bw_gbps=copy_bw)


if __name__ == "__main__":
    main()
