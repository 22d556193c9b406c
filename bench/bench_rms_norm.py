"""Benchmark: RMSNorm ``x · rsqrt(mean(x²) + eps) · w``, ours against eager torch, torch.compile, Liger.

Providers: ``torch`` (``kernels.rms_norm.rms_norm_ref``, eager), ``torch.compile`` (the same
function compiled; ``--no-compile`` skips it), ``ours`` (``kernels.rms_norm.rms_norm`` on its
Triton path) and ``liger`` (``LigerRMSNormFunction``, HF casting mode, when ``liger_kernel`` is
installed). Modes: ``forward`` (a training forward, grad enabled), ``backward`` (alone, on a
retained graph; dX and, unless ``--frozen-weight``, dW) and ``full``.

Bandwidth: the bytes the op must move at least — forward reads x and writes y (2 tensors of N·H
elements), backward reads dy and x and writes dx (3), full 5; the weight and the per-row
reciprocal RMS are negligible — over the median time, and its share of the measured copy
bandwidth (target on H100/H200: ≥ 85 %). On a GPU: bf16, H = 4,096 at 4,096, 8,192 and 16,384
tokens (``--quick``: 16,384). On a CPU: one small fp32 shape with ours in the Triton interpreter —
it only proves the script runs (do not commit those results).

Run from the repository root: ``python -m bench.bench_rms_norm [--quick] [--frozen-weight]``.
"""

from __future__ import annotations

import torch

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, compiled, copy_bandwidth_gbps,
                          dtype_name, forced_triton, measure_modes, report)
from kernels.rms_norm import rms_norm, rms_norm_ref

GPU_SHAPES = [(n, 4096) for n in (4096, 8192, 16_384)]  # (tokens, hidden)
QUICK_SHAPES = [(16_384, 4096)]
CPU_SHAPES = [(64, 576)]
TENSORS_MOVED = {"forward": 2, "backward": 3, "full": 5}
EPS = 1e-5


def reference(x, w):
    return rms_norm_ref(x, w, EPS)


def providers(compile_: bool) -> dict:
    found = {"torch": reference, "ours": forced_triton(lambda x, w: rms_norm(x, w, EPS))}
    if compile_:
        found["torch.compile"] = compiled(reference)
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return found
    # offset 0, HF ("llama") casting, in_place=False: dY must survive repeated backward timings
    found["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    return found


def make_inputs(shape, dtype, device, frozen_weight) -> Inputs:
    g = torch.Generator(device=device).manual_seed(0)
    x, dy = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=device)).to(dtype)
    x.requires_grad_()
    w.requires_grad_(not frozen_weight)
    return Inputs(args=(x, w), wrt=(x,) if frozen_weight else (x, w), grad_out=dy)


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--hidden", type=int, default=4096, help="H, with --tokens")
    parser.add_argument("--frozen-weight", action="store_true", help="weight.requires_grad = False (LoRA)")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    shapes = [(n, args.hidden) for n in args.tokens] if args.tokens else (
        CPU_SHAPES if device != "cuda" else QUICK_SHAPES if args.quick else GPU_SHAPES)
    weight = "frozen" if args.frozen_weight else "trainable"
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for shape in shapes:
        tensor_bytes = shape[0] * shape[1] * dtype.itemsize
        records += measure_modes("rms_norm", providers(compile_=not args.no_compile),
                                 lambda: make_inputs(shape, dtype, device, args.frozen_weight), shape, device,
                                 bytes_moved={m: k * tensor_bytes for m, k in TENSORS_MOVED.items()},
                                 copy_bw_gbps=copy_bw, extra={"dtype": dtype_name(dtype), "weight": weight},
                                 quick=args.quick)
    notes = f"bytes_moved: forward 2, backward 3, full 5 tensors of tokens x hidden; eps {EPS}; weight {weight}"
    return report("rms_norm", records, device, args, notes=notes, copy_bw_gbps=copy_bw)


if __name__ == "__main__":
    main()
