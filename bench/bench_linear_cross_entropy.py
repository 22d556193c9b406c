"""Benchmark: LM head + cross-entropy, ours (chunked, fused) against eager torch, torch.compile, Liger.

Providers, each computing the mean cross-entropy of ``hidden (N, H) @ weight (V, H)ᵀ`` and its
gradients for hidden and (unless ``--frozen-head``) the weight:

* ``torch``: ``F.cross_entropy(hidden @ weight.T, labels)``, materialising the (N, V) logits;
* ``torch.compile``: the same function compiled (skipped with ``--no-compile``);
* ``ours``: ``kernels.linear_cross_entropy.linear_cross_entropy`` on its Triton path;
* ``liger``: ``LigerFusedLinearCrossEntropyLoss`` when ``liger_kernel`` is installed.

Modes: ``forward`` is a training forward (grad enabled: ours and Liger already compute the
gradients there), ``backward`` the backward alone on a retained graph (for ours and Liger only a
rescale of those gradients), ``full`` both — the fair comparison. Timing quantiles and the peak
memory above the inputs come from bench.common. On a GPU the default shapes are Llama-3's head
(V = 128,256, H = 4,096, bf16) at 4,096, 8,192 and 16,384 tokens; on a CPU, small fp32 shapes with
our kernels in the Triton interpreter, which says nothing about GPU speed (do not commit those).

Run from the repository root: ``python -m bench.bench_linear_cross_entropy [--frozen-head]``.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # our Triton path on a CPU needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import Record, bench_device, format_table, measure, write_results  # noqa: E402
from kernels.backend import force_triton  # noqa: E402
from kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

GPU_SHAPES = [(4096, 4096, 128_256), (8192, 4096, 128_256), (16_384, 4096, 128_256)]  # (N, H, V)
CPU_SHAPES = [(64, 128, 32_000)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_loss(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.T, labels)


def ours_loss(hidden, weight, labels):
    with force_triton():
        return linear_cross_entropy(hidden, weight, labels)


def providers(compile_: bool) -> dict:
    found = {"torch": eager_loss, "ours": ours_loss}
    if compile_:
        found["torch.compile"] = torch.compile(eager_loss)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return found
    liger = LigerFusedLinearCrossEntropyLoss()
    found["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    return found


def make_inputs(n, h, v, dtype, device, frozen_head):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5)
    weight.requires_grad_(not frozen_head)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::4] = -100  # a quarter of the tokens are prompt tokens
    return hidden, weight, labels


def bench_shape(name, fn, shape, dtype, device, frozen_head) -> list[Record]:
    hidden, weight, labels = make_inputs(*shape, dtype, device, frozen_head)
    inputs = [hidden] if frozen_head else [hidden, weight]
    extra = {"dtype": str(dtype).removeprefix("torch."), "head": "frozen" if frozen_head else "trainable"}

    def forward():
        return fn(hidden, weight, labels)

    def full():
        return torch.autograd.grad(fn(hidden, weight, labels), inputs)

    loss = forward()
    records = [Record("linear_ce", name, shape, "forward", measure(forward, device), extra=extra),
               Record("linear_ce", name, shape, "full", measure(full, device), extra=extra)]
    try:
        backward = measure(lambda: torch.autograd.grad(loss, inputs, retain_graph=True), device)
        records.append(Record("linear_ce", name, shape, "backward", backward, extra=extra))
    except RuntimeError as err:  # a compiled graph may refuse a retained second backward
        print(f"{name}: backward alone not measurable ({err})")
    return records


def ratios(records: list[Record]) -> str:
    """ours / torch for time and peak memory, per shape, in the ``full`` mode."""
    full = {(r.provider, tuple(r.shape)): r.timing for r in records if r.mode == "full"}
    lines = []
    for (provider, shape), ours in full.items():
        ref = full.get(("torch", shape))
        if provider != "ours" or ref is None:
            continue
        line = f"{shape}: time ours/torch {ours.median_ms / ref.median_ms:.3f}"
        if ours.peak_mem_bytes and ref.peak_mem_bytes:
            line += f", peak memory ours/torch {ours.peak_mem_bytes / ref.peak_mem_bytes:.3f}"
        lines.append(line)
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's shape list)")
    parser.add_argument("--hidden", type=int, default=None, help="H, with --tokens")
    parser.add_argument("--vocab", type=int, default=None, help="V, with --tokens")
    parser.add_argument("--frozen-head", action="store_true", help="weight.requires_grad = False (LoRA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if args.tokens:
        h, v = args.hidden or shapes[0][1], args.vocab or shapes[0][2]
        shapes = [(n, h, v) for n in args.tokens]
    records = []
    for shape in shapes:
        for name, fn in providers(compile_=not args.no_compile).items():
            records += bench_shape(name, fn, shape, dtype, device, args.frozen_head)
            if device == "cuda":
                torch.cuda.empty_cache()  # one provider's cached blocks must not hide another's peak
    print(format_table(records))
    summary = ratios(records)
    print(summary)
    notes = (f"mean CE with a quarter of labels ignored; head {'frozen' if args.frozen_head else 'trainable'}; "
             f"{summary}")
    if device != "cuda":
        notes += "; CPU run: ours runs in the Triton interpreter, timings say nothing about a GPU"
    if not args.no_save:
        print(write_results("linear_cross_entropy", records, device, notes=notes))


if __name__ == "__main__":
    main()
