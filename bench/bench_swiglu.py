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

from bench.common import Inputs, PeerOp, bench_device, bench_parser, bench_shapes, run_peer_op
from kernels.swiglu import swiglu, swiglu_ref

GPU_SHAPES = [(n, i) for i in (11_008, 14_336) for n in (4096, 8192, 16_384)]  # (tokens, intermediate)
QUICK_SHAPES = [(16_384, 14_336)]
CPU_SHAPES = [(64, 1000)]


def bytes_moved(shape, dtype) -> dict[str, int]:
    """Least traffic per mode: forward reads gate, up and writes y; backward reads dy, gate, up and
    writes d_gate, d_up; full both — 3, 5 and 8 tensors of ``shape``."""
    tensor = shape[0] * shape[1] * dtype.itemsize
    return {"forward": 3 * tensor, "backward": 5 * tensor, "full": 8 * tensor}


def liger():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def make_inputs(shape, dtype, device) -> Inputs:
    g = torch.Generator(device=device).manual_seed(0)
    gate, up, dy = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    gate.requires_grad_()
    up.requires_grad_()
    return Inputs(args=(gate, up), wrt=(gate, up), grad_out=dy)


SWIGLU = PeerOp("swiglu", "swiglu", swiglu_ref, swiglu, liger, make_inputs, bytes_moved)


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--intermediate", type=int, default=14_336, help="I, with --tokens")
    args = parser.parse_args(argv)
    shapes = [(n, args.intermediate) for n in args.tokens] if args.tokens else (
        bench_shapes(bench_device(), args.quick, GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES))
    notes = "bytes_moved: forward 3, backward 5, full 8 tensors of tokens x intermediate"
    return run_peer_op(SWIGLU, args, shapes, notes=notes)


if __name__ == "__main__":
    main()
