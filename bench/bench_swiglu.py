"""Benchmark: SwiGLU ``silu(gate) * up``, ours against eager torch, torch.compile and Liger.

Providers: ``torch`` (``kernels.swiglu.swiglu_ref``, eager), ``torch.compile`` (the same function
compiled; ``--no-compile`` skips it), ``ours`` (``kernels.swiglu.swiglu`` on its Triton path) and
``liger`` (``LigerSiLUMulFunction``, when ``liger_kernel`` is installed). Modes: ``forward`` (a
training forward, grad enabled), ``backward`` (alone, on a retained graph) and ``full``.

Bandwidth: the bytes the op must move at least — forward reads gate and up and writes y (3 tensors
of N·I elements), backward reads dy, gate, up and writes d_gate, d_up (5), full 8 — over the
median time, and its share of the measured copy bandwidth (target on H100/H200: ≥ 85 %).
On a GPU: bf16, Llama intermediate sizes 11,008 (Llama 2 7B) and 14,336 (Llama 3 8B) at 4,096,
8,192 and 16,384 tokens. On a CPU: one small fp32 shape with ours in the Triton interpreter — it
only proves the script runs (do not commit those results).

Run from the repository root: ``python -m bench.bench_swiglu``.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # our Triton path on a CPU needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import Record, bench_device, copy_bandwidth_gbps, format_table, measure, write_results  # noqa: E402
from kernels.backend import force_triton  # noqa: E402
from kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

GPU_SHAPES = [(n, i) for i in (11_008, 14_336) for n in (4096, 8192, 16_384)]  # (tokens, intermediate)
CPU_SHAPES = [(64, 1000)]
TENSORS_MOVED = {"forward": 3, "backward": 5, "full": 8}


def ours(gate, up):
    with force_triton():
        return swiglu(gate, up)


def providers(compile_: bool) -> dict:
    found = {"torch": swiglu_ref, "ours": ours}
    if compile_:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):  # lets the backward alone run on a retained graph
            functorch_config.donated_buffer = False
        found["torch.compile"] = torch.compile(swiglu_ref)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return found
    found["liger"] = LigerSiLUMulFunction.apply
    return found


def bench_shape(name, fn, shape, dtype, device, copy_bw) -> list[Record]:
    g = torch.Generator(device=device).manual_seed(0)
    gate, up, dy = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    gate.requires_grad_()
    up.requires_grad_()
    element_bytes = gate.numel() * gate.element_size()
    modes = {
        "forward": lambda: fn(gate, up),
        "full": lambda: torch.autograd.grad(fn(gate, up), (gate, up), dy),
    }
    y = fn(gate, up)
    modes["backward"] = lambda: torch.autograd.grad(y, (gate, up), dy, retain_graph=True)
    extra = {"dtype": str(dtype).removeprefix("torch.")}
    records = []
    for mode, call in modes.items():
        try:
            timing = measure(call, device)
        except RuntimeError as err:
            print(f"{name} {mode}: not measurable ({err})")
            continue
        records.append(Record("swiglu", name, shape, mode, timing, bytes_moved=TENSORS_MOVED[mode] * element_bytes,
                              copy_bw_gbps=copy_bw, extra=extra))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--intermediate", type=int, default=14_336, help="I, with --tokens")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(n, args.intermediate) for n in args.tokens] if args.tokens else (
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
    notes = "bytes_moved: forward 3, backward 5, full 8 tensors of tokens x intermediate"
    if device != "cuda":
        notes += "; CPU run at a small shape: ours runs in the Triton interpreter, timings say nothing about a GPU"
    if not args.no_save:
        print(write_results("swiglu", records, device, notes=notes, copy_bw_gbps=copy_bw))


if __name__ == "__main__":
    main()
