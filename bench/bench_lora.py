"""Benchmark: the fused LoRA linear against the bare base matmul and a PEFT-style LoRA.

Providers, each computing ``y`` for ``x (N, in)``, a frozen ``W (out, in)`` and rank-r adapters,
with gradients for x, A and B (none for W):

* ``base``: the bare base product ``x @ Wᵀ`` (gradient for x only): the floor to compare with;
* ``peft``: ``x @ Wᵀ + s · (dropout(x) @ Aᵀ) @ Bᵀ`` in eager torch, as PEFT's ``lora.Linear`` does;
* ``torch``: our reference ``kernels.lora.lora_linear_ref`` (same math, autograd);
* ``ours``: ``kernels.lora.lora_linear`` on its Triton path (GPU only).

Modes: ``forward`` (a training forward, grad enabled), ``backward`` (the backward alone, on a
retained graph, ``autograd.grad`` so nothing accumulates) and ``full`` (both). Timing quantiles and
peak memory above the inputs come from bench.common. GPU shapes: every LoRA-targeted linear of
Llama-2-7B and Llama-3-8B as weight (out, in), at 2,048, 8,192 and 16,384 tokens, r = 16, bf16
(``--quick``: Llama-3-8B's gate/up and k/v at 8,192 tokens). The targets, in the ``full`` mode:
ours / base ≤ 1.10 and peft / ours ≥ 1.5 (bench.targets). On a CPU the bench runs the references at
small shapes and says so (Triton would run in its interpreter, which says nothing about speed); do
not commit CPU results.

Run from the repository root: ``python -m bench.bench_lora [--quick] [--tokens 8192] [--nf4] [--dropout 0.05]``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, bench_shapes, dtype_name,
                          measure_modes, report)
from kernels.lora import lora_linear, lora_linear_ref
from kernels.nf4 import dequantize_nf4, quantize_nf4

# (name, out, in) of the weight, as in the checkpoints
GPU_LAYERS = [
    ("llama2-7b.attn", 4096, 4096), ("llama2-7b.gate_up", 11008, 4096), ("llama2-7b.down", 4096, 11008),
    ("llama3-8b.gate_up", 14336, 4096), ("llama3-8b.down", 4096, 14336), ("llama3-8b.kv", 1024, 4096),
]
GPU_TOKENS = [2048, 8192, 16384]
QUICK_LAYERS = [("llama3-8b.gate_up", 14336, 4096), ("llama3-8b.kv", 1024, 4096)]
QUICK_TOKENS = [8192]
CPU_LAYERS = [("small.square", 512, 512), ("small.down", 256, 1024)]
CPU_TOKENS = [256]


def make_weight(n_out, n_in, dtype, device, nf4):
    g = torch.Generator(device=device).manual_seed(1)
    weight = (torch.randn(n_out, n_in, generator=g, device=device) * n_in**-0.5).to(dtype)
    return quantize_nf4(weight.float().cpu()).to(device) if nf4 else weight


def make_inputs(n, weight, n_out, n_in, rank, dtype, device, lora_grads=True) -> Inputs:
    """x (n, in), the shared weight, A (r, in), B (out, r), dy (n, out); gradients for x, A, B
    (for x alone when ``lora_grads`` is false: the base provider has no adapters)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    x, a, b = rnd(n, n_in), rnd(rank, n_in, std=n_in**-0.5), rnd(n_out, rank, std=n_out**-0.5)
    x.requires_grad_()
    a.requires_grad_(lora_grads)
    b.requires_grad_(lora_grads)
    return Inputs(args=(x, weight, a, b), wrt=(x, a, b) if lora_grads else (x,), grad_out=rnd(n, n_out))


def providers(device: str, scale: float, p: float) -> dict:
    """name -> fn(x, weight, A, B) -> y, for the providers with adapters."""

    def dense(weight, dtype):  # peft dequantizes an NF4 weight the way bitsandbytes' Linear4bit does
        return weight if isinstance(weight, torch.Tensor) else dequantize_nf4(weight, dtype)

    def peft(x, weight, a, b):
        return F.linear(x, dense(weight, x.dtype)) + F.linear(F.linear(F.dropout(x, p), a), b) * scale

    def reference(x, weight, a, b):
        return lora_linear_ref(x, weight, a, b, scale, dropout_p=p, training=True)

    def ours(x, weight, a, b):
        return lora_linear(x, weight, a, b, scale, dropout_p=p, training=True)

    found = {"peft": peft, "torch": reference}
    if device == "cuda":  # on a CPU ours would run in the Triton interpreter, which times Python
        found["ours"] = ours
    return found


def base(x, weight, a, b):
    """The bare base product, the floor LoRA is measured against (an NF4 weight dequantized first)."""
    w = weight if isinstance(weight, torch.Tensor) else dequantize_nf4(weight, x.dtype)
    return F.linear(x, w)


def add_lora_options(parser) -> None:
    """The LoRA options of this bench and of bench_lora_group: tokens, rank, scale, dropout, NF4 base."""
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's list)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--scale", type=float, default=2.0, help="s = alpha / r")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode)")
    parser.add_argument("--nf4", action="store_true", help="NF4 base weights (QLoRA)")


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__)
    add_lora_options(parser)
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    layers, tokens = bench_shapes(device, args.quick, (GPU_LAYERS, GPU_TOKENS), (QUICK_LAYERS, QUICK_TOKENS),
                                  (CPU_LAYERS, CPU_TOKENS))
    extra = {"dtype": dtype_name(dtype), "rank": args.rank, "dropout": args.dropout,
             "base": "nf4" if args.nf4 else "dense"}
    records = []
    for layer, n_out, n_in in layers:
        weight = make_weight(n_out, n_in, dtype, device, args.nf4)
        for n in args.tokens or tokens:
            shape, row = (n, n_in, n_out), {**extra, "layer": layer}
            inputs = functools.partial(make_inputs, n, weight, n_out, n_in, args.rank, dtype, device)
            records += measure_modes("lora_linear", {"base": base}, functools.partial(inputs, lora_grads=False),
                                     shape, device, extra=row, quick=args.quick)
            records += measure_modes("lora_linear", providers(device, args.scale, args.dropout), inputs, shape,
                                     device, extra=row, quick=args.quick)
    notes = f"shape (N, in, out); r={args.rank}, s={args.scale}, dropout={args.dropout}, base {extra['base']}"
    if device != "cuda":
        notes += "; ours (Triton) not run on a CPU"
    return report("lora", records, device, args, notes=notes)


if __name__ == "__main__":
    main()
