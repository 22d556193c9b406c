"""Predict the peak memory of a LoRA / QLoRA training step, part by part, and whether it fits.

    python -m tools.memory_plan --model llama3.1-8b --quant nf4 --tokens 342733 --offload-activations --gpu-mem 80GiB
    python -m tools.memory_plan --model llama3.1-8b --quant nf4 --offload-activations --gpu-mem 80GiB --max-context
    python -m tools.memory_plan --model llama3.1-8b --quant nf4 --offload-activations --mlp-chunk-tokens 8192 \\
        --gpu-mem 80GiB --max-context
    python -m tools.memory_plan --model ~/.cache/lora-engine/smollm2-135m-instruct --device cpu --tokens 256 \\
        --no-grad-checkpointing --lora-rank 8
    python -m tools.memory_plan --model llama3.1-70b --quant nf4 --gpus 2 --strategy fsdp --gpu-mem 80GiB --max-context

``--model`` is a preset (`models.presets`) or a local HF folder (its config.json; nothing is
downloaded or loaded). ``--tokens`` is the tokens of one micro-batch (``--batch-size`` rows of
tokens / batch-size each; a padding-free row holds many documents, each within the model's
context). ``--quant`` is the frozen base's format: nf4, int8 or fp8 (`models.quantized`). The
parts and their formulas are `tools.memory_parts`: base weights (dense, or the format's bytes,
`models.quantized.quantized_bytes`; int8 and NF4 dequantized per product, FP8 products on the
e4m3 codes), embeddings/head/norms, LoRA parameters + gradients + AdamW moments,
saved activations (block inputs with checkpointing, in host memory with offload; every block's
saved tensors without), the largest transient (the recomputed block and its backward, or the
loss; with ``--mlp-chunk-tokens`` the MLP's terms for one chunk), and the CUDA context and
allocator slack (stated constants) — or, with ``--device cpu``, the same step on the CPU path
the engine takes there (fp32, the plain-torch references, per document SDPA) plus a stated
process overhead; `tools.measure_rss` measures such a run.
``--max-context`` bisects the longest row that fits in ``--gpu-mem``.

``--gpus G --strategy ddp|fsdp`` predicts the peak of ONE GPU, ``--tokens`` being one rank's
micro-batch; the engine's parallel runs are modelled as (`memory_parts.parallel_parts`):
DDP — every rank holds the whole model as on one GPU, plus DDP's gradient buckets (a copy of the
adapter gradients, 4 bytes per LoRA parameter). FSDP2 — ``fully_shard`` per decoder block and at
the root: every block tensor (bf16 weights, or NF4 packed bytes + absmax + nested absmax,
all-gathered as quantized bytes; norms; LoRA) sharded on dim 0, 1/G per rank padded up; the root
(embeddings, final norm, untied head) unsharded from the forward to the end of the backward, so
whole on every rank (plus its own 1/G shard); the all-gather output of 2 blocks (the one
computing and the one prefetched; under checkpointing the recompute gathers again, still 2);
LoRA's params, fp32 gradient shards and AdamW moments 1/G, plus the unsharded gradients of the
block in flight. Activations and transients are those of one GPU.

Checked: for SmolLM2-135M on the CPU (2 steps, r = 8, 256 tokens) the prediction is within 2.5 %
of the measured peak RSS increase, without and with --offload-activations, and with
--mlp-chunk-tokens 64 without checkpointing (981 MiB predicted, 1,003 MiB measured, against
1,256 MiB measured in one piece) (tests/tools/test_memory_plan.py; measured by
`tools.measure_rss`, which has glibc return freed memory to the system: with glibc's default heap
the peak RSS is 30-50 % higher than the live memory). Not checked on a GPU (none was available).

Longest trainable context, as this tool PREDICTS it (a prediction, not a measurement: no GPU was
available to check it), for llama3.1-8b QLoRA (NF4 base, bf16 compute), LoRA r = 16 on all
linears, batch 1, gradient checkpointing (``--max-context``); in parentheses the host memory
that --offload-activations pins:

    GPU memory   plain            --offload-activations   offload + --mlp-chunk-tokens 8192 (16384)
    80 GiB       155,504 tokens   321,692 (78.5 GiB)      769,561 (187.9 GiB)   757,129 (184.8 GiB)
    141 GiB      286,630 tokens   592,954 (144.8 GiB)     1,428,961 (348.9 GiB)  1,416,530 (345.8 GiB)

(MLP chunks of 8192 without offload: 213,892 tokens on 80 GiB, 397,167 on 141 GiB.)
Per token, the 32 block inputs kept for checkpointing cost 256 KiB on the device and the
recomputed block with its backward ~217 KiB (two thirds of it its SwiGLU: gate, up and act,
3·I·e, and their gradients, 2·I·e); offload moves the first to the host, which roughly doubles the
context. 342,733 tokens on 80 GiB is predicted at 84.7 GiB with offload alone (the recomputed
block 73.8 GiB); with MLP chunks of 8192 at 40.5 GiB (the recomputed block 31.7 GiB: per token
~52 KiB of attention and norm saves, 8 KiB of MLP input, 24 KiB of gradients (3·H·e) and the
prefetched 8 KiB block input; the chunk's tensors a constant ~1.4 GiB). Past ~524k tokens N·H exceeds 2³¹ elements: the kernels' index
arithmetic at that size is unchecked on a GPU, like the rest of this table.

On several GPUs (``--strategy fsdp``, PREDICTED, same setup; per rank, and with
--offload-activations in parentheses; notes/fits.md has the commands):

    longest row        2 × 24 GiB           3 × 24 GiB        4 × 24 GiB         2 × 80 GiB
    llama2-70b         4 tokens (16)        3,781 (14,392)    5,727 (21,799)     33,042 (125,775)
    llama3.1-70b       does not fit (28.6)  1,354 (5,157)     3,452 (13,141)     30,313 (115,385)

(llama3.1-70b on 2 GPUs needs 28.6 GiB each at one token: its 128,256-token embedding and head,
4.2 GB, are whole on every rank.) llama3.1-8b at 8,192 tokens per rank, per GPU: one GPU 11.47 GiB;
ddp 11.63 GiB on any G; fsdp 13.76 / 10.64 / 9.09 / 8.31 GiB on 1 / 2 / 4 / 8 GPUs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from engine.errors import InputError, run_cli
from models.config import LlamaConfig
from models.loading import read_config
from models.presets import PRESETS
from tools.memory_parts import LINEARS, QUANTS, STRATEGIES, Setup, plan

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_TOKENS = 1 << 31


def parse_size(text: str) -> int:
    """'80GiB' -> 80·2³⁰, '141GB' -> 141·10⁹, '1024' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"--gpu-mem {text!r}: expected a size such as 80GiB, 141GB or 85899345920")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def model_config(name: str) -> LlamaConfig:
    """A preset's config, or a local folder's config.json."""
    if name in PRESETS:
        return PRESETS[name].config
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise InputError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}) nor a folder with config.json")
    return read_config(path)


def targets_from_flag(text: str) -> tuple[str, ...]:
    if text == "all-linear":
        return LINEARS
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in LINEARS]
    if unknown or not names:
        raise InputError(f"--targets {text!r}: expected all-linear or names among {', '.join(LINEARS)}")
    return names


def setup_from_args(args: argparse.Namespace, tokens: int) -> Setup:
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.device == "cpu" and dtype != "fp32":
        raise InputError("--device cpu: the CPU path is modelled in fp32 (what the engine uses there)")
    if args.offload_activations and args.no_grad_checkpointing:
        raise InputError("--offload-activations keeps the inputs of gradient checkpointing in host memory: it "
                         "needs checkpointing, which --no-grad-checkpointing turns off")
    return Setup(cfg=model_config(args.model), tokens=tokens, batch_size=args.batch_size, quant=args.quant,
                 dtype_bytes=DTYPE_BYTES[dtype], lora_rank=args.lora_rank, targets=targets_from_flag(args.targets),
                 lora_dropout=args.lora_dropout, checkpointing=not args.no_grad_checkpointing,
                 offload=args.offload_activations, mlp_chunk=args.mlp_chunk_tokens, device=args.device,
                 gpus=args.gpus, strategy=args.strategy)


def longest_row(args: argparse.Namespace, budget: int) -> int:
    """The largest row length T (tokens = batch_size·T) whose predicted peak fits ``budget``, by
    doubling then bisection (the peak grows with T); 0 if not even one token fits."""
    fits = lambda t: plan(setup_from_args(args, t * args.batch_size)).peak <= budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < MAX_TOKENS and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def report(s: Setup, budget: int | None) -> str:
    p = plan(s)
    flags = [f"{s.tokens:,} tokens ({s.batch_size} × {s.tokens // s.batch_size:,})", s.quant, f"r={s.lora_rank}",
             "offload" if s.offload else ("checkpointing" if s.checkpointing else "no checkpointing"), s.device]
    if s.mlp_chunk is not None:
        flags.insert(-1, f"MLP chunks of {s.mlp_chunk:,}" if s.chunked else "MLP in one piece (tokens <= chunk)")
    if s.strategy != "single":
        flags.append(f"{s.strategy} on {s.gpus} GPU{'s' if s.gpus > 1 else ''} (per GPU, tokens per rank)")
    lines = ["predicted peak memory, " + ", ".join(flags)]
    width = max(len(name) for name in p.parts)
    lines += [f"  {name:<{width}}  {gib(nbytes)}   {p.notes[name]}" for name, nbytes in p.parts.items()]
    lines.append(f"  {'peak':<{width}}  {gib(p.peak)}")
    if p.host_bytes:
        lines.append(f"  {'host (pinned) memory':<{width}}  {gib(p.host_bytes)}   offloaded block inputs")
    if budget is not None:
        verdict = "fits" if p.peak <= budget else "does NOT fit"
        lines.append(f"{verdict} in {gib(budget).strip()} ({gib(abs(budget - p.peak)).strip()} "
                     f"{'free' if p.peak <= budget else 'over'})")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.memory_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset name or local HF folder (config.json)")
    p.add_argument("--quant", choices=QUANTS, default="none", help="frozen base weights: nf4 (QLoRA), int8 "
                   "(per-row absmax, dequantized per product like NF4) or fp8 (per-row e4m3, FP8 products)")
    p.add_argument("--tokens", type=int, help="tokens per micro-batch (required unless --max-context)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (default 1)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="all-linear", help="all-linear or a comma list of q_proj,...,down_proj")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (CPU path: saves masks)")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="keep every block's activations")
    p.add_argument("--offload-activations", action="store_true", help="block inputs in host memory")
    p.add_argument("--mlp-chunk-tokens", type=int, help="run each MLP over chunks of this many tokens "
                   "(the engine's --mlp-chunk-tokens; default: in one piece)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="compute dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="which code path (default cuda)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) training together (default 1); "
                   "the plan is per GPU, --tokens per rank")
    p.add_argument("--strategy", choices=STRATEGIES, default="single",
                   help="single (default), ddp or fsdp (FSDP2 per block + root); --gpus > 1 needs ddp or fsdp")
    p.add_argument("--gpu-mem", help="memory to fit in, e.g. 80GiB (with --device cpu: RAM)")
    p.add_argument("--max-context", action="store_true", help="search the longest row that fits --gpu-mem")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    budget = parse_size(args.gpu_mem) if args.gpu_mem else None
    for name in ("batch_size", "lora_rank", "mlp_chunk_tokens", "gpus"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_context:
        if budget is None:
            raise InputError("--max-context needs --gpu-mem (the memory to fit in)")
        T = longest_row(args, budget)
        if T == 0:
            raise InputError(f"not even one token per row fits in {gib(budget).strip()}")
        print(report(setup_from_args(args, T * args.batch_size), budget))
        print(f"longest row that fits: {T:,} tokens (predicted)")
        return 0
    if args.tokens is None or args.tokens < args.batch_size:
        raise InputError("--tokens (tokens per micro-batch, at least --batch-size) is required")
    print(report(setup_from_args(args, args.tokens), budget))
    return 0


if __name__ == "__main__":
    run_cli(main)
