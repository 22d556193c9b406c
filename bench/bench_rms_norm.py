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

import functools

import torch

from bench.common import Inputs, PeerOp, bench_device, bench_parser, bench_shapes, run_peer_op
from kernels.rms_norm import rms_norm, rms_norm_ref

GPU_SHAPES = [(n, 4096) for n in (4096, 8192, 16_384)]  # (tokens, hidden)
QUICK_SHAPES = [(16_384, 4096)]
CPU_SHAPES = [(64, 576)]
EPS = 1e-5


def reference(x, w):
    return rms_norm_ref(x, w, EPS)


def bytes_moved(shape, dtype) -> dict[str, int]:
    """Least traffic per mode: forward reads x and writes y, backward reads dy, x and writes dx, full
    both — 2, 3 and 5 tensors of ``shape`` (the weight and the per-row 1/rms are negligible)."""
    tensor = shape[0] * shape[1] * dtype.itemsize
    return {"forward": 2 * tensor, "backward": 3 * tensor, "full": 5 * tensor}


def ours(x, w):
    return rms_norm(x, w, EPS)


def liger():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, HF ("llama") casting, in_place=False: dY must survive repeated backward timings
    return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)


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
    shapes = [(n, args.hidden) for n in args.tokens] if args.tokens else (
        bench_shapes(bench_device(), args.quick, GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES))
    spec = PeerOp("rms_norm", "rms_norm", reference, ours, liger,
                  functools.partial(make_inputs, frozen_weight=args.frozen_weight), bytes_moved)
    weight = "frozen" if args.frozen_weight else "trainable"
    notes = f"bytes_moved: forward 2, backward 3, full 5 tensors of tokens x hidden; eps {EPS}; weight {weight}"
    return run_peer_op(spec, args, shapes, extra={"weight": weight}, notes=notes)


if __name__ == "__main__":
    main()
