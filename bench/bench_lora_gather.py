"""Benchmark: a batch whose rows use different adapters, as one gathered op vs a loop over adapters.

Providers, each computing ``y = x·Wᵀ + s_k · (x·A_kᵀ)·B_kᵀ`` for x (N, in), a frozen W (out, in)
and K adapters stacked as A (K, r, in), B (K, out, r), row n on adapter ``ids[n]`` (-1 on some
rows: the base alone), forward only (inference, `kernels.lora_gather`):

* ``base``: the bare base product ``x @ Wᵀ``: the floor;
* ``torch``: the base product, then the reference ``kernels.lora_gather.lora_gather_ref`` (one
  index, two small matmuls and a scatter per adapter: what a Python loop over adapters does);
* ``triton``: the base product, then ``kernels.lora_gather.lora_gather`` with the rows sorted
  once for the batch (``gather_rows``, shared by every layer of a model, so not timed here) —
  GPU only.

Shapes (GPU): Llama-3-8B's q (4096 × 4096), gate/up (14336 × 4096) and down (4096 × 14336) at
decode batches of 8 and 64 rows (one token each) and a 2,048-token prefill, K = 4 adapters of
rank 16, bf16 (``--quick``: gate/up at 64 rows and 2,048). On a CPU the bench runs the torch
provider at small shapes and says so (Triton would run in its interpreter); do not commit CPU
results. No target is checked yet (bench.targets): the figure to read is triton / base.

Run from the repository root: ``python -m bench.bench_lora_gather [--quick] [--adapters 4] [--rank 16]``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, bench_shapes, dtype_name,
                          measure_modes, report)
from kernels.lora_gather import gather_rows, lora_gather, lora_gather_ref

# (name, out, in) of the weight, as in the checkpoints
GPU_LAYERS = [("llama3-8b.q", 4096, 4096), ("llama3-8b.gate_up", 14336, 4096), ("llama3-8b.down", 4096, 14336)]
GPU_TOKENS = [8, 64, 2048]
QUICK_LAYERS = [("llama3-8b.gate_up", 14336, 4096)]
QUICK_TOKENS = [64, 2048]
CPU_LAYERS = [("small.square", 512, 512)]
CPU_TOKENS = [16, 256]


def make_inputs(n, n_out, n_in, k, rank, dtype, device) -> Inputs:
    """x (n, in), W, A (K, r, in), B (K, out, r), scales (K,), ids (n,) with ~1 row in 8 on the
    base, and the sorted rows."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    ids = torch.randint(0, k, (n,), generator=g, device=device)
    ids[::8] = -1
    args = (rnd(n, n_in), rnd(n_out, n_in, std=n_in**-0.5), rnd(k, rank, n_in, std=n_in**-0.5),
            rnd(k, n_out, rank, std=rank**-0.5), torch.full((k,), 2.0, device=device), ids, gather_rows(ids, k))
    return Inputs(args=args)


def base(x, w, a, b, scales, ids, rows):
    return F.linear(x, w)


def torch_loop(x, w, a, b, scales, ids, rows):
    return lora_gather_ref(F.linear(x, w), x, a, b, scales, ids)


def triton_gather(x, w, a, b, scales, ids, rows):
    return lora_gather(F.linear(x, w), x, a, b, scales, ids, rows=rows)


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, nargs="*", help="rows N (default: the device's list)")
    parser.add_argument("--adapters", type=int, default=4, help="K, the adapters stacked (default: 4)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    layers, tokens = bench_shapes(device, args.quick, (GPU_LAYERS, GPU_TOKENS), (QUICK_LAYERS, QUICK_TOKENS),
                                  (CPU_LAYERS, CPU_TOKENS))
    providers = {"base": base, "torch": torch_loop}
    if device == "cuda":  # on a CPU triton would run in the interpreter, which times Python
        providers["triton"] = triton_gather
    extra = {"dtype": dtype_name(dtype), "rank": args.rank, "adapters": args.adapters}
    records = []
    with torch.inference_mode():
        for layer, n_out, n_in in layers:
            for n in args.tokens or tokens:
                inputs = functools.partial(make_inputs, n, n_out, n_in, args.adapters, args.rank, dtype, device)
                records += measure_modes("lora_gather", providers, inputs, (n, n_in, n_out), device,
                                         modes=("forward",), extra={**extra, "layer": layer}, quick=args.quick)
    notes = f"shape (N, in, out); K={args.adapters} adapters, r={args.rank}, 1 row in 8 on the base; forward only"
    if device != "cuda":
        notes += "; triton not run on a CPU"
    return report("lora_gather", records, device, args, notes=notes)


if __name__ == "__main__":
    main()
