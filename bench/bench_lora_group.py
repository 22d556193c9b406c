"""Benchmark: projections sharing one input (q/k/v, gate/up) as one grouped LoRA op vs one op each.

Providers, each computing ``[y_1 | … | y_G]`` for ``x (N, in)`` and G frozen weights with rank-r
adapters on every member, gradients for x and every A, B:

* ``base``: the bare base product ``x @ W_catᵀ`` of the concatenated weight (gradient for x only),
  dense in x's dtype whatever the base format: the floor (the bf16 one under ``--fp8``);
* ``separate``: one ``kernels.lora.lora_linear`` per member, outputs concatenated (the path before
  grouping; ``x``'s gradient summed by autograd);
* ``grouped``: ``kernels.lora_group.lora_linear_group`` (one dequantized NF4 buffer and GEMM — or,
  over FP8 weights, one row quantization of x and one e4m3 product of the concatenated codes —,
  one down-projection, one dropout pass over dX);
* ``torch``: the reference ``lora_linear_group_ref`` (CPU runs: the only provider besides base
  that means anything there).

GPU groups: Llama-3-8B's q/k/v (4096, 1024, 1024 × 4096) and gate/up (2 × 14336 × 4096), and
Llama-2-7B's q/k/v, at 2,048 and 8,192 tokens, r = 16, bf16 (``--quick``: Llama-3-8B q/k/v at
8,192). Check (bench.targets): grouped / separate ≤ 1.0 in the ``full`` mode. On a CPU the Triton
providers are not run (the interpreter times Python); do not commit CPU results.

Run from the repository root: ``python -m bench.bench_lora_group [--quick] [--nf4 | --fp8] [--dropout 0.05]``
(``--fp8`` needs a GPU of compute capability ≥ 8.9 for its e4m3 products; its results are named
``lora_group_fp8``, as ``python -m bench.run_all --only lora_group_fp8`` runs it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench.bench_lora import add_lora_options, make_weight
from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, bench_shapes, dtype_name,
                          measure_modes, report)
from kernels.fp8 import quantize_fp8
from kernels.frozen import dequantize_frozen
from kernels.lora import lora_linear
from kernels.lora_group import GroupMember, lora_linear_group, lora_linear_group_ref

# (name, outs of the members, in)
GPU_GROUPS = [("llama3-8b.qkv", (4096, 1024, 1024), 4096), ("llama3-8b.gate_up", (14336, 14336), 4096),
              ("llama2-7b.qkv", (4096, 4096, 4096), 4096)]
GPU_TOKENS = [2048, 8192]
QUICK_GROUPS = [("llama3-8b.qkv", (4096, 1024, 1024), 4096)]
QUICK_TOKENS = [8192]
CPU_GROUPS = [("small.qkv", (256, 64, 64), 256)]
CPU_TOKENS = [256]


def make_inputs(n, weights, n_in, rank, dtype, device, lora_grads=True) -> Inputs:
    """x (n, in), the weights, per member A (r, in) and B (out, r), dy (n, Σ out)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    x = rnd(n, n_in).requires_grad_()
    lora = []
    for w in weights:
        n_out = w.shape[0]
        lora += [rnd(rank, n_in, std=n_in**-0.5).requires_grad_(lora_grads),
                 rnd(n_out, rank, std=n_out**-0.5).requires_grad_(lora_grads)]
    total = sum(w.shape[0] for w in weights)
    return Inputs(args=(x, *lora), wrt=(x, *lora) if lora_grads else (x,), grad_out=rnd(n, total))


def providers(device: str, weights, scale: float, p: float) -> dict:
    """name -> fn(x, A_1, B_1, …) -> y (N, Σ out)."""

    def members(lora):
        return [GroupMember(w, None, a, b, scale, p) for w, a, b in zip(weights, lora[0::2], lora[1::2])]

    def separate(x, *lora):
        return torch.cat([lora_linear(x, w, a, b, scale, dropout_p=p, training=True)
                          for w, a, b in zip(weights, lora[0::2], lora[1::2])], dim=-1)

    def grouped(x, *lora):
        return lora_linear_group(x, members(lora))

    def reference(x, *lora):
        return lora_linear_group_ref(x, members(lora))

    found = {"torch": reference}
    if device == "cuda":
        found.update(separate=separate, grouped=grouped)
    return found


def base_of(weights):
    def base(x, *lora):
        dense = [dequantize_frozen(w, x.dtype) for w in weights]
        return F.linear(x, torch.cat(dense))
    return base


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__)
    add_lora_options(parser)
    parser.add_argument("--fp8", action="store_true", help="FP8 base weights (e4m3, per-row scales)")
    args = parser.parse_args(argv)
    if args.nf4 and args.fp8:
        parser.error("--nf4 and --fp8: choose one base format")

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    groups, tokens = bench_shapes(device, args.quick, (GPU_GROUPS, GPU_TOKENS), (QUICK_GROUPS, QUICK_TOKENS),
                                  (CPU_GROUPS, CPU_TOKENS))
    extra = {"dtype": dtype_name(dtype), "rank": args.rank, "dropout": args.dropout,
             "base": "nf4" if args.nf4 else "fp8" if args.fp8 else "dense"}
    records = []
    for name, outs, n_in in groups:
        weights = [make_weight(n_out, n_in, dtype, device, args.nf4) for n_out in outs]
        if args.fp8:
            weights = [quantize_fp8(w) for w in weights]
        for n in args.tokens or tokens:
            shape, row = (n, n_in, sum(outs)), {**extra, "group": name}
            inputs = functools.partial(make_inputs, n, weights, n_in, args.rank, dtype, device)
            records += measure_modes("lora_group", {"base": base_of(weights)},
                                     functools.partial(inputs, lora_grads=False), shape, device, extra=row,
                                     quick=args.quick)
            records += measure_modes("lora_group", providers(device, weights, args.scale, args.dropout), inputs,
                                     shape, device, extra=row, quick=args.quick)
    notes = f"shape (N, in, Σ out); r={args.rank}, s={args.scale}, dropout={args.dropout}, base {extra['base']}"
    if device != "cuda":
        notes += "; grouped and separate (Triton) not run on a CPU"
    return report("lora_group_fp8" if args.fp8 else "lora_group", records, device, args, notes=notes)


if __name__ == "__main__":
    main()
