"""``python -m engine.merge --model BASE --adapter DIR --out DIR``: fold a LoRA adapter into its base
and write a plain HF-format model folder that transformers, vLLM and our own loader read.

Each adapted weight becomes W' = W + s B A (summed in fp32, stored in ``--dtype``). The folder holds
sharded safetensors (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or a
single ``model.safetensors``), ``config.json``, ``generation_config.json``, the base's tokenizer
files and a README saying what was merged. The folder is built under a temporary name and renamed.

A QLoRA adapter (``--quant nf4``, or its run recorded quant nf4, or a bitsandbytes 4-bit base:
`engine.merge_plan`) is merged ``--onto quantized`` (W' = dequant(NF4(W)) + s B A, the base rounded
to NF4 exactly as in training, what the adapter was trained against) or ``--onto original``
(W' = W + s B A on the 16-bit base; refused for a 4-bit base). ``--requantize nf4`` writes the
merged model as a 4-bit bitsandbytes folder (`models.bnb_writer`: Q' = NF4(W') for every merged
linear; the untargeted ones keep the NF4 weights of training). The default ``--onto`` is the one
that drifts less from the model as trained in our measurement (README, bench/merge_drift.py):
``quantized`` for a dense merge (it keeps only the rounding of W' to ``--dtype``; ``original``
adds the NF4 error W − dequant(NF4(W)) of every adapted layer), ``original`` with
``--requantize nf4`` (NF4 of dequant(NF4(W)) + s B A rounds most of the update away; the reasons
are in `engine.merge_plan`).

For a QLoRA merge the drift of the folder as written (loaded back by our loader) from the model
as trained (NF4 base + the adapter unmerged, in fp32) is measured on the first
``--drift-samples`` samples of ``--drift-data`` (default: the adapter's training data, when its
record names a file that exists): mean KL(as-trained ‖ merged) per counted token and top-1
agreement (`engine.merge_drift`), printed and recorded in merge.json and the README. A plain LoRA
merge is measured the same way when ``--drift-data`` is given (against base + adapter).

``--out`` is checked before any weight is read: never the base model's folder or the adapter's,
nor a folder holding them; an existing folder is replaced (``--overwrite``) only when it is a merged
folder this command wrote (its ``merge.json``) or is empty.

Two more modes, without ``--model``:

* ``--combine linear|cat|magnitude_prune|ties|dare_linear|dare_ties --adapter A --adapter B ... --weights 0.6,0.4 [--density D]
  [--seed S] --out DIR`` folds several adapters into one PEFT adapter folder, as PEFT's
  ``add_weighted_adapter`` does (`engine.adapters.combine`).
* ``--check-vllm --adapter DIR`` says whether vLLM can serve the adapter as LoRA and what to change
  if not (`engine.adapters.vllm_rules`); exit status 0 when it can, 1 when it cannot.

A flag of another mode (``--dtype`` with ``--combine``, ``--weights`` without it, ``--out`` with
``--check-vllm``) is refused rather than ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import models
from engine.adapters import MergeReport, load_adapter, merge, read_adapter_config, read_head_weight
from engine.adapters.methods import check_fits
from engine.adapters.combine import COMBINATIONS, MAJORITY_SIGN, combine_main
from engine.adapters.vllm_rules import check_vllm_main
from engine.cli import ArgumentParser
from engine.config import QUANTS
from engine.errors import InputError, run_cli
from engine.atomic import atomic_dir
from engine.merge_drift import Drift, drift_to, reference_hiddens
from engine.merge_plan import DEFAULT_ONTO, ONTO, REQUANTIZE, DriftOptions, MergePlan, plan_drift, plan_merge
from engine.run.folder import is_inside
from engine.run.setup import DTYPES, resolve_device
from models.bnb_writer import save_bnb_nf4_model
from models.loading import read_config, save_model, weight_files
from models.quantized import dequantize_linears, quantize_linears
from models.tokenizer import load_tokenizer

MERGE_MARKER = "merge.json"  # what makes a folder one this command wrote (and may replace)
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def stored_dtype(model_dir: Path, default: torch.dtype) -> torch.dtype:
    """The float dtype the checkpoint's tensors are stored in (``default`` if not one we load)."""
    with safe_open(str(weight_files(model_dir)[0]), framework="pt") as f:
        name = next(iter(f.keys()), None)
        code = f.get_slice(name).get_dtype() if name is not None else None
    return SAFETENSORS_DTYPES.get(code, default)


def write_side_files(model: nn.Module, base_dir: Path, out: Path) -> None:
    """generation_config.json and the tokenizer files of the base (config.json comes with the weights)."""
    hf = model.config.to_hf_config()
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    if not (out / "generation_config.json").exists():
        gen = {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id")}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def readme_text(base: str, adapter: str, dtype: torch.dtype, report: MergeReport, plan: MergePlan,
                drift: Drift | None, drift_note: str) -> str:
    weights = "4-bit NF4 (bitsandbytes format) block linears, the rest " if plan.requantize == "nf4" else ""
    lines = [
        "# Merged LoRA model", "",
        f"- base model: `{base}`",
        f"- adapter: `{adapter}`",
        f"- weights: {weights}{HF_DTYPE_NAMES[dtype]}; {report.summary()}.",
    ]
    fmt = plan.fmt.upper()
    if plan.onto == "quantized":
        lines.append(f"- {fmt} base: the adapter was trained on a {fmt} base, so it was merged onto the "
                     f"dequantized {fmt} weights, not onto the original full-precision ones (`--onto quantized`).")
    elif plan.onto == "original":
        lines.append(f"- adapter trained on {fmt} merged onto the original full-precision base weights (`--onto "
                     f"original`), not the {fmt} weights it was trained against: the {fmt} rounding error of every "
                     "adapted layer is in the drift below.")
    if plan.requantize == "nf4":
        lines.append("- requantized: every decoder-block linear stored in NF4 (blocksize 64, double quantization), "
                     "as transformers + bitsandbytes write a 4-bit model.")
    if drift is not None:
        lines.append(f"- {drift.summary()}; on the {drift_note}.")
    elif plan.qlora:
        lines.append(f"- drift from the model as trained: {drift_note}.")
    lines += ["", "Written by `python -m engine.merge`.", ""]
    return "\n".join(lines)


def check_out(out: Path, base_dir: Path, adapter: Path, overwrite: bool) -> None:
    """Raise InputError unless ``out`` may receive the merged model (see the module docstring)."""
    for what, path in (("the base model", base_dir), ("the adapter", adapter)):
        if path.exists() and (is_inside(out, path) or is_inside(path, out)):
            raise InputError(f"--out {out}: is or holds {what} ({path}), which the merge reads; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not _written_by_merge(out):
        raise InputError(f"--out {out}: holds files not written by engine.merge (no {MERGE_MARKER}); nothing "
                         "there is replaced: choose another folder")
    if not overwrite:
        raise InputError(f"--out {out}: already holds a merged model (pass --overwrite to replace it)")


def _written_by_merge(folder: Path) -> bool:
    """Its merge.json, or (folders merged before that marker existed) the README this command writes."""
    readme = folder / "README.md"
    return (folder / MERGE_MARKER).is_file() or (
        readme.is_file() and "Written by `python -m engine.merge`." in readme.read_text(errors="replace"))


@dataclass(frozen=True)
class MergeResult:
    report: MergeReport
    plan: MergePlan
    drift: Drift | None
    drift_note: str  # on what the drift was measured, or why it was not

    def drift_line(self) -> str | None:
        """The console line of the drift: always for a QLoRA merge, for a plain one when measured."""
        if self.drift is not None:
            return f"{self.drift.summary()}; on the {self.drift_note}"
        return f"drift from the model as trained: {self.drift_note}" if self.plan.qlora else None


def merge_to_folder(base: str, adapter: str, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    quant: str = "none", max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, *,
                    onto: str | None = None, requantize: str = "none",
                    drift: DriftOptions | None = None) -> MergeResult:
    """Merge ``adapter`` into ``base`` (module docstring) and write the folder at ``out``; measure its
    drift when ``drift`` says so (None: not measured)."""
    out = Path(out)
    if quant not in QUANTS:
        raise InputError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    base_dir = models.resolve_model_dir(base)
    check_out(out, base_dir, Path(adapter), overwrite)
    # the adapter (any mergeable method) fits the base: checked before any weight is read
    method = check_fits(read_config(base_dir), adapter, merging=True)
    if method.name == "lora" and read_head_weight(adapter, read_adapter_config(adapter)) is not None:
        raise InputError(f"--adapter {adapter}: a reward model (a score head beside LoRA): merging it would give a "
                         "causal LM without its head; score with it through engine.reward_model instead")
    plan = plan_merge(base_dir, adapter, quant, onto, requantize)
    drift_plan = plan_drift(plan, drift, base_dir)
    device = resolve_device(drift.device) if drift is not None else torch.device("cpu")
    reference = None
    if drift_plan.samples is not None:  # pass 1: the model as trained, kept as hidden states only
        trained = models.load_model(base, dtype=torch.float32, device=device, quantize=plan.fmt if plan.qlora else None)
        load_adapter(trained, adapter)
        pad_id = load_tokenizer(base_dir).pad_token_id
        reference = reference_hiddens(trained, drift_plan.samples, batch_size=drift.batch_size, pad_id=pad_id,
                                      device=device)
        del trained

    model, report = merged_model(base, base_dir, adapter, dtype, plan)
    with atomic_dir(out) as tmp:
        if plan.requantize == "nf4":
            save_bnb_nf4_model(model, tmp, dtype, max_shard_bytes=max_shard_bytes)
        else:
            save_model(model, tmp, max_shard_bytes=max_shard_bytes)  # config.json + (sharded) safetensors
        write_side_files(model, Path(base_dir), tmp)
        del model
        measured = None
        if reference is not None:  # pass 2: the folder as written, through our loader
            measured = drift_to(reference, models.load_model(tmp, dtype=torch.float32, device=device), device)
        (tmp / "README.md").write_text(readme_text(base, adapter, dtype, report, plan, measured, drift_plan.note))
        marker = {"format": "lora-engine merge", "base": base, "adapter": str(adapter),
                  "dtype": HF_DTYPE_NAMES[dtype], "quant": quant, "dequantized": report.dequantized,
                  "qlora": plan.qlora, "qlora_because": plan.why_qlora or None, "onto": plan.onto,
                  "trained_on": plan.fmt if plan.qlora else "none",
                  "requantize": plan.requantize,
                  "drift": measured.to_json() if measured is not None else None,
                  "drift_on": drift_plan.note if measured is not None else None,
                  "drift_data": drift_plan.data,
                  "drift_unmeasured": None if measured is not None else drift_plan.note}
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return MergeResult(report, plan, measured, drift_plan.note)


def merged_model(base: str, base_dir: Path, adapter: str, dtype: torch.dtype,
                 plan: MergePlan) -> tuple[nn.Module, MergeReport]:
    """The base (rounded to NF4 as in training for ``--onto quantized``) with the adapter folded in,
    in ``dtype``. For ``--requantize nf4`` every block linear ends as an `NF4Linear` (the untargeted
    ones as training quantized them); otherwise the untargeted NF4 layers are dequantized."""
    # Load at the checkpoint's own precision and round each merged weight once, to ``dtype``.
    model = models.load_model(base, dtype=stored_dtype(base_dir, dtype), device="cpu")
    if plan.onto == "quantized":
        quantize_linears(model, fmt=plan.fmt)  # a bnb 4-bit base is NF4 already: nothing left to quantize
    load_adapter(model, adapter)
    report = merge(model, dtype)
    if plan.requantize == "nf4":
        # Merged linears: NF4(W' in dtype). Untargeted ones: NF4 of the base at its own precision,
        # what training used (already NF4 for --onto quantized). The writer rounds the rest to dtype.
        quantize_linears(model)
        return model, report
    report.dequantized += dequantize_linears(model, dtype)  # NF4 layers the adapter did not target
    model.to(dtype)
    return model, report


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m engine.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Base model: preset name or HF-format folder. Required to merge.")
    p.add_argument("--adapter", action="append", default=[], help="PEFT-format LoRA adapter folder. Required; "
                   "with --combine, once per adapter.")
    p.add_argument("--out", help="Output folder for the merged HF-format model (with --combine: the adapter). "
                   "Required unless --check-vllm.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="Dtype of the merged weights "
                   "(default: bf16).")
    p.add_argument("--quant", choices=QUANTS, default="none",
                   help="nf4: the adapter was trained with QLoRA; int8, fp8: on that base (also known from its run's "
                   "config.json or a 4-bit "
                   "base; default: none).")
    qlora = p.add_argument_group("QLoRA adapters (engine.merge_plan) and the drift of the merge (engine.merge_drift)")
    qlora.add_argument("--onto", choices=ONTO, default=None,
                       help="A QLoRA adapter's base weights: quantized = dequant(NF4(W)), what it was trained "
                       "against; original = the 16-bit W, which adds the NF4 error (default: the lower drift from "
                       f"the model as trained in our measurement: {DEFAULT_ONTO['none']}, and with --requantize nf4 "
                       f"{DEFAULT_ONTO['nf4']}; quantized for a 4-bit base, where original is refused; refused for "
                       "a plain LoRA adapter).")
    qlora.add_argument("--requantize", choices=REQUANTIZE, default="none",
                       help="nf4: write the merged QLoRA model as a 4-bit bitsandbytes folder (default: none).")
    qlora.add_argument("--drift-data", help="Data (any engine.train format) to measure the drift from the model as "
                       "trained on (default for QLoRA: the adapter's training data file, if it still exists).")
    qlora.add_argument("--drift-samples", type=int, default=32, help="Measure on the first N samples of the file, "
                       "in file order; 0 skips the measurement (default: 32).")
    qlora.add_argument("--drift-max-len", type=int, default=512, help="Tokens per drift sample (default: 512).")
    qlora.add_argument("--drift-batch-size", type=int, default=4, help="Samples per drift batch (default: 4).")
    qlora.add_argument("--drift-device", default="auto", help="Device of the drift measurement, in fp32: auto "
                       "(cuda if available), cpu, cuda, cuda:N (default: auto).")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="Largest safetensors shard, in GiB (default: 2).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out when it holds a merged model this "
                   "command wrote.")
    combine = p.add_argument_group("combining adapters (engine.adapters.combine) and vLLM checks")
    combine.add_argument("--combine", choices=COMBINATIONS, help="Fold the --adapter folders into one adapter at "
                         "--out, as PEFT's add_weighted_adapter with this combination_type (cat: exact, rank the "
                         "sum of ranks; the others: one rank, entry by entry).")
    combine.add_argument("--weights", help="With --combine: one weight per --adapter, comma-separated (e.g. 0.6,0.4).")
    combine.add_argument("--density", type=float, help="magnitude_prune/ties/dare_linear/dare_ties: fraction of "
                         "entries kept, in (0, 1]. Required for them.")
    combine.add_argument("--majority-sign", choices=MAJORITY_SIGN, default="total", help="ties/dare_ties: how the "
                         "sign is elected (PEFT's majority_sign_method; default: total).")
    combine.add_argument("--seed", type=int, default=0, help="dare_linear/dare_ties: seed of the random drop "
                         "(default: 0).")
    combine.add_argument("--check-vllm", action="store_true", help="Say whether vLLM can serve --adapter as LoRA "
                         "and what to change if not; exit 0 when it can, 1 when it cannot.")
    return p


# The flags of each mode besides --adapter / --out / --overwrite (argparse dests).
MERGE_FLAGS = ("model", "dtype", "quant", "onto", "requantize", "drift_data", "drift_samples", "drift_max_len",
               "drift_batch_size", "drift_device", "max_shard_gb")
COMBINE_FLAGS = ("weights", "density", "majority_sign", "seed")


def refuse_flags(args: argparse.Namespace, parser: ArgumentParser, dests: tuple[str, ...], mode: str) -> None:
    """InputError naming every flag of ``dests`` given a value other than its default: a flag that
    ``mode`` would silently ignore."""
    given = [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) != parser.get_default(d)]
    if given:
        raise InputError(f"{', '.join(given)}: not used {mode}; drop {'it' if len(given) == 1 else 'them'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with those another mode owns refused: a plain merge takes no --combine flags, --combine
    no merge flags, --check-vllm neither (nor --out)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_vllm:
        if args.combine is not None:
            raise InputError("--check-vllm and --combine: give one of them")
        refuse_flags(args, parser, MERGE_FLAGS + COMBINE_FLAGS + ("out", "overwrite"), "with --check-vllm")
    elif args.combine is not None:
        refuse_flags(args, parser, MERGE_FLAGS, "with --combine (adapters are combined without their base)")
    else:
        refuse_flags(args, parser, COMBINE_FLAGS, "without --combine")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_vllm:
        return check_vllm_main(args.adapter)
    if args.combine is not None:
        return combine_main(args)
    if args.model is None or args.out is None or len(args.adapter) != 1:
        raise InputError("merging needs --model, one --adapter and --out (or use --combine / --check-vllm)")
    args.adapter = args.adapter[0]
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise InputError(f"--max-shard-gb must be a positive number, got {args.max_shard_gb}")
    drift = DriftOptions(args.drift_data, args.drift_samples, args.drift_max_len, args.drift_batch_size,
                         args.drift_device)
    result = merge_to_folder(args.model, args.adapter, args.out, DTYPES[args.dtype], args.quant,
                             int(args.max_shard_gb * 1024**3), args.overwrite, onto=args.onto,
                             requantize=args.requantize, drift=drift)
    print(f"{result.report.summary()}; wrote {args.out}")
    if (line := result.drift_line()) is not None:
        print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
