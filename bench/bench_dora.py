"""Benchmark: a DoRA training step against a LoRA step, side by side, on the same shapes.

Two levels, each with providers ``lora`` (`engine.adapters.lora.LoRALinear`) and ``dora``
(`engine.adapters.dora.DoRALinear`, same base, A, B, rank and scale):

* ``dora_linear``: one adapted linear, x (N, in) → (N, out), gradients for x, A, B (and DoRA's
  magnitude). Each call first bumps A's version in place (``A += 0``, both providers), as an
  optimizer step does, so DoRA recomputes its weight norm on every call: the worst case, one
  micro-batch per optimizer step. Modes ``forward``, ``backward``, ``full`` (bench.common).
* ``dora_step``: a whole training step of a small Llama with the adapter on every linear:
  forward, loss, backward, fused AdamW step (which invalidates DoRA's norm cache), mode ``step``.

The target (bench.targets): dora / lora time ≤ 1.3 in ``full`` and ``step``. On a CPU both run
the torch references (the Triton norm kernel only runs on a GPU) at small shapes; GPU shapes are
Llama-3-8B's linears and a 4-block model of hidden 2,048.

Run from the repository root: ``python -m bench.bench_dora [--quick] [--tokens 4096] [--nf4]``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench.common import (MODES, QUANTILES, Inputs, Record, Timing, _mode_call, bench_device, bench_dtype,
                          bench_parser, bench_shapes, dtype_name, measure, report)
from engine.adapters.dora import DoRALinear
from engine.adapters.lora import LoRALinear
from models.quantized import NF4Linear

GPU_LAYERS = [("llama3-8b.gate_up", 14336, 4096), ("llama3-8b.down", 4096, 14336), ("llama3-8b.kv", 1024, 4096)]
GPU_TOKENS = [2048, 8192]
QUICK_LAYERS = [("llama3-8b.gate_up", 14336, 4096)]
QUICK_TOKENS = [8192]
CPU_LAYERS = [("small.square", 512, 512), ("small.down", 256, 1024)]
CPU_TOKENS = [256]
# (hidden, intermediate, blocks, batch, seq) of the model step
GPU_MODEL, CPU_MODEL = (2048, 5632, 4, 4, 1024), (256, 688, 2, 2, 128)
ADAPTERS = {"lora": LoRALinear, "dora": DoRALinear}


def make_layer(kind: str, n_out: int, n_in: int, rank: int, dtype, device, nf4: bool) -> nn.Module:
    """The same seeded base and A, B for both providers; B non-zero (a trained adapter)."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    layer = ADAPTERS[kind](NF4Linear.from_linear(base) if nf4 else base, r=rank, alpha=2.0 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(0, n_out ** -0.5)
    return layer


def layer_step(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        layer.lora_A.add_(0.0)  # what an optimizer step does to the cache: A changed (version bumped)
    return layer(x)


def layer_inputs(kind, n, n_out, n_in, rank, dtype, device, nf4) -> Inputs:
    layer = make_layer(kind, n_out, n_in, rank, dtype, device, nf4)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, n_in, generator=g, device=device).to(dtype).requires_grad_()
    dy = torch.randn(n, n_out, generator=g, device=device).to(dtype)
    return Inputs(args=(x, layer), wrt=(x, *layer.adapter_parameters().values()), grad_out=dy)


def model_step(kind, device, dtype, shape, rank, nf4):
    """One SFT-like step of a small Llama with ``kind`` on every linear: forward, loss, backward,
    fused AdamW step (same seed, same batch for both providers)."""
    from engine.adapters import LoRAConfig, adapter_params, inject_adapter, set_trainable
    from models.config import LlamaConfig
    from models.llama import LlamaForCausalLM
    from models.quantized import quantize_linears

    hidden, inter, blocks, batch, seq = shape
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if nf4:
        quantize_linears(model)
    inject_adapter(model, LoRAConfig(r=rank, alpha=2.0 * rank, dropout=0.0, use_dora=kind == "dora"))
    set_trainable(model)
    opt = torch.optim.AdamW(list(adapter_params(model).values()), lr=1e-4, fused=True)
    ids = torch.randint(0, 4096, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    model.train()

    def step():
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def cpu_timings(calls: dict, reps: int) -> dict:
    """On a CPU: the providers' calls interleaved, each timed ``reps`` times in this process's CPU
    time (``time.process_time``, one thread), so that other load on a shared machine, which
    stretches wall-clock time, neither inflates nor favours one provider."""
    samples = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.process_time()
            fn()
            samples[name].append((time.process_time() - start) * 1e3)
    out = {}
    for name, ms in samples.items():
        q = torch.tensor(ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
        out[name] = Timing(round(float(q[0]), 5), round(float(q[1]), 5), round(float(q[2]), 5))
    return out


def timings(calls: dict, device: str, reps: int) -> dict:
    if device == "cuda":
        return {name: measure(fn, device) for name, fn in calls.items()}
    return cpu_timings(calls, reps)


def main(argv: list[str] | None = None):
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: the device's list)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--nf4", action="store_true", help="NF4 base weights (QDoRA vs QLoRA)")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model step")
    parser.add_argument("--cpu-reps", type=int, default=40, help="timed calls per point and provider on a CPU")
    args = parser.parse_args(argv)

    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    if device != "cuda":
        torch.set_num_threads(1)  # CPU time of one thread: see cpu_timings
    layers, tokens = bench_shapes(device, args.quick, (GPU_LAYERS, GPU_TOKENS), (QUICK_LAYERS, QUICK_TOKENS),
                                  (CPU_LAYERS, CPU_TOKENS))
    extra = {"dtype": dtype_name(dtype), "rank": args.rank, "base": "nf4" if args.nf4 else "dense"}
    records = []
    for layer, n_out, n_in in layers:
        for n in args.tokens or tokens:
            inputs = {kind: layer_inputs(kind, n, n_out, n_in, args.rank, dtype, device, args.nf4) for kind in ADAPTERS}
            for mode in MODES:
                calls = {kind: _mode_call(mode, layer_step, inputs[kind]) for kind in ADAPTERS}
                for kind, timing in timings(calls, device, args.cpu_reps).items():
                    records.append(Record("dora_linear", kind, (n, n_in, n_out), mode, timing,
                                          extra={**extra, "layer": layer}))
    if not args.no_model:
        shape = GPU_MODEL if device == "cuda" else CPU_MODEL
        calls = {kind: model_step(kind, device, dtype, shape, args.rank, args.nf4) for kind in ADAPTERS}
        for kind, timing in timings(calls, device, max(5, args.cpu_reps // 4)).items():
            records.append(Record("dora_step", kind, (shape[3] * shape[4], shape[0], shape[2]), "step", timing,
                                  extra=extra))
    notes = (f"dora_linear shape (N, in, out), dora_step shape (tokens, hidden, blocks); r={args.rank}, "
             f"base {extra['base']}; the norm recomputed every call/step (one micro-batch per step)")
    if device != "cuda":
        notes += "; CPU: one thread, process CPU time, providers interleaved"
    return report("dora", records, device, args, notes=notes)


if __name__ == "__main__":
    main()
