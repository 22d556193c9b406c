"""How far each way of merging a QLoRA adapter drifts from the model as trained.

    python -m bench.merge_drift                      # SmolLM2 fixture on the CPU: ~10 minutes on 2 cores
    python -m bench.merge_drift --steps 4 --drift-samples 8    # a shorter look

A short QLoRA SFT run (``--quant nf4``, the demo's settings: ``examples/license_qa.jsonl``, r 16,
alpha 32, lr 1e-3, max_len 256) trains an adapter on the NF4-rounded base; then ``engine.merge``
merges it four ways, ``--onto quantized|original`` × ``--requantize none|nf4``, in bf16 (the
default dtype), plus ``--onto quantized`` in fp32 (the floor: no storage rounding). For each, the
drift of the folder as written from the model as trained (NF4 base + adapter unmerged, fp32),
measured by ``engine.merge`` itself on the first ``--drift-samples`` training samples
(`engine.merge_drift`): mean KL(as-trained ‖ merged) per counted token and top-1 agreement, as
merge.json records them. For scale, the same figures for the NF4 base with the adapter switched
off (a merge that lost the whole update would drift this much). Results go to
``bench/results/merge-drift-<device>-<date>.json``
(``--results``) with which ``--onto`` drifted less, with and without ``--requantize`` (the
defaults of `engine.merge_plan`), and a markdown table is printed. Times are
wall seconds of this machine, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, environment
from engine.adapters import disable_adapters, load_adapter
from engine.config import TrainConfig
from engine.data.samples import load_samples
from engine.merge import merge_to_folder
from engine.merge_drift import drift_to, reference_hiddens
from engine.merge_plan import DEFAULT_ONTO, DriftOptions
from engine.recipes import sft
from engine.run.setup import DTYPES, resolve_device
from models import load_model, load_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# (onto, requantize, dtype): the four ways, then the fp32 floor.
MODES = (("quantized", "none", "bf16"), ("original", "none", "bf16"), ("quantized", "nf4", "bf16"),
         ("original", "nf4", "bf16"), ("quantized", "none", "fp32"))


def train(args: argparse.Namespace, model: str) -> Path:
    """The short QLoRA run; its adapter folder."""
    output = Path(args.out) / "qlora"
    cfg = TrainConfig(model=model, data=str(EXAMPLES / "license_qa.jsonl"), output=str(output), overwrite=True,
                      quant="nf4", max_steps=args.steps, lr=1e-3, lora_r=16, lora_alpha=32, max_len=256,
                      batch_size=args.batch_size, warmup_steps=min(4, args.steps // 4), seed=args.seed)
    sft.train(cfg, progress=not args.no_progress)
    return output / "adapter"


def merge_row(model: str, adapter: Path, out: Path, onto: str, requantize: str, dtype: str,
              args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    result = merge_to_folder(model, str(adapter), out, DTYPES[dtype], onto=onto, requantize=requantize,
                             overwrite=True, drift=DriftOptions(samples=args.drift_samples, device=args.device))
    seconds = time.perf_counter() - start
    record = json.loads((out / "merge.json").read_text())  # the figures as the folder records them
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"onto": onto, "requantize": requantize, "dtype": dtype, "kl": record["drift"]["kl"],
            "top1": record["drift"]["top1"], "tokens": record["drift"]["tokens"],
            "samples": record["drift"]["samples"], "drift_on": record["drift_on"],
            "weights_bytes": size, "folder": str(out), "wall_s": round(seconds, 1),
            "summary": result.report.summary()}


def without_adapter(model: str, adapter: Path, args: argparse.Namespace) -> dict:
    """The drift of the NF4 base alone (adapters off) from the model as trained, on the same samples."""
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(model)
    samples, _ = load_samples(EXAMPLES / "license_qa.jsonl", tokenizer, max_len=DriftOptions.max_len)
    trained = load_model(model, quantize="nf4", dtype=torch.float32, device=device)
    load_adapter(trained, adapter)
    reference = reference_hiddens(trained, samples[:args.drift_samples], batch_size=DriftOptions.batch_size,
                                  pad_id=tokenizer.pad_token_id, device=device)
    with disable_adapters(trained):
        drift = drift_to(reference, trained, device)
    return drift.to_json()


def markdown(rows: list[dict], alone: dict) -> str:
    lines = ["| --onto | --requantize | dtype | mean KL (nats/token) | top-1 agreement | weights (MB) |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['onto']} | {r['requantize']} | {r['dtype']} | {r['kl']:.3g} | "
                     f"{100 * r['top1']:.2f}% | {r['weights_bytes'] / 1e6:.0f} |")
    lines.append(f"| (NF4 base, adapter off) | — | fp32 | {alone['kl']:.3g} | {100 * alone['top1']:.2f}% | — |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge_drift", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Model folder (default: the SmolLM2 fixture, tools.fixtures).")
    p.add_argument("--steps", type=int, default=20, help="QLoRA optimizer steps (default: 20).")
    p.add_argument("--batch-size", type=int, default=8, help="Samples per step (default: 8).")
    p.add_argument("--drift-samples", type=int, default=32, help="Training samples the drift is measured on "
                   "(default: 32).")
    p.add_argument("--device", default="auto", help="Device of the drift measurement (default: auto).")
    p.add_argument("--seed", type=int, default=42, help="Seed of the run (default: 42).")
    p.add_argument("--out", default="runs/merge_drift", help="Folder of the run and of the merged folders.")
    p.add_argument("--results", default=str(RESULTS_DIR), help="Folder of the JSON (default: bench/results).")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    args = p.parse_args(argv)
    if args.model is None:
        from tools.fixtures import smollm2_dir

        args.model = str(smollm2_dir())
    start = time.perf_counter()
    adapter = train(args, args.model)
    train_s = round(time.perf_counter() - start, 1)
    rows = [merge_row(args.model, adapter, Path(args.out) / f"merged-{onto}-{rq}-{dtype}", onto, rq, dtype, args)
            for onto, rq, dtype in MODES]
    alone = without_adapter(args.model, adapter, args)
    lower = {}  # by --requantize: the --onto of lower drift, among the bf16 merges
    for rq in ("none", "nf4"):
        candidates = [r for r in rows if r["requantize"] == rq and r["dtype"] == "bf16"]
        lower[rq] = min(candidates, key=lambda r: r["kl"])["onto"]
    table = markdown(rows, alone)
    print(table)
    for rq in ("none", "nf4"):
        print(f"--requantize {rq}: lower drift --onto {lower[rq]}; engine.merge's default: --onto {DEFAULT_ONTO[rq]}")
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"merge-drift-{env['device']}-{env['date'][:10]}.json"
    payload = {"bench": "merge_drift", "environment": env,
               "setup": {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3,
                         "lora_r": 16, "lora_alpha": 32, "max_len": 256, "quant": "nf4", "seed": args.seed,
                         "data": "examples/license_qa.jsonl", "drift_samples": args.drift_samples,
                         "train_wall_s": train_s},
               "results": rows, "nf4_base_without_adapter": alone, "lower_drift_onto": lower,
               "default_onto": DEFAULT_ONTO, "default_is_lower": lower == DEFAULT_ONTO, "table": table}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
