"""Benchmark: document-causal attention, today's dense-mask path against `models.attention`.

Providers: ``dense`` (what `models.llama` did for every packed or padded batch: the (B, 1, T, T)
boolean mask of `build_attention_mask` and one ``F.scaled_dot_product_attention(..., enable_gqa)``),
``document`` (`models.attention.document_attention`: per-document SDPA on a CPU, FlexAttention on
CUDA). One row of T tokens cut into ``--docs`` documents of mixed lengths, SmolLM2-135M heads
(nh 9, nkv 3, hd 64) by default; mode ``full`` = forward + backward of the attention alone.

Each provider runs in a fresh subprocess, so that its peak memory is its own: on a CPU the rise
of the peak resident set (``ru_maxrss``) over the inputs, on CUDA the allocator's peak over them.
Time: median of ``--reps`` calls after one warm-up.

Measured on the development CPU (2 cores shared with other jobs, load ~4.5, so times are noisy;
OMP_NUM_THREADS=1, fp32, SmolLM2 heads, 8 documents; ``python -m bench.bench_attention``), two
runs at 4,096 tokens and one at 8,192 (``--tokens 8192 --reps 1``):

    tokens  provider   median_ms        peak_extra_MB
    4,096   dense      7,100 / 7,948    226 / 181
    4,096   document     722 / 1,130     97 /  64
    8,192   dense      77,045           389
    8,192   document    5,581           102

The dense path is ~7-14x slower (CPU flash with a mask computes all T² scores and reads the
mask; the document path skips the cross-document blocks) and its extra memory grows with T²
(the bool mask, 16.8 MB at 4,096 and 67 MB at 8,192, plus the fp32 additive mask SDPA makes
of it); the document path's grows with T. Peaks are rises of ru_maxrss: coarse, a few tens of MB.

Run from the repository root: ``python -m bench.bench_attention [--tokens 4096] [--docs 8]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from models.attention import DocumentLayout, document_attention
from models.llama import build_attention_mask


def doc_lengths(T: int, docs: int) -> list[int]:
    """Mixed lengths (ratios 1, 2, 3, ...) summing to T, the last one taking the remainder."""
    weights = [1 + (i * 5) % docs for i in range(docs)]
    lengths = [max(1, T * w // sum(weights)) for w in weights[:-1]]
    return lengths + [T - sum(lengths)]


def run_one(provider: str, T: int, docs: int, nh: int, nkv: int, hd: int, dtype: torch.dtype,
            device: str, reps: int, warm: bool = True) -> dict:
    if warm:  # one tiny call first: one-time initialisation (thread pools, kernels) is not the op's memory
        run_one(provider, 64, min(docs, 4), nh, nkv, hd, dtype, device, reps=1, warm=False)
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, nh, T, hd, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(1, nkv, T, hd, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(1, nkv, T, hd, device=device, dtype=dtype, generator=g, requires_grad=True)
    dy = torch.randn(1, nh, T, hd, device=device, dtype=dtype, generator=g)
    lengths = doc_lengths(T, docs)
    segment_ids = torch.repeat_interleave(torch.arange(docs), torch.tensor(lengths))[None].to(device)

    def step():
        if provider == "dense":
            mask = build_attention_mask(None, segment_ids, None, 0, T, torch.device(device))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, enable_gqa=nh != nkv)
        else:
            y = document_attention(q, k, v, DocumentLayout.from_lengths([lengths], device))
        torch.autograd.grad(y, (q, k, v), dy)

    if device == "cuda":  # peak over the inputs, warm-up included (ru_maxrss never goes down)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (and compilation on CUDA)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"provider": provider, "tokens": T, "docs": docs, "lengths": lengths, "heads": [nh, nkv, hd],
            "dtype": str(dtype), "device": device, "median_ms": sorted(times)[len(times) // 2],
            "peak_extra_bytes": peak}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("NH", "NKV", "HD"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--provider", help=argparse.SUPPRESS)  # internal: run one provider, print JSON
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.provider:
        print(json.dumps(run_one(args.provider, args.tokens, args.docs, *args.heads, getattr(torch, args.dtype),
                                 device, args.reps)))
        return
    print(f"{'provider':10} {'median_ms':>10} {'peak_extra_MB':>14}   (T={args.tokens}, {args.docs} docs, "
          f"heads {args.heads}, {args.dtype}, {device})")
    for provider in ("dense", "document"):
        cmd = [sys.executable, "-m", "bench.bench_attention", "--provider", provider, "--tokens", str(args.tokens),
               "--docs", str(args.docs), "--heads", *map(str, args.heads), "--dtype", args.dtype,
               "--reps", str(args.reps)]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{provider:10} {row['median_ms']:10.1f} {row['peak_extra_bytes'] / 2**20:14.1f}")


if __name__ == "__main__":
    main()
