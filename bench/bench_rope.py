"""Benchmark: RoPE on q and k, ours against eager torch, torch.compile and Liger.

Providers: ``torch`` (``kernels.rope.apply_rope_ref``, eager, cos/sin computed inside),
``torch.compile`` (the same function compiled; ``--no-compile`` skips it), ``ours``
(``kernels.rope.apply_rope`` on its Triton path, cos/sin computed in the kernel from
position_ids) and ``liger`` (``LigerRopeFunction`` when ``liger_kernel`` is installed; it takes a
precomputed (B, T, hd) cos/sin table, built outside the timed region, which favours it). Modes:
``forward`` (a training forward, grad enabled), ``backward`` (alone, on a retained graph) and
``full``. Positions are packed: every row holds two documents, the second restarting at 0.

Bandwidth: the bytes the op must move at least — forward reads q and k and writes both rotated
(2 × (n_heads + n_kv) · hd · tokens elements), backward the same for the gradients, full twice
that — over the median time, and its share of the measured copy bandwidth (target on
H100/H200: ≥ 85 %). On a GPU: bf16, Llama 3 8B heads (32 q, 8 kv, hd 128, llama3 frequencies) at
4,096, 8,192 and 16,384 tokens (2 rows; ``--quick``: 16,384). On a CPU: one small fp32 shape with ours in the Triton
interpreter — it only proves the script runs (do not commit those results).

Run from the repository root: ``python -m bench.bench_rope [--quick] [--tokens N ...]``.
"""

from __future__ import annotations

import torch

from bench.common import (Inputs, bench_device, bench_dtype, bench_parser, compiled, copy_bandwidth_gbps,
                          dtype_name, forced_triton, measure_modes, report)
from kernels.rope import apply_rope, apply_rope_ref, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
GPU_SHAPES = [(2, n // 2, 32, 8, 128) for n in (4096, 8192, 16_384)]  # (B, T, n_heads, n_kv, hd)
QUICK_SHAPES = [(2, 8192, 32, 8, 128)]
CPU_SHAPES = [(2, 32, 4, 2, 64)]
PASSES = {"forward": 2, "backward": 2, "full": 4}  # reads + writes of q and k


def providers(compile_: bool) -> dict:
    found = {"torch": apply_rope_ref, "ours": forced_triton(apply_rope)}
    if compile_:
        found["torch.compile"] = compiled(apply_rope_ref)
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return found

    def liger(q, k, pos, inv_freq, _tables={}):
        key = (pos.data_ptr(), q.shape[1])
        if key not in _tables:  # the HF-style table, built once per input outside the timing
            angles = pos.float()[..., None] * inv_freq
            emb = torch.cat([angles, angles], dim=-1)
            _tables[key] = (emb.cos().to(q.dtype), emb.sin().to(q.dtype))
        cos, sin = _tables[key]
        qo, ko = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, heads, T, hd)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    found["liger"] = liger
    return found


def packed_positions(B, T, device):
    """Two documents per row: positions 0..T/2-1 then a restart at 0."""
    half = T // 2
    row = torch.cat([torch.arange(T - half), torch.arange(half)])
    return row.repeat(B, 1).to(device)


def make_inputs(shape, dtype, device) -> Inputs:
    B, T, nh, nkv, hd = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, dq = (torch.randn(B, T, nh, hd, generator=g, device=device, dtype=dtype) for _ in range(2))
    k, dk = (torch.randn(B, T, nkv, hd, generator=g, device=device, dtype=dtype) for _ in range(2))
    q.requires_grad_()
    k.requires_grad_()
    pos, inv_freq = packed_positions(B, T, device), rope_inv_freq(hd, 500000.0, LLAMA3).to(device)
    return Inputs(args=(q, k, pos, inv_freq), wrt=(q, k), grad_out=(dq, dk))


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts, 2 rows (default: the device's list)")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    shapes = [(2, n // 2, 32, 8, 128) for n in args.tokens] if args.tokens else (
        CPU_SHAPES if device != "cuda" else QUICK_SHAPES if args.quick else GPU_SHAPES)
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for shape in shapes:
        B, T, nh, nkv, hd = shape
        qk_bytes = B * T * (nh + nkv) * hd * dtype.itemsize
        records += measure_modes("rope", providers(compile_=not args.no_compile),
                                 lambda: make_inputs(shape, dtype, device), shape, device,
                                 bytes_moved={m: k * qk_bytes for m, k in PASSES.items()},
                                 copy_bw_gbps=copy_bw, extra={"dtype": dtype_name(dtype)}, quick=args.quick)
    notes = ("shape (B, T, n_heads, n_kv, hd); llama3 frequencies; packed positions; "
             "bytes_moved: q and k read + written per pass")
    return report("rope", records, device, args, notes=notes, copy_bw_gbps=copy_bw)


if __name__ == "__main__":
    main()
