"""Benchmark: LM head + KL(base ‖ policy), ours (chunked, fused) against eager torch and torch.compile.

Providers, each computing the mean over unmasked tokens of KL(p0 ‖ p), p = softmax(policy_hidden
Wᵀ), p0 = softmax(base_hidden Wᵀ), and its gradient for policy_hidden (the head is frozen and the
base pass is a constant, as in `kernels.linear_kl`):

* ``torch``: both logits materialised (N, V) in the input dtype, fp32 log-softmaxes, ``F.kl_div``;
* ``torch.compile``: the same function compiled (skipped with ``--no-compile``);
* ``ours``: ``kernels.linear_kl.linear_kl`` on its Triton path.

No peer: Liger's fused linear JSD is a distillation loss of its own normalisation, not this op.
Modes: ``forward`` is a training forward (grad enabled: ours already computes the gradient
there), ``backward`` the backward alone on a retained graph (for ours a rescale), ``full`` both —
the fair comparison. Timing quantiles and the peak memory above the inputs come from
bench.common. On a GPU the default shapes are Llama-3's head (V = 128,256, H = 4,096, bf16) at
4,096, 8,192 and 16,384 tokens (``--quick``: 16,384); on a CPU, small fp32 shapes with our kernel
in the Triton interpreter, which says nothing about GPU speed (do not commit those).

Run from the repository root: ``python -m bench.bench_linear_kl [--quick]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, bench_shapes, compiled, dtype_name,
                          forced_triton, measure_modes, report)
from kernels.linear_kl import linear_kl

GPU_SHAPES = [(4096, 4096, 128_256), (8192, 4096, 128_256), (16_384, 4096, 128_256)]  # (N, H, V)
QUICK_SHAPES = [(16_384, 4096, 128_256)]
CPU_SHAPES = [(64, 128, 32_000)]


def eager_kl(policy_hidden, base_hidden, weight, mask):
    """Mean over the unmasked rows of KL(p0 ‖ p), with the (N, V) logits materialised."""
    log_p = F.log_softmax((policy_hidden @ weight.T).float(), dim=-1)
    with torch.no_grad():
        log_p0 = F.log_softmax((base_hidden @ weight.T).float(), dim=-1)
    per_token = F.kl_div(log_p, log_p0, log_target=True, reduction="none").sum(-1)
    return torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp(min=1)


def ours(policy_hidden, base_hidden, weight, mask):
    return linear_kl(policy_hidden, base_hidden, weight, mask, reduction="mean")


def make_inputs(shape, dtype, device) -> Inputs:
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, h, generator=g, device=device, dtype=dtype)
    policy = (base + 0.1 * torch.randn(n, h, generator=g, device=device, dtype=dtype)).requires_grad_()
    weight = torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5  # frozen head
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[::4] = False  # a quarter of the tokens are prompt tokens
    return Inputs(args=(policy, base, weight, mask), wrt=(policy,))


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--hidden", type=int, default=None, help="H, with --tokens")
    parser.add_argument("--vocab", type=int, default=None, help="V, with --tokens")
    args = parser.parse_args(argv)
    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    shapes = bench_shapes(device, args.quick, GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES)
    if args.tokens:
        h, v = args.hidden or shapes[0][1], args.vocab or shapes[0][2]
        shapes = [(n, h, v) for n in args.tokens]
    providers = {"torch": eager_kl, "ours": forced_triton(ours)}
    if not args.no_compile:
        providers["torch.compile"] = compiled(eager_kl)
    records = []
    for shape in shapes:
        records += measure_modes("linear_kl", providers, lambda: make_inputs(shape, dtype, device), shape, device,
                                 extra={"dtype": dtype_name(dtype)}, quick=args.quick)
    notes = "shape (N, H, V); mean KL(base ‖ policy) with a quarter of tokens masked; head frozen"
    return report("linear_kl", records, device, args, notes=notes)


if __name__ == "__main__":
    main()
