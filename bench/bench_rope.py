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
4,096, 8,192 and 16,384 tokens (2 rows). On a CPU: one small fp32 shape with ours in the Triton
interpreter — it only proves the script runs (do not commit those results).

Run from the repository root: ``python -m bench.bench_rope``.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # our Triton path on a CPU needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import Record, bench_device, copy_bandwidth_gbps, format_table, measure, write_results  # noqa: E402
from kernels.backend import force_triton  # noqa: E402
from kernels.rope import apply_rope, apply_rope_ref, rope_inv_freq  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
GPU_SHAPES = [(2, n // 2, 32, 8, 128) for n in (4096, 8192, 16_384)]  # (B, T, n_heads, n_kv, hd)
CPU_SHAPES = [(2, 32, 4, 2, 64)]
PASSES = {"forward": 2, "backward": 2, "full": 4}  # reads + writes of q and k


def ours(q, k, pos, inv_freq):
    with force_triton():
        return apply_rope(q, k, pos, inv_freq)


def providers(compile_: bool) -> dict:
    found = {"torch": apply_rope_ref, "ours": ours}
    if compile_:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):  # lets the backward alone run on a retained graph
            functorch_config.donated_buffer = False
        found["torch.compile"] = torch.compile(apply_rope_ref)
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


def bench_shape(name, fn, shape, dtype, device, copy_bw) -> list[Record]:
    B, T, nh, nkv, hd = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, dq = (torch.randn(B, T, nh, hd, generator=g, device=device, dtype=dtype) for _ in range(2))
    k, dk = (torch.randn(B, T, nkv, hd, generator=g, device=device, dtype=dtype) for _ in range(2))
    q.requires_grad_()
    k.requires_grad_()
    pos, inv_freq = packed_positions(B, T, device), rope_inv_freq(hd, 500000.0, LLAMA3).to(device)
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    modes = {
        "forward": lambda: fn(q, k, pos, inv_freq),
        "full": lambda: torch.autograd.grad(fn(q, k, pos, inv_freq), (q, k), (dq, dk)),
    }
    out = fn(q, k, pos, inv_freq)
    modes["backward"] = lambda: torch.autograd.grad(out, (q, k), (dq, dk), retain_graph=True)
    extra = {"dtype": str(dtype).removeprefix("torch.")}
    records = []
    for mode, call in modes.items():
        try:
            timing = measure(call, device)
        except RuntimeError as err:
            print(f"{name} {mode}: not measurable ({err})")
            continue
        records.append(Record("rope", name, shape, mode, timing, bytes_moved=PASSES[mode] * qk_bytes,
                              copy_bw_gbps=copy_bw, extra=extra))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts, 2 rows (default: the device's list)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(2, n // 2, 32, 8, 128) for n in args.tokens] if args.tokens else (
        GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for shape in shapes:
        for name, fn in providers(compile_=not args.no_compile).items():
            records += bench_shape(name, fn, shape, dtype, device, copy_bw)
            if device == "cuda":
                torch.cuda.empty_cache()  # one provider's cached blocks must not hide another's peak
    print(f"measured copy bandwidth: {copy_bw:.1f} GB/s")
    print(format_table(records))
    notes = ("shape (B, T, n_heads, n_kv, hd); llama3 frequencies; packed positions; "
             "bytes_moved: q and k read + written per pass")
    if device != "cuda":
        notes += "; CPU run at a small shape: ours runs in the Triton interpreter, timings say nothing about a GPU"
    if not args.no_save:
        print(write_results("rope", records, device, notes=notes, copy_bw_gbps=copy_bw))


if __name__ == "__main__":
    main()
