"""How far each frozen-base format moves the next-token distribution from the dense fp32 model.

    python -m bench.quant_drift                          # SmolLM2 fixture on the CPU: ~1-2 minutes on 2 cores
    python -m bench.quant_drift --tokens 512 --out /tmp/drift.json   # a shorter look

Reference p: the dense model in fp32 (``models.load_model(dir, dtype=torch.float32)``). Compared q,
one model at a time on the same token rows:

* ``bf16``: the dense model loaded in bf16 (weights and compute in bf16: the usual LoRA base);
* ``int8``: per-row absmax int8 decoder linears (`models.quantized.Int8Linear`), dequantized to
  the compute dtype for each product;
* ``fp8``: per-row scaled e4m3 decoder linears (`models.quantized.FP8Linear`); the activations are
  quantized per row too, inside each product (`kernels.fp8_linear`: ``torch._scaled_mm`` on a GPU
  of compute capability >= 8.9, its exact fp32 emulation elsewhere, as on this CPU);
* ``nf4``: QLoRA's NF4 (blocksize 64, double quantization) decoder linears.

The quantized formats compute in ``--dtype`` (default fp32, so that their rows measure the storage
format alone, plus FP8's activation rounding; embeddings, norms and the head stay dense in that
dtype). The text: the distinct assistant answers of ``examples/license_qa.jsonl`` tokenised by the
model's own tokenizer (`models.tokenizer`), joined with EOS and cut into rows of ``--row-len``
tokens, the first ``--tokens`` of them. Over those N positions t and the vocabulary V:

    kl    = (1 / N) Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v))     mean KL(ref ‖ fmt), nats/token
    top1  = (1 / N) Σ_t [argmax_v z0_t(v) = argmax_v z_t(v)]      agreement with the reference
    dlogit = (1 / (N·V)) Σ_t Σ_v |z0_t(v) − z_t(v)|              mean |logit difference| (raw logits)

plus ``base_bytes``: the bytes of the decoder linears' weights as each loaded model holds them
(dense weight or the format's buffers; `models.quantized.quantized_bytes` per weight). The result
goes to ``bench/results/quant_drift-<device>-<date>.json`` (``--out``) with the environment
(`bench.common.environment`) and the settings, and a table is printed. Times are wall seconds of
this machine, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import RESULTS_DIR, environment
from kernels.fp8 import scaled_mm_available
from models import load_model, load_tokenizer
from models.quantized import QuantizedLinear, should_quantize

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FORMATS = ("bf16", "int8", "fp8", "nf4")  # compared against the fp32 dense reference
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DriftSums:
    """Running sums over positions: Σ KL (nats), Σ top-1 agreements, Σ |Δlogit|, positions, logits."""

    kl: float = 0.0
    agree: int = 0
    abs_diff: float = 0.0
    tokens: int = 0
    elements: int = 0

    def add(self, other: DriftSums) -> None:
        self.kl, self.agree, self.abs_diff = self.kl + other.kl, self.agree + other.agree, self.abs_diff + other.abs_diff
        self.tokens, self.elements = self.tokens + other.tokens, self.elements + other.elements

    def means(self) -> dict:
        """kl (nats/token), top1 (fraction), mean_abs_logit_diff, tokens."""
        return {"kl": self.kl / self.tokens, "top1": self.agree / self.tokens,
                "mean_abs_logit_diff": self.abs_diff / self.elements, "tokens": self.tokens}


def drift_sums(ref_logits: torch.Tensor, logits: torch.Tensor) -> DriftSums:
    """The sums of the module docstring's metrics for ref z0 and candidate z, both (n, V), in fp64
    (a KL of 1e-6 nats is a small difference of log-probabilities of ~10: fp32 rounding alone can
    turn it negative): KL(softmax z0 ‖ softmax z) by ``F.kl_div(log q, log p, log_target=True)``."""
    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"logits: expected two (n, V) tensors of one shape, got {tuple(ref_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    z0, z = ref_logits.double(), logits.double()
    log_p, log_q = F.log_softmax(z0, dim=-1), F.log_softmax(z, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum()
    return DriftSums(kl=kl.item(), agree=int((z0.argmax(-1) == z.argmax(-1)).sum()),
                     abs_diff=(z0 - z).abs().sum().item(), tokens=z0.shape[0],
                     elements=z0.numel())


def text_rows(model_dir: str, data: Path, tokens: int, row_len: int) -> torch.Tensor:
    """(R, row_len) token ids: the distinct assistant texts of ``data`` tokenised, joined with EOS,
    the first ``tokens // row_len`` full rows (fewer when the text is shorter)."""
    tokenizer = load_tokenizer(model_dir)
    texts = []
    for line in data.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"] if line.strip() else []:
            if message["role"] == "assistant" and message["content"] not in texts:
                texts.append(message["content"])
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    rows = min(tokens // row_len, len(ids) // row_len)
    if rows == 0:
        raise ValueError(f"{data}: {len(ids)} tokens, fewer than one row of {row_len}")
    return torch.tensor(ids[:rows * row_len]).view(rows, row_len)


def base_linear_bytes(model: nn.Module) -> int:
    """Bytes of the decoder linears' weights as held: a dense weight's, or a `QuantizedLinear`'s
    buffers (codes, scales, tables: `models.quantized.quantized_bytes`); biases not counted."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif isinstance(module, nn.Linear) and should_quantize(name + ".weight"):
            total += module.weight.numel() * module.weight.element_size()
    return total


@torch.no_grad()
def model_logits(model: nn.Module, rows: torch.Tensor, batch: int, device: str) -> list[torch.Tensor]:
    """The logits of each batch of rows, flattened to (b·T, V) fp32 on the CPU."""
    out = []
    for start in range(0, rows.shape[0], batch):
        z = model(rows[start:start + batch].to(device))                       # (b, T, V)
        out.append(z.reshape(-1, z.shape[-1]).float().cpu())
    return out


def load_format(model_dir: str, fmt: str, dtype: torch.dtype, device: str) -> nn.Module:
    """``fp32``: the reference; ``bf16``: dense in bf16; else the format in ``dtype``."""
    if fmt in DTYPES:
        return load_model(model_dir, dtype=DTYPES[fmt], device=device)
    return load_model(model_dir, quantize=fmt, dtype=dtype, device=device)


def measure(model_dir: str, rows: torch.Tensor, formats: tuple[str, ...], dtype: torch.dtype, batch: int,
            device: str) -> tuple[list[dict], int]:
    """One row per format (its metrics, base bytes, wall seconds) and the reference's base bytes."""
    reference = load_format(model_dir, "fp32", dtype, device)
    ref_logits, ref_bytes = model_logits(reference, rows, batch, device), base_linear_bytes(reference)
    del reference
    results = []
    for fmt in formats:
        start = time.perf_counter()
        model = load_format(model_dir, fmt, dtype, device)
        sums = DriftSums()
        for z0, z in zip(ref_logits, model_logits(model, rows, batch, device)):
            sums.add(drift_sums(z0, z))
        results.append({"format": fmt, "compute_dtype": "bf16" if fmt == "bf16" else _name(dtype),
                        **sums.means(), "base_bytes": base_linear_bytes(model),
                        "wall_s": round(time.perf_counter() - start, 1)})
        del model
    return results, ref_bytes


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def table(rows: list[dict], ref_bytes: int) -> str:
    lines = ["| format | compute | mean KL (nats/token) | top-1 agreement | mean abs dlogit | decoder linears (MB) |",
             "|---|---|---:|---:|---:|---:|",
             f"| fp32 (reference) | fp32 | 0 | 100% | 0 | {ref_bytes / 1e6:.1f} |"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['compute_dtype']} | {r['kl']:.3g} | {100 * r['top1']:.2f}% | "
                     f"{r['mean_abs_logit_diff']:.3g} | {r['base_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_drift", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Model folder (default: the SmolLM2 fixture, tools.fixtures).")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"Comma-separated, of {', '.join(FORMATS)}.")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="Compute dtype of the quantized formats "
                   "(default fp32: the format's rounding alone).")
    p.add_argument("--tokens", type=int, default=2048, help="Positions measured (default 2048).")
    p.add_argument("--row-len", type=int, default=256, help="Tokens per row (default 256).")
    p.add_argument("--batch", type=int, default=2, help="Rows per forward (default 2).")
    p.add_argument("--device", default="cpu", help="Device of every model (default cpu).")
    p.add_argument("--data", default=str(EXAMPLES / "license_qa.jsonl"), help="Chat JSONL whose assistant texts "
                   "are measured (default examples/license_qa.jsonl).")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/quant_drift-<device>-<date>.json).")
    args = p.parse_args(argv)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    if not formats or any(f not in FORMATS for f in formats):
        p.error(f"--formats {args.formats!r}: expected names among {', '.join(FORMATS)}")
    if args.model is None:
        from tools.fixtures import smollm2_dir

        args.model = str(smollm2_dir())
    torch.manual_seed(0)
    rows = text_rows(args.model, Path(args.data), args.tokens, args.row_len)
    start = time.perf_counter()
    results, ref_bytes = measure(args.model, rows, formats, DTYPES[args.dtype], args.batch, args.device)
    text = table(results, ref_bytes)
    print(f"{rows.numel()} positions ({rows.shape[0]} rows of {rows.shape[1]}), reference: dense fp32")
    print(text)
    env = environment("cuda" if str(args.device).startswith("cuda") else "cpu")
    path = Path(args.out) if args.out else RESULTS_DIR / f"quant_drift-{env['device']}-{env['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": "quant_drift", "environment": env,
               "setup": {"model": args.model, "reference": "dense fp32", "formats": list(formats),
                         "quantized_compute_dtype": args.dtype, "data": args.data, "text": "distinct assistant "
                         "texts, EOS-joined", "positions": rows.numel(), "rows": rows.shape[0],
                         "row_len": rows.shape[1], "batch": args.batch, "device": args.device,
                         "fp8_products": "torch._scaled_mm" if args.dtype == "bf16" and
                         scaled_mm_available(torch.device(args.device)) else "fp32 emulation",
                         "wall_s": round(time.perf_counter() - start, 1)},
               "reference_base_bytes": ref_bytes, "results": results, "table": text}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
