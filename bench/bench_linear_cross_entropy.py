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

import functools

import torch
import torch.nn.functional as F

from bench.common import Inputs, PeerOp, bench_device, bench_parser, bench_shapes, run_peer_op
from kernels.linear_cross_entropy import linear_cross_entropy

GPU_SHAPES = [(4096, 4096, 128_256), (8192, 4096, 128_256), (16_384, 4096, 128_256)]  # (N, H, V)
QUICK_SHAPES = [(16_384, 4096, 128_256)]
CPU_SHAPES = [(64, 128, 32_000)]


def eager_loss(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.T, labels)


def liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, labels: loss(weight, hidden, labels)


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
    shapes = bench_shapes(bench_device(), args.quick, GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES)
    if args.tokens:
        h, v = args.hidden or shapes[0][1], args.vocab or shapes[0][2]
        shapes = [(n, h, v) for n in args.tokens]
    spec = PeerOp("linear_cross_entropy", "linear_ce", eager_loss, linear_cross_entropy, liger,
                  functools.partial(make_inputs, frozen_head=args.frozen_head))
    head = "frozen" if args.frozen_head else "trainable"
    notes = f"shape (N, H, V); mean CE with a quarter of labels ignored; head {head}"
    return run_peer_op(spec, args, shapes, extra={"head": head}, notes=notes)


if __name__ == "__main__":
    main()
