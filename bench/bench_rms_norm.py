"""Benchmark: RMSNorm ``x · rsqrt(mean(x²) + eps) · w``, ours against eager torch, torch.compile, Liger.

Providers: ``torch`` (``kernels.rms_norm.rms_norm_ref``, eager), ``torch.compile`` (the same
function compiled; ``--no-compile`` skips it), ``ours`` (``kernels.rms_norm.rms_norm`` on its
Triton path) and ``liger`` (``LigerRMSNormFunction``, HF casting mode, when ``liger_kernel`` is
installed). Modes: ``forward`` (a training forward, grad enabled), ``backward`` (alone, on a
retained graph; dX and, unless ``--frozen-weight``, dW) and ``full``.

Bandwidth: the bytes the op must move at least — forward reads x and writes y (2 tensors of N·H
elements), backward reads dy and x and writes dx (3), full 5; the weight and the per-row
reciprocal RMS are negligible — over the median time, and its share of the measured copy
bandwidth (target on H100/H200: ≥ 85 %). On a GPU: bf16, H = 4,096 at 4,096, 8,192 and 16,384
tokens. On a CPU: one small fp32 shape with ours in the Triton interpreter — it only proves the
script runs (do not commit those results).

Run from the repository root: ``python -m bench.bench_rms_norm [--frozen-weight]``.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # our Triton path on a CPU needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import Record, bench_device, copy_bandwidth_gbps, format_table, measure, write_results  # noqa: E402
from kernels.backend import force_triton  # noqa: E402
from kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402

GPU_SHAPES = [(n, 4096) for n in (4096, 8192, 16_384)]  # (tokens, hidden)
CPU_SHAPES = [(64, 576)]
TENSORS_MOVED = {"forward": 2, "backward": 3, "full": 5}
EPS = 1e-5


def ours(x, w):
    with force_triton():
        return rms_norm(x, w, EPS)


def providers(compile_: bool) -> dict:
    found = {"torch": lambda x, w: rms_norm_ref(x, w, EPS), "ours": ours}
    if compile_:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):  # lets the backward alone run on a retained graph
            functorch_config.donated_buffer = False
        found["torch.compile"] = torch.compile(lambda x, w: rms_norm_ref(x, w, EPS))
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return found
    # offset 0, HF ("llama") casting, in_place=False: dY must survive repeated backward timings
    found["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    return found


def bench_shape(name, fn, shape, dtype, device, copy_bw, frozen_weight) -> list[Record]:
    g = torch.Generator(device=device).manual_seed(0)
    x, dy = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=device)).to(dtype)
    x.requires_grad_()
    w.requires_grad_(not frozen_weight)
    inputs = (x,) if frozen_weight else (x, w)
    element_bytes = x.numel() * x.element_size()
    modes = {
        "forward": lambda: fn(x, w),
        "full": lambda: torch.autograd.grad(fn(x, w), inputs, dy),
    }
    y = fn(x, w)
    modes["backward"] = lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    extra = {"dtype": str(dtype).removeprefix("torch."), "weight": "frozen" if frozen_weight else "trainable"}
    records = []
    for mode, call in modes.items():
        try:
            timing = measure(call, device)
        except RuntimeError as err:
            print(f"{name} {mode}: not measurable ({err})")
            continue
        records.append(Record("rms_norm", name, shape, mode, timing, bytes_moved=TENSORS_MOVED[mode] * element_bytes,
                              copy_bw_gbps=copy_bw, extra=extra))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--hidden", type=int, default=4096, help="H, with --tokens")
    parser.add_argument("--frozen-weight", action="store_true", help="weight.requires_grad = False (LoRA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(n, args.hidden) for n in args.tokens] if args.tokens else (
        GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for shape in shapes:
        for name, fn in providers(compile_=not args.no_compile).items():
            records += bench_shape(name, fn, shape, dtype, device, copy_bw, args.frozen_weight)
            if device == "cuda":
                torch.cuda.empty_cache()  # one provider's cached blocks must not hide another's peak
    print(f"measured copy bandwidth: {copy_bw:.1f} GB/s")
    print(format_table(records))
    notes = (f"bytes_moved: forward 2, backward 3, full 5 tensors of tokens x hidden; eps {EPS}; "
             f"weight {'frozen' if args.frozen_weight else 'trainable'}")
    if device != "cuda":
        notes += "; CPU run at a small shape: ours runs in the Triton interpreter, timings say nothing about a GPU"
    if not args.no_save:
        print(write_results("rms_norm", records, device, notes=notes, copy_bw_gbps=copy_bw))


if __name__ == "__main__":
    main()
