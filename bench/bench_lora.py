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
Llama-2-7B and Llama-3-8B as weight (out, in), at 2,048, 8,192 and 16,384 tokens, r = 16, bf16.
The summary gives, per shape in the ``full`` mode, ours / base (target ≤ 1.10) and peft / ours
(target ≥ 1.5). On a CPU the bench runs the references at small shapes and says so (Triton would
run in its interpreter, which says nothing about speed); do not commit CPU results.

Run from the repository root: ``python -m bench.bench_lora [--tokens 8192] [--nf4] [--dropout 0.05]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import Record, bench_device, format_table, measure, write_results
from kernels.lora import lora_linear, lora_linear_ref
from kernels.nf4 import dequantize_nf4, quantize_nf4

# (name, out, in) of the weight, as in the checkpoints
GPU_LAYERS = [
    ("llama2-7b.attn", 4096, 4096), ("llama2-7b.gate_up", 11008, 4096), ("llama2-7b.down", 4096, 11008),
    ("llama3-8b.gate_up", 14336, 4096), ("llama3-8b.down", 4096, 14336), ("llama3-8b.kv", 1024, 4096),
]
GPU_TOKENS = [2048, 8192, 16384]
CPU_LAYERS = [("small.square", 512, 512), ("small.down", 256, 1024)]
CPU_TOKENS = [256]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(n, n_out, n_in, rank, dtype, device, nf4):
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    weight = rnd(n_out, n_in, std=n_in**-0.5)
    if nf4:
        weight = quantize_nf4(weight.float().cpu()).to(device)
    return {"x": rnd(n, n_in).requires_grad_(), "weight": weight,
            "lora_A": rnd(rank, n_in, std=n_in**-0.5).requires_grad_(),
            "lora_B": rnd(n_out, rank, std=n_out**-0.5).requires_grad_(), "dy": rnd(n, n_out)}


def providers(device: str, scale: float, p: float) -> dict:
    """name -> (fn(x, weight, A, B) -> y, names of the inputs it differentiates)."""

    def dense(weight, dtype):  # peft and base dequantize an NF4 weight the way bitsandbytes' Linear4bit does
        return weight if isinstance(weight, torch.Tensor) else dequantize_nf4(weight, dtype)

    def base(x, weight, a, b):
        return F.linear(x, dense(weight, x.dtype))

    def peft(x, weight, a, b):
        return F.linear(x, dense(weight, x.dtype)) + F.linear(F.linear(F.dropout(x, p), a), b) * scale

    def reference(x, weight, a, b):
        return lora_linear_ref(x, weight, a, b, scale, dropout_p=p, training=True)

    def ours(x, weight, a, b):
        return lora_linear(x, weight, a, b, scale, dropout_p=p, training=True)

    lora_grads = ("x", "lora_A", "lora_B")
    found = {"base": (base, ("x",)), "peft": (peft, lora_grads), "torch": (reference, lora_grads)}
    if device == "cuda":
        found["ours"] = (ours, lora_grads)
    return found


def bench_shape(name, fn, grad_names, layer, n, inputs, device, extra) -> list[Record]:
    layer_name, n_out, n_in = layer
    shape = (n, n_in, n_out)
    extra = {**extra, "layer": layer_name}
    args = [inputs[k] for k in ("x", "weight", "lora_A", "lora_B")]
    wrt = [inputs[k] for k in grad_names]

    def forward():
        return fn(*args)

    def full():
        return torch.autograd.grad(fn(*args), wrt, inputs["dy"])

    y = forward()
    backward = measure(lambda: torch.autograd.grad(y, wrt, inputs["dy"], retain_graph=True), device)
    return [Record("lora_linear", name, shape, "forward", measure(forward, device), extra=extra),
            Record("lora_linear", name, shape, "backward", backward, extra=extra),
            Record("lora_linear", name, shape, "full", measure(full, device), extra=extra)]


def ratios(records: list[Record]) -> str:
    """Per shape, in the ``full`` mode: ours / base and peft / ours (or torch in their place on a CPU)."""
    full = {(r.provider, tuple(r.shape)): r.timing.median_ms for r in records if r.mode == "full"}
    lines = []
    for shape in dict.fromkeys(s for _, s in full):
        ours = full.get(("ours", shape), full.get(("torch", shape)))
        who = "ours" if ("ours", shape) in full else "torch"
        lines.append(f"{shape}: {who}/base {ours / full[('base', shape)]:.3f}, peft/{who} "
                     f"{full[('peft', shape)] / ours:.3f}")
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's list)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--scale", type=float, default=2.0, help="s = alpha / r")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode)")
    parser.add_argument("--nf4", action="store_true", help="NF4 base weights (QLoRA)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    layers = GPU_LAYERS if device == "cuda" else CPU_LAYERS
    extra = {"rank": args.rank, "dtype": str(dtype).removeprefix("torch."), "dropout": args.dropout,
             "base": "nf4" if args.nf4 else "dense"}
    records = []
    for layer in layers:
        for n in args.tokens or (GPU_TOKENS if device == "cuda" else CPU_TOKENS):
            inputs = make_inputs(n, layer[1], layer[2], args.rank, dtype, device, args.nf4)
            for name, (fn, grad_names) in providers(device, args.scale, args.dropout).items():
                records += bench_shape(name, fn, grad_names, layer, n, inputs, device, extra)
                if device == "cuda":
                    torch.cuda.empty_cache()  # one provider's cached blocks must not hide another's peak
    print(format_table(records))
    summary = ratios(records)
    print(summary)
    notes = f"r={args.rank}, s={args.scale}, dropout={args.dropout}, base {extra['base']}; {summary}"
    if device != "cuda":
        notes += "; CPU run: references only (ours would run in the Triton interpreter), not a GPU figure"
        print("CPU: ran the torch references at small shapes; the Triton kernels need a GPU to be timed")
    if not args.no_save:
        print(write_results("lora", records, device, notes=notes))


if __name__ == "__main__":
    main()
