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

from bench.common import Inputs, PeerOp, bench_device, bench_parser, bench_shapes, run_peer_op
from kernels.rope import apply_rope, apply_rope_ref, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
GPU_SHAPES = [(2, n // 2, 32, 8, 128) for n in (4096, 8192, 16_384)]  # (B, T, n_heads, n_kv, hd)
QUICK_SHAPES = [(2, 8192, 32, 8, 128)]
CPU_SHAPES = [(2, 32, 4, 2, 64)]


def bytes_moved(shape, dtype) -> dict[str, int]:
    """Least traffic per mode: forward reads q, k and writes them rotated; backward the same for
    their gradients; full both — 2, 2 and 4 passes over q and k."""
    B, T, nh, nkv, hd = shape
    qk = B * T * (nh + nkv) * hd * dtype.itemsize
    return {"forward": 2 * qk, "backward": 2 * qk, "full": 4 * qk}


def liger():
    from liger_kernel.ops.rope import LigerRopeFunction

    tables = {}  # (positions, T) -> the HF-style (B, T, hd) cos/sin table, built outside the timing

    def rope(q, k, pos, inv_freq):
        key = (pos.data_ptr(), q.shape[1])
        if key not in tables:
            angles = pos.float()[..., None] * inv_freq
            emb = torch.cat([angles, angles], dim=-1)
            tables[key] = (emb.cos().to(q.dtype), emb.sin().to(q.dtype))
        cos, sin = tables[key]
        qo, ko = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, heads, T, hd)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return rope


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


ROPE = PeerOp("rope", "rope", apply_rope_ref, apply_rope, liger, make_inputs, bytes_moved)


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__, compile_provider=True)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts, 2 rows (default: the device's list)")
    args = parser.parse_args(argv)
    shapes = [(2, n // 2, 32, 8, 128) for n in args.tokens] if args.tokens else (
        bench_shapes(bench_device(), args.quick, GPU_SHAPES, QUICK_SHAPES, CPU_SHAPES))
    notes = ("shape (B, T, n_heads, n_kv, hd); llama3 frequencies; packed positions; "
             "bytes_moved: q and k read + written per pass")
    return run_peer_op(ROPE, args, shapes, notes=notes)


if __name__ == "__main__":
    main()
