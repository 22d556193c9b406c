"""Benchmark: LM head + cross-entropy, ours (chunked, fused) against eager torch, torch.compile, Liger.

Providers, each computing the mean cross-entropy of ``hidden (N, H) @ weight (V, H)ᵀ`` and its
gradients for hidden and (unless ``--frozen-head``) the weight:

* ``torch``: ``F.cross_entropy(hidden @ weight.T, labels)``, materialising the (N, V) logits;
* ``torch.compile``: the same function compiled (skipped with ``--no-compile``);
* ``ours``: ``kernels.linear_cross_entropy.linear_cross_entropy`` on its Triton path;
* ``liger``: ``LigerFusedLinearCrossEntropyLoss`` when ``liger_kernel`` is installed.

Modes: ``forward`` is a training forward (grad enabled: ours and Liger already compute the
gradients there), ``backward`` the backward alone on a retained graph (for ours and Liger only a
rescale of those gradients), ``full`` both — the fair comparison. Timing quantiles and the peak
memory above the inputs come from bench.common. On a GPU the default shapes are Llama-3's head
(V = 128,256, H = 4,096, bf16) at 4,096, 8,192 and 16,384 tokens (``--quick``: 16,384, the
target's shape); on a CPU, small fp32 shapes with our kernels in the Triton interpreter, which says
nothing about GPU speed (do not commit those).

Run from the repository root: ``python -m bench.bench_linear_cross_entropy [--quick] [--frozen-head]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, compiled, dtype_name, forced_triton,
                          measure_modes, report)
from kernels.linear_cross_entropy import linear_cross_entropy

GPU_SHAPES = [(4096, 4096, 128_256), (8192, 4096, 128_256), (16_384, 4096, 128_256)]  # (N, H, V)
QUICK_SHAPES = [(16_384, 4096, 128_256)]
CPU_SHAPES = [(64, 128, 32_000)]


def eager_loss(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.T, labels)


def providers(compile_: bool) -> dict:
    found = {"torch": eager_loss, "ours": forced_triton(linear_cross_entropy)}
    if compile_:
        found["torch.compile"] = compiled(eager_loss)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return found
    liger = LigerFusedLinearCrossEntropyLoss()
    found["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    return found


def make_inputs(shape, dtype, device, frozen_head) -> Inputs:
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5)
    weight.requires_grad_(not frozen_head)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::4] = -100  # a quarter of the tokens are prompt tokens
    return Inputs(args=(hidden, weight, labels), wrt=(hidden,) if frozen_head else (hidden, weight))


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--hidden", type=int, default=None, help="H, with --tokens")
    parser.add_argument("--vocab", type=int, default=None, help="V, with --tokens")
    parser.add_argument("--frozen-head", action="store_true", help="weight.requires_grad = False (LoRA)")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    shapes = CPU_SHAPES if device != "cuda" else QUICK_SHAPES if args.quick else GPU_SHAPES
    if args.tokens:
        h, v = args.hidden or shapes[0][1], args.vocab or shapes[0][2]
        shapes = [(n, h, v) for n in args.tokens]
    head = "frozen" if args.frozen_head else "trainable"
    records = []
    for shape in shapes:
        records += measure_modes("linear_ce", providers(compile_=not args.no_compile),
                                 lambda: make_inputs(shape, dtype, device, args.frozen_head), shape, device,
                                 extra={"dtype": dtype_name(dtype), "head": head}, quick=args.quick)
    notes = f"shape (N, H, V); mean CE with a quarter of labels ignored; head {head}"
    return report("linear_cross_entropy", records, device, args, notes=notes)


if __name__ == "__main__":
    main()
